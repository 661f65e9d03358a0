//! The D-Bus adapter: the `org.shmlink.Broker1` and `org.shmlink.Session1`
//! interfaces ([`broker1`], [`session1`]), the callers' credentials
//! ([`peers`]), and the glue that routes incoming messages to them.
//!
//! Everything here runs on the D-Bus thread. The crossroads callbacks share
//! one [`Control`] (the session lifecycle and the credentials cache); no
//! worker ever takes its lock.
//!
//! Try it against a running daemon:
//! ```text
//! busctl --user call org.shmlink.Broker1 /org/shmlink/Broker1 org.shmlink.Broker1 \
//!     OpenSession sa{sv} echo 1 capacity t 65536
//! ```

mod broker1;
mod peers;
pub(crate) mod provider1;
mod session1;

pub(crate) use peers::name_owner_changed;

use crate::broker::BrokerError;
use crate::lock;
use crate::logcap::{cut, Refusals, LOGGED_ERROR, LOGGED_STRING};
use crate::sessions::{EndedSession, SessionRecord, Sessions};
use dbus::blocking::Connection;
use dbus::channel::Sender;
use dbus::message::MessageType;
use dbus::Message;
use dbus_crossroads::{Crossroads, MethodErr};
use peers::Peers;
use shmlink_interfaces::{error, member, BROKER_INTERFACE};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the crossroads callbacks share.
pub(crate) struct Control {
    sessions: Sessions,
    peers: Peers,
    refusals: Refusals,
}

impl Control {
    /// Logs a refused call of `uid` (as a warning), within the per-uid rate
    /// limit; `line` is only formatted when it is written.
    fn log_refusal(&mut self, uid: u32, line: impl FnOnce() -> String) {
        if self.refusals.admit(uid, Instant::now()) {
            log::warn!("{}", line());
        }
    }
}

type Shared = Arc<Mutex<Control>>;

/// The D-Bus error for a refusal.
fn method_err(e: &BrokerError) -> MethodErr {
    let name = match e {
        BrokerError::UnknownService(_) => error::UNKNOWN_SERVICE,
        BrokerError::InvalidOption(_) => error::INVALID_OPTION,
        BrokerError::InvalidCapacity(_) => error::INVALID_CAPACITY,
        BrokerError::LimitExceeded(_) => error::LIMIT_EXCEEDED,
        BrokerError::AccessDenied(_) => error::ACCESS_DENIED,
        BrokerError::UnknownSession(_) => error::UNKNOWN_SESSION,
        BrokerError::Internal(_) => error::INTERNAL,
    };
    // The text may quote what the caller sent (a service name, an option);
    // the caller gets the cut version too, so a huge call costs no huge reply.
    MethodErr::from((name, cut(&e.to_string(), LOGGED_ERROR).into_owned()))
}

/// Removes an ended session's object and returns its `SessionClosed` signal.
/// Every end goes through here once (see [`Sessions::end_session`]).
fn retire(cr: &mut Crossroads, ended: &EndedSession, reason: &str) -> Message {
    cr.remove::<SessionRecord>(&ended.path);
    Message::signal(
        &ended.broker_path,
        &BROKER_INTERFACE.into(),
        &member::SESSION_CLOSED.into(),
    )
    .append2(ended.path.clone(), reason)
}

/// The registered interfaces and the state behind them.
pub(crate) struct Adapter {
    cr: Crossroads,
    shared: Shared,
    notify: Arc<OwnedFd>,
    /// Credentials asked of the bus: the serial of our call, and whose.
    lookups: HashMap<u32, String>,
    /// Calls waiting for their sender's credentials, in arrival order.
    waiting: HashMap<String, Vec<Message>>,
    /// Length of the longest hosted service's name.
    longest_service: usize,
    /// The broker object's path.
    path: String,
    /// The session objects' common prefix.
    session_prefix: String,
}

impl Adapter {
    /// Registers the interfaces over `sessions` and publishes the broker object.
    pub fn new(sessions: Sessions) -> Self {
        let notify = sessions.notify_fd();
        let names = sessions.broker().names().clone();
        let longest_service = sessions
            .service_names()
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        let shared: Shared = Arc::new(Mutex::new(Control {
            sessions,
            peers: Peers::default(),
            refusals: Refusals::default(),
        }));
        let mut cr = Crossroads::new();
        let session_token = session1::register(&mut cr, shared.clone());
        let broker_token = broker1::register(&mut cr, shared.clone(), session_token);
        cr.insert(names.path().to_owned(), &[broker_token], ());
        // An empty parent node, so `busctl tree` and introspection list the sessions.
        let session_prefix = names.session_prefix();
        cr.insert(session_prefix.trim_end_matches('/').to_owned(), &[], ());
        Adapter {
            cr,
            shared,
            notify,
            lookups: HashMap::new(),
            waiting: HashMap::new(),
            longest_service,
            path: names.path().to_owned(),
            session_prefix,
        }
    }

    /// The eventfd that becomes readable when [`Adapter::reap`] has work.
    pub fn notify_fd(&self) -> Arc<OwnedFd> {
        self.notify.clone()
    }

