//! Child processes for tests, the demo and the benchmark: a private
//! `dbus-daemon` and a `shmlinkd` attached to it, both kept in the
//! foreground, killed and reaped on drop (nothing daemonizes: orphans are not
//! reaped on every machine), and killed by the kernel if the thread that
//! started them ends first. Also the `/proc` readings the leak checks use.
#![deny(missing_docs)]

use dbus::blocking::Connection;
use rustix::process::{Pid, Signal};
use shmlink_interfaces::{Bus, DBUS_NAME, DBUS_PATH};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a child gets to start or stop before we give up.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a child process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program is not installed.
    #[error("{program} not found: {hint}")]
    Missing {
        /// The program.
        program: String,
        /// What to install.
        hint: String,
    },
    /// Starting or talking to it failed.
    #[error("{0}")]
    Failed(String),
}

/// Timeout of the D-Bus calls made while waiting for the daemon.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh directory under the system temp dir, removed when dropped.
fn temp_dir(prefix: &str) -> Result<TempDir, ProcessError> {
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir()
        .map_err(|e| ProcessError::Failed(format!("cannot create a temporary directory: {e}")))
}

/// A daemon configuration file in a fresh directory, removed when dropped.
pub struct ConfigFile {
    _dir: TempDir,
    path: PathBuf,
}

impl ConfigFile {
    /// Writes `toml` as `shmlinkd.toml` in a fresh directory.
    pub fn new(toml: &str) -> Result<ConfigFile, ProcessError> {
        let dir = temp_dir("shmlinkd-config")?;
        let path = dir.path().join("shmlinkd.toml");
        std::fs::write(&path, toml)
            .map_err(|e| ProcessError::Failed(format!("cannot write {}: {e}", path.display())))?;
        Ok(ConfigFile { _dir: dir, path })
    }

    /// The file's path, for `--config`.
    pub fn path(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temporary path")
    }
}

/// Makes the child get SIGKILL when the thread that started it ends, so that
/// a test binary or demo killed outright leaves no bus or daemon behind
/// (nothing else would stop them: orphans are not reaped here).
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and makes only
    // the prctl and getppid system calls (rustix issues them directly: no
    // allocation, no lock), which are async-signal-safe; it touches no memory
    // shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // The parent may have died before prctl took effect.
            if rustix::process::getppid() == Some(Pid::INIT) {
                return Err(std::io::Error::other("parent exited during spawn"));
            }
            Ok(())
        })
    }
}

fn terminate(child: &mut Child, grace: Duration) -> std::io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // The pid is our own unreaped child, so it cannot have been reused.
    rustix::process::kill_process(Pid::from_child(child), Signal::TERM)?;
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    log::warn!(
        "pid {} ignored SIGTERM for {grace:?}; killing it",
        child.id()
    );
    child.kill()?;
    child.wait()
}

/// The limits a private bus enforces on each connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BusLimits {
    /// dbus-daemon's built-in limits on bytes, fds and message size (those
    /// of the system bus), with the counts of connections, match rules and
    /// pending replies raised so that a test may open thousands of
    /// connections and calls.
    #[default]
    Tests,
    /// The system bus's: no `<limit>` at all, so dbus-daemon's built-in
    /// defaults apply (per connection 64 fds and 127 MiB in flight and 128
    /// pending replies; 32 MiB and 16 fds per message; 256 connections per
    /// uid). `/usr/share/dbus-1/system.conf` sets none either.
    System,
    /// The session bus's (`/usr/share/dbus-1/session.conf`): bytes, fds and
    /// message size all but unlimited (1 GB), the counts raised too.
    Session,
}

impl BusLimits {
    /// The `<limit>` elements of this kind of bus.
    fn elements(self) -> String {
        const COUNTS: &str = r#"<limit name="max_connections_per_user">10000</limit>
  <limit name="max_completed_connections">10000</limit>
  <limit name="max_incomplete_connections">1000</limit>
  <limit name="max_match_rules_per_connection">50000</limit>
  <limit name="max_replies_per_connection">50000</limit>"#;
        const BYTES: &str = r#"<limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_incoming_unix_fds">250000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_outgoing_unix_fds">250000000</limit>
  <limit name="max_message_size">1000000000</limit>"#;
        match self {
            BusLimits::Tests => COUNTS.to_owned(),
            BusLimits::System => String::new(),
            BusLimits::Session => format!("{COUNTS}\n  {BYTES}"),
        }
    }
}

