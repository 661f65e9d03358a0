//! Attacks on the daemon's time, and the honest client that measures what
//! they cost everyone else.
//!
//! - [`Trickle`]: sessions fed a frame one byte at a time (`sink`: a header
//!   announcing the largest message, then a byte per tick) or drained one
//!   byte at a time (`source` with large messages), in park or spin mode;
//! - [`huge_call`]: an `OpenSession` whose service name or options are
//!   megabytes long;
//! - [`measure_honest`]: `OpenSession` and 64-byte echo round trips of an
//!   honest client, timed and verified;
//! - [`Pipeline`]: calls written to the bus all at once, their answers read
//!   only when the attacker chooses (or never), for the attacks on the
//!   broker's bus connection;
//! - [`Attacker`]: `hostile-client` run as `nobody`, and
//!   [`assert_stops_quickly`] for SIGTERM under an attack.

use crate::hostile::{self, hostile_binary, RawSession};
use crate::Harness;
use dbus::arg::{PropMap, RefArg, Variant};
use dbus::blocking::Connection;
use dbus::channel::Channel;
use dbus::Message;
use rustix::event::{PollFd, PollFlags};
use shmlink_endpoint::frame::KIND_MESSAGE;
use shmlink_interfaces::{member, option, wakeup, BROKER_INTERFACE, BROKER_PATH, BUS_NAME};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::os::fd::BorrowedFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The largest spin an option may ask for (µs).
pub const MAX_SPIN_US: u64 = shmlink_interfaces::limits::MAX_SPIN_US as u64;

fn prop<T: RefArg + 'static>(v: T) -> Variant<Box<dyn RefArg>> {
    Variant(Box::new(v))
}

/// Ring options for an attacking session: a 4 KiB ring, and `spin` mode
/// with the longest spin when `spin` is true.
pub fn ring_options(spin: bool) -> PropMap {
    let mut m = hostile::capacity_option(4096);
    if spin {
        m.insert(option::WAKEUP.into(), prop(wakeup::SPIN.to_owned()));
        m.insert(option::SPIN_US.into(), prop(MAX_SPIN_US));
    }
    m
}

/// Sessions that move one byte per [`Trickle::tick`].
pub struct Trickle {
    /// The sessions, opened by this process.
    pub sessions: Vec<RawSession>,
    feeding: bool,
}

impl Trickle {
    /// Opens `n` `sink` sessions (each on its own connection) and sends each
    /// a frame header announcing the session's largest message; every tick
    /// then adds one byte of its body.
    pub fn feed(address: &str, n: usize, spin: bool) -> Result<Trickle, String> {
        let mut sessions = Vec::with_capacity(n);
        for _ in 0..n {
            let conn = hostile::connect(address).map_err(|e| e.to_string())?;
            let mut s = RawSession::open_on(conn, "sink", ring_options(spin))?;
            let len = u32::try_from(s.max_message).unwrap_or(u32::MAX);
            if s.send_header(KIND_MESSAGE, len) != 8 {
                return Err("no room for a frame header".into());
            }
            sessions.push(s);
        }
        Ok(Trickle {
            sessions,
            feeding: true,
        })
    }

    /// Opens `n` `source` sessions that produce `message_size`-byte messages
    /// without end; every tick then reads one byte of what they wrote.
    pub fn drain(
        address: &str,
        n: usize,
        spin: bool,
        message_size: u64,
    ) -> Result<Trickle, String> {
        let mut sessions = Vec::with_capacity(n);
        for _ in 0..n {
            let conn = hostile::connect(address).map_err(|e| e.to_string())?;
            let mut opts = ring_options(spin);
            opts.insert(option::MESSAGE_SIZE.into(), prop(message_size));
            opts.insert(option::COUNT.into(), prop(u64::MAX));
            sessions.push(RawSession::open_on(conn, "source", opts)?);
        }
        Ok(Trickle {
            sessions,
            feeding: false,
        })
    }

    /// Moves one byte in each session.
    pub fn tick(&mut self) {
        for s in &mut self.sessions {
            if self.feeding {
                s.to_server.write(&[0x5a]);
            } else {
                s.to_client.read(1);
            }
        }
    }
}

