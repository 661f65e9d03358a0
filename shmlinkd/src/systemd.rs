//! systemd integration: logging to the journal and readiness notification.
//!
//! Nothing here links libsystemd; the protocols are spoken by pure-Rust crates.
//!
//! * **Logging** ([`init_logging`]): when systemd connected our stderr to the
//!   journal (`$JOURNAL_STREAM` names the `device:inode` fd 2 is open on),
//!   records go to journald's native socket as structured fields
//!   (`systemd-journal-logger`), so `journalctl -p warning -u shmlinkd` filters
//!   by level and `RUST_TARGET=` by module. Otherwise (a terminal, a pipe, a
//!   test harness) `env_logger` writes to stderr. Either way `RUST_LOG` selects
//!   what is logged, `info` by default.
//! * **Notification** ([`notify_ready`], [`notify_stopping`]): `sd_notify(3)`
//!   messages to `$NOTIFY_SOCKET` (`sd-notify`). Without `$NOTIFY_SOCKET` (not
//!   started by systemd, or a unit without `NotifyAccess=`) they do nothing.

use log::kv::{self, Key, Source, Value, VisitSource};
use log::{Level, Log, Metadata, Record};
use sd_notify::NotifyState;
use systemd_journal_logger::JournalLog;

/// Filter used when `RUST_LOG` is unset or empty.
const DEFAULT_FILTER: &str = "info";

/// Status line shown by `systemctl status` while shutting down.
const STOPPING_STATUS: &str = "Shutting down";

/// Sets up the process-wide logger; call it once, first thing in `main`.
///
/// Logs go to journald when stderr is the journal (as
/// [`systemd_journal_logger::connected_to_journal`] tells from
/// `$JOURNAL_STREAM` and `fstat` of fd 2), and to stderr through `env_logger`
/// otherwise, including when journald's socket cannot be reached. `RUST_LOG`
/// filters in both cases (default `info`). A second call leaves the first
/// logger in place.
pub fn init_logging() {
    let directives = filter_directives(std::env::var("RUST_LOG").ok());
    let journal_error = if systemd_journal_logger::connected_to_journal() {
        match JournalLog::new() {
            Ok(journal) => {
                let logger = JournalLogger::new(journal, &directives);
                let max_level = logger.filter.filter();
                if log::set_boxed_logger(Box::new(logger)).is_ok() {
                    log::set_max_level(max_level);
                }
                return;
            }
            Err(err) => Some(err),
        }
    } else {
        None
    };
    let _ = env_logger::Builder::new()
        .parse_filters(&directives)
        .target(env_logger::Target::Stderr)
        .try_init();
    if let Some(err) = journal_error {
        log::warn!("stderr is the journal stream, but journald cannot be reached ({err}); logging to stderr");
    }
}

/// The `RUST_LOG` directives to use: the variable's value, or
/// [`DEFAULT_FILTER`] when it is unset or blank.
fn filter_directives(rust_log: Option<String>) -> String {
    match rust_log {
        Some(value) if !value.trim().is_empty() => value,
        _ => DEFAULT_FILTER.to_owned(),
    }
}

/// Tells systemd that start-up is complete (`READY=1`) and sets the status line
/// `systemctl status` shows. A no-op when not started by systemd.
pub fn notify_ready(status: &str) {
    let status = one_line(status);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Tells systemd that the daemon is shutting down (`STOPPING=1`). A no-op when
/// not started by systemd.
pub fn notify_stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status(STOPPING_STATUS)]);
}

/// Sends one notification; a failure is logged, never fatal.
fn send(states: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(states) {
        log::warn!("sd_notify to $NOTIFY_SOCKET failed: {err}");
    }
}

/// A status is one `KEY=VALUE` line: a newline would start another assignment.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

/// The journal backend: applies the `RUST_LOG` filter and adapts each record
/// before handing it to `journal` (a [`JournalLog`] outside tests).
struct JournalLogger<L> {
    filter: env_filter::Filter,
    journal: L,
}

impl<L: Log> JournalLogger<L> {
    fn new(journal: L, directives: &str) -> Self {
        JournalLogger {
            filter: env_filter::Builder::new().parse(directives).build(),
            journal,
        }
    }
}

impl<L: Log> Log for JournalLogger<L> {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.filter.matches(record) {
            return;
        }
        let fields = WithRustTarget {
            target: record.target(),
            rest: record.key_values(),
        };
        let adapted = record
            .to_builder()
            .level(journal_level(record.level()))
            .key_values(&fields)
            .build();
        self.journal.log(&adapted);
    }

    fn flush(&self) {
        self.journal.flush();
    }
}

/// The level to hand [`JournalLog`] so that the entry gets the syslog(3)
/// priority of `level`: error 3, warning 4, info 6, debug and trace 7.
///
/// [`JournalLog`] maps error, warn, info, debug, trace to 3, 4, 5, 6, 7, i.e.
/// info to *notice*; shmlinkd's informational lines are `info` (6), so that
/// `journalctl -p notice` leaves them out.
fn journal_level(level: Level) -> Level {
    match level {
        Level::Error => Level::Error,
        Level::Warn => Level::Warn,
        Level::Info => Level::Debug,
        Level::Debug | Level::Trace => Level::Trace,
    }
}

