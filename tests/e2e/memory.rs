//! Memory: whatever an unprivileged client makes the daemon hold — rings,
//! a frame being received, a reply nobody reads, channel inboxes — is
//! charged to its uid (a source's output, written in place, holds nothing), so the daemon's resident memory grows by
//! at most `memory_per_user` plus a small fixed overhead. The attacks of
//! `shmlink_tests::memory_attacks` run as `nobody` (under `setpriv`), in
//! both wake-up modes, while an honest client of another uid (root) streams
//! verified data; the sessions that would pass the limit end with a reason
//! naming it, and the daemon stays up.

use shmlink_tests::hostile::{hostile_binary, ClosedWatcher, Honest};
use shmlink_tests::memory_attacks::Attack;
use shmlink_tests::{proc_status, wait_until, Harness, DEADLINE};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// `memory_per_user` of the daemons under attack.
const LIMIT: u64 = 64 << 20;
/// `memory_total`: room for the honest client whatever the attacker holds.
const TOTAL: u64 = 512 << 20;
/// `max_message`: what one attack session tries to make the daemon hold.
const MAX_MESSAGE: u64 = 16 << 20;
/// Attack sessions: without the accounting they would hold several times `LIMIT`.
const SESSIONS: usize = 12;
/// What the daemon may grow by beyond `LIMIT`: allocator slack, the honest
/// client's session, and a received message between the decoder's charge and
/// the outbox's.
const SLACK: u64 = 8 << 20;

/// `hostile-client` run as `nobody`, from a world-executable copy.
fn as_nobody() -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(shmlink_tests::world_executable(&hostile_binary()));
    c
}

/// The daemon's resident memory in bytes.
fn rss(pid: u32) -> u64 {
    proc_status(pid, "VmRSS") * 1024
}

/// Samples a process's resident memory every millisecond until stopped and
/// keeps the highest value (a measurement, not a synchronisation).
struct PeakRss {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl PeakRss {
    fn start(pid: u32) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = rss(pid);
            while !s.load(Ordering::SeqCst) {
                peak = peak.max(rss(pid));
                std::thread::sleep(Duration::from_millis(1));
            }
            peak.max(rss(pid))
        });
        PeakRss { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("sampler")
    }
}

/// An attack running as `nobody`, holding its sessions until dropped.
struct Attacker {
    child: Child,
    summary: String,
}

