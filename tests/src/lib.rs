//! Test harness: a private `dbus-daemon` and a real `shmlinkd` per test,
//! started as child processes and killed and reaped on drop.
//!
//! Each [`Harness`] has its own bus, so tests run in parallel without
//! seeing each other. Waits poll with a deadline ([`wait_until`]); nothing
//! sleeps to synchronise.
#![deny(missing_docs)]

pub mod attacks;
pub mod fake_broker;
pub mod hostile;
pub mod memory_attacks;
pub mod raw_provider;
pub mod sdboot;

use shmlink::{Bus, Client};
use shmlink_test_support::{locate_daemon, ConfigFile, DaemonProcess, PrivateBus};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The default deadline for things that should happen "soon".
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A private bus with a `shmlinkd` on it, or a broker embedded in the test
/// process under a name of its own ([`Harness::embedded`]).
pub struct Harness {
    // Field order matters: the broker must go before its bus.
    daemon: Option<DaemonProcess>,
    /// Held for its drop, which stops the broker before the bus.
    _embedded: Option<EmbeddedBroker>,
    bus: PrivateBus,
    daemon_args: Vec<String>,
    broker_name: String,
    /// The configuration `--config` names, kept for restarts.
    _config: Option<ConfigFile>,
}

/// The name [`Harness::embedded`]'s broker owns.
pub const EMBEDDED_NAME: &str = "org.shmlink.test.Embedded1";

/// A broker with the built-in services running in a thread of the test
/// process (`Daemon::create_named`), stopped and joined on drop.
pub struct EmbeddedBroker {
    stop: std::os::fd::OwnedFd,
    thread: Option<std::thread::JoinHandle<Result<(), shmlink_server::DaemonError>>>,
}

impl EmbeddedBroker {
    /// Owns `names` on `bus` and serves until dropped.
    pub fn start(bus: &Bus, names: shmlink_server::Names) -> EmbeddedBroker {
        use rustix::event::{eventfd, EventfdFlags};
        use std::os::fd::AsFd;
        let stop = eventfd(0, EventfdFlags::CLOEXEC).expect("stop eventfd");
        let watch = stop.try_clone().expect("dup");
        let daemon = shmlink_server::Daemon::create_named(
            bus,
            names,
            shmlink_server::config::Config::default(),
            shmlink_server::builtin::all(),
        )
        .expect("start the embedded broker");
        let thread = std::thread::spawn(move || daemon.run(Some(watch.as_fd())));
        EmbeddedBroker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let stopped = t.join().expect("the embedded broker's thread");
            if !std::thread::panicking() {
                stopped.expect("the embedded broker stopped cleanly");
            }
        }
    }
}

impl Harness {
    /// A bus and a daemon with default settings.
    pub fn start() -> Harness {
        Self::with_args(&[])
    }

    /// A bus and a daemon started with extra command-line arguments.
    pub fn with_args(args: &[&str]) -> Harness {
        Self::on_bus(BusLimits::Tests, args)
    }

    /// A bus enforcing `limits` and a daemon started with `--config`
    /// naming a file that holds `toml`.
    pub fn with_config(limits: BusLimits, toml: &str) -> Harness {
        let config = ConfigFile::new(toml).expect("write the daemon's configuration");
        let mut h = Self::on_bus(limits, &["--config", config.path()]);
        h._config = Some(config);
        h
    }

    /// A bus enforcing `limits` and a daemon started with extra
    /// command-line arguments.
    pub fn on_bus(limits: BusLimits, args: &[&str]) -> Harness {
        let bus = PrivateBus::start_with_limits(limits).expect("start a private dbus-daemon");
        let daemon =
            DaemonProcess::start(&daemon_binary(), bus.address(), args).expect("start shmlinkd");
        Harness {
            daemon: Some(daemon),
            _embedded: None,
            bus,
            daemon_args: args.iter().map(|s| s.to_string()).collect(),
            broker_name: shmlink_interfaces::BUS_NAME.to_owned(),
            _config: None,
        }
    }

    /// A bus and a broker embedded in this process as [`EMBEDDED_NAME`]
    /// (at the path the D-Bus convention derives), default settings; no
    /// `shmlinkd`. [`Harness::client`] talks to it.
    pub fn embedded() -> Harness {
        let bus = PrivateBus::start().expect("start a private dbus-daemon");
        let names = shmlink_server::Names::new(EMBEDDED_NAME).expect("names");
        let embedded = EmbeddedBroker::start(&bus.bus(), names);
        Harness {
            daemon: None,
            _embedded: Some(embedded),
            bus,
            daemon_args: Vec::new(),
            broker_name: EMBEDDED_NAME.to_owned(),
            _config: None,
        }
    }

    /// The bus address.
    pub fn address(&self) -> &str {
        self.bus.address()
    }