/// What the service name or options of a [`huge_call`] carry.
#[derive(Clone, Copy, Debug)]
pub enum Huge {
    /// A service name of this many bytes.
    ServiceName(usize),
    /// An `echo` call with a string option of this many bytes.
    OptionValue(usize),
}

/// Calls `OpenSession` with a huge argument; returns the D-Bus error name
/// (or "no error") and how long the call took.
pub fn huge_call(conn: &Connection, what: Huge) -> (String, Duration) {
    let (service, options) = match what {
        Huge::ServiceName(n) => ("s".repeat(n), PropMap::new()),
        Huge::OptionValue(n) => {
            let mut m = PropMap::new();
            m.insert(option::WAKEUP.into(), prop("w".repeat(n)));
            ("echo".to_owned(), m)
        }
    };
    let start = Instant::now();
    let name = match hostile::open_session_raw(conn, &service, options) {
        Ok(_) => "no error".to_owned(),
        Err(e) => e.name().unwrap_or("?").to_owned(),
    };
    (name, start.elapsed())
}

/// Sorted durations with percentiles.
#[derive(Clone, Debug, Default)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    /// Adds a sample.
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    /// The `p`-th percentile (0..=100), nearest rank; zero without samples.
    pub fn percentile(&self, p: u32) -> Duration {
        let mut v = self.0.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        let rank = (v.len() * p as usize).div_ceil(100).clamp(1, v.len());
        v[rank - 1]
    }

    /// The largest sample.
    pub fn max(&self) -> Duration {
        self.0.iter().copied().max().unwrap_or_default()
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// "p50 x ms, p99 y ms, max z ms".
    pub fn summary(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            ms(self.percentile(50)),
            ms(self.percentile(99)),
            ms(self.max()),
            self.len()
        )
    }
}

/// Timed `OpenSession` calls and 64-byte echo round trips of an honest client.
#[derive(Debug, Default)]
pub struct HonestTimes {
    /// `OpenSession` of an `echo` session, reply included.
    pub open: Latencies,
    /// One 64-byte message to `echo` and back.
    pub echo: Latencies,
}

/// Opens `sessions` echo sessions one after the other on `client`, each
/// with `rounds` verified 64-byte round trips, and times both.
pub fn measure_honest(
    client: &shmlink::Client,
    sessions: usize,
    rounds: usize,
) -> Result<HonestTimes, String> {
    let mut t = HonestTimes::default();
    for s in 0..sessions {
        let start = Instant::now();
        let mut session = client
            .session("echo")
            .capacity(4096)
            .timeout(Duration::from_secs(10))
            .open()
            .map_err(|e| format!("honest open {s}: {e}"))?;
        t.open.push(start.elapsed());
        for r in 0..rounds {
            let msg = crate::payload((s * rounds + r) as u64, 64);
            let start = Instant::now();
            session
                .send(&msg)
                .map_err(|e| format!("honest send {s}/{r}: {e}"))?;
            let back = session
                .recv()
                .map_err(|e| format!("honest recv {s}/{r}: {e}"))?;
            t.echo.push(start.elapsed());
            if back.as_deref() != Some(&msg[..]) {
                return Err(format!("honest message {s}/{r} came back different"));
            }
        }
        session
            .close()
            .map_err(|e| format!("honest close {s}: {e}"))?;
    }
    Ok(t)
}

/// An attacker process running as `nobody`, stopped (stdin closed) on drop.
pub struct Attacker {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    /// The session paths it printed.
    pub paths: Vec<String>,
    /// Its first line that is not a path.
    pub ready: String,
}

impl Attacker {
    /// Starts `hostile-client ADDRESS ARGS...` as `nobody` and reads its
    /// output up to its first line that is not a path, which must start
    /// with `READY`.
    pub fn start(h: &Harness, args: &[&str]) -> Attacker {
        let mut child = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(crate::world_executable(&hostile_binary()))
            .arg(h.address())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn setpriv hostile-client");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut paths = Vec::new();
        let ready = loop {
            let mut line = String::new();
            out.read_line(&mut line).expect("read a line");
            match line.trim().strip_prefix("PATH ") {
                Some(p) => paths.push(p.to_owned()),
                None => break line.trim().to_owned(),
            }
        };
        assert!(
            ready.starts_with("READY"),
            "attacker {args:?} did not start: {ready:?}"
        );
        Attacker {
            child,
            out,
            paths,
            ready,
        }
    }

