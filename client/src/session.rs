//! Sessions: open one with [`SessionBuilder::open`], then send and receive.

use crate::{Client, Error};
use dbus::arg::{PropMap, RefArg, Variant};
use shmlink_endpoint::{
    Endpoint, EndpointReceiver, EndpointSender, Item, PeerFds, PeerLimits, Piece, Received, Wakeup,
};
use shmlink_interfaces::{
    member, option, OpenSessionViaArgs, OpenSessionViaReply, ParametersError, SessionParameters,
    BROKER_INTERFACE, SESSION_INTERFACE,
};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

/// Largest message a `Write` adapter sends per `write` call.
const WRITE_CHUNK: usize = 1 << 20;

/// Options for a new session; finish with [`SessionBuilder::open`].
pub struct SessionBuilder {
    client: Client,
    service: String,
    options: PropMap,
    timeout: Option<Duration>,
    limits: PeerLimits,
}

impl SessionBuilder {
    pub(crate) fn new(client: Client, service: &str) -> Self {
        SessionBuilder {
            client,
            service: service.to_owned(),
            options: PropMap::new(),
            timeout: None,
            limits: PeerLimits::default(),
        }
    }

    /// Bytes per ring (the broker rounds up to whole pages, see
    /// [`shmlink_endpoint::rounded_capacity`]). A broker that hands over a
    /// larger ring is refused.
    pub fn capacity(self, bytes: u64) -> Self {
        self.option(option::CAPACITY, bytes)
    }

    /// Largest ring the client maps when it asks for no capacity and the
    /// broker picks one (default: the contract's `DEFAULT_MAX_CAPACITY`,
    /// 64 MiB, compared after the broker's rounding). A larger ring is
    /// refused with `shmlink_endpoint::Error::OverLimit` before anything is
    /// mapped. An explicit [`SessionBuilder::capacity`] is the bound instead.
    pub fn max_capacity(mut self, bytes: u64) -> Self {
        self.limits.max_capacity = bytes;
        self
    }

    /// Largest message size the client accepts from the broker (default:
    /// the contract's `DEFAULT_MAX_MESSAGE`, 64 MiB). The receive buffer never
    /// grows past it, so a broker announcing 4 GiB messages is refused with
    /// `shmlink_endpoint::Error::OverLimit` instead.
    pub fn max_message(mut self, bytes: u32) -> Self {
        self.limits.max_message = bytes;
        self
    }

    /// How both sides wait for each other.
    pub fn wakeup(self, w: Wakeup) -> Self {
        let b = self.option(option::WAKEUP, w.mode().to_owned());
        match w {
            // `spin-us` goes only with spin mode: the broker refuses it beside park.
            Wakeup::Park => b,
            Wakeup::Spin(_) => b.option(option::SPIN_US, w.spin_us()),
        }
    }

    /// Any option, e.g. a service's own (`message-size` for `source`).
    pub fn option<T: RefArg + 'static>(mut self, key: &str, value: T) -> Self {
        self.options
            .insert(key.to_owned(), Variant(Box::new(value)));
        self
    }

    /// Blocking calls on the session (`send`, `recv`, `finish`) fail with
    /// [`Error::TimedOut`] when they make no progress for this long (default:
    /// they wait as long as the broker keeps the session open).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// The ring size this session accepts: what the caller asked for, or
    /// the client limit when it asked for nothing (both before rounding).
    fn capacity_bound(&self) -> u64 {
        self.options
            .get(option::CAPACITY)
            .and_then(|v| v.0.as_u64())
            .unwrap_or(self.limits.max_capacity)
    }

    /// Calls `OpenSessionVia` with one end of a new socket pair, takes the
    /// rings the broker sent over it, checks every fd and parameter against
    /// what was asked for and the client's limits, and maps the rings. The
    /// reply carries no fds, so a bus that charges fds to their sender
    /// never charges the broker for this session's.
    pub fn open(self) -> Result<Session, Error> {
        let limits = PeerLimits {
            max_capacity: self.capacity_bound(),
            ..self.limits
        };
        let (hangup, theirs) =
            shmlink_endpoint::sys::socketpair().map_err(shmlink_endpoint::Error::Io)?;
        // `theirs` goes with the call and closes here after it: the broker's
        // copy is then the only other end of `hangup`.
        let reply: OpenSessionViaArgs = self.client.method(
            self.client.broker_path(),
            BROKER_INTERFACE,
            member::OPEN_SESSION_VIA,
            (self.service.as_str(), self.options, theirs),
        )?;
        let OpenSessionViaReply {
            session: path,
            capacities,
            parameters: params,
        } = reply.into();
        let [ts_cap, tc_cap] = capacities;
        // `max-message` is checked in full width before anything else: a
        // value above 4 GiB must not be cut down to one that happens to fit.
        let over = |offered| shmlink_endpoint::Error::OverLimit {
            what: "max-message",
            offered,
            limit: limits.max_message.into(),
        };
        let SessionParameters {
            max_message,
            wakeup: wake,
        } = SessionParameters::from_dict(&params, limits.max_message.into()).map_err(
            |e| match e {
                ParametersError::Missing(_) => {
                    Error::BadReply("parameters lack max-message".into())
                }
                ParametersError::MaxMessageAbove { max, .. } => over(max).into(),
                e => Error::BadReply(format!("parameters: {e}")),
            },
        )?;
        let max_message = u32::try_from(max_message).map_err(|_| over(max_message))?;
        let rings =
            shmlink_endpoint::receive_rings(hangup.as_fd(), capacities).inspect_err(|e| {
                log::debug!("refusing the session {path} the broker handed over: {e}")
            })?;
        let fds = PeerFds::join(rings, hangup);
        // The caller reports the error; a log line here would say it twice.
        let mut endpoint = Endpoint::open_client_within(fds, max_message, wake, limits)
            .inspect_err(|e| {
                log::debug!("refusing the session {path} the broker handed over: {e}")
            })?;
        endpoint.set_timeout(self.timeout);
        log::debug!(
            "opened {path} with {} (capacity {ts_cap}/{tc_cap})",
            self.service
        );
        Ok(Session {
            endpoint,
            info: Arc::new(SessionInfo {
                client: self.client,
                path: path.to_string(),
                service: self.service,
            }),
            timeout: self.timeout,
            leftover: Vec::new(),
            leftover_pos: 0,
        })
    }
}

