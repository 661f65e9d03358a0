//! The accounting: what each uid's sessions cost, the limits and access
//! rules that bound them, and who provides which service. It knows nothing
//! of rings, threads or the bus: no bus names beyond the connection a
//! caller is known by, no object paths. [`Sessions`](crate::sessions::Sessions)
//! asks it before creating anything.
//!
//! Memory is kept in [`Account`]s: one per uid and one for the whole process,
//! with atomic try-charge and release, so a session's fixed cost (its rings
//! and overhead, charged by [`Accounting::reserve`]) and the workers' message
//! buffers (charged before they are allocated, through a [`UserBudget`]) draw
//! on the same limits without waiting for each other.
//!
//! A [`Reservation`] is a session's charge: its bytes and its place in the
//! session counts (per connection and per uid). It refunds all of it when it
//! is dropped, so a session that ends, or fails half-way through opening,
//! gives everything back by being dropped.

use crate::config::{valid_service_name, Claim, Config, Limits, Providers};
use crate::log_bounds::{cut, LOGGED_STRING};
use shmlink_interfaces::Caller;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// What a session costs besides its rings and message buffers: its pump,
/// handler, service state, D-Bus object, epoll entries and fds. Measured at
/// 4 to 5 KiB per idle session (rings excluded); charged with a margin.
pub(crate) const SESSION_OVERHEAD: u64 = 16 << 10;

/// The bytes one session is charged when it opens: both rings' memfds (the
/// usable bytes of each plus shmem-ipc's header) and its fixed overhead.
pub(crate) fn session_cost(to_server: u64, to_client: u64) -> u64 {
    to_server
        .saturating_add(to_client)
        .saturating_add(2 * shmlink_interfaces::RING_HEADER)
        .saturating_add(SESSION_OVERHEAD)
}

/// A memory account with a limit: one uid's, or the process's total. The
/// uid's also counts its sessions.
#[derive(Debug)]
pub(crate) struct Account {
    /// The limit's configuration name, e.g. `memory_per_user`.
    limit_name: &'static str,
    /// Whose account, e.g. `uid 1000`, for messages.
    holder: String,
    limit: u64,
    used: AtomicU64,
    /// Sessions reserved on this account (a uid's; unused for the total).
    sessions: AtomicU32,
}

