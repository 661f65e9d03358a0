//! The broker's ends of the provided sessions' sockets, in one epoll set the
//! main loop polls (the engine's workers never see them: the broker is out
//! of a provided session's data path).
//!
//! Each provided session has three sockets with an end at the broker
//! ([`BrokerEnds`]): the link to its provider, and the two hang-up pairs the
//! broker stands between (client ↔ broker, broker ↔ provider). None of them
//! carries anything. Either peer closing its end (or dying) ends the session;
//! so does a peer writing to one, which it must never do. Ending the session
//! at the broker drops the broker's ends, which both peers see: the client
//! on its hang-up socket, the provider on its hang-up socket and its link.

use shmlink_endpoint::sys::{self, Events, HangupState, Interest, Selector, Token};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

/// Events fetched per wait; more wait for the next round.
const EVENT_BATCH: usize = 64;

/// The selector the broker's ends of the provided sessions are watched in.
pub(crate) struct Links {
    selector: Arc<Selector>,
}

/// The broker's ends of one provided session's sockets.
pub(crate) struct BrokerEnds {
    /// The broker's end of the link to the provider.
    pub link: OwnedFd,
    /// The broker's end of the client's hang-up socket.
    pub client_hangup: OwnedFd,
    /// The broker's end of the provider's hang-up socket.
    pub provider_hangup: OwnedFd,
}

/// The broker's ends of one session's sockets, watched while they live:
/// dropping them stops the watch and closes them, which the client and the
/// provider see.
pub(crate) struct WatchedEnds {
    ends: BrokerEnds,
    selector: Arc<Selector>,
}

impl Links {
    /// An empty set.
    pub fn new() -> std::io::Result<Links> {
        Ok(Links {
            selector: Arc::new(Selector::new()?),
        })
    }

    /// The selector, for its fd: readable when a session's ends have
    /// something to report ([`Links::ready`]).
    pub fn fd(&self) -> Arc<Selector> {
        self.selector.clone()
    }

    /// Watches the broker's `ends` of session `id`, all three under its id.
    ///
    /// Level-triggered for input and the peer's shut-down: a peer that
    /// writes keeps its end readable, but the session it writes to ends at
    /// the first report ([`WatchedEnds::ended`]), and its ends leave the set
    /// with it, so no end is reported again and again.
    pub fn watch(&self, id: u64, ends: BrokerEnds) -> std::io::Result<WatchedEnds> {
        let interest = Interest::READABLE | Interest::PEER_CLOSED;
        let mut added = Vec::with_capacity(3);
        for fd in [&ends.link, &ends.client_hangup, &ends.provider_hangup] {
            if let Err(e) = self.selector.add(fd, Token(id), interest) {
                for fd in added {
                    let _ = self.selector.delete(fd);
                }
                return Err(e);
            }
            added.push(fd);
        }
        Ok(WatchedEnds {
            ends,
            selector: self.selector.clone(),
        })
    }

    /// The sessions whose ends have something to report (see
    /// [`WatchedEnds::ended`]), each once; does not wait.
    pub fn ready(&self) -> Vec<u64> {
        let mut events = Events::with_capacity(EVENT_BATCH);
        if let Err(e) = self.selector.wait(&mut events, Some(Instant::now())) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                log::error!("epoll_wait on the provided sessions' sockets failed: {e}");
            }
            return Vec::new();
        }
        let mut ids: Vec<u64> = events.iter().map(|ev| ev.token.0).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

impl WatchedEnds {
    /// Why the session ends, if its provider closed (or wrote to) its link
    /// or its hang-up socket, or its client closed (or wrote to) its
    /// hang-up socket.
    pub fn ended(&self) -> Option<&'static str> {
        let BrokerEnds {
            link,
            client_hangup,
            provider_hangup,
        } = &self.ends;
        let provider = |fd: &OwnedFd, written, failed| match sys::hangup_state(fd.as_fd()) {
            Ok(HangupState::Open) => None,
            Ok(HangupState::Closed) => Some("provider closed the session"),
            Ok(HangupState::Written) => Some(written),
            Err(_) => Some(failed),
        };
        provider(link, "provider wrote to its link", "provider's link failed")
            .or_else(|| {
                provider(
                    provider_hangup,
                    "provider wrote to its hang-up socket",
                    "provider's hang-up socket failed",
                )
            })
            .or_else(|| match sys::hangup_state(client_hangup.as_fd()) {
                Ok(HangupState::Open) => None,
                // As a hosted session's worker says it.
                Ok(HangupState::Closed) => Some("client hung up"),
                Ok(HangupState::Written) => {
                    Some("client misbehaved: the other side wrote to the hang-up socket")
                }
                Err(_) => Some("client's hang-up socket failed"),
            })
    }
}

