//! The D-Bus adapter: it translates between the bus and the session table
//! and holds only D-Bus things — the objects (a session's id ↔ its path),
//! the callers' credentials ([`callers`]), the calls waiting for a provider
//! ([`handover`]), and publishing and retiring session objects.
//!
//! Everything here runs on the D-Bus thread. The broker object's data is
//! the [`BrokerObject`] (the session table, the callers, the refusal log's rate
//! limit); the `org.shmlink.Broker1` methods ([`broker1`]) receive it from
//! crossroads, and the session objects ([`session1`]) carry their
//! [`SessionInfo`].
//!
//! Try it against a running daemon:
//! ```text
//! busctl --user call org.shmlink.Broker1 /org/shmlink/Broker1 org.shmlink.Broker1 \
//!     OpenSession sa{sv} echo 1 capacity t 65536
//! ```

mod broker1;
mod callers;
mod handover;
mod parked;
mod reply_fds;
mod session1;
mod unanswered;

pub(crate) use callers::{connection_left, name_owner_changed};

use crate::accounting::Refusal;
use crate::lock;
use crate::log_bounds::{cut, Lines, LOGGED_ERROR, LOGGED_STRING};
use crate::main_loop::Served;
use crate::names::Names;
use crate::service::{prop, Caller};
use crate::sessions::{Ended, Handed, SessionInfo, Sessions};
use callers::Callers;
use dbus::arg::PropMap;
use dbus::blocking::stdintf::org_freedesktop_dbus::PropertiesPropertiesChanged;
use dbus::blocking::Connection;
use dbus::channel::Sender;
use dbus::message::{MessageType, SignalArgs};
use dbus::Message;
use dbus_crossroads::{Crossroads, IfaceToken, MethodErr};
use handover::{Pending, Queued, ReplyTo, Verdict};
use parked::{wire_size, Parked};
use reply_fds::ReplyFds;
use shmlink_endpoint::sys::Selector;
use shmlink_interfaces::{
    error, limits, member, OpenSessionArgs, OpenSessionReply, OpenSessionViaArgs,
    OpenSessionViaReply, BROKER_INTERFACE,
};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use unanswered::Unanswered;

/// The broker object's data: what every call needs.
pub(crate) struct BrokerObject {
    sessions: Sessions,
    /// Shared with the session objects' property getters, which crossroads
    /// gives only their own object's data.
    callers: Arc<Mutex<Callers>>,
    refusals: Lines,
    names: Names,
    /// The fds in `OpenSession` replies to connections still on the bus.
    reply_fds: ReplyFds,
}

impl BrokerObject {
    /// Logs `call` from `sender` (with its uid if known) refused for `e`,
    /// as a warning within the per-uid rate limit; `subject` (what the call
    /// named, e.g. a service) is cut to size.
    fn refused(
        &mut self,
        call: &str,
        subject: &str,
        sender: &str,
        uid: Option<u32>,
        e: &dyn std::fmt::Display,
    ) {
        let uid = uid.unwrap_or(u32::MAX);
        if self.refusals.admit(uid, Instant::now()) {
            log::warn!(
                "{call}({:?}) from {sender} (uid {uid}) refused: {}",
                cut(subject, LOGGED_STRING),
                cut(&e.to_string(), LOGGED_ERROR)
            );
        }
    }

    /// The uid of the connection `sender`, if known.
    fn uid_of(&self, sender: &str) -> Option<u32> {
        lock(&self.callers).get(sender).map(|c| c.uid)
    }

    /// The credentials of the caller of `msg`.
    fn caller_of(&self, msg: &Message) -> Result<Caller, MethodErr> {
        lock(&self.callers).caller_of(msg)
    }

    /// The D-Bus error for `e`, sessions named by their paths.
    fn method_err(&self, e: &Refusal) -> MethodErr {
        method_err(e, &self.names)
    }

    /// The `PropertiesChanged` signal announcing the current `Services`.
    fn services_changed(&self) -> Message {
        let mut changed = PropMap::new();
        changed.insert(member::SERVICES.into(), prop(self.sessions.service_names()));
        PropertiesPropertiesChanged {
            interface_name: BROKER_INTERFACE.into(),
            changed_properties: changed,
            invalidated_properties: Vec::new(),
        }
        .to_emit_message(&self.names.path().to_owned().into())
    }
}

/// The unique name of the sender of `msg` ("" if it has none).
fn sender_of(msg: &Message) -> String {
    msg.sender().map(|s| s.to_string()).unwrap_or_default()
}

/// The D-Bus error for a refusal; sessions named by their paths under `names`.
fn method_err(e: &Refusal, names: &Names) -> MethodErr {
    let text = match e {
        Refusal::UnknownSession(id) => format!("no session {}", names.session_path(*id)),
        Refusal::NotOwner { id, owner, caller } => {
            not_owner(&names.session_path(*id), owner, caller)
        }
        _ => return refusal_error(e),
    };
    MethodErr::from((error_name(e), cut(&text, LOGGED_ERROR).into_owned()))
}

/// The D-Bus error for a refusal, as its text says it.
pub(crate) fn refusal_error(e: &Refusal) -> MethodErr {
    // The text may quote what the caller sent (a service name, an option);
    // the caller gets the cut version too, so a huge call costs no huge reply.
    MethodErr::from((
        error_name(e),
        cut(&e.to_string(), LOGGED_ERROR).into_owned(),
    ))
}

/// The contract's error name for a refusal.
fn error_name(e: &Refusal) -> &'static str {
    match e {
        Refusal::UnknownService(_) => error::UNKNOWN_SERVICE,
        Refusal::InvalidOption(_) => error::INVALID_OPTION,
        Refusal::InvalidArgs(_) => error::INVALID_ARGS,
        Refusal::InvalidCapacity(_) => error::INVALID_CAPACITY,
        Refusal::LimitExceeded(_) => error::LIMIT_EXCEEDED,
        Refusal::AccessDenied(_) | Refusal::NotOwner { .. } => error::ACCESS_DENIED,
        Refusal::UnknownSession(_) => error::UNKNOWN_SESSION,
        Refusal::NameTaken(_) => error::NAME_TAKEN,
        Refusal::Internal(_) => error::INTERNAL,
    }
}

/// Why `caller` may not act on the session at `path`.
fn not_owner(path: &str, owner: &str, caller: &str) -> String {
    format!("session {path} belongs to {owner}, not to {caller}")
}

/// The error reply to `call` for `err`.
fn error_reply(call: &Message, err: &MethodErr) -> Option<Message> {
    let text = std::ffi::CString::new(err.description()).ok()?;
    Some(call.error(err.errorname(), &text))
}

/// Longest interface or property name a `Properties` call may name: the
/// D-Bus limit on names.
const LONGEST_NAME: usize = 255;

