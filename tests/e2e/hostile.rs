//! Hostile and dying peers: every attack of `shmlink_tests::hostile` against a
//! real daemon while an honest client streams verified data through it. Each
//! attack must end the hostile session alone, with a reason in the
//! `SessionClosed` signal and in the daemon's log; the daemon keeps serving and
//! the honest client's data stays intact.

use shmlink_endpoint::frame::{KIND_END, KIND_MESSAGE};
use shmlink_tests::hostile::{self, hostile_binary, ClosedWatcher, Hammer, Honest, RawSession};
use shmlink_tests::{wait_until, Harness, DEADLINE};
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Ring capacity of the hostile sessions.
const CAP: u64 = 4096;

/// A daemon, a `SessionClosed` listener and an honest client already streaming.
struct Arena {
    h: Harness,
    watcher: ClosedWatcher,
    honest: Honest,
}

impl Arena {
    fn start() -> Arena {
        let h = Harness::start();
        let watcher = ClosedWatcher::new(h.address());
        let honest = Honest::start(h.bus());
        assert!(
            honest.progresses(20, DEADLINE),
            "the honest client does not stream"
        );
        Arena { h, watcher, honest }
    }

    fn open(&self, service: &str) -> RawSession {
        RawSession::open(self.h.address(), service, CAP).expect("hostile client opens a session")
    }

    /// The hostile session must end with a reason containing one of `expect`,
    /// announced and logged; returns the reason.
    fn expect_closed(&mut self, path: &str, expect: &[&str]) -> String {
        let reason = self.watcher.wait_for(path, DEADLINE).unwrap_or_else(|| {
            panic!("no SessionClosed for {path}; log:\n{}", self.h.daemon_log())
        });
        assert!(
            expect.iter().any(|e| reason.contains(e)),
            "reason {reason:?} should mention one of {expect:?}"
        );
        let id = path.rsplit('/').next().expect("id");
        let log = self.h.daemon_log();
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("session {id} ")) && l.contains(&reason)),
            "the daemon log does not give session {id}'s reason {reason:?}:\n{log}"
        );
        reason
    }

    /// The daemon survived and serves; the honest client kept streaming and
    /// every byte it got back was right.
    fn finish(self) {
        assert!(
            self.honest.progresses(50, DEADLINE),
            "the honest client stalled after the attack"
        );
        let rounds = self.honest.finish();
        assert!(rounds > 70);
        let mut s = self
            .h
            .client()
            .session("echo")
            .capacity(4096)
            .open()
            .expect("the daemon still opens sessions");
        s.send(b"still there").expect("send");
        assert_eq!(
            s.recv().expect("recv").as_deref(),
            Some(&b"still there"[..])
        );
        s.close().expect("close");
    }
}

/// An honest round trip through the hostile client's own echo session.
fn raw_echo(s: &mut RawSession, msg: &[u8]) {
    s.send_message(msg, DEADLINE).expect("raw send");
    assert_eq!(
        s.recv_message(DEADLINE).expect("raw recv").as_deref(),
        Some(msg)
    );
}

#[test]
fn corrupt_count_of_the_ring_the_daemon_reads() {
    let mut a = Arena::start();
    let mut s = a.open("echo");
    raw_echo(&mut s, b"hello");
    s.to_server.set_count(usize::MAX);
    s.poke();
    a.expect_closed(&s.path, &["client misbehaved: shared ring corrupted"]);
    a.finish();
}

#[test]
fn corrupt_count_of_the_ring_the_daemon_writes() {
    let mut a = Arena::start();
    let mut s = a.open("echo");
    raw_echo(&mut s, b"hello");
    s.to_client.set_count(s.to_client.len() + 1);
    // The echo makes the daemon write into the ring whose count we broke.
    s.send_message(b"echo this", DEADLINE).expect("send");
    a.expect_closed(&s.path, &["client misbehaved: shared ring corrupted"]);
    a.finish();
}

#[test]
fn count_changed_while_the_daemon_reads() {
    let mut a = Arena::start();
    // `sink` reads without ever writing back, so it keeps reading whatever we claim.
    let s = a.open("sink");
    let len = s.to_server.len();
    let hammer = Hammer::start(s.to_server.count_handle(), 0, len);
    let mut closed = None;
    assert!(
        wait_until(DEADLINE, || {
            s.poke();
            closed = a.watcher.seen().get(&s.path).cloned();
            closed.is_some()
        }),
        "the daemon never noticed the count changing under it"
    );
    let stores = hammer.stop();
    assert!(stores > 0);
    let reason = a.expect_closed(&s.path, &["client misbehaved"]);
    eprintln!("count hammered {stores} times; daemon said: {reason}");
    a.finish();
}

#[test]
fn frame_headers_announcing_impossible_lengths_or_kinds() {
    let mut a = Arena::start();
    let cases: [(u32, u32, &str); 4] = [
        (KIND_MESSAGE, u32::MAX, "frame announces 4294967295 bytes"),
        (
            KIND_MESSAGE,
            (64 << 20) + 1,
            "more than the session maximum",
        ),
        (7, 1, "unknown kind 7"),
        (KIND_END, 5, "end-of-stream frame carries 5 bytes"),
    ];
    let mut sessions = Vec::new();
    for (kind, len, expect) in cases {
        let mut s = a.open("echo");
        raw_echo(&mut s, b"fine so far");
        assert_eq!(s.send_header(kind, len), 8);
        a.expect_closed(&s.path, &[expect, "client misbehaved: protocol violation"]);
        sessions.push(s);
    }
    a.finish();
}

