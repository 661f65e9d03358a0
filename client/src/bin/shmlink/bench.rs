//! `shmlink bench`: shmlink against the kernel's and D-Bus's own ways of
//! moving bytes, measured in one run on one machine, with ratios.
//!
//! Without `--bus` it starts a private dbus-daemon and a shmlinkd, like
//! `shmlink demo`. Every baseline that the issue defines "between two
//! processes" runs against a child process: this same binary re-executed
//! with the hidden `__bench-peer` subcommand (a stream sink or echo on a
//! Unix socket or pipe, an eventfd ponger, a D-Bus echo service).

use anyhow::{anyhow, bail, ensure, Context, Result};
use dbus::channel::Channel;
use dbus::message::MessageType;
use dbus::Message;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use shmlink::process::{locate_daemon, DaemonProcess, PrivateBus};
use shmlink::{Bus, Client, Wakeup};
use shmlink_interfaces::service;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Message sizes of the throughput tables.
const SIZES: [usize; 4] = [64, 4 << 10, 64 << 10, 1 << 20];
/// Ring capacity of the throughput sessions (each way).
const RING: u64 = 1 << 20;
/// Size of the round-trip message in the latency table.
const PING: usize = 64;
/// Spin budget of the spin-mode session.
const SPIN: Duration = Duration::from_micros(200);
/// Well-known name of the D-Bus baseline peer.
const PEER_NAME: &str = "org.shmlink.BenchPeer";
const PEER_IFACE: &str = "org.shmlink.BenchPeer";
/// The eventfd value that tells the eventfd peer to exit.
const QUIT: u64 = 1 << 40;
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
    /// Run one section only (to profile it): throughput, latency, setup or aggregate.
    #[arg(long, value_name = "SECTION")]
    only: Option<String>,
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
    let dbus = Channel::open_private(&address)
        .and_then(|mut c| c.register().map(|_| c))
        .context("D-Bus connection")?;

    let steps = (SIZES.len() * 7 + 5 + 2 + 4) as u64;
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
            ["throughput", "latency", "setup", "aggregate"].contains(&o),
            "--only takes throughput, latency, setup or aggregate, not {o:?}"
        );
    }

    // Throughput.
    let mut throughput = Vec::new();
    for &size in SIZES.iter().filter(|_| want("throughput")) {
        let msg: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        step(format!("throughput {size} B: shmlink sink"));
        throughput.push(shmlink_sink(&client, &msg, budget.stream, Wakeup::Park)?);
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
    step("set-up: OpenSession + mapping".into());
    let open_session = open_session_times(&client, setups)?;
    bar.inc(1);
    step("set-up: bare D-Bus call".into());
    let mut pings = Vec::with_capacity(setups);
    for _ in 0..setups {
        pings.push(client.ping()?);
    }
    let dbus_call = Latency::from_samples("D-Bus method call (Peer.Ping to shmlinkd)", pings);
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
    let daemon_threads = children
        .as_ref()
        .map(|(_, d)| proc_status(d.pid(), "Threads"));
    bar.finish_and_clear();

    drop(dbus);
    dbus_peer.stop();
    let targets = targets(&throughput, &latency, &open_session, &dbus_call);
    let report = Report {
        machine,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        quick: args.quick,
        throughput,
        latency,
        setup: Setup {
            open_session,
            dbus_call,
        },
        aggregate,
        daemon_threads,
        targets,
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

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Sends `msg` repeatedly with `send` until `budget` has passed; returns messages sent.
fn stream_for(budget: Duration, mut send: impl FnMut() -> Result<()>) -> Result<u64> {
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        // Look at the clock every few messages only: 64-byte sends take tens of ns.
        for _ in 0..16 {
            send()?;
            n += 1;
        }
        if start.elapsed() >= budget {
            return Ok(n);
        }
    }
}

fn cell(transport: &'static str, size: usize, messages: u64, secs: f64) -> Throughput {
    Throughput {
        transport,
        size,
        bytes_per_sec: (messages * size as u64) as f64 / secs,
        messages,
    }
}

/// One-way into the `sink` service; the clock stops when the sink has
/// consumed everything (its end-of-stream reply).
fn shmlink_sink(client: &Client, msg: &[u8], budget: Duration, wake: Wakeup) -> Result<Throughput> {
    let mut s = client
        .session(service::SINK)
        .capacity(RING)
        .wakeup(wake)
        .open()
        .context("open a sink session")?;
    let t = Instant::now();
    let n = stream_for(budget, || Ok(s.send(msg)?))?;
    s.finish()?;
    ensure!(s.recv()?.is_none(), "sink sent data back");
    let secs = t.elapsed().as_secs_f64();
    s.close()?;
    let label = match wake {
        Wakeup::Park => "shmlink sink",
        Wakeup::Spin(_) => "shmlink sink (spin)",
    };
    Ok(cell(label, msg.len(), n, secs))
}

/// Through `echo` and back, counted one way; sender and receiver are two threads.
fn shmlink_echo(client: &Client, msg: &[u8], budget: Duration) -> Result<Throughput> {
    let s = client
        .session(service::ECHO)
        .capacity(RING)
        .open()
        .context("open an echo session")?;
    let (mut w, mut r) = s.split();
    let len = msg.len();
    let t = Instant::now();
    let reader = std::thread::spawn(move || -> Result<(u64, shmlink::SessionReader)> {
        let mut n = 0u64;
        while let Some(m) = r.recv()? {
            ensure!(m.len() == len, "echo returned {} bytes for {len}", m.len());
            n += 1;
        }
        Ok((n, r))
    });
    let sent = stream_for(budget, || Ok(w.send(msg)?))?;
    w.finish()?;
    let (got, r) = reader
        .join()
        .map_err(|_| anyhow!("echo reader panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    ensure!(got == sent, "echo returned {got} of {sent} messages");
    r.close()?;
    Ok(cell("shmlink echo", len, sent, secs))
}

/// A child process running `shmlink __bench-peer ROLE`, killed and reaped on drop.
struct Peer {
    child: Child,
}

impl Peer {
    fn spawn(role: &str, extra: &[&str], stdin: Stdio, stdout: Stdio) -> Result<Peer> {
        let exe = std::env::current_exe()
            .context("cannot find this program to run the benchmark's peer")?;
        let child = Command::new(exe)
            .arg("__bench-peer")
            .arg(role)
            .args(extra)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start the {role} peer"))?;
        Ok(Peer { child })
    }

    /// Waits for the peer's "ready" line on its stdout.
    fn await_ready(mut self) -> Result<Peer> {
        let out = self.child.stdout.take().context("peer stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        ensure!(
            line.trim() == "ready",
            "the D-Bus peer did not start (said {line:?})"
        );
        Ok(self)
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One-way into a child that reads until end of file, then reports the byte count.
fn stream_sink(
    transport: &'static str,
    unix: bool,
    msg: &[u8],
    budget: Duration,
) -> Result<Throughput> {
    let t;
    let n;
    let mut count = [0u8; 8];
    if unix {
        let (mut ours, theirs) = UnixStream::pair()?;
        let theirs_out = theirs.try_clone()?;
        let peer = Peer::spawn(
            "stream-sink",
            &[],
            Stdio::from(OwnedFd::from(theirs)),
            Stdio::from(OwnedFd::from(theirs_out)),
        )?;
        t = Instant::now();
        n = stream_for(budget, || Ok(ours.write_all(msg)?))?;
        ours.shutdown(std::net::Shutdown::Write)?;
        ours.read_exact(&mut count)
            .context("the stream peer did not report")?;
        peer.stop();
    } else {
        let (data_r, mut data_w) = pipe()?;
        let (mut ack_r, ack_w) = pipe()?;
        let peer = Peer::spawn("stream-sink", &[], Stdio::from(data_r), Stdio::from(ack_w))?;
        t = Instant::now();
        n = stream_for(budget, || Ok(data_w.write_all(msg)?))?;
        drop(data_w);
        ack_r
            .read_exact(&mut count)
            .context("the stream peer did not report")?;
        peer.stop();
    }
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        u64::from_le_bytes(count) == n * msg.len() as u64,
        "the stream peer lost bytes"
    );
    Ok(cell(transport, msg.len(), n, secs))
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    ensure!(r == 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded: both fds are open and owned by nobody else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

fn dbus_call(dbus: &Channel, member: &str, payload: Option<&[u8]>) -> Result<Message> {
    let m = Message::new_method_call(PEER_NAME, "/", PEER_IFACE, member).map_err(|e| anyhow!(e))?;
    let m = match payload {
        Some(p) => m.append1(p),
        None => m,
    };
    Ok(dbus.send_with_reply_and_block(m, DBUS_TIMEOUT)?)
}

/// One method call per message, the bytes as `ay` read and written as `&[u8]`.
fn dbus_sink(dbus: &Channel, msg: &[u8], budget: Duration) -> Result<Throughput> {
    let t = Instant::now();
    let n = stream_for(budget / 4, || {
        let reply = dbus_call(dbus, "Sink", Some(msg))?;
        ensure!(
            reply.read1::<u32>()? as usize == msg.len(),
            "D-Bus peer lost bytes"
        );
        Ok(())
    })?;
    Ok(cell("D-Bus &[u8]", msg.len(), n, t.elapsed().as_secs_f64()))
}

/// One thread copying `msg` into a ring-sized destination it walks through,
/// as a ring writer does (the destination stays cache-resident like a ring).
fn memcpy(msg: &[u8], budget: Duration) -> Throughput {
    let mut dst = vec![0u8; RING as usize + msg.len()];
    let mut off = 0usize;
    let t = Instant::now();
    let copy = || -> Result<()> {
        dst[off..off + msg.len()].copy_from_slice(std::hint::black_box(msg));
        std::hint::black_box(&mut dst);
        off += msg.len();
        if off >= RING as usize {
            off = 0;
        }
        Ok(())
    };
    // Copying cannot fail; stream_for is shared with the fallible transports.
    let n = stream_for(budget, copy).unwrap_or(0);
    cell("memcpy", msg.len(), n, t.elapsed().as_secs_f64())
}

impl Latency {
    fn from_samples(name: &'static str, mut samples: Vec<Duration>) -> Latency {
        samples.sort();
        let q = |p: f64| -> f64 {
            if samples.is_empty() {
                return f64::NAN;
            }
            let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1e6
        };
        Latency {
            name,
            samples: samples.len(),
            p50_us: q(0.50),
            p99_us: q(0.99),
            p999_us: q(0.999),
        }
    }
}

/// Times round trips with `once` after a warm-up, up to the budget's count or time cap.
fn time_round_trips(
    name: &'static str,
    budget: &Budget,
    mut once: impl FnMut() -> Result<()>,
) -> Result<Latency> {
    for _ in 0..200 {
        once()?;
    }
    let mut samples = Vec::with_capacity(budget.round_trips);
    let start = Instant::now();
    while samples.len() < budget.round_trips && start.elapsed() < budget.latency_cap {
        let t = Instant::now();
        once()?;
        samples.push(t.elapsed());
    }
    Ok(Latency::from_samples(name, samples))
}

fn shmlink_rtt(
    name: &'static str,
    client: &Client,
    wake: Wakeup,
    budget: &Budget,
) -> Result<Latency> {
    let mut s = client
        .session(service::ECHO)
        .capacity(64 << 10)
        .wakeup(wake)
        .open()
        .context("open an echo session")?;
    let msg = [0x5au8; PING];
    let lat = time_round_trips(name, budget, || {
        s.send(&msg)?;
        let back = s.recv()?.context("echo ended early")?;
        ensure!(back.len() == PING, "echo returned {} bytes", back.len());
        Ok(())
    })?;
    s.close()?;
    Ok(lat)
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    ensure!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: eventfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn eventfd_write(fd: &impl AsRawFd, v: u64) -> std::io::Result<()> {
    let b = v.to_ne_bytes();
    // SAFETY: `b` is 8 readable bytes; the fd is live.
    let r = unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), 8) };
    if r == 8 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn eventfd_read(fd: &impl AsRawFd) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    // SAFETY: `b` is 8 writable bytes; the fd is live.
    let r = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
    if r == 8 {
        Ok(u64::from_ne_bytes(b))
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Two blocking eventfds and a child that answers each ping: the kernel's
/// cost of a blocking wake-up round trip between two processes.
fn eventfd_rtt(budget: &Budget) -> Result<Latency> {
    let ping = eventfd()?;
    let pong = eventfd()?;
    let peer = Peer::spawn(
        "eventfd-echo",
        &[],
        Stdio::from(ping.try_clone()?),
        Stdio::from(pong.try_clone()?),
    )?;
    let lat = time_round_trips("raw eventfd ping-pong", budget, || {
        eventfd_write(&ping, 1)?;
        eventfd_read(&pong)?;
        Ok(())
    })?;
    eventfd_write(&ping, QUIT)?;
    peer.stop();
    Ok(lat)
}

fn unix_rtt(budget: &Budget) -> Result<Latency> {
    let (mut ours, theirs) = UnixStream::pair()?;
    let out = theirs.try_clone()?;
    let size = PING.to_string();
    let peer = Peer::spawn(
        "stream-echo",
        &["--size", &size],
        Stdio::from(OwnedFd::from(theirs)),
        Stdio::from(OwnedFd::from(out)),
    )?;
    let msg = [0x5au8; PING];
    let mut back = [0u8; PING];
    let lat = time_round_trips("unix socket ping-pong", budget, || {
        ours.write_all(&msg)?;
        ours.read_exact(&mut back)?;
        Ok(())
    })?;
    drop(ours);
    peer.stop();
    Ok(lat)
}

fn dbus_rtt(dbus: &Channel, budget: &Budget) -> Result<Latency> {
    let msg = [0x5au8; PING];
    let b = Budget {
        round_trips: budget.round_trips / 4,
        ..*budget
    };
    time_round_trips("D-Bus method call (64 B ay echo)", &b, || {
        let reply = dbus_call(dbus, "Echo", Some(&msg))?;
        let back: &[u8] = reply.read1()?;
        ensure!(
            back.len() == PING,
            "D-Bus echo returned {} bytes",
            back.len()
        );
        Ok(())
    })
}

/// OpenSession and the client-side checks and mappings, to a usable session.
fn open_session_times(client: &Client, n: usize) -> Result<Latency> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = client.session(service::ECHO).capacity(64 << 10).open()?;
        samples.push(t.elapsed());
        s.close()?;
    }
    Ok(Latency::from_samples("OpenSession + mapping", samples))
}

/// `clients` connections, each streaming 64 KiB messages into its own sink at once.
fn aggregate_sink(bus: &Bus, clients: usize, budget: Duration) -> Result<f64> {
    let msg: Arc<Vec<u8>> = Arc::new((0..64usize << 10).map(|i| i as u8).collect());
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (bus, msg, barrier) = (bus.clone(), msg.clone(), barrier.clone());
            std::thread::spawn(move || -> Result<u64> {
                let opened = Client::connect(&bus)
                    .map_err(anyhow::Error::from)
                    .and_then(|c| Ok((c.session(service::SINK).capacity(RING).open()?, c)));
                barrier.wait();
                let (mut s, _client) = opened?;
                let n = stream_for(budget, || Ok(s.send(&msg)?))?;
                s.finish()?;
                ensure!(s.recv()?.is_none(), "sink sent data back");
                s.close()?;
                Ok(n * msg.len() as u64)
            })
        })
        .collect();
    barrier.wait();
    let t = Instant::now();
    let mut bytes = 0;
    for th in threads {
        bytes += th.join().map_err(|_| anyhow!("client thread panicked"))??;
    }
    Ok(bytes as f64 / t.elapsed().as_secs_f64())
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
        "set-up p50: OpenSession + mapping / bare D-Bus call",
        open.p50_us / call.p50_us,
        2.0,
    );
    out
}

fn human_rate(bps: f64) -> String {
    if bps >= 1e9 {
        format!("{:.2} GB/s", bps / 1e9)
    } else if bps >= 1e6 {
        format!("{:.1} MB/s", bps / 1e6)
    } else {
        format!("{:.1} kB/s", bps / 1e3)
    }
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
    for l in [&r.setup.open_session, &r.setup.dbus_call] {
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
    for t in &r.targets {
        println!(
            "  [{}] {:<56} {:>8.2} (target {})",
            if t.met { "met " } else { "MISS" },
            t.what,
            t.measured,
            t.target
        );
    }
    println!("({:.0} s)", r.seconds);
}

// ---- the peer side: `shmlink __bench-peer ROLE` ----

pub fn peer(args: PeerArgs) -> Result<()> {
    match args.role.as_str() {
        "stream-sink" => {
            let mut input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let mut out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
            out.write_all(&total.to_le_bytes())?;
            Ok(())
        }
        "stream-echo" => {
            let mut input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
            let mut out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
            let mut buf = vec![0u8; args.size];
            loop {
                if let Err(e) = input.read_exact(&mut buf) {
                    return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        Ok(())
                    } else {
                        Err(e.into())
                    };
                }
                out.write_all(&buf)?;
            }
        }
        "eventfd-echo" => {
            let ping = std::io::stdin().as_fd().try_clone_to_owned()?;
            let pong = std::io::stdout().as_fd().try_clone_to_owned()?;
            loop {
                if eventfd_read(&ping)? >= QUIT {
                    return Ok(());
                }
                eventfd_write(&pong, 1)?;
            }
        }
        "dbus-echo" => dbus_peer(
            args.address
                .as_deref()
                .context("dbus-echo needs --address")?,
        ),
        other => bail!("unknown peer role {other:?}"),
    }
}

/// A minimal D-Bus service: `Echo(ay) -> ay`, `Sink(ay) -> u` (the length),
/// both reading and writing the bytes as `&[u8]`, the fast path.
fn dbus_peer(address: &str) -> Result<()> {
    let mut c = Channel::open_private(address)?;
    c.register()?;
    let req = Message::new_method_call(
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "RequestName",
    )
    .map_err(|e| anyhow!(e))?
    .append2(PEER_NAME, 4u32);
    let (code,): (u32,) = c.send_with_reply_and_block(req, DBUS_TIMEOUT)?.read_all()?;
    ensure!(code == 1, "cannot own {PEER_NAME} (reply {code})");
    println!("ready");
    std::io::stdout().flush()?;
    loop {
        if c.read_write(None).is_err() {
            return Ok(());
        }
        while let Some(msg) = c.pop_message() {
            if msg.msg_type() != MessageType::MethodCall {
                continue;
            }
            let reply = match msg.member().as_deref() {
                Some("Echo") => match msg.read1::<&[u8]>() {
                    Ok(b) => msg.method_return().append1(b),
                    Err(e) => msg.error(
                        &"org.shmlink.Error.Bench".into(),
                        &std::ffi::CString::new(e.to_string())?,
                    ),
                },
                Some("Sink") => match msg.read1::<&[u8]>() {
                    Ok(b) => msg.method_return().append1(b.len() as u32),
                    Err(e) => msg.error(
                        &"org.shmlink.Error.Bench".into(),
                        &std::ffi::CString::new(e.to_string())?,
                    ),
                },
                _ => msg.method_return(),
            };
            let _ = c.send(reply);
        }
        c.flush();
    }
}
