//! Nothing leaks: 10,000 sessions opened and closed three ways (Close, a
//! SIGKILLed client process, a dropped bus connection) bring the daemon's open
//! fds back to exactly their baseline and its resident memory back to within a
//! small tolerance, read from `/proc/PID/fd` and `/proc/PID/status`.

use shmlink_tests::hostile::{self, hostile_binary, open_many};
use shmlink_tests::{fd_count, proc_status, wait_until, Harness, DEADLINE};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Sessions opened per batch (one pipelined burst of OpenSession calls).
const BATCH: usize = 100;
/// Resident memory the daemon may keep above its baseline after the churn:
/// malloc keeps some freed memory in its arenas (one per worker thread) rather
/// than returning every page to the kernel. A leak of even 100 bytes per
/// session would show as 1 MB more; a leaked ring (2 × 4 KiB) as 80 MB.
const RSS_TOLERANCE_KB: u64 = 2048;

fn open_batch(ch: &dbus::channel::Channel, n: usize) -> Vec<hostile::OpenReply> {
    open_many(ch, "echo", 64, n)
        .into_iter()
        .map(|r| r.expect("OpenSession"))
        .collect()
}

/// Closes `BATCH` sessions at a time by calling `Close`, holding their fds meanwhile.
fn churn_by_close(h: &Harness, n: usize) {
    let ch = hostile::channel(h.address());
    for _ in 0..n / BATCH {
        let replies = open_batch(&ch, BATCH);
        let paths: Vec<String> = replies.iter().map(|r| r.0.to_string()).collect();
        for r in hostile::close_many(&ch, &paths) {
            r.expect("Close");
        }
        drop(replies);
    }
}

/// Each client process opens `BATCH` sessions and is SIGKILLed.
fn churn_by_sigkill(h: &Harness, n: usize) {
    for _ in 0..n / BATCH {
        let mut child = Command::new(hostile_binary())
            .args([h.address(), "hold", "echo", &BATCH.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn hostile-client hold");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("READY line");
        assert_eq!(
            line.trim(),
            format!("READY {BATCH}"),
            "hostile-client hold failed"
        );
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }
}

/// Each connection opens `BATCH` sessions, then leaves the bus while still
/// holding the fds; the fds go only once the daemon has closed the sessions
/// (so it is the disconnect, not the hang-up, that ends them).
fn churn_by_disconnect(h: &Harness, n: usize) {
    for _ in 0..n / BATCH {
        let ch = hostile::channel(h.address());
        let held = open_batch(&ch, BATCH);
        drop(ch);
        assert!(
            wait_until(DEADLINE, || h.session_count() == 0),
            "sessions of a disconnected client linger: {}",
            h.session_count()
        );
        drop(held);
    }
}

#[test]
fn ten_thousand_sessions_leave_no_fd_and_no_memory_behind() {
    let h = Harness::start();
    let pid = h.daemon_pid();
    // Warm up every path once so that lazily grown tables and allocator
    // arenas are part of the baseline.
    churn_by_close(&h, 2 * BATCH);
    churn_by_sigkill(&h, BATCH);
    churn_by_disconnect(&h, BATCH);
    assert!(wait_until(DEADLINE, || h.session_count() == 0));
    let fds0 = fd_count(pid);
    let rss0 = proc_status(pid, "VmRSS");
    let start = Instant::now();

    churn_by_close(&h, 3400);
    churn_by_sigkill(&h, 3300);
    churn_by_disconnect(&h, 3300);
    assert!(
        wait_until(DEADLINE, || h.session_count() == 0),
        "{} sessions still open after the churn",
        h.session_count()
    );
    let took = start.elapsed();
    let settled = wait_until(DEADLINE, || fd_count(pid) == fds0);
    let (fds1, rss1) = (fd_count(pid), proc_status(pid, "VmRSS"));
    eprintln!(
        "10,000 sessions in {took:.1?}: daemon fds {fds0} -> {fds1}, VmRSS {rss0} kB -> {rss1} kB ({:+} kB)",
        rss1 as i64 - rss0 as i64
    );
    assert!(settled, "daemon fds went from {fds0} to {fds1}");
    assert!(
        rss1 <= rss0 + RSS_TOLERANCE_KB,
        "daemon VmRSS grew from {rss0} kB to {rss1} kB (tolerance {RSS_TOLERANCE_KB} kB)"
    );
    // And it still serves.
    let mut s = h
        .client()
        .session("echo")
        .capacity(4096)
        .timeout(Duration::from_secs(10))
        .open()
        .expect("open");
    s.send(b"after 10k").expect("send");
    assert_eq!(s.recv().expect("recv").as_deref(), Some(&b"after 10k"[..]));
}
