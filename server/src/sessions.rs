//! The session lifecycle, in one place and one direction.
//!
//! [`Sessions::open`]: parse the ring options → the service's `open` (its
//! options and handler) → [`Broker::reserve`] (limits, id, charges) →
//! [`ServerRings`] (the rings, usually made ahead while the D-Bus thread
//! was idle) → [`Engine::add_held`] (a worker serves it). Any failure after the
//! reservation releases it, so a refused call leaves no trace.
//!
//! [`Sessions::end_session`] is the only way a session ends, whatever the
//! cause (`Close`, the owner leaving the bus, the engine reporting a dead or
//! misbehaving peer, shutdown): it releases the reservation, tells the engine
//! to drop the session, logs, and returns what the D-Bus side needs to
//! remove the object and announce the end. It is idempotent: a second call
//! for the same id returns `None`, so an end is announced once.
//!
//! A service a provider process registered opens in two steps:
//! [`Sessions::open_provided`] (access, ring options, reservation, the fds
//! made by [`shmlink_endpoint::create_unmapped`], nothing mapped) leaves the
//! session pending while the provider is asked; then
//! [`Sessions::accept_provided`] opens it (its link watched by [`Links`]) or
//! [`Sessions::abandon_provided`] releases everything. An open provided
//! session ends through `end_session` like any other, which closes the
//! broker's end of its link.

use crate::broker::{session_cost, Broker, BrokerError, Registration};
use crate::config::Config;
use crate::engine::{Engine, Traffic};
use crate::links::Links;
use crate::logcap::{cut, LOGGED_STRING};
use crate::names::Names;
use crate::service::{prop, Caller, Memory, Options, Service, StateView};
use dbus::arg::PropMap;
use shmlink_endpoint::sys::Selector;
use shmlink_endpoint::{PeerFds, ServerRings, Wakeup};
use shmlink_interfaces::{limits, option, param, wakeup};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

/// A session just opened: what its D-Bus object carries and what the
/// `OpenSession` reply returns.
pub(crate) struct Opened {
    /// The session's record.
    pub record: SessionRecord,
    /// The fds to hand to the client.
    pub fds: PeerFds,
    /// The `parameters` dictionary of the reply.
    pub params: PropMap,
}

/// What a session's D-Bus object knows about it, readable without waiting
/// for the worker that serves it.
pub(crate) struct SessionRecord {
    /// Session id.
    pub id: u64,
    /// Its object path.
    pub path: dbus::Path<'static>,
    /// The service.
    pub service: String,
    /// Who opened it.
    pub owner: Caller,
    /// Counts the pump keeps.
    pub traffic: Arc<Traffic>,
    /// The service's state, if it publishes one.
    pub state: Option<Arc<dyn StateView>>,
}

/// A provided session just reserved, waiting for its provider: what to
/// hand the provider, and what to hand the client once it accepts.
pub(crate) struct ProvidedOpen {
    /// The session's record (its object is created when the provider accepts).
    pub record: SessionRecord,
    /// The fds for the client.
    pub client: PeerFds,
    /// The fds for the provider.
    pub provider: PeerFds,
    /// The provider's end of the link.
    pub provider_link: OwnedFd,
    /// The `parameters` dictionary, for the provider and the client.
    pub params: PropMap,
    /// The client's options without the ring options, for the provider.
    pub options: PropMap,
    /// Who provides the service.
    pub registration: Registration,
}

/// A provided session at the broker: the broker's end of its link while
/// the provider is asked, then nothing (the link is in [`Links`]).
enum Provided {
    Pending(OwnedFd),
    Open,
}

/// A session that just ended, for the D-Bus side to remove and announce.
pub(crate) struct EndedSession {
    /// Its object path.
    pub path: dbus::Path<'static>,
    /// The broker object's path, which announces the end.
    pub broker_path: dbus::Path<'static>,
}

