//! `shmlink-bench-iceoryx2`: iceoryx2 measured the way `shmlink bench`
//! measures shmlink, so that the bench's `versus` section can report ratios
//! against it from the same machine and the same run.
//!
//! Each subcommand prints one JSON object on stdout (everything else goes to
//! stderr) and runs its peer as a child process: this binary re-executed
//! with the hidden `__peer ROLE` arguments. Service names carry the parent's
//! pid, so concurrent runs do not meet.
//!
//! - `throughput --size B --buffer B --seconds S --wakeup event|spin --reader in-place|copy`
//! - `latency --size B --wakeup event|spin --samples N --cap-secs S`
//! - `open --samples N`

use anyhow::{bail, ensure, Context, Result};
use iceoryx2::prelude::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// The user header value of an ordinary sample.
const MORE: u64 = 0;
/// The user header value of the last sample of a stream (it carries data
/// too) or of the ping that ends a ping-pong (it is not answered).
const LAST: u64 = 1;
/// Round trips before the timed ones.
const WARM_UP: usize = 200;

fn main() {
    set_log_level_from_env_or(LogLevel::Warn);
    if let Err(e) = run() {
        eprintln!("shmlink-bench-iceoryx2: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().context(
        "usage: shmlink-bench-iceoryx2 throughput|latency|open [--OPTION VALUE]... \
         (see the source's header)",
    )?;
    if command == "__peer" {
        let role = args.next().context("__peer needs a role")?;
        return peer(&role, &Options::parse(args)?);
    }
    let opts = Options::parse(args)?;
    // A measurement that hangs (a peer gone with a full queue leaves a
    // publisher waiting for ever) ends the program; its peer notices.
    let limit = match command.as_str() {
        "throughput" => opts.num::<f64>("seconds")?,
        "latency" => opts.num::<f64>("cap-secs")?,
        _ => 60.0,
    };
    watchdog(Duration::from_secs_f64(limit * 4.0 + 60.0));
    let json = match command.as_str() {
        "throughput" => throughput(&opts)?,
        "latency" => latency(&opts)?,
        "open" => open(&opts)?,
        other => bail!("unknown subcommand {other:?} (throughput, latency or open)"),
    };
    println!("{json}");
    Ok(())
}

/// Ends this process once `limit` has passed.
fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("shmlink-bench-iceoryx2: no result after {limit:?}, giving up");
        std::process::exit(2);
    });
}

/// How a peer waits for its next sample, stopping when the process that
/// started it has gone.
struct Idle {
    parent: u32,
    spins: u32,
}

impl Idle {
    /// How long a listener waits before the peer looks for its parent.
    const CHECK: Duration = Duration::from_millis(500);

    fn new() -> Idle {
        Idle {
            parent: std::os::unix::process::parent_id(),
            spins: 0,
        }
    }

    /// Waits on `listener` until notified, or spins once without one.
    fn wait(
        &mut self,
        listener: Option<&iceoryx2::port::listener::Listener<ipc::Service>>,
    ) -> Result<()> {
        match listener {
            Some(l) => {
                if l.timed_wait(|_| {}, Self::CHECK)
                    .context("wait on the listener")?
                    == 0
                {
                    self.check()?;
                }
            }
            None => {
                std::hint::spin_loop();
                self.spins = self.spins.wrapping_add(1);
                if self.spins.is_multiple_of(1 << 20) {
                    self.check()?;
                }
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        ensure!(
            std::os::unix::process::parent_id() == self.parent,
            "the benchmark that started this peer has gone"
        );
        Ok(())
    }
}

/// `--key value` pairs.
struct Options(HashMap<String, String>);

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Options> {
        let mut map = HashMap::new();
        while let Some(a) = args.next() {
            let key = a
                .strip_prefix("--")
                .with_context(|| format!("expected an --option, got {a:?}"))?;
            let value = args
                .next()
                .with_context(|| format!("--{key} needs a value"))?;
            map.insert(key.to_owned(), value);
        }
        Ok(Options(map))
    }

    fn str(&self, key: &str) -> Result<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("--{key} is required"))
    }

    fn num<T: std::str::FromStr>(&self, key: &str) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        self.str(key)?
            .parse()
            .with_context(|| format!("--{key} {:?}", self.str(key).unwrap_or_default()))
    }

    fn wakeup(&self) -> Result<Wakeup> {
        match self.str("wakeup")? {
            "event" => Ok(Wakeup::Event),
            "spin" => Ok(Wakeup::Spin),
            other => bail!("--wakeup takes event or spin, not {other:?}"),
        }
    }
}