#[test]
fn eventfds_switched_to_nonblocking_or_blocking_by_the_peer_change_nothing() {
    let mut a = Arena::start();
    let mut s = a.open("echo");
    for on in [true, false, true, false] {
        for fd in s.eventfds() {
            hostile::set_nonblocking(fd, on).expect("fcntl on a shared eventfd");
        }
        // The daemon neither blocks nor misses wake-ups, whatever the shared flag says.
        for i in 0..50u64 {
            raw_echo(&mut s, &shmlink_tests::payload(i, 100 + i as usize * 97));
        }
    }
    // Saturating the counters the daemon only drains is harmless too.
    hostile::flood(s.to_server.empty_signal.as_ref().expect("fd").as_fd()).expect("flood");
    hostile::flood(s.to_client.full_signal.as_ref().expect("fd").as_fd()).expect("flood");
    for i in 0..50u64 {
        raw_echo(&mut s, &shmlink_tests::payload(i, 3000));
    }
    s.close().expect("Close");
    a.expect_closed(&s.path, &["closed by its owner"]);
    a.finish();
}

#[test]
fn flooded_eventfd_counter_ends_the_session() {
    let mut a = Arena::start();
    for blocking in [false, true] {
        let mut s = a.open("echo");
        raw_echo(&mut s, b"warm up");
        let data_signal = s.to_client.empty_signal.as_ref().expect("fd").as_fd();
        if blocking {
            // Clearing O_NONBLOCK on the shared description must not make the daemon's write block.
            hostile::set_nonblocking(data_signal, false).expect("fcntl");
        }
        hostile::flood(data_signal).expect("flood the daemon's data signal");
        // The echo makes the daemon signal us: it finds the counter full.
        s.send_message(b"wake me", DEADLINE).expect("send");
        a.expect_closed(
            &s.path,
            &["client misbehaved: the other side flooded a wake-up eventfd"],
        );
    }
    a.finish();
}

#[test]
fn fds_closed_early() {
    let mut a = Arena::start();
    // Rings unmapped and their fds closed: the daemon holds its own references
    // and carries on; the session ends when the hang-up socket closes.
    let mut s = a.open("echo");
    raw_echo(&mut s, b"hello");
    s.to_server.close_all();
    s.to_client.close_all();
    assert!(a.honest.progresses(20, DEADLINE));
    assert!(
        a.watcher.seen().get(&s.path).is_none(),
        "closing ring fds alone must not end the session"
    );
    s.hangup = None;
    a.expect_closed(&s.path, &["client hung up"]);
    // Everything closed at once but the bus connection.
    let mut s2 = a.open("sink");
    s2.to_server.close_all();
    s2.to_client.close_all();
    s2.hangup = None;
    a.expect_closed(&s2.path, &["client hung up"]);
    a.finish();
}

#[test]
fn client_that_never_reads_stalls_only_itself() {
    let mut a = Arena::start();
    let mut s = a.open("echo");
    let len = s.to_server.len();
    let frame = {
        let mut f = shmlink_endpoint::frame::encode_header(KIND_MESSAGE, 500).to_vec();
        f.extend_from_slice(&[9u8; 500]);
        f
    };
    // Push echo requests and never read a reply: the reply ring fills, the
    // daemon stops reading, and our request ring fills up too.
    let mut pending: &[u8] = &[];
    assert!(
        wait_until(DEADLINE, || {
            if pending.is_empty() {
                pending = &frame;
            }
            let n = s.to_server.write(pending);
            pending = &pending[n..];
            s.to_server.count() == len && s.to_client.count() == s.to_client.len()
        }),
        "the rings never filled (to_server {} of {len}, to_client {})",
        s.to_server.count(),
        s.to_client.count()
    );
    // The honest client keeps its full speed meanwhile.
    assert!(
        a.honest.progresses(300, DEADLINE),
        "the honest client stalled behind a client that never reads"
    );
    assert!(
        a.watcher.seen().get(&s.path).is_none(),
        "a slow reader is not hostile"
    );
    assert_eq!(a.h.session_count(), 2);
    // Leaving the bus ends it.
    s.conn = None;
    a.expect_closed(&s.path, &["owner left the bus", "client hung up"]);
    a.finish();
}

#[test]
fn writing_to_the_hangup_socket_ends_the_session() {
    let mut a = Arena::start();
    let mut s = a.open("echo");
    raw_echo(&mut s, b"hello");
    assert_eq!(
        s.write_hangup(b"!").expect("write to the hang-up socket"),
        1
    );
    a.expect_closed(
        &s.path,
        &["client misbehaved: the other side wrote to the hang-up socket"],
    );
    a.finish();
}