    /// Closes its stdin and returns its last line.
    pub fn stop(mut self) -> String {
        drop(self.child.stdin.take());
        let mut last = String::new();
        let mut line = String::new();
        while self.out.read_line(&mut line).is_ok_and(|n| n > 0) {
            last = std::mem::take(&mut line);
        }
        let _ = self.child.wait();
        last.trim().to_owned()
    }

    /// Stops it and returns the two numbers of its last line, `DONE a b`.
    pub fn stop_done(self) -> [u64; 2] {
        let last = self.stop();
        let done: Vec<u64> = last
            .strip_prefix("DONE ")
            .map(|r| r.split(' ').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default();
        done.try_into()
            .unwrap_or_else(|_| panic!("attacker ended with {last:?}"))
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// SIGTERM ends the daemon, cleanly, within a second.
pub fn assert_stops_quickly(h: &mut Harness, what: &str) {
    let daemon = h.take_daemon();
    let start = Instant::now();
    let status = daemon.stop().expect("stop the daemon");
    let took = start.elapsed();
    println!("{what}: SIGTERM to exit {took:?}");
    assert!(status.success(), "{what}: {status}");
    assert!(
        took < Duration::from_secs(1),
        "{what}: SIGTERM took {took:?}"
    );
}

/// An `OpenSession(service, options)` call to the broker.
pub fn open_call(service: &str, options: PropMap) -> Message {
    Message::new_method_call(
        BUS_NAME,
        BROKER_PATH,
        BROKER_INTERFACE,
        member::OPEN_SESSION,
    )
    .expect("OpenSession message")
    .append2(service, options)
}

/// A `Ping` of the broker carrying a string of `bytes` bytes: a call that
/// names nothing the broker could judge before it knows the caller.
pub fn ping_call(bytes: usize) -> Message {
    Message::new_method_call(BUS_NAME, BROKER_PATH, "org.freedesktop.DBus.Peer", "Ping")
        .expect("Ping message")
        .append1("x".repeat(bytes))
}

/// A `ListSessions()` call to the broker.
pub fn list_call() -> Message {
    Message::new_method_call(
        BUS_NAME,
        BROKER_PATH,
        BROKER_INTERFACE,
        member::LIST_SESSIONS,
    )
    .expect("ListSessions message")
}

/// Options with one string of `bytes` bytes under `key`.
pub fn huge_option(key: &str, bytes: usize) -> PropMap {
    let mut m = PropMap::new();
    m.insert(key.into(), prop("x".repeat(bytes)));
    m
}

/// Pings the broker on `channel` and waits for the answer: the broker then
/// knows the connection's credentials, and the calls that follow need not
/// wait for them (only a few may).
pub fn introduce(channel: &Channel) -> Result<(), String> {
    let ping = Message::new_method_call(BUS_NAME, BROKER_PATH, "org.freedesktop.DBus.Peer", "Ping")
        .expect("Ping message");
    channel
        .send_with_reply_and_block(ping, hostile::CALL_TIMEOUT)
        .map(|_| ())
        .map_err(|e| format!("Ping: {e}"))
}

/// A bus connection whose calls are written straight to its socket, in one
/// stream, and whose socket is read only when asked
/// ([`Pipeline::replies`]). Sending through libdbus would read the socket
/// too (a flush reads while it writes), so a client that must not read, or
/// not yet, writes the calls itself.
pub struct Pipeline {
    channel: Channel,
    serials: Vec<u32>,
    held: Option<u8>,
}

impl Pipeline {
    /// A fresh connection to the bus at `address` (`Hello` done); the broker
    /// knows nothing of it yet.
    pub fn connect(address: &str) -> Result<Pipeline, String> {
        let mut channel = Channel::open_private(address).map_err(|e| e.to_string())?;
        channel.register().map_err(|e| e.to_string())?;
        channel.set_watch_enabled(true);
        Ok(Pipeline {
            channel,
            serials: Vec::new(),
            held: None,
        })
    }

    /// Pings the broker and waits for the answer, so that the broker has
    /// learnt this connection's credentials before the calls that follow.
    pub fn introduce(&self) -> Result<(), String> {
        introduce(&self.channel)
    }

    /// Writes every call of `calls` to the socket, one after the other
    /// without waiting for any answer, and returns once the bus has taken
    /// every byte; never reads from the socket. With `hold_last_byte`, the
    /// stream's last byte is kept back until [`Pipeline::release`]: the
    /// bus has then read every call but the last, which it cannot deliver
    /// before that byte comes.
    pub fn send(
        &mut self,
        calls: impl IntoIterator<Item = Message>,
        hold_last_byte: bool,
    ) -> Result<(), String> {
        let mut calls = calls.into_iter().peekable();
        while let Some(mut call) = calls.next() {
            // Above any serial libdbus gave this connection's own calls.
            let serial = 1_000_000 + self.serials.len() as u32;
            call.set_serial(serial);
            let last = calls.peek().is_none();
            call.marshal(|bytes| -> Result<(), String> {
                match bytes.split_last() {
                    Some((&byte, rest)) if last && hold_last_byte => {
                        self.held = Some(byte);
                        self.write(rest)
                    }
                    _ => self.write(bytes),
                }
            })?;
            self.serials.push(serial);
        }
        Ok(())
    }

    /// Writes the byte [`Pipeline::send`] held back, if any.
    pub fn release(&mut self) -> Result<(), String> {
        match self.held.take() {
            Some(byte) => self.write(&[byte]),
            None => Ok(()),
        }
    }

    /// Writes all of `bytes` to the socket, waiting while it is full.
    fn write(&self, mut bytes: &[u8]) -> Result<(), String> {
        let fd = self.channel.watch().fd;
        // SAFETY: the fd is the channel's socket, open as long as `self`.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        while !bytes.is_empty() {
            match rustix::io::write(fd, bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {
                    let mut p = [PollFd::new(&fd, PollFlags::OUT)];
                    let _ = rustix::event::poll(&mut p, None);
                }
                Err(e) => return Err(format!("write to the bus: {e}")),
            }
        }
        Ok(())
    }

    /// Reads the answers to every call sent until all came or `deadline`
    /// passed; counts them by error name (`ok` for a method return), and
    /// those missing as `unanswered`.
    pub fn replies(&mut self, deadline: Duration) -> BTreeMap<String, usize> {
        let mut waiting: HashSet<u32> = self.serials.iter().copied().collect();
        let mut counts = BTreeMap::new();
        let end = Instant::now() + deadline;
        while !waiting.is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Ok(Some(mut msg)) = self.channel.blocking_pop_message(left) else {
                if !self.channel.is_connected() {
                    break;
                }
                continue;
            };
            if !msg.get_reply_serial().is_some_and(|s| waiting.remove(&s)) {
                continue;
            }
            let name = match msg.msg_type() {
                dbus::MessageType::Error => msg
                    .as_result()
                    .err()
                    .and_then(|e| e.name().map(str::to_owned))
                    .unwrap_or_else(|| "?".into()),
                _ => "ok".into(),
            };
            *counts.entry(name).or_insert(0) += 1;
        }
        if !waiting.is_empty() {
            counts.insert("unanswered".into(), waiting.len());
        }
        counts
    }
}

/// `DONE name=count name=count ...`, the last line of an attacker that
/// counted its answers.
pub fn done_line(counts: &BTreeMap<String, usize>) -> String {
    let mut line = "DONE".to_owned();
    for (name, n) in counts {
        line.push_str(&format!(" {name}={n}"));
    }
    line
}

/// The counts of a [`done_line`]; `None` if `line` is not one.
pub fn parse_done_line(line: &str) -> Option<BTreeMap<String, usize>> {
    let rest = line.strip_prefix("DONE")?;
    rest.split_whitespace()
        .map(|pair| {
            let (name, n) = pair.split_once('=')?;
            Some((name.to_owned(), n.parse().ok()?))
        })
        .collect()
}