    /// Number of engine worker threads.
    pub fn worker_count(&self) -> usize {
        lock(&self.shared).sessions.worker_count()
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.shared).sessions.broker().count()
    }

    /// Handles one incoming message: method calls (once the caller's
    /// credentials are known), the bus's answers to our credential
    /// lookups, and connections leaving the bus. Never waits for the bus or
    /// a worker.
    pub fn handle(&mut self, conn: &Connection, msg: Message) {
        match msg.msg_type() {
            MessageType::MethodCall => self.method_call(conn, msg),
            MessageType::MethodReturn | MessageType::Error => {
                let lookup = msg.get_reply_serial().and_then(|s| self.lookups.remove(&s));
                if let Some(sender) = lookup {
                    self.credentials_arrived(conn, &sender, &msg);
                }
            }
            MessageType::Signal => {
                if let Some(name) = peers::connection_left(&msg) {
                    let ended = {
                        let mut c = lock(&self.shared);
                        c.peers.forget(&name);
                        c.sessions.end_sessions_of(&name, "owner left the bus")
                    };
                    for e in ended {
                        let _ = conn.send(retire(&mut self.cr, &e, "owner left the bus"));
                    }
                }
            }
        }
    }

    /// A method call: dispatched now if its sender's credentials are known,
    /// else queued behind a lookup (one per sender in flight).
    fn method_call(&mut self, conn: &Connection, msg: Message) {
        let Some(sender) = msg.sender().map(|s| s.to_string()) else {
            return self.dispatch(conn, msg);
        };
        if lock(&self.shared).peers.knows(&sender) {
            return self.dispatch(conn, msg);
        }
        if let Some(queue) = self.waiting.get_mut(&sender) {
            // Not bounded here: these calls are already in our memory, and
            // the bus bounds how much it queues for us.
            queue.push(msg);
            return;
        }
        match peers::ask(conn, &sender) {
            Ok(serial) => {
                self.lookups.insert(serial, sender.clone());
                self.waiting.insert(sender, vec![msg]);
            }
            Err(e) => {
                log::warn!("cannot ask the bus for the credentials of {sender}: {e}");
                self.dispatch(conn, msg);
            }
        }
    }

    /// The bus answered a lookup: record the credentials and dispatch the
    /// calls that waited for them (without credentials, they are refused).
    fn credentials_arrived(&mut self, conn: &Connection, sender: &str, reply: &Message) {
        match peers::parse(sender, reply) {
            Ok(caller) => lock(&self.shared).peers.insert(caller),
            Err(e) => {
                // The connection may have left already; rate-limited like a refusal.
                lock(&self.shared).log_refusal(u32::MAX, || {
                    format!("cannot learn the credentials of {sender}: {e}")
                })
            }
        }
        for msg in self.waiting.remove(sender).unwrap_or_default() {
            self.dispatch(conn, msg);
        }
    }

    /// Hands a method call whose sender is known (or unknowable) to crossroads.
    fn dispatch(&mut self, conn: &Connection, msg: Message) {
        if let Some(sender) = msg.sender() {
            lock(&self.shared).peers.set_current(&sender);
        }
        if let Some(reply) = self
            .unknown_session_reply(&msg)
            .or_else(|| self.oversized_open_reply(&msg))
        {
            let _ = conn.send(reply);
            return;
        }
        if self.cr.handle_message(msg, conn).is_err() {
            log::warn!("crossroads could not handle a method call");
        }
    }

    /// An `OpenSession` of a service name longer than any hosted one gets
    /// `UnknownService` at once, read in place: neither the name nor the
    /// options are copied or formatted in full (a name may be megabytes).
    fn oversized_open_reply(&self, msg: &Message) -> Option<Message> {
        if msg.path().as_deref() != Some(self.path.as_str())
            || msg.interface().as_deref() != Some(BROKER_INTERFACE)
            || msg.member().as_deref() != Some(member::OPEN_SESSION)
        {
            return None;
        }
        let service: &str = msg.iter_init().get()?;
        if service.len() <= self.longest_service {
            return None;
        }
        let e = BrokerError::UnknownService(cut(service, LOGGED_STRING).into_owned());
        let mut c = lock(&self.shared);
        let sender = msg.sender().map(|s| s.to_string()).unwrap_or_default();
        let uid = c.peers.get(&sender).map_or(u32::MAX, |p| p.uid);
        c.log_refusal(uid, || {
            format!(
                "OpenSession({:?}) from {sender} (uid {uid}) refused: {e}",
                cut(service, LOGGED_STRING)
            )
        });
        let err = method_err(&e);
        let text = std::ffi::CString::new(err.description()).ok()?;
        Some(msg.error(err.errorname(), &text))
    }

    /// Calls to a session path that has no session get `UnknownSession`
    /// rather than the generic `UnknownObject`.
    fn unknown_session_reply(&self, msg: &Message) -> Option<Message> {
        let path = msg.path()?;
        let id = path.strip_prefix(self.session_prefix.as_str())?;
        let exists = id
            .parse::<u64>()
            .ok()
            .is_some_and(|id| lock(&self.shared).sessions.broker().contains(id));
        if exists
            || msg
                .interface()
                .is_some_and(|i| &*i == "org.freedesktop.DBus.Introspectable")
        {
            return None;
        }
        let text = format!("no session at {}", &*path);
        Some(msg.error(
            &error::UNKNOWN_SESSION.into(),
            &std::ffi::CString::new(text).ok()?,
        ))
    }

    /// Ends the sessions the engine ended by itself.
    pub fn reap(&mut self, conn: &Connection) {
        let ended = lock(&self.shared).sessions.reap();
        for (e, reason) in ended {
            let _ = conn.send(retire(&mut self.cr, &e, &reason));
        }
    }

    /// Ends every session and stops the engine.
    pub fn shutdown(&mut self, conn: &Connection) {
        const REASON: &str = "the daemon is shutting down";
        let ended = {
            let mut c = lock(&self.shared);
            c.refusals.flush();
            c.sessions.shutdown(REASON)
        };
        for e in ended {
            let _ = conn.send(retire(&mut self.cr, &e, REASON));
        }
    }
}
