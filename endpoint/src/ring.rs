//! One direction of a session: a shmem-ipc byte ring carrying frames.
//!
//! We use shmem-ipc's low-level `send`/`recv` (never the `_trusted` variants,
//! never its blocking helpers) so that no reference into shared memory is
//! ever formed, every wake-up is our own non-blocking eventfd write, and a
//! panic inside shmem-ipc caused by a peer that changes the ring's count under
//! us (a debug-build subtraction overflow) becomes an error, not a crash.

use crate::frame::{Budget, ByteSource, Decoder, FrameError, Item, OutFrame};
use crate::sys;
use crate::Error;
use shmem_ipc::sharedring::{Receiver, Sender};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Runs one shmem-ipc ring operation, turning both its errors and its panics
/// into [`Error::Corrupt`] and latching the ring as broken.
fn guarded<T>(
    broken: &mut bool,
    f: impl FnOnce() -> Result<T, shmem_ipc::ringbuf::Error>,
) -> Result<T, Error> {
    if *broken {
        return Err(Error::Corrupt("ring already found corrupt".into()));
    }
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            *broken = true;
            Err(Error::Corrupt(e.to_string()))
        }
        Err(_) => {
            *broken = true;
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

/// The sending half of one ring.
pub struct RingSender {
    ring: Sender<u8>,
    broken: bool,
}

impl RingSender {
    pub(crate) fn new(ring: Sender<u8>) -> Self {
        RingSender {
            ring,
            broken: false,
        }
    }

    /// Writes as much of `frame` as fits now; returns true once all of it is in the ring.
    pub fn write_frame<B: AsRef<[u8]>>(&mut self, frame: &mut OutFrame<B>) -> Result<bool, Error> {
        while !frame.is_done() {
            let ring = &mut self.ring;
            let status = guarded(&mut self.broken, || {
                ring.sender_mut().send(|ptr, room| {
                    // SAFETY: shmem-ipc passes a pointer writable for `room` bytes.
                    unsafe { frame.write_into(ptr, room) }
                })
            })?;
            if status.signal {
                sys::eventfd_signal(self.ring.empty_signal().as_fd()).map_err(Error::signal)?;
            }
            if status.remaining == 0 {
                break;
            }
        }
        Ok(frame.is_done())
    }

    /// Whether the ring has room for at least one byte.
    pub fn has_room(&mut self) -> Result<bool, Error> {
        let ring = &mut self.ring;
        guarded(&mut self.broken, || ring.sender_mut().write_count()).map(|n| n > 0)
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
    broken: bool,
}

impl RingReceiver {
    pub(crate) fn new(ring: Receiver<u8>, max_message: u32) -> Self {
        RingReceiver {
            ring,
            decoder: Decoder::new(max_message),
            broken: false,
        }
    }

    /// Returns the next complete frame, or `None` when the ring holds no complete frame yet.
    pub fn read_item(&mut self) -> Result<Option<Item>, Error> {
        loop {
            let mut item = None;
            let mut frame_error = None;
            let mut consumed = 0;
            let decoder = &mut self.decoder;
            let ring = &mut self.ring;
            let status = guarded(&mut self.broken, || {
                ring.receiver_mut().recv(|ptr, len| {
                    let src = SharedBytes { ptr, len };
                    match decoder.decode(&src) {
                        Ok((used, it)) => {
                            item = it;
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
                    self.broken = true;
                    return Err(Error::Protocol(e));
                }
                None => {}
            }
            if status.signal {
                sys::eventfd_signal(self.ring.full_signal().as_fd()).map_err(Error::signal)?;
            }
            if item.is_some() || consumed == 0 {
                return Ok(item);
            }
        }
    }

    /// Charges the memory the frame decoder takes for message bodies to `budget`.
    pub fn set_budget(&mut self, budget: Arc<dyn Budget>) {
        self.decoder.set_budget(budget);
    }

    /// The budget set by [`RingReceiver::set_budget`], if any.
    pub fn budget(&self) -> Option<Arc<dyn Budget>> {
        self.decoder.budget()
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

    /// The eventfd the writer writes when the ring stops being empty.
    pub fn data_signal(&self) -> BorrowedFd<'_> {
        self.ring.empty_signal().as_fd()
    }
}
