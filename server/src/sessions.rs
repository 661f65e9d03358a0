//! The session table: every session of this process is one [`Session`] in
//! one map, from the moment it is admitted until it ends.
//!
//! A session is admitted once, whatever kind of open it is
//! ([`Sessions::open`] for a hosted service, [`Sessions::ask_provider`] for
//! a service a provider process registered, [`Sessions::adopt`] in a
//! provider process for a session a broker hands over), through the same
//! steps: the service, its access rule, the ring options, the service's
//! own options, then the charge ([`Accounting::reserve`]). The charge is
//! the entry's [`Reservation`], which refunds itself when the entry is
//! dropped.
//!
//! Ending a session is removing its entry ([`Sessions::end`]), whatever
//! the cause (`Close`, the owner leaving the bus, the engine reporting a
//! dead or misbehaving peer, the provider closing its link, shutdown). An
//! open that fails half-way, a provider's refusal and a client leaving while
//! its provider is asked are the same: the entry (or the half-made one) is
//! dropped. A second end of the same id finds nothing, so an end is
//! announced once.

use crate::accounting::{session_cost, Accounting, Refusal, Registration, Reservation};
use crate::admission::ring_options;
use crate::config::Config;
use crate::engine::{Engine, Traffic, WorkerId};
use crate::links::{BrokerEnds, Links, WatchedEnds};
use crate::log_bounds::{cut, Lines, LOGGED_ERROR, LOGGED_STRING};
use crate::service::{Caller, Memory, Options, Service, SessionHandler, StateView};
use dbus::arg::PropMap;
use shmlink_endpoint::sys::Selector;
use shmlink_endpoint::{Endpoint, PeerFds, PeerLimits, ServerRings};
use shmlink_interfaces::{option, AcceptSession, ParametersError, SessionParameters};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

/// What is known of a session for its whole life and readable without
/// waiting for the worker that serves it: the D-Bus side shares it as the
/// session object's data.
pub(crate) struct SessionInfo {
    /// Session id (at a broker, the last component of its object path).
    pub id: u64,
    /// The service.
    pub service: String,
    /// Who opened it.
    pub owner: Caller,
    /// Counts the pump keeps.
    pub traffic: Arc<Traffic>,
    /// The service's state, if it publishes one.
    pub state: Option<Arc<dyn StateView>>,
}

/// One session: what is known of it, where it is in its life, and its charge.
struct Session {
    info: Arc<SessionInfo>,
    stage: Stage,
    /// Refunded when the session is dropped.
    reservation: Reservation,
}

/// Where a session is in its life.
enum Stage {
    /// Served by a worker of this process.
    Served(WorkerId),
    /// Handed to its provider, which has not answered yet: the broker's ends
    /// of the link and of both hang-up sockets, and what the client gets if
    /// the provider accepts.
    Asking {
        ends: BrokerEnds,
        client: PeerFds,
        parameters: SessionParameters,
        /// Whether the client passed its socket (`OpenSessionVia`): it is
        /// the broker's end of the client's hang-up socket, and the client's
        /// rings go over it on acceptance.
        via: bool,
    },
    /// Served by its provider; the broker's ends of the link and of both
    /// hang-up sockets are watched, and close when the session is dropped.
    Provided(WatchedEnds),
}

impl Session {
    fn is_open(&self) -> bool {
        !matches!(self.stage, Stage::Asking { .. })
    }
}

/// How a client gets its half of a session.
pub(crate) enum Handed {
    /// In the reply (`OpenSession`): the rings and the client's end of the
    /// hang-up socket.
    Reply(PeerFds),
    /// Sent already over the socket the client passed (`OpenSessionVia`),
    /// whose other end the client keeps: the reply gives the rings'
    /// capacities (to-server, to-client).
    Sent([u64; 2]),
}

/// A hosted session just opened: its info, the client's half and the
/// reply's parameters.
pub(crate) struct Opened {
    /// The session.
    pub info: Arc<SessionInfo>,
    /// The client's half.
    pub handed: Handed,
    /// The `parameters` of the reply.
    pub parameters: SessionParameters,
}

/// A session of a provided service, admitted and waiting for its provider:
/// what to hand the provider.
pub(crate) struct Handover {
    /// The session.
    pub info: Arc<SessionInfo>,
    /// Who provides the service, and where.
    pub registration: Registration,
    /// The provider's half of the rings and the hang-up socket.
    pub fds: PeerFds,
    /// The provider's end of the link.
    pub link: OwnedFd,
    /// The client's options without the ring options: the provider's to judge.
    pub options: PropMap,
    /// The session's parameters.
    pub parameters: SessionParameters,
}

/// A session that ended: its info, and whether it had opened (only those
/// are announced; one that ended while its provider was asked never was).
pub(crate) struct Ended {
    /// The session.
    pub info: Arc<SessionInfo>,
    /// Why it ended.
    pub reason: String,
    /// Whether it had opened.
    pub was_open: bool,
}

