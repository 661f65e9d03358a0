//! One side of a session: two rings, a hang-up socket, blocking and non-blocking I/O.

use crate::frame::{FillFrame, Item, OutFrame, Piece, Received, WriteFrame};
use crate::ring::{spin_until_ready, RingReceiver, RingSender, Waitable};
use crate::sys::{self, FdKind, HangupState, StreamSocket};
use crate::Error;
use shmem_ipc::sharedring::{Receiver, Sender};
use shmlink_interfaces::{limits, PeerFds, RingFds, RingPair, Wakeup, RING_HEADER};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Usable ring bytes shmem-ipc will provide for a requested capacity: the
/// memfd is rounded up to whole pages, all of it usable after the header.
///
/// Saturates instead of overflowing for absurd requests (no broker grants them).
pub fn rounded_capacity(capacity: u64) -> u64 {
    let ps = sys::page_size() as u64;
    capacity
        .saturating_add(RING_HEADER)
        .div_ceil(ps)
        .saturating_mul(ps)
        - RING_HEADER
}

/// What one side accepts from the fds its peer hands it, whatever the peer
/// offers: a client opening the fds a server made, or a provider opening the
/// fds the broker made (`Endpoint::open_server`, feature `server`). The peer
/// picks each ring's size and the session's largest message, and a hostile
/// one could otherwise make this side map a terabyte of ring or grow a
/// message buffer to 4 GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerLimits {
    /// Largest ring accepted, as a requested capacity: a ring is accepted
    /// if its usable bytes are at most [`rounded_capacity`] of this (the
    /// documented rounding a broker applies to a request).
    pub max_capacity: u64,
    /// Largest `max-message` accepted; the receive buffer never grows past it.
    pub max_message: u32,
}

impl Default for PeerLimits {
    /// The contract's defaults: `DEFAULT_MAX_CAPACITY` and `DEFAULT_MAX_MESSAGE`.
    fn default() -> Self {
        PeerLimits {
            max_capacity: limits::DEFAULT_MAX_CAPACITY,
            max_message: u32::try_from(limits::DEFAULT_MAX_MESSAGE).unwrap_or(u32::MAX),
        }
    }
}

/// A ring's memfd of `capacity` usable bytes plus the header, created and
/// sealed here rather than by shmem-ipc so that it carries every seal the
/// data plane can afford:
///
/// - `MFD_NOEXEC_SEAL` (Linux 6.3 and later; an older kernel refuses the
///   flag with `EINVAL` and the memfd is made without it): never executable,
///   and the kernel does not warn about an unspecified exec mode;
/// - `F_SEAL_SHRINK`: a peer cannot truncate the file under our mapping
///   (which would make us die of SIGBUS);
/// - `F_SEAL_GROW`: nobody can make the file, and the memory charged for
///   it, larger than what was charged;
/// - `F_SEAL_SEAL`: the set is final. `F_SEAL_WRITE` is not possible, both
///   sides write the ring.
///
/// A fresh memfd reads as zeros, so the ring's count starts at 0 exactly
/// as shmem-ipc's own constructor would leave it.
fn ring_memfd(capacity: u64) -> Result<File, Error> {
    Ok(File::from(sys::sealed_memfd(
        "shmlink-ring",
        capacity + RING_HEADER,
    )?))
}

fn clone_fd(f: &File) -> Result<OwnedFd, Error> {
    Ok(f.as_fd().try_clone_to_owned()?)
}

fn setup(e: shmem_ipc::Error) -> Error {
    Error::Setup(e.to_string())
}

/// Checks that a ring's fds are what a ring needs before anything is mapped:
/// a capacity within `max_capacity` (after rounding) that fills whole pages
/// as shmem-ipc maps them, a memfd with the shrink seal at least that large,
/// and two eventfds. A peer that lies here would otherwise make us map more
/// than we agreed to, or die of SIGBUS.
fn validate_ring(name: &'static str, fds: &RingFds, max_capacity: u64) -> Result<(), Error> {
    let limit = rounded_capacity(max_capacity);
    if fds.capacity > limit {
        return Err(Error::OverLimit {
            what: name,
            offered: fds.capacity,
            limit,
        });
    }
    if fds.capacity == 0 || rounded_capacity(fds.capacity) != fds.capacity {
        return Err(Error::BadFd(format!(
            "{name}: capacity {} is not a whole number of pages less the {RING_HEADER}-byte header",
            fds.capacity
        )));
    }
    let needed = fds.capacity + RING_HEADER;
    match sys::fd_kind(fds.memfd.as_fd())? {
        FdKind::Memfd {
            shrink_sealed: false,
            ..
        } => {
            return Err(Error::BadFd(format!(
                "{name}: memfd lacks the F_SEAL_SHRINK seal"
            )))
        }
        FdKind::Memfd { size, .. } if size < needed => {
            return Err(Error::BadFd(format!(
                "{name}: memfd holds {size} bytes, capacity {} needs {needed}",
                fds.capacity
            )))
        }
        FdKind::Memfd { .. } => {}
        other => {
            return Err(Error::BadFd(format!(
                "{name}: memory fd is not a memfd ({other:?})"
            )))
        }
    }
    for (what, fd) in [
        ("empty signal", &fds.empty_signal),
        ("full signal", &fds.full_signal),
    ] {
        let kind = sys::fd_kind(fd.as_fd())?;
        if kind != FdKind::Eventfd {
            return Err(Error::BadFd(format!(
                "{name}: {what} is not an eventfd ({kind:?})"
            )));
        }
    }
    Ok(())
}

/// Checks that the hang-up fd is what liveness needs: a connected `AF_UNIX`
/// `SOCK_STREAM` socket. A datagram socket never reports its peer's close
/// and a listening one never reports any: a blocked call would wait for a
/// peer long gone. An unconnected one would fail the first wait with an
/// error that names nothing the server did.
fn validate_hangup(fd: BorrowedFd<'_>) -> Result<(), Error> {
    validate_stream_socket("hang-up", fd)
}

/// The checks of [`validate_hangup`] for any socket that signals liveness
/// only (the hang-up socket, a provider's link); `name` names it in errors.
fn validate_stream_socket(name: &str, fd: BorrowedFd<'_>) -> Result<(), Error> {
    match sys::fd_kind(fd)? {
        FdKind::Socket => {}
        other => {
            return Err(Error::BadFd(format!(
                "{name} fd is not a socket ({other:?})"
            )))
        }
    }
    match sys::stream_socket(fd)? {
        StreamSocket::Connected => Ok(()),
        StreamSocket::NotUnix { family } => Err(Error::BadFd(format!(
            "{name} socket is not an AF_UNIX socket (address family {family})"
        ))),
        StreamSocket::NotStream { kind } => Err(Error::BadFd(format!(
            "{name} socket is {kind}, not SOCK_STREAM"
        ))),
        StreamSocket::NotConnected { listening } => Err(Error::BadFd(format!(
            "{name} socket is not connected{}",
            if listening { " (it is listening)" } else { "" }
        ))),
    }
}

server_pub! {
    /// Checks that `socket`, passed by a client to `OpenSessionVia`, is a
    /// connected `AF_UNIX` stream socket: the end of a hang-up socket pair
    /// the server keeps, over which the rings go first.
    pub fn check_via_socket(socket: BorrowedFd<'_>) -> Result<(), Error> {
        validate_stream_socket("session", socket)
    }
}

