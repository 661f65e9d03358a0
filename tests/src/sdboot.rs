//! A throw-away systemd, booted as PID 1 in fresh namespaces, for testing the
//! systemd deployment (units, D-Bus activation, bus policy, journald) for real.
//!
//! [`SdBoot::boot`] runs `tests/sdboot/sdboot.sh up`: new mount, PID, UTS, IPC,
//! network and cgroup namespaces, a tmpfs overlay of the host's root (the host's
//! files are never written), read-only bind mounts of the directories a test
//! needs (under `/mnt`), and `/lib/systemd/systemd --system` as PID 1 with the
//! system bus running. It takes well under a second here.
//!
//! Clean-up is guaranteed three ways: [`SdBoot::shutdown`] powers the guest off
//! and reports whether its cgroup and state are gone; dropping an [`SdBoot`]
//! (also while a test panics) does the same; and if the test process dies
//! without unwinding (SIGKILL, abort), a guard process that holds the read end
//! of a pipe from this process sees end-of-file and powers the guest off.
//!
//! Needs root, util-linux (`unshare`, `nsenter`, `setpriv`, `findmnt`),
//! systemd and dbus on the host.

use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// PATH inside the guest.
const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Default limit on one command run inside the guest.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Path of the boot script, `tests/sdboot/sdboot.sh`.
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sdboot/sdboot.sh")
}

