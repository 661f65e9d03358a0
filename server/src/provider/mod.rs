//! A provider: a process that serves [`Service`]s through a running broker.
//!
//! A desktop service that wants to stream to clients in shared memory
//! without living inside `shmlinkd` registers its services with the broker
//! (`Broker1.RegisterService`) and exports `org.shmlink.Provider1`. When a
//! client opens one of them, the broker checks access and limits, creates
//! the rings and hands the server's side to the provider
//! (`Provider1.AcceptSession`); from then on the provider and the client
//! share the rings directly, served by the same engine (worker threads,
//! time slices, per-uid memory accounting) as the broker's own services.
//!
//! ```no_run
//! use shmlink_server::{builtin, Bus, Provider};
//! let provider = Provider::builder(&Bus::Session)
//!     .service(std::sync::Arc::new(builtin::Sink))
//!     .register()?;
//! provider.run(None)?;
//! # Ok::<(), shmlink_server::ProviderError>(())
//! ```
//!
//! What a provider sees:
//! - `AcceptSession` is accepted only from the connection that owned the
//!   broker's name when the provider registered (or re-registered); any
//!   other caller gets `AccessDenied`. Every fd is checked as a client checks
//!   it ([`Endpoint::open_server`]), unknown option keys are refused, and
//!   the provider's own limits (`[limits]` of its [`Config`]) and access
//!   rules (`[services.NAME]`) apply on top of the broker's.
//! - A session ends when the broker closes the hang-up socket and the link
//!   (the client hung up, `Close`, the client leaving the bus, the broker
//!   stopping), the client misbehaves or the service fails; the provider
//!   then drops the rings, the hang-up socket and the link, which the broker
//!   sees (and ends the session, which its client sees).
//! - When the broker leaves the bus, every session ends through its link;
//!   when a broker owns the name again, the provider registers its services
//!   with it anew. A registration the new broker refuses (or that cannot
//!   be sent) is retried with back-off, from 1 s doubling up to 60 s, each
//!   retry logged with the broker's reason (sparsely once it keeps failing).
//! - Every session holds several fds, so [`ProviderBuilder::register`]
//!   raises the soft open-file limit (`RLIMIT_NOFILE`) to the hard one, as
//!   `shmlinkd` does; a provider that wants a lower limit may set it again
//!   after registering. A call carrying fds that this process has no room
//!   for (the fds plus [`PROVIDER_FD_RESERVE`]) is refused with `LimitExceeded`
//!   before it is decoded, and a method handler that panics is answered
//!   with an error instead of taking the process down.

mod accept;
mod retry;

use crate::config::Config;
use crate::log_bounds::{cut, LOGGED_ERROR};
use crate::main_loop::{self, Served};
use crate::service::Service;
use crate::sessions::Sessions;
use dbus::arg::PropMap;
use dbus::blocking::Connection;
use dbus::channel::Sender;
use dbus::message::{MatchRule, MessageType};
use dbus::Message;
use dbus_crossroads::Crossroads;
use retry::Backoff;
use shmlink_endpoint::sys;
use shmlink_interfaces::{
    error, member, Bus, BROKER_INTERFACE, BROKER_PATH, BUS_NAME, DBUS_NAME, DBUS_PATH,
    PROVIDER_INTERFACE,
};
use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, BorrowedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a provider exports `org.shmlink.Provider1` unless told otherwise.
pub use shmlink_interfaces::PROVIDER_PATH as DEFAULT_OBJECT_PATH;

/// How long [`ProviderBuilder::register`] waits for each answer of the broker.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The fds a provider keeps free besides those a call carries: decoding a
/// call duplicates each fd it carries, the session it starts may open a
/// few more, and the next message from the bus must still find room for
/// its own (libdbus cannot receive a message whose fds do not fit).
pub const PROVIDER_FD_RESERVE: u64 = 32;

/// Why a provider could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Connecting to the bus, or a call to the bus itself, failed.
    #[error("cannot talk to the bus ({bus}): {source}")]
    Bus {
        /// The bus.
        bus: String,
        /// libdbus's error.
        source: dbus::Error,
    },
    /// No broker owns the name the provider was told to register with.
    #[error("no broker owns {0} on the bus")]
    NoBroker(String),
    /// The broker refused a registration.
    #[error("the broker refused to register {service:?}: {name}: {message}")]
    Refused {
        /// The service.
        service: String,
        /// The D-Bus error name, e.g. `org.shmlink.Error.NameTaken`.
        name: String,
        /// The broker's reason.
        message: String,
    },
    /// Two services of this provider have the same name, or it has none.
    #[error("{0}")]
    Services(String),
    /// Setting up the engine failed.
    #[error("cannot start the event loop: {0}")]
    Engine(#[from] std::io::Error),
    /// The bus connection dropped.
    #[error("lost the bus connection")]
    Disconnected,
}

