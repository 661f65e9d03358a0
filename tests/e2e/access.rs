//! Access control and limits: a second uid (`nobody`, via `setpriv`) cannot
//! touch root's sessions but can open its own; every limit refuses with an
//! error that names it and leaves nothing half-created; services restricted
//! in the configuration refuse other users; a bad configuration stops the
//! daemon at start with a clear message.

use shmlink_interfaces::error;
use shmlink_tests::hostile::hostile_binary;
use shmlink_tests::{daemon_binary, wait_until, BusLimits, Harness, DEADLINE};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// uid and gid of `nobody`/`nogroup` on Debian.
const NOBODY: u32 = 65534;

fn as_nobody() -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(shmlink_tests::world_executable(&hostile_binary()));
    c
}

/// Runs `hostile-client ADDR ARGS...` as nobody and returns its output.
fn nobody_runs(h: &Harness, args: &[&str]) -> Output {
    as_nobody()
        .arg(h.address())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv hostile-client")
}

/// A session opened by nobody, alive until dropped.
struct NobodySession {
    child: Child,
    path: String,
}

impl NobodySession {
    fn open(h: &Harness, service: &str) -> Result<NobodySession, String> {
        let mut child = as_nobody()
            .args([h.address(), "open", service])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn setpriv hostile-client open");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read a line");
        match line.trim().strip_prefix("PATH ") {
            Some(p) => Ok(NobodySession {
                path: p.to_owned(),
                child,
            }),
            None => {
                let _ = child.wait();
                Err(line.trim().to_owned())
            }
        }
    }
}

impl Drop for NobodySession {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn assert_denied(out: &Output, what: &str) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: expected a refusal, got {text:?}"
    );
    assert!(
        text.starts_with(&format!("ERR {}", error::ACCESS_DENIED)),
        "{what}: {text:?}"
    );
}

#[test]
fn another_uid_cannot_close_or_read_roots_session_but_can_open_its_own() {
    let h = Harness::start();
    let root = h.client();
    let mut mine = root
        .session("sink")
        .capacity(4096)
        .open()
        .expect("root opens");
    mine.send(b"root's data").expect("send");
    assert_denied(
        &nobody_runs(&h, &["close", mine.path()]),
        "nobody closes root's session",
    );
    assert_denied(
        &nobody_runs(&h, &["counters", mine.path()]),
        "nobody reads root's counters",
    );
    assert_eq!(h.session_count(), 1, "the refused Close closed something");

    // nobody's own session: recorded with its uid; root may close it.
    let theirs = NobodySession::open(&h, "echo").expect("nobody opens its own session");
    let entry = root
        .list_sessions()
        .expect("ListSessions")
        .into_iter()
        .find(|e| e.path == theirs.path)
        .expect("nobody's session is listed");
    assert_eq!(entry.uid, NOBODY);
    assert_eq!(
        entry.pid,
        theirs.child.id(),
        "the session records the caller's pid from the bus"
    );
    root.close_session(&theirs.path)
        .expect("root may close anyone's session");
    assert_eq!(h.session_count(), 1);
    mine.finish().expect("finish");
    assert_eq!(mine.recv().expect("end"), None);
    let counters = mine.counters().expect("the owner reads its counters");
    assert_eq!(counters.bytes_to_server, 11);
}

fn open_err(c: &shmlink::Client, capacity: u64) -> shmlink::Error {
    match c.session("echo").capacity(capacity).open() {
        Ok(s) => panic!("expected a refusal, got {}", s.path()),
        Err(e) => e,
    }
}

fn assert_limit(e: &shmlink::Error, limit: &str) {
    assert_eq!(e.dbus_name(), Some(error::LIMIT_EXCEEDED), "{e}");
    assert!(e.to_string().contains(limit), "{e} should name {limit}");
}

#[test]
fn session_count_limits_name_themselves_and_create_nothing() {
    let h = Harness::with_args(&["--sessions-per-connection", "3", "--sessions-per-user", "5"]);
    let a = h.client();
    let mut held: Vec<_> = (0..3)
        .map(|_| a.session("echo").capacity(4096).open().expect("open"))
        .collect();
    assert_limit(&open_err(&a, 4096), "sessions_per_connection");
    assert_eq!(h.session_count(), 3);
    let b = h.client();
    held.push(
        b.session("echo")
            .capacity(4096)
            .open()
            .expect("another connection may open"),
    );
    held.push(
        b.session("echo")
            .capacity(4096)
            .open()
            .expect("another connection may open"),
    );
    assert_limit(&open_err(&b, 4096), "sessions_per_user");
    assert_eq!(h.session_count(), 5);
    // Refusals left no trace: freeing one slot allows exactly one more.
    held.pop().expect("one").close().expect("close");
    held.push(b.session("echo").capacity(4096).open().expect("room again"));
    assert_limit(&open_err(&b, 4096), "sessions_per_user");
    for s in &mut held {
        s.send(b"x").expect("the held sessions still work");
        assert_eq!(s.recv().expect("recv").as_deref(), Some(&b"x"[..]));
    }
}

