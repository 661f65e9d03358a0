//! The broker's session table: who owns which session, what it costs, and
//! the limits that bound it. Owned by the D-Bus thread; the rings themselves
//! are served by the [`Engine`](crate::engine::Engine).

use crate::config::Config;
use crate::engine::{Engine, Slot};
use crate::service::{Caller, Options, Service, ServiceError};
use dbus::arg::PropMap;
use shmlink_endpoint::{Endpoint, PeerFds, Wakeup};
use shmlink_interfaces::{error, limits, option, param, wakeup, SESSION_PATH_PREFIX};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Why `OpenSession` or `Close` failed; each maps to one D-Bus error name.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No such service.
    #[error("no service named {0:?}; see the Services property")]
    UnknownService(String),
    /// Bad option.
    #[error("{0}")]
    InvalidOption(String),
    /// Bad capacity.
    #[error("{0}")]
    InvalidCapacity(String),
    /// A limit would be exceeded; the text names it.
    #[error("{0}")]
    LimitExceeded(String),
    /// Not allowed.
    #[error("{0}")]
    AccessDenied(String),
    /// No such session.
    #[error("no session {0}")]
    UnknownSession(String),
    /// Our own failure.
    #[error("{0}")]
    Internal(String),
}

impl BrokerError {
    /// The D-Bus error name for this error.
    pub fn dbus_name(&self) -> &'static str {
        match self {
            BrokerError::UnknownService(_) => error::UNKNOWN_SERVICE,
            BrokerError::InvalidOption(_) => error::INVALID_OPTION,
            BrokerError::InvalidCapacity(_) => error::INVALID_CAPACITY,
            BrokerError::LimitExceeded(_) => error::LIMIT_EXCEEDED,
            BrokerError::AccessDenied(_) => error::ACCESS_DENIED,
            BrokerError::UnknownSession(_) => error::UNKNOWN_SESSION,
            BrokerError::Internal(_) => error::INTERNAL,
        }
    }
}

impl From<ServiceError> for BrokerError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidOption(m) => BrokerError::InvalidOption(m),
            other => BrokerError::Internal(other.to_string()),
        }
    }
}

/// One open session, as the broker records it.
pub struct SessionInfo {
    /// Session id (the last component of its path).
    pub id: u64,
    /// Its object path.
    pub path: dbus::Path<'static>,
    /// Service name.
    pub service: String,
    /// Who opened it.
    pub owner: Caller,
    /// Bytes of ring memory (both rings).
    pub ring_bytes: u64,
    /// The engine's slot (counters, state).
    pub slot: Arc<Slot>,
}

/// What `OpenSession` returns besides the path.
pub struct Opened {
    /// The session's id.
    pub id: u64,
    /// The session's object path.
    pub path: dbus::Path<'static>,
    /// The fds to hand over.
    pub fds: PeerFds,
    /// The `parameters` dictionary.
    pub params: PropMap,
}

#[derive(Default)]
struct Usage {
    sessions: u32,
    memory: u64,
}

/// The session table.
pub struct Broker {
    config: Config,
    services: BTreeMap<String, Arc<dyn Service>>,
    engine: Arc<Engine>,
    sessions: BTreeMap<u64, SessionInfo>,
    next_id: u64,
    per_connection: HashMap<String, u32>,
    per_user: HashMap<u32, Usage>,
    memory_total: u64,
}

fn parse_wakeup(opts: &Options) -> Result<Wakeup, BrokerError> {
    let mode = opts.string(option::WAKEUP)?;
    let spin_us = opts.u64(option::SPIN_US)?;
    match mode.as_deref() {
        None | Some(wakeup::PARK) => {
            if spin_us.is_some() {
                return Err(BrokerError::InvalidOption(format!(
                    "option {:?} needs {:?} = {:?}",
                    option::SPIN_US,
                    option::WAKEUP,
                    wakeup::SPIN
                )));
            }
            Ok(Wakeup::Park)
        }
        Some(wakeup::SPIN) => {
            let us = spin_us.unwrap_or(u64::from(limits::DEFAULT_SPIN_US));
            if us > u64::from(limits::MAX_SPIN_US) {
                return Err(BrokerError::InvalidOption(format!(
                    "option {:?} is {us}, above the maximum of {}",
                    option::SPIN_US,
                    limits::MAX_SPIN_US
                )));
            }
            Ok(Wakeup::Spin(Duration::from_micros(us)))
        }
        Some(other) => Err(BrokerError::InvalidOption(format!(
            "option {:?} must be {:?} or {:?}, not {other:?}",
            option::WAKEUP,
            wakeup::PARK,
            wakeup::SPIN
        ))),
    }
}

