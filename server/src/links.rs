//! The broker's ends of the links to provider processes, one per provided
//! session, in one epoll set the main loop polls (the engine's workers never
//! see them: the broker is out of a provided session's data path).
//!
//! A link carries nothing. The provider closing its end (or dying) ends the
//! session; so does a provider writing to it, which it must never do.
//! Dropping the broker's end (when the session ends at the broker) tells
//! the provider.

use shmlink_endpoint::sys::{self, Events, HangupState, Interest, Selector, Token};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

/// Events fetched per wait; more wait for the next round.
const EVENT_BATCH: usize = 64;

/// The selector the broker's ends of the links are watched in.
pub(crate) struct Links {
    selector: Arc<Selector>,
}

/// The broker's end of one session's link, watched while it lives:
/// dropping it stops the watch and closes the end, which the provider sees.
pub(crate) struct WatchedLink {
    link: OwnedFd,
    selector: Arc<Selector>,
}

impl Links {
    /// An empty set.
    pub fn new() -> std::io::Result<Links> {
        Ok(Links {
            selector: Arc::new(Selector::new()?),
        })
    }

    /// The links' selector, for its fd: readable when a link has something
    /// to report ([`Links::ready`]).
    pub fn fd(&self) -> Arc<Selector> {
        self.selector.clone()
    }

    /// Watches the broker's end `link` of session `id`.
    pub fn watch(&self, id: u64, link: OwnedFd) -> std::io::Result<WatchedLink> {
        self.selector
            .add(&link, Token(id), Interest::READABLE | Interest::PEER_CLOSED)?;
        Ok(WatchedLink {
            link,
            selector: self.selector.clone(),
        })
    }

    /// The sessions whose link has something to report (see
    /// [`WatchedLink::ended`]); does not wait.
    pub fn ready(&self) -> Vec<u64> {
        let mut events = Events::with_capacity(EVENT_BATCH);
        if let Err(e) = self.selector.wait(&mut events, Some(Instant::now())) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                log::error!("epoll_wait on the provider links failed: {e}");
            }
            return Vec::new();
        }
        events.iter().map(|ev| ev.token.0).collect()
    }
}

impl WatchedLink {
    /// Why the session ends, if its provider closed (or wrote to) the link.
    pub fn ended(&self) -> Option<&'static str> {
        match sys::hangup_state(self.link.as_fd()) {
            Ok(HangupState::Open) => None,
            Ok(HangupState::Closed) => Some("provider closed the session"),
            Ok(HangupState::Written) => Some("provider wrote to its link"),
            Err(_) => Some("provider's link failed"),
        }
    }
}

impl Drop for WatchedLink {
    fn drop(&mut self) {
        if let Err(e) = self.selector.delete(&self.link) {
            log::warn!("epoll_ctl(DEL) of a provider link failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_or_written_link_is_reported_and_dropping_closes_ours() {
        let links = Links::new().expect("epoll");
        let (ours1, theirs1) = sys::socketpair().expect("pair");
        let (ours2, theirs2) = sys::socketpair().expect("pair");
        let (ours3, theirs3) = sys::socketpair().expect("pair");
        let w1 = links.watch(1, ours1).expect("watch");
        let w2 = links.watch(2, ours2).expect("watch");
        let w3 = links.watch(3, ours3).expect("watch");
        assert!(links.ready().is_empty(), "nothing happened yet");
        drop(theirs1);
        rustix::io::write(&theirs2, b"x").expect("write");
        let mut ready = links.ready();
        ready.sort();
        assert_eq!(ready, [1, 2]);
        assert_eq!(w1.ended(), Some("provider closed the session"));
        assert_eq!(w2.ended(), Some("provider wrote to its link"));
        assert_eq!(w3.ended(), None);
        drop((w1, w2));
        assert!(links.ready().is_empty(), "dropped links are not watched");
        drop(w3);
        assert_eq!(
            sys::hangup_state(theirs3.as_fd()).expect("state"),
            HangupState::Closed,
            "the provider sees the broker's end close"
        );
    }
}
