//! shmlink's data plane, shared by the broker and its clients.
//!
//! A session is two shmem-ipc rings (client→server and server→client), each a
//! sealed memfd plus two eventfds, and a hang-up socket pair whose closing
//! tells either side that the other is gone. [`Endpoint`] is one side of a
//! session: it frames messages over the rings ([`frame`]), wakes and waits on
//! the eventfds without trusting the peer, and reports a dead peer instead of
//! hanging. The layout is documented byte by byte in
//! `interfaces/DATA-PLANE.md`.
#![deny(missing_docs)]

mod endpoint;
pub mod frame;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod ring;
pub mod sys;

pub use endpoint::{rounded_capacity, Endpoint, EndpointReceiver, EndpointSender, Wakeup};
pub use frame::{Budget, FrameError, Item, OutFrame};
pub use ring::{RingReceiver, RingSender};
pub use shmlink_interfaces::{PeerFds, RingFds};

/// Everything that can go wrong on the data plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer broke the ring's bookkeeping (count out of range or changed mid-operation).
    #[error("shared ring corrupted by the peer: {0}")]
    Corrupt(String),
    /// The peer broke the framing rules.
    #[error("protocol violation by the peer: {0}")]
    Protocol(#[from] FrameError),
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
    /// A system call failed.
    #[error("system call failed: {0}")]
    Io(#[from] std::io::Error),
    /// Memory for an incoming message could not be had: a budget refused it
    /// (the text names the limit) or the allocator failed.
    #[error("{0}")]
    NoMemory(String),
    /// shmem-ipc failed to create or map a ring.
    #[error("could not set up a shared ring: {0}")]
    Setup(String),
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
        )
    }
}