/// How a waiting side learns that there is something to read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wakeup {
    /// iceoryx2's event service: the writer notifies after every send, the
    /// reader waits blocking on its listener.
    Event,
    /// The reader busy-polls its subscriber with `std::hint::spin_loop`.
    Spin,
}

impl Wakeup {
    fn arg(self) -> &'static str {
        match self {
            Wakeup::Event => "event",
            Wakeup::Spin => "spin",
        }
    }
}

fn service_name(run: &str, what: &str) -> Result<ServiceName> {
    let name = format!("shmlink-bench/{run}/{what}");
    ServiceName::new(&name).with_context(|| format!("service name {name:?}"))
}

/// A node with iceoryx2's default configuration, given explicitly: without
/// a config file iceoryx2 would warn on every process start.
fn node() -> Result<Node<ipc::Service>> {
    static CONFIG: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    NodeBuilder::new()
        .config(CONFIG.get_or_init(Config::default))
        .create::<ipc::Service>()
        .context("create an iceoryx2 node")
}

/// The services are made with `enable_safe_overflow(false)`: a full queue
/// then makes a send wait (iceoryx2's `RetryUntilDelivered`, which yields,
/// and sleeps 100 µs, later 10 ms, after 10,000 tries) instead of dropping
/// the oldest sample. Spin mode keeps its queue from filling (see
/// [`Credits`]), so that its publisher only ever spins.
const BACKPRESSURE: BackpressureStrategy = BackpressureStrategy::RetryUntilDelivered;

/// The count of samples the spinning subscriber has consumed, published on
/// an iceoryx2 blackboard: the spinning publisher sends only while fewer
/// than the queue's depth are in flight, busy-polling this count with
/// `spin_loop` otherwise (iceoryx2's own wait on a full queue yields the
/// vCPU, which on a loaded machine costs a time slice per sample).
const CREDITS_KEY: u64 = 0;

/// The peer process, killed and reaped if it is still there when dropped.
struct PeerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl PeerProcess {
    /// Starts `ROLE` with `args` and waits for its "ready" line.
    fn start(role: &str, args: &[String]) -> Result<PeerProcess> {
        let exe = std::env::current_exe().context("cannot find this program to run its peer")?;
        let mut child = Command::new(exe)
            .arg("__peer")
            .arg(role)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start the {role} peer"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("peer stdout")?);
        let mut p = PeerProcess {
            child,
            stdin,
            stdout,
        };
        let line = p.line()?;
        ensure!(
            line == "ready",
            "the {role} peer did not start (said {line:?})"
        );
        Ok(p)
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .context("read the peer's stdout")?;
        Ok(line.trim().to_owned())
    }

    fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait().context("look at the peer")? {
            None => Ok(()),
            Some(status) => bail!("the peer exited early, with {status}"),
        }
    }

    /// Closes the peer's stdin and waits for it to exit successfully.
    fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait().context("wait for the peer")?;
        ensure!(status.success(), "the peer exited with {status}");
        Ok(())
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn throughput(opts: &Options) -> Result<String> {
    let size: usize = opts.num("size")?;
    let buffer: usize = opts.num("buffer")?;
    let seconds: f64 = opts.num("seconds")?;
    let wake = opts.wakeup()?;
    let reader = opts.str("reader")?;
    ensure!(
        reader == "in-place" || reader == "copy",
        "--reader takes in-place or copy, not {reader:?}"
    );
    ensure!(size > 0, "--size must be at least 1");
    let depth = (buffer / size).max(1);
    let budget = Duration::from_secs_f64(seconds);
    let run = std::process::id().to_string();

    let node = node()?;
    let service = node
        .service_builder(&service_name(&run, "data")?)
        .publish_subscribe::<[u8]>()
        .user_header::<u64>()
        .max_publishers(1)
        .max_subscribers(1)
        .history_size(0)
        .subscriber_max_buffer_size(depth)
        .subscriber_max_borrowed_samples(1)
        .enable_safe_overflow(false)
        .create()
        .context("create the data service")?;
    let publisher = service
        .publisher_builder()
        .initial_max_slice_len(size)
        .backpressure_strategy(BACKPRESSURE)
        .create()
        .context("create the publisher")?;
    let credits = match wake {
        Wakeup::Spin => Some(
            node.service_builder(&service_name(&run, "consumed")?)
                .blackboard_creator::<u64>()
                .add::<u64>(CREDITS_KEY, 0)
                .create()
                .context("create the consumed-count blackboard")?,
        ),
        Wakeup::Event => None,
    };
    let credits_reader = match &credits {
        Some(c) => Some(c.reader_builder().create().context("create its reader")?),
        None => None,
    };
    let consumed = match &credits_reader {
        Some(r) => Some(r.entry::<u64>(&CREDITS_KEY).context("its entry")?),
        None => None,
    };
    let event = match wake {
        Wakeup::Event => Some(
            node.service_builder(&service_name(&run, "wake")?)
                .event()
                .create()
                .context("create the wake-up service")?,
        ),
        Wakeup::Spin => None,
    };
    let notifier = match &event {
        Some(e) => Some(
            e.notifier_builder()
                .create()
                .context("create the notifier")?,
        ),
        None => None,
    };
    let mut peer = PeerProcess::start(
        "sink",
        &[
            "--run".into(),
            run.clone(),
            "--depth".into(),
            depth.to_string(),
            "--wakeup".into(),
            wake.arg().into(),
            "--reader".into(),
            reader.into(),
        ],
    )?;

    // A prepared message, copied into each loan as a shmlink client's
    // `send(&msg)` copies from its buffer.
    let msg: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        // Look at the clock every few messages only.
        let last = sent % 16 == 15 && start.elapsed() >= budget;
        if let Some(c) = &consumed {
            let mut spins = 0u32;
            while sent - *c.get() >= depth as u64 {
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(1 << 20) {
                    peer.check_alive()?;
                }
            }
        }
        let mut sample = publisher.loan_slice_uninit(size).context("loan a sample")?;
        *sample.user_header_mut() = if last { LAST } else { MORE };
        sample
            .write_from_slice(&msg)
            .send()
            .context("send a sample")?;
        sent += 1;
        if let Some(n) = &notifier {
            n.notify().context("notify")?;
        }
        if last {
            break;
        }
    }
    // The clock stops when the subscriber has consumed everything.
    let report = peer.line()?;
    let secs = start.elapsed().as_secs_f64();
    let (count, crcs) = report
        .split_once(' ')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u32>().ok()?)))
        .with_context(|| format!("the sink's report {report:?}"))?;
    ensure!(
        count == sent,
        "the subscriber consumed {count} of {sent} samples"
    );
    let expected = (sent as u32).wrapping_mul(crc32fast::hash(&msg));
    ensure!(
        crcs == expected,
        "the subscriber read other bytes than sent"
    );
    peer.finish()?;
    Ok(format!(
        "{{\"bytes_per_sec\":{},\"messages\":{sent}}}",
        (sent * size as u64) as f64 / secs
    ))
}

