//! The D-Bus side of the broker: owns the well-known name, registers the
//! `org.shmlink.Broker1` and `org.shmlink.Session1` interfaces with
//! dbus-crossroads, learns callers' credentials from the bus, and runs the
//! main loop that ties bus traffic, the engine's notifications and the stop
//! signal together.
//!
//! Try it against a running daemon:
//! ```text
//! busctl --user call org.shmlink.Broker1 /org/shmlink/Broker1 org.shmlink.Broker1 \
//!     OpenSession sa{sv} echo 1 capacity t 65536
//! ```

use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::engine::{Closed, Engine};
use crate::service::{Caller, Service};
use dbus::arg::PropMap;
use dbus::channel::Channel;
pub use shmlink_interfaces::Bus;

use dbus::message::MessageType;
use dbus::{Message, Path};
use dbus_crossroads::{Context, Crossroads, IfaceToken, MethodErr};
use shmlink_endpoint::sys;
use shmlink_interfaces::{
    member, BROKER_INTERFACE, BROKER_PATH, BUS_NAME, SESSION_INTERFACE, SESSION_PATH_PREFIX,
};
use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Connecting to the bus failed.
    #[error("cannot connect to the bus ({bus}): {source}")]
    Connect {
        /// The bus.
        bus: String,
        /// libdbus's error.
        source: dbus::Error,
    },
    /// Another process owns the name, or the policy forbids owning it.
    #[error("cannot own the name {name}: {reason}")]
    Name {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Setting up the engine failed.
    #[error("cannot start the event loop: {0}")]
    Engine(#[from] std::io::Error),
    /// The bus connection dropped.
    #[error("lost the bus connection")]
    Disconnected,
}

/// Timeout for our own calls to the bus daemon.
const BUS_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Shared by the crossroads callbacks (all on the D-Bus thread).
struct State {
    broker: Broker,
    /// Credentials of connections we have seen, by unique name.
    callers: HashMap<String, Caller>,
    /// Sender of the method call being dispatched (crossroads does not pass
    /// the message to property getters called from `GetAll`).
    current_sender: String,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn method_err(e: BrokerError) -> MethodErr {
    MethodErr::from((e.dbus_name(), e.to_string()))
}

/// Data of each session object: its id.
struct SessionObject(u64);

/// A running broker on a bus.
pub struct Daemon {
    channel: Channel,
    cr: Crossroads,
    state: Shared,
    engine: Arc<Engine>,
    closed_rx: mpsc::Receiver<Closed>,
    bus_label: String,
}

fn connect(bus: &Bus) -> Result<Channel, DaemonError> {
    bus.connect().map_err(|source| DaemonError::Connect {
        bus: bus.to_string(),
        source,
    })
}

fn bus_call(
    channel: &Channel,
    member: &str,
    args: impl FnOnce(Message) -> Message,
) -> Result<Message, dbus::Error> {
    let m = Message::new_method_call(
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        member,
    )
    .map_err(|e| dbus::Error::new_failed(&e))?;
    channel.send_with_reply_and_block(args(m), BUS_CALL_TIMEOUT)
}

/// Asks the bus who `sender` is.
fn lookup_caller(channel: &Channel, sender: &str) -> Result<Caller, dbus::Error> {
    let reply = bus_call(channel, "GetConnectionCredentials", |m| m.append1(sender))?;
    let creds: PropMap = reply.read1()?;
    let uid = creds
        .get("UnixUserID")
        .and_then(|v| v.0.as_u64())
        .ok_or_else(|| dbus::Error::new_failed("bus did not report UnixUserID"))?;
    let pid = creds
        .get("ProcessID")
        .and_then(|v| v.0.as_u64())
        .unwrap_or(0);
    let gids = creds
        .get("UnixGroupIDs")
        .and_then(|v| v.0.as_iter())
        .map(|it| it.filter_map(|g| g.as_u64()).map(|g| g as u32).collect())
        .unwrap_or_default();
    Ok(Caller {
        bus_name: sender.to_owned(),
        uid: uid as u32,
        pid: pid as u32,
        gids,
    })
}

impl Daemon {
    /// Connects to `bus`, starts the engine, registers the interfaces and
    /// takes the well-known name. Serve with [`Daemon::run`].
    pub fn create(
        bus: &Bus,
        config: Config,
        services: Vec<Arc<dyn Service>>,
    ) -> Result<Daemon, DaemonError> {
        let channel = connect(bus)?;
        let (closed_tx, closed_rx) = mpsc::channel();
        let engine = Engine::start(config.worker_count(), closed_tx)?;
        let broker = Broker::new(config, services, engine.clone());
        let state: Shared = Arc::new(Mutex::new(State {
            broker,
            callers: HashMap::new(),
            current_sender: String::new(),
        }));
        let mut cr = Crossroads::new();
        let session_token = register_session(&mut cr, state.clone());
        let broker_token = register_broker(&mut cr, state.clone(), session_token);
        cr.insert(BROKER_PATH, &[broker_token], ());
        // An empty parent node, so `busctl tree` and introspection list the sessions.
        cr.insert(SESSION_PATH_PREFIX.trim_end_matches('/'), &[], ());

        // Learn when clients leave the bus.
        bus_call(&channel, "AddMatch", |m| {
            m.append1("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged'")
        })
        .map_err(|e| DaemonError::Connect { bus: format!("{bus:?}"), source: e })?;
        // DBUS_NAME_FLAG_DO_NOT_QUEUE = 4; reply 1 = primary owner.
        let reply =
            bus_call(&channel, "RequestName", |m| m.append2(BUS_NAME, 4u32)).map_err(|e| {
                DaemonError::Name {
                    name: BUS_NAME.into(),
                    reason: e.to_string(),
                }
            })?;
        let code: u32 = reply.read1().map_err(|e| DaemonError::Name {
            name: BUS_NAME.into(),
            reason: e.to_string(),
        })?;
        if code != 1 {
            return Err(DaemonError::Name {
                name: BUS_NAME.into(),
                reason: "another process owns it".into(),
            });
        }
        log::info!(
            "serving {BUS_NAME} on {} as {} with {} worker thread(s)",
            match bus {
                Bus::Address(a) => a.clone(),
                other => format!("the {other:?} bus").to_lowercase(),
            },
            channel.unique_name().unwrap_or("?"),
            engine.worker_count()
        );
        Ok(Daemon {
            channel,
            cr,
            state,
            engine,
            closed_rx,
            bus_label: format!("{bus:?}"),
        })
    }

    /// Serves until `stop` becomes readable (e.g. a signalfd for SIGTERM) or
    /// the bus connection drops. Closes every session before returning.
    pub fn run(mut self, stop: Option<BorrowedFd<'_>>) -> Result<(), DaemonError> {
        let result = self.serve(stop);
        self.shutdown();
        result
    }

    fn serve(&mut self, stop: Option<BorrowedFd<'_>>) -> Result<(), DaemonError> {
        self.channel.set_watch_enabled(true);
        let watch = self.channel.watch();
        // SAFETY: the watch fd belongs to `self.channel`, which outlives this borrow.
        let bus_fd = unsafe { BorrowedFd::borrow_raw(watch.fd) };
        loop {
            if self.channel.read_write(Some(Duration::ZERO)).is_err() {
                return Err(DaemonError::Disconnected);
            }
            while let Some(msg) = self.channel.pop_message() {
                self.dispatch(msg);
            }
            self.reap_closed();
            self.channel.flush();
            let mut fds = vec![bus_fd, self.engine.notify_fd()];
            if let Some(s) = stop {
                fds.push(s);
            }
            let ready = sys::poll_readable(&fds, None)?;
            if ready.get(2).is_some_and(|r| r.readable) {
                log::info!(
                    "stop requested; closing {} session(s)",
                    lock(&self.state).broker.session_count()
                );
                return Ok(());
            }
            if ready[1].readable {
                self.engine.drain_notify();
            }
            if ready[0].hangup && !ready[0].readable {
                return Err(DaemonError::Disconnected);
            }
        }
    }

    fn dispatch(&mut self, msg: Message) {
        match msg.msg_type() {
            MessageType::MethodCall => {
                if let Some(sender) = msg.sender() {
                    let sender = sender.to_string();
                    let known = {
                        let mut st = lock(&self.state);
                        st.current_sender = sender.clone();
                        st.callers.contains_key(&sender)
                    };
                    if !known {
                        match lookup_caller(&self.channel, &sender) {
                            Ok(c) => {
                                lock(&self.state).callers.insert(sender, c);
                            }
                            Err(e) => log::warn!("cannot learn the credentials of {sender}: {e}"),
                        }
                    }
                }
                if let Some(reply) = self.unknown_session_reply(&msg) {
                    let _ = self.channel.send(reply);
                    return;
                }
                if self.cr.handle_message(msg, &self.channel).is_err() {
                    log::warn!("crossroads could not handle a method call");
                }
            }
            MessageType::Signal
                if msg.member().is_some_and(|m| &*m == "NameOwnerChanged")
                    && msg.sender().is_some_and(|s| &*s == "org.freedesktop.DBus") =>
            {
                if let Ok((name, _old, new)) = msg.read3::<String, String, String>() {
                    if new.is_empty() && name.starts_with(':') {
                        self.client_left(&name);
                    }
                }
            }
            _ => {}
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
            .is_some_and(|id| lock(&self.state).broker.session(id).is_some());
        if exists
            || msg
                .interface()
                .is_some_and(|i| &*i == "org.freedesktop.DBus.Introspectable")
        {
            return None;
        }
        let text = format!("no session at {}", &*path);
        Some(msg.error(
            &shmlink_interfaces::error::UNKNOWN_SESSION.into(),
            &std::ffi::CString::new(text).ok()?,
        ))
    }

    fn client_left(&mut self, name: &str) {
        let ids = {
            let mut st = lock(&self.state);
            st.callers.remove(name);
            st.broker.sessions_of(name)
        };
        for id in ids {
            self.end_session(id, "owner left the bus", true);
        }
    }

    fn reap_closed(&mut self) {
        while let Ok(Closed { id, reason }) = self.closed_rx.try_recv() {
            self.end_session(id, &reason, false);
        }
    }

    /// Removes a session's object, updates the table and announces it.
    fn end_session(&mut self, id: u64, reason: &str, close_engine: bool) {
        let info = {
            let mut st = lock(&self.state);
            if close_engine {
                st.broker.close(id)
            } else {
                st.broker.forget(id)
            }
        };
        if let Some(info) = info {
            log::info!(
                "session {id} ({}, owner {}) ended: {reason}",
                info.service,
                info.owner.bus_name
            );
            self.cr.remove::<SessionObject>(&info.path);
            let _ = self.channel.send(session_closed_signal(&info.path, reason));
        }
    }

    fn shutdown(&mut self) {
        let ids: Vec<u64> = lock(&self.state).broker.sessions().map(|s| s.id).collect();
        for id in ids {
            self.end_session(id, "the daemon is shutting down", true);
        }
        self.engine.shutdown();
        self.channel.flush();
        let _ = bus_call(&self.channel, "ReleaseName", |m| m.append1(BUS_NAME));
        log::info!("stopped serving on {}", self.bus_label);
    }
}

fn session_closed_signal(path: &Path<'static>, reason: &str) -> Message {
    Message::signal(
        &BROKER_PATH.into(),
        &BROKER_INTERFACE.into(),
        &member::SESSION_CLOSED.into(),
    )
    .append2(path.clone(), reason)
}

/// Looks up the caller of the current method in the credentials cache.
fn caller_of(st: &State, msg: &Message) -> Result<Caller, MethodErr> {
    let sender = msg
        .sender()
        .ok_or_else(|| MethodErr::failed("message without sender"))?;
    st.callers.get(&*sender).cloned().ok_or_else(|| {
        MethodErr::from((
            shmlink_interfaces::error::INTERNAL,
            format!("could not learn the credentials of {sender}"),
        ))
    })
}

fn register_broker(
    cr: &mut Crossroads,
    state: Shared,
    session_token: IfaceToken<SessionObject>,
) -> IfaceToken<()> {
    cr.register(BROKER_INTERFACE, move |b| {
        let st = state.clone();
        b.method_with_cr(
            member::OPEN_SESSION,
            ("service", "options"),
            (
                "session",
                "to_server_capacity",
                "to_server_memfd",
                "to_server_empty",
                "to_server_full",
                "to_client_capacity",
                "to_client_memfd",
                "to_client_empty",
                "to_client_full",
                "hangup",
                "parameters",
            ),
            move |ctx: &mut Context,
                  cr: &mut Crossroads,
                  (service, options): (String, PropMap)|
                  -> Result<shmlink_interfaces::OpenSessionArgs, MethodErr> {
                let mut guard = lock(&st);
                let caller = caller_of(&guard, ctx.message())?;
                let opened = guard.broker.open(&caller, &service, options).map_err(|e| {
                    log::warn!(
                        "OpenSession({service:?}) from {} (uid {}) refused: {e}",
                        caller.bus_name,
                        caller.uid
                    );
                    method_err(e)
                })?;
                drop(guard);
                cr.insert(
                    opened.path.clone(),
                    &[session_token],
                    SessionObject(opened.id),
                );
                Ok(shmlink_interfaces::OpenSessionReply {
                    session: opened.path,
                    fds: opened.fds,
                    parameters: opened.params,
                }
                .into())
            },
        );
        let st = state.clone();
        b.method(
            member::LIST_SESSIONS,
            (),
            ("sessions",),
            move |_ctx, _: &mut (), ()| {
                let guard = lock(&st);
                let list: Vec<(Path<'static>, String, String, u32, u32)> = guard
                    .broker
                    .sessions()
                    .map(|s| {
                        (
                            s.path.clone(),
                            s.service.clone(),
                            s.owner.bus_name.clone(),
                            s.owner.uid,
                            s.owner.pid,
                        )
                    })
                    .collect();
                Ok((list,))
            },
        );
        b.signal::<(Path<'static>, String), _>(member::SESSION_CLOSED, ("session", "reason"));
        b.property(member::VERSION)
            .emits_changed_const()
            .get(|_, _: &mut ()| Ok(env!("CARGO_PKG_VERSION").to_owned()));
        let st = state.clone();
        b.property(member::SERVICES)
            .emits_changed_const()
            .get(move |_, _: &mut ()| Ok(lock(&st).broker.service_names()));
        let st = state.clone();
        b.property(member::SESSION_COUNT)
            .emits_changed_false()
            .get(move |_, _: &mut ()| Ok(lock(&st).broker.session_count() as u32));
        let st = state.clone();
        b.property(member::MAX_CAPACITY)
            .emits_changed_const()
            .get(move |_, _: &mut ()| Ok(lock(&st).broker.config().limits.max_capacity));
        let st = state.clone();
        b.property(member::MAX_MESSAGE_SIZE)
            .emits_changed_const()
            .get(move |_, _: &mut ()| Ok(lock(&st).broker.config().limits.max_message));
    })
}

/// Runs `f` on the session behind a property read, after checking that the
/// reader is its owner or root.
fn with_session<R>(
    st: &Shared,
    ctx: &dbus_crossroads::PropContext,
    obj: &SessionObject,
    owner_only: bool,
    f: impl FnOnce(&crate::broker::SessionInfo) -> R,
) -> Result<R, MethodErr> {
    let guard = lock(st);
    if !owner_only {
        let info = guard.broker.session(obj.0).ok_or_else(|| {
            method_err(BrokerError::UnknownSession(format!(
                "{SESSION_PATH_PREFIX}{}",
                obj.0
            )))
        })?;
        return Ok(f(info));
    }
    let sender = match ctx.message() {
        Some(msg) => msg.sender().map(|s| s.to_string()).unwrap_or_default(),
        None => guard.current_sender.clone(),
    };
    let caller = guard.callers.get(&sender);
    let info = guard
        .broker
        .authorize(obj.0, caller, &sender)
        .map_err(method_err)?;
    Ok(f(info))
}

fn register_session(cr: &mut Crossroads, state: Shared) -> IfaceToken<SessionObject> {
    cr.register(SESSION_INTERFACE, move |b| {
        let st = state.clone();
        b.method_with_cr(
            member::CLOSE,
            (),
            (),
            move |ctx: &mut Context, cr: &mut Crossroads, ()| {
                let id = cr
                    .data_mut::<SessionObject>(ctx.path())
                    .map(|o| o.0)
                    .ok_or_else(|| {
                        method_err(BrokerError::UnknownSession(ctx.path().to_string()))
                    })?;
                let mut guard = lock(&st);
                let sender = ctx
                    .message()
                    .sender()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let caller = guard.callers.get(&sender).cloned();
                guard
                    .broker
                    .authorize(id, caller.as_ref(), &sender)
                    .map_err(|e| {
                        log::warn!("Close of session {id} by {sender} refused: {e}");
                        method_err(e)
                    })?;
                let info = guard.broker.close(id);
                drop(guard);
                if let Some(info) = info {
                    // `authorize` let through the owner or root; say which.
                    let reason = if info.owner.bus_name == sender {
                        "closed by its owner".to_owned()
                    } else {
                        format!("closed by root ({sender})")
                    };
                    log::info!("session {id} ({}) ended: {reason}", info.service);
                    cr.remove::<SessionObject>(&info.path);
                    ctx.push_msg(session_closed_signal(&info.path, &reason));
                }
                Ok(())
            },
        );
        macro_rules! prop {
            ($name:expr, $owner_only:expr, $ty:ty, $f:expr) => {{
                let st = state.clone();
                b.property::<$ty, _>($name).emits_changed_false().get(
                    move |ctx, obj: &mut SessionObject| {
                        with_session(&st, ctx, obj, $owner_only, $f)
                    },
                );
            }};
        }
        use std::sync::atomic::Ordering::Relaxed;
        prop!(member::SERVICE, false, String, |s| s.service.clone());
        prop!(member::OWNER, false, String, |s| s.owner.bus_name.clone());
        prop!(member::OWNER_UID, false, u32, |s| s.owner.uid);
        prop!(member::OWNER_PID, false, u32, |s| s.owner.pid);
        prop!(member::BYTES_TO_SERVER, true, u64, |s| s
            .slot
            .counters
            .bytes_to_server
            .load(Relaxed));
        prop!(member::MESSAGES_TO_SERVER, true, u64, |s| s
            .slot
            .counters
            .messages_to_server
            .load(Relaxed));
        prop!(member::BYTES_TO_CLIENT, true, u64, |s| s
            .slot
            .counters
            .bytes_to_client
            .load(Relaxed));
        prop!(member::MESSAGES_TO_CLIENT, true, u64, |s| s
            .slot
            .counters
            .messages_to_client
            .load(Relaxed));
        prop!(member::SERVICE_STATE, true, PropMap, |s| s
            .slot
            .service_state()
            .unwrap_or_default());
    })
}