/// Calls that name what no object here can have, answered with a cut text
/// instead of crossroads' own, which would quote the whole name back: an
/// object path longer than any object's (every object here has a short
/// path), or an interface or property name longer than D-Bus allows a name
/// to be (`org.freedesktop.DBus.Properties` takes them as strings). Read in
/// place.
fn oversized_call_reply(msg: &Message) -> Option<Message> {
    let (name, text) = if let Some(path) = msg.path().filter(|p| p.len() > limits::MAX_OBJECT_PATH)
    {
        (
            "org.freedesktop.DBus.Error.UnknownObject",
            format!("Unknown object path {}", cut(&path, LOGGED_STRING)),
        )
    } else if msg.interface().as_deref() == Some("org.freedesktop.DBus.Properties") {
        let mut args = msg.iter_init();
        let interface = args.get::<&str>()?;
        let property = args.next().then(|| args.get::<&str>()).flatten();
        if interface.len() > LONGEST_NAME {
            (
                "org.freedesktop.DBus.Error.UnknownInterface",
                format!("Unknown interface {}", cut(interface, LOGGED_STRING)),
            )
        } else {
            let property = property.filter(|p| p.len() > LONGEST_NAME)?;
            (
                "org.freedesktop.DBus.Error.UnknownProperty",
                format!("Unknown property {}", cut(property, LOGGED_STRING)),
            )
        }
    } else {
        return None;
    };
    error_reply(msg, &MethodErr::from((name, text)))
}

/// The member that opens a session: `OpenSessionVia` when the client passed
/// a socket for its rings, else `OpenSession`.
fn open_member(via: bool) -> &'static str {
    if via {
        member::OPEN_SESSION_VIA
    } else {
        member::OPEN_SESSION
    }
}

/// The member a call names, for the log ("" if none).
fn call_name(msg: &Message) -> String {
    msg.member()
        .map(|m| cut(&m, LOGGED_STRING).into_owned())
        .unwrap_or_default()
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
    /// The broker object's path, where crossroads keeps the [`BrokerObject`].
    path: dbus::Path<'static>,
    callers: Arc<Mutex<Callers>>,
    notify: Arc<OwnedFd>,
    links: Arc<Selector>,
    session_token: IfaceToken<Arc<SessionInfo>>,
    /// Credentials asked of the bus: the serial of our call, and whose.
    lookups: HashMap<u32, String>,
    /// Calls waiting for their sender's credentials.
    parked: Parked,
    /// `OpenSession` calls of provided services, by the serial of the
    /// `AcceptSession` call made for each. Bounded by the session limits:
    /// each has an entry in the table, which holds a reservation.
    pending: HashMap<u32, Pending>,
    /// The `AcceptSession` calls each provider has not answered yet.
    unanswered: Unanswered,
    /// `AcceptSession` calls waiting for their provider to answer earlier
    /// ones, in arrival order. Bounded like `pending`: each has an entry in
    /// the table, which holds a reservation.
    queued: VecDeque<Queued>,
    /// How long a provider has to answer.
    accept_timeout: Duration,
    /// Longest service name an `OpenSession` may name: the longest
    /// hosted one or the longest a provider may register.
    longest_service: usize,
    /// The session objects' common prefix.
    session_prefix: String,
}

impl Adapter {
    /// Registers the interfaces over `sessions` and publishes the broker
    /// object at `names.path()`.
    pub fn new(sessions: Sessions, names: Names) -> Self {
        let notify = sessions.notify_fd();
        let links = sessions.links_fd();
        let accept_timeout =
            Duration::from_millis(sessions.accounting().providers().accept_timeout_ms);
        let unanswered = Unanswered::new(sessions.accounting().providers().unanswered);
        let longest_service = sessions
            .hosted_names()
            .map(str::len)
            .max()
            .unwrap_or(0)
            .max(limits::MAX_SERVICE_NAME);
        let callers = Arc::new(Mutex::new(Callers::default()));
        let mut cr = Crossroads::new();
        let session_token = session1::register(&mut cr, callers.clone());
        let broker_token = broker1::register(&mut cr, session_token);
        let path: dbus::Path<'static> = names.path().to_owned().into();
        // An empty parent node, so `busctl tree` and introspection list the sessions.
        let session_prefix = names.session_prefix();
        cr.insert(session_prefix.trim_end_matches('/').to_owned(), &[], ());
        cr.insert(
            path.clone(),
            &[broker_token],
            BrokerObject {
                reply_fds: ReplyFds::new(sessions.accounting().limits().reply_fds),
                sessions,
                callers: callers.clone(),
                refusals: Lines::refusals(),
                names,
            },
        );
        Adapter {
            cr,
            path,
            callers,
            notify,
            links,
            session_token,
            lookups: HashMap::new(),
            parked: Parked::default(),
            pending: HashMap::new(),
            unanswered,
            queued: VecDeque::new(),
            accept_timeout,
            longest_service,
            session_prefix,
        }
    }

    /// The broker object's data.
    fn control(&mut self) -> &mut BrokerObject {
        self.cr
            .data_mut::<BrokerObject>(&self.path)
            .expect("the broker object is never removed")
    }

    /// Number of engine worker threads.
    pub fn worker_count(&mut self) -> usize {
        self.control().sessions.worker_count()
    }

    /// Number of open sessions.
    pub fn session_count(&mut self) -> usize {
        self.control().sessions.open_count()
    }