/// What both halves of a split session know about it.
pub(crate) struct SessionInfo {
    pub(crate) client: Client,
    pub(crate) path: String,
    pub(crate) service: String,
}

impl SessionInfo {
    pub(crate) fn prop<T: for<'b> dbus::arg::Get<'b> + 'static>(
        &self,
        name: &str,
    ) -> Result<T, Error> {
        self.client.property(&self.path, SESSION_INTERFACE, name)
    }

    /// A data-plane error as the caller sees it: a timeout names what was
    /// waited for and how long.
    pub(crate) fn wait_error(
        &self,
        e: shmlink_endpoint::Error,
        dir: Dir,
        timeout: Option<Duration>,
    ) -> Error {
        match (e, timeout) {
            (shmlink_endpoint::Error::TimedOut, Some(after)) => Error::TimedOut {
                operation: match dir {
                    Dir::Send => format!("sending to {}", self.service),
                    Dir::Recv => format!("receiving from {}", self.service),
                },
                after,
            },
            (e, _) => e.into(),
        }
    }
}

/// Which way a blocking call waited.
#[derive(Clone, Copy)]
pub(crate) enum Dir {
    /// For room in the outgoing ring.
    Send,
    /// For an incoming message.
    Recv,
}

/// Counters the broker keeps for a session: the contract's
/// [`Traffic`](shmlink_interfaces::Traffic).
pub type Counters = shmlink_interfaces::Traffic;

/// An open session. Dropping it closes the hang-up socket, which ends the
/// session on the broker's side too; [`Session::close`] does so explicitly.
pub struct Session {
    pub(crate) endpoint: Endpoint,
    pub(crate) info: Arc<SessionInfo>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) leftover: Vec<u8>,
    pub(crate) leftover_pos: usize,
}

impl Session {
    /// The session's object path on the bus.
    pub fn path(&self) -> &str {
        &self.info.path
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.info.service
    }

    /// Largest message either side may send.
    pub fn max_message(&self) -> u32 {
        self.endpoint.max_message()
    }

    /// Usable bytes of the client→server ring.
    pub fn send_capacity(&self) -> u64 {
        self.endpoint.send_capacity()
    }