/// A private `dbus-daemon` on its own socket in a temporary directory.
pub struct PrivateBus {
    child: Child,
    address: String,
    // Holds the socket, config and log; removed on drop, after the bus
    // stopped (`Drop::drop` runs before the fields drop).
    _dir: TempDir,
}

impl PrivateBus {
    /// Starts `dbus-daemon --nofork` with a policy that lets any local user
    /// connect, own names and call anything ([`BusLimits::Tests`]), and
    /// returns once it printed its address.
    pub fn start() -> Result<PrivateBus, ProcessError> {
        Self::start_with(BusLimits::Tests, None)
    }

    /// Like [`PrivateBus::start`], with a `<servicedir>` for D-Bus activation.
    pub fn start_with_services(service_dir: Option<&Path>) -> Result<PrivateBus, ProcessError> {
        Self::start_with(BusLimits::Tests, service_dir)
    }

    /// Like [`PrivateBus::start`], enforcing `limits`.
    pub fn start_with_limits(limits: BusLimits) -> Result<PrivateBus, ProcessError> {
        Self::start_with(limits, None)
    }

    fn start_with(
        limits: BusLimits,
        service_dir: Option<&Path>,
    ) -> Result<PrivateBus, ProcessError> {
        let fail = |m: String| ProcessError::Failed(m);
        let dir = temp_dir("shmlink-bus")?;
        let servicedir = service_dir
            .map(|d| format!("<servicedir>{}</servicedir>", d.display()))
            .unwrap_or_default();
        let config = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  {servicedir}
  <policy context="default">
    <!-- Any local user may connect: tests run clients under other uids. -->
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  {limits}
</busconfig>
"#,
            dir = dir.path().display(),
            limits = limits.elements()
        );
        let cfg_path = dir.path().join("bus.conf");
        std::fs::write(&cfg_path, config)
            .map_err(|e| fail(format!("cannot write {}: {e}", cfg_path.display())))?;
        // dbus-daemon's own warnings (e.g. it may not raise its fd limit) go to a log beside it.
        let bus_log = std::fs::File::create(dir.path().join("bus.log")).map_err(|e| {
            fail(format!(
                "cannot create the bus log in {}: {e}",
                dir.path().display()
            ))
        })?;
        let mut child = die_with_parent(&mut Command::new("dbus-daemon"))
            .arg("--nofork")
            .arg(format!("--config-file={}", cfg_path.display()))
            .arg("--print-address=1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(bus_log)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    ProcessError::Missing {
                        program: "dbus-daemon".into(),
                        hint:
                            "install the Debian package dbus-daemon (apt-get install dbus-daemon)"
                                .into(),
                    }
                } else {
                    fail(format!("cannot start dbus-daemon: {e}"))
                }
            })?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let address = line.trim().to_owned();
        if read.is_err() || address.is_empty() {
            let _ = terminate(&mut child, Duration::from_secs(2));
            return Err(fail(
                "dbus-daemon exited without printing its address".into(),
            ));
        }
        log::debug!("private bus at {address} (pid {})", child.id());
        Ok(PrivateBus {
            child,
            address,
            _dir: dir,
        })
    }

    /// The bus address, for `--address` or `DBUS_SESSION_BUS_ADDRESS`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The bus, for `shmlink::Client::connect`.
    pub fn bus(&self) -> Bus {
        Bus::Address(self.address.clone())
    }

    /// The dbus-daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the bus and waits for it.
    pub fn stop(mut self) -> std::io::Result<ExitStatus> {
        terminate(&mut self.child, Duration::from_secs(5))
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// Finds the `shmlinkd` binary: `$SHMLINKD`, next to the running executable
/// (or one level up, for test binaries in `target/*/deps`), then `$PATH`.
pub fn locate_daemon() -> Result<PathBuf, ProcessError> {
    if let Some(p) = std::env::var_os("SHMLINKD") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let cand = dir.join("shmlinkd");
            if cand.is_file() {
                return Ok(cand);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let cand = dir.join("shmlinkd");
            if cand.is_file() {
                return Ok(cand);
            }
        }
    }
    Err(ProcessError::Missing {
        program: "shmlinkd".into(),
        hint: "build it with `cargo build --workspace` (it is looked for next to this program, then in $SHMLINKD and $PATH)"
            .into(),
    })
}