    /// Publishes the object of a session that just opened.
    fn publish(&mut self, info: Arc<SessionInfo>) -> dbus::Path<'static> {
        let path: dbus::Path<'static> = self.control().names.session_path(info.id).into();
        self.cr.insert(path.clone(), &[self.session_token], info);
        path
    }

    /// Removes the objects of sessions that ended and announces each end.
    fn retire(&mut self, conn: &impl Sender, ended: Vec<Ended>) {
        for e in ended.into_iter().filter(|e| e.was_open) {
            let names = &self.control().names;
            let path: dbus::Path<'static> = names.session_path(e.info.id).into();
            let signal = session_closed(&self.path, path.clone(), &e.reason);
            self.cr.remove::<Arc<SessionInfo>>(&path);
            let _ = conn.send(signal);
        }
    }

    /// Fails the opens whose provider did not answer by `now`, or that
    /// waited that long for it to answer earlier ones.
    pub fn expire(&mut self, conn: &impl Sender, now: Instant) {
        for q in self.take_queued(|p| p.deadline <= now) {
            let why = format!(
                "provider {} has not answered its earlier sessions for {} ms",
                q.pending.provider,
                self.accept_timeout.as_millis()
            );
            self.conclude(conn, q.pending, Verdict::Unavailable(why));
        }
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

    /// An `OpenSession` or `OpenSessionVia` of a registered service: admits
    /// the session, asks its provider, and leaves the call pending. Gives the
    /// message back if its arguments do not decode (crossroads answers it
    /// then).
    fn ask_provider(&mut self, conn: &impl Sender, msg: Message) -> Option<Message> {
        let via_call = msg.member().as_deref() == Some(member::OPEN_SESSION_VIA);
        let (service, options, via) = if via_call {
            let Ok((service, options, socket)) = msg.read3::<&str, PropMap, OwnedFd>() else {
                return Some(msg);
            };
            (service, options, Some(socket))
        } else {
            let Ok((service, options)) = msg.read2::<&str, PropMap>() else {
                return Some(msg);
            };
            (service, options, None)
        };
        let call = open_member(via_call);
        let c = self.control();
        let reply = |e: MethodErr| {
            if let Some(reply) = error_reply(&msg, &e) {
                let _ = conn.send(reply);
            }
        };
        let caller = match c.caller_of(&msg) {
            Ok(caller) => caller,
            Err(e) => {
                reply(e);
                return None;
            }
        };
        let asked = c
            .reply_fds
            .check(&caller, !via_call)
            .and_then(|()| c.sessions.ask_provider(&caller, service, options, via));
        let handover = match asked {
            Ok(h) => h,
            Err(e) => {
                c.refused(call, service, &caller.bus_name, Some(caller.uid), &e);
                let e = c.method_err(&e);
                reply(e);
                return None;
            }
        };
        let id = handover.info.id;
        let provider = handover.registration.provider.bus_name.clone();
        let call = match handover::accept_call(handover, &c.names) {
            Ok(call) => call,
            Err(why) => {
                c.sessions.end(id, &why);
                let e = c.method_err(&Refusal::Internal(format!(
                    "could not ask the provider: {why}"
                )));
                reply(e);
                return None;
            }
        };
        let pending = Pending {
            call: ReplyTo::of(&msg),
            id,
            provider,
            owner: caller,
            deadline: Instant::now() + self.accept_timeout,
        };
        let behind = self
            .queued
            .iter()
            .any(|q| q.pending.provider == pending.provider);
        if !behind && self.unanswered.has_room(&pending.provider) {
            self.hand_over(conn, call, pending);
        } else {
            log::debug!(
                "session {id}: waiting for provider {} to answer its earlier sessions",
                pending.provider
            );
            self.queued.push_back(Queued { call, pending });
        }
        None
    }

    /// Sends the `AcceptSession` call of `pending` and waits for the answer.
    fn hand_over(&mut self, conn: &impl Sender, call: Message, pending: Pending) {
        match conn.send(call) {
            Ok(serial) => {
                self.unanswered.sent(&pending.provider, serial);
                self.pending.insert(serial, pending);
            }
            Err(()) => {
                let why = "cannot queue the AcceptSession call".to_owned();
                self.conclude(conn, pending, Verdict::Unavailable(why));
            }
        }
    }

    /// Takes out of the queue the `AcceptSession` calls `which` picks.
    fn take_queued(&mut self, which: impl Fn(&Pending) -> bool) -> VecDeque<Queued> {
        let (taken, kept): (VecDeque<Queued>, _) = std::mem::take(&mut self.queued)
            .into_iter()
            .partition(|q| which(&q.pending));
        self.queued = kept;
        taken
    }

    /// Sends the queued `AcceptSession` calls that fit now, in order (per
    /// provider, first come first sent).
    fn hand_over_queued(&mut self, conn: &impl Sender) {
        let mut blocked: Vec<String> = Vec::new();
        let mut i = 0;
        while i < self.queued.len() {
            let provider = &self.queued[i].pending.provider;
            if !blocked.contains(provider) && self.unanswered.has_room(provider) {
                if let Some(q) = self.queued.remove(i) {
                    self.hand_over(conn, q.call, q.pending);
                }
            } else {
                blocked.push(provider.clone());
                i += 1;
            }
        }
    }

    /// An answer to one of our `AcceptSession` calls (or a stray message
    /// claiming to be one, which is dropped).
    fn answer_arrived(&mut self, conn: &impl Sender, serial: u32, msg: &mut Message) {
        // Any answer of the provider's own, late ones included, shows it
        // read that call and every one before.
        let sender = sender_of(msg);
        if self.unanswered.answered(&sender, serial) {
            self.hand_over_queued(conn);
        }
        let Some(p) = self.pending.get(&serial) else {
            return;
        };
        if !handover::counts(msg, &p.provider) {
            log::debug!(
                "dropped an answer to AcceptSession from {:?}, not from provider {}",
                msg.sender().as_deref().unwrap_or(""),
                p.provider
            );
            return;
        }
        if let Some(p) = self.pending.remove(&serial) {
            let verdict = handover::judge(msg, &p.provider);
            self.conclude(conn, p, verdict);
        }
    }

    /// Answers a pending `OpenSession` as the provider decided: opens the
    /// session (its object, the reply with the client's fds), or ends it
    /// and relays the refusal.
    fn conclude(&mut self, conn: &impl Sender, p: Pending, verdict: Verdict) {
        let (name, text) = match verdict {
            Verdict::Accepted => match self.control().sessions.accept_handed(p.id) {
                Ok((info, handed, parameters)) => {
                    let session = self.publish(info);
                    let parameters = parameters.to_dict();
                    let mut answer = p.call.method_return();
                    match handed {
                        Handed::Reply(fds) => {
                            self.control().reply_fds.charge(&p.owner);
                            answer.append_all(OpenSessionArgs::from(OpenSessionReply {
                                session,
                                fds,
                                parameters,
                            }));
                        }
                        Handed::Sent(capacities) => {
                            answer.append_all(OpenSessionViaArgs::from(OpenSessionViaReply {
                                session,
                                capacities,
                                parameters,
                            }));
                        }
                    }
                    let _ = conn.send(answer);
                    return;
                }
                Err(e) => {
                    let e = self.control().method_err(&e);
                    (e.errorname().to_string(), e.description().to_owned())
                }
            },
            Verdict::Refused(name, text) => (name.to_owned(), text),
            Verdict::Unavailable(text) => (error::PROVIDER_UNAVAILABLE.to_owned(), text),
        };
        let c = self.control();
        let refusal = format!("{name}: {text}");
        if let Some(ended) = c.sessions.end(p.id, &refusal) {
            let owner = &ended.info.owner;
            c.refused(
                member::OPEN_SESSION,
                &ended.info.service,
                &owner.bus_name,
                Some(owner.uid),
                &refusal,
            );
        }
        let text = std::ffi::CString::new(text.replace('\0', " ")).unwrap_or_default();
        if let Ok(name) = dbus::strings::ErrorName::new(name) {
            let _ = conn.send(p.call.error(&name, &text));
        }
    }

    /// Handles one incoming message: method calls (once the caller's
    /// credentials are known), the bus's answers to our credential
    /// lookups, and connections leaving the bus. Never waits for the bus or
    /// a worker. What is left of opening sessions once the replies are out
    /// (waking their workers, logging) comes last.
    pub fn handle(&mut self, conn: &impl Sender, msg: Message) {
        self.handle_message(conn, msg);
        self.control().sessions.after_reply();
    }

    fn handle_message(&mut self, conn: &impl Sender, mut msg: Message) {
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
                if let Some(name) = connection_left(&msg) {
                    self.connection_left(conn, &name);
                }
            }
        }
    }

    /// A connection left the bus: the opens waiting for it as a provider
    /// fail at once, its registrations end, and the sessions it owns end
    /// (opens it was waiting for among them, never announced).
    fn connection_left(&mut self, conn: &impl Sender, name: &str) {
        let involved: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.provider == name || p.owner.bus_name == name)
            .map(|(serial, _)| *serial)
            .collect();
        self.unanswered.left(name);
        for q in self.take_queued(|p| p.provider == name || p.owner.bus_name == name) {
            if q.pending.provider == name {
                let why = format!("provider {name} left the bus");
                self.conclude(conn, q.pending, Verdict::Unavailable(why));
            } else {
                self.control()
                    .sessions
                    .end(q.pending.id, "the client left the bus");
            }
        }
        for serial in involved {
            let Some(p) = self.pending.remove(&serial) else {
                continue;
            };
            if p.provider == name {
                let why = format!("provider {name} left the bus");
                self.conclude(conn, p, Verdict::Unavailable(why));
            } else {
                self.control().sessions.end(p.id, "the client left the bus");
            }
        }
        self.hand_over_queued(conn);
        let uid = lock(&self.callers).get(name).map_or(u32::MAX, |c| c.uid);
        lock(&self.callers).forget(name);
        let c = self.control();
        c.reply_fds.connection_left(name);
        let (ended, withdrawn) = c.sessions.connection_left(name, "owner left the bus");
        let changed = (!withdrawn.is_empty()).then(|| c.services_changed());
        let logged = changed.is_some() && c.sessions.admit_success_line(uid);
        self.retire(conn, ended);
        if let Some(signal) = changed {
            if logged {
                log::info!(
                    "provider {name} (uid {uid}) left the bus; services withdrawn: {}",
                    withdrawn.join(", ")
                );
            }
            let _ = conn.send(signal);
        }
    }

    /// A method call: answered at once if what it names is too big to be
    /// anything here (no credentials needed), dispatched if its sender's
    /// credentials are known, else kept behind a lookup (one per sender in
    /// flight) within the bounds of [`Parked`], or refused past them.
    fn method_call(&mut self, conn: &impl Sender, msg: Message) {
        if let Some(reply) = self.precheck(&msg) {
            let _ = conn.send(reply);
            return;
        }
        let Some(sender) = msg.sender().map(|s| s.to_string()) else {
            return self.dispatch(conn, msg);
        };
        if lock(&self.callers).knows(&sender) {
            return self.dispatch(conn, msg);
        }
        let first = !self.parked.has(&sender);
        let size = wire_size(&msg);
        if let Err((msg, full)) = self.parked.park(&sender, msg, size) {
            let e = Refusal::LimitExceeded(full.to_string());
            let c = self.control();
            c.refused(&call_name(&msg), "", &sender, None, &e);
            if let Some(reply) = error_reply(&msg, &c.method_err(&e)) {
                let _ = conn.send(reply);
            }
            return;
        }
        if !first {
            return;
        }
        match callers::ask(conn, &sender) {
            Ok(serial) => {
                self.lookups.insert(serial, sender);
            }
            Err(e) => {
                log::warn!("cannot ask the bus for the credentials of {sender}: {e}");
                for msg in self.parked.release(&sender) {
                    self.dispatch(conn, msg);
                }
            }
        }
    }

    /// The bus answered a lookup: record the credentials and dispatch the
    /// calls that waited for them (without credentials, they are refused).
    fn credentials_arrived(&mut self, conn: &impl Sender, sender: &str, reply: &Message) {
        match callers::parse(sender, reply) {
            Ok(caller) => lock(&self.callers).insert(caller),
            Err(e) => {
                // The connection may have left already; rate-limited like a refusal.
                let c = self.control();
                if c.refusals.admit(u32::MAX, Instant::now()) {
                    log::warn!("cannot learn the credentials of {sender}: {e}");
                }
            }
        }
        for msg in self.parked.release(sender) {
            self.dispatch(conn, msg);
        }
    }

    /// The answer to a call that names what is too big to be anything
    /// here (a path, a name, a provided service's options), read in place
    /// and given before the call is kept or handled.
    fn precheck(&mut self, msg: &Message) -> Option<Message> {
        if let Some(reply) = self.unknown_session_reply(msg) {
            return Some(reply);
        }
        if let Some(reply) = oversized_call_reply(msg) {
            return Some(reply);
        }
        // The service a broker call names, read once and in place.
        let (call, service) = [
            member::OPEN_SESSION,
            member::OPEN_SESSION_VIA,
            member::REGISTER_SERVICE,
            member::UNREGISTER_SERVICE,
        ]
        .into_iter()
        .find(|name| is_broker_call(msg, &self.path, name))
        .and_then(|call| Some((call, msg.iter_init().get::<&str>()?)))?;
        if let Some(reply) = self.oversized_name_reply(msg, call, service) {
            return Some(reply);
        }
        match call {
            member::REGISTER_SERVICE => self.oversized_object_reply(msg, service),
            member::OPEN_SESSION | member::OPEN_SESSION_VIA => {
                self.oversized_open_reply(msg, service)
            }
            _ => None,
        }
    }

    /// Hands a method call whose sender is known (or unknowable) to
    /// crossroads, or an `OpenSession` of a registered service to its
    /// provider.
    fn dispatch(&mut self, conn: &impl Sender, msg: Message) {
        if let Some(sender) = msg.sender() {
            lock(&self.callers).set_current(&sender);
        }
        let provided = (is_broker_call(&msg, &self.path, member::OPEN_SESSION)
            || is_broker_call(&msg, &self.path, member::OPEN_SESSION_VIA))
            && msg.iter_init().get::<&str>().is_some_and(|service| {
                self.control()
                    .sessions
                    .accounting()
                    .registration(service)
                    .is_some()
            });
        if provided {
            let Some(msg) = self.ask_provider(conn, msg) else {
                return;
            };
            return self.crossroads(conn, msg);
        }
        self.crossroads(conn, msg);
    }

    /// Hands a method call to crossroads.
    fn crossroads(&mut self, conn: &impl Sender, msg: Message) {
        if self.cr.handle_message(msg, conn).is_err() {
            log::warn!("crossroads could not handle a method call");
        }
    }

    /// An `OpenSession` or `UnregisterService` of a service name longer
    /// than any service can have gets `UnknownService` at once, and such a
    /// `RegisterService` gets `InvalidOption`, read in place: neither the
    /// name nor the options are copied or formatted in full (a name may be
    /// megabytes).
    fn oversized_name_reply(
        &mut self,
        msg: &Message,
        call: &str,
        service: &str,
    ) -> Option<Message> {
        let longest = if call == member::OPEN_SESSION {
            self.longest_service
        } else {
            limits::MAX_SERVICE_NAME
        };
        if service.len() <= longest {
            return None;
        }
        let shown = cut(service, LOGGED_STRING).into_owned();
        let e = if call == member::REGISTER_SERVICE {
            Refusal::InvalidOption(format!(
                "service name {shown:?} is longer than {} bytes",
                limits::MAX_SERVICE_NAME
            ))
        } else {
            Refusal::UnknownService(shown)
        };
        let sender = sender_of(msg);
        let c = self.control();
        let uid = c.uid_of(&sender);
        c.refused(call, service, &sender, uid, &e);
        error_reply(msg, &c.method_err(&e))
    }

    /// A `RegisterService` whose object path is longer than
    /// [`limits::MAX_OBJECT_PATH`] gets `InvalidOption` before crossroads
    /// decodes the call: the path is never stored, logged or echoed whole.
    fn oversized_object_reply(&mut self, msg: &Message, service: &str) -> Option<Message> {
        let mut args = msg.iter_init();
        args.next();
        if args.arg_type() != dbus::arg::ArgType::ObjectPath {
            return None;
        }
        // The dbus crate reads an object path only as a copy; it is dropped
        // here at once when too long, so a huge one costs no more than its
        // delivery did.
        let object: dbus::Path<'static> = args.get()?;
        if object.len() <= limits::MAX_OBJECT_PATH {
            return None;
        }
        let e = Refusal::InvalidOption(format!(
            "object path {:?} is longer than {} bytes",
            cut(&object, LOGGED_STRING),
            limits::MAX_OBJECT_PATH
        ));
        drop(object);
        let sender = sender_of(msg);
        let c = self.control();
        let uid = c.uid_of(&sender);
        c.refused(member::REGISTER_SERVICE, service, &sender, uid, &e);
        error_reply(msg, &c.method_err(&e))
    }

    /// An `OpenSession` bigger than [`limits::MAX_OPEN_SESSION`] gets
    /// `InvalidOption` before it is kept or decoded: no service takes
    /// options that big, and a provided service's options would travel on to
    /// its provider.
    fn oversized_open_reply(&mut self, msg: &Message, service: &str) -> Option<Message> {
        let size = wire_size(msg);
        if size <= limits::MAX_OPEN_SESSION {
            return None;
        }
        let e = Refusal::InvalidOption(format!(
            "a call of {size} bytes; OpenSession takes at most {} KiB",
            limits::MAX_OPEN_SESSION >> 10
        ));
        let sender = sender_of(msg);
        let c = self.control();
        let uid = c.uid_of(&sender);
        c.refused(member::OPEN_SESSION, service, &sender, uid, &e);
        error_reply(msg, &c.method_err(&e))
    }

    /// Calls to a session path that has no session get `UnknownSession`
    /// rather than the generic `UnknownObject`.
    fn unknown_session_reply(&mut self, msg: &Message) -> Option<Message> {
        let path = msg.path()?;
        let id = path.strip_prefix(self.session_prefix.as_str())?;
        let id = id.parse::<u64>().ok();
        let exists = id.is_some_and(|id| self.control().sessions.is_open(id));
        if exists
            || msg
                .interface()
                .is_some_and(|i| &*i == "org.freedesktop.DBus.Introspectable")
        {
            return None;
        }
        let text = format!("no session at {}", cut(&path, LOGGED_STRING));
        Some(msg.error(
            &error::UNKNOWN_SESSION.into(),
            &std::ffi::CString::new(text).ok()?,
        ))
    }

    /// Ends the sessions the engine ended by itself.
    pub fn reap(&mut self, conn: &impl Sender) {
        let ended = self.control().sessions.reap();
        self.retire(conn, ended);
    }

    /// Ends the provided sessions whose provider closed its link.
    pub fn reap_links(&mut self, conn: &impl Sender) {
        let ended = self.control().sessions.reap_links();
        self.retire(conn, ended);
    }

    /// Fails the pending opens, ends every session and stops the engine.
    pub fn shutdown(&mut self, conn: &impl Sender) {
        const REASON: &str = "the daemon is shutting down";
        let pending: Vec<u32> = self.pending.keys().copied().collect();
        for serial in pending {
            if let Some(p) = self.pending.remove(&serial) {
                self.conclude(conn, p, Verdict::Unavailable(REASON.into()));
            }
        }
        for q in self.take_queued(|_| true) {
            self.conclude(conn, q.pending, Verdict::Unavailable(REASON.into()));
        }
        let c = self.control();
        c.refusals.flush();
        let ended = c.sessions.shutdown(REASON);
        self.retire(conn, ended);
    }
}

