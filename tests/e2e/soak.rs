//! Soak: 32 clients at once open sessions, stream verified data, get
//! SIGKILLed, misbehave, drop their connections and close, for a bounded time
//! (10 s by default; `SHMLINK_SOAK_SECS=600` for a long run). The daemon must
//! survive, every honest byte must arrive intact, and its fd count and memory
//! must come back to where they started.

use fastrand::Rng;
use shmlink_tests::hostile::{hostile_binary, RawSession};
use shmlink_tests::{fd_count, payload, proc_status, wait_until, Harness, DEADLINE};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: u64 = 32;
/// Resident memory the daemon may keep above its warmed-up baseline (malloc arenas).
const RSS_TOLERANCE_KB: u64 = 8192;

fn soak_time() -> Duration {
    let secs = std::env::var("SHMLINK_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

#[derive(Default)]
struct Tally {
    echo_msgs: AtomicU64,
    sink_bytes: AtomicU64,
    killed: AtomicU64,
    attacks: AtomicU64,
    sessions: AtomicU64,
}

/// Echo round trips, verified, then Close.
fn honest_echo(bus: &shmlink::Bus, rng: &mut Rng, t: &Tally) {
    let c = shmlink::Client::connect(bus).expect("connect");
    let mut s = c
        .session("echo")
        .capacity(4096 << rng.u64(..6))
        .timeout(Duration::from_secs(20))
        .open()
        .expect("open echo");
    for i in 0..(1 + rng.u64(..200)) {
        let m = payload(rng.u64(..), rng.u64(..70_000) as usize);
        s.send(&m).expect("echo send");
        let back = s.recv().expect("echo recv").expect("echo ended early");
        assert!(back == m, "echo message {i} came back different");
        t.echo_msgs.fetch_add(1, Ordering::Relaxed);
    }
    s.close().expect("Close");
    t.sessions.fetch_add(1, Ordering::Relaxed);
}

/// A sink transfer checked by CRC-32, then the session is dropped (hang-up).
fn honest_sink(bus: &shmlink::Bus, rng: &mut Rng, t: &Tally) {
    let c = shmlink::Client::connect(bus).expect("connect");
    let mut s = c
        .session("sink")
        .capacity(65536)
        .timeout(Duration::from_secs(20))
        .open()
        .expect("open sink");
    let mut crc = crc32fast::Hasher::new();
    let mut bytes = 0u64;
    for _ in 0..(1 + rng.u64(..100)) {
        let m = payload(rng.u64(..), rng.u64(..200_000) as usize);
        crc.update(&m);
        bytes += m.len() as u64;
        s.send(&m).expect("sink send");
    }
    s.finish().expect("finish");
    assert_eq!(s.recv().expect("sink end"), None);
    let st = s.service_state().expect("ServiceState");
    assert_eq!(st.get("bytes").and_then(|v| v.0.as_u64()), Some(bytes));
    assert_eq!(
        st.get("crc32").and_then(|v| v.0.as_u64()),
        Some(u64::from(crc.finalize())),
        "sink checksum"
    );
    t.sink_bytes.fetch_add(bytes, Ordering::Relaxed);
    t.sessions.fetch_add(1, Ordering::Relaxed);
}

/// A client process streaming into sink, SIGKILLed mid-stream.
fn killed_process(address: &str, rng: &mut Rng, t: &Tally) {
    let mut child = Command::new(hostile_binary())
        .args([address, "stream"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn hostile-client stream");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("PATH line");
    assert!(line.starts_with("PATH "), "hostile-client stream: {line:?}");
    // Let it stream for a moment (it blocks on a full ring at worst).
    let until = Instant::now() + Duration::from_millis(rng.u64(..50));
    while Instant::now() < until && child.try_wait().expect("try_wait").is_none() {
        std::thread::yield_now();
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    t.killed.fetch_add(1, Ordering::Relaxed);
    t.sessions.fetch_add(1, Ordering::Relaxed);
}

/// A raw session that breaks a rule, or just vanishes mid-stream.
fn misbehave(address: &str, rng: &mut Rng, t: &Tally) {
    let mut s = RawSession::open(
        address,
        if rng.u64(..2) == 0 { "echo" } else { "sink" },
        4096,
    )
    .expect("raw open");
    let _ = s.send_message(&payload(rng.u64(..), 3000), Duration::from_secs(5));
    match rng.u64(..5) {
        0 => {
            s.to_server.set_count(usize::MAX);
            s.poke();
        }
        1 => {
            s.send_header(0, u32::MAX);
        }
        2 => {
            let _ = s.write_hangup(b"x");
        }
        3 => {
            if let Some(fd) = &s.to_client.empty_signal {
                let _ = shmlink_tests::hostile::flood(std::os::fd::AsFd::as_fd(fd));
            }
            let _ = s.send_message(b"wake", Duration::from_secs(5));
        }
        _ => {
            // Leave the bus with the session open.
            s.conn = None;
        }
    }
    t.attacks.fetch_add(1, Ordering::Relaxed);
    t.sessions.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn thirty_two_clients_churning() {
    let h = Harness::start();
    let pid = h.daemon_pid();
    let tally = Arc::new(Tally::default());
    // Warm up each kind once so allocator arenas and tables are in the baseline.
    {
        let mut rng = Rng::with_seed(0x5eed);
        honest_echo(&h.bus(), &mut rng, &tally);
        honest_sink(&h.bus(), &mut rng, &tally);
        killed_process(h.address(), &mut rng, &tally);
        misbehave(h.address(), &mut rng, &tally);
        assert!(wait_until(DEADLINE, || h.session_count() == 0));
    }
    let fds0 = fd_count(pid);
    let rss0 = proc_status(pid, "VmRSS");
    let end = Instant::now() + soak_time();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (bus, address, t) = (h.bus(), h.address().to_owned(), tally.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::with_seed(
                    0x9E37_79B9_7F4A_7C15 ^ (i + 1).wrapping_mul(0x1234_5678_9abc_def1),
                );
                while Instant::now() < end {
                    match i % 4 {
                        0 => honest_echo(&bus, &mut rng, &t),
                        1 => honest_sink(&bus, &mut rng, &t),
                        2 => killed_process(&address, &mut rng, &t),
                        _ => misbehave(&address, &mut rng, &t),
                    }
                }
            })
        })
        .collect();
    let mut peak_fds = 0;
    while threads.iter().any(|t| !t.is_finished()) {
        peak_fds = peak_fds.max(fd_count(pid));
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "shmlinkd died during the soak"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for t in threads {
        t.join().expect("a soak client failed");
    }
    assert!(
        wait_until(DEADLINE, || h.session_count() == 0),
        "{} sessions left after the soak",
        h.session_count()
    );
    let settled = wait_until(DEADLINE, || fd_count(pid) == fds0);
    let (fds1, rss1) = (fd_count(pid), proc_status(pid, "VmRSS"));
    eprintln!(
        "soak {:?}: {} sessions, {} echo messages verified, {} sink bytes verified, {} clients SIGKILLed, {} attacks; \
         daemon fds {fds0} -> peak {peak_fds} -> {fds1}, VmRSS {rss0} kB -> {rss1} kB",
        soak_time(),
        tally.sessions.load(Ordering::Relaxed),
        tally.echo_msgs.load(Ordering::Relaxed),
        tally.sink_bytes.load(Ordering::Relaxed),
        tally.killed.load(Ordering::Relaxed),
        tally.attacks.load(Ordering::Relaxed),
    );
    assert!(settled, "daemon fds went from {fds0} to {fds1}");
    assert!(
        rss1 <= rss0 + RSS_TOLERANCE_KB,
        "daemon VmRSS grew from {rss0} kB to {rss1} kB"
    );
    assert!(
        tally.echo_msgs.load(Ordering::Relaxed) > 0 && tally.killed.load(Ordering::Relaxed) > 0
    );
    // The daemon still serves.
    let mut s = h
        .client()
        .session("echo")
        .capacity(4096)
        .open()
        .expect("open after the soak");
    s.send(b"done").expect("send");
    assert_eq!(s.recv().expect("recv").as_deref(), Some(&b"done"[..]));
}