impl Drop for WatchedEnds {
    fn drop(&mut self) {
        let e = &self.ends;
        for fd in [&e.link, &e.client_hangup, &e.provider_hangup] {
            if let Err(e) = self.selector.delete(fd) {
                log::warn!("epoll_ctl(DEL) of a provided session's socket failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The broker's ends of one session's sockets, and the other ends:
    /// the provider's link, the client's hang-up, the provider's hang-up.
    fn ends() -> (BrokerEnds, [OwnedFd; 3]) {
        let (link, provider_link) = sys::socketpair().expect("pair");
        let (client_hangup, client) = sys::socketpair().expect("pair");
        let (provider_hangup, provider) = sys::socketpair().expect("pair");
        let ends = BrokerEnds {
            link,
            client_hangup,
            provider_hangup,
        };
        (ends, [provider_link, client, provider])
    }

    fn closed(fd: &OwnedFd) -> bool {
        sys::hangup_state(fd.as_fd()).expect("state") == HangupState::Closed
    }

    #[test]
    fn a_closed_or_written_link_is_reported_and_dropping_closes_ours() {
        let links = Links::new().expect("epoll");
        let (ours1, [link1, _client1, _provider1]) = ends();
        let (ours2, [link2, _client2, _provider2]) = ends();
        let (ours3, theirs3) = ends();
        let w1 = links.watch(1, ours1).expect("watch");
        let w2 = links.watch(2, ours2).expect("watch");
        let w3 = links.watch(3, ours3).expect("watch");
        assert!(links.ready().is_empty(), "nothing happened yet");
        drop(link1);
        rustix::io::write(&link2, b"x").expect("write");
        assert_eq!(links.ready(), [1, 2]);
        assert_eq!(w1.ended(), Some("provider closed the session"));
        assert_eq!(w2.ended(), Some("provider wrote to its link"));
        assert_eq!(w3.ended(), None);
        drop((w1, w2));
        assert!(links.ready().is_empty(), "dropped ends are not watched");
        drop(w3);
        assert!(
            theirs3.iter().all(closed),
            "the provider sees its link and its hang-up close, the client its hang-up"
        );
    }

    #[test]
    fn a_client_closing_or_writing_to_its_hang_up_is_reported_once() {
        let links = Links::new().expect("epoll");
        let (ours1, [_link1, client1, _provider1]) = ends();
        let (ours2, [_link2, client2, _provider2]) = ends();
        let (ours3, [_link3, _client3, provider3]) = ends();
        let (ours4, [link4, _client4, provider4]) = ends();
        let (ours5, theirs5) = ends();
        let w: Vec<WatchedEnds> = [ours1, ours2, ours3, ours4, ours5]
            .into_iter()
            .zip(1..)
            .map(|(ours, id)| links.watch(id, ours).expect("watch"))
            .collect();
        drop(client1);
        rustix::io::write(&client2, b"bytes the broker never reads").expect("write");
        drop(provider3);
        // Both of the provider's sockets at once: one report of the session.
        drop((link4, provider4));
        assert_eq!(links.ready(), [1, 2, 3, 4]);
        assert_eq!(w[0].ended(), Some("client hung up"));
        assert_eq!(
            w[1].ended(),
            Some("client misbehaved: the other side wrote to the hang-up socket")
        );
        assert_eq!(w[2].ended(), Some("provider closed the session"));
        assert_eq!(w[3].ended(), Some("provider closed the session"));
        assert_eq!(w[4].ended(), None);
        // The written bytes stay unread, but the ends leave the set with
        // their session: nothing is reported again.
        let mut w = w.into_iter();
        drop(w.by_ref().take(4).collect::<Vec<_>>());
        assert!(links.ready().is_empty());
        assert!(
            !sys::poll_readable(&[links.fd().as_fd()], Some(Instant::now())).expect("poll")[0]
                .readable,
            "the selector's fd is quiet"
        );
        assert!(theirs5.iter().all(|fd| !closed(fd)), "the others live on");
        drop(w);
        assert!(theirs5.iter().all(closed));
    }
}
