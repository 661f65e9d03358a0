//! The D-Bus adapter: the `org.shmlink.Broker1` and `org.shmlink.Session1`
//! interfaces ([`broker1`], [`session1`]), the callers' credentials
//! ([`peers`]), the sessions of provided services ([`provided`]: the
//! `AcceptSession` calls and the opens waiting for them), and the glue that
//! routes incoming messages to them.
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
mod provided;
pub(crate) mod provider1;
mod session1;

pub(crate) use peers::name_owner_changed;

use crate::broker::BrokerError;
use crate::lock;
use crate::logcap::{cut, Refusals, LOGGED_ERROR, LOGGED_STRING};
use crate::service::prop;
use crate::sessions::{EndedSession, SessionRecord, Sessions};
use dbus::arg::PropMap;
use dbus::blocking::stdintf::org_freedesktop_dbus::PropertiesPropertiesChanged;
use dbus::blocking::Connection;
use dbus::channel::Sender;
use dbus::message::{MessageType, SignalArgs};
use dbus::Message;
use dbus_crossroads::{Crossroads, IfaceToken, MethodErr};
use peers::Peers;
use provided::{Pending, Verdict};
use shmlink_endpoint::sys::Selector;
use shmlink_interfaces::{
    error, limits, member, OpenSessionArgs, OpenSessionReply, BROKER_INTERFACE,
};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

    /// The `PropertiesChanged` signal announcing the current `Services`.
    fn services_changed(&self) -> Message {
        services_changed(
            self.sessions.broker().names().path(),
            self.sessions.service_names(),
        )
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
        BrokerError::NameTaken(_) => error::NAME_TAKEN,
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

/// `PropertiesChanged` for the `Services` property of the broker object at
/// `path`, now `names`.
fn services_changed(path: &str, names: Vec<String>) -> Message {
    let mut changed = PropMap::new();
    changed.insert(member::SERVICES.into(), prop(names));
    PropertiesPropertiesChanged {
        interface_name: BROKER_INTERFACE.into(),
        changed_properties: changed,
        invalidated_properties: Vec::new(),
    }
    .to_emit_message(&path.to_owned().into())
}

/// The error reply to `call` for `err`.
fn error_reply(call: &Message, err: &MethodErr) -> Option<Message> {
    let text = std::ffi::CString::new(err.description()).ok()?;
    Some(call.error(err.errorname(), &text))
}

/// Whether `msg` calls the method `name` of the broker object at `path`
/// (the interface may be left out of a call, as D-Bus allows).
fn is_broker_call(msg: &Message, path: &str, name: &str) -> bool {
    msg.path().as_deref() == Some(path)
        && msg.interface().map_or(true, |i| &*i == BROKER_INTERFACE)
        && msg.member().as_deref() == Some(name)
}

/// The registered interfaces and the state behind them.
pub(crate) struct Adapter {
    cr: Crossroads,
    shared: Shared,
    notify: Arc<OwnedFd>,
    links: Arc<Selector>,
    session_token: IfaceToken<SessionRecord>,
    /// Credentials asked of the bus: the serial of our call, and whose.
    lookups: HashMap<u32, String>,
    /// Calls waiting for their sender's credentials, in arrival order.
    waiting: HashMap<String, Vec<Message>>,
    /// `OpenSession` calls of provided services, by the serial of the
    /// `AcceptSession` call made for each. Bounded by the session limits:
    /// each holds a reservation.
    pending: HashMap<u32, Pending>,
    /// How long a provider has to answer.
    accept_timeout: Duration,
    /// Longest service name an `OpenSession` may name: the longest
    /// built-in one or the longest a provider may register.
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
        let links = sessions.links_fd();
        let accept_timeout = Duration::from_millis(sessions.broker().providers().accept_timeout_ms);
        let longest_service = sessions
            .builtin_names()
            .map(str::len)
            .max()
            .unwrap_or(0)
            .max(limits::MAX_SERVICE_NAME);
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
            links,
            session_token,
            lookups: HashMap::new(),
            waiting: HashMap::new(),
            pending: HashMap::new(),
            accept_timeout,
            longest_service,
            path: names.path().to_owned(),
            session_prefix,
        }
    }

    /// The epoll fd of the provider links: readable when
    /// [`Adapter::reap_links`] has work.
    pub fn links_fd(&self) -> Arc<Selector> {
        self.links.clone()
    }

    /// When the first provider's time to answer is up, if any is asked.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Fails the opens whose provider did not answer by `now`.
    pub fn expire(&mut self, conn: &Connection, now: Instant) {
        let overdue: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(serial, _)| *serial)
            .collect();
        for serial in overdue {
            if let Some(p) = self.pending.remove(&serial) {
                let why = format!(
                    "provider {} did not answer within {} ms",
                    p.provider,
                    self.accept_timeout.as_millis()
                );
                self.conclude(conn, p, Verdict::Unavailable(why));
            }
        }
    }

    /// An `OpenSession` of a registered service: reserves the session,
    /// asks its provider, and leaves the call pending. Gives the message back
    /// if it is not one.
    fn open_provided(&mut self, conn: &Connection, msg: Message) -> Option<Message> {
        if !is_broker_call(&msg, &self.path, member::OPEN_SESSION) {
            return Some(msg);
        }
        let Ok((service, options)) = msg.read2::<&str, PropMap>() else {
            return Some(msg);
        };
        let mut c = lock(&self.shared);
        if c.sessions.broker().registration(service).is_none() {
            drop(c);
            return Some(msg);
        }
        let caller = match c.peers.caller_of(&msg) {
            Ok(caller) => caller,
            Err(e) => {
                drop(c);
                if let Some(reply) = error_reply(&msg, &e) {
                    let _ = conn.send(reply);
                }
                return None;
            }
        };
        let mut open = match c.sessions.open_provided(&caller, service, options) {
            Ok(open) => open,
            Err(e) => {
                c.log_refusal(caller.uid, || {
                    format!(
                        "OpenSession({service:?}) from {} (uid {}) refused: {}",
                        caller.bus_name,
                        caller.uid,
                        cut(&e.to_string(), LOGGED_ERROR)
                    )
                });
                drop(c);
                if let Some(reply) = error_reply(&msg, &method_err(&e)) {
                    let _ = conn.send(reply);
                }
                return None;
            }
        };
        let id = open.record.id;
        let sent = provided::accept_call(&mut open).and_then(|call| {
            conn.channel()
                .send(call)
                .map_err(|()| "cannot queue the AcceptSession call".to_owned())
        });
        let serial = match sent {
            Ok(serial) => serial,
            Err(why) => {
                c.sessions.abandon_provided(id, &why);
                drop(c);
                let e = BrokerError::Internal(format!("could not ask the provider: {why}"));
                if let Some(reply) = error_reply(&msg, &method_err(&e)) {
                    let _ = conn.send(reply);
                }
                return None;
            }
        };
        drop(c);
        // What the provider got is in the message now; the broker keeps its
        // end of the link (in the books) and the client's fds.
        self.pending.insert(
            serial,
            Pending {
                call: msg,
                record: open.record,
                client: open.client,
                params: open.params,
                provider: open.registration.provider.bus_name,
                deadline: Instant::now() + self.accept_timeout,
            },
        );
        None
    }

    /// An answer to one of our `AcceptSession` calls (or a stray message
    /// claiming to be one, which is dropped).
    fn answer_arrived(&mut self, conn: &Connection, serial: u32, msg: &mut Message) {
        let Some(p) = self.pending.get(&serial) else {
            return;
        };
        if !provided::counts(msg, &p.provider) {
            log::debug!(
                "dropped an answer to AcceptSession from {:?}, not from provider {}",
                msg.sender().as_deref().unwrap_or(""),
                p.provider
            );
            return;
        }
        if let Some(p) = self.pending.remove(&serial) {
            let verdict = provided::judge(msg, &p.provider);
            self.conclude(conn, p, verdict);
        }
    }

    /// Answers a pending `OpenSession` as the provider decided: opens the
    /// session (its object, the reply with the client's fds), or releases
    /// everything and relays the refusal.
    fn conclude(&mut self, conn: &Connection, p: Pending, verdict: Verdict) {
        let id = p.record.id;
        let (name, text) = match verdict {
            Verdict::Accepted => {
                let accepted = lock(&self.shared).sessions.accept_provided(id);
                match accepted {
                    Ok(()) => {
                        let path = p.record.path.clone();
                        self.cr
                            .insert(path.clone(), &[self.session_token], p.record);
                        let reply = OpenSessionReply {
                            session: path,
                            fds: p.client,
                            parameters: p.params,
                        };
                        let mut answer = p.call.method_return();
                        answer.append_all(OpenSessionArgs::from(reply));
                        let _ = conn.send(answer);
                        return;
                    }
                    Err(e) => {
                        let e = method_err(&e);
                        (e.errorname().to_string(), e.description().to_owned())
                    }
                }
            }
            Verdict::Refused(name, text) => (name.to_owned(), text),
            Verdict::Unavailable(text) => (error::PROVIDER_UNAVAILABLE.to_owned(), text),
        };
        {
            let mut c = lock(&self.shared);
            c.sessions.abandon_provided(id, &format!("{name}: {text}"));
            let owner = &p.record.owner;
            c.log_refusal(owner.uid, || {
                format!(
                    "OpenSession({:?}) from {} (uid {}) refused: {name}: {text}",
                    p.record.service, owner.bus_name, owner.uid
                )
            });
        }
        let text = std::ffi::CString::new(text.replace('\0', " ")).unwrap_or_default();
        if let Ok(name) = dbus::strings::ErrorName::new(name) {
            let _ = conn.send(p.call.error(&name, &text));
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
        lock(&self.shared).sessions.open_count()
    }

    /// Work for when no message is waiting: the next session's rings are
    /// made ahead (see [`Sessions::make_rings_ahead`](crate::sessions::Sessions::make_rings_ahead)).
    pub fn idle(&mut self) {
        lock(&self.shared).sessions.make_rings_ahead();
    }

    /// Handles one incoming message: method calls (once the caller's
    /// credentials are known), the bus's answers to our credential
    /// lookups, and connections leaving the bus. Never waits for the bus or
    /// a worker. What is left of opening sessions once the replies are out
    /// (waking their workers, logging) comes last.
    pub fn handle(&mut self, conn: &Connection, msg: Message) {
        self.handle_message(conn, msg);
        lock(&self.shared).sessions.after_reply();
    }

    fn handle_message(&mut self, conn: &Connection, mut msg: Message) {
        match msg.msg_type() {
            MessageType::MethodCall => self.method_call(conn, msg),
            MessageType::MethodReturn | MessageType::Error => {
                let Some(serial) = msg.get_reply_serial() else {
                    return;
                };
                if let Some(sender) = self.lookups.remove(&serial) {
                    self.credentials_arrived(conn, &sender, &msg);
                } else {
                    self.answer_arrived(conn, serial, &mut msg);
                }
            }
            MessageType::Signal => {
                if let Some(name) = peers::connection_left(&msg) {
                    self.connection_left(conn, &name);
                }
            }
        }
    }

    /// A connection left the bus: the opens it waited for are dropped, the
    /// opens waiting for it as a provider fail at once, its registrations
    /// end and the sessions it owns end.
    fn connection_left(&mut self, conn: &Connection, name: &str) {
        let involved: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.provider == name || p.record.owner.bus_name == name)
            .map(|(serial, _)| *serial)
            .collect();
        for serial in involved {
            let Some(p) = self.pending.remove(&serial) else {
                continue;
            };
            if p.provider == name {
                let why = format!("provider {name} left the bus");
                self.conclude(conn, p, Verdict::Unavailable(why));
            } else {
                lock(&self.shared)
                    .sessions
                    .abandon_provided(p.record.id, "the client left the bus");
            }
        }
        let (ended, withdrawn, names) = {
            let mut c = lock(&self.shared);
            c.peers.forget(name);
            let withdrawn = c.sessions.broker_mut().unregister_all(name);
            let ended = c.sessions.end_sessions_of(name, "owner left the bus");
            (ended, withdrawn, c.sessions.service_names())
        };
        for e in ended {
            let _ = conn.send(retire(&mut self.cr, &e, "owner left the bus"));
        }
        if !withdrawn.is_empty() {
            log::info!(
                "provider {name} left the bus; services withdrawn: {}",
                withdrawn.join(", ")
            );
            let _ = conn.send(services_changed(&self.path, names));
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
            .or_else(|| self.oversized_name_reply(&msg))
        {
            let _ = conn.send(reply);
            return;
        }
        let Some(msg) = self.open_provided(conn, msg) else {
            return;
        };
        if self.cr.handle_message(msg, conn).is_err() {
            log::warn!("crossroads could not handle a method call");
        }
    }

    /// An `OpenSession` or `UnregisterService` of a service name longer
    /// than any service can have gets `UnknownService` at once, and such a
    /// `RegisterService` gets `InvalidOption`, read in place: neither the
    /// name nor the options are copied or formatted in full (a name may be
    /// megabytes).
    fn oversized_name_reply(&self, msg: &Message) -> Option<Message> {
        let (call, longest) = [
            (member::OPEN_SESSION, self.longest_service),
            (member::REGISTER_SERVICE, limits::MAX_SERVICE_NAME),
            (member::UNREGISTER_SERVICE, limits::MAX_SERVICE_NAME),
        ]
        .into_iter()
        .find(|(name, _)| is_broker_call(msg, &self.path, name))?;
        let service: &str = msg.iter_init().get()?;
        if service.len() <= longest {
            return None;
        }
        let shown = cut(service, LOGGED_STRING).into_owned();
        let e = if call == member::REGISTER_SERVICE {
            BrokerError::InvalidOption(format!(
                "service name {shown:?} is longer than {} bytes",
                limits::MAX_SERVICE_NAME
            ))
        } else {
            BrokerError::UnknownService(shown)
        };
        let mut c = lock(&self.shared);
        let sender = msg.sender().map(|s| s.to_string()).unwrap_or_default();
        let uid = c.peers.get(&sender).map_or(u32::MAX, |p| p.uid);
        c.log_refusal(uid, || {
            format!(
                "{call}({:?}) from {sender} (uid {uid}) refused: {e}",
                cut(service, LOGGED_STRING)
            )
        });
        error_reply(msg, &method_err(&e))
    }

    /// Calls to a session path that has no session get `UnknownSession`
    /// rather than the generic `UnknownObject`.
    fn unknown_session_reply(&self, msg: &Message) -> Option<Message> {
        let path = msg.path()?;
        let id = path.strip_prefix(self.session_prefix.as_str())?;
        let exists = id
            .parse::<u64>()
            .ok()
            .is_some_and(|id| lock(&self.shared).sessions.is_open(id));
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

    /// Ends the provided sessions whose provider closed its link.
    pub fn reap_links(&mut self, conn: &Connection) {
        let ended = lock(&self.shared).sessions.reap_links();
        for (e, reason) in ended {
            let _ = conn.send(retire(&mut self.cr, &e, &reason));
        }
    }

    /// Fails the pending opens, ends every session and stops the engine.
    pub fn shutdown(&mut self, conn: &Connection) {
        const REASON: &str = "the daemon is shutting down";
        let pending: Vec<u32> = self.pending.keys().copied().collect();
        for serial in pending {
            if let Some(p) = self.pending.remove(&serial) {
                self.conclude(conn, p, Verdict::Unavailable(REASON.into()));
            }
        }
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