impl Broker {
    /// A broker hosting `services` with `config`, serving rings on `engine`.
    pub fn new(config: Config, services: Vec<Arc<dyn Service>>, engine: Arc<Engine>) -> Self {
        let services = services
            .into_iter()
            .map(|s| (s.name().to_owned(), s))
            .collect();
        Broker {
            config,
            services,
            engine,
            sessions: BTreeMap::new(),
            next_id: 1,
            per_connection: HashMap::new(),
            per_user: HashMap::new(),
            memory_total: 0,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Names of the hosted services.
    pub fn service_names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// Open sessions.
    pub fn sessions(&self) -> impl Iterator<Item = &SessionInfo> {
        self.sessions.values()
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// A session by id.
    pub fn session(&self, id: u64) -> Option<&SessionInfo> {
        self.sessions.get(&id)
    }

    /// Creates a session for `caller`. Nothing is created unless everything succeeds.
    pub fn open(
        &mut self,
        caller: &Caller,
        service: &str,
        options: PropMap,
    ) -> Result<Opened, BrokerError> {
        let svc = self
            .services
            .get(service)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownService(service.into()))?;
        let limits = &self.config.limits;
        if let Some(access) = self.config.services.get(service) {
            if !access.allows(caller.uid, &caller.gids) {
                return Err(BrokerError::AccessDenied(format!(
                    "uid {} may not use service {service:?} (see the daemon's configuration)",
                    caller.uid
                )));
            }
        }
        let opts = Options::new(options, limits.max_message);
        let capacity = opts
            .u64(option::CAPACITY)?
            // A client that does not ask gets the default, or the maximum if that is lower.
            .unwrap_or(limits::DEFAULT_CAPACITY.min(limits.max_capacity));
        if capacity < limits::MIN_CAPACITY || capacity > limits.max_capacity {
            return Err(BrokerError::InvalidCapacity(format!(
                "capacity {capacity} is outside {}..={} bytes",
                limits::MIN_CAPACITY,
                limits.max_capacity
            )));
        }
        let wake = parse_wakeup(&opts)?;
        let handler = svc.open(caller, &opts)?;
        let unused = opts.unused();
        if !unused.is_empty() {
            return Err(BrokerError::InvalidOption(format!(
                "unknown option(s) for service {service:?}: {}",
                unused.join(", ")
            )));
        }
        // Both rings' memfds: the usable bytes plus shmem-ipc's 64-byte header each.
        let ring_bytes = 2 * (shmlink_endpoint::rounded_capacity(capacity) + 64);
        self.check_limits(caller, ring_bytes)?;

        let max_message = u32::try_from(limits.max_message).unwrap_or(u32::MAX);
        let (endpoint, fds) = Endpoint::create_server(capacity, max_message, wake)
            .map_err(|e| BrokerError::Internal(format!("could not create the rings: {e}")))?;
        let id = self.next_id;
        self.next_id += 1;
        let slot = self.engine.add(id, endpoint, handler).map_err(|e| {
            BrokerError::Internal(format!("could not start serving the session: {e}"))
        })?;
        let path = dbus::Path::from(format!("{SESSION_PATH_PREFIX}{id}"));
        *self
            .per_connection
            .entry(caller.bus_name.clone())
            .or_default() += 1;
        let u = self.per_user.entry(caller.uid).or_default();
        u.sessions += 1;
        u.memory += ring_bytes;
        self.memory_total += ring_bytes;
        self.sessions.insert(
            id,
            SessionInfo {
                id,
                path: path.clone(),
                service: service.into(),
                owner: caller.clone(),
                ring_bytes,
                slot,
            },
        );
        let mut params = PropMap::new();
        params.insert(
            param::MAX_MESSAGE.into(),
            crate::service::prop(limits.max_message),
        );
        let (mode, us) = match wake {
            Wakeup::Park => (wakeup::PARK, 0u32),
            Wakeup::Spin(d) => (wakeup::SPIN, d.as_micros() as u32),
        };
        params.insert(param::WAKEUP.into(), crate::service::prop(mode.to_owned()));
        params.insert(param::SPIN_US.into(), crate::service::prop(us));
        log::info!(
            "session {id} opened: service {service}, owner {} (uid {}, pid {}), capacity {}",
            caller.bus_name,
            caller.uid,
            caller.pid,
            fds.to_server.capacity
        );
        Ok(Opened {
            id,
            path,
            fds,
            params,
        })
    }

    fn check_limits(&self, caller: &Caller, ring_bytes: u64) -> Result<(), BrokerError> {
        let l = &self.config.limits;
        let conn = self
            .per_connection
            .get(&caller.bus_name)
            .copied()
            .unwrap_or(0);
        if conn >= l.sessions_per_connection {
            return Err(BrokerError::LimitExceeded(format!(
                "sessions_per_connection: this connection already has {conn} sessions (limit {})",
                l.sessions_per_connection
            )));
        }
        let (sessions, memory) = self
            .per_user
            .get(&caller.uid)
            .map(|u| (u.sessions, u.memory))
            .unwrap_or((0, 0));
        if sessions >= l.sessions_per_user {
            return Err(BrokerError::LimitExceeded(format!(
                "sessions_per_user: uid {} already has {sessions} sessions (limit {})",
                caller.uid, l.sessions_per_user
            )));
        }
        if memory + ring_bytes > l.memory_per_user {
            return Err(BrokerError::LimitExceeded(format!(
                "memory_per_user: uid {} uses {memory} bytes of rings; {ring_bytes} more would pass the limit of {}",
                caller.uid, l.memory_per_user
            )));
        }
        if self.memory_total + ring_bytes > l.memory_total {
            return Err(BrokerError::LimitExceeded(format!(
                "memory_total: sessions use {} bytes of rings; {ring_bytes} more would pass the limit of {}",
                self.memory_total, l.memory_total
            )));
        }
        Ok(())
    }

    /// Checks that `caller` may act on session `id` (its owner, or root).
    pub fn authorize(
        &self,
        id: u64,
        caller: Option<&Caller>,
        sender: &str,
    ) -> Result<&SessionInfo, BrokerError> {
        let info = self
            .sessions
            .get(&id)
            .ok_or_else(|| BrokerError::UnknownSession(format!("{SESSION_PATH_PREFIX}{id}")))?;
        let root = caller.is_some_and(|c| c.uid == 0);
        if info.owner.bus_name != sender && !root {
            return Err(BrokerError::AccessDenied(format!(
                "session {} belongs to {}, not to {sender}",
                info.path, info.owner.bus_name
            )));
        }
        Ok(info)
    }

    /// Closes a session (engine first, then bookkeeping); returns its record.
    pub fn close(&mut self, id: u64) -> Option<SessionInfo> {
        let info = self.sessions.get(&id)?;
        self.engine.close_slot(&info.slot);
        self.forget(id)
    }

    /// Removes a session the engine already closed from the table.
    pub fn forget(&mut self, id: u64) -> Option<SessionInfo> {
        let info = self.sessions.remove(&id)?;
        if let Some(n) = self.per_connection.get_mut(&info.owner.bus_name) {
            *n -= 1;
            if *n == 0 {
                self.per_connection.remove(&info.owner.bus_name);
            }
        }
        if let Some(u) = self.per_user.get_mut(&info.owner.uid) {
            u.sessions -= 1;
            u.memory -= info.ring_bytes;
            if u.sessions == 0 {
                self.per_user.remove(&info.owner.uid);
            }
        }
        self.memory_total -= info.ring_bytes;
        Some(info)
    }

    /// Ids of the sessions a bus connection owns.
    pub fn sessions_of(&self, bus_name: &str) -> Vec<u64> {
        self.sessions
            .values()
            .filter(|s| s.owner.bus_name == bus_name)
            .map(|s| s.id)
            .collect()
    }
}
