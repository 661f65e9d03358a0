//! `shmlink bench`: shmlink against the kernel's and D-Bus's own ways of
//! moving bytes, measured in one run on one machine, with ratios.
//!
//! Without `--bus` it starts a private dbus-daemon and a shmlinkd, like
//! `shmlink demo`. Every two-process baseline runs against a child
//! process: this same binary re-executed
//! with the hidden `__bench-peer` subcommand (a stream sink or echo on a
//! Unix socket or pipe, an eventfd ponger, a D-Bus echo service).

use crate::human_rate;
use anyhow::{anyhow, bail, ensure, Context, Result};
use dbus::channel::Channel;
use dbus::message::MessageType;
use dbus::Message;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use shmlink::{Bus, Client, Wakeup};
use shmlink_endpoint::sys;
use shmlink_interfaces::service;
use shmlink_test_support::{locate_daemon, proc_status, DaemonProcess, PrivateBus};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

mod iceoryx2;
mod measure;
mod peer;

use measure::*;
pub use peer::peer;

/// Message sizes of the throughput tables.
const SIZES: [usize; 4] = [64, 4 << 10, 64 << 10, 1 << 20];
/// Ring capacity of the throughput sessions (each way).
const RING: u64 = 1 << 20;
/// Size of the round-trip message in the latency table.
const PING: usize = 64;
/// Spinning sessions (`spin-us` 10,000, a message every millisecond) beside
/// the honest session of the "beside spinning sessions" latency row.
const SPINNERS: usize = 4;
/// Spin budget of the spin-mode session.
const SPIN: Duration = Duration::from_micros(200);
/// Well-known name of the D-Bus baseline peer.
const PEER_NAME: &str = "org.shmlink.BenchPeer";
const PEER_IFACE: &str = "org.shmlink.BenchPeer";
/// The eventfd value that tells the eventfd peer to exit.
const QUIT: u64 = 1 << 40;
/// The name under which the provider process offers the built-in sink.
const PROVIDED_SINK: &str = "bench-provided-sink";
const DBUS_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `shmlink bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the results as JSON on stdout instead of tables.
    #[arg(long)]
    json: bool,
    /// A short run (about a tenth of the time): rougher numbers, same table.
    #[arg(long)]
    quick: bool,
    /// Run one section only (to profile it): throughput, latency, setup, aggregate or versus.
    #[arg(long, value_name = "SECTION")]
    only: Option<String>,
    /// Alternating rounds of the versus section (shmlink against iceoryx2);
    /// 5, or 3 with --quick.
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
}

/// Arguments of the hidden peer subcommand.
#[derive(clap::Args, Debug)]
pub struct PeerArgs {
    /// stream-sink | stream-echo | eventfd-echo | dbus-echo
    role: String,
    /// Message size for stream-echo.
    #[arg(long, default_value_t = PING)]
    size: usize,
    /// Bus address for dbus-echo.
    #[arg(long)]
    address: Option<String>,
}

/// How long each kind of measurement runs.
#[derive(Clone, Copy)]
struct Budget {
    /// Seconds of streaming per throughput cell.
    stream: Duration,
    /// Round trips per latency row (at most).
    round_trips: usize,
    /// Time cap per latency row.
    latency_cap: Duration,
    /// OpenSession / bare-call repetitions.
    setups: usize,
}

#[derive(Serialize)]
struct Machine {
    nproc: usize,
    cpu: String,
    kernel: String,
    load_before: String,
}

#[derive(Serialize, Clone)]
struct Throughput {
    transport: &'static str,
    size: usize,
    bytes_per_sec: f64,
    messages: u64,
}

#[derive(Serialize, Clone)]
struct Latency {
    name: &'static str,
    samples: usize,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

#[derive(Serialize)]
struct Setup {
    open_session: Latency,
    /// `OpenSession` of the sink a provider process serves (`None` when no
    /// provider could register, e.g. a broker without providers).
    open_provided: Option<Latency>,
    dbus_call: Latency,
}

#[derive(Serialize)]
struct Aggregate {
    clients: usize,
    bytes_per_sec: f64,
}

#[derive(Serialize)]
struct Target {
    what: String,
    measured: f64,
    target: String,
    met: bool,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    command: String,
    quick: bool,
    throughput: Vec<Throughput>,
    latency: Vec<Latency>,
    setup: Setup,
    aggregate: Vec<Aggregate>,
    daemon_threads: Option<u64>,
    targets: Vec<Target>,
    /// The versus section (`None` when it did not run).
    versus: Option<iceoryx2::Versus>,
    seconds: f64,
}

pub fn run(bus: Option<Bus>, args: Args) -> Result<()> {
    let started = Instant::now();
    let budget = if args.quick {
        Budget {
            stream: Duration::from_millis(120),
            round_trips: 3_000,
            latency_cap: Duration::from_millis(500),
            setups: 60,
        }
    } else {
        Budget {
            stream: Duration::from_secs(1),
            round_trips: 50_000,
            latency_cap: Duration::from_secs(4),
            setups: 500,
        }
    };
    let machine = machine();
    let mut children = None;
    let bus = match bus {
        Some(b) => b,
        None => {
            let private = PrivateBus::start().context("cannot start a private dbus-daemon")?;
            let program = locate_daemon()?;
            let daemon = DaemonProcess::start(&program, private.address(), &[])
                .with_context(|| format!("cannot start {}", program.display()))?;
            let b = private.bus();
            children = Some((private, daemon));
            b
        }
    };
    let address = match &bus {
        Bus::Address(a) => a.clone(),
        Bus::Session => std::env::var("DBUS_SESSION_BUS_ADDRESS")
            .context("DBUS_SESSION_BUS_ADDRESS is not set")?,
        Bus::System => "unix:path=/run/dbus/system_bus_socket".into(),
    };
    let client = Client::connect(&bus).with_context(|| format!("cannot reach the {bus}"))?;
    client.ping().context("shmlinkd does not answer")?;
    let dbus_peer = Peer::spawn(
        "dbus-echo",
        &["--address", &address],
        Stdio::null(),
        Stdio::piped(),
    )?
    .await_ready()?;
    // The built-in sink served again from a provider process of its own
    // (the broker hands the rings over and leaves the data path).
    let provided = match Peer::spawn(
        "provided-sink",
        &["--address", &address],
        Stdio::piped(),
        Stdio::piped(),
    )
    .and_then(Peer::await_ready)
    {
        Ok(p) => Some(p),
        Err(e) => {
            log::warn!("no provided-sink rows: {e:#}");
            None
        }
    };
    let dbus = Channel::open_private(&address)
        .and_then(|mut c| c.register().map(|_| c))
        .context("D-Bus connection")?;

    // Per size 8 rows; 6 latency rows; 2 set-up steps; 4 aggregate runs.
    let steps = (SIZES.len() * 8 + 6 + 2 + 4) as u64;
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let step = |msg: String| {
        bar.set_message(msg);
    };

    let want = |section: &str| args.only.as_deref().map_or(true, |o| o == section);
    if let Some(o) = args.only.as_deref() {
        ensure!(
            ["throughput", "latency", "setup", "aggregate", "versus"].contains(&o),
            "--only takes throughput, latency, setup, aggregate or versus, not {o:?}"
        );
    }

    // Throughput.
    let mut throughput = Vec::new();
    for &size in SIZES.iter().filter(|_| want("throughput")) {
        let msg: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        step(format!("throughput {size} B: shmlink sink"));
        throughput.push(shmlink_sink(&client, &msg, budget.stream, Wakeup::Park)?);
        bar.inc(1);
        step(format!("throughput {size} B: shmlink provided sink"));
        if provided.is_some() {
            throughput.push(shmlink_sink_as(
                &client,
                PROVIDED_SINK,
                "shmlink provided sink",
                &msg,
                budget.stream,
            )?);
        }
        bar.inc(1);
        step(format!("throughput {size} B: shmlink sink, spin"));
        throughput.push(shmlink_sink(
            &client,
            &msg,
            budget.stream,
            Wakeup::Spin(SPIN),
        )?);
        bar.inc(1);
        step(format!("throughput {size} B: shmlink echo"));
        throughput.push(shmlink_echo(&client, &msg, budget.stream)?);
        bar.inc(1);
        step(format!("throughput {size} B: unix socket"));
        throughput.push(stream_sink("unix socket", true, &msg, budget.stream)?);
        bar.inc(1);
        step(format!("throughput {size} B: pipe"));
        throughput.push(stream_sink("pipe", false, &msg, budget.stream)?);
        bar.inc(1);
        step(format!("throughput {size} B: D-Bus"));
        throughput.push(dbus_sink(&dbus, &msg, budget.stream)?);
        bar.inc(1);
        step(format!("throughput {size} B: memcpy"));
        throughput.push(memcpy(&msg, budget.stream));
        bar.inc(1);
    }

    // Latency of a small round trip.
    let mut latency = Vec::new();
    if want("latency") {
        step("latency: shmlink echo, park".into());
        latency.push(shmlink_rtt(
            "shmlink echo (park)",
            &client,
            Wakeup::Park,
            &budget,
        )?);
        bar.inc(1);
        step("latency: shmlink echo, spin".into());
        latency.push(shmlink_rtt(
            "shmlink echo (spin)",
            &client,
            Wakeup::Spin(SPIN),
            &budget,
        )?);
        bar.inc(1);
        step("latency: shmlink echo, park, beside spinning sessions".into());
        let spinners = Spinners::start(&bus, SPINNERS)?;
        let beside = shmlink_rtt(
            "shmlink echo (park), 4 spinning sessions beside",
            &client,
            Wakeup::Park,
            &budget,
        );
        spinners.stop()?;
        latency.push(beside?);
        bar.inc(1);
        step("latency: eventfd ping-pong".into());
        latency.push(eventfd_rtt(&budget)?);
        bar.inc(1);
        step("latency: unix socket ping-pong".into());
        latency.push(unix_rtt(&budget)?);
        bar.inc(1);
        step("latency: D-Bus method call".into());
        latency.push(dbus_rtt(&dbus, &budget)?);
        bar.inc(1);
    }

    // Session set-up against a bare call to the same daemon.
    let setups = if want("setup") { budget.setups } else { 0 };
    step("set-up: OpenSessionVia + mapping, and a bare D-Bus call".into());
    let (open_session, dbus_call) =
        setup_times(&client, service::ECHO, "OpenSessionVia + mapping", setups)?;
    bar.inc(1);
    step("set-up: OpenSession through a provider + mapping".into());
    let open_provided = match &provided {
        Some(_) => Some(
            setup_times(
                &client,
                PROVIDED_SINK,
                "OpenSessionVia to a provider + mapping",
                setups,
            )?
            .0,
        ),
        None => None,
    };
    bar.inc(1);

    // Aggregate throughput with several clients.
    let mut aggregate = Vec::new();
    for clients in [1usize, 2, 4, 8].into_iter().filter(|_| want("aggregate")) {
        step(format!("aggregate: {clients} client(s)"));
        aggregate.push(Aggregate {
            clients,
            bytes_per_sec: aggregate_sink(&bus, clients, budget.stream * 2)?,
        });
        bar.inc(1);
    }
    // shmlink against iceoryx2, in alternating rounds.
    let versus = if want("versus") {
        let rounds = args.rounds.unwrap_or(if args.quick { 3 } else { 5 });
        Some(iceoryx2::versus(&client, &budget, rounds, &bar)?)
    } else {
        None
    };
    let daemon_threads = children
        .as_ref()
        .map(|(_, d)| proc_status(d.pid(), "Threads"));
    bar.finish_and_clear();

    drop(dbus);
    dbus_peer.stop();
    if let Some(p) = provided {
        p.stop();
    }
    let targets = targets(&throughput, &latency, &open_session, &dbus_call);
    let report = Report {
        machine,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        quick: args.quick,
        throughput,
        latency,
        setup: Setup {
            open_session,
            open_provided,
            dbus_call,
        },
        aggregate,
        daemon_threads,
        targets,
        versus,
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    drop(client);
    if let Some((private, daemon)) = children {
        let status = daemon.stop().context("cannot stop shmlinkd")?;
        ensure!(status.success(), "shmlinkd exited with {status}");
        private.stop().context("cannot stop the private bus")?;
    }
    Ok(())
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        load_before: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    }
}

/// One line per target: met or missed, what, the value, the target.
fn print_targets(targets: &[Target]) {
    // A section left out with --only measured nothing to compare.
    for t in targets.iter().filter(|t| !t.measured.is_nan()) {
        println!(
            "  [{}] {:<56} {:>8.2} (target {})",
            if t.met { "met " } else { "MISS" },
            t.what,
            t.measured,
            t.target
        );
    }
}

fn find<'a>(t: &'a [Throughput], transport: &str, size: usize) -> Option<&'a Throughput> {
    t.iter()
        .find(|c| c.transport == transport && c.size == size)
}

fn targets(t: &[Throughput], lat: &[Latency], open: &Latency, call: &Latency) -> Vec<Target> {
    let mut out = Vec::new();
    let bps = |tr: &str| {
        find(t, tr, 64 << 10)
            .map(|c| c.bytes_per_sec)
            .unwrap_or(f64::NAN)
    };
    let shm = bps("shmlink sink");
    let spin = bps("shmlink sink (spin)");
    let mut ratio = |what: &str, value: f64, min: f64| {
        out.push(Target {
            what: what.into(),
            measured: value,
            target: format!(">= {min}"),
            met: value >= min,
        })
    };
    ratio(
        "64 KiB one-way: shmlink sink / unix socket",
        shm / bps("unix socket"),
        4.0,
    );
    ratio(
        "64 KiB one-way: shmlink sink / D-Bus &[u8]",
        shm / bps("D-Bus &[u8]"),
        50.0,
    );
    ratio(
        "64 KiB one-way: shmlink sink / memcpy",
        shm / bps("memcpy"),
        0.5,
    );
    ratio(
        "64 KiB one-way, spin: sink / unix socket",
        spin / bps("unix socket"),
        4.0,
    );
    ratio(
        "64 KiB one-way, spin: sink / D-Bus &[u8]",
        spin / bps("D-Bus &[u8]"),
        50.0,
    );
    ratio(
        "64 KiB one-way, spin: sink / memcpy",
        spin / bps("memcpy"),
        0.5,
    );
    let p50 = |name: &str| {
        lat.iter()
            .find(|l| l.name == name)
            .map(|l| l.p50_us)
            .unwrap_or(f64::NAN)
    };
    let park = p50("shmlink echo (park)");
    let mut upto = |what: &str, value: f64, max: f64| {
        out.push(Target {
            what: what.into(),
            measured: value,
            target: format!("<= {max}"),
            met: value <= max,
        })
    };
    upto(
        "round trip p50: park / raw eventfd ping-pong",
        park / p50("raw eventfd ping-pong"),
        1.2,
    );
    upto(
        "round trip p50: park / unix socket ping-pong",
        park / p50("unix socket ping-pong"),
        0.6,
    );
    upto(
        "round trip p50: spin, in µs",
        p50("shmlink echo (spin)"),
        2.0,
    );
    upto(
        "set-up p50: OpenSessionVia + mapping / bare D-Bus call",
        open.p50_us / call.p50_us,
        2.0,
    );
    out
}

fn size_label(s: usize) -> String {
    match s {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

fn print_report(r: &Report) {
    let m = &r.machine;
    println!(
        "shmlink bench: {} CPU(s), {}, kernel {}; load before: {}",
        m.nproc, m.cpu, m.kernel, m.load_before
    );
    println!();
    print!("{:<22}", "throughput (one way)");
    for s in SIZES {
        print!("{:>14}", size_label(s));
    }
    println!();
    for tr in [
        "shmlink sink",
        "shmlink provided sink",
        "shmlink sink (spin)",
        "shmlink echo",
        "unix socket",
        "pipe",
        "D-Bus &[u8]",
        "memcpy",
    ] {
        print!("{tr:<22}");
        for s in SIZES {
            print!(
                "{:>14}",
                find(&r.throughput, tr, s)
                    .map(|c| human_rate(c.bytes_per_sec))
                    .unwrap_or_default()
            );
        }
        println!();
    }
    for (label, base) in [
        ("sink / unix socket", "unix socket"),
        ("sink / pipe", "pipe"),
        ("sink / D-Bus", "D-Bus &[u8]"),
        ("sink / memcpy", "memcpy"),
    ] {
        print!("{label:<22}");
        for s in SIZES {
            let v = match (
                find(&r.throughput, "shmlink sink", s),
                find(&r.throughput, base, s),
            ) {
                (Some(a), Some(b)) => a.bytes_per_sec / b.bytes_per_sec,
                _ => f64::NAN,
            };
            print!("{:>13.2}×", v);
        }
        println!();
    }
    println!();
    println!(
        "{:<36}{:>10}{:>10}{:>10}{:>10}",
        format!("round trip, {PING} B"),
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "samples"
    );
    for l in &r.latency {
        println!(
            "{:<36}{:>10.2}{:>10.2}{:>10.2}{:>10}",
            l.name, l.p50_us, l.p99_us, l.p999_us, l.samples
        );
    }
    println!();
    println!(
        "{:<36}{:>10}{:>10}{:>10}{:>10}",
        "session set-up", "p50 µs", "p99 µs", "p99.9 µs", "samples"
    );
    for l in [
        Some(&r.setup.open_session),
        r.setup.open_provided.as_ref(),
        Some(&r.setup.dbus_call),
    ]
    .into_iter()
    .flatten()
    {
        println!(
            "{:<36}{:>10.1}{:>10.1}{:>10.1}{:>10}",
            l.name, l.p50_us, l.p99_us, l.p999_us, l.samples
        );
    }
    println!();
    print!("aggregate into sink, 64 KiB messages:");
    for a in &r.aggregate {
        print!("  {} client(s) {}", a.clients, human_rate(a.bytes_per_sec));
    }
    println!();
    if let Some(t) = r.daemon_threads {
        println!(
            "shmlinkd threads after the run: {t} (bound 2 × {} cores + 2 = {})",
            m.nproc,
            2 * m.nproc + 2
        );
    }
    println!();
    println!("targets:");
    print_targets(&r.targets);
    if let Some(v) = &r.versus {
        iceoryx2::print(v);
    }
    println!("({:.0} s)", r.seconds);
}