/// A `shmlinkd` child process serving a bus.
pub struct DaemonProcess {
    child: Option<Child>,
    log: PathBuf,
    // Holds the log; removed on drop, after the daemon was killed.
    _dir: TempDir,
}

impl DaemonProcess {
    /// Starts `program --address ADDRESS ARGS...` and waits until it owns
    /// `org.shmlink.Broker1` (or fails with its log).
    pub fn start(
        program: &Path,
        address: &str,
        args: &[&str],
    ) -> Result<DaemonProcess, ProcessError> {
        let fail = |m: String| ProcessError::Failed(m);
        let dir = temp_dir("shmlinkd")?;
        let log = dir.path().join("shmlinkd.log");
        let log_file = std::fs::File::create(&log)
            .map_err(|e| fail(format!("cannot create {}: {e}", log.display())))?;
        let child = die_with_parent(&mut Command::new(program))
            .arg("--address")
            .arg(address)
            .args(args)
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env(
                "RUST_LOG",
                std::env::var("SHMLINKD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| fail(format!("cannot start {}: {e}", program.display())))?;
        let mut d = DaemonProcess {
            child: Some(child),
            log,
            _dir: dir,
        };
        d.wait_for_name(address)?;
        Ok(d)
    }

    fn wait_for_name(&mut self, address: &str) -> Result<(), ProcessError> {
        let fail = |m: String| ProcessError::Failed(m);
        let channel = Bus::Address(address.into())
            .connect()
            .map_err(|e| fail(format!("cannot connect to {address}: {e}")))?;
        let conn = Connection::from(channel);
        let proxy = conn.with_proxy(DBUS_NAME, DBUS_PATH, CALL_TIMEOUT);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let (owned,): (bool,) = proxy
                .method_call(DBUS_NAME, "NameHasOwner", (shmlink_interfaces::BUS_NAME,))
                .map_err(|e| fail(format!("NameHasOwner failed: {e}")))?;
            if owned {
                return Ok(());
            }
            let child = self.child.as_mut().expect("child present until stopped");
            if let Ok(Some(status)) = child.try_wait() {
                return Err(fail(format!(
                    "shmlinkd exited with {status} before owning its name:\n{}",
                    self.log_text()
                )));
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "shmlinkd did not own its name within {START_TIMEOUT:?}:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(mut self) -> std::io::Result<ExitStatus> {
        let mut child = self.child.take().expect("child present until stopped");
        terminate(&mut child, START_TIMEOUT)
    }

    /// Sends SIGKILL and reaps the daemon.
    pub fn kill(mut self) -> std::io::Result<ExitStatus> {
        let mut child = self.child.take().expect("child present until stopped");
        let killed = child.kill();
        let status = child.wait()?;
        killed.map(|()| status)
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Number of open fds of process `pid`, from `/proc/PID/fd` (0 if unreadable).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A numeric field of `/proc/PID/status`: `VmRSS` (kB), `Threads`, ... (0 if absent).
pub fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `cond` until it holds or `limit` passes.
    fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + limit;
        while !cond() {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// The state letter of `/proc/PID/stat` (`Z` for a zombie), None once reaped.
    fn proc_state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.chars().next()
    }

    #[test]
    fn a_private_bus_answers_and_leaves_nothing_behind() {
        let bus = PrivateBus::start().expect("start dbus-daemon");
        let pid = bus.pid();
        let dir = bus._dir.path().to_owned();
        assert!(dir.join("bus.conf").is_file());
        let conn = Connection::from(bus.bus().connect().expect("connect to the private bus"));
        let proxy = conn.with_proxy(DBUS_NAME, DBUS_PATH, CALL_TIMEOUT);
        let (id,): (String,) = proxy.method_call(DBUS_NAME, "GetId", ()).expect("GetId");
        assert!(!id.is_empty());
        drop(conn);
        bus.stop().expect("stop the bus");
        assert_eq!(proc_state(pid), None, "the bus was not reaped");
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }

    #[test]
    fn each_kind_of_bus_carries_the_messages_its_limits_allow() {
        // Above the built-in 32 MiB, below session.conf's limit.
        let big = "x".repeat(40 << 20);
        for (limits, carried) in [
            (BusLimits::System, false),
            (BusLimits::Tests, false),
            (BusLimits::Session, true),
        ] {
            let bus = PrivateBus::start_with_limits(limits).expect("start dbus-daemon");
            let conn = Connection::from(bus.bus().connect().expect("connect to the private bus"));
            let proxy = conn.with_proxy(DBUS_NAME, DBUS_PATH, CALL_TIMEOUT);
            // No such name: an error either way, from the bus if it took the
            // call; a bus that refuses the message drops the connection.
            let r: Result<(String,), _> =
                proxy.method_call(DBUS_NAME, "GetNameOwner", (big.as_str(),));
            assert!(r.is_err(), "{limits:?}");
            let after: Result<(String,), _> = proxy.method_call(DBUS_NAME, "GetId", ());
            assert_eq!(after.is_ok(), carried, "{limits:?}: {after:?}");
        }
    }

    #[test]
    fn a_child_dies_with_the_thread_that_started_it() {
        let pid = std::thread::spawn(|| {
            let bus = PrivateBus::start().expect("start dbus-daemon");
            let pid = bus.pid();
            // Neither stopped nor dropped: only the death signal can end it.
            std::mem::forget(bus);
            pid
        })
        .join()
        .expect("the starting thread");
        assert!(
            within(Duration::from_secs(10), || proc_state(pid) == Some('Z')),
            "dbus-daemon {pid} outlived the thread that started it (state {:?})",
            proc_state(pid)
        );
    }

    #[test]
    fn a_daemon_that_exits_before_owning_its_name_is_an_error_with_its_log() {
        use std::os::unix::fs::PermissionsExt;
        let bus = PrivateBus::start().expect("start dbus-daemon");
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = dir.path().join("fake-shmlinkd");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho \"no broker here: $*\" >&2\nexit 3\n",
        )
        .expect("write the fake daemon");
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = match DaemonProcess::start(&fake, bus.address(), &["--extra"]) {
            Ok(_) => panic!("the fake daemon cannot own org.shmlink.Broker1"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("exited with exit status: 3"), "{err}");
        let args = format!("no broker here: --address {} --extra", bus.address());
        assert!(err.contains(&args), "{err}");
    }

    /// `bash -c SCRIPT` with null stdio, run until killed. The script
    /// starts with only fds 0, 1 and 2: whatever another test thread had
    /// open (and inheritable) at the fork is closed first.
    fn bash(script: &str) -> Child {
        let script = format!(
            "for fd in $(ls /proc/$$/fd); do [ \"$fd\" -gt 2 ] && eval \"exec $fd<&-\"; done 2>/dev/null; {script}"
        );
        Command::new("bash")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bash")
    }

    #[test]
    fn proc_readings_describe_the_process() {
        // The same program, one with two more fds open.
        let mut plain = bash("exec sleep 30");
        // `{var}<` opens on a free fd (10 or above).
        let mut more = bash("exec {a}</dev/null {b}</dev/null; exec sleep 30");
        let (a, b) = (plain.id(), more.id());
        // Sleeping in `sleep` itself: exec'd, and past the loader (which
        // holds a library's fd open for a moment while it maps it).
        let is_sleep = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
                && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('S'))
                })
        };
        // Poll until both sleep (the fds are set by then).
        let started = within(Duration::from_secs(10), || is_sleep(a) && is_sleep(b));
        let (fds_a, fds_b) = (fd_count(a), fd_count(b));
        let (threads, rss) = (proc_status(a, "Threads"), proc_status(a, "VmRSS"));
        let unknown = proc_status(a, "NoSuchField");
        for c in [&mut plain, &mut more] {
            c.kill().expect("kill sleep");
            c.wait().expect("reap sleep");
        }
        assert!(started, "sleep did not start");
        assert!(fds_a >= 3, "stdin, stdout and stderr at least: {fds_a}");
        assert_eq!(fds_b, fds_a + 2);
        assert_eq!(threads, 1);
        assert!(rss > 0);
        assert_eq!(unknown, 0);
        assert_eq!(fd_count(a), 0, "a reaped process has no fds to count");
    }
}
