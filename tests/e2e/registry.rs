//! Services offered by provider processes, seen from the broker: who may
//! register which names, the Services property and ListServices, and
//! OpenSession relayed to a provider (a raw one, see
//! `shmlink_tests::raw_provider`) that refuses, never answers, answers
//! wrongly, accepts and closes, or leaves the bus. After every case the
//! client's uid is charged nothing: a session as large as its whole memory
//! limit opens again.

use dbus::blocking::Connection;
use dbus::message::MatchRule;
use shmlink::Session;
use shmlink_interfaces::{error, member, BROKER_INTERFACE, BROKER_PATH, BUS_NAME};
use shmlink_tests::raw_provider::{Behaviour, RawProvider};
use shmlink_tests::{proc_status, wait_until, BusLimits, Harness, DEADLINE};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Each uid may hold 96 KiB: sessions of [`SMALL`] rings (and their
/// messages), or one of [`WHOLE`] rings.
const MEMORY_PER_USER: &str = "98304";
/// A ring capacity whose session costs a quarter of [`MEMORY_PER_USER`]
/// (2 × (4032 + 64) + 16 KiB of overhead).
const SMALL: u64 = 4032;
/// A ring capacity whose session costs all of [`MEMORY_PER_USER`]
/// (2 × (40896 + 64) + 16 KiB).
const WHOLE: u64 = 40896;

fn harness(accept_timeout_ms: u64) -> Harness {
    Harness::with_args(&[
        "--memory-per-user",
        MEMORY_PER_USER,
        "--accept-timeout-ms",
        &accept_timeout_ms.to_string(),
    ])
}

/// Opens `service` with [`SMALL`] rings; the error's name if refused.
fn open(h: &Harness, service: &str) -> Result<Session, (String, String)> {
    h.client()
        .session(service)
        .capacity(SMALL)
        .open()
        .map_err(|e| match e {
            shmlink::Error::Refused { name, message } => (name, message),
            other => (other.to_string(), String::new()),
        })
}

/// The client's uid is charged nothing and no session is open: a session
/// as large as the whole per-uid limit opens (once the broker caught up).
fn nothing_charged(h: &Harness) {
    let client = h.client();
    assert!(
        wait_until(DEADLINE, || {
            client.session("echo").capacity(WHOLE).open().is_ok()
                && client.session_count().ok() == Some(0)
        }),
        "something is still charged or open:\n{}",
        h.daemon_log()
    );
}

fn list_services(h: &Harness) -> Vec<(String, String, u32)> {
    let conn = Connection::new_address(h.address()).expect("connect");
    let (list,): (Vec<(String, String, u32)>,) = conn
        .with_proxy(BUS_NAME, BROKER_PATH, Duration::from_secs(5))
        .method_call(BROKER_INTERFACE, member::LIST_SERVICES, ())
        .expect("ListServices");
    list
}

/// A connection that collects the broker's signals of one member.
struct Signals {
    conn: Connection,
    seen: Arc<Mutex<Vec<dbus::Message>>>,
}

impl Signals {
    fn watch(h: &Harness, interface: &'static str, name: &'static str) -> Signals {
        let conn = Connection::new_address(h.address()).expect("connect");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        conn.add_match(
            MatchRule::new_signal(interface, name).with_path(BROKER_PATH),
            move |_: (), _, msg| {
                s.lock().expect("lock").push(msg.duplicate().expect("copy"));
                true
            },
        )
        .expect("add match");
        Signals { conn, seen }
    }

    /// Waits for a signal `accept` takes; returns it.
    fn wait_for<T>(&self, mut accept: impl FnMut(&dbus::Message) -> Option<T>) -> T {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(found) = self.seen.lock().expect("lock").iter().find_map(&mut accept) {
                return found;
            }
            assert!(Instant::now() < end, "the signal did not come");
            self.conn
                .process(Duration::from_millis(50))
                .expect("process");
        }
    }
}

/// The `Services` value of a `PropertiesChanged` signal, if it carries one.
fn services_in(msg: &dbus::Message) -> Option<Vec<String>> {
    let (iface, changed, _): (String, dbus::arg::PropMap, Vec<String>) = msg.read3().ok()?;
    if iface != BROKER_INTERFACE {
        return None;
    }
    let v = changed.get(member::SERVICES)?;
    let names: Option<Vec<String>> =
        v.0.as_iter()?
            .map(|s| s.as_str().map(str::to_owned))
            .collect();
    names
}