/// Sets up a [`Provider`]: its services, the broker to register with, where
/// to export `org.shmlink.Provider1`, its own limits.
pub struct ProviderBuilder {
    bus: Bus,
    services: Vec<Arc<dyn Service>>,
    broker_name: String,
    broker_path: String,
    object_path: String,
    config: Config,
}

impl ProviderBuilder {
    /// Adds a service; its [`Service::name`] is the name registered with the broker.
    pub fn service(mut self, service: Arc<dyn Service>) -> Self {
        self.services.push(service);
        self
    }

    /// Registers with the broker answering to `names` (by default
    /// `shmlinkd`'s: `org.shmlink.Broker1` at `/org/shmlink/Broker1`).
    pub fn broker(mut self, names: &crate::Names) -> Self {
        self.broker_name = names.bus_name().to_owned();
        self.broker_path = names.path().to_owned();
        self
    }

    /// Exports `org.shmlink.Provider1` at `path` (default [`DEFAULT_OBJECT_PATH`]).
    pub fn object_path(mut self, path: &str) -> Self {
        self.object_path = path.to_owned();
        self
    }

    /// The provider's own limits, worker count and access rules: what its
    /// sessions may make this process hold, per client uid and in total,
    /// and the largest ring and message it accepts from the broker.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Raises the soft open-file limit (`RLIMIT_NOFILE`) to the hard one,
    /// connects, starts the engine, exports the interface and registers
    /// every service with the broker; fails if the broker refuses one.
    /// Serve with [`Provider::run`].
    ///
    /// Every session holds several fds, hence the raised limit (as
    /// `shmlinkd` raises its own); a provider that wants a lower one may set
    /// it again after this returns. A call whose fds do not fit (with
    /// [`PROVIDER_FD_RESERVE`] to spare) is refused with `LimitExceeded`.
    pub fn register(self) -> Result<Provider, ProviderError> {
        match sys::raise_fd_limit() {
            Ok(Some(limit)) => log::debug!("open-file limit: {limit}"),
            Ok(None) => log::debug!("open-file limit: none"),
            Err(e) => log::warn!("could not raise the open-file limit: {e}"),
        }
        let bus_err = |source| ProviderError::Bus {
            bus: self.bus.to_string(),
            source,
        };
        let mut services = BTreeSet::new();
        for s in &self.services {
            if !services.insert(s.name().to_owned()) {
                return Err(ProviderError::Services(format!(
                    "two services are named {:?}",
                    s.name()
                )));
            }
        }
        if services.is_empty() {
            return Err(ProviderError::Services("a provider needs a service".into()));
        }
        dbus::Path::new(self.object_path.clone())
            .map_err(|e| ProviderError::Services(format!("bad object path: {e}")))?;
        let mut channel = self.bus.connect().map_err(bus_err)?;
        channel.set_watch_enabled(true);
        let conn = Connection::from(channel);
        let sessions = Sessions::start(self.config, self.services)?;
        // Learn when the broker leaves the bus or comes back.
        let rule = MatchRule::new_signal(DBUS_NAME, "NameOwnerChanged")
            .with_sender(DBUS_NAME)
            .with_path(DBUS_PATH);
        let rule = format!("{},arg0='{}'", rule.match_str(), self.broker_name);
        conn.add_match_no_cb(&rule).map_err(bus_err)?;
        let owner = name_owner(&conn, &self.broker_name)
            .or_else(|| {
                // Not running yet: D-Bus activation may start it.
                start_service(&conn, &self.broker_name);
                name_owner(&conn, &self.broker_name)
            })
            .ok_or_else(|| ProviderError::NoBroker(self.broker_name.clone()))?;
        let path: dbus::Path<'static> = self.object_path.clone().into();
        let cr = accept::crossroads(
            path.clone(),
            ProviderObject {
                sessions,
                broker_owner: Some(owner.clone()),
            },
        );
        let mut provider = Provider {
            conn,
            face: Face {
                cr,
                path,
                broker_name: self.broker_name,
                broker_path: self.broker_path,
                object_path: self.object_path,
                pending: HashMap::new(),
                retries: HashMap::new(),
                panics: 0,
            },
        };
        for name in provider.face.service_names() {
            let call = provider.face.register_call(&name);
            match provider
                .conn
                .channel()
                .send_with_reply_and_block(call, CALL_TIMEOUT)
            {
                Ok(_) => log::info!(
                    "registered {name:?} with {} ({owner})",
                    provider.face.broker_name
                ),
                Err(e) => {
                    return Err(ProviderError::Refused {
                        service: name,
                        name: e.name().unwrap_or("?").to_owned(),
                        message: e.message().unwrap_or("").to_owned(),
                    })
                }
            }
        }
        Ok(provider)
    }
}

