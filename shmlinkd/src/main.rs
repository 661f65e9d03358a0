//! shmlinkd: the shmlink broker daemon. See `shmlinkd --help`.

mod overrides;
mod systemd;

use anyhow::{Context, Result};
use clap::Parser;
use overrides::Overrides;
use shmlink_server::config::{Config, DEFAULT_CONFIG_PATH};
use shmlink_server::{builtin, signals, Bus, Daemon, Names};
use std::os::fd::AsFd;
use std::path::PathBuf;

/// Shared-memory session broker: hands out sealed memfd ring pairs over D-Bus.
#[derive(Parser, Debug)]
// The name `--version` prints and the first line of `--help`, kept word for word.
#[command(
    name = "shmlink-server",
    version,
    about = "shmlink broker library (Service trait, session table, D-Bus registration, event loop) and the shmlinkd daemon"
)]
struct Args {
    /// Serve on the session bus (the default, unless D-Bus activation gave an address).
    #[arg(long, conflicts_with_all = ["system", "address"])]
    session: bool,
    /// Serve on the system bus.
    #[arg(long, conflicts_with = "address")]
    system: bool,
    /// Serve on the bus at this address (e.g. unix:path=/tmp/bus).
    #[arg(long, value_name = "ADDR")]
    address: Option<String>,
    /// Configuration file (default /etc/shmlink/shmlinkd.toml, if present).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Well-known name to own instead of org.shmlink.Broker1 (a second broker
    /// with its own configuration beside the system's).
    #[arg(long, value_name = "BUS_NAME")]
    name: Option<String>,
    /// Object path of the broker object (default: derived from --name, e.g.
    /// org.example.Frames1 → /org/example/Frames1).
    #[arg(long, value_name = "OBJECT_PATH")]
    path: Option<String>,
    #[command(flatten)]
    overrides: Overrides,
}

/// The names `--name` and `--path` give (shmlinkd's own by default).
fn names(args: &Args) -> Result<Names> {
    let names = match &args.name {
        Some(n) => Names::new(n)?,
        None => Names::default(),
    };
    Ok(match &args.path {
        Some(p) => names.with_path(p)?,
        None => names,
    })
}

fn load_config(args: &Args) -> Result<Config> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p, true)?,
        None => Config::load(DEFAULT_CONFIG_PATH.as_ref(), false)?,
    };
    args.overrides.apply(&mut cfg);
    cfg.validate()?;
    Ok(cfg)
}

/// Lifts the soft open-file limit to the hard one: every session holds
/// several fds, and the soft limit (often 1024) would cap sessions first.
fn raise_fd_limit() {
    if let Err(err) = rlimit::increase_nofile_limit(u64::MAX) {
        log::warn!("could not raise the open-file limit: {err}");
    }
}

/// Bounds what glibc's malloc keeps resident after a message buffer is
/// freed. Message buffers are charged to their owner's uid only while held;
/// left alone, glibc's adaptive thresholds keep freed buffers of up to
/// 32 MiB in each worker thread's arena, resident but charged to no one.
///
/// Buffers above [`MMAP_THRESHOLD`] get a mapping of their own, returned to
/// the kernel when freed; smaller ones are reused from the worker's arena,
/// which gives back free memory above [`TRIM_THRESHOLD`] at its top. (A
/// threshold of 128 KiB bounded the slack too, but mapping and faulting in
/// every 1 MiB message cut the sink's throughput at that size from about
/// 11 to 1.5 GB/s.)
fn bound_freed_buffers() {
    #[cfg(target_env = "gnu")]
    {
        for (param, value, name) in [
            (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD, "mmap"),
            (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD, "trim"),
        ] {
            // SAFETY: mallopt only sets a tuning parameter of the allocator,
            // and it is called before the daemon starts any thread.
            if unsafe { libc::mallopt(param, value) } != 1 {
                log::warn!(
                    "could not set the allocator's {name} threshold; freed buffers may stay resident"
                );
            }
        }
    }
}

/// Buffers larger than this get their own mapping (see [`bound_freed_buffers`]).
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: i32 = 4 << 20;
/// Free memory above this at the top of an arena goes back to the kernel.
#[cfg(target_env = "gnu")]
const TRIM_THRESHOLD: i32 = 8 << 20;

fn main() -> Result<()> {
    systemd::init_logging();
    let args = Args::parse();
    let stop = signals::termination_fd().context("cannot set up signal handling")?;
    let config = load_config(&args).context("configuration rejected")?;
    let names = names(&args).context("bad --name or --path")?;
    let serving = format!("serving {}", names.bus_name());
    raise_fd_limit();
    bound_freed_buffers();
    let bus = if args.system {
        Bus::System
    } else if let Some(a) = &args.address {
        Bus::Address(a.clone())
    } else if args.session {
        Bus::Session
    } else if let Ok(a) = std::env::var("DBUS_STARTER_ADDRESS") {
        Bus::Address(a)
    } else {
        Bus::Session
    };
    let daemon = Daemon::create_named(&bus, names, config, builtin::all())
        .context("cannot start shmlinkd")?;
    systemd::notify_ready(&serving);
    let result = daemon.run(Some(stop.as_fd()));
    systemd::notify_stopping();
    result.context("shmlinkd stopped with an error")?;
    log::info!("shmlinkd exiting");
    Ok(())
}
