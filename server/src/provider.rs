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
//! - A session ends when the client hangs up, the broker closes the link
//!   (`Close`, the client leaving the bus, the broker stopping), the client
//!   misbehaves or the service fails; the provider then drops the rings, the
//!   hang-up socket and the link, which both the client and the broker see.
//! - When the broker leaves the bus, every session ends through its link;
//!   when a broker owns the name again, the provider registers its services
//!   with it anew. A registration the new broker refuses is logged and not
//!   retried until the next restart.

use crate::broker::{Broker, BrokerError, SESSION_OVERHEAD};
use crate::config::Config;
use crate::dbus::provider1;
use crate::engine::{Engine, Traffic};
use crate::service::{Caller, Memory, Options, Service};
use dbus::arg::PropMap;
use dbus::blocking::Connection;
use dbus::channel::Sender;
use dbus::message::{MatchRule, MessageType};
use dbus::Message;
use shmlink_endpoint::{sys, Endpoint, PeerFds, PeerLimits, Wakeup};
use shmlink_interfaces::{limits, member, param, wakeup, Bus, BROKER_INTERFACE, BROKER_PATH};
use shmlink_interfaces::{BUS_NAME, RING_HEADER};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where a provider exports `org.shmlink.Provider1` unless told otherwise.
pub const DEFAULT_OBJECT_PATH: &str = "/org/shmlink/Provider1";

