//! The broker's bus connection is a resource an attacker can try to use up:
//! calls parked while the broker learns their sender's credentials, opens
//! of a provider's service with huge options, and clients that never read
//! their answers. Each attack runs as `nobody` (`hostile-client`, see its
//! header) on a bus with the system bus's limits (the park attack on a
//! session bus's too), with an honest client alongside; SIGTERM ends the
//! daemon within a second during the attack, and the daemon's peak memory
//! stays bounded.
//!
//! The bus hands the broker its messages on one socket, in order: an honest
//! call that lands behind an attack's tens of MiB waits until the broker
//! has read them (seconds on the test VM). That is the bus's cost, not the
//! broker's; the honest client's 99th percentile over many calls is
//! asserted, and its slowest call printed.
//!
//! dbus-daemon charges the broker's answers to the broker until their
//! receiver reads them, and stops reading the broker at 64 fds or 127 MiB
//! in flight. The fds are bounded (`reply_fds`, and honest clients'
//! `OpenSessionVia` replies carry none); the bytes of many answers a
//! client never reads (long `ListSessions` answers from many connections)
//! are a known residual: no answer leaves the broker until that client
//! leaves. That test asserts what must hold even so, and prints what the
//! honest client saw meanwhile (`--nocapture`).

use shmlink::Client;
use shmlink_interfaces::error;
use shmlink_tests::attacks::{
    assert_stops_quickly, measure_honest, parse_done_line, Attacker, HonestTimes, Latencies,
};
use shmlink_tests::{proc_status, BusLimits, Harness};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The honest client's 99th percentile must stay below this.
const P99: Duration = Duration::from_secs(1);

/// Honest sessions opened during an attack: enough that the one or two
/// calls queued behind the attack's bytes on the bus are outside the 99th
/// percentile.
const DURING: usize = 100;

/// The daemon's peak resident memory (`VmHWM`) must stay below this.
const PEAK_RSS_KB: u64 = 256 * 1024;

/// The largest D-Bus message the system bus carries, less room for the
/// rest of the call.
const SYSTEM_BUS_CALL: usize = (32 << 20) - 4096;

/// A daemon on a bus with the system bus's limits, configured as
/// `shmlinkd` configures itself on the system bus: `limits.reply_fds` = 28
/// and `providers.unanswered` = 2, which a daemon on a bus given by its
/// address leaves unbounded.
fn on_system_bus() -> Harness {
    Harness::with_config(
        BusLimits::System,
        "[limits]\nreply_fds = 28\n[providers]\nunanswered = 2\n",
    )
}

/// Asserts that every honest call was answered (`measure_honest` fails on
/// the first that is not) with a 99th percentile below [`P99`].
fn assert_served(what: &str, t: Result<HonestTimes, String>) {
    let t = t.unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!("{what}: OpenSession {}", t.open.summary());
    eprintln!("{what}: 64-byte echo {}", t.echo.summary());
    for (name, l) in [("OpenSession", &t.open), ("echo", &t.echo)] {
        assert!(
            l.percentile(99) < P99,
            "{what}: {name} p99 {:?}",
            l.percentile(99)
        );
    }
}

/// Opens `n` `echo` sessions on a new connection, each allowed `timeout`,
/// and closes those opened; the times of the answered ones.
fn glimpse(h: &Harness, n: usize, timeout: Duration) -> Latencies {
    let client = h.client().with_call_timeout(timeout);
    let mut answered = Latencies::default();
    for _ in 0..n {
        let start = Instant::now();
        if let Ok(s) = client
            .session("echo")
            .capacity(4096)
            .timeout(timeout)
            .open()
        {
            answered.push(start.elapsed());
            let _ = s.close();
        }
    }
    answered
}

/// `n` honest opens of the example provider's `frames` service (one small
/// frame each, received and checked, then closed): the times of those that
/// worked and the errors of the others.
fn measure_provided(client: &Client, n: usize) -> (Latencies, Vec<String>) {
    let mut times = Latencies::default();
    let mut failed = Vec::new();
    for i in 0..n {
        let start = Instant::now();
        let opened = client
            .session("frames")
            .option("count", 1u64)
            .option("width", 16u64)
            .option("height", 16u64)
            .timeout(Duration::from_secs(10))
            .open();
        let mut session = match opened {
            Ok(s) => s,
            Err(e) => {
                failed.push(format!("open {i}: {e}"));
                continue;
            }
        };
        times.push(start.elapsed());
        match session.recv() {
            Ok(Some(f)) if f.len() == 16 + 16 * 16 && f[8..16] == 0u64.to_le_bytes() => {}
            other => failed.push(format!("frame {i}: {other:?}")),
        }
        let _ = session.close();
    }
    (times, failed)
}

