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
mod session1;

pub(crate) use peers::name_owner_changed;

use crate::broker::BrokerError;
use crate::sessions::{EndedSession, SessionRecord, Sessions};
use dbus::blocking::Connection;
use dbus::channel::Sender;
use dbus::message::MessageType;
use dbus::Message;
use dbus_crossroads::{Crossroads, MethodErr};
use peers::Peers;
use shmlink_interfaces::{error, member, BROKER_INTERFACE, BROKER_PATH, SESSION_PATH_PREFIX};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

/// What the crossroads callbacks share.
pub(crate) struct Control {
    sessions: Sessions,
    peers: Peers,
}

type Shared = Arc<Mutex<Control>>;

fn lock(s: &Shared) -> MutexGuard<'_, Control> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

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
    MethodErr::from((name, e.to_string()))
}

/// Removes an ended session's object and returns its `SessionClosed` signal.
/// Every end goes through here once (see [`Sessions::end_session`]).
fn retire(cr: &mut Crossroads, ended: &EndedSession, reason: &str) -> Message {
    cr.remove::<SessionRecord>(&ended.path);
    Message::signal(
        &BROKER_PATH.into(),
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
}

impl Adapter {
    /// Registers the interfaces over `sessions` and publishes the broker object.
    pub fn new(sessions: Sessions) -> Self {
        let notify = sessions.notify_fd();
        let shared: Shared = Arc::new(Mutex::new(Control {
            sessions,
            peers: Peers::default(),
        }));
        let mut cr = Crossroads::new();
        let session_token = session1::register(&mut cr, shared.clone());
        let broker_token = broker1::register(&mut cr, shared.clone(), session_token);
        cr.insert(BROKER_PATH, &[broker_token], ());
        // An empty parent node, so `busctl tree` and introspection list the sessions.
        cr.insert(SESSION_PATH_PREFIX.trim_end_matches('/'), &[], ());
        Adapter { cr, shared, notify }
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

    /// Handles one incoming message: method calls (after learning the
    /// caller's credentials) and connections leaving the bus.
    pub fn handle(&mut self, conn: &Connection, msg: Message) {
        if msg.msg_type() == MessageType::MethodCall {
            if let Some(sender) = msg.sender() {
                let known = {
                    let mut c = lock(&self.shared);
                    c.peers.set_current(&sender);
                    c.peers.knows(&sender)
                };
                if !known {
                    match peers::lookup(conn, &sender) {
                        Ok(caller) => lock(&self.shared).peers.insert(caller),
                        Err(e) => log::warn!("cannot learn the credentials of {sender}: {e}"),
                    }
                }
            }
            if let Some(reply) = self.unknown_session_reply(&msg) {
                let _ = conn.send(reply);
                return;
            }
            if self.cr.handle_message(msg, conn).is_err() {
                log::warn!("crossroads could not handle a method call");
            }
        } else if let Some(name) = peers::connection_left(&msg) {
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

    /// Calls to a session path that has no session get `UnknownSession`
    /// rather than the generic `UnknownObject`.
    fn unknown_session_reply(&self, msg: &Message) -> Option<Message> {
        let path = msg.path()?;
        let id = path.strip_prefix(SESSION_PATH_PREFIX)?;
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
        let ended = lock(&self.shared).sessions.shutdown(REASON);
        for e in ended {
            let _ = conn.send(retire(&mut self.cr, &e, REASON));
        }
    }
}