impl Served for Adapter {
    fn handle(&mut self, conn: &Connection, msg: Message) {
        Adapter::handle(self, conn, msg);
    }

    fn watched(&mut self) -> Vec<Arc<dyn AsFd>> {
        vec![self.notify.clone(), self.links.clone()]
    }

    fn ready(&mut self, conn: &Connection, index: usize) {
        match index {
            0 => self.reap(conn),
            _ => self.reap_links(conn),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        let queued = self.queued.iter().map(|q| &q.pending);
        self.pending
            .values()
            .chain(queued)
            .map(|p| p.deadline)
            .min()
    }

    fn turn_done(&mut self, conn: &Connection) {
        self.expire(conn, Instant::now());
    }

    fn idle(&mut self) {
        self.control().sessions.make_rings_ahead();
    }
}

/// The `SessionClosed(session, reason)` signal of the broker object at `broker`.
fn session_closed(
    broker: &dbus::Path<'static>,
    session: dbus::Path<'static>,
    reason: &str,
) -> Message {
    Message::signal(
        broker,
        &BROKER_INTERFACE.into(),
        &member::SESSION_CLOSED.into(),
    )
    .append2(session, reason)
}

#[cfg(test)]
mod tests {
    //! The adapter handling messages in process, as the bus would deliver
    //! them; what it sends is recorded instead of sent.

