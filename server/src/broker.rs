//! The broker's accounting: who owns which session, what it costs, and the
//! limits and access rules that bound both. It knows nothing of rings,
//! threads or the bus; [`Sessions`](crate::sessions::Sessions) asks it before
//! creating anything and tells it when a session ends.
//!
//! Memory is kept in [`Account`]s: one per uid and one for the whole daemon,
//! with atomic try-charge and release, so the books (a session's rings and
//! fixed overhead, charged at [`Broker::reserve`]) and the workers (message
//! buffers, charged before they are allocated, through a [`UserBudget`])
//! draw on the same limits without waiting for each other.
//!
//! The books also hold the services provider processes registered: who
//! provides which name, who may register at all, and how many names a uid holds.

use crate::config::{valid_service_name, Config, Limits};
use crate::names::Names;
use crate::service::{Caller, ServiceError};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a session costs the daemon besides its rings and message buffers:
/// its pump, handler, service state, D-Bus object, epoll entries and fds.
/// Measured at 4 to 5 KiB per idle session (rings excluded); charged with a margin.
pub(crate) const SESSION_OVERHEAD: u64 = 16 << 10;

/// The bytes one session is charged when it opens: both rings' memfds (the
/// usable bytes plus shmem-ipc's 64-byte header each) and its fixed overhead.
pub(crate) fn session_cost(rounded_capacity: u64) -> u64 {
    2 * (rounded_capacity + shmlink_interfaces::RING_HEADER) + SESSION_OVERHEAD
}

/// A memory account with a limit: one uid's, or the daemon's total.
#[derive(Debug)]
pub(crate) struct Account {
    /// The limit's configuration name, e.g. `memory_per_user`.
    limit_name: &'static str,
    /// Whose account, e.g. `uid 1000`, for messages.
    holder: String,
    limit: u64,
    used: AtomicU64,
}

impl Account {
    fn new(limit_name: &'static str, holder: String, limit: u64) -> Self {
        Account {
            limit_name,
            holder,
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Takes `bytes`, or says which limit they would pass; takes nothing then.
    pub fn try_charge(&self, bytes: u64) -> Result<(), String> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let new = used.saturating_add(bytes);
            if new > self.limit {
                return Err(format!(
                    "{}: {} holds {used} bytes (rings and buffers); {bytes} more would pass the limit of {}",
                    self.limit_name, self.holder, self.limit
                ));
            }
            match self
                .used
                .compare_exchange_weak(used, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }

    /// Gives back `bytes` of an earlier charge.
    pub fn release(&self, bytes: u64) {
        let before = self.used.fetch_sub(bytes, Ordering::Relaxed);
        debug_assert!(before >= bytes, "released more than was charged");
    }

    /// Bytes charged now.
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// One uid's memory: its own account and the daemon's total, charged
/// together. Workers charge message buffers through it (it is the
/// endpoint's [`Budget`](shmlink_endpoint::Budget) and backs the services'
/// [`Memory`](crate::Memory)).
#[derive(Debug)]
pub(crate) struct UserBudget {
    user: Arc<Account>,
    total: Arc<Account>,
}

impl UserBudget {
    /// Charges `bytes` to the uid and to the total, or to neither.
    pub fn try_charge(&self, bytes: u64) -> Result<(), String> {
        self.user.try_charge(bytes)?;
        if let Err(e) = self.total.try_charge(bytes) {
            self.user.release(bytes);
            return Err(e);
        }
        Ok(())
    }

    /// Gives back `bytes` to both accounts.
    pub fn release(&self, bytes: u64) {
        self.total.release(bytes);
        self.user.release(bytes);
    }
}

impl shmlink_endpoint::Budget for UserBudget {
    fn try_charge(&self, bytes: usize) -> Result<(), String> {
        UserBudget::try_charge(self, bytes as u64)
    }
    fn release(&self, bytes: usize) {
        UserBudget::release(self, bytes as u64)
    }
}

/// Why `OpenSession`, `Close` or a property read was refused; each maps to
/// one error name of the contract.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BrokerError {
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
    /// A built-in service or another registration has the name.
    #[error("{0}")]
    NameTaken(String),
    /// Our own failure.
    #[error("{0}")]
    Internal(String),
}

impl From<ServiceError> for BrokerError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidOption(m) => BrokerError::InvalidOption(m),
            other => BrokerError::Internal(other.to_string()),
        }
    }
}