server_pub! {
    /// Sends `rings` over `socket` as `OpenSessionVia` does: one byte
    /// carrying the six fds in wire order ([`RingPair::into_fds`]), without
    /// blocking. The capacities travel in the D-Bus reply.
    pub fn send_rings(socket: BorrowedFd<'_>, rings: &RingPair) -> Result<(), Error> {
        sys::send_fds(socket, &rings.fds()).map_err(|e| {
            Error::Setup(format!("could not send the rings over the session socket: {e}"))
        })
    }
}

/// Receives the rings `OpenSessionVia` sent over `socket` (the client's
/// end of the pair it passed), of the `capacities` its reply gave: one
/// byte carrying exactly six fds, already there when the reply arrived, so
/// this never waits. Checks the socket first; the rings are checked when
/// the session is opened with them.
pub fn receive_rings(socket: BorrowedFd<'_>, capacities: [u64; 2]) -> Result<RingPair, Error> {
    validate_hangup(socket)?;
    let fds = sys::recv_fds(socket, RingPair::FDS).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => {
            Error::BadFd("the broker replied before sending the rings over the socket".into())
        }
        _ => Error::BadFd(format!("the rings sent over the session socket: {e}")),
    })?;
    let fds: [OwnedFd; RingPair::FDS] = fds
        .try_into()
        .map_err(|_| Error::BadFd("wrong number of fds".into()))?;
    // From here on the socket is the hang-up socket, which stays silent.
    if sys::hangup_state(socket)? == HangupState::Written {
        return Err(Error::BadFd(
            "bytes arrived after the one byte that carries the fds".into(),
        ));
    }
    Ok(RingPair::from_fds(capacities, fds))
}

/// The checks both sides make on fds the other side (or the broker)
/// created, before anything is mapped: `max_message` within the limit, both
/// rings (see [`validate_ring`]) and the hang-up socket.
fn validate_peer_fds(fds: &PeerFds, max_message: u32, limits: &PeerLimits) -> Result<(), Error> {
    if max_message > limits.max_message {
        return Err(Error::OverLimit {
            what: "max-message",
            offered: max_message.into(),
            limit: limits.max_message.into(),
        });
    }
    validate_ring("client-to-server ring", &fds.to_server, limits.max_capacity)?;
    validate_ring("server-to-client ring", &fds.to_client, limits.max_capacity)?;
    validate_hangup(fds.hangup.as_fd())
}

/// What both halves of an endpoint share: the hang-up socket and the wait policy.
struct Link {
    hangup: OwnedFd,
    wakeup: Wakeup,
    max_message: u32,
}

impl Link {
    fn peer_gone(&self) -> Result<bool, Error> {
        match sys::hangup_state(self.hangup.as_fd())? {
            HangupState::Open => Ok(false),
            HangupState::Closed => Ok(true),
            HangupState::Written => Err(Error::HangupWritten),
        }
    }

    /// Blocks until `ring` can make progress, the peer leaves, or the
    /// deadline passes. In spin mode it first busy-polls for up to the spin
    /// budget with its polling word set, so the peer need not signal it.
    fn wait(&self, ring: &mut impl Waitable, deadline: Option<Instant>) -> Result<(), Error> {
        if let Wakeup::Spin(budget) = self.wakeup {
            if spin_until_ready(ring, budget) {
                // Ready, or failed: the check below says which.
                ring.ready()?;
                return Ok(());
            }
        }
        loop {
            if ring.ready()? {
                return Ok(());
            }
            let polled = sys::poll_readable(&[ring.signal(), self.hangup.as_fd()], deadline)?;
            if polled[0].readable {
                sys::eventfd_drain(ring.signal())?;
            }
            if polled[1].readable || polled[1].hangup {
                // Data the peer wrote before leaving is still ours to read.
                if ring.ready()? {
                    return Ok(());
                }
                if self.peer_gone()? {
                    return Err(Error::Closed);
                }
            }
            let woke = polled[0].readable || polled[1].readable || polled[1].hangup;
            if !woke && deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::TimedOut);
            }
        }
    }
}

/// The sending half of an endpoint; see [`Endpoint::split`].
pub struct EndpointSender {
    tx: RingSender,
    link: Arc<Link>,
    timeout: Option<Duration>,
    sent_end: bool,
    capacity: u64,
}

impl EndpointSender {
    /// Sends one message, blocking while the outgoing ring is full.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), Error> {
        if self.sent_end {
            return Err(Error::AlreadyFinished);
        }
        if msg.len() > self.link.max_message as usize {
            return Err(Error::TooLarge {
                len: msg.len(),
                max: self.link.max_message,
            });
        }
        self.send_frame(OutFrame::message(msg))
    }

    /// Sends one message of `len` bytes that `fill` writes straight into the
    /// outgoing ring, with no buffer in between, blocking while the ring is
    /// full. `fill` is called once for each [`Piece`] of the message, in order
    /// (a message can wrap around the ring's end or be larger than the ring);
    /// bytes of a piece it leaves unwritten carry whatever the ring held there.
    ///
    /// If the call fails or `fill` panics part-way through, the message
    /// cannot be completed: every later send fails with [`Error::HalfSent`].
    pub fn send_with(&mut self, len: usize, fill: impl FnMut(Piece<'_>)) -> Result<(), Error> {
        if self.sent_end {
            return Err(Error::AlreadyFinished);
        }
        if len > self.link.max_message as usize {
            return Err(Error::TooLarge {
                len,
                max: self.link.max_message,
            });
        }
        self.send_frame(FillFrame::message(len, fill))
    }

    /// Sends the end-of-stream marker: this side will send nothing more.
    pub fn finish(&mut self) -> Result<(), Error> {
        if self.sent_end {
            return Ok(());
        }
        self.send_frame(OutFrame::end())?;
        self.sent_end = true;
        Ok(())
    }

    fn send_frame(&mut self, mut frame: impl WriteFrame) -> Result<(), Error> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let sent = (|| {
            while !self.tx.write_frame(&mut frame)? {
                self.link.wait(&mut self.tx, deadline)?;
            }
            Ok(())
        })();
        if sent.is_err() && frame.is_partial() {
            // The peer would read the next frame as the rest of this one.
            self.tx.poison_half_sent();
        }
        sent
    }

    /// Sets how long a blocking call may wait (None: forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Largest message this side may send.
    pub fn max_message(&self) -> u32 {
        self.link.max_message
    }

    /// Usable bytes of the outgoing ring.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

/// The receiving half of an endpoint; see [`Endpoint::split`].
pub struct EndpointReceiver {
    rx: RingReceiver,
    link: Arc<Link>,
    timeout: Option<Duration>,
    capacity: u64,
}

impl EndpointReceiver {
    /// Receives the next message, blocking until one arrives.
    ///
    /// Returns `None` once the peer has finished sending (end of stream).
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let mut buf = Vec::new();
        Ok(self.recv_into(&mut buf)?.then_some(buf))
    }

    /// Like [`EndpointReceiver::recv`], but the message replaces the
    /// contents of `buf`, and the buffer `buf` held is kept for a later
    /// message: passing the same buffer every time makes steady receiving
    /// allocation-free. Returns false (leaving `buf` alone) at end of stream.
    pub fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<bool, Error> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        loop {
            if self.rx.ended() {
                return Ok(false);
            }
            match self.rx.read_into(buf)? {
                Some(Received::Message) => return Ok(true),
                Some(Received::End) => return Ok(false),
                None => {
                    self.link.wait(&mut self.rx, deadline)?;
                }
            }
        }
    }

    /// Receives a message if a complete one is already there, without blocking.
    pub fn try_recv(&mut self) -> Result<Option<Item>, Error> {
        if self.rx.ended() {
            return Ok(Some(Item::End));
        }
        self.rx.read_item()
    }

    /// [`EndpointReceiver::try_recv`] into a reused buffer (see
    /// [`EndpointReceiver::recv_into`]).
    pub fn try_recv_into(&mut self, buf: &mut Vec<u8>) -> Result<Option<Received>, Error> {
        if self.rx.ended() {
            return Ok(Some(Received::End));
        }
        self.rx.read_into(buf)
    }

    /// Sets how long a blocking call may wait (None: forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Usable bytes of the incoming ring.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

