//! One direction of a session: a shmem-ipc byte ring carrying frames.
//!
//! We use shmem-ipc's low-level `send`/`recv` (never the `_trusted` variants,
//! never its blocking helpers) so that no reference into shared memory is
//! ever formed, every wake-up is our own non-blocking eventfd write, and a
//! panic inside shmem-ipc caused by a peer that changes the ring's count under
//! us (a debug-build subtraction overflow) becomes an error, not a crash.

use crate::frame::{Budget, ByteSource, Decoder, FrameError, Item, Received, WriteFrame};
use crate::sys;
use crate::Error;
use shmem_ipc::sharedring::{Receiver, Sender};
use shmlink_interfaces::RING_HEADER;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why a ring can no longer be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    /// The peer corrupted its bookkeeping or framing.
    Corrupt,
    /// This side stopped writing in the middle of a message.
    HalfSent,
}

/// Runs one shmem-ipc ring operation, turning both its errors and its panics
/// into [`Error::Corrupt`] and latching the ring as broken.
fn guarded<T>(
    broken: &mut Option<Broken>,
    f: impl FnOnce() -> Result<T, shmem_ipc::ringbuf::Error>,
) -> Result<T, Error> {
    match broken {
        Some(Broken::Corrupt) => return Err(Error::Corrupt("ring already found corrupt".into())),
        Some(Broken::HalfSent) => return Err(Error::HalfSent),
        None => {}
    }
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            *broken = Some(Broken::Corrupt);
            Err(Error::Corrupt(e.to_string()))
        }
        Err(_) => {
            *broken = Some(Broken::Corrupt);
            Err(Error::Corrupt(
                "ring count changed during an operation".into(),
            ))
        }
    }
}

/// Bytes in shared memory, read only by copying.
struct SharedBytes {
    ptr: *const u8,
    len: usize,
}

impl ByteSource for SharedBytes {
    fn len(&self) -> usize {
        self.len
    }
    fn copy_to(&self, offset: usize, dst: &mut [MaybeUninit<u8>]) {
        debug_assert!(offset + dst.len() <= self.len);
        // SAFETY: shmem-ipc handed us `ptr` valid for `len` bytes of our own
        // mapping for the duration of the closure this object lives in, and the
        // decoder keeps `offset + dst.len() <= len`. The peer may change these
        // bytes while we copy; we copy them as plain bytes (every value is a
        // valid u8) and never create a reference to them.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.add(offset),
                dst.as_mut_ptr().cast::<u8>(),
                dst.len(),
            )
        }
    }
}

/// The polling words in a ring's header (see DATA-PLANE.md, "Polling
/// words"): at [`READER_POLLING`] the ring's reader says that it is busy-polling
/// for data, at [`WRITER_POLLING`] the writer that it is busy-polling for room.
/// The other side may then skip the eventfd write it would otherwise make,
/// which in spin mode is most of the cost of handing a message over.
///
/// The peer can set or clear either word at any time. Its own word only
/// decides whether we skip a signal *to the peer* (a wrong value only
/// starves the peer itself), and ours is only read by the peer, which could
/// as well never signal: neither gives it anything it did not have.
#[derive(Default)]
struct Header {
    /// Address of the ring's mapping, learnt from the first pointer
    /// shmem-ipc hands us; 0 until then, and the words count as clear.
    base: usize,
}

/// Header offset of the word the ring's reader sets while it busy-polls for data.
pub const READER_POLLING: usize = 8;
/// Header offset of the word the ring's writer sets while it busy-polls for room.
pub const WRITER_POLLING: usize = 12;

impl Header {
    /// Learns the mapping's address from the first data pointer shmem-ipc
    /// passes (its ring index is 0 then, so the pointer is the start of the
    /// data, [`RING_HEADER`] bytes into the mapping).
    fn learn(&mut self, first: *const u8) {
        if self.base == 0 {
            self.base = (first as usize).wrapping_sub(RING_HEADER as usize);
        }
    }

    fn word(&self, offset: usize) -> Option<&AtomicU32> {
        if self.base == 0 {
            return None;
        }
        // SAFETY: `base` is the start of this ring's mapping, which lives as
        // long as the ring that owns this header; `offset` + 4 is within its
        // 64-byte header, which shmem-ipc leaves unused past the count (bytes
        // 8..64), 4-byte aligned (the mapping is page-aligned). The peer writes
        // these bytes concurrently, which atomic accesses allow; every value
        // is a valid u32.
        Some(unsafe { AtomicU32::from_ptr((self.base + offset) as *mut u32) })
    }