/// One session's entry in the books: its owner and what it is charged.
#[derive(Clone, Debug)]
pub(crate) struct Reservation {
    /// Session id (the last component of its object path).
    pub id: u64,
    /// The service it was opened with.
    pub service: String,
    /// Who opened it.
    pub owner: Caller,
    /// Bytes charged when it opened (both rings and the fixed overhead).
    pub cost: u64,
    /// The owner's budget the cost was charged to.
    budget: Arc<UserBudget>,
}

/// A service a provider process registered.
#[derive(Clone, Debug)]
pub(crate) struct Registration {
    /// The name clients open.
    pub service: String,
    /// The provider's connection and credentials.
    pub provider: Caller,
    /// Where the provider exports `org.shmlink.Provider1`.
    pub object: dbus::Path<'static>,
}

#[derive(Default)]
struct Usage {
    sessions: u32,
}

/// The books of open sessions, per connection, per user and in total.
pub(crate) struct Broker {
    config: Config,
    reservations: BTreeMap<u64, Reservation>,
    next_id: u64,
    per_connection: HashMap<String, u32>,
    per_user: HashMap<u32, Usage>,
    /// Memory accounts by uid; kept while a session or a buffer uses one.
    accounts: HashMap<u32, Arc<Account>>,
    total: Arc<Account>,
    /// The broker's names, for its sessions' object paths.
    names: Names,
    /// Registered services by name.
    registrations: BTreeMap<String, Registration>,
    /// Registrations per uid.
    registered_by: HashMap<u32, u32>,
    /// The daemon's own uid, which may always register.
    own_uid: u32,
}

impl Broker {
    /// Empty books enforcing `config`'s limits and access rules.
    pub fn new(config: Config) -> Self {
        Broker {
            reservations: BTreeMap::new(),
            next_id: 1,
            per_connection: HashMap::new(),
            per_user: HashMap::new(),
            accounts: HashMap::new(),
            total: Arc::new(Account::new(
                "memory_total",
                "the daemon".into(),
                config.limits.memory_total,
            )),
            registrations: BTreeMap::new(),
            registered_by: HashMap::new(),
            own_uid: rustix::process::geteuid().as_raw(),
            config,
            names: Names::default(),
        }
    }

    /// Names the sessions' objects after `names` (default: `shmlinkd`'s).
    pub fn set_names(&mut self, names: Names) {
        self.names = names;
    }

    /// The broker's names.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The object path of session `id`.
    pub fn session_path(&self, id: u64) -> String {
        self.names.session_path(id)
    }

    /// Makes `provider` the provider of `service` at `object`. Refused (in
    /// this order) if the name is malformed, the caller may not register it
    /// (root and the daemon's own uid always may; others as
    /// `[providers.allow]` says), the name is built in (`builtin`) or
    /// registered already, or the caller's uid holds
    /// `registrations_per_user` names.
    pub fn register(
        &mut self,
        provider: &Caller,
        service: &str,
        object: dbus::Path<'static>,
        builtin: bool,
    ) -> Result<&Registration, BrokerError> {
        if !valid_service_name(service) {
            return Err(BrokerError::InvalidOption(format!(
                "service name {:?} is not 1 to {} ASCII letters, digits, '.', '-' or '_'",
                crate::logcap::cut(service, crate::logcap::LOGGED_STRING),
                shmlink_interfaces::limits::MAX_SERVICE_NAME
            )));
        }
        let p = &self.config.providers;
        let privileged = provider.uid == 0 || provider.uid == self.own_uid;
        if !privileged && !p.may_register(provider.uid, &provider.gids, service) {
            return Err(BrokerError::AccessDenied(format!(
                "uid {} may not register service {service:?} (see [providers.allow] in the \
                 daemon's configuration)",
                provider.uid
            )));
        }
        if builtin {
            return Err(BrokerError::NameTaken(format!(
                "{service:?} is a service built into the broker"
            )));
        }
        if let Some(r) = self.registrations.get(service) {
            return Err(BrokerError::NameTaken(format!(
                "{service:?} is registered by {}",
                r.provider.bus_name
            )));
        }
        let held = self.registered_by.get(&provider.uid).copied().unwrap_or(0);
        if held >= p.registrations_per_user {
            return Err(BrokerError::LimitExceeded(format!(
                "registrations_per_user: uid {} already provides {held} services (limit {})",
                provider.uid, p.registrations_per_user
            )));
        }
        *self.registered_by.entry(provider.uid).or_default() += 1;
        Ok(self
            .registrations
            .entry(service.to_owned())
            .or_insert(Registration {
                service: service.to_owned(),
                provider: provider.clone(),
                object,
            }))
    }