/// One side of a session: both halves together.
pub struct Endpoint {
    sender: EndpointSender,
    receiver: EndpointReceiver,
}

impl Endpoint {
    fn assemble(
        tx: RingSender,
        rx: RingReceiver,
        hangup: OwnedFd,
        wakeup: Wakeup,
        max_message: u32,
        caps: (u64, u64),
    ) -> Self {
        let link = Arc::new(Link {
            hangup,
            wakeup,
            max_message,
        });
        Endpoint {
            sender: EndpointSender {
                tx,
                link: link.clone(),
                timeout: None,
                sent_end: false,
                capacity: caps.0,
            },
            receiver: EndpointReceiver {
                rx,
                link,
                timeout: None,
                capacity: caps.1,
            },
        }
    }

    /// Creates a session's rings as the server: returns the server's side and
    /// the fds to hand to the client.
    ///
    /// `capacity` is rounded up as shmem-ipc rounds it; the rounded value is in the returned fds.
    pub fn create_server(
        capacity: u64,
        max_message: u32,
        wakeup: Wakeup,
    ) -> Result<(Endpoint, PeerFds), Error> {
        Ok(ServerRings::create(capacity)?.into_endpoint(max_message, wakeup))
    }

    server_pub! {
        /// Charges the memory this side takes for incoming message bodies to
        /// `budget` (see [`Budget`](crate::Budget)); without one it is bounded by
        /// the maximum message size only.
        pub fn set_budget(&mut self, budget: Arc<dyn crate::Budget>) {
            self.receiver.rx.set_budget(budget);
        }
    }

    /// Opens the client's side from the fds the server handed over, after
    /// checking every one of them, within the default [`PeerLimits`].
    pub fn open_client(fds: PeerFds, max_message: u32, wakeup: Wakeup) -> Result<Endpoint, Error> {
        Self::open_client_within(fds, max_message, wakeup, PeerLimits::default())
    }

    /// Opens the client's side from the fds the server handed over, after
    /// checking every one of them: each ring within `limits.max_capacity`
    /// (after rounding) and backed by a sealed memfd large enough, four
    /// eventfds, a connected `AF_UNIX` stream socket as hang-up, and
    /// `max_message` within `limits.max_message`. Nothing is mapped unless
    /// all of it holds.
    pub fn open_client_within(
        fds: PeerFds,
        max_message: u32,
        wakeup: Wakeup,
        limits: PeerLimits,
    ) -> Result<Endpoint, Error> {
        validate_peer_fds(&fds, max_message, &limits)?;
        let open_tx = |r: RingFds| {
            Sender::<u8>::open(
                r.capacity as usize,
                r.memfd.into(),
                r.empty_signal.into(),
                r.full_signal.into(),
            )
            .map_err(setup)
        };
        let open_rx = |r: RingFds| {
            Receiver::<u8>::open(
                r.capacity as usize,
                r.memfd.into(),
                r.empty_signal.into(),
                r.full_signal.into(),
            )
            .map_err(setup)
        };
        let caps = (fds.to_server.capacity, fds.to_client.capacity);
        Ok(Endpoint::assemble(
            RingSender::new(open_tx(fds.to_server)?),
            RingReceiver::new(open_rx(fds.to_client)?, max_message),
            fds.hangup,
            wakeup,
            max_message,
            caps,
        ))
    }

    server_pub! {
        /// Opens the server's side of a session whose fds another process (the
        /// broker) created, as a provider does: the same checks as
        /// [`Endpoint::open_client_within`] (rings within `limits`, sealed
        /// memfds large enough, four eventfds, a connected `AF_UNIX` stream
        /// hang-up socket, `max_message` within `limits.max_message`), plus the
        /// same socket checks for `link`, with the roles swapped: this side reads
        /// the client-to-server ring and writes the server-to-client one. Nothing
        /// is mapped unless all of it holds. `link` is only checked here; the
        /// caller keeps and watches it.
        pub fn open_server(
            fds: PeerFds,
            link: BorrowedFd<'_>,
            max_message: u32,
            wakeup: Wakeup,
            limits: PeerLimits,
        ) -> Result<Endpoint, Error> {
            validate_peer_fds(&fds, max_message, &limits)?;
            validate_stream_socket("link", link)?;
            let caps = (fds.to_client.capacity, fds.to_server.capacity);
            let (tx, rx) = (fds.to_client, fds.to_server);
            let tx = Sender::<u8>::open(
                tx.capacity as usize,
                tx.memfd.into(),
                tx.empty_signal.into(),
                tx.full_signal.into(),
            )
            .map_err(setup)?;
            let rx = Receiver::<u8>::open(
                rx.capacity as usize,
                rx.memfd.into(),
                rx.empty_signal.into(),
                rx.full_signal.into(),
            )
            .map_err(setup)?;
            Ok(Endpoint::assemble(
                RingSender::new(tx),
                RingReceiver::new(rx, max_message),
                fds.hangup,
                wakeup,
                max_message,
                caps,
            ))
        }
    }

    /// Splits into halves that can be used from two threads at once.
    pub fn split(self) -> (EndpointSender, EndpointReceiver) {
        (self.sender, self.receiver)
    }

    /// Largest message either side may send.
    pub fn max_message(&self) -> u32 {
        self.sender.link.max_message
    }

    /// Usable bytes of the outgoing ring.
    pub fn send_capacity(&self) -> u64 {
        self.sender.capacity
    }

    /// Usable bytes of the incoming ring.
    pub fn recv_capacity(&self) -> u64 {
        self.receiver.capacity
    }

    /// Sets how long a blocking call may wait before failing with [`Error::TimedOut`] (None: forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.sender.timeout = timeout;
        self.receiver.timeout = timeout;
    }

    /// How this side waits.
    pub fn wakeup(&self) -> Wakeup {
        self.sender.link.wakeup
    }

    /// The outgoing ring, for event loops.
    pub fn ring_sender(&mut self) -> &mut RingSender {
        &mut self.sender.tx
    }

    /// The incoming ring, for event loops.
    pub fn ring_receiver(&mut self) -> &mut RingReceiver {
        &mut self.receiver.rx
    }

    /// The fd that becomes readable when incoming data arrives.
    pub fn readable_fd(&self) -> BorrowedFd<'_> {
        self.receiver.rx.data_signal()
    }

    /// The fd that becomes readable when the outgoing ring gets room.
    pub fn writable_fd(&self) -> BorrowedFd<'_> {
        self.sender.tx.space_signal()
    }

    /// The hang-up socket, readable when the peer closed its end.
    pub fn hangup_fd(&self) -> BorrowedFd<'_> {
        self.sender.link.hangup.as_fd()
    }

    /// Checks the hang-up socket without blocking: Ok(true) if the peer left.
    pub fn peer_gone(&self) -> Result<bool, Error> {
        self.sender.link.peer_gone()
    }

    /// Sends one message, blocking while the outgoing ring is full.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), Error> {
        self.sender.send(msg)
    }

    /// Sends the end-of-stream marker: this side will send nothing more.
    pub fn finish(&mut self) -> Result<(), Error> {
        self.sender.finish()
    }

    /// Receives the next message, blocking until one arrives; `None` at end of stream.
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>, Error> {
        self.receiver.recv()
    }

    /// Receives a message if a complete one is already there, without blocking.
    pub fn try_recv(&mut self) -> Result<Option<Item>, Error> {
        self.receiver.try_recv()
    }

    /// See [`EndpointSender::send_with`].
    pub fn send_with(&mut self, len: usize, fill: impl FnMut(Piece<'_>)) -> Result<(), Error> {
        self.sender.send_with(len, fill)
    }

    /// See [`EndpointReceiver::recv_into`].
    pub fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<bool, Error> {
        self.receiver.recv_into(buf)
    }

    /// See [`EndpointReceiver::try_recv_into`].
    pub fn try_recv_into(&mut self, buf: &mut Vec<u8>) -> Result<Option<Received>, Error> {
        self.receiver.try_recv_into(buf)
    }
}

