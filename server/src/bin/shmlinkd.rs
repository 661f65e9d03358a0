//! shmlinkd: the shmlink broker daemon. See `shmlinkd --help`.

use anyhow::{Context, Result};
use clap::Parser;
use shmlink_server::config::{Config, Overrides, DEFAULT_CONFIG_PATH};
use shmlink_server::{builtin, signals, Bus, Daemon};
use std::os::fd::AsFd;
use std::path::PathBuf;

/// Shared-memory session broker: hands out sealed memfd ring pairs over D-Bus.
#[derive(Parser, Debug)]
#[command(version, about)]
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
    #[command(flatten)]
    overrides: Overrides,
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

/// Makes glibc's malloc serve every buffer of 128 KiB or more with a mapping
/// of its own, returned to the kernel when freed. Message buffers are
/// charged to their owner's uid while held; without this, glibc's adaptive
/// threshold keeps freed buffers of up to 32 MiB in each worker thread's
/// arena, resident but charged to no one.
fn large_buffers_unmapped_on_free() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets a tuning parameter of the allocator, and
        // it is called before the daemon starts any thread.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
        if ok != 1 {
            log::warn!(
                "could not set the allocator's mmap threshold; freed buffers may stay resident"
            );
        }
    }
}

fn main() -> Result<()> {
    shmlink_server::systemd::init_logging();
    let args = Args::parse();
    let stop = signals::termination_fd().context("cannot set up signal handling")?;
    let config = load_config(&args).context("configuration rejected")?;
    raise_fd_limit();
    large_buffers_unmapped_on_free();
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
    let daemon = Daemon::create(&bus, config, builtin::all()).context("cannot start shmlinkd")?;
    shmlink_server::systemd::notify_ready("serving org.shmlink.Broker1");
    let result = daemon.run(Some(stop.as_fd()));
    shmlink_server::systemd::notify_stopping();
    result.context("shmlinkd stopped with an error")?;
    log::info!("shmlinkd exiting");
    Ok(())
}