/// The hosted services, the books and the engine.
pub(crate) struct Sessions {
    services: BTreeMap<String, Arc<dyn Service>>,
    broker: Broker,
    engine: Engine,
    /// Provided sessions by id, pending or open.
    provided: HashMap<u64, Provided>,
    /// The links of the open provided sessions.
    links: Links,
    /// The next session's rings, made ahead while the D-Bus thread was idle
    /// (see [`Sessions::make_rings_ahead`]).
    rings_ahead: Option<ServerRings>,
    /// The capacity the last session asked for: the rings to make ahead.
    capacity_ahead: Option<u64>,
    /// Sessions opened (id, capacity) whose workers are not woken and whose
    /// opening is not logged yet (see [`Sessions::after_reply`]).
    opened: Vec<(u64, u64)>,
}

impl Sessions {
    /// Hosts `services` under `config`, with its engine's worker threads started.
    pub fn start(config: Config, services: Vec<Arc<dyn Service>>) -> std::io::Result<Self> {
        let engine = Engine::start(config.worker_count())?;
        let services = services
            .into_iter()
            .map(|s| (s.name().to_owned(), s))
            .collect();
        Ok(Sessions {
            services,
            broker: Broker::new(config),
            engine,
            provided: HashMap::new(),
            links: Links::new()?,
            rings_ahead: None,
            capacity_ahead: None,
            opened: Vec::new(),
        })
    }

    /// The same sessions under the broker names `names`.
    pub fn with_names(mut self, names: Names) -> Self {
        self.broker.set_names(names);
        self
    }

    /// The books, for registrations.
    pub fn broker_mut(&mut self) -> &mut Broker {
        &mut self.broker
    }

    /// Whether `service` is built in.
    pub fn is_builtin(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    /// Whether session `id` is open (reserved and, if provided, accepted).
    pub fn is_open(&self, id: u64) -> bool {
        self.broker.contains(id) && !matches!(self.provided.get(&id), Some(Provided::Pending(_)))
    }

    /// Number of open sessions (pending provided ones excluded).
    pub fn open_count(&self) -> usize {
        let pending = self
            .provided
            .values()
            .filter(|p| matches!(p, Provided::Pending(_)))
            .count();
        self.broker.count() - pending
    }

    /// The epoll fd of the provider links: readable when
    /// [`Sessions::reap_links`] has work.
    pub fn links_fd(&self) -> Arc<Selector> {
        self.links.fd()
    }

    /// Reserves a session of the provided `service` for `caller` and makes
    /// its fds; it stays pending until [`Sessions::accept_provided`] or
    /// [`Sessions::abandon_provided`]. Errors keep the built-in precedence
    /// (unknown service, access, ring options, limits); the provider judges
    /// its own options.
    pub fn open_provided(
        &mut self,
        caller: &Caller,
        service: &str,
        options: PropMap,
    ) -> Result<ProvidedOpen, BrokerError> {
        let registration = self
            .broker
            .registration(service)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownService(service.into()))?;
        self.broker.check_access(caller, service)?;
        let max_message = self.broker.limits().max_message;
        let mut options = options;
        let ring: PropMap = [option::CAPACITY, option::WAKEUP, option::SPIN_US]
            .into_iter()
            .filter_map(|k| options.remove_entry(k))
            .collect();
        let (capacity, wake) = ring_options(
            &Options::new(ring, max_message),
            self.broker.limits().max_capacity,
        )?;
        let cost = session_cost(shmlink_endpoint::rounded_capacity(capacity));
        let id = self.broker.reserve(caller, service, cost)?.id;
        let fds = match shmlink_endpoint::create_unmapped(capacity) {
            Ok(fds) => fds,
            Err(e) => {
                self.broker.release(id);
                return Err(BrokerError::Internal(format!(
                    "could not create the rings: {e}"
                )));
            }
        };
        self.provided.insert(id, Provided::Pending(fds.broker_link));
        log::debug!(
            "session {id} of provided service {service} for {} (uid {}): asking {}",
            caller.bus_name,
            caller.uid,
            registration.provider.bus_name
        );
        Ok(ProvidedOpen {
            record: SessionRecord {
                id,
                path: self.broker.session_path(id).into(),
                service: service.to_owned(),
                owner: caller.clone(),
                traffic: Arc::new(Traffic::default()),
                state: None,
            },
            client: fds.client,
            provider: fds.provider,
            provider_link: fds.provider_link,
            params: reply_parameters(max_message, wake),
            options,
            registration,
        })
    }