#[test]
fn memory_limits_name_themselves_and_create_nothing() {
    // A 4096-byte session costs 2 × (8128 + 64) = 16384 bytes of rings plus
    // 16384 bytes of fixed overhead.
    let h = Harness::with_args(&["--memory-per-user", "80000", "--memory-total", "1000000000"]);
    let c = h.client();
    let a1 = c.session("echo").capacity(4096).open().expect("open");
    let a2 = c.session("echo").capacity(4096).open().expect("open");
    assert_limit(&open_err(&c, 4096), "memory_per_user");
    assert_eq!(h.session_count(), 2);
    drop(a2);
    assert!(wait_until(DEADLINE, || h.session_count() == 1));
    let _a2 = c
        .session("echo")
        .capacity(4096)
        .open()
        .expect("the freed memory is available again");
    drop(a1);

    let h = Harness::with_args(&["--memory-per-user", "1000000000", "--memory-total", "80000"]);
    let c = h.client();
    let _b1 = c.session("echo").capacity(4096).open().expect("open");
    let _b2 = c.session("echo").capacity(4096).open().expect("open");
    assert_limit(&open_err(&c, 4096), "memory_total");
    assert_eq!(h.session_count(), 2);
    // A session of another user counts against the total too.
    let out = as_nobody()
        .args([h.address(), "open", "echo"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("ERR {}", error::LIMIT_EXCEEDED))
            && text.contains("memory_total"),
        "{text}"
    );
    assert_eq!(h.session_count(), 2);
}

#[test]
fn capacity_and_message_limits() {
    let h = Harness::with_args(&["--max-capacity", "65536", "--max-message", "1000"]);
    let c = h.client();
    let e = open_err(&c, 65537);
    assert_eq!(e.dbus_name(), Some(error::INVALID_CAPACITY), "{e}");
    assert!(
        e.to_string().contains("65536"),
        "{e} should name the maximum"
    );
    assert_eq!(h.session_count(), 0);
    let mut s = c
        .session("echo")
        .capacity(65536)
        .open()
        .expect("at the maximum is fine");
    assert_eq!(s.max_message(), 1000);
    let e = s
        .send(&[0u8; 1001])
        .expect_err("a message over max_message is refused locally");
    assert!(
        e.to_string()
            .contains("exceeds the session maximum of 1000"),
        "{e}"
    );
    s.send(&[5u8; 1000]).expect("at the maximum is fine");
    assert_eq!(s.recv().expect("recv").map(|m| m.len()), Some(1000));
    // A source asked for larger messages than the daemon carries is refused.
    let e = c
        .session("source")
        .option("message-size", 1001u64)
        .open()
        .map(|_| ())
        .expect_err("refused");
    assert_eq!(e.dbus_name(), Some(error::INVALID_OPTION), "{e}");
    assert_eq!(h.session_count(), 1);
}

#[test]
fn services_restricted_by_configuration() {
    let h = Harness::with_config(
        BusLimits::Tests,
        "[services.echo]\nallow_users = [0]\n\n[services.source]\nallow_groups = [65534]\n\n[services.sink]\nallow_groups = [4242]\n",
    );
    let e = NobodySession::open(&h, "echo")
        .err()
        .expect("nobody may not use echo");
    assert!(
        e.starts_with(&format!("ERR {}", error::ACCESS_DENIED)) && e.contains("echo"),
        "{e}"
    );
    let e = NobodySession::open(&h, "sink")
        .err()
        .expect("nobody is not in group 4242");
    assert!(
        e.starts_with(&format!("ERR {}", error::ACCESS_DENIED)),
        "{e}"
    );
    let allowed = NobodySession::open(&h, "source").expect("nogroup may use source");
    assert_eq!(h.session_count(), 1);
    let mut r = h
        .client()
        .session("echo")
        .capacity(4096)
        .open()
        .expect("root may use echo");
    r.send(b"ok").expect("send");
    assert_eq!(r.recv().expect("recv").as_deref(), Some(&b"ok"[..]));
    drop(allowed);
}

/// Runs shmlinkd with `args` and returns its exit status and stderr; it must exit by itself.
fn daemon_refuses(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(daemon_binary())
        .args(["--address", "unix:path=/nonexistent/shmlink-never-used"])
        .args(args)
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shmlinkd");
    let end = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("shmlinkd {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    (status, err)
}

#[test]
fn bad_configuration_stops_the_daemon_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("shmlink-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cases: [(&str, &str); 5] = [
        ("[limits]\nmax_capcity = 1\n", "max_capcity"),
        (
            "[limits]\nmax_capacity = 1\n",
            "limits.max_capacity must be at least 64",
        ),
        (
            "[limits]\nsessions_per_user = 0\n",
            "sessions_per_user must be at least 1",
        ),
        ("[services.echo]\nallow_users = [\"root\"]\n", "allow_users"),
        ("this is not toml", "invalid configuration"),
    ];
    for (i, (text, expect)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).expect("write config");
        let (status, err) = daemon_refuses(&["--config", path.to_str().expect("utf-8")]);
        assert!(!status.success(), "shmlinkd accepted {text:?}");
        assert!(
            err.contains(expect),
            "for {text:?} the message should mention {expect:?}:\n{err}"
        );
        assert!(
            err.contains(path.to_str().expect("utf-8")) || err.contains("invalid configuration"),
            "{err}"
        );
    }
    let (status, err) = daemon_refuses(&["--config", "/nonexistent/shmlinkd.toml"]);
    assert!(
        !status.success() && err.contains("cannot read /nonexistent/shmlinkd.toml"),
        "{err}"
    );
    let (status, err) = daemon_refuses(&["--memory-total", "10"]);
    assert!(!status.success() && err.contains("memory_total"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