/// True when this process runs as root (booting needs it).
pub fn is_root() -> bool {
    // /proc/self/status: "Uid:\treal\teffective\tsaved\tfs".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The result of a command run inside the guest.
#[derive(Debug)]
pub struct Run {
    /// What was run, for messages.
    pub command: String,
    /// Exit status (of `timeout`, which passes the command's through; 124 on timeout).
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
    /// Wall-clock time the command took.
    pub elapsed: Duration,
}

impl Run {
    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics, showing everything the command printed, unless it exited 0;
    /// returns its standard output.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert!(self.success(), "command failed: {self}");
        &self.stdout
    }

    /// Panics, showing everything the command printed, if it exited 0.
    #[track_caller]
    pub fn failed(&self) -> &Self {
        assert!(!self.success(), "command unexpectedly succeeded: {self}");
        self
    }

    /// Standard output and standard error together.
    pub fn all_output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` ({}, {:.2?})\n--- stdout\n{}\n--- stderr\n{}",
            self.command, self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// A booted guest systemd. Dropping it powers the guest off and removes its
/// cgroup and state directory.
#[derive(Debug)]
pub struct SdBoot {
    state: PathBuf,
    cgroup: PathBuf,
    pid1: u32,
    guard: Option<Child>,
    guard_pipe: Option<ChildStdin>,
    boot_time: Duration,
}

impl SdBoot {
    /// Boots a guest, showing each `(host_dir, guest_dir)` of `binds`
    /// read-only inside (use paths under `/mnt`: the guest's `/tmp` is wiped at
    /// boot). Returns once `systemctl is-system-running` says `running`.
    pub fn boot(binds: &[(&Path, &str)]) -> io::Result<SdBoot> {
        if !is_root() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "booting systemd in namespaces needs root",
            ));
        }
        let name = format!(
            "{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let state = std::env::temp_dir().join("shmlink-sdboot").join(&name);
        std::fs::create_dir_all(state.parent().expect("state has a parent"))?;

        // The guard first, so that even a failure half-way through `up` is cleaned.
        let mut guard = Command::new("bash")
            .arg(script_path())
            .arg("guard")
            .arg(&state)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a terminal's ^C must not kill it before it cleans up.
            .process_group(0)
            .spawn()?;
        let guard_pipe = guard.stdin.take();
        let mut sd = SdBoot {
            state,
            cgroup: PathBuf::new(),
            pid1: 0,
            guard: Some(guard),
            guard_pipe,
            boot_time: Duration::ZERO,
        };

        let started = Instant::now();
        let mut up = Command::new("bash");
        up.arg(script_path()).arg("up").arg(&sd.state);
        for (host, guest) in binds {
            let host = host.canonicalize()?;
            let mut spec = host.into_os_string();
            spec.push(":");
            spec.push(guest);
            up.arg(spec);
        }
        let out = up.stdin(Stdio::null()).output()?;
        sd.boot_time = started.elapsed();
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "sdboot up failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        // Last line: "<host PID of the guest's PID 1> <its cgroup directory>".
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (pid1, cgroup) = stdout
            .lines()
            .last()
            .and_then(|l| l.trim().split_once(' '))
            .and_then(|(pid, cg)| Some((pid.parse().ok()?, PathBuf::from(cg))))
            .ok_or_else(|| io::Error::other(format!("sdboot up printed no PID: {stdout:?}")))?;
        sd.pid1 = pid1;
        sd.cgroup = cgroup;
        Ok(sd)
    }

    /// Host PID of the guest's PID 1.
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// How long booting took (until `systemctl is-system-running` said `running`).
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The guest's cgroup directory on the host.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// A command that runs `program` inside the guest (all its namespaces, its
    /// root), with a clean environment (`PATH`, `LANG=C.UTF-8`, `HOME=/root`)
    /// plus `env`, killed after `timeout`.
    pub fn command(&self, env: &[(&str, &str)], timeout: Duration, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.pid1.to_string())
            .arg("-a")
            .arg("--")
            .arg("timeout")
            .arg("--kill-after=5")
            .arg(format!("{}", timeout.as_secs_f64()))
            .arg(program)
            .env_clear()
            .env("PATH", GUEST_PATH)
            .env("LANG", "C.UTF-8")
            .env("HOME", "/root")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `args` inside the guest (see [`SdBoot::command`]) with extra
    /// environment `env` and a time limit, and collects its output.
    pub fn run_with(&self, env: &[(&str, &str)], timeout: Duration, args: &[&str]) -> Run {
        let (program, rest) = args.split_first().expect("a command");
        let started = Instant::now();
        let out = self
            .command(env, timeout, program)
            .args(rest)
            .output()
            .expect("spawning nsenter");
        Run {
            command: args.join(" "),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        }
    }

    /// Runs `args` inside the guest with the default time limit.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_with(&[], DEFAULT_COMMAND_TIMEOUT, args)
    }

    /// Runs a `bash -euo pipefail -c SCRIPT` inside the guest with the default time limit.
    pub fn sh(&self, script: &str) -> Run {
        let mut run = self.run(&["bash", "-euo", "pipefail", "-c", script]);
        run.command = format!("bash -c {script:?}");
        run
    }

    /// Polls `probe` every 50 ms until it returns `Ok`, or panics with `what`
    /// and the last probe's error once `deadline` has passed.
    #[track_caller]
    pub fn wait_for<T>(
        &self,
        what: &str,
        deadline: Duration,
        mut probe: impl FnMut() -> Result<T, String>,
    ) -> T {
        let started = Instant::now();
        loop {
            match probe() {
                Ok(value) => return value,
                Err(last) if started.elapsed() >= deadline => {
                    panic!("timed out after {deadline:?} waiting for {what}; last: {last}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Powers the guest off and checks that its cgroup and state directory are
    /// gone.
    pub fn shutdown(mut self) -> io::Result<Duration> {
        self.teardown()
    }

    fn teardown(&mut self) -> io::Result<Duration> {
        let started = Instant::now();
        // Closing the pipe makes the guard run `sdboot.sh down`.
        drop(self.guard_pipe.take());
        if let Some(mut guard) = self.guard.take() {
            guard.wait()?;
        }
        let mut leftovers = Vec::new();
        if !self.cgroup.as_os_str().is_empty() && self.cgroup.exists() {
            leftovers.push(self.cgroup.display().to_string());
        }
        if self.state.exists() {
            leftovers.push(self.state.display().to_string());
        }
        if self.pid1 != 0 && Path::new(&format!("/proc/{}", self.pid1)).exists() {
            // PID reuse would make this a false alarm, but not within a second.
            leftovers.push(format!("process {}", self.pid1));
        }
        if leftovers.is_empty() {
            Ok(started.elapsed())
        } else {
            Err(io::Error::other(format!(
                "guest not cleaned up: {}",
                leftovers.join(", ")
            )))
        }
    }
}

impl Drop for SdBoot {
    fn drop(&mut self) {
        if self.guard.is_some() {
            if let Err(err) = self.teardown() {
                let _ = writeln!(io::stderr(), "sdboot: {err}");
            }
        }
    }
}
