use crate::lock;
use crate::service::{prop, StateView};
use crate::{
    Caller, Charge, Memory, Message, Options, Outbox, Service, ServiceError, SessionHandler,
    SessionWaker,
};
use dbus::arg::PropMap;
use shmlink_interfaces::{option, service};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Undelivered messages a member may have before new ones are dropped for it.
const INBOX_MESSAGES: usize = 1024;
/// Undelivered bytes a member may have before new ones are dropped for it.
const INBOX_BYTES: usize = 16 << 20;
/// Longest channel name accepted.
const MAX_NAME: usize = 255;

/// Members' inboxes by channel name, then by member id.
type Groups = Arc<Mutex<HashMap<String, HashMap<u64, Arc<Inbox>>>>>;

/// Named channels that fan out between clients: every message one member
/// sends reaches every other member of the same channel.
///
/// A slow member never slows the others: its inbox is bounded and what does
/// not fit is dropped for that member alone (and counted).
///
/// A published message is one buffer shared by every inbox and outgoing
/// frame that holds it (no copy per member). Each member's owner is charged
/// for what its inbox holds, since a member that does not read is what keeps
/// it; a member whose owner is out of memory has the message dropped.
#[derive(Default)]
pub struct Channel {
    groups: Groups,
    next_member: AtomicU64,
}

/// A message in an inbox, with the charge its member's owner pays for it.
type Queued = (Arc<Vec<u8>>, Charge);

/// One member's shared record: its undelivered messages and its counters,
/// which other members (pushing) and the D-Bus side (reading) see.
#[derive(Default)]
struct Inbox {
    queue: Mutex<(VecDeque<Queued>, usize)>,
    memory: Memory,
    waker: OnceLock<SessionWaker>,
    dropped: AtomicU64,
    published: AtomicU64,
    delivered: AtomicU64,
}

impl Inbox {
    fn push(&self, msg: &Arc<Vec<u8>>) -> bool {
        let mut q = lock(&self.queue);
        let charge = if q.0.len() >= INBOX_MESSAGES || q.1 + msg.len() > INBOX_BYTES {
            None
        } else {
            self.memory.try_charge(msg.len()).ok()
        };
        let Some(charge) = charge else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        q.1 += msg.len();
        q.0.push_back((msg.clone(), charge));
        true
    }

    /// The oldest message; its inbox charge is given back as it leaves.
    fn pop(&self) -> Option<Arc<Vec<u8>>> {
        let mut q = lock(&self.queue);
        let (m, _charge) = q.0.pop_front()?;
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
        let inbox = Arc::new(Inbox {
            memory: options.memory().clone(),
            ..Inbox::default()
        });
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
            left: false,
        }))
    }
}

struct Member {
    groups: Groups,
    name: String,
    id: u64,
    inbox: Arc<Inbox>,
    left: bool,
}

/// A member's `ServiceState`, read live from the channel's shared tables.
struct MemberView {
    groups: Groups,
    name: String,
    inbox: Arc<Inbox>,
}

