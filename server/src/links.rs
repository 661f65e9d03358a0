//! The broker's ends of the links to provider processes, one per provided
//! session, in one epoll set the main loop polls (the engine's workers never
//! see them: the broker is out of a provided session's data path).
//!
//! A link carries nothing. The provider closing its end (or dying) ends the
//! session; so does a provider writing to it, which it must never do.
//! Dropping the broker's end (when the session ends at the broker) tells
//! the provider.

use shmlink_endpoint::sys::{self, Events, HangupState, Interest, Selector, Token};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

/// Events fetched per wait; more wait for the next round.
const EVENT_BATCH: usize = 64;

/// The links of the provided sessions that are open.
pub(crate) struct Links {
    selector: Arc<Selector>,
    links: HashMap<u64, OwnedFd>,
}

impl Links {
    /// An empty set.
    pub fn new() -> std::io::Result<Links> {
        Ok(Links {
            selector: Arc::new(Selector::new()?),
            links: HashMap::new(),
        })
    }

    /// The links' selector, for its fd: readable when a link has something
    /// to report ([`Links::take_ended`]).
    pub fn fd(&self) -> Arc<Selector> {
        self.selector.clone()
    }

    /// Watches the broker's end `link` of session `id`.
    pub fn watch(&mut self, id: u64, link: OwnedFd) -> std::io::Result<()> {
        self.selector
            .add(&link, Token(id), Interest::READABLE | Interest::PEER_CLOSED)?;
        self.links.insert(id, link);
        Ok(())
    }

    /// Stops watching session `id` and closes the broker's end, which the
    /// provider sees. Returns whether it was watched.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(link) = self.links.remove(&id) else {
            return false;
        };
        if let Err(e) = self.selector.delete(&link) {
            log::warn!("epoll_ctl(DEL) of the link of session {id} failed: {e}");
        }
        true
    }

    /// The sessions whose provider closed (or wrote to) its link, with the
    /// reason; does not wait. Each stays watched until [`Links::remove`].
    pub fn take_ended(&mut self) -> Vec<(u64, &'static str)> {
        let mut events = Events::with_capacity(EVENT_BATCH);
        if let Err(e) = self.selector.wait(&mut events, Some(Instant::now())) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                log::error!("epoll_wait on the provider links failed: {e}");
            }
            return Vec::new();
        }
        events
            .iter()
            .filter_map(|ev| {
                let Token(id) = ev.token;
                let link = self.links.get(&id)?;
                match sys::hangup_state(link.as_fd()) {
                    Ok(HangupState::Open) => None,
                    Ok(HangupState::Closed) => Some((id, "provider closed the session")),
                    Ok(HangupState::Written) => Some((id, "provider wrote to its link")),
                    Err(_) => Some((id, "provider's link failed")),
                }
            })
            .collect()
    }

    /// Number of links watched.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.links.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_or_written_link_is_reported_and_removing_closes_ours() {
        let mut links = Links::new().expect("epoll");
        let (ours1, theirs1) = sys::socketpair().expect("pair");
        let (ours2, theirs2) = sys::socketpair().expect("pair");
        let (ours3, theirs3) = sys::socketpair().expect("pair");
        links.watch(1, ours1).expect("watch");
        links.watch(2, ours2).expect("watch");
        links.watch(3, ours3).expect("watch");
        assert!(links.take_ended().is_empty(), "nothing happened yet");
        drop(theirs1);
        rustix::io::write(&theirs2, b"x").expect("write");
        let mut ended = links.take_ended();
        ended.sort();
        assert_eq!(
            ended,
            vec![
                (1, "provider closed the session"),
                (2, "provider wrote to its link")
            ]
        );
        assert!(links.remove(1) && links.remove(2));
        assert!(!links.remove(1), "removed once");
        assert!(links.take_ended().is_empty());
        assert!(links.remove(3));
        assert_eq!(
            sys::hangup_state(theirs3.as_fd()).expect("state"),
            HangupState::Closed,
            "the provider sees the broker's end close"
        );
        assert_eq!(links.len(), 0);
    }
}
