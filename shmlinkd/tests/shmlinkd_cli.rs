//! The shmlinkd binary's command line, and what it tells systemd. (Having an
//! integration test here also makes `cargo test --workspace` build `shmlinkd`
//! for the end-to-end tests.)

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Generous limit for anything that should take well under a second.
const DEADLINE: Duration = Duration::from_secs(20);

/// The log line `shmlinkd` writes last on a clean stop.
const EXIT_LINE: &str = "shmlinkd exiting";

/// What `shmlinkd` logs when stderr is the journal but journald is not there.
const NO_JOURNALD: &str = "journald cannot be reached";

fn shmlinkd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shmlinkd"))
}

/// A scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("shmlinkd-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private `dbus-daemon`, killed on drop.
struct PrivateBus {
    child: Child,
    address: String,
}

impl PrivateBus {
    fn start() -> Self {
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (Debian: apt-get install dbus-daemon)");
        let mut address = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut address)
            .expect("dbus-daemon prints its address");
        PrivateBus {
            child,
            address: address.trim().to_owned(),
        }
    }

    /// Whether `name` has an owner on this bus right now.
    fn name_has_owner(&self, name: &str) -> bool {
        let mut channel = dbus::channel::Channel::open_private(&self.address).unwrap();
        channel.register().unwrap();
        let conn = dbus::blocking::Connection::from(channel);
        let proxy = conn.with_proxy("org.freedesktop.DBus", "/org/freedesktop/DBus", DEADLINE);
        let (owned,): (bool,) = proxy
            .method_call("org.freedesktop.DBus", "NameHasOwner", (name,))
            .unwrap();
        owned
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` to exit, up to [`DEADLINE`].
fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("shmlinkd did not exit within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Receives one notification as text, waiting up to [`DEADLINE`].
fn recv_notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification from shmlinkd within {DEADLINE:?}: {e}"));
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// One daemon run on `bus`, as systemd would start it: `NOTIFY_SOCKET` set,
/// stderr in `dir/stderr`, `JOURNAL_STREAM` as given. Checks the `READY=1`
/// and `STOPPING=1` notifications around a stop by `signal`, and returns what
/// the daemon wrote to stderr.
fn serve_and_stop(
    bus: &PrivateBus,
    dir: &Path,
    journal_stream: JournalStream,
    signal: Signal,
) -> String {
    let socket_path = dir.join("notify");
    let _ = std::fs::remove_file(&socket_path);
    let notify = UnixDatagram::bind(&socket_path).unwrap();
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let stderr_path = dir.join("stderr");
    let stderr = File::create(&stderr_path).unwrap();
    let stderr_id = {
        let meta = stderr.metadata().unwrap();
        (meta.dev(), meta.ino())
    };

    let mut cmd = shmlinkd();
    cmd.args(["--address", &bus.address])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    match journal_stream {
        JournalStream::Unset => {}
        JournalStream::OtherFile => {
            cmd.env(
                "JOURNAL_STREAM",
                format!("{}:{}", stderr_id.0, stderr_id.1 + 1),
            );
        }
        JournalStream::Stderr => {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", stderr_id.0, stderr_id.1));
        }
    }
    let mut child = cmd.spawn().unwrap();

    let ready = recv_notification(&notify);
    assert_eq!(ready, "READY=1\nSTATUS=serving org.shmlink.Broker1\n");
    assert!(
        bus.name_has_owner("org.shmlink.Broker1"),
        "READY=1 came before the name was taken"
    );
    notify.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let early = notify
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    assert_eq!(
        early.map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock),
        "nothing else is sent while serving"
    );
    notify.set_nonblocking(false).unwrap();

    kill(Pid::from_raw(child.id() as i32), signal).unwrap();
    let stopping = recv_notification(&notify);
    assert_eq!(stopping, "STOPPING=1\nSTATUS=Shutting down\n");
    let status = wait_exit(&mut child);
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        status.success(),
        "{signal} should stop shmlinkd cleanly: {status}\n{log}"
    );
    log
}

/// What `JOURNAL_STREAM` says, relative to the daemon's stderr.
#[derive(Clone, Copy, Debug)]
enum JournalStream {
    Unset,
    /// Names another file (same device, other inode), as a child of a
    /// journal-connected process whose stderr went elsewhere would see.
    OtherFile,
    /// Names the daemon's stderr.
    Stderr,
}

#[test]
fn help_describes_the_bus_and_limit_options() {
    let out = shmlinkd()
        .arg("--help")
        .output()
        .expect("run shmlinkd --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--session",
        "--system",
        "--address",
        "--config",
        "--max-capacity <BYTES>",
        "--max-message <BYTES>",
        "--sessions-per-connection <N>",
        "--sessions-per-user <N>",
        "--memory-per-user <BYTES>",
        "--memory-total <BYTES>",
        "--workers <N>",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
}

#[test]
fn a_bad_config_file_is_refused_at_start() {
    let dir = TempDir::new("bad-config");
    let cfg = dir.0.join("bad.toml");
    std::fs::write(&cfg, "[limits]\nmax_capacty = 5\n").unwrap();
    let out = shmlinkd()
        .args(["--address", "unix:path=/nonexistent", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_capacty"),
        "the error should name the bad key:\n{err}"
    );
}

#[test]
fn a_flag_overrides_the_config_file_and_is_validated() {
    let dir = TempDir::new("override");
    let cfg = dir.0.join("ok.toml");
    std::fs::write(&cfg, "[limits]\nsessions_per_user = 4\n").unwrap();
    let out = shmlinkd()
        .args([
            "--address",
            "unix:path=/nonexistent",
            "--sessions-per-user",
            "0",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("configuration rejected") && err.contains("sessions_per_user"),
        "--sessions-per-user 0 should be refused:\n{err}"
    );
}

#[test]
fn an_unreachable_bus_is_a_clear_error() {
    let out = shmlinkd()
        .args(["--address", "unix:path=/nonexistent/bus"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to the bus"), "{err}");
}

#[test]
fn notifies_ready_once_serving_and_stopping_on_sigterm_or_sigint() {
    let bus = PrivateBus::start();
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let dir = TempDir::new(&format!("notify-{signal}"));
        let log = serve_and_stop(&bus, &dir.0, JournalStream::Unset, signal);
        assert!(log.contains(EXIT_LINE), "{log}");
    }
}

#[test]
fn logs_go_to_journald_only_when_journal_stream_names_stderr() {
    let bus = PrivateBus::start();
    for journal_stream in [JournalStream::Unset, JournalStream::OtherFile] {
        let dir = TempDir::new(&format!("journal-{journal_stream:?}"));
        let log = serve_and_stop(&bus, &dir.0, journal_stream, Signal::SIGTERM);
        assert!(
            log.contains(EXIT_LINE) && !log.contains(NO_JOURNALD),
            "{journal_stream:?}: stderr should get the log, without trying journald:\n{log}"
        );
    }
    // Stderr is the journal: the records go to journald's socket, or, where
    // journald is not running (as in most test machines), to stderr with a
    // warning that says so.
    let dir = TempDir::new("journal-stderr");
    let log = serve_and_stop(&bus, &dir.0, JournalStream::Stderr, Signal::SIGTERM);
    let journald_used = !log.contains(EXIT_LINE);
    let journald_tried = log.contains(NO_JOURNALD) && log.contains(EXIT_LINE);
    assert!(
        journald_used || journald_tried,
        "with JOURNAL_STREAM naming stderr, logs should go to journald:\n{log}"
    );
}

#[test]
fn name_and_path_make_another_broker() {
    let bus = PrivateBus::start();
    let dir = TempDir::new("shmlinkd-name");
    let socket_path = dir.0.join("notify");
    let notify = UnixDatagram::bind(&socket_path).unwrap();
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut child = shmlinkd()
        .args(["--address", &bus.address, "--name", "org.example.Second1"])
        .args(["--path", "/org/example/Broker"])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = recv_notification(&notify);
    assert_eq!(ready, "READY=1\nSTATUS=serving org.example.Second1\n");
    assert!(bus.name_has_owner("org.example.Second1"));
    assert!(!bus.name_has_owner("org.shmlink.Broker1"));
    let mut channel = dbus::channel::Channel::open_private(&bus.address).unwrap();
    channel.register().unwrap();
    let conn = dbus::blocking::Connection::from(channel);
    let proxy = conn.with_proxy("org.example.Second1", "/org/example/Broker", DEADLINE);
    let (count,): (dbus::arg::Variant<u32>,) = proxy
        .method_call(
            "org.freedesktop.DBus.Properties",
            "Get",
            ("org.shmlink.Broker1", "SessionCount"),
        )
        .expect("the broker object is at --path");
    assert_eq!(count.0, 0);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut child).success());

    let out = shmlinkd()
        .args(["--address", &bus.address, "--name", ":1.5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad --name or --path"), "{err}");
}