impl Attacker {
    fn start(h: &Harness, attack: Attack, mode: &str) -> Attacker {
        let mut child = as_nobody()
            .arg(h.address())
            .args(["memory", attack.name(), mode])
            .arg(SESSIONS.to_string())
            .arg(MAX_MESSAGE.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn setpriv hostile-client memory");
        let mut summary = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut summary)
            .expect("read the attack's summary");
        assert!(
            summary.starts_with("READY opened="),
            "the attack failed: {summary:?}; daemon log:\n{}",
            h.daemon_log()
        );
        Attacker { child, summary }
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// What an attack can make the daemon hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holds {
    /// Message buffers up to the limit: the sessions past it end, naming it.
    UpToTheLimit,
    /// No message buffers at all (a service that writes in place): only
    /// the rings, and no session needs to end.
    RingsOnly,
}

/// Runs `attack` in wake-up `mode` against a fresh daemon and checks the bound.
fn bounded(attack: Attack, mode: &str, holds: Holds) {
    let limit = LIMIT.to_string();
    let total = TOTAL.to_string();
    let max_message = MAX_MESSAGE.to_string();
    let h = Harness::with_args(&[
        "--memory-per-user",
        &limit,
        "--memory-total",
        &total,
        "--max-message",
        &max_message,
    ]);
    let mut watcher = ClosedWatcher::new(h.address());
    let honest = Honest::start(h.bus());
    assert!(
        honest.progresses(20, DEADLINE),
        "the honest client does not stream"
    );
    let pid = h.daemon_pid();
    let before = rss(pid);
    let sampler = PeakRss::start(pid);
    let attacker = Attacker::start(&h, attack, mode);
    // The attack is in place; the honest client keeps streaming through it.
    assert!(
        honest.progresses(100, DEADLINE),
        "the honest client stalled under {}: {}",
        attack.name(),
        attacker.summary
    );
    // The sessions past the limit end with a reason naming it.
    let named = holds == Holds::UpToTheLimit
        && wait_until(DEADLINE, || {
            watcher
                .seen()
                .values()
                .any(|r| r.contains("memory_per_user"))
        });
    let peak = sampler.stop();
    let growth = peak.saturating_sub(before);
    let reasons: Vec<String> = watcher.seen().values().cloned().collect();
    eprintln!(
        "{} ({mode}): {} daemon VmRSS {} MiB -> peak {} MiB (+{} KiB, limit {} KiB); {} sessions ended",
        attack.name(),
        attacker.summary.trim(),
        before >> 20,
        peak >> 20,
        growth >> 10,
        LIMIT >> 10,
        reasons.len()
    );
    assert!(
        growth <= LIMIT + SLACK,
        "{} ({mode}) grew the daemon by {growth} bytes, above memory_per_user ({LIMIT}) + {SLACK}",
        attack.name()
    );
    if holds == Holds::RingsOnly {
        // Each session's output ring is full, and nothing else is held:
        // two rings' worth per session at most, and every session lives on.
        let rings = SESSIONS as u64 * (2 << 20);
        assert!(
            growth <= rings + SLACK,
            "{} ({mode}) grew the daemon by {growth} bytes, above its rings ({rings}) + {SLACK}",
            attack.name()
        );
        assert!(
            reasons.is_empty(),
            "attack sessions ended although they hold no buffers: {reasons:?}"
        );
        assert_eq!(h.session_count(), SESSIONS as u32 + 1, "all still open");
    } else {
        assert!(
            named,
            "no attack session of {} ({mode}) ended on memory_per_user; reasons: {reasons:?}",
            attack.name()
        );
        assert!(
            reasons.iter().all(|r| r.contains("memory_per_user")),
            "attack sessions ended for other reasons: {reasons:?}"
        );
        let log = h.daemon_log();
        assert!(
            log.lines()
                .any(|l| l.contains("ended: ") && l.contains("memory_per_user: uid ")),
            "the daemon log does not name the limit:\n{log}"
        );
    }
    // The attacker leaves; everything it held is given back and the honest
    // client, whose every byte was checked, kept going throughout.
    drop(attacker);
    assert!(
        wait_until(DEADLINE, || h.session_count() == 1),
        "the attack's sessions did not end with its process"
    );
    assert!(honest.progresses(20, DEADLINE));
    assert!(honest.finish() > 140);
    let mut s = h
        .client()
        .session("echo")
        .open()
        .expect("the daemon still opens sessions");
    let big = shmlink_tests::payload(9, 4 << 20);
    s.send(&big).expect("send");
    assert_eq!(
        s.recv().expect("recv").as_deref(),
        Some(&big[..]),
        "the limit freed by the attacker is usable again"
    );
}

#[test]
fn a_source_nobody_reads_holds_only_its_rings() {
    // `source` queues each message as a fill that writes it into the ring
    // as room appears: an unread one holds no message buffer at all.
    bounded(Attack::SourceUnread, "park", Holds::RingsOnly);
    bounded(Attack::SourceUnread, "spin", Holds::RingsOnly);
}

#[test]
fn partial_frames_to_sink_are_bounded() {
    bounded(Attack::PartialFrame, "park", Holds::UpToTheLimit);
    bounded(Attack::PartialFrame, "spin", Holds::UpToTheLimit);
}

#[test]
fn echo_replies_nobody_reads_are_bounded() {
    bounded(Attack::EchoUnread, "park", Holds::UpToTheLimit);
    bounded(Attack::EchoUnread, "spin", Holds::UpToTheLimit);
}

#[test]
fn channel_members_that_never_read_are_bounded() {
    bounded(Attack::ChannelUnread, "park", Holds::UpToTheLimit);
    bounded(Attack::ChannelUnread, "spin", Holds::UpToTheLimit);
}