/// The reason of the `SessionClosed` signal of `path`.
fn closed_reason(signals: &Signals, path: &str) -> String {
    signals.wait_for(|m| {
        let (p, reason): (dbus::Path, String) = m.read2().ok()?;
        (&*p == path).then_some(reason)
    })
}

/// The error name and message of an `open` that must be refused.
fn refusal(h: &Harness, service: &str) -> (String, String) {
    open(h, service).err().expect("refused")
}

fn name_of(e: (String, String)) -> String {
    e.0
}

#[test]
fn registering_lists_announces_and_withdraws_a_service() {
    let h = harness(5_000);
    let changes = Signals::watch(&h, "org.freedesktop.DBus.Properties", "PropertiesChanged");
    let p = RawProvider::start(h.address(), Behaviour::Accept);
    p.register("remote.svc").expect("register");
    let announced = changes.wait_for(services_in);
    assert!(
        announced.contains(&"remote.svc".to_owned()),
        "{announced:?}"
    );
    assert!(h
        .client()
        .services()
        .expect("Services")
        .contains(&"remote.svc".into()));
    let list = list_services(&h);
    let uid = rustix::process::geteuid().as_raw();
    assert!(
        list.contains(&("remote.svc".into(), p.name().into(), uid)),
        "{list:?}"
    );
    assert!(
        list.contains(&("echo".into(), String::new(), uid)),
        "built-ins have no provider and the broker's uid: {list:?}"
    );

    // Options are refused, names are checked.
    let with_option = p.call_broker(member::REGISTER_SERVICE, |m| {
        let mut o = dbus::arg::PropMap::new();
        o.insert("x".into(), dbus::arg::Variant(Box::new(1u32)));
        m.append3("other", dbus::Path::from("/p"), o)
    });
    assert_eq!(name_of(with_option.unwrap_err()), error::INVALID_OPTION);
    for bad in ["", "a b", &"x".repeat(256), &"y".repeat(1 << 20)] {
        let e = p.register(bad).unwrap_err();
        assert_eq!(e.0, error::INVALID_OPTION, "{}", &bad[..bad.len().min(9)]);
        assert!(e.1.len() < 1000, "the message is cut: {}", e.1.len());
    }

    changes.seen.lock().expect("lock").clear();
    p.unregister("remote.svc").expect("unregister");
    let announced = changes.wait_for(services_in);
    assert!(
        !announced.contains(&"remote.svc".to_owned()),
        "{announced:?}"
    );
    assert_eq!(
        name_of(p.unregister("remote.svc").unwrap_err()),
        error::UNKNOWN_SERVICE
    );
    assert_eq!(name_of(refusal(&h, "remote.svc")), error::UNKNOWN_SERVICE);
    assert!(!list_services(&h).iter().any(|s| s.0 == "remote.svc"));
    nothing_charged(&h);
}

/// A daemon whose configuration lets uid `nobody` register `nobody.*`.
fn nobody_may_register() -> Harness {
    Harness::with_config(
        BusLimits::Tests,
        "[providers.allow.\"nobody.*\"]\nallow_users = [65534]\n",
    )
}