/// The unique name owning `name` now, if any.
fn name_owner(conn: &Connection, name: &str) -> Option<String> {
    let proxy = conn.with_proxy(DBUS_NAME, DBUS_PATH, CALL_TIMEOUT);
    let (owner,): (String,) = proxy.method_call(DBUS_NAME, "GetNameOwner", (name,)).ok()?;
    Some(owner)
}

/// Asks the bus to activate `name` (and waits for it to start, within
/// [`CALL_TIMEOUT`]); a bus without an activation file for it says no.
fn start_service(conn: &Connection, name: &str) {
    let proxy = conn.with_proxy(DBUS_NAME, DBUS_PATH, CALL_TIMEOUT);
    let started: Result<(u32,), _> =
        proxy.method_call(DBUS_NAME, "StartServiceByName", (name, 0u32));
    if let Err(e) = started {
        log::debug!("cannot activate {name}: {e}");
    }
}

/// The provider object's data: the provider's session table (its
/// services, its own limits and accounting, its engine) and the broker it
/// registered with.
pub(crate) struct ProviderObject {
    sessions: Sessions,
    /// The unique name of the broker the services are registered with.
    broker_owner: Option<String>,
}

impl ProviderObject {
    /// Whether `sender` is the broker the services are registered with.
    fn is_broker(&self, sender: Option<&str>) -> bool {
        sender.is_some() && self.broker_owner.as_deref() == sender
    }
}

/// A provider registered with a broker. Serve with [`Provider::run`].
pub struct Provider {
    conn: Connection,
    face: Face,
}

/// A provider's D-Bus face: `org.shmlink.Provider1` (whose object data is
/// the [`ProviderObject`]) and its registrations with the broker.
struct Face {
    cr: Crossroads,
    /// Where `org.shmlink.Provider1` is exported; crossroads keeps the
    /// [`ProviderObject`] there.
    path: dbus::Path<'static>,
    broker_name: String,
    broker_path: String,
    object_path: String,
    /// `RegisterService` calls sent from the main loop, by serial: the service.
    pending: HashMap<u32, String>,
    /// Registrations with the current broker that failed, by service: when
    /// to try again.
    retries: HashMap<String, Backoff>,
    /// Method handlers that panicked (see [`Face::call`]).
    panics: u64,
}

impl Provider {
    /// Starts setting up a provider on `bus`.
    pub fn builder(bus: &Bus) -> ProviderBuilder {
        ProviderBuilder {
            bus: bus.clone(),
            services: Vec::new(),
            broker_name: BUS_NAME.to_owned(),
            broker_path: BROKER_PATH.to_owned(),
            object_path: DEFAULT_OBJECT_PATH.to_owned(),
            config: Config::default(),
        }
    }

    /// This provider's unique name on the bus.
    pub fn unique_name(&self) -> String {
        self.conn
            .channel()
            .unique_name()
            .unwrap_or_default()
            .to_owned()
    }

    /// Number of sessions this provider serves now.
    pub fn session_count(&mut self) -> usize {
        self.face.host().sessions.open_count()
    }

    /// Serves until `stop` becomes readable (e.g. a signalfd from
    /// [`crate::signals::termination_fd`]) or the bus connection drops;
    /// withdraws the services and ends every session before returning.
    pub fn run(mut self, stop: Option<BorrowedFd<'_>>) -> Result<(), ProviderError> {
        let result = match main_loop::run(&self.conn, stop, &mut self.face) {
            Ok(main_loop::Ended::Stopped) => {
                log::info!("stop requested; ending {} session(s)", self.session_count());
                Ok(())
            }
            Ok(main_loop::Ended::Disconnected) => Err(ProviderError::Disconnected),
            Err(e) => Err(e.into()),
        };
        for name in self.face.service_names() {
            let call = Message::method_call(
                &self.face.broker_name.as_str().into(),
                &self.face.broker_path.as_str().into(),
                &BROKER_INTERFACE.into(),
                &member::UNREGISTER_SERVICE.into(),
            )
            .append1(name);
            let _ = self.conn.send(call);
        }
        self.face
            .host()
            .sessions
            .shutdown("the provider is stopping");
        main_loop::send_within(&self.conn, main_loop::LAST_WORDS);
        result
    }
}