    /// Sends one message (0 bytes up to [`Session::max_message`]), waiting while the ring is full.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), Error> {
        self.endpoint
            .send(msg)
            .map_err(|e| self.info.wait_error(e, Dir::Send, self.timeout))
    }

    /// Sends one message of `len` bytes that `fill` writes straight into the
    /// shared ring, with no buffer in between (render a frame, fill samples,
    /// read a file into it), waiting while the ring is full.
    ///
    /// `fill` is called once for each [`Piece`] of the message, in order: a
    /// message can wrap around the ring's end or be larger than the ring, so
    /// it may come in several pieces, each with its offset in the message.
    /// A piece can be written but never read: the service maps the same
    /// memory and may change it at any time, so nothing the fill does can
    /// depend on what is there. Bytes it leaves unwritten carry whatever the
    /// ring held (earlier bytes of this session).
    ///
    /// If the call fails (a timeout) or `fill` panics part-way through the
    /// message, the session can send no more: later sends fail with
    /// `HalfSent`, since the service would read them as the rest of this one.
    pub fn send_with(&mut self, len: usize, fill: impl FnMut(Piece<'_>)) -> Result<(), Error> {
        self.endpoint
            .send_with(len, fill)
            .map_err(|e| self.info.wait_error(e, Dir::Send, self.timeout))
    }

    /// Tells the service we will send nothing more.
    pub fn finish(&mut self) -> Result<(), Error> {
        self.endpoint
            .finish()
            .map_err(|e| self.info.wait_error(e, Dir::Send, self.timeout))
    }

    /// Receives the next message; `None` once the service finished sending.
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>, Error> {
        self.endpoint
            .recv()
            .map_err(|e| self.info.wait_error(e, Dir::Recv, self.timeout))
    }

    /// Receives the next message into `buf`, replacing its contents; returns
    /// false (leaving `buf` alone) once the service finished sending.
    ///
    /// The buffer `buf` held is kept for a later message, so a caller that
    /// passes the same buffer every time receives without allocating: the
    /// message is copied once, out of the shared ring, and no more.
    pub fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<bool, Error> {
        self.endpoint
            .recv_into(buf)
            .map_err(|e| self.info.wait_error(e, Dir::Recv, self.timeout))
    }

    /// Sets how long `send`, `recv` and `finish` may wait without progress
    /// (None: as long as the session lasts).
    pub fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
        self.endpoint.set_timeout(t);
    }

    /// Receives a complete message if one is there, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<Item>, Error> {
        Ok(self.endpoint.try_recv()?)
    }

    /// [`Session::try_recv`] into a reused buffer (see [`Session::recv_into`]):
    /// `Some(Received::Message)` when a message replaced `buf`'s contents.
    pub fn try_recv_into(&mut self, buf: &mut Vec<u8>) -> Result<Option<Received>, Error> {
        Ok(self.endpoint.try_recv_into(buf)?)
    }

    /// For event loops: the eventfd that becomes readable when incoming data
    /// arrives. A wake-up is only a hint: read it to zero, then
    /// [`Session::try_recv`] until it returns `None` before waiting again.
    pub fn readable_fd(&self) -> BorrowedFd<'_> {
        self.endpoint.readable_fd()
    }

    /// For event loops: the eventfd that becomes readable when the outgoing
    /// ring gets room.
    pub fn writable_fd(&self) -> BorrowedFd<'_> {
        self.endpoint.writable_fd()
    }

    /// For event loops: the hang-up socket, readable once the broker ended
    /// the session (data it sent before is still there to receive).
    pub fn hangup_fd(&self) -> BorrowedFd<'_> {
        self.endpoint.hangup_fd()
    }

    /// The broker's counters for this session.
    pub fn counters(&self) -> Result<Counters, Error> {
        counters(&self.info)
    }

    /// The service's own state (for `sink`: bytes, messages, crc32).
    pub fn service_state(&self) -> Result<PropMap, Error> {
        self.info.prop(member::SERVICE_STATE)
    }

    /// Closes the session on the broker (`Close`) and unmaps it.
    pub fn close(self) -> Result<(), Error> {
        close(&self.info)
    }

    /// Splits into a sender and a receiver usable from two threads.
    pub fn split(self) -> (SessionSender, SessionReceiver) {
        let (tx, rx) = self.endpoint.split();
        (
            SessionSender {
                tx,
                info: self.info.clone(),
                timeout: self.timeout,
            },
            SessionReceiver {
                rx,
                info: self.info,
                timeout: self.timeout,
                leftover: self.leftover,
                leftover_pos: self.leftover_pos,
            },
        )
    }
}

pub(crate) fn counters(info: &SessionInfo) -> Result<Counters, Error> {
    Ok(Counters {
        bytes_to_server: info.prop(member::BYTES_TO_SERVER)?,
        messages_to_server: info.prop(member::MESSAGES_TO_SERVER)?,
        bytes_to_client: info.prop(member::BYTES_TO_CLIENT)?,
        messages_to_client: info.prop(member::MESSAGES_TO_CLIENT)?,
    })
}

pub(crate) fn close(info: &SessionInfo) -> Result<(), Error> {
    info.client
        .method(&info.path, SESSION_INTERFACE, member::CLOSE, ())
}

