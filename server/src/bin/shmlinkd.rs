//! shmlinkd: the shmlink broker daemon. See `shmlinkd --help`.

use anyhow::{Context, Result};
use clap::Parser;
use shmlink_server::config::{Config, DEFAULT_CONFIG_PATH};
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
    /// Override limits.max_capacity (bytes per ring).
    #[arg(long, value_name = "BYTES")]
    max_capacity: Option<u64>,
    /// Override limits.max_message (bytes per message).
    #[arg(long, value_name = "BYTES")]
    max_message: Option<u64>,
    /// Override limits.sessions_per_connection.
    #[arg(long, value_name = "N")]
    sessions_per_connection: Option<u32>,
    /// Override limits.sessions_per_user.
    #[arg(long, value_name = "N")]
    sessions_per_user: Option<u32>,
    /// Override limits.memory_per_user (bytes of rings).
    #[arg(long, value_name = "BYTES")]
    memory_per_user: Option<u64>,
    /// Override limits.memory_total (bytes of rings).
    #[arg(long, value_name = "BYTES")]
    memory_total: Option<u64>,
    /// Override engine.workers (0: one per CPU).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

fn load_config(args: &Args) -> Result<Config> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p, true)?,
        None => Config::load(DEFAULT_CONFIG_PATH.as_ref(), false)?,
    };
    let l = &mut cfg.limits;
    if let Some(v) = args.max_capacity {
        l.max_capacity = v;
    }
    if let Some(v) = args.max_message {
        l.max_message = v;
    }
    if let Some(v) = args.sessions_per_connection {
        l.sessions_per_connection = v;
    }
    if let Some(v) = args.sessions_per_user {
        l.sessions_per_user = v;
    }
    if let Some(v) = args.memory_per_user {
        l.memory_per_user = v;
    }
    if let Some(v) = args.memory_total {
        l.memory_total = v;
    }
    if let Some(v) = args.workers {
        cfg.engine.workers = v;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max
    {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid, initialised rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            log::warn!(
                "could not raise the open-file limit: {}",
                std::io::Error::last_os_error()
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