#[test]
fn client_vanishing_in_the_middle_of_open_session_leaves_nothing() {
    let a = Arena::start();
    for cmd in ["vanish", "vanish-known"] {
        for _ in 0..10 {
            let st = Command::new(hostile_binary())
                .args([a.h.address(), cmd, "echo"])
                .stdout(Stdio::null())
                .status()
                .expect("run hostile-client");
            assert!(st.success(), "{cmd}: {st}");
        }
    }
    // Whatever the daemon created for them is gone; only the honest session remains.
    assert!(
        wait_until(DEADLINE, || a.h.session_count() == 1),
        "sessions of vanished clients linger: {}",
        a.h.session_count()
    );
    a.finish();
}

#[test]
fn sigkill_mid_stream() {
    let mut a = Arena::start();
    let mut child = Command::new(hostile_binary())
        .args([a.h.address(), "stream"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn hostile-client stream");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read PATH");
    let path = line
        .trim()
        .strip_prefix("PATH ")
        .expect("PATH line")
        .to_owned();
    let c = a.h.client();
    assert!(
        wait_until(DEADLINE, || {
            c.session_properties(&path)
                .ok()
                .and_then(|p| p.get("BytesToServer").and_then(|v| v.0.as_u64()))
                .is_some_and(|b| b > 100_000)
        }),
        "the streaming client's data never arrived"
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    a.expect_closed(&path, &["client hung up", "owner left the bus"]);
    a.finish();
}

#[test]
fn sigterm_closes_every_session_wakes_blocked_clients_and_exits_zero() {
    let mut h = Harness::start();
    let mut watcher = ClosedWatcher::new(h.address());
    let client = h.client();
    // A receiver blocked on an empty ring, a sender blocked on a full one, an idle session.
    let recv_session = client.session("echo").capacity(4096).open().expect("open");
    let send_session = client.session("echo").capacity(4096).open().expect("open");
    let idle = client.session("sink").capacity(4096).open().expect("open");
    let paths = [
        recv_session.path().to_owned(),
        send_session.path().to_owned(),
        idle.path().to_owned(),
    ];
    let (tx, rx) = std::sync::mpsc::channel();
    let (_w, mut r) = recv_session.split();
    let tx1 = tx.clone();
    std::thread::spawn(move || {
        let _ = tx1.send(("recv", r.recv().map(|_| ()).map_err(|e| e.to_string())));
    });
    let (mut w, _r2) = send_session.split();
    std::thread::spawn(move || {
        let m = vec![3u8; 1000];
        let res = loop {
            if let Err(e) = w.send(&m) {
                break Err(e.to_string());
            }
        };
        let _ = tx.send(("send", res));
    });
    // Both must really be blocked before the signal.
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a call returned before SIGTERM"
    );
    let status = h.take_daemon().stop().expect("SIGTERM and wait");
    assert!(status.success(), "shmlinkd exited with {status} on SIGTERM");
    for _ in 0..2 {
        let (what, res) = rx
            .recv_timeout(DEADLINE)
            .expect("a blocked call did not return after SIGTERM");
        let err = res.expect_err("a blocked call must fail when the daemon stops");
        assert!(err.contains("closed by the other side"), "{what}: {err}");
    }
    for p in &paths {
        let reason = watcher
            .wait_for(p, DEADLINE)
            .unwrap_or_else(|| panic!("no SessionClosed for {p}"));
        assert_eq!(reason, "the daemon is shutting down");
    }
    drop(idle);
}

/// The narrowest attack: the counter filled and `O_NONBLOCK` cleared between
/// the daemon's check and its write. Timing-dependent: the test sweeps the
/// moment of our last write around the daemon's, for a bounded time, and
/// requires only that nothing stalls; the daemon's log says how often its
/// write really blocked and was interrupted.
#[test]
fn eventfd_filled_and_made_blocking_between_check_and_write() {
    let a = Arena::start();
    // Our own write can lose the race and block: have it interrupted.
    shmlink_endpoint::sys::write_guard::protect_this_thread().expect("guard the attacker");
    let end = std::time::Instant::now() + Duration::from_secs(3);
    let (mut closed, mut too_late, mut undecided, mut delay) = (0u32, 0u32, 0u32, 0u32);
    let mut s = a.open("echo");
    while std::time::Instant::now() < end {
        match hostile::race_blocking_flood(&mut s, 4000, delay, Duration::from_secs(2)) {
            hostile::RaceOutcome::TooLate => {
                too_late += 1;
                delay = delay.saturating_sub(1 + delay / 8);
            }
            outcome => {
                if outcome == hostile::RaceOutcome::Closed {
                    closed += 1;
                } else {
                    undecided += 1;
                }
                delay += 1 + delay / 8;
                s = a.open("echo");
            }
        }
    }
    let interrupted =
        a.h.daemon_log()
            .matches("an eventfd write has blocked")
            .count();
    eprintln!(
        "race: {closed} sessions closed, {too_late} too late, {undecided} undecided, \
         {interrupted} blocked daemon writes interrupted (last delay {delay})"
    );
    assert!(
        a.honest.progresses(1, Duration::from_secs(2)),
        "the honest client stalled"
    );
    a.finish();
}