fn latency(opts: &Options) -> Result<String> {
    let size: usize = opts.num("size")?;
    let wake = opts.wakeup()?;
    let max_samples: usize = opts.num("samples")?;
    let cap = Duration::from_secs_f64(opts.num("cap-secs")?);
    let run = std::process::id().to_string();

    let node = node()?;
    let pubsub = |what: &str| -> Result<_> {
        node.service_builder(&service_name(&run, what)?)
            .publish_subscribe::<[u8]>()
            .user_header::<u64>()
            .max_publishers(1)
            .max_subscribers(1)
            .history_size(0)
            .subscriber_max_buffer_size(1)
            .subscriber_max_borrowed_samples(1)
            .enable_safe_overflow(false)
            .create()
            .with_context(|| format!("create the {what} service"))
    };
    let ping = pubsub("ping")?;
    let pong = pubsub("pong")?;
    let publisher = ping
        .publisher_builder()
        .initial_max_slice_len(size)
        .backpressure_strategy(BACKPRESSURE)
        .create()
        .context("create the ping publisher")?;
    let subscriber = pong
        .subscriber_builder()
        .buffer_size(1)
        .create()
        .context("create the pong subscriber")?;
    let events = match wake {
        Wakeup::Event => {
            let ev = |what: &str| -> Result<_> {
                node.service_builder(&service_name(&run, what)?)
                    .event()
                    .create()
                    .with_context(|| format!("create the {what} service"))
            };
            Some((ev("ping-wake")?, ev("pong-wake")?))
        }
        Wakeup::Spin => None,
    };
    let ends = match &events {
        Some((ping_ev, pong_ev)) => Some((
            ping_ev
                .notifier_builder()
                .create()
                .context("create the notifier")?,
            pong_ev
                .listener_builder()
                .create()
                .context("create the listener")?,
        )),
        None => None,
    };
    let peer = PeerProcess::start(
        "echo",
        &[
            "--run".into(),
            run.clone(),
            "--size".into(),
            size.to_string(),
            "--wakeup".into(),
            wake.arg().into(),
        ],
    )?;

    let msg = vec![0x5au8; size];
    let send = |header: u64| -> Result<()> {
        let mut sample = publisher.loan_slice_uninit(size).context("loan a sample")?;
        *sample.user_header_mut() = header;
        sample
            .write_from_slice(&msg)
            .send()
            .context("send a sample")?;
        if let Some((n, _)) = &ends {
            n.notify().context("notify")?;
        }
        Ok(())
    };
    let once = || -> Result<()> {
        send(MORE)?;
        loop {
            if let Some(back) = subscriber.receive().context("receive")? {
                ensure!(
                    back.payload().len() == size,
                    "the echo returned {} bytes",
                    back.payload().len()
                );
                return Ok(());
            }
            match &ends {
                Some((_, l)) => {
                    l.blocking_wait(|_| {}).context("wait on the listener")?;
                }
                None => std::hint::spin_loop(),
            }
        }
    };
    for _ in 0..WARM_UP {
        once()?;
    }
    let mut samples = Vec::with_capacity(max_samples);
    let start = Instant::now();
    while samples.len() < max_samples && start.elapsed() < cap {
        let t = Instant::now();
        once()?;
        samples.push(t.elapsed());
    }
    send(LAST)?;
    peer.finish()?;
    Ok(percentiles(samples))
}

fn open(opts: &Options) -> Result<String> {
    let n: usize = opts.num("samples")?;
    let run = std::process::id().to_string();
    let name = service_name(&run, "open")?;
    // The child creates the service, holds a publisher on it and keeps it
    // alive until its stdin closes.
    let peer = PeerProcess::start("holder", &["--run".into(), run.clone()])?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let node = node()?;
        let service = node
            .service_builder(&name)
            .publish_subscribe::<[u8]>()
            .open()
            .context("open the existing service")?;
        let subscriber = service
            .subscriber_builder()
            .create()
            .context("create a subscriber")?;
        samples.push(t.elapsed());
        drop(subscriber);
        drop(service);
        drop(node);
    }
    peer.finish()?;
    Ok(percentiles(samples))
}

/// `{"samples":n,"p50_us":..,"p99_us":..,"p999_us":..}`, the quantiles
/// taken as `shmlink bench` takes them.
fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let q = |p: f64| -> String {
        if samples.is_empty() {
            return "null".into();
        }
        let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        format!("{}", samples[i].as_secs_f64() * 1e6)
    };
    format!(
        "{{\"samples\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{}}}",
        samples.len(),
        q(0.50),
        q(0.99),
        q(0.999)
    )
}

fn peer(role: &str, opts: &Options) -> Result<()> {
    let run = opts.str("run")?.to_owned();
    match role {
        "sink" => sink(&run, opts),
        "echo" => echo(&run, opts.num("size")?, opts.wakeup()?),
        "holder" => holder(&run),
        other => bail!("unknown peer role {other:?}"),
    }
}

fn ready() -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    Ok(())
}