#[test]
fn only_allowed_uids_register() {
    let h = nobody_may_register();
    let register_as_nobody = |service: &str| {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(shmlink_tests::world_executable(
                &shmlink_tests::hostile::hostile_binary(),
            ))
            .args([h.address(), "register", service])
            .output()
            .expect("run setpriv hostile-client");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let out = register_as_nobody("mine");
    assert!(
        out.starts_with(&format!("ERR {}", error::ACCESS_DENIED)),
        "{out}"
    );
    assert!(out.contains("may not register service \"mine\""), "{out}");
    assert_eq!(
        register_as_nobody("nobody.sensor"),
        "OK",
        "an allowed pattern"
    );
    // The registration ended with the process's connection.
    assert!(wait_until(DEADLINE, || !h
        .client()
        .services()
        .expect("Services")
        .contains(&"nobody.sensor".into())));
}

#[test]
fn a_name_is_never_taken_twice() {
    let h = harness(5_000);
    let a = RawProvider::start(h.address(), Behaviour::Accept);
    let b = RawProvider::start(h.address(), Behaviour::Accept);
    assert_eq!(name_of(a.register("echo").unwrap_err()), error::NAME_TAKEN);
    // Both race for one name: exactly one wins.
    let results = std::thread::scope(|s| {
        let ra = s.spawn(|| a.register("contested"));
        let rb = s.spawn(|| b.register("contested"));
        [ra.join().expect("a"), rb.join().expect("b")]
    });
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    let loser = results.into_iter().find_map(Result::err).expect("a loser");
    assert_eq!(loser.0, error::NAME_TAKEN);
    let winner = if a.register("contested").is_err() {
        &a
    } else {
        &b
    };
    let e = winner.register("contested").unwrap_err();
    assert_eq!(e.0, error::NAME_TAKEN, "the same connection twice");
    let owners: Vec<_> = list_services(&h)
        .into_iter()
        .filter(|s| s.0 == "contested")
        .collect();
    assert_eq!(owners.len(), 1);
}

#[test]
fn a_refusal_is_relayed_and_charges_nothing() {
    let h = harness(5_000);
    let p = RawProvider::start(
        h.address(),
        Behaviour::Refuse(error::INVALID_OPTION.into(), "no flavour \"x\"".into()),
    );
    p.register("picky").expect("register");
    let e = refusal(&h, "picky");
    assert_eq!(e, (error::INVALID_OPTION.into(), "no flavour \"x\"".into()));
    p.set_behaviour(Behaviour::Refuse(
        "com.example.Busy".into(),
        "try later".into(),
    ));
    let e = refusal(&h, "picky");
    assert_eq!(e.0, error::REFUSED);
    assert!(
        e.1.contains("com.example.Busy") && e.1.contains("try later"),
        "{e:?}"
    );
    assert_eq!(p.calls(), 2);
    assert_eq!(h.session_count(), 0);
    // The broker's checks come first: a bad capacity never reaches the provider.
    let e = h
        .client()
        .session("picky")
        .capacity(1)
        .open()
        .err()
        .expect("refused");
    assert_eq!(e.dbus_name(), Some(error::INVALID_CAPACITY));
    assert_eq!(p.calls(), 2);
    nothing_charged(&h);
}

#[test]
fn a_silent_provider_times_out_while_others_are_served() {
    const TIMEOUT_MS: u64 = 600;
    let h = harness(TIMEOUT_MS);
    let p = RawProvider::start(h.address(), Behaviour::Silent);
    p.register("silent").expect("register");
    let address = h.address().to_owned();
    let waiting = std::thread::spawn(move || {
        let client = shmlink::Client::connect(&shmlink::Bus::Address(address)).expect("client");
        let start = Instant::now();
        let r = client.session("silent").capacity(SMALL).open();
        (
            r.err().and_then(|e| e.dbus_name().map(str::to_owned)),
            start.elapsed(),
        )
    });
    assert!(wait_until(DEADLINE, || p.calls() == 1));
    // The broker serves an honest client meanwhile, without waiting for the provider.
    let start = Instant::now();
    let mut echo = open(&h, "echo").expect("echo opens meanwhile");
    echo.send(b"ping").expect("send");
    assert_eq!(echo.recv().expect("recv").as_deref(), Some(&b"ping"[..]));
    let served = start.elapsed();
    assert!(
        served < Duration::from_millis(TIMEOUT_MS / 2),
        "the echo client waited {served:?}"
    );
    let (name, took) = waiting.join().expect("waiting client");
    assert_eq!(name.as_deref(), Some(error::PROVIDER_UNAVAILABLE));
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
    drop(echo);
    nothing_charged(&h);
}

#[test]
fn wrong_answers_fail_the_open() {
    let h = harness(5_000);
    let p = RawProvider::start(h.address(), Behaviour::ReplyWithBody);
    p.register("odd").expect("register");
    let e = refusal(&h, "odd");
    assert_eq!(e.0, error::PROVIDER_UNAVAILABLE, "{e:?}");
    assert!(e.1.contains("with a body"), "{e:?}");
    p.set_behaviour(Behaviour::Refuse(
        "com.example.Huge".into(),
        "z".repeat(1 << 20),
    ));
    let e = refusal(&h, "odd");
    assert_eq!(e.0, error::REFUSED);
    assert!(
        e.1.len() < 1000,
        "the provider's message is cut: {}",
        e.1.len()
    );
    nothing_charged(&h);
}

#[test]
fn a_provider_closing_everything_ends_the_session_and_unblocks_the_client() {
    let h = harness(5_000);
    let closed = Signals::watch(&h, BROKER_INTERFACE, member::SESSION_CLOSED);
    let p = RawProvider::start(h.address(), Behaviour::Accept);
    p.register("remote").expect("register");
    let mut s = open(&h, "remote").expect("accepted");
    let path = s.path().to_owned();
    assert_eq!(h.session_count(), 1);
    let accepted = p.take_accepted();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].session, path);
    assert_eq!(accepted[0].service, "remote");
    let uid = accepted[0].caller.get("uid").and_then(|v| v.0.as_u64());
    assert_eq!(uid, Some(u64::from(rustix::process::geteuid().as_raw())));
    // The client blocks on its ring; the provider's closing everything wakes it.
    let receiver = std::thread::spawn(move || {
        s.set_timeout(Some(DEADLINE * 2));
        s.recv()
    });
    drop(accepted);
    let r = receiver.join().expect("receiver");
    assert!(
        matches!(
            r,
            Err(shmlink::Error::Session(shmlink_endpoint::Error::Closed))
        ),
        "{r:?}"
    );
    assert_eq!(closed_reason(&closed, &path), "provider closed the session");
    nothing_charged(&h);

    // A provider that closes at once after accepting: the session ends as soon as it opened.
    p.set_behaviour(Behaviour::AcceptThenClose);
    let s = open(&h, "remote").expect("accepted");
    assert_eq!(
        closed_reason(&closed, s.path()),
        "provider closed the session"
    );
    drop(s);
    nothing_charged(&h);
}