    /// Sets or clears our polling word at `offset`. Clearing is followed by
    /// a full fence: the ring check the caller makes next, before it blocks,
    /// is ordered after the clear, so a peer that still saw the word set has
    /// written before that check.
    fn set(&self, offset: usize, on: bool) {
        if let Some(w) = self.word(offset) {
            w.store(u32::from(on), Ordering::Relaxed);
            if !on {
                fence(Ordering::SeqCst);
            }
        }
    }

    /// Whether the peer's polling word at `offset` is set, read after a full
    /// fence that orders it after our update of the ring's count.
    fn peer_polling(&self, offset: usize) -> bool {
        self.word(offset).is_some_and(|w| {
            fence(Ordering::SeqCst);
            w.load(Ordering::Relaxed) != 0
        })
    }
}

/// How far one bounded write got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteProgress {
    /// The whole frame is in the ring.
    Done,
    /// The ring is full: wait for the reader's wake-up (or re-check `has_room`).
    Blocked,
    /// The byte bound was reached; the ring may have room, so call again.
    Bounded,
}

/// What one bounded read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadProgress {
    /// A whole frame was decoded (a message is in the caller's buffer).
    Received(Received),
    /// The ring holds no more bytes: wait for the writer's wake-up (or re-check `has_data`).
    Empty,
    /// The byte bound was reached; the ring may hold more, so call again.
    Bounded,
}

/// The sending half of one ring.
pub struct RingSender {
    ring: Sender<u8>,
    broken: Option<Broken>,
    header: Header,
}

impl RingSender {
    pub(crate) fn new(ring: Sender<u8>) -> Self {
        RingSender {
            ring,
            broken: None,
            header: Header::default(),
        }
    }

    /// Marks the stream as stopped mid-message (a send gave up or its fill
    /// panicked part-way): every later write fails with [`Error::HalfSent`],
    /// since the peer would read the next frame as the rest of this one.
    pub fn poison_half_sent(&mut self) {
        if self.broken.is_none() {
            self.broken = Some(Broken::HalfSent);
        }
    }

    /// Writes as much of `frame` as fits now; returns true once all of it is in the ring.
    ///
    /// Keeps copying while the reader keeps making room; a caller that must
    /// not be held for long uses `write_frame_bounded` (feature `server`).
    pub fn write_frame(&mut self, frame: &mut (impl WriteFrame + ?Sized)) -> Result<bool, Error> {
        loop {
            match self.write_frame_bounded(frame, usize::MAX)? {
                WriteProgress::Done => return Ok(true),
                WriteProgress::Blocked => return Ok(false),
                WriteProgress::Bounded => {}
            }
        }
    }

    server_pub! {
        /// Writes at most `max_bytes` of `frame` (at least one byte if there is room).
        ///
        /// [`WriteProgress::Bounded`] means the bound stopped the copy while the ring
        /// may still have room: call again rather than wait for the reader's
        /// wake-up, which may never come.
        ///
        /// A panic in the frame's own code (a fill) leaves the ring marked
        /// half-sent (see [`RingSender::poison_half_sent`]) and goes on to the caller.
        pub fn write_frame_bounded(
            &mut self,
            frame: &mut (impl WriteFrame + ?Sized),
            max_bytes: usize,
        ) -> Result<WriteProgress, Error> {
            let mut left = max_bytes.max(1);
            while !frame.is_done() {
                if left == 0 {
                    return Ok(WriteProgress::Bounded);
                }
                let ring = &mut self.ring;
                let header = &mut self.header;
                let mut copied = 0;
                let mut panicked = None;
                let status = guarded(&mut self.broken, || {
                    ring.sender_mut().send(|ptr, room| {
                        header.learn(ptr);
                        let write = AssertUnwindSafe(|| {
                            // SAFETY: shmem-ipc passes a pointer writable for `room` bytes
                            // of our mapping, no reference into them exists, and we pass
                            // on a length no larger than `room`.
                            unsafe { frame.write_into(ptr, room.min(left)) }
                        });
                        match catch_unwind(write) {
                            Ok(n) => copied = n,
                            Err(p) => panicked = Some(p),
                        }
                        copied
                    })
                });
                if let Some(p) = panicked {
                    // Whatever of the frame the ring took stays there: the stream
                    // is mid-message for good.
                    self.poison_half_sent();
                    std::panic::resume_unwind(p);
                }
                let status = status?;
                left -= copied;
                if status.signal && !self.header.peer_polling(READER_POLLING) {
                    sys::eventfd_signal(self.ring.empty_signal().as_fd()).map_err(Error::signal)?;
                }
                if status.remaining == 0 || copied == 0 {
                    break;
                }
            }
            Ok(if frame.is_done() {
                WriteProgress::Done
            } else {
                WriteProgress::Blocked
            })
        }
    }