    /// Ends the registration of `service` by the connection `bus_name`.
    pub fn unregister(&mut self, bus_name: &str, service: &str) -> Result<(), BrokerError> {
        match self.registrations.get(service) {
            Some(r) if r.provider.bus_name == bus_name => {
                self.drop_registration(service);
                Ok(())
            }
            _ => Err(BrokerError::UnknownService(format!(
                "{} (not registered by {bus_name})",
                crate::logcap::cut(service, crate::logcap::LOGGED_STRING)
            ))),
        }
    }

    /// Ends every registration of the connection `bus_name` (it left the
    /// bus); returns the names it held.
    pub fn unregister_all(&mut self, bus_name: &str) -> Vec<String> {
        let names: Vec<String> = self
            .registrations
            .values()
            .filter(|r| r.provider.bus_name == bus_name)
            .map(|r| r.service.clone())
            .collect();
        for name in &names {
            self.drop_registration(name);
        }
        names
    }

    fn drop_registration(&mut self, service: &str) {
        let Some(r) = self.registrations.remove(service) else {
            return;
        };
        if let Some(n) = self.registered_by.get_mut(&r.provider.uid) {
            *n -= 1;
            if *n == 0 {
                self.registered_by.remove(&r.provider.uid);
            }
        }
    }

    /// The registration of `service`, if a provider offers it.
    pub fn registration(&self, service: &str) -> Option<&Registration> {
        self.registrations.get(service)
    }

    /// Every registration, by name.
    pub fn registrations(&self) -> impl Iterator<Item = &Registration> {
        self.registrations.values()
    }

    /// The daemon's own uid.
    pub fn own_uid(&self) -> u32 {
        self.own_uid
    }

    /// The memory budget of `uid` (its account and the total), for the
    /// buffers a worker holds on its sessions' behalf.
    pub fn budget_of(&mut self, uid: u32) -> Arc<UserBudget> {
        let limit = self.config.limits.memory_per_user;
        let user = self
            .accounts
            .entry(uid)
            .or_insert_with(|| {
                Arc::new(Account::new("memory_per_user", format!("uid {uid}"), limit))
            })
            .clone();
        Arc::new(UserBudget {
            user,
            total: self.total.clone(),
        })
    }

    /// Bytes charged to `uid` now (rings, overhead and buffers).
    #[cfg(test)]
    pub fn memory_of(&self, uid: u32) -> u64 {
        self.accounts.get(&uid).map_or(0, |a| a.used())
    }

    /// Bytes charged to all uids together now.
    #[cfg(test)]
    pub fn memory_total(&self) -> u64 {
        self.total.used()
    }