/// Every session of this process, the hosted services, the accounting and
/// the engine that serves the hosted sessions.
pub(crate) struct Sessions {
    services: BTreeMap<String, Arc<dyn Service>>,
    accounting: Accounting,
    engine: Engine,
    table: BTreeMap<u64, Session>,
    next_id: u64,
    /// The broker's ends of the provided sessions' links and hang-up sockets.
    links: Links,
    /// The next session's rings, made ahead while the D-Bus thread was idle
    /// (see [`Sessions::make_rings_ahead`]).
    rings_ahead: Option<ServerRings>,
    /// The capacity the last session asked for: the rings to make ahead.
    capacity_ahead: Option<u64>,
    /// Sessions opened whose workers are not woken and whose opening is
    /// not logged yet (see [`Sessions::after_reply`]).
    opened: Vec<u64>,
    /// The per-uid rate limit of the lines saying a session opened or
    /// ended, or a service was registered or withdrawn.
    successes: Lines,
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
            accounting: Accounting::new(config),
            engine,
            table: BTreeMap::new(),
            next_id: 1,
            links: Links::new()?,
            rings_ahead: None,
            capacity_ahead: None,
            opened: Vec::new(),
            successes: Lines::successes(),
        })
    }

    /// The accounting (limits, rules, registrations), to read.
    pub fn accounting(&self) -> &Accounting {
        &self.accounting
    }

    /// Whether `service` is hosted here.
    pub fn is_hosted(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    /// Names of the hosted services.
    pub fn hosted_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// Names of the services `OpenSession` accepts: hosted and registered, sorted.
    pub fn service_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .services
            .keys()
            .cloned()
            .chain(self.accounting.registrations().map(|r| r.service.clone()))
            .collect();
        names.sort();
        names
    }

    /// Makes `provider` the provider of `service`, taking sessions at
    /// `object`; returns the provider it took the name over from (by a
    /// stronger claim), whose open sessions go on.
    pub fn register(
        &mut self,
        provider: &Caller,
        service: &str,
        object: &str,
    ) -> Result<Option<Caller>, Refusal> {
        let hosted = self.is_hosted(service);
        Ok(self
            .accounting
            .register(provider, service, object, hosted)?
            .map(|displaced| displaced.provider))
    }

    /// Whether a line about a success caused by `uid` (a service registered
    /// or withdrawn) may be written now, within the per-uid rate limit that
    /// also bounds the lines about sessions opening and ending.
    pub fn admit_success_line(&mut self, uid: u32) -> bool {
        self.successes.admit(uid, Instant::now())
    }

    /// Withdraws `service`, registered by the connection `bus_name`.
    pub fn unregister(&mut self, bus_name: &str, service: &str) -> Result<(), Refusal> {
        self.accounting.unregister(bus_name, service)
    }

    /// Number of engine worker threads.
    pub fn worker_count(&self) -> usize {
        self.engine.worker_count()
    }

    /// The eventfd that becomes readable when [`Sessions::reap`] has work.
    pub fn notify_fd(&self) -> Arc<OwnedFd> {
        self.engine.notify_fd()
    }

    /// The epoll fd of the provided sessions' links and hang-up sockets:
    /// readable when [`Sessions::reap_links`] has work.
    pub fn links_fd(&self) -> Arc<Selector> {
        self.links.fd()
    }

    /// Whether session `id` is open (admitted and, if provided, accepted).
    pub fn is_open(&self, id: u64) -> bool {
        self.table.get(&id).is_some_and(Session::is_open)
    }

    /// Number of open sessions.
    pub fn open_count(&self) -> usize {
        self.table.values().filter(|s| s.is_open()).count()
    }

    /// Number of sessions in the table, open or asking their provider.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// The open sessions, by id.
    pub fn open_sessions(&self) -> impl Iterator<Item = &SessionInfo> {
        self.table
            .values()
            .filter(|s| s.is_open())
            .map(|s| &*s.info)
    }

    /// Checks that the connection `sender` (with credentials `caller`, if
    /// known) may act on open session `id`: its owner, or root.
    pub fn authorize(
        &self,
        id: u64,
        caller: Option<&Caller>,
        sender: &str,
    ) -> Result<&SessionInfo, Refusal> {
        let s = self
            .table
            .get(&id)
            .filter(|s| s.is_open())
            .ok_or(Refusal::UnknownSession(id))?;
        let root = caller.is_some_and(|c| c.uid == 0);
        if s.info.owner.bus_name != sender && !root {
            return Err(Refusal::NotOwner {
                id,
                owner: s.info.owner.bus_name.clone(),
                caller: sender.to_owned(),
            });
        }
        Ok(&s.info)
    }

    /// Opens a session of the hosted `service` for `caller`; its rings go
    /// over `via` if the client passed a socket, else in the reply. Errors
    /// keep the contract's precedence: the socket, unknown service, access,
    /// ring options, the service's own options, unknown keys, then limits.
    pub fn open(
        &mut self,
        caller: &Caller,
        service: &str,
        options: PropMap,
        via: Option<OwnedFd>,
    ) -> Result<Opened, Refusal> {
        check_via(via.as_ref())?;
        let svc = self.hosted(service)?;
        self.accounting.check_access(caller, service)?;
        let max_message = self.accounting.limits().max_message;
        // Everything the session holds is charged to its owner's budget.
        let budget = self.accounting.budget_of(caller.uid);
        let opts = Options::new(options, max_message).with_memory(Memory::new(budget));
        let ring = ring_options(&opts, self.accounting.limits().max_capacity)?;
        let handler = open_handler(&*svc, caller, &opts)?;
        let reservation = self
            .accounting
            .reserve(caller, session_cost(ring.capacity, ring.capacity))?;
        let parameters = SessionParameters {
            max_message,
            wakeup: ring.wakeup,
        };
        let rings = self
            .rings(ring.capacity)
            .map_err(|e| Refusal::Internal(format!("could not create the rings: {e}")))?;
        let max = max_message_u32(max_message);
        let (endpoint, handed) = match via {
            None => {
                let (endpoint, fds) = rings.into_endpoint(max, ring.wakeup);
                (endpoint, Handed::Reply(fds))
            }
            Some(socket) => {
                let capacity = rings.capacity();
                let endpoint = rings
                    .into_endpoint_over(socket, max, ring.wakeup)
                    .map_err(|e| Refusal::InvalidArgs(e.to_string()))?;
                (endpoint, Handed::Sent([capacity, capacity]))
            }
        };
        let id = self.serve(caller, service, reservation, endpoint, handler, None)?;
        self.opened.push(id);
        Ok(Opened {
            info: self.table[&id].info.clone(),
            handed,
            parameters,
        })
    }

    /// Admits a session of the provided `service` for `caller` and makes its
    /// fds; it waits for its provider until [`Sessions::accept_handed`] or
    /// [`Sessions::end`]. Errors keep the hosted precedence (unknown
    /// service, access, ring options, limits); the provider judges its own
    /// options. With `via`, the socket the client passed, the client's rings
    /// go over it on acceptance, and it is the broker's end of the client's
    /// hang-up socket.
    pub fn ask_provider(
        &mut self,
        caller: &Caller,
        service: &str,
        mut options: PropMap,
        via: Option<OwnedFd>,
    ) -> Result<Handover, Refusal> {
        check_via(via.as_ref())?;
        let registration = self
            .accounting
            .registration(service)
            .cloned()
            .ok_or_else(|| Refusal::UnknownService(service.into()))?;
        self.accounting.check_access(caller, service)?;
        let max_message = self.accounting.limits().max_message;
        let ring: PropMap = [option::CAPACITY, option::WAKEUP, option::SPIN_US]
            .into_iter()
            .filter_map(|k| options.remove_entry(k))
            .collect();
        let ring = ring_options(
            &Options::new(ring, max_message),
            self.accounting.limits().max_capacity,
        )?;
        let reservation = self
            .accounting
            .reserve(caller, session_cost(ring.capacity, ring.capacity))?;
        let mut fds = shmlink_endpoint::create_unmapped(ring.capacity)
            .map_err(|e| Refusal::Internal(format!("could not create the rings: {e}")))?;
        // The client keeps the other end of its socket: it is the broker's
        // end of the client's hang-up socket, in place of the pair made here.
        let via = via
            .map(|socket| fds.broker_client_hangup = socket)
            .is_some();
        let parameters = SessionParameters {
            max_message,
            wakeup: ring.wakeup,
        };
        let info = self.new_info(caller, service, None);
        let id = info.id;
        log::debug!(
            "session {id} of provided service {service} for {} (uid {}): asking {}",
            caller.bus_name,
            caller.uid,
            registration.provider.bus_name
        );
        self.table.insert(
            id,
            Session {
                info: info.clone(),
                stage: Stage::Asking {
                    ends: BrokerEnds {
                        link: fds.broker_link,
                        client_hangup: fds.broker_client_hangup,
                        provider_hangup: fds.broker_provider_hangup,
                    },
                    client: fds.client,
                    parameters,
                    via,
                },
                reservation,
            },
        );
        Ok(Handover {
            info,
            registration,
            fds: fds.provider,
            link: fds.provider_link,
            options,
            parameters,
        })
    }

    /// The provider accepted session `id`: it is open from now on, the
    /// broker's ends of its link and hang-up sockets watched; returns the
    /// client's half (sent over its socket already if it passed one) and
    /// the reply's parameters. Fails (and ends the session) if it is not
    /// waiting for its provider any more, its ends cannot be watched, or
    /// its rings cannot be sent.
    pub fn accept_handed(
        &mut self,
        id: u64,
    ) -> Result<(Arc<SessionInfo>, Handed, SessionParameters), Refusal> {
        let (info, ends, client, parameters, via, reservation) = match self.table.remove(&id) {
            Some(Session {
                info,
                stage:
                    Stage::Asking {
                        ends,
                        client,
                        parameters,
                        via,
                    },
                reservation,
            }) => (info, ends, client, parameters, via, reservation),
            Some(open) => {
                self.table.insert(id, open);
                return Err(Refusal::UnknownSession(id));
            }
            None => return Err(Refusal::UnknownSession(id)),
        };
        // On a failure the parts just taken out drop: the charge is
        // refunded and every fd closes, which the provider sees.
        let handed = if via {
            let (rings, _unused) = client.split();
            shmlink_endpoint::send_rings(ends.client_hangup.as_fd(), &rings)
                .map_err(|e| Refusal::InvalidArgs(e.to_string()))?;
            Handed::Sent([rings.to_server.capacity, rings.to_client.capacity])
        } else {
            Handed::Reply(client)
        };
        let watched = self.links.watch(id, ends).map_err(|e| {
            Refusal::Internal(format!(
                "could not watch the session's link and hang-up sockets: {e}"
            ))
        })?;
        self.table.insert(
            id,
            Session {
                info,
                stage: Stage::Provided(watched),
                reservation,
            },
        );
        let session = &self.table[&id];
        let info = &session.info;
        if self.successes.admit(info.owner.uid, Instant::now()) {
            log::info!(
                "session {id} opened: provided service {}, owner {} (uid {}, pid {}), cost {}",
                info.service,
                info.owner.bus_name,
                info.owner.uid,
                info.owner.pid,
                session.reservation.cost()
            );
        }
        Ok((info.clone(), handed, parameters))
    }

    /// Takes over the server's side of a session a broker hands to this
    /// provider process: the broker's checks made again (service, access,
    /// parameters, options, the fds against this process's limits), then
    /// its engine serves it. Nothing stays behind on a refusal.
    pub fn adopt(&mut self, a: AcceptSession) -> Result<u64, Refusal> {
        let svc = self.hosted(&a.service)?;
        self.accounting.check_access(&a.caller, &a.service)?;
        let own_max = self.accounting.limits().max_message;
        let parameters =
            SessionParameters::from_dict(&a.parameters, own_max).map_err(|e| match e {
                ParametersError::MaxMessageAbove { max, limit } => Refusal::LimitExceeded(format!(
                    "max-message {max} is above this provider's limit of {limit}"
                )),
                e => Refusal::InvalidOption(format!("AcceptSession parameters: {e}")),
            })?;
        let max_message = max_message_u32(parameters.max_message);
        let budget = self.accounting.budget_of(a.caller.uid);
        let opts = Options::new(a.options, parameters.max_message).with_memory(Memory::new(budget));
        let handler = open_handler(&*svc, &a.caller, &opts)?;
        let (to_server, to_client) = (a.fds.to_server.capacity, a.fds.to_client.capacity);
        let limits = PeerLimits {
            max_capacity: self.accounting.limits().max_capacity,
            max_message,
        };
        // Checked before anything is charged or mapped: a capacity beyond
        // the limit is refused here, whatever the memfd holds.
        let endpoint = Endpoint::open_server(
            a.fds,
            a.link.as_fd(),
            max_message,
            parameters.wakeup,
            limits,
        )
        .map_err(|e| match e {
            shmlink_endpoint::Error::OverLimit { .. } => {
                Refusal::LimitExceeded(format!("this provider's limit: {e}"))
            }
            e => Refusal::Internal(format!("the session's fds are unusable: {e}")),
        })?;
        let reservation = self
            .accounting
            .reserve(&a.caller, session_cost(to_server, to_client))?;
        let id = self.serve(
            &a.caller,
            &a.service,
            reservation,
            endpoint,
            handler,
            Some(a.link),
        )?;
        if self.successes.admit(a.caller.uid, Instant::now()) {
            log::info!(
            "session {} accepted: service {}, client {} (uid {}, pid {}), capacity {to_server}/{to_client}",
            cut(&a.session, LOGGED_STRING),
            a.service,
            a.caller.bus_name,
            a.caller.uid,
            a.caller.pid
        );
        }
        Ok(id)
    }

    /// The hosted service `service`.
    fn hosted(&self, service: &str) -> Result<Arc<dyn Service>, Refusal> {
        self.services
            .get(service)
            .cloned()
            .ok_or_else(|| Refusal::UnknownService(service.into()))
    }

    /// What is known of a new session of `service` for `caller`, with a
    /// fresh id (ids are never reused).
    fn new_info(
        &mut self,
        caller: &Caller,
        service: &str,
        state: Option<Arc<dyn StateView>>,
    ) -> Arc<SessionInfo> {
        let id = self.next_id;
        self.next_id += 1;
        Arc::new(SessionInfo {
            id,
            service: service.to_owned(),
            owner: caller.clone(),
            traffic: Arc::new(Traffic::default()),
            state,
        })
    }

    /// Enters a session served by this process's engine; with a `link`, its
    /// worker is woken at once, else at [`Sessions::after_reply`].
    fn serve(
        &mut self,
        caller: &Caller,
        service: &str,
        reservation: Reservation,
        mut endpoint: Endpoint,
        handler: Box<dyn SessionHandler>,
        link: Option<OwnedFd>,
    ) -> Result<u64, Refusal> {
        let budget = reservation.budget().clone();
        endpoint.set_budget(budget.clone());
        let memory = Memory::new(budget);
        let info = self.new_info(caller, service, handler.state_view());
        let id = info.id;
        let traffic = info.traffic.clone();
        let worker = match link {
            Some(link) => self
                .engine
                .add_linked(id, endpoint, handler, traffic, memory, link),
            None => self.engine.add_held(id, endpoint, handler, traffic, memory),
        };
        let worker = worker
            .map_err(|e| Refusal::Internal(format!("could not start serving the session: {e}")))?;
        self.table.insert(
            id,
            Session {
                info,
                stage: Stage::Served(worker),
                reservation,
            },
        );
        Ok(id)
    }

    /// What follows the reply to the calls that opened sessions: their
    /// workers are woken (see [`Engine::add_held`]) and the opens logged.
    /// Neither is needed for the reply, so the client does not wait for them.
    pub fn after_reply(&mut self) {
        self.engine.wake_held();
        let now = Instant::now();
        self.successes.sweep(now);
        for id in self.opened.drain(..) {
            if let Some(s) = self.table.get(&id) {
                let o = &s.info.owner;
                if !self.successes.admit(o.uid, now) {
                    continue;
                }
                log::info!(
                    "session {id} opened: service {}, owner {} (uid {}, pid {}), cost {}",
                    s.info.service,
                    o.bus_name,
                    o.uid,
                    o.pid,
                    s.reservation.cost()
                );
            }
        }
    }

    /// Rings of `capacity` for a new session: those made ahead if they have
    /// that capacity, else new ones. Either way, rings of that capacity are
    /// the next to be made ahead.
    fn rings(&mut self, capacity: u64) -> Result<ServerRings, shmlink_endpoint::Error> {
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

    /// Ends session `id` for `reason`: removes its entry, which refunds its
    /// charge and closes what it holds (the engine drops its pump; the
    /// broker's ends of a provided session's link and hang-up sockets close,
    /// which its provider and its client see). `None` if it had already
    /// ended.
    pub fn end(&mut self, id: u64, reason: &str) -> Option<Ended> {
        self.remove_entry(id, reason, false)
    }

    /// [`Sessions::end`], told whether the worker serving the session ended
    /// it itself (and dropped its pump already: nothing is sent back).
    fn remove_entry(&mut self, id: u64, reason: &str, worker_ended_it: bool) -> Option<Ended> {
        let session = self.table.remove(&id)?;
        let info = session.info.clone();
        let was_open = session.is_open();
        match session.stage {
            Stage::Served(worker) => {
                if !worker_ended_it {
                    self.engine.remove(id, worker);
                }
            }
            // Dropping the ends (with the entry) closes them.
            Stage::Provided(_) | Stage::Asking { .. } => {}
        }
        let o = &info.owner;
        let logged = self.successes.admit(o.uid, Instant::now());
        if logged && was_open {
            log::info!(
                "session {id} ({}, owner {} uid {}) ended: {reason}; {}",
                info.service,
                o.bus_name,
                o.uid,
                info.traffic.summary()
            );
        } else if logged {
            log::info!(
                "session {id} of provided service {} for {} (uid {}) not opened: {}",
                info.service,
                o.bus_name,
                o.uid,
                cut(reason, LOGGED_ERROR)
            );
        }
        drop(session.reservation);
        self.accounting.forget_unused();
        Some(Ended {
            info,
            reason: reason.to_owned(),
            was_open,
        })
    }

    /// Ends the sessions the engine's workers ended by themselves.
    pub fn reap(&mut self) -> Vec<Ended> {
        self.engine
            .take_ended()
            .into_iter()
            .filter_map(|e| self.remove_entry(e.id, &e.reason, true))
            .collect()
    }

    /// Ends the provided sessions whose provider closed (or wrote to) its
    /// link or its hang-up socket, or whose client closed (or wrote to) its
    /// hang-up socket: whatever the provider does, a session ends at the
    /// broker when its client goes away.
    pub fn reap_links(&mut self) -> Vec<Ended> {
        self.links
            .ready()
            .into_iter()
            .filter_map(|id| match &self.table.get(&id)?.stage {
                Stage::Provided(ends) => Some((id, ends.ended()?)),
                _ => None,
            })
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|(id, reason)| self.end(id, reason))
            .collect()
    }

    /// The connection `bus_name` left the bus: its registrations end
    /// (their names are returned) and so does every session it owns.
    pub fn connection_left(&mut self, bus_name: &str, reason: &str) -> (Vec<Ended>, Vec<String>) {
        let withdrawn = self.accounting.unregister_all(bus_name);
        let owned: Vec<u64> = self
            .table
            .values()
            .filter(|s| s.info.owner.bus_name == bus_name)
            .map(|s| s.info.id)
            .collect();
        let ended = owned
            .into_iter()
            .filter_map(|id| self.end(id, reason))
            .collect();
        (ended, withdrawn)
    }

    /// Ends every session, then stops the engine's workers.
    pub fn shutdown(&mut self, reason: &str) -> Vec<Ended> {
        let ids: Vec<u64> = self.table.keys().copied().collect();
        let ended = ids
            .into_iter()
            .filter_map(|id| self.end(id, reason))
            .collect();
        self.engine.shutdown();
        self.successes.flush();
        ended
    }
}