    use super::*;
    use crate::builtin;
    use crate::config::Config;
    use dbus::arg::{RefArg, Variant};
    use shmlink_interfaces::{option, BROKER_PATH, DBUS_NAME, SESSION_INTERFACE};
    use std::cell::RefCell;

    /// A [`Sender`] that keeps what it is given, with serials as a
    /// connection would give them.
    #[derive(Default)]
    struct Recorder {
        sent: RefCell<Vec<Message>>,
        serial: std::cell::Cell<u32>,
    }

    impl Sender for Recorder {
        fn send(&self, mut msg: Message) -> Result<u32, ()> {
            let serial = self.serial.get() + 1;
            self.serial.set(serial);
            msg.set_serial(serial);
            self.sent.borrow_mut().push(msg);
            Ok(serial)
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<Message> {
            std::mem::take(&mut self.sent.borrow_mut())
        }
    }

    /// The adapter over the built-in services, and its recorder.
    fn adapter(f: impl FnOnce(&mut Config)) -> (Adapter, Recorder) {
        let mut config = Config::default();
        config.engine.workers = 1;
        f(&mut config);
        let sessions = Sessions::start(config, builtin::all()).expect("start");
        (
            Adapter::new(sessions, Names::default()),
            Recorder::default(),
        )
    }

    /// A method call from `sender` with serial `serial`.
    fn call(sender: &str, serial: u32, path: &str, iface: &str, member: &str) -> Message {
        let mut m =
            Message::new_method_call(BUS_NAME_FOR_TESTS, path, iface, member).expect("call");
        m.set_sender(Some(sender.into()));
        m.set_serial(serial);
        m
    }