    /// The provider settings in force.
    pub fn providers(&self) -> &crate::config::Providers {
        &self.config.providers
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// Checks the configured access rule of `service` for `caller`.
    pub fn check_access(&self, caller: &Caller, service: &str) -> Result<(), BrokerError> {
        match self.config.services.get(service) {
            Some(access) if !access.allows(caller.uid, &caller.gids) => {
                Err(BrokerError::AccessDenied(format!(
                    "uid {} may not use service {service:?} (see the daemon's configuration)",
                    caller.uid
                )))
            }
            _ => Ok(()),
        }
    }

    /// Charges a new session of `service` costing `cost` ring bytes to
    /// `caller` and allocates its id, or says which limit it would pass.
    /// Nothing is charged when it fails.
    pub fn reserve(
        &mut self,
        caller: &Caller,
        service: &str,
        cost: u64,
    ) -> Result<&Reservation, BrokerError> {
        self.check_limits(caller)?;
        let budget = self.budget_of(caller.uid);
        if let Err(e) = budget.try_charge(cost) {
            drop(budget);
            self.prune_accounts();
            return Err(BrokerError::LimitExceeded(e));
        }
        let id = self.next_id;
        self.next_id += 1;
        *self
            .per_connection
            .entry(caller.bus_name.clone())
            .or_default() += 1;
        self.per_user.entry(caller.uid).or_default().sessions += 1;
        Ok(self.reservations.entry(id).or_insert(Reservation {
            id,
            service: service.to_owned(),
            owner: caller.clone(),
            cost,
            budget,
        }))
    }

    /// Forgets the accounts of uids nothing refers to any more.
    fn prune_accounts(&mut self) {
        self.accounts.retain(|_, a| Arc::strong_count(a) > 1);
    }

    fn check_limits(&self, caller: &Caller) -> Result<(), BrokerError> {
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
        let sessions = self.per_user.get(&caller.uid).map_or(0, |u| u.sessions);
        if sessions >= l.sessions_per_user {
            return Err(BrokerError::LimitExceeded(format!(
                "sessions_per_user: uid {} already has {sessions} sessions (limit {})",
                caller.uid, l.sessions_per_user
            )));
        }
        Ok(())
    }

    /// Takes session `id` off the books and refunds its charges; `None` if
    /// it was not (or no longer) there.
    pub fn release(&mut self, id: u64) -> Option<Reservation> {
        let r = self.reservations.remove(&id)?;
        if let Some(n) = self.per_connection.get_mut(&r.owner.bus_name) {
            *n -= 1;
            if *n == 0 {
                self.per_connection.remove(&r.owner.bus_name);
            }
        }
        if let Some(u) = self.per_user.get_mut(&r.owner.uid) {
            u.sessions -= 1;
            if u.sessions == 0 {
                self.per_user.remove(&r.owner.uid);
            }
        }
        r.budget.release(r.cost);
        self.prune_accounts();
        Some(r)
    }

    /// Checks that the connection `sender` (with credentials `caller`, if
    /// known) may act on session `id`: its owner, or root.
    pub fn authorize(
        &self,
        id: u64,
        caller: Option<&Caller>,
        sender: &str,
    ) -> Result<&Reservation, BrokerError> {
        let r = self
            .reservations
            .get(&id)
            .ok_or_else(|| BrokerError::UnknownSession(self.session_path(id)))?;
        let root = caller.is_some_and(|c| c.uid == 0);
        if r.owner.bus_name != sender && !root {
            return Err(BrokerError::AccessDenied(format!(
                "session {} belongs to {}, not to {sender}",
                self.session_path(id),
                r.owner.bus_name
            )));
        }
        Ok(r)
    }

    /// Whether session `id` is on the books.
    pub fn contains(&self, id: u64) -> bool {
        self.reservations.contains_key(&id)
    }

    /// The reservation of session `id`, if it holds one.
    pub fn reservation(&self, id: u64) -> Option<&Reservation> {
        self.reservations.get(&id)
    }

    /// Every open session, by id.
    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.reservations.values()
    }

    /// Number of open sessions.
    pub fn count(&self) -> usize {
        self.reservations.len()
    }