/// The hosted service's handler for a session with `opts`; keys the
/// service did not read are refused.
fn open_handler(
    svc: &dyn Service,
    caller: &Caller,
    opts: &Options,
) -> Result<Box<dyn SessionHandler>, Refusal> {
    let handler = svc.open(caller, opts)?;
    let unused = opts.unused();
    if !unused.is_empty() {
        return Err(Refusal::InvalidOption(format!(
            "unknown option(s) for service {:?}: {}",
            svc.name(),
            unused.join(", ")
        )));
    }
    Ok(handler)
}

/// The largest message as the rings' framing counts it.
fn max_message_u32(max_message: u64) -> u32 {
    u32::try_from(max_message).unwrap_or(u32::MAX)
}

/// Refuses a socket passed to `OpenSessionVia` that is not a connected
/// `AF_UNIX` stream socket, before anything is admitted.
fn check_via(via: Option<&OwnedFd>) -> Result<(), Refusal> {
    match via {
        Some(socket) => shmlink_endpoint::check_via_socket(socket.as_fd())
            .map_err(|e| Refusal::InvalidArgs(e.to_string())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    impl Handed {
        /// The client's half handed in the reply.
        fn into_reply(self) -> PeerFds {
            match self {
                Handed::Reply(fds) => fds,
                Handed::Sent(_) => panic!("the rings went over a socket"),
            }
        }
    }

    impl Opened {
        /// The client's half handed in the reply.
        fn reply_fds(&self) -> &PeerFds {
            match &self.handed {
                Handed::Reply(fds) => fds,
                Handed::Sent(_) => panic!("the rings went over a socket"),
            }
        }
    }

    use super::*;
    use crate::builtin;
    use crate::builtin::tests::caller;
    use dbus::arg::{RefArg, Variant};
    use shmlink_endpoint::sys::{self, HangupState};
    use std::time::{Duration, Instant};

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
        match s.open(&caller(), service, o, None) {
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
        assert!(
            e.contains("capacity 1 is not between 64 and "),
            "words a C or Python user reads, not a Rust range: {e}"
        );
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
        assert_eq!(s.len(), 0);
        assert_eq!(s.accounting.memory_total(), 0);
    }

    #[test]
    fn open_then_end_once_and_the_entry_refunds_its_charge() {
        let mut s = sessions(|_| {});
        let o = opts(vec![
            ("capacity", Box::new(4096u64)),
            ("wakeup", Box::new("spin".to_owned())),
        ]);
        let opened = s.open(&caller(), "echo", o, None).expect("open");
        let id = opened.info.id;
        assert!(matches!(
            opened.parameters.wakeup,
            shmlink_interfaces::Wakeup::Spin(_)
        ));
        assert!(s.is_open(id) && s.open_count() == 1);
        assert_eq!(
            s.accounting.memory_of(caller().uid),
            {
                let rounded = shmlink_endpoint::rounded_capacity(4096);
                session_cost(rounded, rounded)
            },
            "charged the rounded rings and the overhead"
        );
        let ended = s.end(id, "test").expect("was open");
        assert!(ended.was_open);
        assert_eq!(ended.info.id, id);
        assert!(s.end(id, "again").is_none(), "an end happens once");
        assert_eq!(s.len(), 0);
        assert_eq!(s.accounting.memory_total(), 0, "refunded by the drop");
        assert!(s.shutdown("bye").is_empty());
    }

    #[test]
    fn only_the_owner_or_root_may_act_on_a_session() {
        let mut s = sessions(|_| {});
        let owner = caller();
        let id = s
            .open(&owner, "echo", PropMap::new(), None)
            .expect("open")
            .info
            .id;
        assert_eq!(
            s.authorize(id, Some(&owner), &owner.bus_name)
                .expect("owner")
                .id,
            id
        );
        let root = Caller {
            bus_name: ":1.9".into(),
            uid: 0,
            pid: 1,
            gids: vec![],
        };
        s.authorize(id, Some(&root), ":1.9").expect("root");
        let other = Caller {
            bus_name: ":1.2".into(),
            ..owner.clone()
        };
        assert!(matches!(
            s.authorize(id, Some(&other), ":1.2"),
            Err(Refusal::NotOwner { owner, .. }) if owner == caller().bus_name
        ));
        assert!(matches!(
            s.authorize(id, None, ":1.3"),
            Err(Refusal::NotOwner { .. })
        ));
        assert!(matches!(
            s.authorize(id + 1, Some(&owner), &owner.bus_name),
            Err(Refusal::UnknownSession(_))
        ));
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
        let first = s.open(&caller(), "echo", cap(4096), None).expect("open");
        assert!(s.rings_ahead.is_none(), "nothing made ahead before an open");
        s.make_rings_ahead();
        let ahead = s.rings_ahead.as_ref().expect("made ahead");
        assert_eq!(ahead.capacity(), first.reply_fds().to_server.capacity);
        let ahead_ino = ring_inode(ahead.client_fds());

        // The next open of that capacity takes them, and they are new rings.
        let second = s.open(&caller(), "echo", cap(4096), None).expect("open");
        assert!(s.rings_ahead.is_none(), "taken by the open");
        assert_eq!(ring_inode(second.reply_fds()), ahead_ino);
        assert_ne!(
            ring_inode(second.reply_fds()),
            ring_inode(first.reply_fds())
        );

        // Made again, but of another capacity than the next open asks for:
        // dropped, and that open gets rings of its own capacity.
        s.make_rings_ahead();
        let third = s.open(&caller(), "echo", cap(16384), None).expect("open");
        assert_ne!(
            third.reply_fds().to_server.capacity,
            second.reply_fds().to_server.capacity
        );
        assert!(s.rings_ahead.is_none());
        for id in [first.info.id, second.info.id, third.info.id] {
            s.end(id, "test").expect("was open");
        }
    }

    /// Polls `fd` until `take` returns something, or 10 s pass.
    fn wait_for<F: AsFd>(
        s: &mut Sessions,
        fd: fn(&Sessions) -> Arc<F>,
        take: fn(&mut Sessions) -> Vec<Ended>,
    ) -> Vec<Ended> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ended = take(s);
            if !ended.is_empty() || Instant::now() > deadline {
                return ended;
            }
            let fd = fd(s);
            let _ = sys::poll_readable(&[fd.as_fd()], Some(deadline));
        }
    }

    #[test]
    fn a_hang_up_reported_by_the_engine_ends_the_session() {
        let mut s = sessions(|_| {});
        let opened = s
            .open(&caller(), "echo", PropMap::new(), None)
            .expect("open");
        s.after_reply();
        drop(opened.handed);
        let ended = wait_for(&mut s, Sessions::notify_fd, Sessions::reap);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].reason, "client hung up");
        assert!(ended[0].was_open);
        assert_eq!(
            s.engine.removes_posted(),
            0,
            "the worker dropped the session itself: nothing is sent back"
        );
        assert_eq!(s.len(), 0);
        assert_eq!(s.accounting.memory_total(), 0);
    }

    fn provided(s: &mut Sessions) {
        let provider = Caller {
            bus_name: ":1.99".into(),
            uid: 0,
            pid: 1,
            gids: vec![],
        };
        s.register(&provider, "remote", "/p").expect("register");
    }

    #[test]
    fn a_provided_session_waits_for_its_provider_and_ending_it_refunds_it() {
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
        let h = s.ask_provider(&caller(), "remote", o, None).expect("open");
        let id = h.info.id;
        assert_eq!(
            h.options.keys().collect::<Vec<_>>(),
            ["flavour"],
            "the ring options stay with the broker"
        );
        assert_eq!(h.registration.provider.bus_name, ":1.99");
        assert_eq!(h.registration.object, "/p");
        assert!(!s.is_open(id) && s.open_count() == 0, "waiting");
        assert!(s.accounting.memory_total() > 0, "charged while waiting");
        let link = h.link;
        let ended = s.end(id, "refused").expect("was waiting");
        assert!(!ended.was_open, "never announced");
        assert_eq!(s.len(), 0);
        assert_eq!(s.accounting.memory_total(), 0);
        assert_eq!(
            sys::hangup_state(link.as_fd()).expect("state"),
            HangupState::Closed,
            "the provider sees the link close"
        );
        assert!(
            s.accept_handed(id).is_err(),
            "an ended session cannot be accepted late"
        );
        // Refusals before the reservation charge nothing.
        let e = s
            .ask_provider(
                &caller(),
                "remote",
                opts(vec![("capacity", Box::new(1u64))]),
                None,
            )
            .err()
            .expect("refused");
        assert!(matches!(e, Refusal::InvalidCapacity(_)), "{e:?}");
        assert!(matches!(
            s.ask_provider(&caller(), "nope", PropMap::new(), None)
                .err(),
            Some(Refusal::UnknownService(_))
        ));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn rings_go_over_the_socket_a_client_passes_hosted_or_provided() {
        let mut s = sessions(|_| {});
        let (mine, theirs) = sys::socketpair().expect("pair");
        let opened = s
            .open(&caller(), "echo", PropMap::new(), Some(theirs))
            .expect("open");
        let Handed::Sent(capacities) = opened.handed else {
            panic!("the rings went in the reply");
        };
        let rings = shmlink_endpoint::receive_rings(mine.as_fd(), capacities).expect("rings");
        assert_eq!(rings.to_server.capacity, capacities[0]);
        // A socket that is no stream socket is refused before anything is admitted.
        let (dgram, _other) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .expect("dgram");
        let e = s
            .open(&caller(), "echo", PropMap::new(), Some(dgram))
            .err()
            .expect("refused");
        assert!(
            matches!(e, Refusal::InvalidArgs(ref m) if m.contains("SOCK_STREAM")),
            "{e:?}"
        );
        assert_eq!(s.open_count(), 1);

        provided(&mut s);
        let (mine, theirs) = sys::socketpair().expect("pair");
        let h = s
            .ask_provider(&caller(), "remote", PropMap::new(), Some(theirs))
            .expect("ask");
        assert_eq!(
            sys::hangup_state(mine.as_fd()).expect("state"),
            sys::HangupState::Open,
            "nothing sent before the provider accepts"
        );
        let (_, handed, _) = s.accept_handed(h.info.id).expect("accept");
        let Handed::Sent(capacities) = handed else {
            panic!("the rings went in the reply");
        };
        shmlink_endpoint::receive_rings(mine.as_fd(), capacities).expect("the client's rings");
    }

    #[test]
    fn an_accepted_session_ends_when_the_provider_closes_its_link_and_once() {
        let mut s = sessions(|_| {});
        provided(&mut s);
        let h = s
            .ask_provider(&caller(), "remote", PropMap::new(), None)
            .expect("open");
        let id = h.info.id;
        let (info, client, _) = s.accept_handed(id).expect("accept");
        assert_eq!(info.id, id);
        let Handed::Reply(client) = client else {
            panic!("no socket was passed");
        };
        assert_eq!(client.to_server.capacity, h.fds.to_server.capacity);
        assert!(s.is_open(id) && s.open_count() == 1);
        assert!(s.accept_handed(id).is_err(), "accepted once");
        drop(h.link);
        let ended = wait_for(&mut s, Sessions::links_fd, Sessions::reap_links);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].reason, "provider closed the session");
        assert_eq!(ended[0].info.id, id);
        assert!(s.end(id, "again").is_none());
        assert_eq!(s.accounting.memory_total(), 0);

        // Ended at the broker: the provider's link end sees it.
        let h = s
            .ask_provider(&caller(), "remote", PropMap::new(), None)
            .expect("open");
        s.accept_handed(h.info.id).expect("accept");
        assert!(s.end(h.info.id, "closed by its owner").is_some());
        assert_eq!(
            sys::hangup_state(h.link.as_fd()).expect("state"),
            HangupState::Closed
        );
        assert!(s.reap_links().is_empty());
        // A waiting session whose owner leaves ends unannounced; so do the
        // registrations of a provider that leaves.
        let h = s
            .ask_provider(&caller(), "remote", PropMap::new(), None)
            .expect("open");
        let (ended, withdrawn) = s.connection_left(&caller().bus_name, "owner left the bus");
        assert!(ended.iter().all(|e| !e.was_open) && ended.len() == 1);
        assert!(withdrawn.is_empty());
        assert!(!s.is_open(h.info.id) && s.len() == 0);
        assert_eq!(s.accounting.memory_total(), 0);
        let (_, withdrawn) = s.connection_left(":1.99", "provider left the bus");
        assert_eq!(withdrawn, ["remote"]);
    }

    #[test]
    fn a_provided_session_ends_when_its_client_goes_away_whatever_the_provider_does() {
        let mut s = sessions(|c| c.limits.sessions_per_connection = 2);
        provided(&mut s);
        // More opens than the connection may hold at once: each ends when
        // its client drops its fds, while the provider keeps all of its own.
        let mut kept = Vec::new();
        for round in 0..5 {
            let h = s
                .ask_provider(&caller(), "remote", PropMap::new(), None)
                .unwrap_or_else(|e| panic!("open {round}: {e}"));
            let id = h.info.id;
            let client = s.accept_handed(id).expect("accept").1.into_reply();
            assert!(s.accounting.memory_total() > 0, "charged");
            drop(client);
            let ended = wait_for(&mut s, Sessions::links_fd, Sessions::reap_links);
            assert_eq!(ended.len(), 1, "round {round}");
            assert_eq!(ended[0].info.id, id);
            assert_eq!(ended[0].reason, "client hung up");
            assert!(ended[0].was_open);
            assert_eq!(s.len(), 0);
            assert_eq!(s.accounting.memory_total(), 0, "refunded");
            for fd in [&h.fds.hangup, &h.link] {
                assert_eq!(
                    sys::hangup_state(fd.as_fd()).expect("state"),
                    HangupState::Closed,
                    "the provider sees the end on its hang-up and its link"
                );
            }
            kept.push(h);
        }

        // A client that writes to its hang-up socket ends its session once;
        // its bytes, never read, do not keep the selector ready.
        let h = s
            .ask_provider(&caller(), "remote", PropMap::new(), None)
            .expect("open");
        let client = s.accept_handed(h.info.id).expect("accept").1.into_reply();
        rustix::io::write(&client.hangup, b"x").expect("write");
        let ended = wait_for(&mut s, Sessions::links_fd, Sessions::reap_links);
        assert_eq!(ended.len(), 1);
        assert_eq!(
            ended[0].reason,
            "client misbehaved: the other side wrote to the hang-up socket"
        );
        assert_eq!(s.accounting.memory_total(), 0);
        assert!(
            !sys::poll_readable(&[s.links_fd().as_fd()], Some(Instant::now())).expect("poll")[0]
                .readable,
            "nothing is reported again"
        );
        assert!(s.reap_links().is_empty());
        assert_eq!(
            sys::hangup_state(client.hangup.as_fd()).expect("state"),
            HangupState::Closed,
            "the client sees the end"
        );

        // The provider closing its hang-up socket alone ends the session
        // too: the client sees the end as it did with no broker between.
        let h = s
            .ask_provider(&caller(), "remote", PropMap::new(), None)
            .expect("open");
        let client = s.accept_handed(h.info.id).expect("accept").1.into_reply();
        drop(h.fds.hangup);
        let ended = wait_for(&mut s, Sessions::links_fd, Sessions::reap_links);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].reason, "provider closed the session");
        assert_eq!(
            sys::hangup_state(client.hangup.as_fd()).expect("state"),
            HangupState::Closed
        );
        assert_eq!(
            sys::hangup_state(h.link.as_fd()).expect("state"),
            HangupState::Closed
        );
    }
}