    /// The provider accepted pending session `id`: it is open from now on,
    /// its link watched. Fails if it is not pending any more (it was
    /// abandoned, or its client left meanwhile).
    pub fn accept_provided(&mut self, id: u64) -> Result<(), BrokerError> {
        let gone = || BrokerError::UnknownSession(self.broker.session_path(id));
        let Some(Provided::Pending(_)) = self.provided.get(&id) else {
            return Err(gone());
        };
        let Some(Provided::Pending(link)) = self.provided.insert(id, Provided::Open) else {
            return Err(gone());
        };
        if let Err(e) = self.links.watch(id, link) {
            self.provided.remove(&id);
            self.broker.release(id);
            return Err(BrokerError::Internal(format!(
                "could not watch the provider's link: {e}"
            )));
        }
        if let Some(r) = self.broker.reservations().find(|r| r.id == id) {
            log::info!(
                "session {id} opened: provided service {}, owner {} (uid {}, pid {}), cost {}",
                r.service,
                r.owner.bus_name,
                r.owner.uid,
                r.owner.pid,
                r.cost
            );
        }
        Ok(())
    }

    /// Pending session `id` will not open (`reason`): releases its
    /// reservation and drops the broker's end of its link, which a provider
    /// that accepted late sees. Does nothing for a session not pending.
    pub fn abandon_provided(&mut self, id: u64, reason: &str) {
        if !matches!(self.provided.get(&id), Some(Provided::Pending(_))) {
            return;
        }
        self.provided.remove(&id);
        if let Some(r) = self.broker.release(id) {
            log::info!(
                "session {id} of provided service {} for {} (uid {}) not opened: {}",
                r.service,
                r.owner.bus_name,
                r.owner.uid,
                cut(reason, crate::logcap::LOGGED_ERROR)
            );
        }
    }

    /// Ends the provided sessions whose provider closed its link; returns
    /// them with their reasons.
    pub fn reap_links(&mut self) -> Vec<(EndedSession, String)> {
        self.links
            .take_ended()
            .into_iter()
            .filter_map(|(id, reason)| Some((self.end_session(id, reason)?, reason.to_owned())))
            .collect()
    }