#[test]
fn a_provider_leaving_withdraws_its_names_and_fails_pending_opens_at_once() {
    let h = harness(60_000);
    let mut p = RawProvider::start(h.address(), Behaviour::Silent);
    p.register("leaving").expect("register");
    let address = h.address().to_owned();
    let waiting = std::thread::spawn(move || {
        let client = shmlink::Client::connect(&shmlink::Bus::Address(address)).expect("client");
        let start = Instant::now();
        let r = client.session("leaving").capacity(SMALL).open();
        (
            r.err().and_then(|e| e.dbus_name().map(str::to_owned)),
            start.elapsed(),
        )
    });
    assert!(wait_until(DEADLINE, || p.calls() == 1));
    p.leave();
    let (name, took) = waiting.join().expect("waiting client");
    assert_eq!(name.as_deref(), Some(error::PROVIDER_UNAVAILABLE));
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    assert!(wait_until(DEADLINE, || !h
        .client()
        .services()
        .expect("Services")
        .contains(&"leaving".into())));
    assert_eq!(name_of(refusal(&h, "leaving")), error::UNKNOWN_SERVICE);
    nothing_charged(&h);
}

#[test]
fn a_session_ended_at_the_broker_closes_the_providers_link() {
    let h = harness(5_000);
    let p = RawProvider::start(h.address(), Behaviour::Accept);
    p.register("remote").expect("register");
    let link_closed = |a: &shmlink_tests::raw_provider::Accepted| {
        use std::os::fd::AsFd;
        shmlink_endpoint::sys::hangup_state(a.link.as_fd())
            .is_ok_and(|s| s == shmlink_endpoint::sys::HangupState::Closed)
    };
    // Close by the owner.
    let s = open(&h, "remote").expect("accepted");
    let accepted = p.take_accepted();
    assert!(!link_closed(&accepted[0]));
    s.close().expect("Close");
    assert!(wait_until(DEADLINE, || link_closed(&accepted[0])));
    drop(accepted);

    // The owner's connection leaves the bus.
    let client = h.client();
    let s = client
        .session("remote")
        .capacity(SMALL)
        .open()
        .expect("accepted");
    let accepted = p.take_accepted();
    drop((s, client));
    assert!(wait_until(DEADLINE, || link_closed(&accepted[0])));
    drop(accepted);
    nothing_charged(&h);

    // A provider that follows the hang-up: the client dying ends it all.
    p.set_behaviour(Behaviour::AcceptAndFollowHangup);
    let closed = Signals::watch(&h, BROKER_INTERFACE, member::SESSION_CLOSED);
    let mut s =
        shmlink_tests::hostile::RawSession::open(h.address(), "remote", SMALL).expect("accepted");
    assert!(wait_until(DEADLINE, || p.held() == 1));
    // The client closes its hang-up end but keeps its connection: the
    // broker sees it, ends the session and closes the provider's hang-up.
    drop(s.hangup.take());
    assert_eq!(closed_reason(&closed, &s.path), "client hung up");
    assert!(wait_until(DEADLINE, || p.held() == 0));
    drop(s);
    nothing_charged(&h);
}

