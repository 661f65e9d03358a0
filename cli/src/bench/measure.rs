//! The measurements of `shmlink bench`: shmlink sessions and the baselines
//! (Unix socket, pipe, D-Bus, eventfd, memcpy), each returning raw numbers.

use super::*;

/// Sends `msg` repeatedly with `send` until `budget` has passed; returns messages sent.
pub(super) fn stream_for(budget: Duration, mut send: impl FnMut() -> Result<()>) -> Result<u64> {
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

pub(super) fn cell(transport: &'static str, size: usize, messages: u64, secs: f64) -> Throughput {
    Throughput {
        transport,
        size,
        bytes_per_sec: (messages * size as u64) as f64 / secs,
        messages,
    }
}

/// One-way into the `sink` service; the clock stops when the sink has
/// consumed everything (its end-of-stream reply).
pub(super) fn shmlink_sink(
    client: &Client,
    msg: &[u8],
    budget: Duration,
    wake: Wakeup,
) -> Result<Throughput> {
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

/// One-way into `service` (a sink served elsewhere, e.g. by a provider), park mode.
pub(super) fn shmlink_sink_as(
    client: &Client,
    service: &str,
    label: &'static str,
    msg: &[u8],
    budget: Duration,
) -> Result<Throughput> {
    let mut s = client
        .session(service)
        .capacity(RING)
        .open()
        .with_context(|| format!("open a {service} session"))?;
    let t = Instant::now();
    let n = stream_for(budget, || Ok(s.send(msg)?))?;
    s.finish()?;
    ensure!(s.recv()?.is_none(), "{service} sent data back");
    let secs = t.elapsed().as_secs_f64();
    s.close()?;
    Ok(cell(label, msg.len(), n, secs))
}

/// Through `echo` and back, counted one way; sender and receiver are two threads.
pub(super) fn shmlink_echo(client: &Client, msg: &[u8], budget: Duration) -> Result<Throughput> {
    let s = client
        .session(service::ECHO)
        .capacity(RING)
        .open()
        .context("open an echo session")?;
    let (mut w, mut r) = s.split();
    let len = msg.len();
    let t = Instant::now();
    let reader = std::thread::spawn(move || -> Result<(u64, shmlink::SessionReceiver)> {
        let mut n = 0u64;
        // One buffer for every message, as a streaming reader would use it.
        let mut m = Vec::new();
        while r.recv_into(&mut m)? {
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
pub(super) struct Peer {
    child: Child,
}

impl Peer {
    pub(super) fn spawn(role: &str, extra: &[&str], stdin: Stdio, stdout: Stdio) -> Result<Peer> {
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
    pub(super) fn await_ready(mut self) -> Result<Peer> {
        let out = self.child.stdout.take().context("peer stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        ensure!(
            line.trim() == "ready",
            "the benchmark's peer did not start (said {line:?})"
        );
        Ok(self)
    }

    pub(super) fn stop(mut self) {
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
pub(super) fn stream_sink(
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
pub(super) fn pipe() -> Result<(std::fs::File, std::fs::File)> {
    let (r, w) = sys::pipe().context("pipe2")?;
    Ok((r.into(), w.into()))
}

pub(super) fn dbus_call(dbus: &Channel, member: &str, payload: Option<&[u8]>) -> Result<Message> {
    let m = Message::new_method_call(PEER_NAME, "/", PEER_IFACE, member).map_err(|e| anyhow!(e))?;
    let m = match payload {
        Some(p) => m.append1(p),
        None => m,
    };
    Ok(dbus.send_with_reply_and_block(m, DBUS_TIMEOUT)?)
}

/// One method call per message, the bytes as `ay` read and written as `&[u8]`.
pub(super) fn dbus_sink(dbus: &Channel, msg: &[u8], budget: Duration) -> Result<Throughput> {
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
pub(super) fn memcpy(msg: &[u8], budget: Duration) -> Throughput {
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
    pub(super) fn from_samples(name: &'static str, mut samples: Vec<Duration>) -> Latency {
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
pub(super) fn time_round_trips(
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

pub(super) fn shmlink_rtt(
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
    let mut back = Vec::new();
    let lat = time_round_trips(name, budget, || {
        s.send(&msg)?;
        ensure!(s.recv_into(&mut back)?, "echo ended early");
        ensure!(back.len() == PING, "echo returned {} bytes", back.len());
        Ok(())
    })?;
    s.close()?;
    Ok(lat)
}

pub(super) fn eventfd() -> Result<OwnedFd> {
    sys::blocking_eventfd().context("eventfd")
}

/// Adds `v` to a blocking eventfd's counter.
pub(super) fn eventfd_write(fd: impl AsFd, v: u64) -> std::io::Result<()> {
    sys::eventfd_write(fd.as_fd(), v)
}

/// Waits for a blocking eventfd's counter, reads and resets it.
pub(super) fn eventfd_read(fd: impl AsFd) -> std::io::Result<u64> {
    sys::eventfd_read(fd.as_fd())
}

/// Two blocking eventfds and a child that answers each ping: the kernel's
/// cost of a blocking wake-up round trip between two processes.
pub(super) fn eventfd_rtt(budget: &Budget) -> Result<Latency> {
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

pub(super) fn unix_rtt(budget: &Budget) -> Result<Latency> {
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

pub(super) fn dbus_rtt(dbus: &Channel, budget: &Budget) -> Result<Latency> {
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

/// Set-up times, `n` of each, taken in turns so that both see the same
/// machine: `OpenSession` of `service` with the client-side checks and
/// mappings, to a usable session, and a bare D-Bus call to the same daemon
/// (`Peer.Ping`). Each session is closed before the next call. `label`
/// names the opens in the table.
pub(super) fn setup_times(
    client: &Client,
    service: &str,
    label: &'static str,
    n: usize,
) -> Result<(Latency, Latency)> {
    let (mut opens, mut pings) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        let s = client.session(service).capacity(64 << 10).open()?;
        opens.push(t.elapsed());
        s.close()?;
        pings.push(client.ping()?);
    }
    Ok((
        Latency::from_samples(label, opens),
        Latency::from_samples("D-Bus method call (Peer.Ping to shmlinkd)", pings),
    ))
}

/// `clients` connections, each streaming 64 KiB messages into its own sink at once.
pub(super) fn aggregate_sink(bus: &Bus, clients: usize, budget: Duration) -> Result<f64> {
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

/// Sessions that keep the daemon's workers spinning: `n` `sink` sessions in
/// spin mode with the longest spin, each sent a 1-byte message every
/// millisecond (every whole frame renews a session's spin budget), until dropped.
pub(super) struct Spinners {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Spinners {
    pub(super) fn start(bus: &Bus, n: usize) -> Result<Spinners> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (bus, s) = (bus.clone(), stop.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            let opened = (|| -> Result<Vec<shmlink::Session>> {
                let client = Client::connect(&bus)?;
                let spin =
                    Duration::from_micros(u64::from(shmlink_interfaces::limits::MAX_SPIN_US));
                (0..n)
                    .map(|_| {
                        let s = client
                            .session(service::SINK)
                            .capacity(64 << 10)
                            .wakeup(Wakeup::Spin(spin))
                            .open()?;
                        Ok(s)
                    })
                    .collect()
            })();
            let mut sessions = match opened {
                Ok(v) => {
                    let _ = ready_tx.send(Ok(()));
                    v
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            while !s.load(Ordering::Relaxed) {
                for session in &mut sessions {
                    session.send(&[1])?;
                }
                // The load's pace: one message per session per millisecond.
                std::thread::sleep(Duration::from_millis(1));
            }
            for session in sessions {
                session.close()?;
            }
            Ok(())
        });
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the spinning sessions' thread died"))?
            .context("open the spinning sessions")?;
        Ok(Spinners {
            stop,
            thread: Some(thread),
        })
    }

    pub(super) fn stop(mut self) -> Result<()> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the spinning sessions' thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
