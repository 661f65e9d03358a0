//! Attacks on the daemon's time, and the honest client that measures what
//! they cost everyone else.
//!
//! - [`Trickle`]: sessions fed a frame one byte at a time (`sink`: a header
//!   announcing the largest message, then a byte per tick) or drained one
//!   byte at a time (`source` with large messages), in park or spin mode;
//! - [`huge_call`]: an `OpenSession` whose service name or options are
//!   megabytes long;
//! - [`measure_honest`]: `OpenSession` and 64-byte echo round trips of an
//!   honest client, timed and verified.

use crate::hostile::{self, RawSession};
use dbus::arg::{PropMap, RefArg, Variant};
use dbus::blocking::Connection;
use shmlink_endpoint::frame::KIND_MESSAGE;
use shmlink_interfaces::{option, wakeup};
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