impl Face {
    fn host(&mut self) -> &mut ProviderObject {
        self.cr
            .data_mut::<ProviderObject>(&self.path)
            .expect("the provider object is never removed")
    }

    fn service_names(&mut self) -> Vec<String> {
        self.host().sessions.service_names()
    }

    fn register_call(&self, service: &str) -> Message {
        Message::method_call(
            &self.broker_name.as_str().into(),
            &self.broker_path.as_str().into(),
            &BROKER_INTERFACE.into(),
            &member::REGISTER_SERVICE.into(),
        )
        .append3(
            service,
            dbus::Path::from(self.object_path.clone()),
            PropMap::new(),
        )
    }

    /// The broker left the bus, or a broker took its name.
    fn name_owner_changed(&mut self, conn: &Connection, msg: &Message) {
        if msg.member().as_deref() != Some("NameOwnerChanged") {
            return;
        }
        let Ok((name, _old, new)) = msg.read3::<&str, &str, &str>() else {
            return;
        };
        if name != self.broker_name {
            return;
        }
        let host = self.host();
        if new.is_empty() {
            host.broker_owner = None;
            log::warn!(
                "{name} left the bus; its {} session(s) end through their links",
                host.sessions.open_count()
            );
            return;
        }
        host.broker_owner = Some(new.to_owned());
        log::info!("{name} is back as {new}; registering again");
        // A new broker: earlier answers and back-offs no longer count.
        self.pending.clear();
        self.retries.clear();
        for service in self.service_names() {
            self.send_registration(conn, service);
        }
    }

    /// Sends `RegisterService` for `service` without waiting for the
    /// answer ([`Served::handle`] gets it); a call that cannot be sent is
    /// retried later.
    fn send_registration(&mut self, conn: &Connection, service: String) {
        let call = self.register_call(&service);
        match conn.send(call) {
            Ok(serial) => {
                self.pending.insert(serial, service);
            }
            Err(()) => self.registration_failed(service, "the call could not be sent"),
        }
    }

    /// A registration with the current broker failed for `reason`: retry
    /// it after the service's next back-off.
    fn registration_failed(&mut self, service: String, reason: &str) {
        let backoff = self.retries.entry(service.clone()).or_default();
        let wait = backoff.failed(Instant::now());
        if backoff.worth_logging() {
            log::warn!(
                "registering {service:?} with {} failed: {}; trying again in {wait:?}",
                self.broker_name,
                cut(reason, LOGGED_ERROR),
            );
        }
    }
}