/// A record's own key-values preceded by `RUST_TARGET=<target>`, the field
/// `journalctl RUST_TARGET=shmlink_server::engine` selects on.
struct WithRustTarget<'a> {
    target: &'a str,
    rest: &'a dyn Source,
}

impl Source for WithRustTarget<'_> {
    fn visit<'kvs>(&'kvs self, visitor: &mut dyn VisitSource<'kvs>) -> Result<(), kv::Error> {
        visitor.visit_pair(Key::from_str("RUST_TARGET"), Value::from(self.target))?;
        self.rest.visit(visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What a captured record carried.
    #[derive(Debug, PartialEq)]
    struct Captured {
        level: Level,
        target: String,
        message: String,
        fields: Vec<(String, String)>,
    }

    /// Stands in for [`JournalLog`]: keeps every record it is given.
    #[derive(Default)]
    struct Capture(Mutex<Vec<Captured>>);

    impl Log for Capture {
        fn enabled(&self, _: &Metadata) -> bool {
            true
        }

        fn log(&self, record: &Record) {
            struct Fields(Vec<(String, String)>);
            impl<'kvs> VisitSource<'kvs> for Fields {
                fn visit_pair(&mut self, k: Key<'kvs>, v: Value<'kvs>) -> Result<(), kv::Error> {
                    self.0.push((k.to_string(), v.to_string()));
                    Ok(())
                }
            }
            let mut fields = Fields(Vec::new());
            record.key_values().visit(&mut fields).unwrap();
            self.0.lock().unwrap().push(Captured {
                level: record.level(),
                target: record.target().to_owned(),
                message: record.args().to_string(),
                fields: fields.0,
            });
        }

        fn flush(&self) {}
    }

    /// The priority [`JournalLog`] writes for a level, as its documentation states.
    fn journal_log_priority(level: Level) -> u8 {
        match level {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 5,
            Level::Debug => 6,
            Level::Trace => 7,
        }
    }

    fn emit(logger: &impl Log, level: Level, target: &str, message: &str) {
        let fields = [("session", 7u64)];
        logger.log(
            &Record::builder()
                .level(level)
                .target(target)
                .args(format_args!("{message}"))
                .key_values(&fields)
                .build(),
        );
    }

    #[test]
    fn rust_log_defaults_to_info() {
        assert_eq!(filter_directives(None), "info");
        assert_eq!(filter_directives(Some(String::new())), "info");
        assert_eq!(filter_directives(Some(" \t".into())), "info");
        assert_eq!(
            filter_directives(Some("shmlink_server=debug".into())),
            "shmlink_server=debug"
        );
    }

    #[test]
    fn journal_entries_carry_syslog_priorities_and_rust_target() {
        let logger = JournalLogger::new(Capture::default(), "trace");
        let levels = [
            (Level::Error, 3),
            (Level::Warn, 4),
            (Level::Info, 6),
            (Level::Debug, 7),
            (Level::Trace, 7),
        ];
        for (level, _) in levels {
            emit(&logger, level, "shmlink_server::engine", "session 7 opened");
        }
        let captured = logger.journal.0.into_inner().unwrap();
        assert_eq!(captured.len(), levels.len());
        for ((level, priority), entry) in levels.into_iter().zip(&captured) {
            assert_eq!(
                journal_log_priority(entry.level),
                priority,
                "{level} became {entry:?}"
            );
            assert_eq!(entry.target, "shmlink_server::engine");
            assert_eq!(entry.message, "session 7 opened");
            assert_eq!(
                entry.fields,
                [
                    ("RUST_TARGET".into(), "shmlink_server::engine".into()),
                    ("session".into(), "7".into()),
                ]
            );
        }
    }

    #[test]
    fn journal_entries_follow_rust_log() {
        let logger = JournalLogger::new(Capture::default(), "warn,shmlink_server::engine=debug");
        let debug_engine = Metadata::builder()
            .level(Level::Debug)
            .target("shmlink_server::engine")
            .build();
        let info_daemon = Metadata::builder()
            .level(Level::Info)
            .target("shmlink_server::daemon")
            .build();
        assert!(logger.enabled(&debug_engine));
        assert!(!logger.enabled(&info_daemon));

        emit(&logger, Level::Info, "shmlink_server::daemon", "dropped");
        emit(
            &logger,
            Level::Warn,
            "shmlink_server::daemon",
            "kept warning",
        );
        emit(
            &logger,
            Level::Debug,
            "shmlink_server::engine",
            "kept debug",
        );
        emit(&logger, Level::Trace, "shmlink_server::engine", "dropped");
        let messages: Vec<String> = logger
            .journal
            .0
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|c| c.message)
            .collect();
        assert_eq!(messages, ["kept warning", "kept debug"]);
    }

    #[test]
    fn a_status_cannot_add_assignments() {
        let status = one_line("up\nMAINPID=1\r\nREADY=1");
        assert_eq!(status, "up MAINPID=1  READY=1");
        let rendered = NotifyState::Status(&status).to_string();
        assert_eq!(rendered.lines().count(), 1, "{rendered:?}");
    }
}