    /// The bus, for `Client::connect`.
    pub fn bus(&self) -> Bus {
        self.bus.bus()
    }

    /// A new client connection to this harness's broker.
    pub fn client(&self) -> Client {
        Client::connect_to(&self.bus(), &self.broker_name).expect("connect to the private bus")
    }

    /// The daemon's pid.
    pub fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().expect("daemon running").pid()
    }

    /// The daemon's log so far.
    pub fn daemon_log(&self) -> String {
        self.daemon
            .as_ref()
            .map(|d| d.log_text())
            .unwrap_or_default()
    }

    /// Takes the daemon process out (to kill or stop it in a test).
    pub fn take_daemon(&mut self) -> DaemonProcess {
        self.daemon.take().expect("daemon running")
    }

    /// Starts a fresh daemon on the same bus with the same arguments.
    pub fn restart_daemon(&mut self) {
        let args: Vec<&str> = self.daemon_args.iter().map(String::as_str).collect();
        self.daemon = Some(
            DaemonProcess::start(&daemon_binary(), self.bus.address(), &args)
                .expect("restart shmlinkd"),
        );
    }

    /// Starts the example provider (`shmlink-frames-provider`, services
    /// `frames` and `digest`) on this harness's bus and waits until the
    /// broker lists its services.
    pub fn start_frames_provider(&self) -> KillOnDrop {
        let child = KillOnDrop(
            std::process::Command::new(frames_provider_binary())
                .args(["--bus", self.address()])
                .env("RUST_LOG", "warn")
                .spawn()
                .expect("start the provider"),
        );
        let client = self.client();
        assert!(
            wait_until(DEADLINE, || client
                .services()
                .is_ok_and(|s| s.iter().any(|n| n == "frames"))),
            "the provider never registered"
        );
        child
    }

    /// `SessionCount` as the daemon reports it.
    pub fn session_count(&self) -> u32 {
        self.client().session_count().expect("read SessionCount")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(d) = &self.daemon {
                eprintln!("--- shmlinkd log ---\n{}--- end of log ---", d.log_text());
            }
        }
    }
}

/// The `shmlinkd` binary cargo built for this test run.
pub fn daemon_binary() -> PathBuf {
    locate_daemon().expect("shmlinkd binary (run the tests with `cargo test --workspace`)")
}

/// The `shmlink` CLI binary cargo built for this test run.
pub fn cli_binary() -> PathBuf {
    let d = daemon_binary();
    let cli = d.with_file_name("shmlink");
    assert!(
        cli.is_file(),
        "{} missing (run the tests with `cargo test --workspace`)",
        cli.display()
    );
    cli
}

/// The example provider's binary, built beside `shmlinkd`.
pub fn frames_provider_binary() -> PathBuf {
    let bin = daemon_binary().with_file_name("shmlink-frames-provider");
    assert!(
        bin.is_file(),
        "{} missing (run the tests with `cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `cond` until it holds or `deadline` passes; returns whether it held.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A deterministic, non-repeating-looking payload of `len` bytes for message
/// `seed`: the same seed and length always give the same bytes, so a
/// receiver (or another process) can recompute what it should get.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    fastrand::Rng::with_seed(seed).fill(&mut bytes);
    bytes
}

pub use shmlink_test_support::{fd_count, proc_status, BusLimits};

/// A copy of `bin` that any user can execute, wherever the build directory is
/// (a checkout under a 0700 home directory is not reachable by `nobody`).
///
/// One copy per binary and test process, in a 0755 directory under the
/// system temp dir (made by `install`, see below); copies left by finished
/// test processes are removed.
pub fn world_executable(bin: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static COPIES: std::sync::Mutex<Vec<(PathBuf, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut copies = COPIES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, copy)) = copies.iter().find(|(src, _)| src == bin) {
        return copy.clone();
    }
    let dir = std::env::temp_dir().join("shmlink-world-exec");
    std::fs::create_dir_all(&dir).expect("create the shared binary directory");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('-').next().unwrap_or("");
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let name = bin
        .file_name()
        .expect("a file")
        .to_string_lossy()
        .into_owned();
    let copy = dir.join(format!("{name}-{}", std::process::id()));
    // Copied by a child process, so that this process never holds the copy
    // open for writing: a child another test thread forks meanwhile would
    // inherit such an fd until it execs, and an exec of the copy in that
    // window fails with ETXTBSY ("Text file busy").
    let installed = std::process::Command::new("install")
        .args(["-m", "0755"])
        .arg(bin)
        .arg(&copy)
        .status()
        .expect("run install");
    assert!(installed.success(), "install {bin:?} {copy:?}: {installed}");
    copies.push((bin.to_path_buf(), copy.clone()));
    copy
}