    const BUS_NAME_FOR_TESTS: &str = "org.shmlink.Broker1";

    fn open_session(sender: &str, serial: u32, service: &str, options: PropMap) -> Message {
        call(
            sender,
            serial,
            BROKER_PATH,
            BROKER_INTERFACE,
            member::OPEN_SESSION,
        )
        .append2(service, options)
    }

    /// Hands `msg` to the adapter and answers the credential lookups it
    /// makes (`uid` for every sender); returns everything else it sent.
    fn handle(a: &mut Adapter, r: &Recorder, msg: Message, uid: u32) -> Vec<Message> {
        a.handle(r, msg);
        let mut out = Vec::new();
        for sent in r.take() {
            if sent.member().as_deref() == Some("GetConnectionCredentials") {
                let mut creds = PropMap::new();
                creds.insert(
                    "UnixUserID".into(),
                    Variant(Box::new(uid) as Box<dyn RefArg>),
                );
                creds.insert(
                    "ProcessID".into(),
                    Variant(Box::new(77u32) as Box<dyn RefArg>),
                );
                let mut reply = sent.method_return().append1(creds);
                reply.set_sender(Some(DBUS_NAME.into()));
                reply.set_serial(1000 + sent.get_serial().unwrap_or(0));
                out.extend(handle(a, r, reply, uid));
            } else {
                out.push(sent);
            }
        }
        out
    }

    /// `RegisterService("remote", "/p")` from `:1.9` as root; returns what was sent.
    fn register_remote(a: &mut Adapter, r: &Recorder) -> Vec<Message> {
        let register = call(
            ":1.9",
            1,
            BROKER_PATH,
            BROKER_INTERFACE,
            member::REGISTER_SERVICE,
        )
        .append3("remote", dbus::Path::from("/p"), PropMap::new());
        handle(a, r, register, 0)
    }

    /// The bus's `NameOwnerChanged` saying that `name` left.
    fn left_bus(name: &str) -> Message {
        let mut left = Message::signal(
            &"/org/freedesktop/DBus".into(),
            &DBUS_NAME.into(),
            &"NameOwnerChanged".into(),
        )
        .append3(name, name, "");
        left.set_sender(Some(DBUS_NAME.into()));
        left
    }

    fn error_name(m: &Message) -> Option<String> {
        let mut m = m.duplicate().ok()?;
        let e = m.as_result().err()?;
        e.name().map(str::to_owned)
    }

    #[test]
    fn open_list_and_close_reply_as_the_contract_says() {
        let (mut a, r) = adapter(|_| {});
        let out = handle(
            &mut a,
            &r,
            open_session(":1.5", 1, "echo", PropMap::new()),
            1000,
        );
        assert_eq!(out.len(), 1, "one reply: {out:?}");
        let reply = &out[0];
        assert_eq!(reply.msg_type(), MessageType::MethodReturn);
        assert_eq!(reply.get_reply_serial(), Some(1));
        let (path, capacity): (dbus::Path, u64) = reply.read2().expect("path, capacity");
        assert_eq!(&*path, format!("{}/session/1", BROKER_PATH));
        assert_eq!(
            capacity,
            shmlink_endpoint::rounded_capacity(limits::DEFAULT_CAPACITY)
        );
        assert_eq!(a.session_count(), 1);

        // Another connection of the same uid may not close it; its owner may.
        let close =
            |sender: &str, serial| call(sender, serial, &path, SESSION_INTERFACE, member::CLOSE);
        let out = handle(&mut a, &r, close(":1.6", 2), 1000);
        assert_eq!(error_name(&out[0]).as_deref(), Some(error::ACCESS_DENIED));
        assert_eq!(a.session_count(), 1);
        let out = handle(&mut a, &r, close(":1.5", 3), 1000);
        let kinds: Vec<_> = out
            .iter()
            .map(|m| (m.msg_type(), m.member().map(|m| m.to_string())))
            .collect();
        assert!(
            kinds.contains(&(MessageType::Signal, Some(member::SESSION_CLOSED.to_owned()))),
            "{kinds:?}"
        );
        assert!(out
            .iter()
            .any(|m| m.msg_type() == MessageType::MethodReturn));
        let (closed, reason): (dbus::Path, String) = out
            .iter()
            .find(|m| m.msg_type() == MessageType::Signal)
            .expect("signal")
            .read2()
            .expect("args");
        assert_eq!(
            (closed, reason.as_str()),
            (path.clone(), "closed by its owner")
        );
        assert_eq!(a.session_count(), 0);
        let out = handle(&mut a, &r, close(":1.5", 4), 1000);
        assert_eq!(error_name(&out[0]).as_deref(), Some(error::UNKNOWN_SESSION));
        a.shutdown(&r);
    }

    #[test]
    fn refusals_carry_the_contracts_error_names() {
        let (mut a, r) = adapter(|c| c.limits.sessions_per_connection = 1);
        let mut capacity = PropMap::new();
        capacity.insert(
            option::CAPACITY.into(),
            Variant(Box::new(1u64) as Box<dyn RefArg>),
        );
        let cases = [
            ("nope", PropMap::new(), error::UNKNOWN_SERVICE),
            ("echo", capacity, error::INVALID_CAPACITY),
        ];
        for (serial, (service, options, name)) in cases.into_iter().enumerate() {
            let out = handle(
                &mut a,
                &r,
                open_session(":1.5", serial as u32 + 1, service, options),
                1000,
            );
            assert_eq!(error_name(&out[0]).as_deref(), Some(name), "{service}");
        }
        handle(
            &mut a,
            &r,
            open_session(":1.5", 10, "echo", PropMap::new()),
            1000,
        );
        let out = handle(
            &mut a,
            &r,
            open_session(":1.5", 11, "echo", PropMap::new()),
            1000,
        );
        assert_eq!(error_name(&out[0]).as_deref(), Some(error::LIMIT_EXCEEDED));
        // A service name longer than any can be is refused without a lookup of it.
        let long = "x".repeat(limits::MAX_SERVICE_NAME + 1);
        let out = handle(
            &mut a,
            &r,
            open_session(":1.5", 12, &long, PropMap::new()),
            1000,
        );
        assert_eq!(error_name(&out[0]).as_deref(), Some(error::UNKNOWN_SERVICE));
        a.shutdown(&r);
    }

    #[test]
    fn an_owner_leaving_the_bus_ends_its_sessions_with_a_signal() {
        let (mut a, r) = adapter(|_| {});
        handle(
            &mut a,
            &r,
            open_session(":1.5", 1, "echo", PropMap::new()),
            1000,
        );
        handle(
            &mut a,
            &r,
            open_session(":1.6", 1, "echo", PropMap::new()),
            1000,
        );
        assert_eq!(a.session_count(), 2);
        let left = left_bus(":1.5");
        let out = handle(&mut a, &r, left, 1000);
        assert_eq!(out.len(), 1, "{out:?}");
        let (_, reason): (dbus::Path, String) = out[0].read2().expect("SessionClosed");
        assert_eq!(reason, "owner left the bus");
        assert_eq!(a.session_count(), 1, "the other connection's session stays");
        a.shutdown(&r);
    }

