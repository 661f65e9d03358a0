//! The broker's ends of the links to provider processes, one per provided
//! session, in one epoll set the main loop polls (the engine's workers never
//! see them: the broker is out of a provided session's data path).
//!
//! A link carries nothing. The provider closing its end (or dying) ends the
//! session; so does a provider writing to it, which it must never do.
//! Dropping the broker's end (when the session ends at the broker) tells
//! the provider.

use rustix::event::epoll::{self, EventData, EventFlags};
use shmlink_endpoint::sys::{self, HangupState};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// Events fetched per `epoll_wait`; more wait for the next round.
const EVENT_BATCH: usize = 64;

/// The links of the provided sessions that are open.
pub(crate) struct Links {
    epoll: Arc<OwnedFd>,
    links: HashMap<u64, OwnedFd>,
}

impl Links {
    /// An empty set.
    pub fn new() -> std::io::Result<Links> {
        Ok(Links {
            epoll: Arc::new(epoll::create(epoll::CreateFlags::CLOEXEC)?),
            links: HashMap::new(),
        })
    }

    /// The epoll fd: readable when a link has something to report
    /// ([`Links::take_ended`]).
    pub fn fd(&self) -> Arc<OwnedFd> {
        self.epoll.clone()
    }

    /// Watches the broker's end `link` of session `id`.
    pub fn watch(&mut self, id: u64, link: OwnedFd) -> std::io::Result<()> {
        epoll::add(
            &*self.epoll,
            &link,
            EventData::new_u64(id),
            EventFlags::IN | EventFlags::RDHUP,
        )?;
        self.links.insert(id, link);
        Ok(())
    }

    /// Stops watching session `id` and closes the broker's end, which the
    /// provider sees. Returns whether it was watched.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(link) = self.links.remove(&id) else {
            return false;
        };
        if let Err(e) = epoll::delete(&*self.epoll, &link) {
            log::warn!("epoll_ctl(DEL) of the link of session {id} failed: {e}");
        }
        true
    }

    /// The sessions whose provider closed (or wrote to) its link, with the
    /// reason; does not wait. Each stays watched until [`Links::remove`].
    pub fn take_ended(&mut self) -> Vec<(u64, &'static str)> {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(EVENT_BATCH);
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        if let Err(e) = epoll::wait(
            &*self.epoll,
            rustix::buffer::spare_capacity(&mut events),
            Some(&zero),
        ) {
            if e != rustix::io::Errno::INTR {
                log::error!("epoll_wait on the provider links failed: {e}");
            }
            return Vec::new();
        }
        events
            .iter()
            .filter_map(|ev| {
                let id = ev.data.u64();
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