impl Face {
    /// Hands a method call to crossroads, unless it carries more fds than
    /// this process has room for; a handler that panics (libdbus failing to
    /// duplicate an fd makes the dbus crate panic while decoding) is
    /// answered with an error and the object served on.
    fn call(&mut self, conn: &Connection, msg: Message) {
        // What an error answer needs, kept before crossroads takes the call.
        let serial = msg.get_serial();
        let sender = msg.sender().map(|s| s.into_static());
        let wants_reply = !msg.get_no_reply();
        let fds = fds_carried(&msg);
        if fds > 0 {
            match sys::fd_headroom() {
                Ok(Some(room)) if room < fds + PROVIDER_FD_RESERVE => {
                    log::debug!("a call carrying {fds} fd(s) refused: room for {room} more");
                    drop(msg);
                    if wants_reply {
                        reply_error(conn, serial, sender, error::LIMIT_EXCEEDED, NO_ROOM);
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => log::debug!("cannot count open fds: {e}"),
            }
        }
        // AssertUnwindSafe: the crossroads instance and the provider object
        // are not used again as they were left. Crossroads takes a method out
        // while it runs and puts it back after, so it is rebuilt around the
        // object. The object's session table is changed only by `adopt`,
        // whose reservation is a guard the unwind drops, and which enters
        // the session last; the dbus crate's panics (decoding the arguments)
        // come before the handler runs at all, and the fds decoded so far
        // are closed by the unwind.
        let cr = &mut self.cr;
        let handled = catch_unwind(AssertUnwindSafe(|| cr.handle_message(msg, conn)));
        match handled {
            Ok(Ok(())) => {}
            Ok(Err(())) => log::warn!("crossroads could not handle a method call"),
            Err(panic) => {
                self.panics += 1;
                // The first, then ever more sparsely: 2, 4, 8, ...
                if self.panics.is_power_of_two() {
                    log::error!(
                        "a method call panicked ({} so far): {}",
                        self.panics,
                        cut(panic_message(&panic), LOGGED_ERROR)
                    );
                }
                let host = self
                    .cr
                    .remove::<ProviderObject>(&self.path)
                    .expect("the provider object is never removed");
                self.cr = accept::crossroads(self.path.clone(), host);
                if wants_reply {
                    // Short of fds now (those decoded before the panic are
                    // closed again): the panic was most likely a failed
                    // duplication, which the caller may try again later.
                    let short = fds > 0
                        && sys::fd_headroom()
                            .is_ok_and(|r| r.is_some_and(|r| r < fds + PROVIDER_FD_RESERVE));
                    let (name, text) = if short {
                        (error::LIMIT_EXCEEDED, NO_ROOM)
                    } else {
                        (error::INTERNAL, "the provider failed to handle the call")
                    };
                    reply_error(conn, serial, sender, name, text);
                }
            }
        }
    }

    /// When the first failed registration is due again.
    fn next_retry(&self) -> Option<Instant> {
        self.retries.values().filter_map(Backoff::due).min()
    }
}

/// The reason a call with fds is refused when they do not fit.
const NO_ROOM: &str = "this provider cannot take more fds";

/// How many fds `msg` carries (an fd inside an array counts once).
fn fds_carried(msg: &Message) -> u64 {
    let mut args = msg.iter_init();
    let mut fds = 0;
    while args.arg_type() != dbus::arg::ArgType::Invalid {
        fds += args
            .signature()
            .as_bytes()
            .iter()
            .filter(|&&c| c == b'h')
            .count() as u64;
        args.next();
    }
    fds
}

/// What a caught panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Answers the call `serial` of `sender` with the error `name`.
fn reply_error(
    conn: &Connection,
    serial: Option<u32>,
    sender: Option<dbus::strings::BusName<'static>>,
    name: &str,
    text: &str,
) {
    let (Some(serial), Some(sender)) = (serial, sender) else {
        return;
    };
    // An error answer needs only the call's serial and sender: a stand-in
    // call carrying both makes it, never sent itself.
    let mut call = Message::method_call(
        &sender,
        &"/".into(),
        &PROVIDER_INTERFACE.into(),
        &member::ACCEPT_SESSION.into(),
    );
    call.set_serial(serial);
    call.set_sender(Some(sender));
    let (Ok(name), Ok(text)) = (
        dbus::strings::ErrorName::new(name),
        std::ffi::CString::new(text),
    ) else {
        return;
    };
    let _ = conn.send(call.error(&name, &text));
}

impl Served for Face {
    fn handle(&mut self, conn: &Connection, mut msg: Message) {
        match msg.msg_type() {
            MessageType::MethodCall => self.call(conn, msg),
            MessageType::MethodReturn | MessageType::Error => {
                let Some(service) = msg.get_reply_serial().and_then(|s| self.pending.remove(&s))
                else {
                    return;
                };
                if let Err(e) = msg.as_result() {
                    let reason =
                        format!("{}: {}", e.name().unwrap_or("?"), e.message().unwrap_or(""));
                    self.registration_failed(service, &reason);
                } else {
                    self.retries.remove(&service);
                    log::info!("registered {service:?} again with {}", self.broker_name);
                }
            }
            MessageType::Signal => self.name_owner_changed(conn, &msg),
        }
    }

    fn turn_done(&mut self, conn: &Connection) {
        if self.host().broker_owner.is_none() {
            return;
        }
        let now = Instant::now();
        let due: Vec<String> = self
            .retries
            .iter_mut()
            .filter_map(|(service, b)| b.take_due(now).then(|| service.clone()))
            .collect();
        for service in due {
            self.send_registration(conn, service);
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.next_retry()
    }

    fn watched(&mut self) -> Vec<Arc<dyn AsFd>> {
        vec![self.host().sessions.notify_fd()]
    }

    fn ready(&mut self, _conn: &Connection, _index: usize) {
        // The sessions' pumps ended themselves; nothing to announce.
        self.host().sessions.reap();
    }
}
