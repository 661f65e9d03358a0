//! The one main loop of a D-Bus side, the broker's and a provider's: read
//! and handle what the bus brought, write what the bus takes, then wait for
//! the bus, the side's own fds (the engine's notify fd, the provider links),
//! a stop fd and the side's next deadline.

use dbus::blocking::Connection;
use dbus::Message;
use shmlink_endpoint::sys::{self, Wait};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a main loop serves.
pub(crate) trait Served {
    /// Handles one message from the bus.
    fn handle(&mut self, conn: &Connection, msg: Message);
    /// Called once the messages of a turn are handled, before the flush.
    fn turn_done(&mut self, _conn: &Connection) {}
    /// Called after the flush, when no message waits.
    fn idle(&mut self) {}
    /// The fds to wait for besides the bus's; [`Served::ready`] gets the
    /// index of each that became readable.
    fn watched(&mut self) -> Vec<Arc<dyn AsFd>>;
    /// The fd of [`Served::watched`] at `index` is readable.
    fn ready(&mut self, conn: &Connection, index: usize);
    /// When the loop must wake up at the latest.
    fn deadline(&self) -> Option<Instant> {
        None
    }
}

/// Why a main loop returned.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The stop fd became readable.
    Stopped,
    /// The bus connection dropped.
    Disconnected,
}

/// How many times a turn hands queued messages to the bus before it waits
/// for the bus to take more: libdbus writes a few KiB each time.
const WRITES_PER_TURN: usize = 64;

/// How many messages a turn handles before it looks at the stop fd and the
/// side's own fds again.
const MESSAGES_PER_TURN: usize = 256;

/// How long a side that stops gives the bus to take its last messages.
pub(crate) const LAST_WORDS: Duration = Duration::from_millis(250);

/// Serves `served` on `conn` until `stop` becomes readable or the
/// connection drops.
///
/// Never blocks on the bus: messages are written as the bus takes them, and
/// while some are still queued no new message is handled (the loop waits
/// for room to write instead). A peer that does not read what the bus
/// holds for it can make the bus stop reading us; then this side queues
/// nothing more, keeps its deadlines and its own fds, and stops at once.
pub(crate) fn run(
    conn: &Connection,
    stop: Option<BorrowedFd<'_>>,
    served: &mut impl Served,
) -> std::io::Result<Ended> {
    let bus_fd = bus_fd(conn);
    let watched = served.watched();
    loop {
        let channel = conn.channel();
        if channel.read_write(Some(Duration::ZERO)).is_err() {
            return Ok(Ended::Disconnected);
        }
        // A turn handles a bounded number of messages, so that a flood of
        // calls never keeps the loop from its stop fd and its own fds.
        if !channel.has_messages_to_send() {
            for _ in 0..MESSAGES_PER_TURN {
                let Some(msg) = channel.pop_message() else {
                    break;
                };
                served.handle(conn, msg);
            }
        }
        served.turn_done(conn);
        let backlog = !send_queued(conn);
        // Writing reads too: what arrived meanwhile (or waited while replies
        // were queued, or past this turn's share) is handled before the loop
        // sleeps, as the socket may have nothing more to wake it for.
        let more = !backlog && {
            match channel.pop_message() {
                Some(msg) => {
                    served.handle(conn, msg);
                    true
                }
                None => {
                    served.idle();
                    false
                }
            }
        };
        let bus_wait = if backlog {
            Wait::Writable
        } else {
            Wait::Readable
        };
        let mut fds: Vec<(BorrowedFd<'_>, Wait)> = vec![(bus_fd, bus_wait)];
        fds.extend(watched.iter().map(|fd| (fd.as_fd(), Wait::Readable)));
        if let Some(s) = stop {
            fds.push((s, Wait::Readable));
        }
        // With messages possibly left, only look at the fds and go on
        // (while replies wait for the bus, the loop waits for room instead).
        let deadline = if more {
            Some(Instant::now())
        } else {
            served.deadline()
        };
        let ready = sys::poll(&fds, deadline)?;
        if stop.is_some() && ready[fds.len() - 1].readable {
            return Ok(Ended::Stopped);
        }
        for (index, r) in ready[1..=watched.len()].iter().enumerate() {
            if r.readable {
                served.ready(conn, index);
            }
        }
        if ready[0].hangup && !ready[0].readable && !ready[0].writable {
            return Ok(Ended::Disconnected);
        }
    }
}

/// The fd of `conn`'s socket.
fn bus_fd(conn: &Connection) -> BorrowedFd<'_> {
    let watch = conn.channel().watch();
    // SAFETY: the watch fd belongs to `conn`'s channel, which outlives the
    // returned borrow (it borrows `conn`).
    unsafe { BorrowedFd::borrow_raw(watch.fd) }
}

/// Hands queued messages to the bus as far as it takes them without
/// waiting; returns whether none is left.
fn send_queued(conn: &Connection) -> bool {
    let channel = conn.channel();
    for _ in 0..WRITES_PER_TURN {
        if !channel.has_messages_to_send() {
            return true;
        }
        if channel.read_write(Some(Duration::ZERO)).is_err() {
            return true;
        }
    }
    !channel.has_messages_to_send()
}

/// Gives the bus up to `limit` to take the messages still queued (a side's
/// last replies and signals when it stops); what it has not taken by then
/// is dropped with the connection.
pub(crate) fn send_within(conn: &Connection, limit: Duration) {
    let deadline = Instant::now() + limit;
    let bus_fd = bus_fd(conn);
    while !send_queued(conn) && Instant::now() < deadline {
        match sys::poll(&[(bus_fd, Wait::Writable)], Some(deadline)) {
            Ok(ready) if ready[0].writable => {}
            _ => return,
        }
    }
}