/// How long [`ProviderBuilder::register`] waits for each answer of the broker.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Connects, starts the engine, exports the interface and registers
    /// every service with the broker; fails if the broker refuses one.
    /// Serve with [`Provider::run`].
    pub fn register(self) -> Result<Provider, ProviderError> {
        let bus_err = |source| ProviderError::Bus {
            bus: self.bus.to_string(),
            source,
        };
        let mut services = BTreeMap::new();
        for s in &self.services {
            if services.insert(s.name().to_owned(), s.clone()).is_some() {
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
        let engine = Engine::start(self.config.worker_count())?;
        // Learn when the broker leaves the bus or comes back.
        let rule = MatchRule::new_signal("org.freedesktop.DBus", "NameOwnerChanged")
            .with_sender("org.freedesktop.DBus")
            .with_path("/org/freedesktop/DBus");
        let rule = format!("{},arg0='{}'", rule.match_str(), self.broker_name);
        conn.add_match_no_cb(&rule).map_err(bus_err)?;
        let owner = name_owner(&conn, &self.broker_name)
            .or_else(|| {
                // Not running yet: D-Bus activation may start it.
                start_service(&conn, &self.broker_name);
                name_owner(&conn, &self.broker_name)
            })
            .ok_or_else(|| ProviderError::NoBroker(self.broker_name.clone()))?;
        let core = Arc::new(Mutex::new(Core {
            max_message: self.config.limits.max_message,
            books: Broker::new(self.config),
            services,
            engine,
            broker_owner: Some(owner.clone()),
            paths: HashMap::new(),
        }));
        let cr = provider1::crossroads(&self.object_path, core.clone());
        let provider = Provider {
            conn,
            cr,
            core,
            broker_name: self.broker_name,
            broker_path: self.broker_path,
            object_path: self.object_path,
            pending: HashMap::new(),
        };
        for name in provider.service_names() {
            let call = provider.register_call(&name);
            match provider
                .conn
                .channel()
                .send_with_reply_and_block(call, CALL_TIMEOUT)
            {
                Ok(_) => log::info!(
                    "registered {name:?} with {} ({owner})",
                    provider.broker_name
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
    let proxy = conn.with_proxy(
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        CALL_TIMEOUT,
    );
    let (owner,): (String,) = proxy
        .method_call("org.freedesktop.DBus", "GetNameOwner", (name,))
        .ok()?;
    Some(owner)
}

/// Asks the bus to activate `name` (and waits for it to start, within
/// [`CALL_TIMEOUT`]); a bus without an activation file for it says no.
fn start_service(conn: &Connection, name: &str) {
    let proxy = conn.with_proxy(
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        CALL_TIMEOUT,
    );
    let started: Result<(u32,), _> =
        proxy.method_call("org.freedesktop.DBus", "StartServiceByName", (name, 0u32));
    if let Err(e) = started {
        log::debug!("cannot activate {name}: {e}");
    }
}

/// What the `AcceptSession` handler and the main loop share.
pub(crate) struct Core {
    services: BTreeMap<String, Arc<dyn Service>>,
    /// The provider's own books: its sessions, their owners (the clients)
    /// and what each uid's sessions make this process hold.
    books: Broker,
    engine: Engine,
    /// The unique name of the broker the services are registered with.
    broker_owner: Option<String>,
    /// Each session's object path at the broker, for the log.
    paths: HashMap<u64, String>,
    max_message: u64,
}

/// One `AcceptSession` call, its arguments in their roles.
pub(crate) struct AcceptRequest {
    /// The session's path at the broker.
    pub session: String,
    /// The service asked for.
    pub service: String,
    /// Who opened it (parsed from the `caller` dictionary).
    pub caller: Caller,
    /// The client's options, without the ring options.
    pub options: PropMap,
    /// The rings and the hang-up socket.
    pub fds: PeerFds,
    /// The provider's end of the link to the broker.
    pub link: OwnedFd,
    /// The negotiated parameters.
    pub parameters: PropMap,
}

impl Core {
    /// Whether `sender` is the broker the services are registered with.
    pub fn is_broker(&self, sender: Option<&str>) -> bool {
        sender.is_some() && self.broker_owner.as_deref() == sender
    }

    /// Takes over the server side of a session: the checks the broker made,
    /// made again (service, access, fds, options, this process's limits),
    /// then the engine serves it. Nothing stays behind on a refusal.
    pub fn accept(&mut self, req: AcceptRequest) -> Result<(), BrokerError> {
        let AcceptRequest {
            session,
            service,
            caller,
            options,
            fds,
            link,
            parameters,
        } = req;
        let svc = self
            .services
            .get(&service)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownService(service.clone()))?;
        self.books.check_access(&caller, &service)?;
        let (max_message, wake) = parse_parameters(parameters, self.max_message)?;
        let budget = self.books.budget_of(caller.uid);
        let opts =
            Options::new(options, u64::from(max_message)).with_memory(Memory::new(budget.clone()));
        let handler = svc.open(&caller, &opts)?;
        let unused = opts.unused();
        if !unused.is_empty() {
            return Err(BrokerError::InvalidOption(format!(
                "unknown option(s) for service {service:?}: {}",
                unused.join(", ")
            )));
        }
        let max_capacity = self.books.limits().max_capacity;
        let (cap_in, cap_out) = (fds.to_server.capacity, fds.to_client.capacity);
        let peer_limits = PeerLimits {
            max_capacity,
            max_message,
        };
        // Checked before anything is charged or mapped: a capacity beyond
        // the limit is refused here, whatever the memfd holds.
        let mut endpoint = Endpoint::open_server(fds, link.as_fd(), max_message, wake, peer_limits)
            .map_err(|e| match e {
                shmlink_endpoint::Error::OverLimit { .. } => {
                    BrokerError::LimitExceeded(format!("this provider's limit: {e}"))
                }
                e => BrokerError::Internal(format!("the session's fds are unusable: {e}")),
            })?;
        let cost = cap_in + cap_out + 2 * RING_HEADER + SESSION_OVERHEAD;
        let id = self.books.reserve(&caller, &service, cost)?.id;
        endpoint.set_budget(budget);
        let traffic = Arc::new(Traffic::default());
        if let Err(e) = self.engine.add_linked(id, endpoint, handler, traffic, link) {
            self.books.release(id);
            return Err(BrokerError::Internal(format!(
                "could not start serving the session: {e}"
            )));
        }
        log::info!(
            "session {} accepted: service {service}, client {} (uid {}, pid {}), capacity {cap_in}/{cap_out}",
            crate::logcap::cut(&session, crate::logcap::LOGGED_STRING),
            caller.bus_name,
            caller.uid,
            caller.pid
        );
        self.paths.insert(
            id,
            crate::logcap::cut(&session, crate::logcap::LOGGED_STRING).into_owned(),
        );
        Ok(())
    }

    /// Ends session `id` (the engine ended it, or the provider stops).
    fn end_session(&mut self, id: u64, reason: &str) {
        let traffic = self.engine.traffic(id);
        self.engine.remove(id);
        let path = self.paths.remove(&id).unwrap_or_default();
        if let Some(r) = self.books.release(id) {
            log::info!(
                "session {path} ({}, client {} uid {}) ended: {reason}; {}",
                r.service,
                r.owner.bus_name,
                r.owner.uid,
                traffic.map(|t| t.summary()).unwrap_or_default()
            );
        }
    }

    fn reap(&mut self) {
        for e in self.engine.take_ended() {
            self.end_session(e.id, &e.reason);
        }
    }

    fn shutdown(&mut self, reason: &str) {
        let ids: Vec<u64> = self.books.reservations().map(|r| r.id).collect();
        for id in ids {
            self.end_session(id, reason);
        }
        self.engine.shutdown();
    }
}

/// `max-message`, `wakeup` and `spin-us` of `AcceptSession`'s parameters,
/// with `max-message` within this provider's own limit.
fn parse_parameters(parameters: PropMap, own_max: u64) -> Result<(u32, Wakeup), BrokerError> {
    let p = Options::new(parameters, own_max);
    let bad = |m: String| BrokerError::InvalidOption(format!("AcceptSession parameters: {m}"));
    let max = p
        .u64(param::MAX_MESSAGE)
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad(format!("{:?} is missing", param::MAX_MESSAGE)))?;
    if max > own_max {
        return Err(BrokerError::LimitExceeded(format!(
            "max-message {max} is above this provider's limit of {own_max}"
        )));
    }
    let max = u32::try_from(max).map_err(|_| bad(format!("max-message {max} is too large")))?;
    let mode = p.string(param::WAKEUP).map_err(|e| bad(e.to_string()))?;
    let spin_us = p.u64(param::SPIN_US).map_err(|e| bad(e.to_string()))?;
    let wake = match mode.as_deref() {
        None | Some(wakeup::PARK) => Wakeup::Park,
        Some(wakeup::SPIN) => {
            let us = spin_us.unwrap_or(u64::from(limits::DEFAULT_SPIN_US));
            if us > u64::from(limits::MAX_SPIN_US) {
                return Err(bad(format!(
                    "spin-us {us} is above the maximum of {}",
                    limits::MAX_SPIN_US
                )));
            }
            Wakeup::Spin(Duration::from_micros(us))
        }
        Some(other) => {
            return Err(bad(format!(
                "wakeup must be {:?} or {:?}, not {:?}",
                wakeup::PARK,
                wakeup::SPIN,
                crate::logcap::cut(other, crate::logcap::LOGGED_STRING)
            )))
        }
    };
    Ok((max, wake))
}

/// A provider registered with a broker. Serve with [`Provider::run`].
pub struct Provider {
    conn: Connection,
    cr: dbus_crossroads::Crossroads,
    core: Arc<Mutex<Core>>,
    broker_name: String,
    broker_path: String,
    object_path: String,
    /// `RegisterService` calls sent from the main loop, by serial: the service.
    pending: HashMap<u32, String>,
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
    pub fn session_count(&self) -> usize {
        crate::lock(&self.core).books.count()
    }

    fn service_names(&self) -> Vec<String> {
        crate::lock(&self.core).services.keys().cloned().collect()
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

    /// Serves until `stop` becomes readable (e.g. a signalfd from
    /// [`crate::signals::termination_fd`]) or the bus connection drops;
    /// withdraws the services and ends every session before returning.
    pub fn run(mut self, stop: Option<BorrowedFd<'_>>) -> Result<(), ProviderError> {
        let result = self.serve(stop);
        let services = self.service_names();
        for name in services {
            let call = Message::method_call(
                &self.broker_name.as_str().into(),
                &self.broker_path.as_str().into(),
                &BROKER_INTERFACE.into(),
                &member::UNREGISTER_SERVICE.into(),
            )
            .append1(name);
            let _ = self.conn.send(call);
        }
        crate::lock(&self.core).shutdown("the provider is stopping");
        self.conn.channel().flush();
        result
    }

    fn serve(&mut self, stop: Option<BorrowedFd<'_>>) -> Result<(), ProviderError> {
        let watch = self.conn.channel().watch();
        // SAFETY: the watch fd belongs to `self.conn`'s channel, which
        // outlives this borrow (it lives until `self` is dropped).
        let bus_fd = unsafe { BorrowedFd::borrow_raw(watch.fd) };
        let notify = crate::lock(&self.core).engine.notify_fd();
        loop {
            if self
                .conn
                .channel()
                .read_write(Some(Duration::ZERO))
                .is_err()
            {
                return Err(ProviderError::Disconnected);
            }
            while let Some(msg) = self.conn.channel().pop_message() {
                self.handle(msg);
            }
            self.conn.channel().flush();
            let mut fds = vec![bus_fd, notify.as_fd()];
            if let Some(s) = stop {
                fds.push(s);
            }
            let ready = sys::poll_readable(&fds, None)?;
            if ready.get(2).is_some_and(|r| r.readable) {
                log::info!("stop requested; ending {} session(s)", self.session_count());
                return Ok(());
            }
            if ready[1].readable {
                crate::lock(&self.core).reap();
            }
            if ready[0].hangup && !ready[0].readable {
                return Err(ProviderError::Disconnected);
            }
        }
    }

    fn handle(&mut self, mut msg: Message) {
        match msg.msg_type() {
            MessageType::MethodCall => {
                if self.cr.handle_message(msg, &self.conn).is_err() {
                    log::warn!("crossroads could not handle a method call");
                }
            }
            MessageType::MethodReturn | MessageType::Error => {
                let Some(service) = msg.get_reply_serial().and_then(|s| self.pending.remove(&s))
                else {
                    return;
                };
                if let Err(e) = msg.as_result() {
                    log::warn!(
                        "the broker refused to register {service:?} again: {}: {}",
                        e.name().unwrap_or("?"),
                        e.message().unwrap_or("")
                    );
                } else {
                    log::info!("registered {service:?} again with {}", self.broker_name);
                }
            }
            MessageType::Signal => self.name_owner_changed(&msg),
        }
    }

    /// The broker left the bus, or a broker took its name.
    fn name_owner_changed(&mut self, msg: &Message) {
        if msg.member().as_deref() != Some("NameOwnerChanged") {
            return;
        }
        let Ok((name, _old, new)) = msg.read3::<&str, &str, &str>() else {
            return;
        };
        if name != self.broker_name {
            return;
        }
        let mut core = crate::lock(&self.core);
        if new.is_empty() {
            core.broker_owner = None;
            log::warn!(
                "{name} left the bus; its {} session(s) end through their links",
                core.books.count()
            );
            return;
        }
        core.broker_owner = Some(new.to_owned());
        drop(core);
        log::info!("{name} is back as {new}; registering again");
        for service in self.service_names() {
            let call = self.register_call(&service);
            if let Ok(serial) = self.conn.send(call) {
                self.pending.insert(serial, service);
            }
        }
    }
}