    /// The books (limits, owners, counts).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Names of the services OpenSession accepts: built in and registered, sorted.
    pub fn service_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .services
            .keys()
            .cloned()
            .chain(self.broker.registrations().map(|r| r.service.clone()))
            .collect();
        names.sort();
        names
    }

    /// Names of the built-in services.
    pub fn builtin_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// Number of engine worker threads.
    pub fn worker_count(&self) -> usize {
        self.engine.worker_count()
    }

    /// The eventfd that becomes readable when [`Sessions::reap`] has work.
    pub fn notify_fd(&self) -> Arc<OwnedFd> {
        self.engine.notify_fd()
    }

    /// Opens a session of `service` for `caller`. Errors keep the contract's
    /// precedence: unknown service, access, ring options, the service's own
    /// options, unknown keys, then limits.
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
        self.broker.check_access(caller, service)?;
        let max_message = self.broker.limits().max_message;
        // Everything the session holds is charged to its owner's budget.
        let budget = self.broker.budget_of(caller.uid);
        let opts = Options::new(options, max_message).with_memory(Memory::new(budget.clone()));
        let (capacity, wake) = ring_options(&opts, self.broker.limits().max_capacity)?;
        let handler = svc.open(caller, &opts)?;
        let unused = opts.unused();
        if !unused.is_empty() {
            return Err(BrokerError::InvalidOption(format!(
                "unknown option(s) for service {service:?}: {}",
                unused.join(", ")
            )));
        }
        let cost = session_cost(shmlink_endpoint::rounded_capacity(capacity));
        let id = self.broker.reserve(caller, service, cost)?.id;
        let release_on_err = |broker: &mut Broker, e: BrokerError| {
            broker.release(id);
            e
        };
        let max_message32 = u32::try_from(max_message).unwrap_or(u32::MAX);
        let (mut endpoint, fds) = match self.rings(capacity) {
            Ok(rings) => rings.into_endpoint(max_message32, wake),
            Err(e) => {
                let e = BrokerError::Internal(format!("could not create the rings: {e}"));
                return Err(release_on_err(&mut self.broker, e));
            }
        };
        endpoint.set_budget(budget);
        let state = handler.state_view();
        let traffic = Arc::new(Traffic::default());
        if let Err(e) = self.engine.add_held(id, endpoint, handler, traffic.clone()) {
            let e = BrokerError::Internal(format!("could not start serving the session: {e}"));
            return Err(release_on_err(&mut self.broker, e));
        }
        self.opened.push((id, fds.to_server.capacity));
        Ok(Opened {
            record: SessionRecord {
                id,
                path: self.broker.session_path(id).into(),
                service: service.to_owned(),
                owner: caller.clone(),
                traffic,
                state,
            },
            fds,
            params: reply_parameters(max_message, wake),
        })
    }

    /// What follows the reply to the calls that opened sessions: their
    /// workers are woken (see [`Engine::add_held`]) and the opens logged.
    /// Neither is needed for the reply, so the client does not wait for them.
    pub fn after_reply(&mut self) {
        self.engine.wake_held();
        for (id, capacity) in self.opened.drain(..) {
            if let Some(r) = self.broker.reservation(id) {
                log::info!(
                    "session {id} opened: service {}, owner {} (uid {}, pid {}), capacity {capacity}",
                    r.service,
                    r.owner.bus_name,
                    r.owner.uid,
                    r.owner.pid,
                );
            }
        }
    }

    /// Rings of `capacity` for a new session: those made ahead if they have
    /// that capacity, else new ones. Either way, rings of that capacity are
    /// the next to be made ahead.
    fn rings(&mut self, capacity: u64) -> Result<ServerRings, shmlink_endpoint::Error> {
        let capacity = shmlink_endpoint::rounded_capacity(capacity);
        self.capacity_ahead = Some(capacity);
        match self.rings_ahead.take() {
            Some(rings) if rings.capacity() == capacity => Ok(rings),
            _ => ServerRings::create(capacity),
        }
    }

    /// Makes the next session's rings now, while the D-Bus thread has
    /// nothing else to do, so that the next `OpenSession` of the same
    /// capacity as the last is answered without making them (most of the
    /// broker's work for an open). At most one set is kept: two memfds whose
    /// pages are untouched but for their headers, four eventfds and a socket
    /// pair, all the broker's own until a session takes them; each set serves
    /// one session only.
    pub fn make_rings_ahead(&mut self) {
        let Some(capacity) = self.capacity_ahead else {
            return;
        };
        if self.rings_ahead.is_some() {
            return;
        }
        match ServerRings::create(capacity) {
            Ok(rings) => self.rings_ahead = Some(rings),
            Err(e) => {
                // Tried again after the next open, which makes its own.
                log::debug!("could not make rings ahead: {e}");
                self.capacity_ahead = None;
            }
        }
    }

    /// Ends session `id` for `reason` (see the module docs); `None` if it
    /// had already ended.
    pub fn end_session(&mut self, id: u64, reason: &str) -> Option<EndedSession> {
        if matches!(self.provided.get(&id), Some(Provided::Pending(_))) {
            // Never opened, so never announced: abandoned instead.
            self.abandon_provided(id, reason);
            return None;
        }
        let traffic = self.engine.traffic(id);
        self.engine.remove(id);
        if self.provided.remove(&id).is_some() {
            self.links.remove(id);
        }
        let reservation = self.broker.release(id)?;
        log::info!(
            "session {id} ({}, owner {} uid {}) ended: {reason}; {}",
            reservation.service,
            reservation.owner.bus_name,
            reservation.owner.uid,
            traffic.map(|t| t.summary()).unwrap_or_default()
        );
        Some(EndedSession {
            path: self.broker.session_path(id).into(),
            broker_path: self.broker.names().path().to_owned().into(),
        })
    }

    /// Ends the sessions the engine ended by itself; returns them with their reasons.
    pub fn reap(&mut self) -> Vec<(EndedSession, String)> {
        self.engine
            .take_ended()
            .into_iter()
            .filter_map(|e| Some((self.end_session(e.id, &e.reason)?, e.reason)))
            .collect()
    }

    /// Ends every session `bus_name` owns (its connection left the bus).
    pub fn end_sessions_of(&mut self, bus_name: &str, reason: &str) -> Vec<EndedSession> {
        self.broker
            .sessions_of(bus_name)
            .into_iter()
            .filter_map(|id| self.end_session(id, reason))
            .collect()
    }

    /// Ends every session, then stops the engine's workers.
    pub fn shutdown(&mut self, reason: &str) -> Vec<EndedSession> {
        let ids: Vec<u64> = self.broker.reservations().map(|r| r.id).collect();
        let ended = ids
            .into_iter()
            .filter_map(|id| self.end_session(id, reason))
            .collect();
        self.engine.shutdown();
        ended
    }
}