#[cfg(any(test, feature = "server"))]
/// The fds of a session whose server is another process (a provider): one
/// set for the client, one for the provider, the link pair between the
/// provider and the broker, and the broker's ends of the two hang-up pairs
/// (client ↔ broker, broker ↔ provider): the broker stands in the middle of
/// the hang-up, so that it sees the client leave whatever the provider does.
/// See [`create_unmapped`].
#[derive(Debug)]
pub struct ProvidedFds {
    /// The client's side, as `OpenSession` returns it; the other end of its
    /// hang-up socket is [`ProvidedFds::broker_client_hangup`].
    pub client: PeerFds,
    /// The provider's side: the same rings and eventfds, and its end of a
    /// hang-up socket whose other end is
    /// [`ProvidedFds::broker_provider_hangup`].
    pub provider: PeerFds,
    /// The provider's end of the link socket pair.
    pub provider_link: OwnedFd,
    /// The broker's end of the link socket pair: it closing tells the
    /// provider that the session ended at the broker, and the provider
    /// closing its end tells the broker.
    pub broker_link: OwnedFd,
    /// The broker's end of the client's hang-up socket: it reads end-of-file
    /// when the client goes away, and it closing tells the client that the
    /// session ended.
    pub broker_client_hangup: OwnedFd,
    /// The broker's end of the provider's hang-up socket: it closing tells
    /// the provider that the client is gone (or the session ended at the
    /// broker), and it reads end-of-file when the provider ends the session.
    pub broker_provider_hangup: OwnedFd,
}

/// A session's rings made by the server ahead of the session: both rings
/// mapped, their eventfds, the hang-up socket pair and the fds for the
/// client, with no message size or wake-up policy yet.
///
/// Making them is most of the server's work for a new session (two memfds,
/// four eventfds, a socket pair, two mappings), so a server can make the next
/// session's rings while it is idle and answer the open without it. They are
/// fresh for each session: a ring is never used for a second one, so no
/// byte of one client's session can reach another client.
pub struct ServerRings {
    rx: Receiver<u8>,
    tx: Sender<u8>,
    hangup: OwnedFd,
    peer: PeerFds,
}

impl ServerRings {
    /// Makes a session's rings of `capacity` bytes each, rounded up as
    /// shmem-ipc rounds it (see [`rounded_capacity`]).
    pub fn create(capacity: u64) -> Result<ServerRings, Error> {
        let capacity = rounded_capacity(capacity);
        let cap =
            usize::try_from(capacity).map_err(|_| Error::Setup("capacity too large".into()))?;
        let [rx_mem, tx_mem] = [ring_memfd(capacity)?, ring_memfd(capacity)?];
        let signal = || -> Result<File, Error> { Ok(File::from(sys::new_eventfd()?)) };
        let rx = Receiver::<u8>::open(cap, rx_mem, signal()?, signal()?).map_err(setup)?;
        let tx = Sender::<u8>::open(cap, tx_mem, signal()?, signal()?).map_err(setup)?;
        let (hangup, theirs) = sys::socketpair()?;
        let peer = PeerFds {
            to_server: RingFds {
                capacity,
                memfd: clone_fd(rx.memfd().as_file())?,
                empty_signal: clone_fd(rx.empty_signal())?,
                full_signal: clone_fd(rx.full_signal())?,
            },
            to_client: RingFds {
                capacity,
                memfd: clone_fd(tx.memfd().as_file())?,
                empty_signal: clone_fd(tx.empty_signal())?,
                full_signal: clone_fd(tx.full_signal())?,
            },
            hangup: theirs,
        };
        Ok(ServerRings {
            rx,
            tx,
            hangup,
            peer,
        })
    }

    /// Usable bytes of each ring (after rounding).
    pub fn capacity(&self) -> u64 {
        self.peer.to_server.capacity
    }

    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    /// The fds the client will be handed.
    pub fn client_fds(&self) -> &PeerFds {
        &self.peer
    }

    /// The server's side of the session as [`ServerRings::into_endpoint`]
    /// makes it, for a client that passed `socket` (`OpenSessionVia`), which
    /// the caller checked with [`check_via_socket`] before admitting the
    /// session: the rings go over it, and it becomes the server's end of the
    /// hang-up socket (the pair made ahead is dropped).
    #[cfg(feature = "server")]
    pub fn into_endpoint_over(
        self,
        socket: OwnedFd,
        max_message: u32,
        wakeup: Wakeup,
    ) -> Result<Endpoint, Error> {
        let (rings, _theirs) = self.peer.split();
        send_rings(socket.as_fd(), &rings)?;
        let capacity = rings.to_server.capacity;
        Ok(Endpoint::assemble(
            RingSender::new(self.tx),
            RingReceiver::new(self.rx, max_message),
            socket,
            wakeup,
            max_message,
            (capacity, capacity),
        ))
    }

    /// The server's side of the session, with its message size bound and
    /// wake-up policy, and the fds to hand to the client.
    pub fn into_endpoint(self, max_message: u32, wakeup: Wakeup) -> (Endpoint, PeerFds) {
        let capacity = self.capacity();
        let ep = Endpoint::assemble(
            RingSender::new(self.tx),
            RingReceiver::new(self.rx, max_message),
            self.hangup,
            wakeup,
            max_message,
            (capacity, capacity),
        );
        (ep, self.peer)
    }
}