    /// Whether the ring has room for at least one byte.
    pub fn has_room(&mut self) -> Result<bool, Error> {
        let ring = &mut self.ring;
        guarded(&mut self.broken, || ring.sender_mut().write_count()).map(|n| n > 0)
    }

    /// Says to the reader that we busy-poll for room (`true`), so it need
    /// not signal it, or that we stopped (`false`; re-check the ring before
    /// blocking). A no-op until the first write has shown us the header.
    pub fn set_polling(&mut self, on: bool) {
        self.header.set(WRITER_POLLING, on);
    }

    /// The eventfd the reader writes when the ring stops being full.
    pub fn space_signal(&self) -> BorrowedFd<'_> {
        self.ring.full_signal().as_fd()
    }

    /// The eventfd we write when the ring stops being empty.
    pub fn data_signal(&self) -> BorrowedFd<'_> {
        self.ring.empty_signal().as_fd()
    }
}

/// The receiving half of one ring, with its frame decoder.
pub struct RingReceiver {
    ring: Receiver<u8>,
    decoder: Decoder,
    broken: Option<Broken>,
    header: Header,
}

impl RingReceiver {
    pub(crate) fn new(ring: Receiver<u8>, max_message: u32) -> Self {
        RingReceiver {
            ring,
            decoder: Decoder::new(max_message),
            broken: None,
            header: Header::default(),
        }
    }

    /// Returns the next complete frame, or `None` when the ring holds no complete frame yet.
    ///
    /// Each message comes in a new buffer; [`RingReceiver::read_into`] reuses one.
    pub fn read_item(&mut self) -> Result<Option<Item>, Error> {
        let mut out = Vec::new();
        Ok(match self.read_into(&mut out)? {
            Some(Received::Message) => Some(Item::Message(out)),
            Some(Received::End) => Some(Item::End),
            None => None,
        })
    }

    /// Like [`RingReceiver::read_item`], but a message replaces the contents
    /// of `out` (see [`Decoder::decode_into`]: passing the same buffer each
    /// time makes steady reading allocation-free).
    pub fn read_into(&mut self, out: &mut Vec<u8>) -> Result<Option<Received>, Error> {
        loop {
            match self.read_bounded(usize::MAX, out)? {
                ReadProgress::Received(r) => return Ok(Some(r)),
                ReadProgress::Empty => return Ok(None),
                ReadProgress::Bounded => {}
            }
        }
    }

    server_pub! {
        /// Decodes at most `max_bytes` from the ring (at least one byte if there
        /// is data); a message that completes replaces the contents of `out`.
        ///
        /// [`ReadProgress::Bounded`] means the bound stopped the decoding while the ring
        /// may still hold data: call again rather than wait for the writer's
        /// wake-up, which may never come.
        pub fn read_bounded(
            &mut self,
            max_bytes: usize,
            out: &mut Vec<u8>,
        ) -> Result<ReadProgress, Error> {
            let mut left = max_bytes.max(1);
            loop {
                if left == 0 {
                    return Ok(ReadProgress::Bounded);
                }
                let mut received = None;
                let mut frame_error = None;
                let mut consumed = 0;
                let decoder = &mut self.decoder;
                let ring = &mut self.ring;
                let header = &mut self.header;
                let status = guarded(&mut self.broken, || {
                    ring.receiver_mut().recv(|ptr, len| {
                        header.learn(ptr);
                        let src = SharedBytes {
                            ptr,
                            len: len.min(left),
                        };
                        match decoder.decode_into(&src, out) {
                            Ok((used, r)) => {
                                received = r;
                                consumed = used;
                                used
                            }
                            Err(e) => {
                                frame_error = Some(e);
                                0
                            }
                        }
                    })
                })?;
                match frame_error {
                    Some(FrameError::NoMemory(m)) => return Err(Error::NoMemory(m)),
                    Some(e) => {
                        self.broken = Some(Broken::Corrupt);
                        return Err(Error::Protocol(e));
                    }
                    None => {}
                }
                if status.signal && !self.header.peer_polling(WRITER_POLLING) {
                    sys::eventfd_signal(self.ring.full_signal().as_fd()).map_err(Error::signal)?;
                }
                left -= consumed;
                if let Some(r) = received {
                    return Ok(ReadProgress::Received(r));
                }
                if consumed == 0 {
                    return Ok(ReadProgress::Empty);
                }
            }
        }
    }