/// The ring options every service shares: capacity and wake-up mode.
fn ring_options(opts: &Options, max_capacity: u64) -> Result<(u64, Wakeup), BrokerError> {
    let capacity = opts
        .u64(option::CAPACITY)?
        // A client that does not ask gets the default, or the maximum if that is lower.
        .unwrap_or(limits::DEFAULT_CAPACITY.min(max_capacity));
    if !(limits::MIN_CAPACITY..=max_capacity).contains(&capacity) {
        return Err(BrokerError::InvalidCapacity(format!(
            "capacity {capacity} is outside {}..={} bytes",
            limits::MIN_CAPACITY,
            max_capacity
        )));
    }
    Ok((capacity, parse_wakeup(opts)?))
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
            "option {:?} must be {:?} or {:?}, not {:?}",
            option::WAKEUP,
            wakeup::PARK,
            wakeup::SPIN,
            cut(other, LOGGED_STRING)
        ))),
    }
}

/// The `parameters` of an `OpenSession` reply.
fn reply_parameters(max_message: u64, wake: Wakeup) -> PropMap {
    let mut params = PropMap::new();
    params.insert(param::MAX_MESSAGE.into(), prop(max_message));
    let (mode, us) = match wake {
        Wakeup::Park => (wakeup::PARK, 0u32),
        Wakeup::Spin(d) => (wakeup::SPIN, d.as_micros() as u32),
    };
    params.insert(param::WAKEUP.into(), prop(mode.to_owned()));
    params.insert(param::SPIN_US.into(), prop(us));
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin;
    use crate::builtin::tests::caller;
    use dbus::arg::{RefArg, Variant};

    fn sessions(f: impl FnOnce(&mut Config)) -> Sessions {
        let mut config = Config::default();
        config.engine.workers = 1;
        f(&mut config);
        Sessions::start(config, builtin::all()).expect("start")
    }

    fn opts(pairs: Vec<(&str, Box<dyn RefArg>)>) -> PropMap {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Variant(v)))
            .collect()
    }

    /// The refusal's kind and text, as "Kind: text".
    fn refusal(s: &mut Sessions, service: &str, o: PropMap) -> String {
        match s.open(&caller(), service, o) {
            Ok(_) => panic!("expected a refusal"),
            Err(e) => {
                let debug = format!("{e:?}");
                let kind = debug.split('(').next().unwrap_or_default().to_owned();
                format!("{kind}: {e}")
            }
        }
    }

    #[test]
    fn refusals_keep_their_precedence_and_charge_nothing() {
        let mut s = sessions(|c| c.limits.memory_total = 1);
        // Unknown service first, whatever else is wrong.
        let e = refusal(&mut s, "nope", opts(vec![("capacity", Box::new(1u64))]));
        assert!(e.starts_with("UnknownService"), "{e}");
        // Ring options before the service's own options.
        let e = refusal(&mut s, "channel", opts(vec![("capacity", Box::new(1u64))]));
        assert!(e.starts_with("InvalidCapacity"), "{e}");
        let e = refusal(&mut s, "echo", opts(vec![("spin-us", Box::new(5u64))]));
        assert!(e.starts_with("InvalidOption") && e.contains("needs"), "{e}");
        // The service's options before unknown keys.
        let e = refusal(&mut s, "channel", opts(vec![("bogus", Box::new(1u64))]));
        assert!(e.contains("is required"), "{e}");
        let e = refusal(&mut s, "echo", opts(vec![("bogus", Box::new(1u64))]));
        assert!(
            e.contains("unknown option(s) for service \"echo\": bogus"),
            "{e}"
        );
        // Limits last.
        let e = refusal(&mut s, "echo", PropMap::new());
        assert!(
            e.starts_with("LimitExceeded") && e.contains("memory_total"),
            "{e}"
        );
        assert_eq!(s.broker().count(), 0);
    }

    #[test]
    fn open_then_end_once() {
        let mut s = sessions(|_| {});
        let o = opts(vec![
            ("capacity", Box::new(4096u64)),
            ("wakeup", Box::new("spin".to_owned())),
        ]);
        let opened = s.open(&caller(), "echo", o).expect("open");
        let id = opened.record.id;
        assert_eq!(&*opened.record.path, s.broker().session_path(id));
        assert_eq!(
            opened
                .params
                .get(param::WAKEUP)
                .and_then(|v| v.0.as_str().map(str::to_owned)),
            Some("spin".to_owned())
        );
        assert_eq!(s.broker().sessions_of(":1.7"), vec![id]);
        let ended = s.end_session(id, "test").expect("was open");
        assert_eq!(ended.path, opened.record.path);
        assert!(s.end_session(id, "again").is_none(), "an end happens once");
        assert_eq!(s.broker().count(), 0);
        assert!(s.shutdown("bye").is_empty());
    }

    /// The inode of a session's client-to-server memfd: which ring it is.
    fn ring_inode(fds: &PeerFds) -> u64 {
        rustix::fs::fstat(&fds.to_server.memfd)
            .expect("fstat")
            .st_ino
    }

    #[test]
    fn rings_made_ahead_serve_the_next_open_of_that_capacity_once() {
        let mut s = sessions(|_| {});
        let cap = |c: u64| opts(vec![("capacity", Box::new(c))]);
        let first = s.open(&caller(), "echo", cap(4096)).expect("open");
        assert!(s.rings_ahead.is_none(), "nothing made ahead before an open");
        s.make_rings_ahead();
        let ahead = s.rings_ahead.as_ref().expect("made ahead");
        assert_eq!(ahead.capacity(), first.fds.to_server.capacity);
        let ahead_ino = ring_inode(ahead.client_fds());

        // The next open of that capacity takes them, and they are new rings.
        let second = s.open(&caller(), "echo", cap(4096)).expect("open");
        assert!(s.rings_ahead.is_none(), "taken by the open");
        assert_eq!(ring_inode(&second.fds), ahead_ino);
        assert_ne!(ring_inode(&second.fds), ring_inode(&first.fds));

        // Made again, but of another capacity than the next open asks for:
        // dropped, and that open gets rings of its own capacity.
        s.make_rings_ahead();
        let third = s.open(&caller(), "echo", cap(16384)).expect("open");
        assert_ne!(third.fds.to_server.capacity, second.fds.to_server.capacity);
        assert!(s.rings_ahead.is_none());
        for id in [first.record.id, second.record.id, third.record.id] {
            s.end_session(id, "test").expect("was open");
        }
    }

    #[test]
    fn a_hang_up_reported_by_the_engine_ends_the_session() {
        let mut s = sessions(|_| {});
        let opened = s.open(&caller(), "echo", PropMap::new()).expect("open");
        s.after_reply();
        drop(opened.fds);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let ended = loop {
            let ended = s.reap();
            if !ended.is_empty() || std::time::Instant::now() > deadline {
                break ended;
            }
            let notify = s.notify_fd();
            let _ = shmlink_endpoint::sys::poll_readable(
                &[std::os::fd::AsFd::as_fd(&*notify)],
                Some(deadline),
            );
        };
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].1, "client hung up");
        assert_eq!(s.broker().count(), 0);
    }

    fn provided(s: &mut Sessions) {
        let provider = Caller {
            bus_name: ":1.99".into(),
            uid: 0,
            pid: 1,
            gids: vec![],
        };
        s.broker_mut()
            .register(&provider, "remote", "/p".into(), false)
            .expect("register");
    }

    fn wait_for_links(s: &mut Sessions) -> Vec<(EndedSession, String)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ended = s.reap_links();
            if !ended.is_empty() || std::time::Instant::now() > deadline {
                return ended;
            }
            let fd = s.links_fd();
            let _ = shmlink_endpoint::sys::poll_readable(
                &[std::os::fd::AsFd::as_fd(&*fd)],
                Some(deadline),
            );
        }
    }

    #[test]
    fn a_provided_session_is_pending_until_accepted_and_abandoning_releases_it() {
        let mut s = sessions(|_| {});
        provided(&mut s);
        assert_eq!(
            s.service_names(),
            ["channel", "echo", "remote", "sink", "source"]
        );
        let o = opts(vec![
            ("capacity", Box::new(4096u64)),
            ("flavour", Box::new("mild".to_owned())),
        ]);
        let open = s.open_provided(&caller(), "remote", o).expect("open");
        let id = open.record.id;
        assert_eq!(
            open.options.keys().collect::<Vec<_>>(),
            ["flavour"],
            "the ring options stay with the broker"
        );
        assert_eq!(open.registration.provider.bus_name, ":1.99");
        assert_eq!(
            open.client.to_server.capacity,
            open.provider.to_server.capacity
        );
        assert!(!s.is_open(id) && s.open_count() == 0, "pending");
        assert!(s.broker().memory_total() > 0, "charged while pending");
        let link = open.provider_link;
        s.abandon_provided(id, "refused");
        assert_eq!(s.broker().count(), 0);
        assert_eq!(s.broker().memory_total(), 0);
        assert_eq!(
            shmlink_endpoint::sys::hangup_state(std::os::fd::AsFd::as_fd(&link)).expect("state"),
            shmlink_endpoint::sys::HangupState::Closed,
            "the provider sees the link close"
        );
        assert!(
            s.accept_provided(id).is_err(),
            "an abandoned session cannot be accepted late"
        );
        // Refusals before the reservation charge nothing.
        let e = s
            .open_provided(
                &caller(),
                "remote",
                opts(vec![("capacity", Box::new(1u64))]),
            )
            .err()
            .expect("refused");
        assert!(matches!(e, BrokerError::InvalidCapacity(_)), "{e:?}");
        assert!(matches!(
            s.open_provided(&caller(), "nope", PropMap::new()).err(),
            Some(BrokerError::UnknownService(_))
        ));
        assert_eq!(s.broker().count(), 0);
    }

    #[test]
    fn an_accepted_session_ends_when_the_provider_closes_its_link_and_once() {
        let mut s = sessions(|_| {});
        provided(&mut s);
        let open = s
            .open_provided(&caller(), "remote", PropMap::new())
            .expect("open");
        let id = open.record.id;
        s.accept_provided(id).expect("accept");
        assert!(s.is_open(id) && s.open_count() == 1);
        assert!(s.accept_provided(id).is_err(), "accepted once");
        drop(open.provider_link);
        let ended = wait_for_links(&mut s);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].1, "provider closed the session");
        assert_eq!(ended[0].0.path, open.record.path);
        assert!(s.end_session(id, "again").is_none());
        assert_eq!(s.broker().memory_total(), 0);

        // Ended at the broker: the provider's link end sees it.
        let open = s
            .open_provided(&caller(), "remote", PropMap::new())
            .expect("open");
        s.accept_provided(open.record.id).expect("accept");
        assert!(s
            .end_session(open.record.id, "closed by its owner")
            .is_some());
        assert_eq!(
            shmlink_endpoint::sys::hangup_state(std::os::fd::AsFd::as_fd(&open.provider_link))
                .expect("state"),
            shmlink_endpoint::sys::HangupState::Closed
        );
        assert!(s.reap_links().is_empty());
        // A pending session ended by its owner leaving is abandoned, never announced.
        let open = s
            .open_provided(&caller(), "remote", PropMap::new())
            .expect("open");
        assert!(s.end_sessions_of(":1.7", "owner left the bus").is_empty());
        assert!(!s.broker().contains(open.record.id));
        assert_eq!(s.broker().memory_total(), 0);
    }
}
