//! Async sessions on tokio (cargo feature `tokio`).
//!
//! An [`AsyncSession`] sends and receives without blocking a thread: the
//! ring operations themselves never block, and waiting is done by tokio's
//! reactor through [`AsyncFd`] registrations of the session's two wake-up
//! eventfds (incoming data, outgoing room) and its hang-up socket. As with
//! the blocking API, a wake-up is only a hint: the ring is re-checked after
//! every one, and a peer that closes its hang-up end wakes every waiter.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shmlink::Error> {
//! let client = shmlink::Client::connect(&shmlink::Bus::Session)?;
//! let mut session = client.session("echo").open_async().await?;
//! session.send(b"hello").await?;
//! assert_eq!(session.recv().await?.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```

use crate::session::{self, io_err, SessionInfo};
use crate::{Counters, Error, Session, SessionBuilder};
use dbus::arg::PropMap;
use shmlink_endpoint::frame::{FillFrame, OutFrame, Piece, Received, WriteFrame};
use shmlink_endpoint::sys;
use shmlink_endpoint::{spin_until_ready, Endpoint, Item, Wakeup};
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest message one `poll_write` sends.
const WRITE_CHUNK: usize = 1 << 20;

impl SessionBuilder {
    /// Like [`SessionBuilder::open`], without blocking the calling task: the
    /// D-Bus call runs on tokio's blocking pool. Call it inside a tokio
    /// runtime (with the `rt` feature).
    pub async fn open_async(self) -> Result<AsyncSession, Error> {
        let session = tokio::task::spawn_blocking(move || self.open())
            .await
            .map_err(|e| Error::BadReply(format!("the OpenSessionVia task failed: {e}")))??;
        session.into_async()
    }
}

impl Session {
    /// Turns this session into an [`AsyncSession`]. Must be called inside a
    /// tokio runtime with an I/O driver.
    pub(crate) fn into_async(self) -> Result<AsyncSession, Error> {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<AsyncFd<OwnedFd>, Error> {
            let owned = fd
                .try_clone_to_owned()
                .map_err(shmlink_endpoint::Error::Io)?;
            // SAFETY: `owned` is an open fd that the AsyncFd takes ownership of;
            // OwnedFd::as_raw_fd always returns that same fd, and we never call
            // `get_mut` or `into_inner`, so it stays open and unchanged for the
            // AsyncFd's whole lifetime.
            let registered = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) };
            Ok(registered.map_err(|e| shmlink_endpoint::Error::Io(e.into_parts().1))?)
        };
        let data = dup(self.endpoint.readable_fd())?;
        let room = dup(self.endpoint.writable_fd())?;
        // One registration of the hang-up socket per direction: an AsyncFd
        // keeps one read waker, and a reader and a writer task (after
        // `tokio::io::split`) must both be woken when the peer leaves.
        let hangup_in = dup(self.endpoint.hangup_fd())?;
        let hangup_out = dup(self.endpoint.hangup_fd())?;
        Ok(AsyncSession {
            endpoint: self.endpoint,
            info: self.info,
            data,
            room,
            hangup_in,
            hangup_out,
            pending: None,
            finished: false,
            leftover: self.leftover,
            leftover_pos: self.leftover_pos,
        })
    }
}

/// An open session driven by tokio: it waits for data, room or the peer's
/// hang-up through tokio's reactor (the session's eventfds and hang-up
/// socket), so no thread blocks. A wake-up is only a hint; the ring is
/// re-checked after each one.
///
/// It implements [`AsyncRead`] and [`AsyncWrite`] as a byte stream (each
/// `write` sends one message; reads ignore message boundaries), so
/// `tokio::io::copy`, `tokio::io::split` and friends work on it.
pub struct AsyncSession {
    endpoint: Endpoint,
    info: Arc<SessionInfo>,
    data: AsyncFd<OwnedFd>,
    room: AsyncFd<OwnedFd>,
    hangup_in: AsyncFd<OwnedFd>,
    hangup_out: AsyncFd<OwnedFd>,
    /// The rest of a frame whose sending started but did not finish (ring
    /// full in `poll_write`, or a dropped `send` future): it goes first.
    pending: Option<Box<dyn WriteFrame + Send>>,
    /// The end-of-stream frame was queued.
    finished: bool,
    leftover: Vec<u8>,
    leftover_pos: usize,
}

/// Which way a task waits.
#[derive(Clone, Copy)]
enum Dir {
    /// For incoming data.
    In,
    /// For room in the outgoing ring.
    Out,
}

