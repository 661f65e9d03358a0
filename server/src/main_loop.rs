//! The one main loop of a D-Bus side, the broker's and a provider's: read
//! and handle what the bus brought, flush, then wait for the bus, the
//! side's own fds (the engine's notify fd, the provider links), a stop fd
//! and the side's next deadline.

use dbus::blocking::Connection;
use dbus::Message;
use shmlink_endpoint::sys;
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

/// Serves `served` on `conn` until `stop` becomes readable or the
/// connection drops.
pub(crate) fn run(
    conn: &Connection,
    stop: Option<BorrowedFd<'_>>,
    served: &mut impl Served,
) -> std::io::Result<Ended> {
    let watch = conn.channel().watch();
    // SAFETY: the watch fd belongs to `conn`'s channel, which outlives
    // this borrow (the connection is borrowed for the whole loop).
    let bus_fd = unsafe { BorrowedFd::borrow_raw(watch.fd) };
    let watched = served.watched();
    loop {
        let channel = conn.channel();
        if channel.read_write(Some(Duration::ZERO)).is_err() {
            return Ok(Ended::Disconnected);
        }
        while let Some(msg) = channel.pop_message() {
            served.handle(conn, msg);
        }
        served.turn_done(conn);
        channel.flush();
        served.idle();
        let mut fds: Vec<BorrowedFd<'_>> = vec![bus_fd];
        fds.extend(watched.iter().map(|fd| fd.as_fd()));
        if let Some(s) = stop {
            fds.push(s);
        }
        let ready = sys::poll_readable(&fds, served.deadline())?;
        if stop.is_some() && ready[fds.len() - 1].readable {
            return Ok(Ended::Stopped);
        }
        for (index, r) in ready[1..=watched.len()].iter().enumerate() {
            if r.readable {
                served.ready(conn, index);
            }
        }
        if ready[0].hangup && !ready[0].readable {
            return Ok(Ended::Disconnected);
        }
    }
}
