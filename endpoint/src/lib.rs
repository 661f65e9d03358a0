//! shmlink's data plane, shared by the broker and its clients.
//!
//! A session is two shmem-ipc rings (client→server and server→client), each a
//! sealed memfd plus two eventfds, and a hang-up socket pair whose closing
//! tells either side that the other is gone. [`Endpoint`] is one side of a
//! session: it frames messages over the rings ([`frame`]), wakes and waits on
//! the eventfds without trusting the peer, and reports a dead peer instead of
//! hanging. The layout is documented byte by byte in
//! `interfaces/DATA-PLANE.md`.
//!
//! The feature `server` adds what only a server library needs (see
//! `Cargo.toml`): making a session's rings and fds, a provider's side,
//! bounded reads and writes for a pump that serves many sessions.
#![deny(missing_docs)]

/// Declares an item public with the feature `server` and crate-private
/// without it: what the server library alone uses of the data plane.
macro_rules! server_pub {
    ($(#[$attr:meta])* pub $($item:tt)*) => {
        #[cfg(feature = "server")]
        $(#[$attr])* pub $($item)*
        #[cfg(not(feature = "server"))]
        #[allow(dead_code)]
        $(#[$attr])* pub(crate) $($item)*
    };
}

mod endpoint;
pub mod frame;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod ring;
pub mod sys;

pub use endpoint::receive_rings;
#[cfg(feature = "server")]
pub use endpoint::{check_via_socket, send_rings};
#[cfg(feature = "server")]
pub use endpoint::{create_unmapped, ProvidedFds, ServerRings};
pub use endpoint::{rounded_capacity, Endpoint, EndpointReceiver, EndpointSender, PeerLimits};
pub use frame::{Budget, FillFrame, FrameError, Item, OutFrame, Piece, Received, WriteFrame};
#[cfg(feature = "server")]
pub use ring::{spin_keeping_word, ReadProgress, WriteProgress};
pub use ring::{spin_until_ready, RingReceiver, RingSender, Waitable};
pub use shmlink_interfaces::Wakeup;
pub use shmlink_interfaces::{PeerFds, RingFds, RingPair};

/// Everything that can go wrong on the data plane.
///
/// Each message states its cause in full and no variant also reports that
/// cause as its `source()`: a chain printed cause by cause (anyhow's `{:#}`)
/// then says each thing once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer broke the ring's bookkeeping (count out of range or changed mid-operation).
    #[error("shared ring corrupted by the peer: {0}")]
    Corrupt(String),
    /// The peer broke the framing rules.
    #[error("protocol violation by the peer: {0}")]
    Protocol(FrameError),
    /// The peer closed its hang-up end: the session is over.
    #[error("the session was closed by the other side")]
    Closed,
    /// A blocking call's timeout passed.
    #[error("timed out waiting for the other side")]
    TimedOut,
    /// The peer saturated an eventfd counter so that we cannot signal it.
    #[error("the other side flooded a wake-up eventfd")]
    SignalFlooded,
    /// The peer wrote to the hang-up socket, which must stay silent.
    #[error("the other side wrote to the hang-up socket")]
    HangupWritten,
    /// A file descriptor handed over by the peer is not what it must be.
    #[error("invalid file descriptor from the other side: {0}")]
    BadFd(String),
    /// The peer offered a session beyond what this side accepts (a ring
    /// larger than asked for or allowed, a larger maximum message).
    #[error(
        "{what} of {offered} bytes offered by the other side exceeds this side's limit of {limit}"
    )]
    OverLimit {
        /// What was offered, e.g. "client-to-server ring" or "max-message".
        what: &'static str,
        /// The offered size in bytes.
        offered: u64,
        /// The largest size this side accepts.
        limit: u64,
    },
    /// A message exceeds the session's maximum message size.
    #[error("message of {len} bytes exceeds the session maximum of {max} bytes")]
    TooLarge {
        /// Length of the refused message.
        len: usize,
        /// Session maximum.
        max: u32,
    },
    /// This side already sent its end-of-stream frame.
    #[error("this side already finished sending")]
    AlreadyFinished,
    /// An earlier send stopped in the middle of a message (it timed out or
    /// its fill panicked), so nothing more can be sent on this session.
    #[error("an earlier message was left half sent; this side can send no more")]
    HalfSent,
    /// A system call failed.
    #[error("system call failed: {0}")]
    Io(std::io::Error),
    /// Memory for an incoming message could not be had: a budget refused it
    /// (the text names the limit) or the allocator failed.
    #[error("{0}")]
    NoMemory(String),
    /// shmem-ipc failed to create or map a ring.
    #[error("could not set up a shared ring: {0}")]
    Setup(String),
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        Error::Protocol(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

impl Error {
    fn signal(e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            Error::SignalFlooded
        } else {
            Error::Io(e)
        }
    }

    /// Whether this error means the peer misbehaved (as opposed to leaving or a local failure).
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            Error::Corrupt(_)
                | Error::Protocol(_)
                | Error::SignalFlooded
                | Error::HangupWritten
                | Error::BadFd(_)
                | Error::OverLimit { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each error's message, then its sources' messages, as `{:#}` prints them.
    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        let mut out = vec![e.to_string()];
        let mut next = e.source();
        while let Some(s) = next {
            out.push(s.to_string());
            next = s.source();
        }
        out
    }

    /// One of each variant, with a distinctive cause where it has one.
    fn every_error() -> Vec<Error> {
        vec![
            Error::Corrupt("count 9000 above length 4032".into()),
            Error::Protocol(FrameError::UnknownKind(7)),
            Error::Protocol(FrameError::TooLong { len: 9, max: 8 }),
            Error::Protocol(FrameError::EndWithPayload(3)),
            Error::Protocol(FrameError::DataAfterEnd),
            Error::Closed,
            Error::TimedOut,
            Error::SignalFlooded,
            Error::HangupWritten,
            Error::BadFd("hang-up socket is not connected".into()),
            Error::OverLimit {
                what: "max-message",
                offered: 1 << 32,
                limit: 1 << 26,
            },
            Error::TooLarge { len: 9, max: 8 },
            Error::AlreadyFinished,
            Error::HalfSent,
            Error::from(std::io::Error::from_raw_os_error(libc::EBADF)),
            Error::from(std::io::Error::other("disk on fire")),
            Error::Setup("mmap failed".into()),
        ]
    }

    #[test]
    fn every_cause_is_printed_once() {
        for e in every_error() {
            let links = chain(&e);
            for (i, outer) in links.iter().enumerate() {
                for inner in &links[i + 1..] {
                    assert!(
                        !outer.contains(inner.as_str()),
                        "{e:?} prints {inner:?} twice: {}",
                        links.join(": ")
                    );
                }
            }
            // The cause itself is in the message, not lost with the source.
            if let Error::Protocol(f) = &e {
                assert!(links[0].contains(&f.to_string()), "{}", links[0]);
            }
        }
        let io = Error::from(std::io::Error::other("disk on fire"));
        assert!(io.to_string().contains("disk on fire"));
    }
}
