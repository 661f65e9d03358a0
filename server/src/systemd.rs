//! systemd integration: logging to the journal and readiness notification.
//!
//! Nothing here links libsystemd. Both protocols are small and stable, so they
//! are spoken directly over Unix datagram sockets:
//!
//! * **Logging** ([`init_logging`]): when systemd connected our stderr to the
//!   journal (it says so in `$JOURNAL_STREAM`, and the `device:inode` there
//!   matches what `fstat(2)` reports for fd 2), each record is sent to
//!   journald's native socket as structured fields (`MESSAGE`, `PRIORITY`,
//!   `SYSLOG_IDENTIFIER`, `CODE_FILE`, `CODE_LINE`, `RUST_TARGET`, ...), so
//!   `journalctl -p warning -u shmlinkd` filters by level. Otherwise (a
//!   terminal, a pipe, a test harness) `env_logger` writes to stderr. Either way
//!   `RUST_LOG` selects what is logged, `info` by default.
//! * **Notification** ([`notify_ready`], [`notify_status`],
//!   [`notify_stopping`]): `sd_notify(3)` messages to `$NOTIFY_SOCKET`, a path
//!   or an abstract socket (`@name`). Without `$NOTIFY_SOCKET` (not started by
//!   systemd, or a unit without `NotifyAccess=`) they do nothing.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

use log::{Level, Log, Metadata, Record};

/// Where journald listens for native-protocol datagrams.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Filter used when `RUST_LOG` is unset or empty.
const DEFAULT_FILTER: &str = "info";

/// Sets up the process-wide logger; call it once, first thing in `main`.
///
/// Logs go to journald's native socket when stderr is the journal (checked
/// through `$JOURNAL_STREAM` against `fstat` of fd 2, as `sd_journal_stream_fd`
/// users are expected to), and to stderr through `env_logger` otherwise.
/// `RUST_LOG` filters in both cases (default `info`). A second call leaves the
/// first logger in place.
pub fn init_logging() {
    let directives = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => value,
        _ => DEFAULT_FILTER.to_owned(),
    };
    if stderr_is_journal() {
        let filter = env_filter::Builder::new().parse(&directives).build();
        let max_level = filter.filter();
        if let Ok(logger) = JournalLogger::new(filter) {
            if log::set_boxed_logger(Box::new(logger)).is_ok() {
                log::set_max_level(max_level);
            }
            return;
        }
    }
    let _ = env_logger::Builder::new()
        .parse_filters(&directives)
        .target(env_logger::Target::Stderr)
        .try_init();
}

/// Tells systemd that start-up is complete (`READY=1`) and sets the status line
/// `systemctl status` shows. A no-op when not started by systemd.
pub fn notify_ready(status: &str) {
    send_notify(&format!("READY=1\nSTATUS={}", one_line(status)));
}

/// Updates the free-form status line `systemctl status` shows (`STATUS=`).
/// A no-op when not started by systemd.
pub fn notify_status(status: &str) {
    send_notify(&format!("STATUS={}", one_line(status)));
}

/// Tells systemd that the daemon is shutting down (`STOPPING=1`). A no-op when
/// not started by systemd.
pub fn notify_stopping() {
    send_notify("STOPPING=1\nSTATUS=Shutting down");
}

/// Sends one raw `sd_notify(3)` message (newline-separated `KEY=VALUE`
/// assignments) to `$NOTIFY_SOCKET`.
///
/// Returns `Ok(false)` without doing anything when `$NOTIFY_SOCKET` is unset,
/// `Ok(true)` once the datagram was sent.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => notify_to(&socket, state).map(|()| true),
        None => Ok(false),
    }
}

fn send_notify(state: &str) {
    if let Err(err) = notify(state) {
        log::warn!("sd_notify to $NOTIFY_SOCKET failed: {err}");
    }
}

/// Status lines are single-line `KEY=VALUE` assignments.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

/// Sends `state` to the notification socket named by `socket` (a `NOTIFY_SOCKET`
/// value: an absolute path, or `@` followed by an abstract name).
fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let addr = notify_addr(socket)?;
    let sock = UnixDatagram::unbound()?;
    let sent = sock.send_to_addr(state.as_bytes(), &addr)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to the notification socket",
        ));
    }
    Ok(())
}

fn notify_addr(socket: &OsStr) -> io::Result<SocketAddr> {
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        Some(b'/') => SocketAddr::from_pathname(Path::new(socket)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsupported NOTIFY_SOCKET address {socket:?}"),
        )),
    }
}

/// True when `$JOURNAL_STREAM` names the file fd 2 is open on.
///
/// systemd sets `JOURNAL_STREAM=<device>:<inode>` for services whose stdout or
/// stderr is connected to the journal. The variable is inherited by children
/// whose stderr may point elsewhere, so it only counts when it matches fd 2.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(parse_journal_stream) else {
        return false;
    };
    match stderr_dev_ino() {
        Ok(actual) => actual == (dev, ino),
        Err(_) => false,
    }
}

