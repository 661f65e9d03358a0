//! Attacks on the daemon's memory: sessions that make it hold as much as a
//! client can, for `hostile-client ADDR memory ATTACK MODE N SIZE` (run as
//! another uid under `setpriv`) and the tests in `e2e/memory.rs`.
//!
//! Each [`Attack`] opens `N` sessions (wake-up mode `park` or `spin`) and
//! makes each one hold up to `SIZE` bytes (the session's maximum message
//! size) in the daemon, then keeps everything open: the daemon must charge
//! what it holds to the attacker's uid and end (or stall) the sessions that
//! would pass `memory_per_user`, never grow past it.

use crate::hostile::{self, RawSession};
use dbus::arg::{PropMap, RefArg, Variant};
use shmlink_endpoint::frame::{encode_header, KIND_MESSAGE};
use shmlink_endpoint::sys::{self, HangupState};
use shmlink_interfaces::option;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// Ring capacity of the attack sessions: large enough that pushing a
/// multi-MiB frame through takes few wake-ups, small next to the limits.
pub const ATTACK_CAPACITY: u64 = 256 << 10;

/// How long one write of an attack may wait for the daemon to make room.
const WRITE_DEADLINE: Duration = Duration::from_secs(20);

/// One way of making the daemon hold memory on a session's behalf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// `source` with messages of `SIZE` bytes and a near-endless count, never read.
    SourceUnread,
    /// `sink` sent a frame header announcing `SIZE` bytes and all but the last byte.
    PartialFrame,
    /// `echo` sent one `SIZE`-byte message whose reply is never read.
    EchoUnread,
    /// `N - 1` `channel` members that never read, and one member publishing
    /// `SIZE`-byte messages to them.
    ChannelUnread,
}

impl Attack {
    /// Every attack, with its command-line name.
    pub const ALL: [(Attack, &'static str); 4] = [
        (Attack::SourceUnread, "source-unread"),
        (Attack::PartialFrame, "partial-frame"),
        (Attack::EchoUnread, "echo-unread"),
        (Attack::ChannelUnread, "channel-unread"),
    ];

    /// The attack called `name` on the command line.
    pub fn parse(name: &str) -> Option<Attack> {
        Attack::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(a, _)| *a)
    }

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        Attack::ALL
            .iter()
            .find(|(a, _)| *a == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }
}

/// What an attack achieved, and the sessions it keeps open until dropped.
pub struct Held {
    /// Sessions the daemon opened.
    pub opened: usize,
    /// `OpenSession` calls the daemon refused (with the first refusal's text).
    pub refused: Vec<String>,
    /// Sessions the daemon ended while the attack wrote to them.
    pub closed: usize,
    sessions: Vec<RawSession>,
}

impl Held {
    /// The one-line summary `hostile-client` prints.
    pub fn summary(&self) -> String {
        format!(
            "READY opened={} refused={} closed={}",
            self.opened,
            self.refused.len(),
            self.closed
        )
    }

    /// Object paths of the sessions held.
    pub fn paths(&self) -> Vec<&str> {
        self.sessions.iter().map(|s| s.path.as_str()).collect()
    }
}

fn put(m: &mut PropMap, key: &str, v: impl RefArg + 'static) {
    m.insert(key.into(), Variant(Box::new(v)));
}

/// The options of one attack session of `service`.
fn options(mode: &str, extra: impl FnOnce(&mut PropMap)) -> PropMap {
    let mut m = hostile::capacity_option(ATTACK_CAPACITY);
    put(&mut m, option::WAKEUP, mode.to_owned());
    extra(&mut m);
    m
}

/// Whether the daemon closed its end of `s`'s hang-up socket.
fn hung_up(s: &RawSession) -> bool {
    s.hangup
        .as_ref()
        .is_none_or(|fd| !matches!(sys::hangup_state(fd.as_fd()), Ok(HangupState::Open)))
}

/// Writes `bytes` into `s`'s ring as the daemon makes room; `Ok(false)` if
/// the daemon ended the session first, an error if it neither read nor ended
/// it within the deadline.
fn push(s: &mut RawSession, mut bytes: &[u8]) -> Result<bool, String> {
    let end = Instant::now() + WRITE_DEADLINE;
    while !bytes.is_empty() {
        let n = s.to_server.write(bytes);
        bytes = &bytes[n..];
        if n > 0 {
            continue;
        }
        if hung_up(s) {
            return Ok(false);
        }
        if Instant::now() > end {
            return Err(format!("{}: the daemon neither read nor ended it", s.path));
        }
        // The space eventfd is a hint (wake at least every 5 ms); the count is the truth.
        let mut fds = vec![];
        if let Some(f) = &s.to_server.full_signal {
            fds.push(f.as_fd());
        }
        if let Some(f) = &s.hangup {
            fds.push(f.as_fd());
        }
        let _ = sys::poll_readable(&fds, Some(Instant::now() + Duration::from_millis(5)));
        if let Some(f) = &s.to_server.full_signal {
            let _ = sys::eventfd_drain(f.as_fd());
        }
    }
    Ok(true)
}

/// A frame header announcing `len` bytes followed by `body` (its first bytes).
fn frame_start(len: u64, body: usize) -> Vec<u8> {
    let len32 = u32::try_from(len).unwrap_or(u32::MAX);
    let mut f = encode_header(KIND_MESSAGE, len32).to_vec();
    f.extend(crate::payload(len, body));
    f
}

/// Runs `attack` against the daemon on the bus at `address` with `n`
/// sessions in wake-up `mode`, each holding up to `size` bytes.
pub fn run(address: &str, attack: Attack, mode: &str, n: usize, size: u64) -> Result<Held, String> {
    let mut held = Held {
        opened: 0,
        refused: Vec::new(),
        closed: 0,
        sessions: Vec::new(),
    };
    let body = usize::try_from(size).map_err(|e| e.to_string())?;
    for i in 0..n {
        let (service, opts) = match attack {
            Attack::SourceUnread => (
                "source",
                options(mode, |m| {
                    put(m, option::MESSAGE_SIZE, size);
                    put(m, option::COUNT, 1u64 << 62);
                }),
            ),
            Attack::PartialFrame => ("sink", options(mode, |_| {})),
            Attack::EchoUnread => ("echo", options(mode, |_| {})),
            Attack::ChannelUnread => (
                "channel",
                options(mode, |m| put(m, option::CHANNEL, "hog".to_owned())),
            ),
        };
        let conn = hostile::connect(address).map_err(|e| format!("connect: {e}"))?;
        let mut s = match RawSession::open_on(conn, service, opts) {
            Ok(s) => s,
            Err(e) => {
                held.refused.push(e);
                continue;
            }
        };
        held.opened += 1;
        let alive = match attack {
            Attack::SourceUnread => true,
            Attack::PartialFrame => push(&mut s, &frame_start(size, body.saturating_sub(1)))?,
            Attack::EchoUnread => push(&mut s, &frame_start(size, body))?,
            // The last member publishes; the others only listen.
            Attack::ChannelUnread if i + 1 == n => {
                let mut alive = true;
                for _ in 0..4 {
                    alive = push(&mut s, &frame_start(size, body))?;
                    if !alive {
                        break;
                    }
                }
                alive
            }
            Attack::ChannelUnread => true,
        };
        if !alive {
            held.closed += 1;
        }
        held.sessions.push(s);
    }
    Ok(held)
}