/// The hostile client's `reopen` mode as `nobody`: each session asked of
/// it opens on its one connection, and it drops the session's fds at once.
struct Reopener {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Reopener {
    fn start(h: &Harness, service: &str) -> Reopener {
        let mut child = std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(shmlink_tests::world_executable(
                &shmlink_tests::hostile::hostile_binary(),
            ))
            .args([h.address(), "reopen", service])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn setpriv hostile-client reopen");
        let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Reopener { child, out }
    }

    /// Opens a session of `capacity`-byte rings and drops it: "PATH p", or
    /// "ERR name message".
    fn open(&mut self, capacity: u64) -> String {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{capacity}").expect("ask");
        stdin.flush().expect("ask");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("its answer");
        line.trim().to_owned()
    }
}

impl Drop for Reopener {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A provider that never closes anything it accepted, and a client (as
/// `nobody`, on one connection) that opens sessions and drops them without
/// `Close`: each ends at the broker when the client's hang-up end closes,
/// leaves `ListSessions`, the provider sees the end on its hang-up and its
/// link, and the client's charge comes back. So three times as many
/// sessions as the connection may hold at once open one after another, and
/// as many again each as large as the uid's whole memory limit.
#[test]
fn a_client_dropping_its_sessions_ends_them_whatever_the_provider_does() {
    const PER_CONNECTION: usize = 2;
    let h = Harness::with_args(&[
        "--memory-per-user",
        MEMORY_PER_USER,
        "--sessions-per-connection",
        &PER_CONNECTION.to_string(),
    ]);
    let closed = Signals::watch(&h, BROKER_INTERFACE, member::SESSION_CLOSED);
    let p = RawProvider::start(h.address(), Behaviour::Accept);
    p.register("remote").expect("register");
    let client = h.client();
    let mut nobody = Reopener::start(&h, "remote");
    let mut kept = Vec::new();
    // SMALL rings first: the connection's session limit binds before the
    // memory limit; then WHOLE: every open needs all of the uid's memory.
    let capacities = [SMALL; 3 * PER_CONNECTION]
        .into_iter()
        .chain([WHOLE; 3 * PER_CONNECTION]);
    for (round, capacity) in capacities.enumerate() {
        let line = nobody.open(capacity);
        let path = line
            .strip_prefix("PATH ")
            .unwrap_or_else(|| panic!("open {round} ({capacity}) refused: {line}"))
            .to_owned();
        assert_eq!(closed_reason(&closed, &path), "client hung up");
        assert!(
            wait_until(DEADLINE, || client
                .list_sessions()
                .is_ok_and(|l| l.iter().all(|s| s.path != path))),
            "{path} is still listed"
        );
        let mut accepted = p.take_accepted();
        assert_eq!(accepted.len(), 1, "the provider holds what it accepted");
        let a = accepted.pop().expect("one");
        assert_eq!(a.session, path);
        assert!(
            wait_until(DEADLINE, || [&a.fds.hangup, &a.link].iter().all(|fd| {
                use std::os::fd::AsFd;
                shmlink_endpoint::sys::hangup_state(fd.as_fd())
                    .is_ok_and(|s| s == shmlink_endpoint::sys::HangupState::Closed)
            })),
            "the provider does not see the end of {path}"
        );
        // Never closed by the provider.
        kept.push(a);
    }
    drop(nobody);
    drop(kept);
    nothing_charged(&h);
}

/// A client that writes to its hang-up socket breaks the protocol: the
/// broker ends its provided session (as a hosted one) although the provider
/// never looks, and releases it.
#[test]
fn a_client_writing_to_its_hang_up_ends_its_provided_session() {
    let h = harness(5_000);
    let closed = Signals::watch(&h, BROKER_INTERFACE, member::SESSION_CLOSED);
    let p = RawProvider::start(h.address(), Behaviour::Accept);
    p.register("remote").expect("register");
    let s =
        shmlink_tests::hostile::RawSession::open(h.address(), "remote", SMALL).expect("accepted");
    s.write_hangup(b"bytes nobody reads").expect("write");
    assert_eq!(
        closed_reason(&closed, &s.path),
        "client misbehaved: the other side wrote to the hang-up socket"
    );
    let accepted = p.take_accepted();
    assert!(
        wait_until(DEADLINE, || [&accepted[0].fds.hangup, &accepted[0].link]
            .iter()
            .all(|fd| {
                use std::os::fd::AsFd;
                shmlink_endpoint::sys::hangup_state(fd.as_fd())
                    .is_ok_and(|s| s == shmlink_endpoint::sys::HangupState::Closed)
            })),
        "the provider does not see the end"
    );
    drop((s, accepted));
    nothing_charged(&h);
}

#[test]
fn a_provider_closing_its_link_alone_ends_the_session_at_the_broker() {
    let h = harness(5_000);
    let closed = Signals::watch(&h, BROKER_INTERFACE, member::SESSION_CLOSED);
    let p = RawProvider::start(h.address(), Behaviour::Accept);
    p.register("remote").expect("register");
    let s = open(&h, "remote").expect("accepted");
    let path = s.path().to_owned();
    let mut accepted = p.take_accepted();
    let held = accepted.pop().expect("one session");
    // The provider keeps the rings and the hang-up: only the link closes.
    let shmlink_tests::raw_provider::Accepted { fds, link, .. } = held;
    drop(link);
    assert_eq!(closed_reason(&closed, &path), "provider closed the session");
    assert_eq!(h.session_count(), 0);
    let e = h.client().close_session(&path).expect_err("gone");
    assert_eq!(e.dbus_name(), Some(error::UNKNOWN_SESSION));
    drop((fds, s));
    nothing_charged(&h);
}

#[test]
fn forged_answers_from_another_connection_are_dropped() {
    const TIMEOUT_MS: u64 = 600;
    let h = harness(TIMEOUT_MS);
    let p = RawProvider::start(h.address(), Behaviour::Silent);
    p.register("silent").expect("register");
    let address = h.address().to_owned();
    let waiting = std::thread::spawn(move || {
        let client = shmlink::Client::connect(&shmlink::Bus::Address(address)).expect("client");
        let start = Instant::now();
        let r = client.session("silent").capacity(SMALL).open();
        (
            r.err().and_then(|e| e.dbus_name().map(str::to_owned)),
            start.elapsed(),
        )
    });
    assert!(wait_until(DEADLINE, || p.calls() == 1));
    // Another connection answers every serial the broker may have used, in
    // the provider's stead: acceptances and refusals alike.
    let forger = Connection::new_address(h.address()).expect("connect");
    let (broker,): (String,) = forger
        .with_proxy(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            Duration::from_secs(5),
        )
        .method_call("org.freedesktop.DBus", "GetNameOwner", (BUS_NAME,))
        .expect("GetNameOwner");
    for serial in 1..=300u32 {
        let mut call = dbus::Message::new_method_call(
            "org.example.Nobody",
            "/",
            "org.shmlink.Provider1",
            "AcceptSession",
        )
        .expect("call");
        call.set_serial(serial);
        call.set_sender(Some(broker.as_str().into()));
        use dbus::channel::Sender;
        let _ = forger.send(call.method_return());
        let _ = forger.send(call.error(
            &error::ACCESS_DENIED.into(),
            &std::ffi::CString::new("forged").expect("text"),
        ));
    }
    let (name, took) = waiting.join().expect("waiting client");
    assert_eq!(name.as_deref(), Some(error::PROVIDER_UNAVAILABLE));
    assert!(
        took >= Duration::from_millis(TIMEOUT_MS),
        "a forged answer decided after {took:?}: only the provider's answer (here: none) may"
    );
    nothing_charged(&h);
}

#[test]
fn an_object_path_over_the_limit_is_refused_and_costs_nothing() {
    let h = nobody_may_register();
    let pid = h.daemon_pid();
    let client = h.client();
    client
        .session("echo")
        .open()
        .expect("a first session")
        .close()
        .expect("close it");
    let rss_before = proc_status(pid, "VmRSS");
    let log_before = h.daemon_log().len();

    // As many 4 MiB object paths as `nobody` may hold registrations (32):
    // each would be stored, and logged, whole without the bound.
    const CALLS: usize = 32;
    const BYTES: usize = 4 << 20;
    let mut attacker = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(shmlink_tests::world_executable(
            &shmlink_tests::hostile::hostile_binary(),
        ))
        .args([h.address(), "register-path", "nobody.p"])
        .args([CALLS.to_string(), BYTES.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run setpriv hostile-client");
    // An honest client alongside is answered throughout.
    let (mut honest, mut slowest) = (0, Duration::ZERO);
    while attacker.try_wait().expect("try_wait").is_none() || honest == 0 {
        let start = Instant::now();
        client
            .session("echo")
            .capacity(SMALL)
            .open()
            .expect("honest open during the attack")
            .close()
            .expect("honest close");
        slowest = slowest.max(start.elapsed());
        honest += 1;
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut attacker.stdout.take().expect("stdout"), &mut out)
        .expect("read its output");
    println!("{out}honest opens during the attack: {honest}, slowest {slowest:?}");
    let first = out
        .lines()
        .find_map(|l| l.strip_prefix("FIRST "))
        .unwrap_or("");
    let (name, text_len) = first.split_once(' ').unwrap_or(("", ""));
    assert_eq!(name, error::INVALID_OPTION, "{out}");
    let text_len: usize = text_len.parse().unwrap_or(usize::MAX);
    assert!(text_len <= 400, "the refusal echoed {text_len} bytes");
    assert_eq!(
        out.lines().last(),
        Some(format!("DONE {CALLS} 0").as_str()),
        "every call refused, none registered"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "honest open took {slowest:?}"
    );
    assert!(
        !list_services(&h)
            .iter()
            .any(|(s, _, _)| s.starts_with("nobody.p")),
        "a refused registration is listed"
    );

    // The daemon's memory and log stay bounded.
    let bound_kb = 32 * 1024;
    assert!(
        wait_until(DEADLINE, || proc_status(pid, "VmRSS")
            < rss_before + bound_kb),
        "daemon VmRSS {} kB after {CALLS} calls with {BYTES}-byte paths (before: {rss_before} kB)",
        proc_status(pid, "VmRSS")
    );
    // The attacker's lines only: the honest client's are bounded apart.
    let log = h.daemon_log();
    let written: usize = log[log_before..]
        .lines()
        .filter(|l| l.contains("uid 65534") || l.contains("nobody.p"))
        .map(|l| l.len() + 1)
        .sum();
    println!(
        "{CALLS} registrations with {BYTES}-byte object paths: +{} kB VmRSS, \
         {written} bytes of log about them",
        proc_status(pid, "VmRSS").saturating_sub(rss_before)
    );
    assert!(written < 16 * 1024, "{written} bytes of log");
    assert!(log.contains("is longer than 255 bytes"), "{log}");
}

#[test]
fn a_stronger_claim_takes_a_name_over_from_a_catch_all_squatter() {
    let h = Harness::with_config(
        BusLimits::Tests,
        &format!("[providers.allow.\"*\"]\nallow_users = [65534]\n[providers]\nregistrations_per_user = 4\n[limits]\nmemory_per_user = {MEMORY_PER_USER}\n"),
    );
    // `nobody`, allowed every name by the catch-all pattern, takes "cam" first.
    let mut squatter = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(shmlink_tests::world_executable(
            &shmlink_tests::hostile::hostile_binary(),
        ))
        .args([h.address(), "register", "cam", "hold"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn setpriv hostile-client");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(squatter.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line.trim(), "OK", "the squatter registered");
    let nobody = 65534;
    assert!(list_services(&h)
        .iter()
        .any(|s| s.0 == "cam" && s.2 == nobody));
    // Root's provider registers the same name: its claim is stronger.
    let p = RawProvider::start(h.address(), Behaviour::Accept);
    p.register("cam").expect("root takes the name over");
    let uid = rustix::process::geteuid().as_raw();
    assert!(
        list_services(&h).contains(&("cam".into(), p.name().into(), uid)),
        "{:?}",
        list_services(&h)
    );
    // New sessions go to root's provider.
    let session = open(&h, "cam").expect("open the taken-over name");
    assert_eq!(p.take_accepted().len(), 1);
    drop(session);
    // The squatter cannot take it back, and its leaving withdraws nothing.
    let again = std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(shmlink_tests::world_executable(
            &shmlink_tests::hostile::hostile_binary(),
        ))
        .args([h.address(), "register", "cam"])
        .output()
        .expect("run setpriv hostile-client");
    let again = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.starts_with(&format!("ERR {}", error::NAME_TAKEN)),
        "{again}"
    );
    drop(squatter.stdin.take());
    let _ = squatter.wait();
    assert!(list_services(&h).contains(&("cam".into(), p.name().into(), uid)));
}