/// Asserts that every honest open of the provided service worked, with a
/// 99th percentile below [`P99`].
fn assert_provided(what: &str, client: &Client, n: usize) {
    let (times, failed) = measure_provided(client, n);
    eprintln!(
        "{what}: provided OpenSession {}, {} of {n} failed",
        times.summary(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{what}: {} failed, the first: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        times.percentile(99) < P99,
        "{what}: provided OpenSession p99 {:?}",
        times.percentile(99)
    );
}

/// Asserts that the daemon's peak resident memory stayed below
/// [`PEAK_RSS_KB`].
fn assert_peak_memory(h: &Harness, what: &str) {
    let pid = h.daemon_pid();
    let (peak, now) = (proc_status(pid, "VmHWM"), proc_status(pid, "VmRSS"));
    eprintln!("{what}: daemon VmHWM {peak} kB, VmRSS {now} kB");
    assert!(peak > 0, "{what}: no VmHWM for pid {pid}");
    assert!(peak < PEAK_RSS_KB, "{what}: daemon VmHWM {peak} kB");
}

/// Stops an attacker that counts its answers and returns the counts.
fn answers(what: &str, a: Attacker) -> BTreeMap<String, usize> {
    let last = a.stop();
    let counts = parse_done_line(&last).unwrap_or_else(|| panic!("{what}: attacker said {last:?}"));
    eprintln!("{what}: the attacker's answers {counts:?}");
    counts
}

/// `park KIND BYTES 1 C` (one call on each of C fresh connections,
/// delivered together, waiting for their senders' credentials): the
/// honest client, itself a fresh connection, is served during the attack
/// and after it; every parked call is answered (`expect`: with this error
/// each); SIGTERM during a second round.
fn park_attack(limits: BusLimits, kind: &str, bytes: usize, connections: usize, expect: &str) {
    let what = format!("park {kind} {connections} × {bytes} bytes ({limits:?} bus)");
    let mut h = match limits {
        BusLimits::System => on_system_bus(),
        other => Harness::on_bus(other, &[]),
    };
    let args = [
        "park".to_owned(),
        kind.to_owned(),
        bytes.to_string(),
        "1".to_owned(),
        connections.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let attacker = Attacker::start(&h, &args);
    assert_served(
        &format!("{what}, during"),
        measure_honest(&h.client(), DURING, 2),
    );
    let counts = answers(&what, attacker);
    let want = BTreeMap::from([(expect.to_owned(), connections)]);
    assert_eq!(counts, want, "{what}");
    assert_served(
        &format!("{what}, after"),
        measure_honest(&h.client(), 20, 5),
    );

    // The calls are on their way to the daemon.
    let again = Attacker::start(&h, &args);
    assert_peak_memory(&h, &what);
    assert_stops_quickly(&mut h, &what);
    drop(again);
}

#[test]
fn calls_parked_for_credentials_are_bounded_on_the_system_bus() {
    // Three of the largest calls the system bus carries, each from a new
    // connection: more than libdbus lets the broker hold unread (63 MiB).
    // Each is more than a connection may have waiting.
    park_attack(
        BusLimits::System,
        "ping",
        SYSTEM_BUS_CALL,
        3,
        error::LIMIT_EXCEEDED,
    );
}

#[test]
fn huge_opens_of_unknown_callers_are_refused_before_they_wait() {
    // The same with OpenSession: too large for any open, refused from the
    // message before it would wait.
    park_attack(
        BusLimits::System,
        "open",
        SYSTEM_BUS_CALL,
        3,
        error::INVALID_OPTION,
    );
}

#[test]
fn calls_parked_for_credentials_are_bounded_on_the_session_bus() {
    // One call larger than libdbus lets the broker hold unread.
    park_attack(
        BusLimits::Session,
        "ping",
        (64 << 20) - (64 << 10),
        1,
        error::LIMIT_EXCEEDED,
    );
}

/// What a client that never reads does to the honest client meanwhile.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Meanwhile {
    /// Every honest call is answered, p99 below [`P99`].
    Served,
    /// A known residual: what the honest client saw is only printed.
    Printed,
}

/// A client that never reads (`never-read ...`): during the attack, the
/// daemon's memory stays bounded and the honest client is served (or what
/// it saw is printed); once the attacker left, every honest call is
/// answered; SIGTERM during a second round ends the daemon within a second.
fn never_read_attack(args: &[&str], meanwhile: Meanwhile) {
    let what = format!("{} ({:?} bus)", args.join(" "), BusLimits::System);
    let mut h = on_system_bus();
    let attacker = Attacker::start(&h, args);
    if meanwhile == Meanwhile::Served {
        assert_served(
            &format!("{what}, during"),
            measure_honest(&h.client(), DURING, 2),
        );
    } else {
        let seen = glimpse(&h, 5, Duration::from_millis(500));
        eprintln!(
            "{what}: during the attack {} of 5 honest opens answered within 0.5 s ({})",
            seen.len(),
            seen.summary()
        );
    }
    assert_peak_memory(&h, &what);
    attacker.stop();
    assert_served(
        &format!("{what}, after"),
        measure_honest(&h.client(), 20, 5),
    );

    let again = Attacker::start(&h, args);
    let seen = glimpse(&h, 2, Duration::from_millis(500));
    eprintln!(
        "{what}: in a second round {} of 2 honest opens answered within 0.5 s",
        seen.len()
    );
    assert_peak_memory(&h, &what);
    assert_stops_quickly(&mut h, &what);
    drop(again);
}

#[test]
fn a_client_that_never_reads_its_sessions_cannot_keep_the_daemon() {
    // The fds of its replies count against `reply_fds`: past 4 sessions it
    // is refused, and the bus keeps reading the daemon. Honest clients
    // open with OpenSessionVia, whose replies carry no fds.
    never_read_attack(&["never-read", "open", "echo", "1000"], Meanwhile::Served);
}

#[test]
fn a_client_that_never_reads_its_lists_cannot_keep_the_daemon() {
    // Each answer lists the 128 sessions the attacker holds. The bus lets
    // one connection have 128 calls waiting for an answer, so the calls
    // come from many connections.
    // What the bus holds for it is charged to the daemon, and past 127 MiB
    // the bus stops reading the daemon: honest calls wait until it leaves.
    never_read_attack(
        &["never-read", "list", "2000", "128", "32"],
        Meanwhile::Printed,
    );
}

#[test]
fn huge_options_for_a_provider_cost_the_broker_little() {
    let what = format!(
        "provided-flood frames 8 × 30 MiB ({:?} bus)",
        BusLimits::System
    );
    let mut h = on_system_bus();
    let _provider = h.start_frames_provider();
    let client = h.client();
    let args = ["provided-flood", "frames", &(30 << 20).to_string(), "8"].map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let attacker = Attacker::start(&h, &args);
    assert_provided(&format!("{what}, during"), &client, DURING);
    assert_served(
        &format!("{what}, during"),
        measure_honest(&client, DURING, 2),
    );
    let counts = answers(&what, attacker);
    assert_eq!(counts.get("unanswered"), None, "{what}: {counts:?}");
    assert_eq!(
        counts.get("ok"),
        None,
        "{what}: an unknown option was accepted"
    );
    assert_provided(&format!("{what}, after"), &client, 10);
    assert_served(&format!("{what}, after"), measure_honest(&client, 20, 5));

    let again = Attacker::start(&h, &args);
    assert_peak_memory(&h, &what);
    assert_stops_quickly(&mut h, &what);
    drop(again);
}

#[test]
fn a_provider_that_stops_reading_holds_only_its_own_opens() {
    let what = format!(
        "provided-flood frames 60000 40, the provider stopped ({:?} bus)",
        BusLimits::System
    );
    let mut h = on_system_bus();
    let provider = h.start_frames_provider();
    let pid = rustix::process::Pid::from_raw(provider.0.id() as i32).expect("pid");
    // SIGSTOP: the provider reads nothing more, as a hung one would. Each
    // AcceptSession call carries eight fds, which the bus charges to the
    // broker until it has written the call into the provider's socket: once
    // that socket is full (a few calls of 60 KB options fill it), without a
    // bound the calls would pass the system bus's 64 fds and the bus would
    // stop reading the broker for everyone.
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
    let daemon = h.daemon_pid();
    let fds_before = shmlink_tests::fd_count(daemon);
    // 40 opens whose options are just within MAX_OPEN_SESSION: their calls
    // fill the stopped provider's socket after a few.
    let attacker = Attacker::start(&h, &["provided-flood", "frames", "60000", "40"]);
    // Every open admitted holds ten fds at the broker while it waits.
    assert!(
        shmlink_tests::wait_until(shmlink_tests::DEADLINE, || {
            shmlink_tests::fd_count(daemon) >= fds_before + 400
        }),
        "{what}: the opens never arrived ({} fds, {fds_before} before)",
        shmlink_tests::fd_count(daemon)
    );
    assert_served(
        &format!("{what}, during"),
        measure_honest(&h.client(), DURING, 2),
    );
    assert_peak_memory(&h, &what);
    attacker.stop();
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).expect("SIGCONT");
    assert_provided(&format!("{what}, after"), &h.client(), 10);
    assert_stops_quickly(&mut h, &what);
    drop(provider);
}