    /// Ids of the sessions a bus connection owns.
    pub fn sessions_of(&self, bus_name: &str) -> Vec<u64> {
        self.reservations
            .values()
            .filter(|r| r.owner.bus_name == bus_name)
            .map(|r| r.id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServiceAccess;

    fn caller(bus_name: &str, uid: u32) -> Caller {
        Caller {
            bus_name: bus_name.into(),
            uid,
            pid: 1,
            gids: vec![uid + 10_000],
        }
    }

    fn broker(f: impl FnOnce(&mut Limits)) -> Broker {
        let mut config = Config::default();
        f(&mut config.limits);
        Broker::new(config)
    }

    fn limit_name(e: BrokerError) -> String {
        match e {
            BrokerError::LimitExceeded(m) => m.split(':').next().unwrap_or_default().to_owned(),
            other => panic!("expected a limit, got {other:?}"),
        }
    }

    #[test]
    fn ids_are_fresh_and_charges_add_up() {
        let mut b = broker(|_| {});
        let a = caller(":1.1", 1000);
        let first = b.reserve(&a, "echo", 100).expect("reserve").id;
        let second = b.reserve(&a, "sink", 50).expect("reserve").id;
        assert_ne!(first, second);
        assert_eq!(b.count(), 2);
        assert_eq!(b.memory_total(), 150);
        assert_eq!(b.memory_of(1000), 150);
        assert_eq!(b.sessions_of(":1.1"), vec![first, second]);
        assert!(b.sessions_of(":1.2").is_empty());
        let r = b.release(first).expect("was reserved");
        assert_eq!((r.service.as_str(), r.cost), ("echo", 100));
        assert!(b.release(first).is_none(), "release is idempotent");
        assert!(!b.contains(first) && b.contains(second));
        b.release(second).expect("was reserved");
        assert_eq!(b.memory_total(), 0);
        assert!(b.per_user.is_empty() && b.per_connection.is_empty());
        let third = b.reserve(&a, "echo", 1).expect("reserve").id;
        assert!(third > second, "ids are never reused");
    }

    #[test]
    fn sessions_per_connection() {
        let mut b = broker(|l| l.sessions_per_connection = 2);
        let a = caller(":1.1", 1000);
        let id = b.reserve(&a, "echo", 1).expect("1").id;
        b.reserve(&a, "echo", 1).expect("2");
        assert_eq!(
            limit_name(b.reserve(&a, "echo", 1).unwrap_err()),
            "sessions_per_connection"
        );
        b.reserve(&caller(":1.2", 1000), "echo", 1)
            .expect("another connection of the same user");
        b.release(id);
        b.reserve(&a, "echo", 1).expect("release made room");
    }

    #[test]
    fn sessions_per_user() {
        let mut b = broker(|l| l.sessions_per_user = 2);
        let id = b.reserve(&caller(":1.1", 1000), "echo", 1).expect("1").id;
        b.reserve(&caller(":1.2", 1000), "echo", 1).expect("2");
        assert_eq!(
            limit_name(b.reserve(&caller(":1.3", 1000), "echo", 1).unwrap_err()),
            "sessions_per_user"
        );
        b.reserve(&caller(":1.3", 1001), "echo", 1)
            .expect("another user");
        b.release(id);
        b.reserve(&caller(":1.3", 1000), "echo", 1)
            .expect("release made room");
    }

    #[test]
    fn memory_per_user_and_total() {
        let mut b = broker(|l| {
            l.memory_per_user = 100;
            l.memory_total = 150;
        });
        let id = b.reserve(&caller(":1.1", 1000), "echo", 60).expect("60").id;
        assert_eq!(
            limit_name(b.reserve(&caller(":1.1", 1000), "echo", 41).unwrap_err()),
            "memory_per_user"
        );
        b.reserve(&caller(":1.1", 1000), "echo", 40)
            .expect("exactly the limit");
        assert_eq!(
            limit_name(b.reserve(&caller(":1.2", 1001), "echo", 51).unwrap_err()),
            "memory_total"
        );
        b.reserve(&caller(":1.2", 1001), "echo", 50)
            .expect("exactly the total");
        b.release(id);
        b.reserve(&caller(":1.2", 1001), "echo", 50)
            .expect("release refunded the total");
        assert_eq!(b.memory_total(), 140);
    }

    #[test]
    fn a_refused_reservation_charges_nothing() {
        let mut b = broker(|l| l.memory_total = 10);
        let a = caller(":1.1", 1000);
        b.reserve(&a, "echo", 11).unwrap_err();
        assert_eq!(b.count(), 0);
        assert!(b.per_user.is_empty() && b.per_connection.is_empty());
        assert_eq!(b.memory_total(), 0);
    }

    #[test]
    fn an_account_charges_up_to_its_limit_and_names_it() {
        let a = Account::new("memory_per_user", "uid 7".into(), 100);
        a.try_charge(60).expect("60");
        a.try_charge(40).expect("exactly the limit");
        let e = a.try_charge(1).unwrap_err();
        assert!(
            e.starts_with("memory_per_user: uid 7 holds 100 bytes")
                && e.contains("1 more would pass the limit of 100"),
            "{e}"
        );
        assert_eq!(a.used(), 100, "a refused charge takes nothing");
        a.release(100);
        assert_eq!(a.used(), 0);
        assert!(a.try_charge(u64::MAX).is_err(), "no overflow");
    }

    #[test]
    fn concurrent_charges_never_pass_the_limit() {
        let a = Arc::new(Account::new("memory_total", "the daemon".into(), 1000));
        let granted: u64 = (0..4)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || (0..1000).filter(|_| a.try_charge(3).is_ok()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread") as u64)
            .sum();
        assert_eq!(granted, 333, "exactly what fits, whatever the interleaving");
        assert_eq!(a.used(), 999);
    }

    #[test]
    fn workers_and_books_draw_on_the_same_accounts() {
        let mut b = broker(|l| {
            l.memory_per_user = 100;
            l.memory_total = 150;
        });
        let a = caller(":1.1", 1000);
        let budget = b.budget_of(1000);
        budget.try_charge(70).expect("a buffer");
        assert_eq!((b.memory_of(1000), b.memory_total()), (70, 70));
        assert_eq!(
            limit_name(b.reserve(&a, "echo", 31).unwrap_err()),
            "memory_per_user",
            "the buffer counts against a new session"
        );
        let id = b.reserve(&a, "echo", 30).expect("what is left").id;
        // Another uid is bounded by the total, which the first uid's buffers use.
        let other = b.budget_of(1001);
        let e = other.try_charge(51).unwrap_err();
        assert!(
            e.starts_with("memory_total: the daemon holds 100 bytes"),
            "{e}"
        );
        assert_eq!(
            b.memory_of(1001),
            0,
            "a refused total charges the uid nothing"
        );
        other.try_charge(50).expect("exactly the total");
        other.release(50);
        b.release(id);
        assert_eq!(b.memory_of(1000), 70, "the buffer is still held");
        budget.release(70);
        assert_eq!((b.memory_of(1000), b.memory_total()), (0, 0));
    }

    #[test]
    fn accounts_nothing_refers_to_are_forgotten() {
        let mut b = broker(|_| {});
        let a = caller(":1.1", 1000);
        let held = b.budget_of(1000);
        let id = b.reserve(&a, "echo", 10).expect("reserve").id;
        b.release(id);
        assert!(
            b.accounts.contains_key(&1000),
            "a worker still holds the budget"
        );
        drop(held);
        b.budget_of(1001);
        b.reserve(&caller(":1.2", 1002), "echo", 1)
            .expect("reserve");
        assert!(b.release(2).is_some());
        assert!(!b.accounts.contains_key(&1000) && !b.accounts.contains_key(&1001));
    }

    #[test]
    fn access_rules() {
        let mut config = Config::default();
        config.services.insert(
            "sink".into(),
            ServiceAccess {
                allow_users: vec![1000],
                allow_groups: vec![50],
            },
        );
        let b = Broker::new(config);
        b.check_access(&caller(":1.1", 1000), "sink")
            .expect("listed user");
        b.check_access(&caller(":1.1", 0), "sink")
            .expect("root always");
        let mut grouped = caller(":1.1", 2000);
        grouped.gids = vec![7, 50];
        b.check_access(&grouped, "sink").expect("listed group");
        let err = b.check_access(&caller(":1.1", 2000), "sink").unwrap_err();
        assert!(
            matches!(&err, BrokerError::AccessDenied(m) if m.contains("may not use service \"sink\"")),
            "{err:?}"
        );
        b.check_access(&caller(":1.1", 2000), "echo")
            .expect("a service without rules is open to all");
    }

    #[test]
    fn authorize_owner_root_and_others() {
        let mut b = broker(|_| {});
        let owner = caller(":1.1", 1000);
        let id = b.reserve(&owner, "echo", 1).expect("reserve").id;
        assert_eq!(b.authorize(id, Some(&owner), ":1.1").expect("owner").id, id);
        b.authorize(id, Some(&caller(":1.9", 0)), ":1.9")
            .expect("root");
        let other = caller(":1.2", 1000);
        let err = b.authorize(id, Some(&other), ":1.2").unwrap_err();
        assert!(
            matches!(&err, BrokerError::AccessDenied(m) if m.contains("belongs to :1.1")),
            "{err:?}"
        );
        assert!(matches!(
            b.authorize(id, None, ":1.3"),
            Err(BrokerError::AccessDenied(_))
        ));
        assert!(matches!(
            b.authorize(id + 1, Some(&owner), ":1.1"),
            Err(BrokerError::UnknownSession(_))
        ));
    }

    fn registering(f: impl FnOnce(&mut crate::config::Providers)) -> Broker {
        let mut config = Config::default();
        f(&mut config.providers);
        let mut b = Broker::new(config);
        // Tests run as any uid; pretend the daemon's is one no caller has.
        b.own_uid = 4242;
        b
    }

    fn path(p: &str) -> dbus::Path<'static> {
        dbus::Path::new(p.to_owned()).expect("path")
    }

    fn kind(e: BrokerError) -> String {
        format!("{e:?}")
            .split('(')
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn who_may_register() {
        let mut b = registering(|p| {
            p.allow.insert(
                "sensor.*".into(),
                ServiceAccess {
                    allow_users: vec![1000],
                    allow_groups: vec![],
                },
            );
        });
        let e = b
            .register(&caller(":1.1", 1001), "sensor.a", path("/p"), false)
            .unwrap_err();
        assert!(
            matches!(&e, BrokerError::AccessDenied(m) if m.contains("may not register service \"sensor.a\"")),
            "{e:?}"
        );
        let e = b
            .register(&caller(":1.1", 1000), "other", path("/p"), false)
            .unwrap_err();
        assert_eq!(kind(e), "AccessDenied", "outside the allowed pattern");
        b.register(&caller(":1.1", 1000), "sensor.a", path("/p"), false)
            .expect("allowed by the pattern");
        b.register(&caller(":1.2", 0), "anything", path("/p"), false)
            .expect("root may register any free name");
        b.register(&caller(":1.3", 4242), "mine", path("/p"), false)
            .expect("the daemon's own uid too");
        let names: Vec<&str> = b.registrations().map(|r| r.service.as_str()).collect();
        assert_eq!(names, ["anything", "mine", "sensor.a"]);
        let r = b.registration("sensor.a").expect("registered");
        assert_eq!((r.provider.bus_name.as_str(), &*r.object), (":1.1", "/p"));
    }

    #[test]
    fn names_are_checked_and_never_shadowed() {
        let mut b = registering(|_| {});
        let root = caller(":1.1", 0);
        for bad in ["", "a b", "x/y"] {
            let e = b.register(&root, bad, path("/p"), false).unwrap_err();
            assert_eq!(kind(e), "InvalidOption", "{bad:?}");
        }
        let e = b.register(&root, "echo", path("/p"), true).unwrap_err();
        assert!(
            matches!(&e, BrokerError::NameTaken(m) if m.contains("built into the broker")),
            "{e:?}"
        );
        b.register(&root, "svc", path("/p"), false).expect("free");
        for who in [&root, &caller(":1.2", 0)] {
            let e = b.register(who, "svc", path("/q"), false).unwrap_err();
            assert!(
                matches!(&e, BrokerError::NameTaken(m) if m.contains("registered by :1.1")),
                "the same connection twice, or another: {e:?}"
            );
        }
        let e = b
            .register(&caller(":1.3", 1000), "svc", path("/q"), false)
            .unwrap_err();
        assert_eq!(kind(e), "AccessDenied", "access before the name's owner");
    }

    #[test]
    fn registrations_per_user_and_ending_them() {
        let mut b = registering(|p| p.registrations_per_user = 2);
        let a = caller(":1.1", 0);
        b.register(&a, "s1", path("/p"), false).expect("1");
        b.register(&caller(":1.2", 0), "s2", path("/p"), false)
            .expect("2, another connection of the same uid");
        let e = b.register(&a, "s3", path("/p"), false).unwrap_err();
        assert!(
            matches!(&e, BrokerError::LimitExceeded(m) if m.starts_with("registrations_per_user: uid 0 already provides 2")),
            "{e:?}"
        );
        assert_eq!(
            kind(b.unregister(":1.2", "s1").unwrap_err()),
            "UnknownService",
            "only its provider withdraws a name"
        );
        assert_eq!(
            kind(b.unregister(":1.1", "nope").unwrap_err()),
            "UnknownService"
        );
        b.unregister(":1.1", "s1").expect("withdrawn");
        assert!(b.registration("s1").is_none());
        b.register(&a, "s3", path("/p"), false)
            .expect("withdrawing made room");
        assert_eq!(b.unregister_all(":1.1"), vec!["s3".to_owned()]);
        assert_eq!(b.unregister_all(":1.2"), vec!["s2".to_owned()]);
        assert!(b.registered_by.is_empty() && b.registrations.is_empty());
    }
}