    /// The error name and text of an error reply.
    fn error_text(m: &Message) -> (String, String) {
        let mut m = m.duplicate().expect("duplicate");
        let e = m.as_result().expect_err("an error reply");
        (
            e.name().unwrap_or("").to_owned(),
            e.message().unwrap_or("").to_owned(),
        )
    }

    fn register_service(sender: &str, serial: u32, service: &str, object: &str) -> Message {
        call(
            sender,
            serial,
            BROKER_PATH,
            BROKER_INTERFACE,
            member::REGISTER_SERVICE,
        )
        .append3(service, dbus::Path::from(object), PropMap::new())
    }

    #[test]
    fn a_registration_object_path_longer_than_the_limit_is_refused_cut() {
        let (mut a, r) = adapter(|_| {});
        let huge = format!("/o/{}", "x".repeat(8 << 20));
        let out = handle(&mut a, &r, register_service(":1.9", 1, "remote", &huge), 0);
        assert_eq!(out.len(), 1, "only the refusal: {out:?}");
        let (name, text) = error_text(&out[0]);
        assert_eq!(name, error::INVALID_OPTION);
        assert!(text.contains("object path"), "{text}");
        assert!(text.len() <= LOGGED_ERROR + 64, "{} bytes", text.len());
        assert!(text.contains("[cut: "), "{text}");
        assert!(a
            .control()
            .sessions
            .accounting()
            .registration("remote")
            .is_none());

        // One byte over is refused; the longest allowed is registered and kept whole.
        let over = format!("/{}", "x".repeat(limits::MAX_OBJECT_PATH));
        let out = handle(&mut a, &r, register_service(":1.9", 2, "remote", &over), 0);
        assert_eq!(error_text(&out[0]).0, error::INVALID_OPTION);
        let longest = &over[..limits::MAX_OBJECT_PATH];
        let out = handle(
            &mut a,
            &r,
            register_service(":1.9", 3, "remote", longest),
            0,
        );
        assert!(
            out.iter()
                .any(|m| m.msg_type() == MessageType::MethodReturn),
            "{out:?}"
        );
        let stored = a.control().sessions.accounting().registration("remote");
        assert_eq!(stored.map(|r| r.object.as_str()), Some(longest));
        a.shutdown(&r);
    }

    #[test]
    fn replies_never_echo_a_huge_path_or_name() {
        let (mut a, r) = adapter(|_| {});
        let huge = "x".repeat(4 << 20);
        let session_path = format!("{BROKER_PATH}/session/{huge}");
        let other_path = format!("/{huge}");
        let properties = "org.freedesktop.DBus.Properties";
        let cases: Vec<(&str, Message, &str)> = vec![
            (
                "Close of a huge session path",
                call(":1.5", 1, &session_path, SESSION_INTERFACE, member::CLOSE),
                error::UNKNOWN_SESSION,
            ),
            (
                "Close of a huge path elsewhere",
                call(":1.5", 2, &other_path, SESSION_INTERFACE, member::CLOSE),
                "org.freedesktop.DBus.Error.UnknownObject",
            ),
            (
                "Get of a huge interface",
                call(":1.5", 3, BROKER_PATH, properties, "Get").append2(&*huge, "Version"),
                "org.freedesktop.DBus.Error.UnknownInterface",
            ),
            (
                "Get of a huge property",
                call(":1.5", 4, BROKER_PATH, properties, "Get").append2(BROKER_INTERFACE, &*huge),
                "org.freedesktop.DBus.Error.UnknownProperty",
            ),
            (
                "OpenSession of a huge name",
                open_session(":1.5", 5, &huge, PropMap::new()),
                error::UNKNOWN_SERVICE,
            ),
            (
                "RegisterService of a huge name",
                register_service(":1.5", 6, &huge, "/p"),
                error::INVALID_OPTION,
            ),
            (
                "UnregisterService of a huge name",
                call(
                    ":1.5",
                    7,
                    BROKER_PATH,
                    BROKER_INTERFACE,
                    member::UNREGISTER_SERVICE,
                )
                .append1(&*huge),
                error::UNKNOWN_SERVICE,
            ),
        ];
        for (what, msg, expected) in cases {
            let out = handle(&mut a, &r, msg, 65534);
            assert_eq!(out.len(), 1, "{what}: {out:?}");
            let (name, text) = error_text(&out[0]);
            assert_eq!(name, expected, "{what}: {text:.300}");
            assert!(
                text.len() <= LOGGED_ERROR + 64,
                "{what}: {} bytes echoed",
                text.len()
            );
        }
        a.shutdown(&r);
    }

    #[test]
    fn a_provided_open_waits_for_the_provider_and_only_its_answer_counts() {
        let (mut a, r) = adapter(|_| {});
        let out = register_remote(&mut a, &r);
        assert!(
            out.iter()
                .any(|m| m.msg_type() == MessageType::MethodReturn),
            "{out:?}"
        );
        assert!(out
            .iter()
            .any(|m| m.member().as_deref() == Some("PropertiesChanged")));

        let out = handle(
            &mut a,
            &r,
            open_session(":1.5", 2, "remote", PropMap::new()),
            1000,
        );
        assert_eq!(out.len(), 1, "only the AcceptSession call: {out:?}");
        let accept = &out[0];
        assert_eq!(accept.destination().as_deref(), Some(":1.9"));
        assert_eq!(accept.member().as_deref(), Some(member::ACCEPT_SESSION));
        assert_eq!(a.session_count(), 0, "not open until the provider accepts");

        // Someone else's answer is dropped; the provider's opens the session.
        let mut forged = accept.method_return();
        forged.set_sender(Some(":1.5".into()));
        forged.set_serial(50);
        assert!(handle(&mut a, &r, forged, 1000).is_empty());
        let mut answer = accept.method_return();
        answer.set_sender(Some(":1.9".into()));
        answer.set_serial(51);
        let out = handle(&mut a, &r, answer, 0);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].get_reply_serial(),
            Some(2),
            "the client's call is answered"
        );
        assert_eq!(out[0].msg_type(), MessageType::MethodReturn);
        assert_eq!(a.session_count(), 1);
        a.shutdown(&r);
    }