impl StateView for MemberView {
    fn state(&self) -> PropMap {
        let members = lock(&self.groups)
            .get(&self.name)
            .map_or(0, |g| g.len() as u32);
        let count = |c: &AtomicU64| prop(c.load(Ordering::Relaxed));
        let mut m = PropMap::new();
        m.insert("channel".into(), prop(self.name.clone()));
        m.insert("members".into(), prop(members));
        m.insert("published".into(), count(&self.inbox.published));
        m.insert("delivered".into(), count(&self.inbox.delivered));
        m.insert("dropped".into(), count(&self.inbox.dropped));
        m
    }
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
    fn on_message(&mut self, msg: Message<'_>, _out: &mut Outbox) -> Result<(), ServiceError> {
        let msg = Arc::new(msg.into_vec());
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
        self.inbox.published.fetch_add(1, Ordering::Relaxed);
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
            self.inbox.delivered.fetch_add(1, Ordering::Relaxed);
            out.send_shared(m)?;
        }
        Ok(())
    }

    fn attach(&mut self, waker: SessionWaker) {
        let _ = self.inbox.waker.set(waker);
    }

    fn state_view(&self) -> Option<Arc<dyn StateView>> {
        Some(Arc::new(MemberView {
            groups: self.groups.clone(),
            name: self.name.clone(),
            inbox: self.inbox.clone(),
        }))
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::tests::{caller, get_u64, options};
    use crate::service::prop;
    use std::sync::atomic::AtomicUsize;

    fn join(ch: &Channel, name: &str) -> Box<dyn SessionHandler> {
        ch.open(
            &caller(),
            &options(&[(option::CHANNEL, prop(name.to_owned()))]),
        )
        .expect("join")
    }

    #[test]
    fn fans_out_to_the_others_and_wakes_them() {
        let ch = Channel::default();
        let mut a = join(&ch, "room");
        let mut b = join(&ch, "room");
        let mut elsewhere = join(&ch, "other");
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        b.attach(SessionWaker::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        }));
        let mut out = Outbox::new(1 << 20);
        a.on_message(Message::new(&mut b"hi".to_vec()), &mut out)
            .expect("publish");
        assert_eq!(woken.load(Ordering::Relaxed), 1, "b is woken");
        assert!(!a.wants_to_produce(), "the sender does not hear itself");
        assert!(
            !elsewhere.wants_to_produce(),
            "another channel hears nothing"
        );
        assert!(b.wants_to_produce());
        b.produce(&mut out).expect("deliver");
        assert_eq!(
            out.pop()
                .map(crate::service::Outgoing::into_payload)
                .as_deref(),
            Some(&b"hi"[..])
        );
        let a_state = a.state_view().expect("view").state();
        assert_eq!(get_u64(&a_state, "members"), Some(2));
        assert_eq!(get_u64(&a_state, "published"), Some(1));
        let b_view = b.state_view().expect("view");
        assert_eq!(get_u64(&b_view.state(), "delivered"), Some(1));
        drop(a);
        assert_eq!(
            get_u64(&b_view.state(), "members"),
            Some(1),
            "a dropped member leaves the channel"
        );
        elsewhere.on_end(&mut out).expect("end");
        assert!(out.finished());
    }

    #[test]
    fn a_full_inbox_drops_for_that_member_only() {
        let ch = Channel::default();
        let mut a = join(&ch, "room");
        let b = join(&ch, "room");
        let mut out = Outbox::new(1 << 20);
        for _ in 0..INBOX_MESSAGES + 3 {
            a.on_message(Message::new(&mut vec![1]), &mut out)
                .expect("publish");
        }
        let st = b.state_view().expect("view").state();
        assert_eq!(get_u64(&st, "dropped"), Some(3));
        assert_eq!(get_u64(&st, "delivered"), Some(0));
    }

    #[test]
    fn inboxes_share_one_buffer_charged_to_each_member_that_holds_it() {
        let mut config = crate::config::Config::default();
        config.limits.memory_per_user = 250;
        let mut books = crate::accounting::Accounting::new(config);
        let ch = Channel::default();
        let join_as = |uid: u32, books: &mut crate::accounting::Accounting| {
            let opts = options(&[(option::CHANNEL, prop("room".to_owned()))])
                .with_memory(Memory::new(books.budget_of(uid)));
            ch.open(&caller(), &opts).expect("join")
        };
        let mut publisher = join_as(1, &mut books);
        let mut reader = join_as(2, &mut books);
        let slow = join_as(3, &mut books);
        let mut out = Outbox::new(1 << 20);
        for _ in 0..3 {
            publisher
                .on_message(Message::new(&mut vec![9; 100]), &mut out)
                .expect("publish");
        }
        assert_eq!(books.memory_of(1), 0, "the publisher holds nothing");
        assert_eq!(books.memory_of(3), 200, "two fit in uid 3's budget");
        let st = slow.state_view().expect("view").state();
        assert_eq!(
            get_u64(&st, "dropped"),
            Some(1),
            "the third is dropped for it"
        );
        // Delivery shares the buffer: the outbox is charged, the inbox given back.
        let mut reader_out = Outbox::with_memory(1 << 20, Memory::new(books.budget_of(2)));
        reader.produce(&mut reader_out).expect("deliver");
        assert_eq!(books.memory_of(2), 200);
        drop(reader_out);
        assert_eq!(books.memory_of(2), 100);
        drop(slow);
        assert_eq!(
            books.memory_of(3),
            0,
            "a member that leaves gives its inbox back"
        );
    }

    #[test]
    fn the_channel_name_is_required_and_bounded() {
        let ch = Channel::default();
        for opts in [
            options(&[]),
            options(&[(option::CHANNEL, prop(String::new()))]),
            options(&[(option::CHANNEL, prop("x".repeat(MAX_NAME + 1)))]),
        ] {
            assert!(matches!(
                ch.open(&caller(), &opts),
                Err(ServiceError::InvalidOption(_))
            ));
        }
    }
}
