//! shmlink: talk to shmlinkd from the command line. See `shmlink --help`.

mod bench;
mod close;
mod demo;
mod ping;
mod send;
mod status;

use anyhow::Result;
use clap::{Parser, Subcommand};
use shmlink::Bus;

/// Stream data through shared-memory sessions brokered by shmlinkd over D-Bus.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Bus to use: session, system, or a D-Bus address. `demo` starts a private bus when omitted.
    #[arg(long, global = true, value_name = "session|system|ADDR")]
    bus: Option<Bus>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a private bus and shmlinkd (unless --bus is given), show an echo round trip and a sink transfer.
    Demo(demo::Args),
    /// Check that shmlinkd answers, and time a D-Bus ping and a shared-memory round trip.
    Ping(ping::Args),
    /// Stream FILE (or stdin) into a session with SERVICE; print what comes back, or the sink's verdict.
    Send(send::Args),
    /// Show the daemon's version, services and sessions (like ipcs).
    Status(status::Args),
    /// End a session by its object path (its owner or root only).
    Close(close::Args),
    /// Measure shmlink against Unix sockets, pipes, D-Bus and memcpy (private bus and daemon unless --bus).
    Bench(bench::Args),
    /// The other process of `bench`'s two-process baselines.
    #[command(name = "__bench-peer", hide = true)]
    BenchPeer(bench::PeerArgs),
}

fn main() {
    // Like other Unix tools, end quietly when the reader of our output goes
    // away (`shmlink status | head -1`) instead of panicking in println!.
    // SAFETY: called before any thread starts; SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    let bus = cli.bus.clone();
    let result: Result<()> = match cli.command {
        Cmd::Demo(a) => demo::run(bus, a),
        Cmd::Ping(a) => ping::run(&bus.unwrap_or(Bus::Session), a),
        Cmd::Send(a) => send::run(&bus.unwrap_or(Bus::Session), a),
        Cmd::Status(a) => status::run(&bus.unwrap_or(Bus::Session), a),
        Cmd::Close(a) => close::run(&bus.unwrap_or(Bus::Session), a),
        Cmd::Bench(a) => bench::run(bus, a),
        Cmd::BenchPeer(a) => bench::peer(a),
    };
    if let Err(e) = result {
        eprintln!("shmlink: error: {e:#}");
        std::process::exit(1);
    }
}

/// Formats a byte rate for humans.
pub fn rate(bytes: u64, secs: f64) -> String {
    human_rate(bytes as f64 / secs.max(1e-9))
}

/// Formats bytes per second for humans (GB/s, MB/s or kB/s).
pub fn human_rate(bps: f64) -> String {
    if bps >= 1e9 {
        format!("{:.2} GB/s", bps / 1e9)
    } else if bps >= 1e6 {
        format!("{:.1} MB/s", bps / 1e6)
    } else {
        format!("{:.1} kB/s", bps / 1e3)
    }
}

/// Parses `-o KEY=VALUE`: integers become `t`, `true`/`false` become `b`, the rest `s`.
pub fn parse_option(s: &str) -> Result<(String, OptValue), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("option {s:?} is not KEY=VALUE"))?;
    let v = if let Ok(n) = v.parse::<u64>() {
        OptValue::U64(n)
    } else if let Ok(b) = v.parse::<bool>() {
        OptValue::Bool(b)
    } else {
        OptValue::Str(v.to_owned())
    };
    Ok((k.to_owned(), v))
}

/// A typed `-o` value.
#[derive(Clone, Debug)]
pub enum OptValue {
    /// `t`
    U64(u64),
    /// `b`
    Bool(bool),
    /// `s`
    Str(String),
}

/// Applies `-o` options to a session builder.
pub fn apply_options(
    mut b: shmlink::SessionBuilder,
    opts: &[(String, OptValue)],
) -> shmlink::SessionBuilder {
    for (k, v) in opts {
        b = match v.clone() {
            OptValue::U64(n) => b.option(k, n),
            OptValue::Bool(x) => b.option(k, x),
            OptValue::Str(s) => b.option(k, s),
        };
    }
    b
}