/// Parses `JOURNAL_STREAM`'s `<device>:<inode>` (both decimal).
fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// `st_dev` and `st_ino` of whatever fd 2 is open on (an `fstat`, not a path lookup).
fn stderr_dev_ino() -> io::Result<(u64, u64)> {
    let fd = io::stderr().as_fd().try_clone_to_owned()?;
    let meta = std::fs::File::from(fd).metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// A `log` backend speaking journald's native protocol.
struct JournalLogger {
    filter: env_filter::Filter,
    socket: UnixDatagram,
    identifier: String,
}

impl JournalLogger {
    fn new(filter: env_filter::Filter) -> io::Result<Self> {
        let identifier = std::env::args_os()
            .next()
            .and_then(|arg0| {
                Path::new(&arg0)
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "shmlinkd".to_owned());
        Ok(Self {
            filter,
            socket: UnixDatagram::unbound()?,
            identifier,
        })
    }
}

impl Log for JournalLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.filter.matches(record) {
            return;
        }
        let message = record.args().to_string();
        let priority = syslog_priority(record.level());
        let payload = journal_payload(&self.identifier, priority, &message, record);
        if self.socket.send_to(&payload, JOURNAL_SOCKET).is_err() {
            // Too large for one datagram, or journald is restarting: stderr is
            // still the journal stream, which honours a `<N>` level prefix.
            let mut stderr = io::stderr().lock();
            for line in message.lines() {
                let _ = writeln!(stderr, "<{priority}>{line}");
            }
        }
    }

    fn flush(&self) {}
}

/// syslog(3) priority for a `log` level.
fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Encodes one record as a native-protocol datagram.
fn journal_payload(identifier: &str, priority: u8, message: &str, record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 256);
    add_field(&mut out, "MESSAGE", message.as_bytes());
    add_field(&mut out, "PRIORITY", priority.to_string().as_bytes());
    add_field(&mut out, "SYSLOG_IDENTIFIER", identifier.as_bytes());
    add_field(&mut out, "RUST_TARGET", record.target().as_bytes());
    if let Some(module) = record.module_path() {
        add_field(&mut out, "RUST_MODULE_PATH", module.as_bytes());
    }
    if let Some(file) = record.file() {
        add_field(&mut out, "CODE_FILE", file.as_bytes());
    }
    if let Some(line) = record.line() {
        add_field(&mut out, "CODE_LINE", line.to_string().as_bytes());
    }
    out
}

/// Appends `NAME=value\n`, or the binary-safe form `NAME\n<u64 LE length>value\n`
/// when the value contains a newline.
fn add_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn journal_stream_parses_device_and_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("0:1"), Some((0, 1)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("8:x"), None);
        assert_eq!(parse_journal_stream(":1"), None);
        assert_eq!(parse_journal_stream("-1:1"), None);
    }

    #[test]
    fn stderr_identity_comes_from_fstat() {
        let (dev, ino) = stderr_dev_ino().expect("fstat fd 2");
        // Whatever fd 2 is in the test harness, the same file seen through
        // /proc must agree (stat follows the magic link to the open file).
        let meta = std::fs::metadata("/proc/self/fd/2").expect("stat /proc/self/fd/2");
        assert_eq!((meta.dev(), meta.ino()), (dev, ino));
    }

    #[test]
    fn plain_and_binary_safe_fields() {
        let mut out = Vec::new();
        add_field(&mut out, "MESSAGE", b"hello");
        assert_eq!(out, b"MESSAGE=hello\n");

        let mut out = Vec::new();
        add_field(&mut out, "MESSAGE", b"two\nlines");
        let mut expected = b"MESSAGE\n".to_vec();
        expected.extend_from_slice(&9u64.to_le_bytes());
        expected.extend_from_slice(b"two\nlines\n");
        assert_eq!(out, expected);
    }

    #[test]
    fn payload_carries_level_identifier_and_location() {
        let args = format_args!("session {} opened", 7);
        let record = Record::builder()
            .args(args)
            .level(Level::Warn)
            .target("shmlink_server::engine")
            .module_path(Some("shmlink_server::engine"))
            .file(Some("server/src/engine.rs"))
            .line(Some(42))
            .build();
        let payload = journal_payload(
            "shmlinkd",
            syslog_priority(Level::Warn),
            "session 7 opened",
            &record,
        );
        let text = String::from_utf8(payload).unwrap();
        for line in [
            "MESSAGE=session 7 opened",
            "PRIORITY=4",
            "SYSLOG_IDENTIFIER=shmlinkd",
            "RUST_TARGET=shmlink_server::engine",
            "CODE_FILE=server/src/engine.rs",
            "CODE_LINE=42",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in {text:?}"
            );
        }
    }

    #[test]
    fn notify_reaches_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("shmlink-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        notify_to(path.as_os_str(), "READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notify_reaches_an_abstract_socket() {
        let name = format!("shmlink-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn notify_rejects_relative_addresses() {
        assert!(notify_to(OsStr::new("relative/notify"), "READY=1").is_err());
        assert!(notify_to(OsStr::new(""), "READY=1").is_err());
    }

    #[test]
    fn status_is_kept_on_one_line() {
        assert_eq!(one_line("a\nb\rc"), "a b c");
    }
}