#[cfg(any(test, feature = "server"))]
/// Creates a session's fds without mapping anything: two sealed ring memfds
/// of `capacity` (rounded as [`rounded_capacity`] does; the result is in the
/// fds) with their four non-blocking eventfds, two hang-up socket pairs (one
/// between the client and the broker, one between the broker and the
/// provider) and the link socket pair (one end for the provider, one for the
/// broker).
///
/// A broker hands these to a client and a provider and stays out of the
/// data path: it never maps the rings, and keeps only its ends of the
/// sockets. A fresh memfd reads as zeros, which is an empty ring, so the
/// first side to map it finds it as shmem-ipc would have created it.
pub fn create_unmapped(capacity: u64) -> Result<ProvidedFds, Error> {
    let capacity = rounded_capacity(capacity);
    usize::try_from(capacity).map_err(|_| Error::Setup("capacity too large".into()))?;
    let signal = || -> Result<OwnedFd, Error> { Ok(sys::new_eventfd()?) };
    let ring = || -> Result<(RingFds, RingFds), Error> {
        let memfd = OwnedFd::from(ring_memfd(capacity)?);
        let (empty_signal, full_signal) = (signal()?, signal()?);
        let copy = RingFds {
            capacity,
            memfd: memfd.try_clone()?,
            empty_signal: empty_signal.try_clone()?,
            full_signal: full_signal.try_clone()?,
        };
        let ring = RingFds {
            capacity,
            memfd,
            empty_signal,
            full_signal,
        };
        Ok((ring, copy))
    };
    let (client_to_server, provider_to_server) = ring()?;
    let (client_to_client, provider_to_client) = ring()?;
    let (client_hangup, broker_client_hangup) = sys::socketpair()?;
    let (provider_hangup, broker_provider_hangup) = sys::socketpair()?;
    let (provider_link, broker_link) = sys::socketpair()?;
    Ok(ProvidedFds {
        client: PeerFds {
            to_server: client_to_server,
            to_client: client_to_client,
            hangup: client_hangup,
        },
        provider: PeerFds {
            to_server: provider_to_server,
            to_client: provider_to_client,
            hangup: provider_hangup,
        },
        provider_link,
        broker_link,
        broker_client_hangup,
        broker_provider_hangup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{fcntl_add_seals, ftruncate, SealFlags};
    use rustix::net::{AddressFamily, SocketType};

    fn pair(capacity: u64) -> (Endpoint, Endpoint) {
        let (server, fds) = Endpoint::create_server(capacity, 1 << 20, Wakeup::Park).unwrap();
        let client = Endpoint::open_client(fds, 1 << 20, Wakeup::Park).unwrap();
        (server, client)
    }

    /// Whether `fd` (an eventfd) was written since it was last drained; drains it.
    fn signalled(fd: BorrowedFd<'_>) -> bool {
        let now = sys::poll_readable(&[fd], Some(Instant::now())).expect("poll")[0].readable;
        sys::eventfd_drain(fd).expect("drain");
        now
    }

    #[test]
    fn rings_sent_over_a_socket_arrive_whole_and_anything_else_is_refused() {
        let half = create_unmapped(4096).expect("fds").client;
        let (rings, _hangup) = half.split();
        let (ours, theirs) = sys::socketpair().expect("pair");
        assert!(
            matches!(receive_rings(ours.as_fd(), [4096, 4096]), Err(Error::BadFd(m)) if m.contains("before sending")),
            "nothing sent yet"
        );
        send_rings(theirs.as_fd(), &rings).expect("send");
        let got = receive_rings(ours.as_fd(), [4096, 4096]).expect("receive");
        let same = |a: &OwnedFd, b: &OwnedFd| {
            let ino = |f: &OwnedFd| rustix::fs::fstat(f).expect("fstat").st_ino;
            ino(a) == ino(b)
        };
        assert!(same(&got.to_server.memfd, &rings.to_server.memfd));
        assert!(same(
            &got.to_client.full_signal,
            &rings.to_client.full_signal
        ));
        assert_eq!(got.to_client.capacity, 4096);

        // Fewer fds, extra bytes, or more fds than six are refused.
        let fds = [
            rings.to_server.memfd.as_fd(),
            rings.to_server.empty_signal.as_fd(),
        ];
        sys::send_fds(theirs.as_fd(), &fds).expect("send two");
        let e = receive_rings(ours.as_fd(), [4096, 4096]).unwrap_err();
        assert!(e.to_string().contains("2 fds arrived, not 6"), "{e}");
        let seven: Vec<BorrowedFd<'_>> = std::iter::repeat(rings.to_server.memfd.as_fd())
            .take(7)
            .collect();
        sys::send_fds(theirs.as_fd(), &seven).expect("send seven");
        let e = receive_rings(ours.as_fd(), [4096, 4096])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("more than 6 fds") || e.contains("7 fds arrived, not 6"),
            "{e}"
        );
        let six: Vec<BorrowedFd<'_>> = std::iter::repeat(rings.to_server.memfd.as_fd())
            .take(6)
            .collect();
        sys::send_fds(theirs.as_fd(), &six).expect("send six");
        rustix::io::write(&theirs, b"xy").expect("write");
        // The six fds arrive with their byte, but the stray bytes after
        // them are on what is the hang-up socket from then on.
        let e = receive_rings(ours.as_fd(), [4096, 4096]).unwrap_err();
        assert!(e.to_string().contains("bytes arrived after"), "{e}");
        // A socket that is not a connected stream socket is refused before any read.
        let (a, b) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .expect("dgram pair");
        drop(b);
        assert!(check_via_socket(a.as_fd()).is_err());
        assert!(receive_rings(a.as_fd(), [4096, 4096]).is_err());
    }

    #[test]
    fn a_writer_skips_the_data_signal_only_while_the_reader_polls() {
        let (mut server, mut client) = pair(4096);
        // The reader's word means nothing before its first read has shown it
        // the header: the first message is signalled although it asked.
        server.ring_receiver().set_polling(true);
        client.send(b"one").unwrap();
        assert!(signalled(server.ring_receiver().data_signal()));
        assert_eq!(server.recv().unwrap().as_deref(), Some(&b"one"[..]));

        server.ring_receiver().set_polling(true);
        client.send(b"two").unwrap();
        assert!(
            !signalled(server.ring_receiver().data_signal()),
            "a polling reader is not signalled"
        );
        assert_eq!(server.recv().unwrap().as_deref(), Some(&b"two"[..]));

        server.ring_receiver().set_polling(false);
        client.send(b"three").unwrap();
        assert!(
            signalled(server.ring_receiver().data_signal()),
            "a reader that stopped polling is signalled again"
        );
        assert_eq!(server.recv().unwrap().as_deref(), Some(&b"three"[..]));
    }

    #[test]
    fn a_spin_that_keeps_its_word_spares_the_next_signal_until_cleared() {
        let (mut server, mut client) = pair(4096);
        client.send(b"one").unwrap();
        assert!(signalled(server.ring_receiver().data_signal()));
        assert_eq!(server.recv().unwrap().as_deref(), Some(&b"one"[..]));

        client.send(b"two").unwrap();
        let _ = signalled(server.ring_receiver().data_signal());
        assert!(crate::ring::spin_keeping_word(
            server.ring_receiver(),
            Duration::from_secs(5)
        ));
        assert_eq!(server.recv().unwrap().as_deref(), Some(&b"two"[..]));
        client.send(b"three").unwrap();
        assert!(
            !signalled(server.ring_receiver().data_signal()),
            "the word stays set after a spin that found data"
        );
        assert_eq!(server.recv().unwrap().as_deref(), Some(&b"three"[..]));

        assert!(!crate::ring::spin_keeping_word(
            server.ring_receiver(),
            Duration::from_millis(1)
        ));
        client.send(b"four").unwrap();
        assert!(
            signalled(server.ring_receiver().data_signal()),
            "a spin that ran out of budget cleared the word"
        );
        assert_eq!(server.recv().unwrap().as_deref(), Some(&b"four"[..]));

        client.send(b"five").unwrap();
        let _ = signalled(server.ring_receiver().data_signal());
        assert!(spin_until_ready(
            server.ring_receiver(),
            Duration::from_secs(5)
        ));
        assert_eq!(server.recv().unwrap().as_deref(), Some(&b"five"[..]));
        client.send(b"six").unwrap();
        assert!(
            signalled(server.ring_receiver().data_signal()),
            "spin_until_ready clears the word whatever it found"
        );
    }

    #[test]
    fn a_reader_skips_the_room_signal_only_while_the_writer_polls() {
        let (mut server, mut client) = pair(4096);
        let fill = |client: &mut Endpoint| {
            let mut frame = OutFrame::message(&[5u8; 8192]);
            assert!(
                !client.ring_sender().write_frame(&mut frame).unwrap(),
                "the ring fills"
            );
            frame
        };
        let mut frame = fill(&mut client);
        client.ring_sender().set_polling(true);
        assert!(server.ring_receiver().read_item().unwrap().is_none());
        assert!(
            !signalled(client.ring_sender().space_signal()),
            "a polling writer is not signalled"
        );
        // It finds the room by polling, and the rest of the message goes in.
        assert!(client.ring_sender().has_room().unwrap());
        while !client.ring_sender().write_frame(&mut frame).unwrap() {
            let _ = server.ring_receiver().read_item().unwrap();
        }
        assert_eq!(server.recv().unwrap().map(|m| m.len()), Some(8192));

        client.ring_sender().set_polling(false);
        let _ = signalled(client.ring_sender().space_signal());
        let _partial = fill(&mut client);
        assert!(server.ring_receiver().read_item().unwrap().is_none());
        assert!(
            signalled(client.ring_sender().space_signal()),
            "a writer that stopped polling is signalled again"
        );
    }

    #[test]
    fn messages_wrap_and_exceed_the_ring() {
        let (mut server, mut client) = pair(4096);
        let cap = client.send_capacity() as usize;
        let sizes = [0, 1, 63, 64, 4095, cap - 1, cap, cap + 1, 10 * cap];
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(m) = server.recv().unwrap() {
                got.push(m);
            }
            got
        });
        let mut sent = Vec::new();
        for round in 0..20u8 {
            for &s in &sizes {
                let m: Vec<u8> = (0..s)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(round))
                    .collect();
                client.send(&m).unwrap();
                sent.push(m);
            }
        }
        client.finish().unwrap();
        assert_eq!(reader.join().unwrap(), sent);
    }

    /// A bounded write or read stops at its bound and says so, apart from
    /// a full or empty ring, and the frame still arrives whole.
    #[test]
    fn bounded_ring_operations_stop_at_their_bound() {
        use crate::ring::{ReadProgress, WriteProgress};
        let (mut server, mut client) = pair(64 << 10);
        let msg: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut frame = OutFrame::message(&msg[..]);
        // 4 KiB at a time while the ring has room: Bounded, never Blocked.
        let mut calls = 0;
        let full = loop {
            calls += 1;
            match client
                .ring_sender()
                .write_frame_bounded(&mut frame, 4096)
                .unwrap()
            {
                WriteProgress::Bounded => continue,
                WriteProgress::Blocked => break true,
                WriteProgress::Done => break false,
            }
        };
        assert!(full, "a 100,000-byte frame cannot fit a 64 KiB ring");
        assert!(
            calls >= 16,
            "each call copied at most 4 KiB ({calls} calls)"
        );
        // The reader takes 1,000 bytes per call: Bounded until the ring is empty.
        let mut got = None;
        let mut buf = Vec::new();
        let mut reads = 0;
        while got.is_none() {
            reads += 1;
            match server.ring_receiver().read_bounded(1000, &mut buf).unwrap() {
                ReadProgress::Bounded => {}
                ReadProgress::Received(Received::Message) => got = Some(buf.clone()),
                ReadProgress::Received(Received::End) => panic!("no end was sent"),
                ReadProgress::Empty => {
                    // The ring is drained: the writer finishes the frame.
                    while client
                        .ring_sender()
                        .write_frame_bounded(&mut frame, 4096)
                        .unwrap()
                        == WriteProgress::Bounded
                    {}
                }
            }
        }
        assert!(
            reads > 100,
            "each read took at most 1,000 bytes ({reads} reads)"
        );
        assert_eq!(got.unwrap(), msg);
        assert!(matches!(
            server.ring_receiver().read_bounded(1000, &mut buf).unwrap(),
            ReadProgress::Empty
        ));
    }

    /// Messages written in place arrive exactly as filled, whatever their
    /// size against the ring: each piece is offered once, in order, and the
    /// pieces cover the message.
    #[test]
    fn messages_written_in_place_wrap_and_exceed_the_ring() {
        let (mut server, mut client) = pair(4096);
        let cap = client.send_capacity() as usize;
        let sizes = [0, 1, 4095, cap - 8, cap, cap + 1, 3 * cap + 17];
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = Vec::new();
            while server.recv_into(&mut buf).unwrap() {
                got.push(buf.clone());
            }
            got
        });
        let byte = |round: usize, i: usize| (i as u8).wrapping_mul(7).wrapping_add(round as u8);
        let mut sent = Vec::new();
        let mut pieces = 0;
        for round in 0..10 {
            for &len in &sizes {
                let mut next = 0;
                client
                    .send_with(len, |mut piece| {
                        assert_eq!(piece.offset(), next, "pieces come in order");
                        next += piece.len();
                        pieces += 1;
                        let bytes: Vec<u8> =
                            (piece.offset()..next).map(|i| byte(round, i)).collect();
                        piece.write_at(0, &bytes);
                    })
                    .unwrap();
                assert_eq!(next, len, "the pieces cover the message");
                sent.push((0..len).map(|i| byte(round, i)).collect::<Vec<u8>>());
            }
        }
        client.finish().unwrap();
        assert_eq!(reader.join().unwrap(), sent);
        assert!(
            pieces > sent.len(),
            "messages larger than the ring came in several pieces"
        );
    }

    /// A fill that panics leaves its message half written: the panic
    /// reaches the caller, and nothing more can be sent, since the peer
    /// would read the next frame as the rest of this one.
    #[test]
    fn a_panicking_fill_stops_the_sender() {
        let (mut server, mut client) = pair(4096);
        client.send(b"before").unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            client.send_with(100, |piece| {
                if piece.offset() == 0 {
                    panic!("fill failed");
                }
            })
        }));
        assert!(panicked.is_err(), "the fill's panic goes on to the caller");
        assert!(matches!(client.send(b"after"), Err(Error::HalfSent)));
        assert!(matches!(client.send_with(1, |_| {}), Err(Error::HalfSent)));
        assert_eq!(server.recv().unwrap().as_deref(), Some(&b"before"[..]));
    }

    /// A send that times out in the middle of a message stops the sender
    /// too, rather than let the next message land inside the torn one.
    #[test]
    fn a_send_that_times_out_mid_message_stops_the_sender() {
        let (_server, mut client) = pair(4096);
        client.set_timeout(Some(Duration::from_millis(20)));
        let big = vec![1u8; 3 * client.send_capacity() as usize];
        assert!(matches!(client.send(&big), Err(Error::TimedOut)));
        assert!(matches!(client.send(b"x"), Err(Error::HalfSent)));
        // A send that times out before writing anything leaves no torn frame.
        let (mut server, mut client) = pair(4096);
        client.set_timeout(Some(Duration::from_millis(20)));
        let fill = vec![2u8; client.send_capacity() as usize - 8];
        client.send(&fill).unwrap();
        assert!(matches!(client.send(b"y"), Err(Error::TimedOut)));
        assert_eq!(server.recv().unwrap().map(|m| m.len()), Some(fill.len()));
        client.send(b"z").unwrap();
        assert_eq!(server.recv().unwrap().as_deref(), Some(&b"z"[..]));
    }

    /// Receiving into the same buffer again and again allocates nothing
    /// once the two buffers (the caller's and the one the receiver keeps)
    /// have grown to size: the message buffers swap places.
    #[test]
    fn receiving_into_a_reused_buffer_settles_on_two_buffers() {
        let (mut server, mut client) = pair(64 << 10);
        let mut buf = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for i in 0..50u8 {
            let msg = vec![i; 10_000];
            client.send(&msg).unwrap();
            assert!(server.recv_into(&mut buf).unwrap());
            assert_eq!(buf, msg);
            seen.insert(buf.as_ptr() as usize);
        }
        assert!(seen.len() <= 3, "{} distinct buffers", seen.len());
        client.finish().unwrap();
        assert!(!server.recv_into(&mut buf).unwrap(), "end of stream");
        assert_eq!(buf, vec![49u8; 10_000], "the end leaves the buffer alone");
    }

    #[test]
    fn dead_peer_wakes_a_blocked_reader() {
        let (server, mut client) = pair(4096);
        let t = std::thread::spawn(move || client.recv());
        drop(server);
        assert!(matches!(t.join().unwrap(), Err(Error::Closed)));
    }

    /// The server's side (kept so that the hang-up socket stays connected)
    /// and the fds it offers.
    fn offer(capacity: u64) -> (Endpoint, PeerFds) {
        Endpoint::create_server(capacity, 1 << 20, Wakeup::Park).unwrap()
    }

    fn refusal(fds: PeerFds, limits: PeerLimits) -> Error {
        Endpoint::open_client_within(fds, 1 << 20, Wakeup::Park, limits)
            .err()
            .expect("the offer must be refused")
    }

    #[test]
    fn ring_memfds_are_sealed_and_cannot_grow_or_shrink() {
        use rustix::fs::{fcntl_get_seals, fstat};
        let (_server, fds) = Endpoint::create_server(4096, 1 << 20, Wakeup::Park).unwrap();
        for ring in [&fds.to_server, &fds.to_client] {
            let memfd = ring.memfd.as_fd();
            let seals = fcntl_get_seals(memfd).expect("seals");
            assert!(
                seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL),
                "{seals:?}"
            );
            let size = fstat(memfd).expect("fstat").st_size as u64;
            assert_eq!(size, ring.capacity + RING_HEADER);
            assert!(ftruncate(memfd, size + 4096).is_err(), "grow refused");
            assert!(ftruncate(memfd, 0).is_err(), "shrink refused");
            assert!(
                fcntl_add_seals(memfd, SealFlags::WRITE).is_err(),
                "the seals are final"
            );
            // Where the kernel knows MFD_NOEXEC_SEAL, the exec bits are gone for good.
            if seals.contains(SealFlags::EXEC) {
                let mode = fstat(memfd).expect("fstat").st_mode;
                assert_eq!(mode & 0o111, 0, "mode {mode:o}");
            }
        }
    }

    #[test]
    fn a_ring_above_the_limit_is_refused_before_its_memfd_is_looked_at() {
        let (_server, mut fds) = offer(4096);
        fds.to_client.capacity = (1 << 40) - RING_HEADER;
        let limits = PeerLimits::default();
        let err = refusal(fds, limits);
        let limit = rounded_capacity(limits.max_capacity);
        assert!(
            matches!(
                err,
                Error::OverLimit { what: "server-to-client ring", offered, limit: l }
                    if offered == (1 << 40) - RING_HEADER && l == limit
            ),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains(&limit.to_string()), "{text}");
    }

    #[test]
    fn a_memfd_large_enough_does_not_lift_the_limit() {
        // An honest 128 MiB ring: its memfd holds every byte the capacity
        // needs, yet the client agreed to 64 MiB at most.
        let big = 128 << 20;
        let (_server, fds) = offer(big);
        let err = refusal(fds, PeerLimits::default());
        assert!(
            matches!(err, Error::OverLimit { what: "client-to-server ring", offered, .. } if offered == rounded_capacity(big)),
            "{err}"
        );
        // Raising the limit accepts the same offer.
        let limits = PeerLimits {
            max_capacity: big,
            ..PeerLimits::default()
        };
        let (_server, fds) = offer(big);
        let client = Endpoint::open_client_within(fds, 1 << 20, Wakeup::Park, limits)
            .expect("within a raised limit");
        assert_eq!(client.recv_capacity(), rounded_capacity(big));
    }

    #[test]
    fn the_limit_is_compared_after_rounding() {
        // Asking for 5000 bytes gets a whole page pair: that is not "larger
        // than asked for", one byte more is.
        let limits = PeerLimits {
            max_capacity: 5000,
            ..PeerLimits::default()
        };
        let rounded = rounded_capacity(5000);
        assert!(rounded > 5000);
        let (_server, fds) = offer(5000);
        Endpoint::open_client_within(fds, 1 << 20, Wakeup::Park, limits)
            .expect("the rounded capacity is accepted");
        let (_server, mut fds) = offer(5000);
        fds.to_server.capacity = rounded + 1;
        assert!(matches!(
            refusal(fds, limits),
            Error::OverLimit { offered, limit, .. } if offered == rounded + 1 && limit == rounded
        ));
    }

    #[test]
    fn a_capacity_the_memfd_cannot_hold_is_refused_before_mapping() {
        let (_server, mut fds) = offer(4096);
        fds.to_client.capacity = rounded_capacity(1 << 20);
        let err = refusal(fds, PeerLimits::default());
        assert!(
            matches!(err, Error::BadFd(ref m) if m.contains("needs")),
            "{err}"
        );
    }

    #[test]
    fn a_capacity_that_is_not_whole_pages_is_refused() {
        let (_server, mut fds) = offer(4096);
        fds.to_server.capacity = 100;
        let err = refusal(fds, PeerLimits::default());
        assert!(
            matches!(err, Error::BadFd(ref m) if m.contains("whole number of pages")),
            "{err}"
        );
    }

    #[test]
    fn a_max_message_above_the_limit_is_refused() {
        let (_server, fds) = offer(4096);
        let err = Endpoint::open_client(fds, u32::MAX, Wakeup::Park)
            .err()
            .expect("refused");
        assert!(
            matches!(
                err,
                Error::OverLimit { what: "max-message", offered, limit }
                    if offered == u64::from(u32::MAX) && limit == limits::DEFAULT_MAX_MESSAGE
            ),
            "{err}"
        );
        let limits = PeerLimits {
            max_message: u32::MAX,
            ..PeerLimits::default()
        };
        let (_server, fds) = offer(4096);
        Endpoint::open_client_within(fds, u32::MAX, Wakeup::Park, limits)
            .expect("a raised limit accepts it");
    }

    fn with_hangup(hangup: OwnedFd) -> Error {
        let (_server, mut fds) = offer(4096);
        fds.hangup = hangup;
        refusal(fds, PeerLimits::default())
    }

    #[test]
    fn a_datagram_hangup_socket_is_refused() {
        let (a, _b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let err = with_hangup(a);
        assert!(
            matches!(err, Error::BadFd(ref m) if m.contains("SOCK_DGRAM") && m.contains("not SOCK_STREAM")),
            "{err}"
        );
        let (a, _b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let err = with_hangup(a);
        assert!(
            matches!(err, Error::BadFd(ref m) if m.contains("SOCK_SEQPACKET")),
            "{err}"
        );
    }

    #[test]
    fn an_unconnected_hangup_socket_is_refused() {
        let s = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        let err = with_hangup(s);
        assert!(
            matches!(err, Error::BadFd(ref m) if m.ends_with("not connected")),
            "{err}"
        );
    }

    #[test]
    fn a_listening_hangup_socket_is_refused() {
        let s = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        let name = format!("shmlink-endpoint-test-{}", std::process::id());
        let addr = rustix::net::SocketAddrUnix::new_abstract_name(name.as_bytes()).unwrap();
        rustix::net::bind(&s, &addr).unwrap();
        rustix::net::listen(&s, 1).unwrap();
        let err = with_hangup(s);
        assert!(
            matches!(err, Error::BadFd(ref m) if m.contains("not connected (it is listening)")),
            "{err}"
        );
    }

    #[test]
    fn a_hangup_socket_of_another_family_is_refused() {
        let s = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
        let err = with_hangup(s);
        assert!(
            matches!(err, Error::BadFd(ref m) if m.contains("not an AF_UNIX socket")),
            "{err}"
        );
    }

    #[test]
    fn an_honest_offer_is_accepted_within_the_default_limits() {
        let (_server, fds) = offer(limits::DEFAULT_MAX_CAPACITY);
        let client = Endpoint::open_client(fds, 1 << 20, Wakeup::Park).expect("honest offer");
        assert_eq!(
            client.send_capacity(),
            rounded_capacity(limits::DEFAULT_MAX_CAPACITY)
        );
    }

    #[test]
    fn non_eventfd_signal_is_refused() {
        let (_server, mut fds) = Endpoint::create_server(4096, 1 << 20, Wakeup::Park).unwrap();
        fds.to_server.full_signal = fds.hangup.try_clone().unwrap();
        let err = Endpoint::open_client(fds, 1 << 20, Wakeup::Park)
            .err()
            .unwrap();
        assert!(
            matches!(err, Error::BadFd(ref m) if m.contains("eventfd")),
            "{err}"
        );
    }

    /// The fds a broker creates for a provided session, without mapping
    /// anything: the provider's side, the client's side (the same files),
    /// and the link's two ends (the broker's, the provider's).
    fn provided_fds(capacity: u64) -> (PeerFds, PeerFds, OwnedFd, OwnedFd) {
        let capacity = rounded_capacity(capacity);
        let ring = || {
            let memfd = OwnedFd::from(ring_memfd(capacity).unwrap());
            let ev = || sys::new_eventfd().unwrap();
            RingFds {
                capacity,
                memfd,
                empty_signal: ev(),
                full_signal: ev(),
            }
        };
        let dup = |r: &RingFds| RingFds {
            capacity: r.capacity,
            memfd: r.memfd.try_clone().unwrap(),
            empty_signal: r.empty_signal.try_clone().unwrap(),
            full_signal: r.full_signal.try_clone().unwrap(),
        };
        let (to_server, to_client) = (ring(), ring());
        let (server_hangup, client_hangup) = sys::socketpair().unwrap();
        let (broker_link, provider_link) = sys::socketpair().unwrap();
        let client = PeerFds {
            to_server: dup(&to_server),
            to_client: dup(&to_client),
            hangup: client_hangup,
        };
        let server = PeerFds {
            to_server,
            to_client,
            hangup: server_hangup,
        };
        (server, client, broker_link, provider_link)
    }

    #[test]
    fn a_provider_serves_fds_it_did_not_create_both_ways() {
        let (server_fds, client_fds, _broker_link, link) = provided_fds(4096);
        let mut server = Endpoint::open_server(
            server_fds,
            link.as_fd(),
            1 << 20,
            Wakeup::Park,
            PeerLimits::default(),
        )
        .expect("honest fds");
        let mut client = Endpoint::open_client(client_fds, 1 << 20, Wakeup::Park).unwrap();
        for ep in [&mut server, &mut client] {
            ep.set_timeout(Some(Duration::from_secs(10)));
        }
        client.send(b"to the provider").unwrap();
        assert_eq!(
            server.recv().unwrap().as_deref(),
            Some(&b"to the provider"[..])
        );
        server.send(b"to the client").unwrap();
        assert_eq!(
            client.recv().unwrap().as_deref(),
            Some(&b"to the client"[..])
        );
        drop(client);
        assert!(server.peer_gone().unwrap(), "the client's hang-up is seen");
    }

    #[test]
    fn a_provider_refuses_a_hostile_link_or_ring() {
        let open = |fds: PeerFds, link: BorrowedFd<'_>| {
            Endpoint::open_server(fds, link, 1 << 20, Wakeup::Park, PeerLimits::default())
                .err()
                .expect("refused")
        };
        // A datagram link never reports the broker's close.
        let (fds, _client, _broker, _) = provided_fds(4096);
        let (dgram, _peer) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let err = open(fds, dgram.as_fd());
        assert!(
            matches!(err, Error::BadFd(ref m) if m.starts_with("link socket is SOCK_DGRAM")),
            "{err}"
        );
        // An eventfd where the link should be.
        let (fds, _client, _broker, _) = provided_fds(4096);
        let ev = sys::new_eventfd().unwrap();
        let err = open(fds, ev.as_fd());
        assert!(
            matches!(err, Error::BadFd(ref m) if m.starts_with("link fd is not a socket")),
            "{err}"
        );
        // A ring that claims more than its memfd holds would be a SIGBUS.
        let (mut fds, _client, _broker, link) = provided_fds(4096);
        fds.to_server.capacity = rounded_capacity(1 << 20);
        let err = open(fds, link.as_fd());
        assert!(
            matches!(err, Error::BadFd(ref m) if m.starts_with("client-to-server ring: memfd holds")),
            "{err}"
        );
        // A ring beyond the provider's own limit.
        let (fds, _client, _broker, link) = provided_fds(1 << 20);
        let small = PeerLimits {
            max_capacity: 4096,
            ..PeerLimits::default()
        };
        let err = Endpoint::open_server(fds, link.as_fd(), 1 << 20, Wakeup::Park, small)
            .err()
            .expect("refused");
        assert!(matches!(err, Error::OverLimit { .. }), "{err}");
    }

    #[test]
    fn unmapped_fds_connect_a_client_and_a_server_side() {
        let fds = create_unmapped(100).expect("create");
        let cap = rounded_capacity(100);
        assert_eq!(fds.client.to_server.capacity, cap);
        assert_eq!(fds.provider.to_client.capacity, cap);
        for ring in [&fds.client.to_server, &fds.client.to_client] {
            validate_ring("ring", ring, cap).expect("a valid sealed ring");
        }
        validate_hangup(fds.provider.hangup.as_fd()).expect("a stream socket");
        validate_hangup(fds.client.hangup.as_fd()).expect("a stream socket");
        // Each pair's ends see each other close, and nothing else holds them:
        // the client's and the provider's hang-up ends each meet the broker's.
        let ProvidedFds {
            client,
            provider,
            provider_link,
            broker_link,
            broker_client_hangup,
            broker_provider_hangup,
        } = fds;
        drop(provider_link);
        let client_hangup = client.hangup.try_clone().expect("dup");
        let provider_hangup = provider.hangup.try_clone().expect("dup");
        drop(broker_client_hangup);
        for (fd, closed) in [
            (&broker_link, true),
            (&client_hangup, true),
            (&provider_hangup, false),
            (&broker_provider_hangup, false),
        ] {
            let state = sys::hangup_state(fd.as_fd()).expect("state");
            assert_eq!(state == HangupState::Closed, closed, "{state:?}");
        }
        drop(broker_provider_hangup);
        assert_eq!(
            sys::hangup_state(provider_hangup.as_fd()).expect("state"),
            HangupState::Closed
        );
        drop((client_hangup, provider_hangup));
        // The client's rings are the provider's: a message crosses them.
        let mut client = Endpoint::open_client(client, 1 << 10, Wakeup::Park).expect("client");
        let mut server = Endpoint::open_client(
            PeerFds {
                to_server: provider.to_client,
                to_client: provider.to_server,
                hangup: provider.hangup,
            },
            1 << 10,
            Wakeup::Park,
        )
        .expect("the provider's side, roles swapped");
        client.send(b"across").expect("send");
        assert_eq!(
            server.recv().expect("recv").as_deref(),
            Some(&b"across"[..])
        );
    }
}
