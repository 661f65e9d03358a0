use crate::service::prop;
use crate::{Caller, Options, Outbox, Service, ServiceError, SessionHandler, SessionWaker};
use dbus::arg::PropMap;
use shmlink_interfaces::{option, service};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Undelivered messages a member may have before new ones are dropped for it.
const INBOX_MESSAGES: usize = 1024;
/// Undelivered bytes a member may have before new ones are dropped for it.
const INBOX_BYTES: usize = 16 << 20;
/// Longest channel name accepted.
const MAX_NAME: usize = 255;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Members' inboxes by channel name, then by member id.
type Groups = Arc<Mutex<HashMap<String, HashMap<u64, Arc<Inbox>>>>>;

/// Named channels that fan out between clients: every message one member
/// sends reaches every other member of the same channel.
///
/// A slow member never slows the others: its inbox is bounded and what does
/// not fit is dropped for that member alone (and counted).
#[derive(Default)]
pub struct Channel {
    groups: Groups,
    next_member: AtomicU64,
}

#[derive(Default)]
struct Inbox {
    queue: Mutex<(VecDeque<Arc<[u8]>>, usize)>,
    waker: OnceLock<SessionWaker>,
    dropped: AtomicU64,
}

impl Inbox {
    fn push(&self, msg: &Arc<[u8]>) -> bool {
        let mut q = lock(&self.queue);
        if q.0.len() >= INBOX_MESSAGES || q.1 + msg.len() > INBOX_BYTES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        q.1 += msg.len();
        q.0.push_back(msg.clone());
        true
    }

    fn pop(&self) -> Option<Arc<[u8]>> {
        let mut q = lock(&self.queue);
        let m = q.0.pop_front()?;
        q.1 -= m.len();
        Some(m)
    }

    fn is_empty(&self) -> bool {
        lock(&self.queue).0.is_empty()
    }
}

impl Service for Channel {
    fn name(&self) -> &str {
        service::CHANNEL
    }

    fn open(
        &self,
        _caller: &Caller,
        options: &Options,
    ) -> Result<Box<dyn SessionHandler>, ServiceError> {
        let name = options.string(option::CHANNEL)?.ok_or_else(|| {
            ServiceError::InvalidOption(format!("option {:?} (s) is required", option::CHANNEL))
        })?;
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(ServiceError::InvalidOption(format!(
                "option {:?} must be 1 to {MAX_NAME} bytes long",
                option::CHANNEL
            )));
        }
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        let inbox = Arc::new(Inbox::default());
        lock(&self.groups)
            .entry(name.clone())
            .or_default()
            .insert(id, inbox.clone());
        log::debug!("channel {name:?}: member {id} joined");
        Ok(Box::new(Member {
            groups: self.groups.clone(),
            name,
            id,
            inbox,
            published: 0,
            delivered: 0,
            left: false,
        }))
    }
}

struct Member {
    groups: Groups,
    name: String,
    id: u64,
    inbox: Arc<Inbox>,
    published: u64,
    delivered: u64,
    left: bool,
}

impl Member {
    fn leave(&mut self) {
        if self.left {
            return;
        }
        self.left = true;
        let mut groups = lock(&self.groups);
        if let Some(g) = groups.get_mut(&self.name) {
            g.remove(&self.id);
            if g.is_empty() {
                groups.remove(&self.name);
            }
        }
    }
}

impl SessionHandler for Member {
    fn on_message(&mut self, msg: Vec<u8>, _out: &mut Outbox) -> Result<(), ServiceError> {
        let msg: Arc<[u8]> = msg.into();
        // Collect the receivers first so that no inbox lock is taken under the group lock.
        let others: Vec<Arc<Inbox>> = lock(&self.groups)
            .get(&self.name)
            .map(|g| {
                g.iter()
                    .filter(|(id, _)| **id != self.id)
                    .map(|(_, i)| i.clone())
                    .collect()
            })
            .unwrap_or_default();
        for inbox in others {
            if inbox.push(&msg) {
                if let Some(w) = inbox.waker.get() {
                    w.wake();
                }
            }
        }
        self.published += 1;
        Ok(())
    }

    fn on_end(&mut self, out: &mut Outbox) -> Result<(), ServiceError> {
        self.leave();
        out.finish();
        Ok(())
    }

    fn wants_to_produce(&self) -> bool {
        !self.left && !self.inbox.is_empty()
    }

    fn produce(&mut self, out: &mut Outbox) -> Result<(), ServiceError> {
        if let Some(m) = self.inbox.pop() {
            self.delivered += 1;
            out.send(m.to_vec())?;
        }
        Ok(())
    }

    fn attach(&mut self, waker: SessionWaker) {
        let _ = self.inbox.waker.set(waker);
    }

    fn state(&self) -> PropMap {
        let members = lock(&self.groups)
            .get(&self.name)
            .map_or(0, |g| g.len() as u32);
        let mut m = PropMap::new();
        m.insert("channel".into(), prop(self.name.clone()));
        m.insert("members".into(), prop(members));
        m.insert("published".into(), prop(self.published));
        m.insert("delivered".into(), prop(self.delivered));
        m.insert(
            "dropped".into(),
            prop(self.inbox.dropped.load(Ordering::Relaxed)),
        );
        m
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.leave();
    }
}