impl Account {
    fn new(limit_name: &'static str, holder: String, limit: u64) -> Self {
        Account {
            limit_name,
            holder,
            limit,
            used: AtomicU64::new(0),
            sessions: AtomicU32::new(0),
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

/// One uid's memory: its own account and the process's total, charged
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

/// Why a call was refused; each maps to one error name of the contract.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// No such service.
    #[error("no service named {0:?}; see the Services property")]
    UnknownService(String),
    /// Bad option.
    #[error("{0}")]
    InvalidOption(String),
    /// A bad argument other than an option (the socket of `OpenSessionVia`).
    #[error("{0}")]
    InvalidArgs(String),
    /// Bad capacity.
    #[error("{0}")]
    InvalidCapacity(String),
    /// A limit would be exceeded; the text names it.
    #[error("{0}")]
    LimitExceeded(String),
    /// Not allowed.
    #[error("{0}")]
    AccessDenied(String),
    /// No such session (by id; the D-Bus side names its path).
    #[error("no session {0}")]
    UnknownSession(u64),
    /// The caller is neither the session's owner nor root.
    #[error("session {id} belongs to {owner}, not to {caller}")]
    NotOwner {
        /// The session.
        id: u64,
        /// Its owner's connection.
        owner: String,
        /// The connection that asked.
        caller: String,
    },
    /// A built-in service or another registration has the name.
    #[error("{0}")]
    NameTaken(String),
    /// Our own failure.
    #[error("{0}")]
    Internal(String),
}

/// A session's charge: its cost on its owner's budget and its place in
/// the session counts of its owner's connection and uid. Dropping it
/// refunds all three.
#[derive(Debug)]
pub(crate) struct Reservation {
    /// Bytes charged (both rings and the fixed overhead).
    cost: u64,
    /// The owner's budget the cost was charged to (its uid's account
    /// counts the session).
    budget: Arc<UserBudget>,
    /// The owner connection's session count.
    connection: Arc<AtomicU32>,
}

impl Reservation {
    /// Bytes charged.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// The owner's budget, for the buffers its session's worker holds.
    pub fn budget(&self) -> &Arc<UserBudget> {
        &self.budget
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.cost);
        self.budget.user.sessions.fetch_sub(1, Ordering::Relaxed);
        self.connection.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A service a provider process registered.
#[derive(Clone, Debug)]
pub(crate) struct Registration {
    /// The name clients open.
    pub service: String,
    /// The provider's connection and credentials.
    pub provider: Caller,
    /// Where the provider takes its sessions (an object path on the bus;
    /// opaque here).
    pub object: String,
    /// How strong the provider's claim to the name is.
    pub claim: Claim,
}

/// The limits, the charges per connection, per uid and in total, the access
/// rules and the registrations.
pub(crate) struct Accounting {
    config: Config,
    /// Session counts by connection; kept while a reservation refers to one.
    per_connection: HashMap<String, Arc<AtomicU32>>,
    /// Memory accounts by uid; kept while a reservation or a buffer uses one.
    accounts: HashMap<u32, Arc<Account>>,
    total: Arc<Account>,
    /// Registered services by name.
    registrations: BTreeMap<String, Registration>,
    /// Registrations per uid.
    registered_by: HashMap<u32, u32>,
    /// The process's own uid, which may always register.
    own_uid: u32,
}

impl Accounting {
    /// Empty books enforcing `config`'s limits and access rules.
    pub fn new(config: Config) -> Self {
        Accounting {
            per_connection: HashMap::new(),
            accounts: HashMap::new(),
            total: Arc::new(Account::new(
                "memory_total",
                "the daemon".into(),
                config.limits.memory_total,
            )),
            registrations: BTreeMap::new(),
            registered_by: HashMap::new(),
            own_uid: shmlink_endpoint::sys::effective_uid(),
            config,
        }
    }

    /// Makes `provider` the provider of `service`, taking sessions at
    /// `object`; returns the registration it took the name over from, if
    /// any. Refused (in this order) if the name is malformed, the object
    /// path is longer than `MAX_OBJECT_PATH`, the caller
    /// may not register it (root and the process's own uid always may;
    /// others as `[providers.allow]` says), the name is hosted by the broker
    /// (`hosted`) or registered already by a claim at least as strong (see
    /// [`Claim`]), or the caller's uid holds `registrations_per_user` names.
    pub fn register(
        &mut self,
        provider: &Caller,
        service: &str,
        object: &str,
        hosted: bool,
    ) -> Result<Option<Registration>, Refusal> {
        if !valid_service_name(service) {
            return Err(Refusal::InvalidOption(format!(
                "service name {:?} is not 1 to {} ASCII letters, digits, '.', '-' or '_'",
                cut(service, LOGGED_STRING),
                shmlink_interfaces::limits::MAX_SERVICE_NAME
            )));
        }
        if object.len() > shmlink_interfaces::limits::MAX_OBJECT_PATH {
            return Err(Refusal::InvalidOption(format!(
                "object path {:?} is longer than {} bytes",
                cut(object, LOGGED_STRING),
                shmlink_interfaces::limits::MAX_OBJECT_PATH
            )));
        }
        let p = &self.config.providers;
        let privileged = provider.uid == 0 || provider.uid == self.own_uid;
        let claim = if privileged {
            Some(Claim::Privileged)
        } else {
            p.claim(provider.uid, &provider.gids, service)
        };
        let Some(claim) = claim else {
            return Err(Refusal::AccessDenied(format!(
                "uid {} may not register service {service:?} (see [providers.allow] in the \
                 daemon's configuration)",
                provider.uid
            )));
        };
        if hosted {
            return Err(Refusal::NameTaken(format!(
                "{service:?} is a service built into the broker"
            )));
        }
        if let Some(r) = self.registrations.get(service) {
            if r.claim >= claim {
                return Err(Refusal::NameTaken(format!(
                    "{service:?} is registered by {}",
                    r.provider.bus_name
                )));
            }
        }
        let held = self.registered_by.get(&provider.uid).copied().unwrap_or(0);
        if held >= p.registrations_per_user {
            return Err(Refusal::LimitExceeded(format!(
                "registrations_per_user: uid {} already provides {held} services (limit {})",
                provider.uid, p.registrations_per_user
            )));
        }
        let displaced = self.drop_registration(service);
        *self.registered_by.entry(provider.uid).or_default() += 1;
        self.registrations.insert(
            service.to_owned(),
            Registration {
                service: service.to_owned(),
                provider: provider.clone(),
                object: object.to_owned(),
                claim,
            },
        );
        Ok(displaced)
    }

    /// Ends the registration of `service` by the connection `bus_name`.
    pub fn unregister(&mut self, bus_name: &str, service: &str) -> Result<(), Refusal> {
        match self.registrations.get(service) {
            Some(r) if r.provider.bus_name == bus_name => {
                self.drop_registration(service);
                Ok(())
            }
            _ => Err(Refusal::UnknownService(format!(
                "{} (not registered by {bus_name})",
                cut(service, LOGGED_STRING)
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

    fn drop_registration(&mut self, service: &str) -> Option<Registration> {
        let r = self.registrations.remove(service)?;
        if let Some(n) = self.registered_by.get_mut(&r.provider.uid) {
            *n -= 1;
            if *n == 0 {
                self.registered_by.remove(&r.provider.uid);
            }
        }
        Some(r)
    }

    /// The registration of `service`, if a provider offers it.
    pub fn registration(&self, service: &str) -> Option<&Registration> {
        self.registrations.get(service)
    }

    /// Every registration, by name.
    pub fn registrations(&self) -> impl Iterator<Item = &Registration> {
        self.registrations.values()
    }

    /// The process's own uid.
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
    pub fn providers(&self) -> &Providers {
        &self.config.providers
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// Checks the configured access rule of `service` for `caller`.
    pub fn check_access(&self, caller: &Caller, service: &str) -> Result<(), Refusal> {
        match self.config.services.get(service) {
            Some(access) if !access.allows(caller.uid, &caller.gids) => {
                Err(Refusal::AccessDenied(format!(
                    "uid {} may not use service {service:?} (see the daemon's configuration)",
                    caller.uid
                )))
            }
            _ => Ok(()),
        }
    }

    /// Charges a new session costing `cost` bytes to `caller`, or says which
    /// limit it would pass; nothing is charged then. The charge is refunded
    /// when the returned reservation is dropped.
    pub fn reserve(&mut self, caller: &Caller, cost: u64) -> Result<Reservation, Refusal> {
        self.forget_unused();
        let l = &self.config.limits;
        let connection = self
            .per_connection
            .entry(caller.bus_name.clone())
            .or_default()
            .clone();
        let conn = connection.load(Ordering::Relaxed);
        if conn >= l.sessions_per_connection {
            return Err(Refusal::LimitExceeded(format!(
                "sessions_per_connection: this connection already has {conn} sessions (limit {})",
                l.sessions_per_connection
            )));
        }
        let limit = l.sessions_per_user;
        let budget = self.budget_of(caller.uid);
        let sessions = budget.user.sessions.load(Ordering::Relaxed);
        if sessions >= limit {
            return Err(Refusal::LimitExceeded(format!(
                "sessions_per_user: uid {} already has {sessions} sessions (limit {limit})",
                caller.uid
            )));
        }
        budget.try_charge(cost).map_err(Refusal::LimitExceeded)?;
        budget.user.sessions.fetch_add(1, Ordering::Relaxed);
        connection.fetch_add(1, Ordering::Relaxed);
        Ok(Reservation {
            cost,
            budget,
            connection,
        })
    }

    /// Forgets the accounts and connection counts nothing refers to any
    /// more (their reservations and buffers were all dropped).
    pub fn forget_unused(&mut self) {
        self.accounts.retain(|_, a| Arc::strong_count(a) > 1);
        self.per_connection.retain(|_, c| Arc::strong_count(c) > 1);
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

    fn broker(f: impl FnOnce(&mut Limits)) -> Accounting {
        let mut config = Config::default();
        f(&mut config.limits);
        Accounting::new(config)
    }

    fn limit_name(e: Refusal) -> String {
        match e {
            Refusal::LimitExceeded(m) => m.split(':').next().unwrap_or_default().to_owned(),
            other => panic!("expected a limit, got {other:?}"),
        }
    }

    #[test]
    fn charges_add_up_and_dropping_a_reservation_refunds_it() {
        let mut b = broker(|_| {});
        let a = caller(":1.1", 1000);
        let first = b.reserve(&a, 100).expect("reserve");
        let second = b.reserve(&a, 50).expect("reserve");
        assert_eq!(b.memory_total(), 150);
        assert_eq!(b.memory_of(1000), 150);
        assert_eq!(first.cost(), 100);
        drop(first);
        assert_eq!(b.memory_total(), 50);
        drop(second);
        assert_eq!(b.memory_total(), 0);
        b.forget_unused();
        assert!(b.accounts.is_empty() && b.per_connection.is_empty());
    }

    #[test]
    fn sessions_per_connection() {
        let mut b = broker(|l| l.sessions_per_connection = 2);
        let mut held = Vec::new();
        let a = caller(":1.1", 1000);
        let id = b.reserve(&a, 1).expect("1");
        held.push(b.reserve(&a, 1).expect("2"));
        assert_eq!(
            limit_name(b.reserve(&a, 1).unwrap_err()),
            "sessions_per_connection"
        );
        held.push(
            b.reserve(&caller(":1.2", 1000), 1)
                .expect("another connection of the same user"),
        );
        drop(id);
        held.push(b.reserve(&a, 1).expect("release made room"));
    }

    #[test]
    fn sessions_per_user() {
        let mut b = broker(|l| l.sessions_per_user = 2);
        let mut held = Vec::new();
        let id = b.reserve(&caller(":1.1", 1000), 1).expect("1");
        held.push(b.reserve(&caller(":1.2", 1000), 1).expect("2"));
        assert_eq!(
            limit_name(b.reserve(&caller(":1.3", 1000), 1).unwrap_err()),
            "sessions_per_user"
        );
        held.push(b.reserve(&caller(":1.3", 1001), 1).expect("another user"));
        drop(id);
        held.push(
            b.reserve(&caller(":1.3", 1000), 1)
                .expect("release made room"),
        );
    }

    #[test]
    fn memory_per_user_and_total() {
        let mut b = broker(|l| {
            l.memory_per_user = 100;
            l.memory_total = 150;
        });
        let mut held = Vec::new();
        let id = b.reserve(&caller(":1.1", 1000), 60).expect("60");
        assert_eq!(
            limit_name(b.reserve(&caller(":1.1", 1000), 41).unwrap_err()),
            "memory_per_user"
        );
        held.push(
            b.reserve(&caller(":1.1", 1000), 40)
                .expect("exactly the limit"),
        );
        assert_eq!(
            limit_name(b.reserve(&caller(":1.2", 1001), 51).unwrap_err()),
            "memory_total"
        );
        held.push(
            b.reserve(&caller(":1.2", 1001), 50)
                .expect("exactly the total"),
        );
        drop(id);
        held.push(
            b.reserve(&caller(":1.2", 1001), 50)
                .expect("release refunded the total"),
        );
        assert_eq!(b.memory_total(), 140);
    }

    #[test]
    fn a_refused_reservation_charges_nothing() {
        let mut b = broker(|l| l.memory_total = 10);
        let mut held = Vec::new();
        let a = caller(":1.1", 1000);
        held.push(b.reserve(&a, 11).unwrap_err());
        b.forget_unused();
        assert!(b.accounts.is_empty() && b.per_connection.is_empty());
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
            limit_name(b.reserve(&a, 31).unwrap_err()),
            "memory_per_user",
            "the buffer counts against a new session"
        );
        let id = b.reserve(&a, 30).expect("what is left");
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
        drop(id);
        assert_eq!(b.memory_of(1000), 70, "the buffer is still held");
        budget.release(70);
        assert_eq!((b.memory_of(1000), b.memory_total()), (0, 0));
    }

    #[test]
    fn accounts_nothing_refers_to_are_forgotten() {
        let mut b = broker(|_| {});
        let a = caller(":1.1", 1000);
        let held = b.budget_of(1000);
        let id = b.reserve(&a, 10).expect("reserve");
        drop(id);
        assert!(
            b.accounts.contains_key(&1000),
            "a worker still holds the budget"
        );
        drop(held);
        b.budget_of(1001);
        drop(b.reserve(&caller(":1.2", 1002), 1).expect("reserve"));
        b.forget_unused();
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
        let b = Accounting::new(config);
        b.check_access(&caller(":1.1", 1000), "sink")
            .expect("listed user");
        b.check_access(&caller(":1.1", 0), "sink")
            .expect("root always");
        let mut grouped = caller(":1.1", 2000);
        grouped.gids = vec![7, 50];
        b.check_access(&grouped, "sink").expect("listed group");
        let err = b.check_access(&caller(":1.1", 2000), "sink").unwrap_err();
        assert!(
            matches!(&err, Refusal::AccessDenied(m) if m.contains("may not use service \"sink\"")),
            "{err:?}"
        );
        b.check_access(&caller(":1.1", 2000), "echo")
            .expect("a service without rules is open to all");
    }

    fn registering(f: impl FnOnce(&mut crate::config::Providers)) -> Accounting {
        let mut config = Config::default();
        f(&mut config.providers);
        let mut b = Accounting::new(config);
        // Tests run as any uid; pretend the daemon's is one no caller has.
        b.own_uid = 4242;
        b
    }

    fn path(p: &str) -> &str {
        p
    }

    fn kind(e: Refusal) -> String {
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
            matches!(&e, Refusal::AccessDenied(m) if m.contains("may not register service \"sensor.a\"")),
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
        assert_eq!(
            (r.provider.bus_name.as_str(), r.object.as_str()),
            (":1.1", "/p")
        );
    }

    #[test]
    fn a_stronger_claim_takes_a_name_over_and_a_weaker_or_equal_one_cannot() {
        let mut b = registering(|p| {
            for (pattern, uid) in [("*", 1001), ("sensor.*", 1002), ("sensor.cam", 1003)] {
                p.allow.insert(
                    pattern.into(),
                    ServiceAccess {
                        allow_users: vec![uid],
                        allow_groups: vec![],
                    },
                );
            }
        });
        let squatter = caller(":1.1", 1001);
        assert!(b
            .register(&squatter, "sensor.cam", path("/p"), false)
            .expect("free")
            .is_none());
        // A longer prefix, then the name itself, then root: each takes it over.
        let stronger = [
            (caller(":1.2", 1002), ":1.1"),
            (caller(":1.3", 1003), ":1.2"),
            (caller(":1.4", 0), ":1.3"),
        ];
        for (who, held_by) in stronger {
            let displaced = b
                .register(&who, "sensor.cam", path("/p"), false)
                .expect("a stronger claim")
                .expect("someone held it");
            assert_eq!(displaced.provider.bus_name, held_by);
        }
        // Nobody weaker or equal takes it back.
        for who in [squatter, caller(":1.3", 1003), caller(":1.5", 0)] {
            let e = b
                .register(&who, "sensor.cam", path("/p"), false)
                .unwrap_err();
            assert_eq!(kind(e), "NameTaken", "{}", who.bus_name);
        }
        assert_eq!(
            b.registration("sensor.cam")
                .expect("held")
                .provider
                .bus_name,
            ":1.4"
        );
        // The displaced connection's names and counts are gone with it.
        assert!(b.unregister(":1.1", "sensor.cam").is_err());
        assert_eq!(b.unregister_all(":1.3"), Vec::<String>::new());
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
            matches!(&e, Refusal::NameTaken(m) if m.contains("built into the broker")),
            "{e:?}"
        );
        b.register(&root, "svc", path("/p"), false).expect("free");
        for who in [&root, &caller(":1.2", 0)] {
            let e = b.register(who, "svc", path("/q"), false).unwrap_err();
            assert!(
                matches!(&e, Refusal::NameTaken(m) if m.contains("registered by :1.1")),
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
            matches!(&e, Refusal::LimitExceeded(m) if m.starts_with("registrations_per_user: uid 0 already provides 2")),
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