pub(crate) fn io_err(e: impl Into<Error>) -> io::Error {
    let e = e.into();
    let kind = match e {
        Error::Session(shmlink_endpoint::Error::Closed) => io::ErrorKind::BrokenPipe,
        Error::Session(shmlink_endpoint::Error::TimedOut) | Error::TimedOut { .. } => {
            io::ErrorKind::TimedOut
        }
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// Reads one message at a time into `buf`, keeping what does not fit.
fn read_stream(
    buf: &mut [u8],
    leftover: &mut Vec<u8>,
    pos: &mut usize,
    mut recv: impl FnMut() -> Result<Option<Vec<u8>>, Error>,
) -> io::Result<usize> {
    while *pos >= leftover.len() {
        match recv().map_err(io_err)? {
            Some(m) => {
                *leftover = m;
                *pos = 0;
            }
            None => return Ok(0),
        }
    }
    let n = buf.len().min(leftover.len() - *pos);
    buf[..n].copy_from_slice(&leftover[*pos..*pos + n]);
    *pos += n;
    Ok(n)
}

fn write_stream(
    buf: &[u8],
    max: u32,
    send: impl FnOnce(&[u8]) -> Result<(), Error>,
) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    let n = buf.len().min(max as usize).min(WRITE_CHUNK);
    send(&buf[..n]).map_err(io_err)?;
    Ok(n)
}

/// A byte stream: every `write` sends one message.
impl io::Write for Session {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let max = self.endpoint.max_message();
        write_stream(buf, max, |b| self.send(b))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A byte stream: message boundaries are not preserved; `Ok(0)` at end of stream.
impl io::Read for Session {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (ep, info, timeout) = (&mut self.endpoint, &self.info, self.timeout);
        read_stream(buf, &mut self.leftover, &mut self.leftover_pos, || {
            ep.recv()
                .map_err(|e| info.wait_error(e, Dir::Recv, timeout))
        })
    }
}

/// The sending half of a split session.
pub struct SessionSender {
    tx: EndpointSender,
    // Also keeps the D-Bus connection open while this half lives: the broker
    // ends every session of a connection that leaves the bus.
    info: Arc<SessionInfo>,
    timeout: Option<Duration>,
}

impl SessionSender {
    /// Sends one message.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), Error> {
        self.tx
            .send(msg)
            .map_err(|e| self.info.wait_error(e, Dir::Send, self.timeout))
    }
    /// Sends one message written in place; see [`Session::send_with`].
    pub fn send_with(&mut self, len: usize, fill: impl FnMut(Piece<'_>)) -> Result<(), Error> {
        self.tx
            .send_with(len, fill)
            .map_err(|e| self.info.wait_error(e, Dir::Send, self.timeout))
    }
    /// Tells the service we will send nothing more.
    pub fn finish(&mut self) -> Result<(), Error> {
        self.tx
            .finish()
            .map_err(|e| self.info.wait_error(e, Dir::Send, self.timeout))
    }
    /// Limits how long `send` and `finish` may wait for room.
    pub fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
        self.tx.set_timeout(t);
    }
}

impl io::Write for SessionSender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let max = self.tx.max_message();
        write_stream(buf, max, |b| self.send(b))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The receiving half of a split session.
pub struct SessionReceiver {
    rx: EndpointReceiver,
    info: Arc<SessionInfo>,
    timeout: Option<Duration>,
    leftover: Vec<u8>,
    leftover_pos: usize,
}

impl SessionReceiver {
    /// Receives the next message; `None` once the service finished sending.
    ///
    /// After a timeout the session is intact: calling again waits anew.
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>, Error> {
        self.rx
            .recv()
            .map_err(|e| self.info.wait_error(e, Dir::Recv, self.timeout))
    }
    /// Receives the next message into a reused buffer; see [`Session::recv_into`].
    pub fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<bool, Error> {
        self.rx
            .recv_into(buf)
            .map_err(|e| self.info.wait_error(e, Dir::Recv, self.timeout))
    }
    /// Receives a complete message if one is there, without waiting
    /// ([`Item::End`] once the service finished sending).
    pub fn try_recv(&mut self) -> Result<Option<Item>, Error> {
        Ok(self.rx.try_recv()?)
    }
    /// [`SessionReceiver::try_recv`] into a reused buffer; see [`Session::try_recv_into`].
    pub fn try_recv_into(&mut self, buf: &mut Vec<u8>) -> Result<Option<Received>, Error> {
        Ok(self.rx.try_recv_into(buf)?)
    }
    /// The broker's counters for this session.
    pub fn counters(&self) -> Result<Counters, Error> {
        counters(&self.info)
    }
    /// The service's own state.
    pub fn service_state(&self) -> Result<PropMap, Error> {
        self.info.prop(member::SERVICE_STATE)
    }
    /// Closes the session on the broker.
    pub fn close(self) -> Result<(), Error> {
        close(&self.info)
    }
    /// Limits how long `recv` may wait.
    pub fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
        self.rx.set_timeout(t);
    }
}

impl io::Read for SessionReceiver {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (rx, info, timeout) = (&mut self.rx, &self.info, self.timeout);
        read_stream(buf, &mut self.leftover, &mut self.leftover_pos, || {
            rx.recv()
                .map_err(|e| info.wait_error(e, Dir::Recv, timeout))
        })
    }
}