    /// Gives a message buffer back to the decoder (see [`Decoder::recycle`]).
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.decoder.recycle(buf);
    }

    /// Charges the memory the frame decoder takes for message bodies to `budget`.
    pub fn set_budget(&mut self, budget: Arc<dyn Budget>) {
        self.decoder.set_budget(budget);
    }

    /// Whether the ring holds at least one byte.
    pub fn has_data(&mut self) -> Result<bool, Error> {
        let ring = &mut self.ring;
        guarded(&mut self.broken, || ring.receiver_mut().read_count()).map(|n| n > 0)
    }

    /// Whether the peer's end-of-stream frame has arrived.
    pub fn ended(&self) -> bool {
        self.decoder.ended()
    }

    /// Says to the writer that we busy-poll for data (`true`), so it need
    /// not signal us, or that we stopped (`false`; re-check the ring before
    /// blocking). A no-op until the first read has shown us the header.
    pub fn set_polling(&mut self, on: bool) {
        self.header.set(READER_POLLING, on);
    }

    /// The eventfd the writer writes when the ring stops being empty.
    pub fn data_signal(&self) -> BorrowedFd<'_> {
        self.ring.empty_signal().as_fd()
    }
}

/// A ring half a side can wait on: for room (a [`RingSender`]) or for data
/// (a [`RingReceiver`]).
pub trait Waitable {
    /// Whether the ring can make progress now.
    fn ready(&mut self) -> Result<bool, Error>;
    /// The eventfd the peer writes when it made progress for us.
    fn signal(&self) -> BorrowedFd<'_>;
    /// Sets or clears our polling word (see [`Header`]).
    fn set_polling(&mut self, on: bool);
}

impl Waitable for RingSender {
    fn ready(&mut self) -> Result<bool, Error> {
        self.has_room()
    }
    fn signal(&self) -> BorrowedFd<'_> {
        self.space_signal()
    }
    fn set_polling(&mut self, on: bool) {
        RingSender::set_polling(self, on)
    }
}

impl Waitable for RingReceiver {
    fn ready(&mut self) -> Result<bool, Error> {
        self.has_data()
    }
    fn signal(&self) -> BorrowedFd<'_> {
        self.data_signal()
    }
    fn set_polling(&mut self, on: bool) {
        RingReceiver::set_polling(self, on)
    }
}

/// Busy-polls `ring` until it can make progress or `budget` has passed;
/// returns whether it can. Our polling word is set meanwhile, so the peer
/// need not signal, and cleared before this returns: the caller re-checks the
/// ring before it blocks (as it must anyway). An error reading the ring
/// counts as progress: the caller's next operation on the ring reports it.
pub fn spin_until_ready(ring: &mut (impl Waitable + ?Sized), budget: Duration) -> bool {
    let ready = spin_keeping_word(ring, budget);
    if ready {
        ring.set_polling(false);
    }
    ready
}

#[cfg_attr(not(feature = "server"), allow(dead_code))]
/// [`spin_until_ready`], but when the ring becomes ready our polling word
/// stays set, so the peer need not signal while we use what we found and
/// come back for more. For a side that always looks at the ring again
/// before it blocks (a server's pump), never for a caller that may hand the
/// ring's eventfd to someone else's poll loop: it must clear the word
/// ([`Waitable::set_polling`]) and re-check the ring before anyone waits on
/// that eventfd. Cleared, as by [`spin_until_ready`], when the budget runs
/// out.
pub fn spin_keeping_word(ring: &mut (impl Waitable + ?Sized), budget: Duration) -> bool {
    ring.set_polling(true);
    let ready = sys::spin_until(budget, || ring.ready().unwrap_or(true));
    if !ready {
        ring.set_polling(false);
    }
    ready
}