/// The subscriber of `throughput`: touches every byte of every sample (a
/// CRC-32, in place or of a copy), then reports `COUNT CRC_SUM` on stdout.
fn sink(run: &str, opts: &Options) -> Result<()> {
    let depth: usize = opts.num("depth")?;
    let wake = opts.wakeup()?;
    let copy = match opts.str("reader")? {
        "in-place" => false,
        "copy" => true,
        other => bail!("--reader takes in-place or copy, not {other:?}"),
    };
    let node = node()?;
    let service = node
        .service_builder(&service_name(run, "data")?)
        .publish_subscribe::<[u8]>()
        .user_header::<u64>()
        .open()
        .context("open the data service")?;
    let subscriber = service
        .subscriber_builder()
        .buffer_size(depth)
        .create()
        .context("create the subscriber")?;
    let event = match wake {
        Wakeup::Event => Some(
            node.service_builder(&service_name(run, "wake")?)
                .event()
                .open()
                .context("open the wake-up service")?,
        ),
        Wakeup::Spin => None,
    };
    let listener = match &event {
        Some(e) => Some(
            e.listener_builder()
                .create()
                .context("create the listener")?,
        ),
        None => None,
    };
    let credits = match wake {
        Wakeup::Spin => Some(
            node.service_builder(&service_name(run, "consumed")?)
                .blackboard_opener::<u64>()
                .open()
                .context("open the consumed-count blackboard")?,
        ),
        Wakeup::Event => None,
    };
    let credits_writer = match &credits {
        Some(c) => Some(c.writer_builder().create().context("create its writer")?),
        None => None,
    };
    let consumed = match &credits_writer {
        Some(w) => Some(w.entry::<u64>(&CREDITS_KEY).context("its entry")?),
        None => None,
    };
    ready()?;
    let mut idle = Idle::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut count = 0u64;
    let mut crcs = 0u32;
    'stream: loop {
        let mut got = false;
        while let Some(sample) = subscriber.receive().context("receive")? {
            got = true;
            let crc = if copy {
                buf.clear();
                buf.extend_from_slice(sample.payload());
                crc32fast::hash(&buf)
            } else {
                crc32fast::hash(sample.payload())
            };
            crcs = crcs.wrapping_add(crc);
            count += 1;
            let last = *sample.user_header() == LAST;
            // Give the sample back before saying it was consumed.
            drop(sample);
            if let Some(c) = &consumed {
                c.update_with_copy(count);
            }
            if last {
                break 'stream;
            }
        }
        if listener.is_some() || !got {
            idle.wait(listener.as_ref())?;
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{count} {crcs}")?;
    out.flush()?;
    // Stay until the parent has read the report and closes our stdin, so
    // that it, not we, tears the services down first.
    wait_for_eof()
}

/// The other end of `latency`: answers each ping with a copy, until the
/// ping marked last.
fn echo(run: &str, size: usize, wake: Wakeup) -> Result<()> {
    let node = node()?;
    let open = |what: &str| -> Result<_> {
        node.service_builder(&service_name(run, what)?)
            .publish_subscribe::<[u8]>()
            .user_header::<u64>()
            .open()
            .with_context(|| format!("open the {what} service"))
    };
    let ping = open("ping")?;
    let pong = open("pong")?;
    let subscriber = ping
        .subscriber_builder()
        .buffer_size(1)
        .create()
        .context("create the ping subscriber")?;
    let publisher = pong
        .publisher_builder()
        .initial_max_slice_len(size)
        .backpressure_strategy(BACKPRESSURE)
        .create()
        .context("create the pong publisher")?;
    let events = match wake {
        Wakeup::Event => {
            let ev = |what: &str| -> Result<_> {
                node.service_builder(&service_name(run, what)?)
                    .event()
                    .open()
                    .with_context(|| format!("open the {what} service"))
            };
            Some((ev("ping-wake")?, ev("pong-wake")?))
        }
        Wakeup::Spin => None,
    };
    let ends = match &events {
        Some((ping_ev, pong_ev)) => Some((
            ping_ev
                .listener_builder()
                .create()
                .context("create the listener")?,
            pong_ev
                .notifier_builder()
                .create()
                .context("create the notifier")?,
        )),
        None => None,
    };
    ready()?;
    let mut idle = Idle::new();
    loop {
        let Some(sample) = subscriber.receive().context("receive")? else {
            idle.wait(ends.as_ref().map(|(l, _)| l))?;
            continue;
        };
        if *sample.user_header() == LAST {
            break;
        }
        let payload = sample.payload();
        let mut back = publisher
            .loan_slice_uninit(payload.len())
            .context("loan a sample")?;
        *back.user_header_mut() = MORE;
        back.write_from_slice(payload)
            .send()
            .context("send a sample")?;
        drop(sample);
        if let Some((_, n)) = &ends {
            n.notify().context("notify")?;
        }
    }
    wait_for_eof()
}

/// Creates the service `open` opens and keeps it (with a publisher) until
/// stdin closes.
fn holder(run: &str) -> Result<()> {
    let node = node()?;
    let service = node
        .service_builder(&service_name(run, "open")?)
        .publish_subscribe::<[u8]>()
        .create()
        .context("create the service to open")?;
    let _publisher = service
        .publisher_builder()
        .initial_max_slice_len(64 << 10)
        .create()
        .context("create its publisher")?;
    ready()?;
    wait_for_eof()
}

fn wait_for_eof() -> Result<()> {
    let mut sink = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut sink).context("read stdin")?;
    Ok(())
}