/// Drives `progress` until it yields a value, parking the task on the
/// direction's eventfd and the hang-up socket in between.
///
/// In spin mode the ring is busy-polled for the session's bounded budget
/// first (this occupies the executor thread for at most that long).
fn poll_ring<T>(
    cx: &mut Context<'_>,
    ep: &mut Endpoint,
    signal: &AsyncFd<OwnedFd>,
    hangup: &AsyncFd<OwnedFd>,
    dir: Dir,
    mut progress: impl FnMut(&mut Endpoint) -> Result<Option<T>, shmlink_endpoint::Error>,
) -> Poll<Result<T, shmlink_endpoint::Error>> {
    if let Some(v) = progress(ep)? {
        return Poll::Ready(Ok(v));
    }
    if let Wakeup::Spin(budget) = ep.wakeup() {
        let ready = match dir {
            Dir::In => spin_until_ready(ep.ring_receiver(), budget),
            Dir::Out => spin_until_ready(ep.ring_sender(), budget),
        };
        if ready {
            if let Some(v) = progress(ep)? {
                return Poll::Ready(Ok(v));
            }
        }
    }
    loop {
        match signal.poll_read_ready(cx) {
            Poll::Ready(Ok(mut guard)) => {
                // Reset the counter, forget the readiness, then look again:
                // a signal arriving after this point marks the fd ready anew.
                sys::eventfd_drain(signal.get_ref().as_fd())?;
                guard.clear_ready();
                if let Some(v) = progress(ep)? {
                    return Poll::Ready(Ok(v));
                }
                continue;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Pending => {}
        }
        match hangup.poll_read_ready(cx) {
            Poll::Ready(Ok(mut guard)) => {
                // Data the peer wrote before leaving is still ours to read.
                if let Some(v) = progress(ep)? {
                    return Poll::Ready(Ok(v));
                }
                if ep.peer_gone()? {
                    return Poll::Ready(Err(shmlink_endpoint::Error::Closed));
                }
                guard.clear_ready();
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            // Both registrations are armed: a signal or a hang-up wakes us.
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// Takes the next item from the ring, if a whole one is there.
fn next_item(ep: &mut Endpoint) -> Result<Option<Option<Vec<u8>>>, shmlink_endpoint::Error> {
    Ok(match ep.try_recv()? {
        Some(Item::Message(m)) => Some(Some(m)),
        Some(Item::End) => Some(None),
        None => None,
    })
}

impl AsyncSession {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), shmlink_endpoint::Error>> {
        let Some(frame) = self.pending.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        ready!(poll_ring(
            cx,
            &mut self.endpoint,
            &self.room,
            &self.hangup_out,
            Dir::Out,
            |ep| { Ok(ep.ring_sender().write_frame(frame.as_mut())?.then_some(())) }
        ))?;
        self.pending = None;
        Poll::Ready(Ok(()))
    }

    /// Sends one message, waiting (without blocking the thread) while the ring is full.
    ///
    /// Cancel-safe in the sense that matters for a stream: if the future is
    /// dropped after part of the message went out, the rest is kept and
    /// sent before anything else, so the peer never sees a torn frame.
    pub async fn send(&mut self, msg: &[u8]) -> Result<(), Error> {
        self.check_send(msg.len())?;
        self.send_frame(OutFrame::message(msg)).await
    }

    /// Sends one message of `len` bytes that `fill` writes straight into the
    /// shared ring, waiting (without blocking the thread) while the ring is
    /// full; see [`Session::send_with`] for the pieces and what a fill may
    /// do with them. Cancel-safe like [`AsyncSession::send`]: a future
    /// dropped mid-message keeps `fill` (hence `'static`) to finish the
    /// message before anything else is sent.
    pub async fn send_with(
        &mut self,
        len: usize,
        fill: impl FnMut(Piece<'_>) + Send + 'static,
    ) -> Result<(), Error> {
        self.check_send(len)?;
        self.send_frame(FillFrame::message(len, fill)).await
    }

    fn check_send(&self, len: usize) -> Result<(), Error> {
        if self.finished {
            return Err(shmlink_endpoint::Error::AlreadyFinished.into());
        }
        if len > self.endpoint.max_message() as usize {
            return Err(shmlink_endpoint::Error::TooLarge {
                len,
                max: self.endpoint.max_message(),
            }
            .into());
        }
        Ok(())
    }

    async fn send_frame<F: Stash>(&mut self, frame: F) -> Result<(), Error> {
        poll_fn(|cx| self.poll_pending(cx)).await?;
        let mut sending = Sending {
            frame: Some(frame),
            stash: &mut self.pending,
        };
        let ep = &mut self.endpoint;
        let (room, hangup) = (&self.room, &self.hangup_out);
        poll_fn(|cx| {
            let frame = sending.frame.as_mut().expect("frame present until done");
            poll_ring(cx, ep, room, hangup, Dir::Out, |ep| {
                Ok(ep.ring_sender().write_frame(frame)?.then_some(()))
            })
        })
        .await?;
        sending.frame = None;
        Ok(())
    }

    /// Sends the end-of-stream marker: this side will send nothing more.
    pub async fn finish(&mut self) -> Result<(), Error> {
        poll_fn(|cx| self.poll_finish(cx)).await?;
        Ok(())
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), shmlink_endpoint::Error>> {
        ready!(self.poll_pending(cx))?;
        if !self.finished {
            self.pending = Some(Box::new(OutFrame::end()));
            self.finished = true;
        }
        self.poll_pending(cx)
    }

    /// Receives the next message; `None` once the service finished sending.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let (data, hangup) = (&self.data, &self.hangup_in);
        let ep = &mut self.endpoint;
        Ok(poll_fn(|cx| poll_ring(cx, ep, data, hangup, Dir::In, next_item)).await?)
    }

    /// Receives the next message into `buf`, replacing its contents, without
    /// allocating once the buffers have grown (see [`Session::recv_into`]);
    /// false once the service finished sending.
    pub async fn recv_into(&mut self, buf: &mut Vec<u8>) -> Result<bool, Error> {
        let (data, hangup) = (&self.data, &self.hangup_in);
        let ep = &mut self.endpoint;
        let received =
            poll_fn(|cx| poll_ring(cx, ep, data, hangup, Dir::In, |ep| ep.try_recv_into(buf)))
                .await?;
        Ok(received == Received::Message)
    }

    /// The broker's counters for this session (the D-Bus call runs on the blocking pool).
    pub async fn counters(&self) -> Result<Counters, Error> {
        let info = self.info.clone();
        blocking(move || session::counters(&info)).await
    }

    /// The service's own state (for `sink`: bytes, messages, crc32).
    pub async fn service_state(&self) -> Result<PropMap, Error> {
        let info = self.info.clone();
        blocking(move || info.prop(shmlink_interfaces::member::SERVICE_STATE)).await
    }

    /// Closes the session on the broker (`Close`) and unmaps it.
    pub async fn close(self) -> Result<(), Error> {
        let info = self.info.clone();
        // Close while the rings are still mapped, as the blocking API does:
        // dropping first would end the session by hang-up before the call.
        let closed = blocking(move || session::close(&info)).await;
        drop(self);
        closed
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::BadReply(format!("the D-Bus call's task failed: {e}")))?
}

/// A frame a dropped `send` future can leave behind to be finished later.
trait Stash: WriteFrame {
    /// The frame as the session keeps it (a borrowed payload is copied).
    fn stash(self) -> Box<dyn WriteFrame + Send>;
}

impl Stash for OutFrame<&[u8]> {
    fn stash(self) -> Box<dyn WriteFrame + Send> {
        Box::new(self.into_owned())
    }
}

impl<F: FnMut(Piece<'_>) + Send + 'static> Stash for FillFrame<F> {
    fn stash(self) -> Box<dyn WriteFrame + Send> {
        Box::new(self)
    }
}

/// A message being sent by a `send` future; if the future is dropped
/// mid-frame, the unsent rest goes into the session's pending slot.
struct Sending<'a, F: Stash> {
    frame: Option<F>,
    stash: &'a mut Option<Box<dyn WriteFrame + Send>>,
}

impl<F: Stash> Drop for Sending<'_, F> {
    fn drop(&mut self) {
        if let Some(f) = self.frame.take() {
            if f.is_partial() {
                *self.stash = Some(f.stash());
            }
        }
    }
}

/// A byte stream: message boundaries are not preserved; 0 bytes read at end of stream.
impl AsyncRead for AsyncSession {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.leftover_pos >= this.leftover.len() {
            let next = ready!(poll_ring(
                cx,
                &mut this.endpoint,
                &this.data,
                &this.hangup_in,
                Dir::In,
                next_item
            ));
            match next.map_err(io_err)? {
                Some(m) => {
                    this.leftover = m;
                    this.leftover_pos = 0;
                }
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.leftover.len() - this.leftover_pos);
        buf.put_slice(&this.leftover[this.leftover_pos..this.leftover_pos + n]);
        this.leftover_pos += n;
        Poll::Ready(Ok(()))
    }
}

/// A byte stream: each `write` sends (up to 1 MiB of) the buffer as one message.
impl AsyncWrite for AsyncSession {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx)).map_err(io_err)?;
        if this.finished {
            return Poll::Ready(Err(io_err(shmlink_endpoint::Error::AlreadyFinished)));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf
            .len()
            .min(this.endpoint.max_message() as usize)
            .min(WRITE_CHUNK);
        let mut frame = OutFrame::message(&buf[..n]);
        // Copy straight from `buf` into the ring; only if the ring fills
        // mid-frame is the unsent rest copied aside to finish later.
        ready!(poll_ring(
            cx,
            &mut this.endpoint,
            &this.room,
            &this.hangup_out,
            Dir::Out,
            |ep| {
                let done = ep.ring_sender().write_frame(&mut frame)?;
                Ok((done || frame.is_partial()).then_some(()))
            }
        ))
        .map_err(io_err)?;
        if frame.is_partial() {
            this.pending = Some(frame.stash());
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_pending(cx).map_err(io_err)
    }

    /// Flushes, then sends end-of-stream.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_finish(cx).map_err(io_err)
    }
}
