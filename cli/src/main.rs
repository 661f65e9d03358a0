//! shmlink: talk to shmlinkd from the command line. See `shmlink --help`.

mod bench;
mod close;
mod demo;
mod ping;
mod send;
mod status;

use anyhow::Result;
use clap::{Parser, Subcommand};
use shmlink::{Bus, Client};
use std::time::Duration;

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
    /// Seconds to wait for the broker: for each D-Bus call, and for each send
    /// or receive that makes no progress (e.g. 2.5).
    #[arg(long, global = true, value_name = "SECONDS", value_parser = parse_timeout,
          default_value = "10")]
    timeout: Duration,
    /// Well-known name of the broker to talk to: shmlinkd's, or any process
    /// implementing org.shmlink.Broker1 (an application's own broker).
    #[arg(long, global = true, value_name = "BUS_NAME", default_value = shmlink_interfaces::BUS_NAME)]
    name: String,
    /// Object path of that broker (default: derived from --name, e.g.
    /// org.example.Frames1 → /org/example/Frames1).
    #[arg(long, global = true, value_name = "OBJECT_PATH")]
    path: Option<String>,
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
    // Before any thread starts.
    shmlink_endpoint::sys::default_sigpipe();
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    let bus = cli.bus.clone();
    let t = cli.timeout;
    let _ = BROKER.set((cli.name.clone(), cli.path.clone()));
    let result: Result<()> = match cli.command {
        Cmd::Demo(a) => demo::run(bus, t, a),
        Cmd::Ping(a) => ping::run(&bus.unwrap_or(Bus::Session), t, a),
        Cmd::Send(a) => send::run(&bus.unwrap_or(Bus::Session), t, a),
        Cmd::Status(a) => status::run(&bus.unwrap_or(Bus::Session), t, a),
        Cmd::Close(a) => close::run(&bus.unwrap_or(Bus::Session), t, a),
        Cmd::Bench(a) => bench::run(bus, a),
        Cmd::BenchPeer(a) => bench::peer(a),
    };
    if let Err(e) = result {
        eprintln!("shmlink: error: {}", report(&e));
        std::process::exit(1);
    }
}

/// Parses `--timeout`: positive seconds, fractions allowed.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if secs.is_finite() && secs > 0.0 {
        Duration::try_from_secs_f64(secs).map_err(|e| format!("{s}: {e}"))
    } else {
        Err(format!(
            "the timeout must be a positive number of seconds, not {s}"
        ))
    }
}

/// The broker the command line names (`--name`, `--path`), set once in `main`.
static BROKER: std::sync::OnceLock<(String, Option<String>)> = std::sync::OnceLock::new();

/// Connects to `bus` with `timeout` for every D-Bus call, to the broker
/// `--name` and `--path` name (shmlinkd by default).
pub fn connect(bus: &Bus, timeout: Duration) -> Result<Client> {
    let (name, path) = BROKER
        .get()
        .cloned()
        .unwrap_or_else(|| (shmlink_interfaces::BUS_NAME.to_owned(), None));
    let mut client = Client::connect_to(bus, &name)?.with_call_timeout(timeout);
    if let Some(path) = path {
        client = client.with_broker_path(&path);
    }
    Ok(client)
}

/// An error and its causes on one line, like anyhow's `{:#}`, but a cause
/// whose text the line already holds is left out: a library error that
/// repeats its source's message would otherwise print it twice.
pub fn report(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_cause_is_printed_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Repeats(#[source] std::io::Error);
        let e = anyhow::Error::new(Repeats(std::io::Error::other("frame has unknown kind 7")))
            .context("receiving from echo failed");
        let line = report(&e);
        assert_eq!(
            line,
            "receiving from echo failed: outer: frame has unknown kind 7"
        );
        // Distinct causes all stay.
        let e = anyhow::anyhow!("no such file").context("cannot open x");
        assert_eq!(report(&e), "cannot open x: no such file");
    }

    #[test]
    fn the_client_errors_print_each_cause_once() {
        let errors = [
            shmlink::Error::Session(shmlink_endpoint_error_kind7()),
            shmlink::Error::Connect {
                bus: "bus at unix:path=/x".into(),
                message: "No such file or directory".into(),
            },
        ];
        for e in errors {
            let e = anyhow::Error::new(e).context("cannot open a session with \"echo\"");
            let plain = format!("{e:#}");
            assert_eq!(plain, report(&e), "anyhow's own chain repeats a cause");
        }
    }

    fn shmlink_endpoint_error_kind7() -> shmlink_endpoint::Error {
        shmlink_endpoint::Error::Protocol(shmlink_endpoint::FrameError::UnknownKind(7))
    }

    #[test]
    fn timeouts_parse_as_positive_seconds() {
        assert_eq!(parse_timeout("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_timeout("10"), Ok(Duration::from_secs(10)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("-1").is_err());
        assert!(parse_timeout("soon").is_err());
        assert!(parse_timeout("inf").is_err());
    }
}