    #[test]
    fn calls_of_an_unknown_sender_wait_within_a_bound_and_the_rest_are_refused_at_once() {
        let (mut a, r) = adapter(|_| {});
        let list = |serial| {
            call(
                ":1.5",
                serial,
                BROKER_PATH,
                BROKER_INTERFACE,
                member::LIST_SESSIONS,
            )
        };
        for serial in 1..=parked::CALLS_PER_SENDER as u32 {
            a.handle(&r, list(serial));
        }
        let sent = r.take();
        assert_eq!(sent.len(), 1, "one lookup, no answer yet: {sent:?}");
        let lookup = sent.into_iter().next().expect("lookup");
        assert_eq!(lookup.member().as_deref(), Some("GetConnectionCredentials"));
        a.handle(&r, list(100));
        let refused = r.take();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].get_reply_serial(), Some(100));
        assert_eq!(
            error_name(&refused[0]).as_deref(),
            Some(error::LIMIT_EXCEEDED)
        );
        // A call bigger than a sender may have waiting is refused without a lookup.
        let big = call(
            ":1.6",
            1,
            BROKER_PATH,
            BROKER_INTERFACE,
            member::LIST_SESSIONS,
        )
        .append1("x".repeat(parked::BYTES_PER_SENDER));
        let out = handle(&mut a, &r, big, 1000);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(error_name(&out[0]).as_deref(), Some(error::LIMIT_EXCEEDED));
        // Once the bus answers, the waiting calls are answered in order.
        let mut creds = PropMap::new();
        creds.insert(
            "UnixUserID".into(),
            Variant(Box::new(1000u32) as Box<dyn RefArg>),
        );
        let mut reply = lookup.method_return().append1(creds);
        reply.set_sender(Some(DBUS_NAME.into()));
        reply.set_serial(500);
        a.handle(&r, reply);
        let answered: Vec<_> = r
            .take()
            .iter()
            .map(|m| (m.msg_type(), m.get_reply_serial()))
            .collect();
        let expected: Vec<_> = (1..=parked::CALLS_PER_SENDER as u32)
            .map(|s| (MessageType::MethodReturn, Some(s)))
            .collect();
        assert_eq!(answered, expected);
        a.shutdown(&r);
    }

    #[test]
    fn an_open_bigger_than_the_limit_is_refused_before_anything_is_asked() {
        let (mut a, r) = adapter(|_| {});
        register_remote(&mut a, &r);
        let mut options = PropMap::new();
        options.insert(
            "blob".into(),
            Variant(Box::new("x".repeat(limits::MAX_OPEN_SESSION)) as Box<dyn RefArg>),
        );
        let out = handle(&mut a, &r, open_session(":1.5", 2, "remote", options), 1000);
        assert_eq!(out.len(), 1, "no AcceptSession call: {out:?}");
        assert_eq!(out[0].get_reply_serial(), Some(2));
        assert_eq!(error_name(&out[0]).as_deref(), Some(error::INVALID_OPTION));
        assert!(a.pending.is_empty());
        // From a connection not known yet, before its credentials are asked.
        let mut options = PropMap::new();
        options.insert(
            "blob".into(),
            Variant(Box::new("x".repeat(limits::MAX_OPEN_SESSION)) as Box<dyn RefArg>),
        );
        a.handle(&r, open_session(":1.7", 3, "echo", options));
        let out = r.take();
        assert_eq!(out.len(), 1, "no lookup: {out:?}");
        assert_eq!(error_name(&out[0]).as_deref(), Some(error::INVALID_OPTION));
        a.shutdown(&r);
    }

    #[test]
    fn fds_in_open_session_replies_are_bounded_until_their_connection_leaves() {
        let (mut a, r) = adapter(|c| c.limits.reply_fds = Some(28));
        let open = |a: &mut Adapter, sender: &str, serial| {
            let out = handle(
                a,
                &r,
                open_session(sender, serial, "echo", PropMap::new()),
                1000,
            );
            error_name(&out[0])
        };
        assert_eq!(open(&mut a, ":1.5", 1), None);
        assert_eq!(open(&mut a, ":1.5", 2), None);
        assert_eq!(
            open(&mut a, ":1.6", 3).as_deref(),
            Some(error::LIMIT_EXCEEDED),
            "half of the bound per uid"
        );
        // OpenSessionVia's reply carries no fds: it is not bounded so.
        let (_mine, theirs) = shmlink_endpoint::sys::socketpair().expect("pair");
        let via = call(
            ":1.6",
            4,
            BROKER_PATH,
            BROKER_INTERFACE,
            member::OPEN_SESSION_VIA,
        )
        .append3("echo", PropMap::new(), theirs);
        let out = handle(&mut a, &r, via, 1000);
        assert_eq!(out[0].msg_type(), MessageType::MethodReturn, "{out:?}");
        let _: OpenSessionViaArgs = out[0].read_all().expect("path, capacities, parameters");
        let left = left_bus(":1.5");
        handle(&mut a, &r, left, 1000);
        assert_eq!(open(&mut a, ":1.6", 5), None, "room again");
        a.shutdown(&r);
    }

    #[test]
    fn opens_wait_while_their_provider_has_not_answered_its_share_and_go_on_when_it_does() {
        let (mut a, r) = adapter(|c| c.providers.unanswered = Some(1));
        register_remote(&mut a, &r);
        let out = handle(
            &mut a,
            &r,
            open_session(":1.5", 2, "remote", PropMap::new()),
            1000,
        );
        assert_eq!(out.len(), 1, "the first AcceptSession: {out:?}");
        let first = out.into_iter().next().expect("call");
        let out = handle(
            &mut a,
            &r,
            open_session(":1.6", 3, "remote", PropMap::new()),
            1000,
        );
        assert!(out.is_empty(), "the second waits: {out:?}");
        assert_eq!(a.queued.len(), 1);
        // An answer from someone else frees nothing.
        let mut forged = first.method_return();
        forged.set_sender(Some(":1.5".into()));
        forged.set_serial(60);
        assert!(handle(&mut a, &r, forged, 1000).is_empty());
        assert_eq!(a.queued.len(), 1);
        // The provider's answer opens the first and sends the second.
        let mut answer = first.method_return();
        answer.set_sender(Some(":1.9".into()));
        answer.set_serial(61);
        let out = handle(&mut a, &r, answer, 0);
        let members: Vec<_> = out
            .iter()
            .map(|m| (m.msg_type(), m.member().map(|m| m.to_string())))
            .collect();
        assert!(
            members.contains(&(MessageType::MethodCall, Some(member::ACCEPT_SESSION.into()))),
            "{members:?}"
        );
        assert!(
            out.iter().any(|m| m.get_reply_serial() == Some(2)),
            "{out:?}"
        );
        assert!(a.queued.is_empty());
        // A third waits behind the unanswered second, and fails at its deadline.
        assert!(handle(
            &mut a,
            &r,
            open_session(":1.7", 4, "remote", PropMap::new()),
            1000
        )
        .is_empty());
        a.expire(&r, Instant::now() + a.accept_timeout * 2);
        let out = r.take();
        let failed: Vec<_> = out
            .iter()
            .filter(|m| m.get_reply_serial() == Some(4) || m.get_reply_serial() == Some(3))
            .map(|m| (m.get_reply_serial(), error_name(m)))
            .collect();
        assert!(
            failed.contains(&(Some(4), Some(error::PROVIDER_UNAVAILABLE.into()))),
            "{failed:?}"
        );
        assert!(a.queued.is_empty() && a.pending.is_empty());
        a.shutdown(&r);
    }
}
