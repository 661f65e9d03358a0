//! Message framing over a byte stream: pure code, no I/O, fuzzable.
//!
//! A frame is an 8-byte header followed by its payload:
//!
//! | offset | size | field                                            |
//! |--------|------|--------------------------------------------------|
//! | 0      | 4    | payload length, little-endian u32                |
//! | 4      | 4    | kind, little-endian u32: 0 message, 1 end-of-stream |
//!
//! An end-of-stream frame has length 0 and nothing may follow it. Frames are
//! written and read as a continuous byte stream: a header or payload may be
//! split anywhere, including across the ring's end. See
//! `interfaces/DATA-PLANE.md` for the normative description.

use std::mem::MaybeUninit;
use std::sync::Arc;

/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 8;
/// Header kind of an ordinary message.
pub const KIND_MESSAGE: u32 = 0;
/// Header kind of the end-of-stream marker.
pub const KIND_END: u32 = 1;

/// A violation of the framing rules by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announced a message above the session's maximum.
    #[error("frame announces {len} bytes, more than the session maximum of {max}")]
    TooLong {
        /// Announced length.
        len: u32,
        /// Session maximum.
        max: u32,
    },
    /// The header's kind field is not one this version knows.
    #[error("frame has unknown kind {0}")]
    UnknownKind(u32),
    /// An end-of-stream frame carried a non-zero length.
    #[error("end-of-stream frame carries {0} bytes")]
    EndWithPayload(u32),
    /// Bytes arrived after the end-of-stream frame.
    #[error("data after end of stream")]
    DataAfterEnd,
    /// Memory for the message body could not be had: the decoder's
    /// [`Budget`] refused the charge (its text names the limit) or the
    /// allocator failed. Not a framing violation: the peer may have sent a
    /// valid frame this side cannot hold.
    #[error("{0}")]
    NoMemory(String),
}

/// Memory a [`Decoder`] may take for message bodies. The decoder charges
/// every allocation before making it and releases the charge when the body
/// leaves it (handed out or dropped), so whoever owns the budget can bound
/// what a peer makes this side hold.
pub trait Budget: Send + Sync {
    /// Takes `bytes` from the budget, or says (naming the limit) why not.
    fn try_charge(&self, bytes: usize) -> Result<(), String>;
    /// Gives back `bytes` taken by an earlier successful [`Budget::try_charge`].
    fn release(&self, bytes: usize);
}

/// Encodes a header for a frame of `kind` carrying `len` payload bytes.
pub fn encode_header(kind: u32, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..].copy_from_slice(&kind.to_le_bytes());
    h
}

/// Bytes the decoder can copy out of: a slice, or memory a peer shares.
///
/// Implementations must copy; nobody may hold a reference into shared memory.
pub trait ByteSource {
    /// Number of bytes available.
    fn len(&self) -> usize;
    /// Whether no bytes are available.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `dst.len()` bytes starting at `offset` into `dst`.
    ///
    /// Callers guarantee `offset + dst.len() <= self.len()`.
    fn copy_to(&self, offset: usize, dst: &mut [MaybeUninit<u8>]);
}

impl ByteSource for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn copy_to(&self, offset: usize, dst: &mut [MaybeUninit<u8>]) {
        let src = &self[offset..offset + dst.len()];
        // SAFETY: `src` and `dst` have the same length, `dst` is exclusively
        // borrowed and cannot overlap the shared borrow `src`; u8 has no invalid values.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<u8>(), dst.len())
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A complete message.
    Message(Vec<u8>),
    /// The peer will send nothing more.
    End,
}

/// What [`Decoder::decode_into`] completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A complete message, now in the caller's buffer.
    Message,
    /// The peer will send nothing more.
    End,
}

/// A message body being received: the bytes so far, the announced length
/// and the bytes charged to the decoder's budget for its allocation.
#[derive(Debug)]
struct Body {
    bytes: Vec<u8>,
    want: usize,
    charged: usize,
}

/// First allocation for a message body; it then doubles up to the announced
/// length, so a header alone does not make the decoder hold its length.
const FIRST_BODY_CHUNK: usize = 1 << 20;

/// Largest buffer the decoder keeps between messages for the next body
/// (see [`Decoder::decode_into`]); a larger one is freed.
pub const MAX_SPARE: usize = FIRST_BODY_CHUNK;

/// Incremental frame decoder: feed it bytes in any split, get messages out.
///
/// Body memory is taken with `try_reserve` (an allocation failure is an
/// error, never an abort) and, with a [`Budget`], charged before it is taken.
/// A buffer the caller gives back through [`Decoder::decode_into`] is kept
/// (up to [`MAX_SPARE`] bytes, charged while kept) for the next body, so a
/// steady stream of messages allocates nothing.
pub struct Decoder {
    max_message: u32,
    header: [u8; HEADER_LEN],
    header_len: usize,
    body: Option<Body>,
    /// An empty buffer for the next body, and the bytes charged for it.
    spare: (Vec<u8>, usize),
    ended: bool,
    budget: Option<Arc<dyn Budget>>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("max_message", &self.max_message)
            .field("header_len", &self.header_len)
            .field("body", &self.body)
            .field("spare", &self.spare.0.capacity())
            .field("ended", &self.ended)
            .field("budget", &self.budget.is_some())
            .finish()
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        self.drop_body();
        self.drop_spare();
    }
}

impl Decoder {
    /// A decoder that refuses messages longer than `max_message` bytes.
    pub fn new(max_message: u32) -> Self {
        Decoder {
            max_message,
            header: [0; HEADER_LEN],
            header_len: 0,
            body: None,
            spare: (Vec::new(), 0),
            ended: false,
            budget: None,
        }
    }

    /// Charges every body allocation from now on to `budget`.
    pub fn set_budget(&mut self, budget: Arc<dyn Budget>) {
        self.drop_body();
        self.drop_spare();
        self.budget = Some(budget);
    }

    /// Drops a body being received and releases its charge.
    fn drop_body(&mut self) {
        if let Some(body) = self.body.take() {
            self.release(body.charged);
        }
    }

    /// Frees the kept buffer and releases its charge.
    fn drop_spare(&mut self) {
        let (_, charged) = std::mem::take(&mut self.spare);
        self.release(charged);
    }

    /// Keeps `buf` for the next body when it is small enough and the budget
    /// takes it, moving the charge from `released` (what the message that
    /// just left held) to the kept buffer in one step.
    fn keep_spare(&mut self, mut buf: Vec<u8>, released: usize) {
        buf.clear();
        let cap = buf.capacity();
        let keep = cap > 0 && cap <= MAX_SPARE && self.spare.0.capacity() == 0;
        if !keep {
            self.release(released);
            return;
        }
        match (&self.budget, cap.cmp(&released)) {
            (None, _) | (Some(_), std::cmp::Ordering::Equal) => {}
            (Some(_), std::cmp::Ordering::Less) => self.release(released - cap),
            (Some(b), std::cmp::Ordering::Greater) => {
                if b.try_charge(cap - released).is_err() {
                    self.release(released);
                    return;
                }
            }
        }
        self.spare = (buf, if self.budget.is_some() { cap } else { 0 });
    }

    fn release(&self, bytes: usize) {
        if let (Some(b), true) = (&self.budget, bytes > 0) {
            b.release(bytes);
        }
    }

    /// Makes room for `take` more bytes in the body, charging the growth
    /// first. The capacity doubles, capped at the announced length.
    fn grow(&mut self, take: usize) -> Result<(), FrameError> {
        let body = self.body.as_mut().expect("body present");
        let needed = body.bytes.len() + take;
        if needed <= body.bytes.capacity() {
            return Ok(());
        }
        let target = (body.bytes.capacity() * 2)
            .max(needed)
            .max(FIRST_BODY_CHUNK)
            .min(body.want);
        let extra = target - body.bytes.len();
        let growth = target.saturating_sub(body.charged);
        if let Some(b) = &self.budget {
            b.try_charge(growth).map_err(|m| {
                FrameError::NoMemory(format!("cannot hold a {}-byte message: {m}", body.want))
            })?;
        }
        if let Err(e) = body.bytes.try_reserve_exact(extra) {
            if let Some(b) = &self.budget {
                b.release(growth);
            }
            return Err(FrameError::NoMemory(format!(
                "cannot allocate {target} bytes for a message: {e}"
            )));
        }
        body.charged += growth;
        Ok(())
    }

    /// Whether the end-of-stream frame has been decoded.
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// Takes back a buffer a message was handed out in, to keep for the
    /// next body (charged, up to [`MAX_SPARE`]) or free: a caller that must
    /// not hold memory between messages gives each buffer back this way.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.keep_spare(buf, 0);
    }

    /// Consumes bytes from `src` up to the end of the next complete frame.
    ///
    /// Returns how many bytes were consumed and the frame, if one completed.
    /// Bytes after a completed frame are left for the next call. Each
    /// message comes in a new buffer; [`Decoder::decode_into`] reuses one.
    pub fn decode<S: ByteSource + ?Sized>(
        &mut self,
        src: &S,
    ) -> Result<(usize, Option<Item>), FrameError> {
        let mut out = Vec::new();
        Ok(match self.decode_into(src, &mut out)? {
            (used, Some(Received::Message)) => (used, Some(Item::Message(out))),
            (used, Some(Received::End)) => (used, Some(Item::End)),
            (used, None) => (used, None),
        })
    }

    /// Like [`Decoder::decode`], but a completed message replaces the
    /// contents of `out`, and the buffer `out` held is kept for the next
    /// message's body: a caller that passes the same buffer every time
    /// makes the decoder allocate nothing once both have grown to size.
    /// `out` is untouched until a message completes.
    pub fn decode_into<S: ByteSource + ?Sized>(
        &mut self,
        src: &S,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Option<Received>), FrameError> {
        let avail = src.len();
        let mut used = 0;
        if self.ended {
            return if avail == 0 {
                Ok((0, None))
            } else {
                Err(FrameError::DataAfterEnd)
            };
        }
        if self.body.is_none() {
            let take = (HEADER_LEN - self.header_len).min(avail);
            // SAFETY: `[u8]` and `[MaybeUninit<u8>]` have the same layout; we only write initialised bytes.
            let dst = unsafe {
                &mut *(&mut self.header[self.header_len..self.header_len + take] as *mut [u8]
                    as *mut [MaybeUninit<u8>])
            };
            src.copy_to(0, dst);
            self.header_len += take;
            used += take;
            if self.header_len < HEADER_LEN {
                return Ok((used, None));
            }
            self.header_len = 0;
            let len = u32::from_le_bytes(self.header[..4].try_into().expect("4 bytes"));
            let kind = u32::from_le_bytes(self.header[4..].try_into().expect("4 bytes"));
            match kind {
                KIND_END if len != 0 => return Err(FrameError::EndWithPayload(len)),
                KIND_END => {
                    self.ended = true;
                    return Ok((used, Some(Received::End)));
                }
                KIND_MESSAGE if len > self.max_message => {
                    return Err(FrameError::TooLong {
                        len,
                        max: self.max_message,
                    })
                }
                KIND_MESSAGE => {
                    let (bytes, charged) = std::mem::take(&mut self.spare);
                    self.body = Some(Body {
                        bytes,
                        want: len as usize,
                        charged,
                    });
                }
                other => return Err(FrameError::UnknownKind(other)),
            }
        }
        let (have, want) = {
            let body = self.body.as_ref().expect("body present after header");
            (body.bytes.len(), body.want)
        };
        let take = (want - have).min(avail - used);
        if take > 0 {
            self.grow(take)?;
            let body = &mut self.body.as_mut().expect("body present").bytes;
            let spare = &mut body.spare_capacity_mut()[..take];
            src.copy_to(used, spare);
            // SAFETY: `copy_to` initialised exactly `take` bytes after the current length.
            unsafe { body.set_len(body.len() + take) };
            used += take;
        }
        if have + take == want {
            let body = self.body.take().expect("body present");
            // The message leaves the decoder: whoever keeps it accounts for
            // it. The caller's old buffer stays as the next body's.
            let old = std::mem::replace(out, body.bytes);
            self.keep_spare(old, body.charged);
            return Ok((used, Some(Received::Message)));
        }
        Ok((used, None))
    }
}

/// A frame on its way into a ring, written piece by piece as the ring has room.
pub trait WriteFrame {
    /// Whether every byte has been written.
    fn is_done(&self) -> bool;

    /// Whether some, but not all, of the frame has been written: the stream
    /// is mid-frame and this frame must be finished before any other.
    fn is_partial(&self) -> bool;

    /// Writes the next unwritten bytes into `dst`, returning how many.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `room` bytes for the duration of
    /// the call, and no reference may point into those bytes meanwhile.
    unsafe fn write_into(&mut self, dst: *mut u8, room: usize) -> usize;
}

/// A frame being written: header plus payload, and how much of it is out.
#[derive(Debug)]
pub struct OutFrame<B> {
    header: [u8; HEADER_LEN],
    payload: B,
    written: usize,
}

impl<B: AsRef<[u8]>> OutFrame<B> {
    /// A message frame carrying `payload`. The caller checks the length limit.
    pub fn message(payload: B) -> Self {
        let len = u32::try_from(payload.as_ref().len()).expect("caller checks the message limit");
        OutFrame {
            header: encode_header(KIND_MESSAGE, len),
            payload,
            written: 0,
        }
    }

    /// Total bytes of the frame, header included.
    pub(crate) fn total_len(&self) -> usize {
        HEADER_LEN + self.payload.as_ref().len()
    }

    /// The same frame with an owned copy of its payload, keeping how much was
    /// written (so that an async sender whose future was dropped mid-frame
    /// can finish the frame later).
    pub fn into_owned(self) -> OutFrame<Vec<u8>> {
        OutFrame {
            header: self.header,
            payload: self.payload.as_ref().to_vec(),
            written: self.written,
        }
    }
}

impl<B: AsRef<[u8]>> WriteFrame for OutFrame<B> {
    fn is_done(&self) -> bool {
        self.written == self.total_len()
    }

    fn is_partial(&self) -> bool {
        self.written > 0 && !self.is_done()
    }

    unsafe fn write_into(&mut self, dst: *mut u8, room: usize) -> usize {
        let mut done = 0;
        while done < room && !self.is_done() {
            let (src, start): (&[u8], usize) = if self.written < HEADER_LEN {
                (&self.header, self.written)
            } else {
                (self.payload.as_ref(), self.written - HEADER_LEN)
            };
            let n = (src.len() - start).min(room - done);
            // SAFETY: `src[start..start + n]` is in bounds; the caller guarantees `dst`
            // is writable for `room` bytes and `done + n <= room`; our own memory
            // cannot overlap the destination the caller handed us.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(start), dst.add(done), n) };
            done += n;
            self.written += n;
        }
        done
    }
}

/// A stretch of a message being written in place, in the ring's shared
/// memory: see [`FillFrame`].
///
/// It offers only writes. The memory is mapped by the peer too, which may
/// change it at any moment; a view that let safe code read it back could
/// see a value change between a check and its use. Here the bytes are
/// `MaybeUninit<u8>`, which safe code can write but never read, so nothing
/// the writer does can depend on what the peer puts there. Bytes left
/// unwritten carry whatever the ring held before: earlier bytes of this
/// same session, never another session's (each session's rings are new,
/// zeroed memory).
pub struct Piece<'a> {
    offset: usize,
    bytes: &'a mut [MaybeUninit<u8>],
}

impl Piece<'_> {
    /// Where in the message this piece starts.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Length of this piece.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the piece is empty (never, for pieces a fill is given).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Copies `src` into the piece at `at`. Panics if it does not fit.
    pub fn write_at(&mut self, at: usize, src: &[u8]) {
        let dst = &mut self.bytes[at..at + src.len()];
        // SAFETY: `dst` and `src` have the same length; `src` is ours and
        // cannot overlap the ring memory `dst` points into; any byte is a
        // valid `MaybeUninit<u8>`.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<u8>(), src.len())
        }
    }

    /// Copies the piece's stretch of a whole message, `msg[offset..offset + len]`.
    pub fn copy_from_message(&mut self, msg: &[u8]) {
        let start = self.offset;
        let len = self.len();
        self.write_at(0, &msg[start..start + len]);
    }

    /// Sets every byte of the piece to `byte`.
    pub fn fill(&mut self, byte: u8) {
        for b in self.bytes.iter_mut() {
            b.write(byte);
        }
    }
}

/// Runs `fill` over `len` bytes of private memory, in pieces of at most
/// `piece_len` bytes, as a ring would take them: the message a fill writes,
/// for tests of fills and for callers that need it in memory as well.
pub fn fill_to_vec(len: usize, piece_len: usize, mut fill: impl FnMut(Piece<'_>)) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    for (i, chunk) in buf.chunks_mut(piece_len.max(1)).enumerate() {
        // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and a `Piece`
        // only ever stores initialised bytes (`write_at`, `fill`): it offers
        // no way to write an uninitialised one, so `buf` stays valid `u8`s.
        let bytes = unsafe { &mut *(chunk as *mut [u8] as *mut [MaybeUninit<u8>]) };
        fill(Piece {
            offset: i * piece_len.max(1),
            bytes,
        });
    }
    buf
}

/// A message frame whose payload a closure writes straight into the ring.
///
/// `fill` is called with each [`Piece`] of the payload in order (a message
/// may wrap around the ring's end, or be larger than the ring, so it comes
/// in pieces); together the pieces cover the payload exactly once.
pub struct FillFrame<F> {
    header: [u8; HEADER_LEN],
    len: usize,
    written: usize,
    fill: F,
}

impl<F: FnMut(Piece<'_>)> FillFrame<F> {
    /// A message frame of `len` payload bytes that `fill` writes. The caller
    /// checks the length limit.
    pub fn message(len: usize, fill: F) -> Self {
        let header_len = u32::try_from(len).expect("caller checks the message limit");
        FillFrame {
            header: encode_header(KIND_MESSAGE, header_len),
            len,
            written: 0,
            fill,
        }
    }
}

impl<F> std::fmt::Debug for FillFrame<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FillFrame")
            .field("len", &self.len)
            .field("written", &self.written)
            .finish()
    }
}

impl<F: FnMut(Piece<'_>)> WriteFrame for FillFrame<F> {
    fn is_done(&self) -> bool {
        self.written == HEADER_LEN + self.len
    }

    fn is_partial(&self) -> bool {
        self.written > 0 && !self.is_done()
    }

    unsafe fn write_into(&mut self, dst: *mut u8, room: usize) -> usize {
        let mut done = 0;
        if self.written < HEADER_LEN {
            let n = (HEADER_LEN - self.written).min(room);
            // SAFETY: the header range is in bounds; the caller guarantees
            // `dst` is writable for `room >= n` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(self.header.as_ptr().add(self.written), dst, n)
            };
            done += n;
            self.written += n;
        }
        let n = (HEADER_LEN + self.len - self.written).min(room - done);
        if self.written >= HEADER_LEN && n > 0 {
            // SAFETY: the caller guarantees `dst` is writable for `room` bytes
            // and that nothing else in this process refers to them during the
            // call; `done + n <= room`. A `MaybeUninit<u8>` slice has no
            // validity requirement, and safe code cannot read its values, so
            // the peer changing these bytes meanwhile cannot affect the fill
            // (see `Piece`).
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(dst.add(done).cast::<MaybeUninit<u8>>(), n)
            };
            (self.fill)(Piece {
                offset: self.written - HEADER_LEN,
                bytes,
            });
            done += n;
            self.written += n;
        }
        done
    }
}

impl OutFrame<&'static [u8]> {
    /// The end-of-stream frame.
    pub fn end() -> Self {
        OutFrame {
            header: encode_header(KIND_END, 0),
            payload: &[],
            written: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(msgs: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            out.extend_from_slice(&encode_header(KIND_MESSAGE, m.len() as u32));
            out.extend_from_slice(m);
        }
        out.extend_from_slice(&encode_header(KIND_END, 0));
        out
    }

    fn decode_all(bytes: &[u8], split: usize) -> Result<Vec<Item>, FrameError> {
        let mut d = Decoder::new(1 << 20);
        let mut items = Vec::new();
        for chunk in bytes.chunks(split.max(1)) {
            let mut off = 0;
            while off < chunk.len() {
                let (n, item) = d.decode(&chunk[off..])?;
                off += n;
                items.extend(item);
            }
        }
        Ok(items)
    }

    #[test]
    fn round_trip_in_every_split() {
        let big = vec![7u8; 3000];
        let msgs: Vec<&[u8]> = vec![b"", b"a", b"hello", &big];
        let bytes = encode(&msgs);
        for split in [1, 2, 3, 7, 8, 9, 64, 5000] {
            let items = decode_all(&bytes, split).unwrap();
            assert_eq!(items.len(), msgs.len() + 1, "split {split}");
            for (item, m) in items.iter().zip(&msgs) {
                assert_eq!(item, &Item::Message(m.to_vec()));
            }
            assert_eq!(items.last(), Some(&Item::End));
        }
    }

    /// A fill frame written in rooms of any size is, byte for byte, the
    /// frame `OutFrame` writes for the same payload, and the fill sees each
    /// payload byte exactly once, in order, whatever the split.
    #[test]
    fn a_fill_frame_in_every_split_is_the_copied_frame() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut expected = encode_header(KIND_MESSAGE, 3000).to_vec();
        expected.extend_from_slice(&payload);
        for room in [1, 2, 7, 8, 9, 64, 2999, 3008, 5000] {
            let mut next = 0;
            let mut frame = FillFrame::message(payload.len(), |mut piece: Piece<'_>| {
                assert_eq!(piece.offset(), next, "in order, room {room}");
                next += piece.len();
                piece.copy_from_message(&payload);
            });
            let mut wire = vec![0u8; expected.len() + room];
            let mut at = 0;
            while !frame.is_done() {
                assert!(!frame.is_partial() || at > 0);
                let n = room.min(wire.len() - at);
                // SAFETY: `wire[at..at + n]` is our own buffer, in bounds,
                // and nothing else refers to it during the call.
                at += unsafe { frame.write_into(wire.as_mut_ptr().add(at), n) };
            }
            assert_eq!(&wire[..at], &expected[..], "room {room}");
            assert_eq!(next, payload.len());
        }
    }

    #[test]
    fn refuses_bad_headers() {
        let mut d = Decoder::new(100);
        assert_eq!(
            d.decode(&encode_header(KIND_MESSAGE, 101)[..]),
            Err(FrameError::TooLong { len: 101, max: 100 })
        );
        let mut d = Decoder::new(100);
        assert_eq!(
            d.decode(&encode_header(7, 1)[..]),
            Err(FrameError::UnknownKind(7))
        );
        let mut d = Decoder::new(100);
        assert_eq!(
            d.decode(&encode_header(KIND_END, 1)[..]),
            Err(FrameError::EndWithPayload(1))
        );
        let mut d = Decoder::new(100);
        assert_eq!(
            d.decode(&encode_header(KIND_END, 0)[..]).unwrap(),
            (8, Some(Item::End))
        );
        assert_eq!(d.decode(&[0u8][..]), Err(FrameError::DataAfterEnd));
    }

    /// A budget with a limit that records what is charged now.
    #[derive(Default)]
    struct TestBudget {
        limit: usize,
        used: std::sync::Mutex<usize>,
    }

    impl Budget for TestBudget {
        fn try_charge(&self, bytes: usize) -> Result<(), String> {
            let mut used = self.used.lock().unwrap();
            if *used + bytes > self.limit {
                return Err(format!("test limit of {}", self.limit));
            }
            *used += bytes;
            Ok(())
        }
        fn release(&self, bytes: usize) {
            *self.used.lock().unwrap() -= bytes;
        }
    }

    fn used(b: &TestBudget) -> usize {
        *b.used.lock().unwrap()
    }

    fn framed(msg: &[u8]) -> Vec<u8> {
        let mut bytes = encode_header(KIND_MESSAGE, msg.len() as u32).to_vec();
        bytes.extend_from_slice(msg);
        bytes
    }

    /// The buffer a caller gives back through `decode_into` becomes the next
    /// body, charged while the decoder keeps it; dropping the decoder gives
    /// the charge back, and a buffer above the bound is not kept.
    #[test]
    fn a_returned_buffer_is_kept_charged_and_reused() {
        let budget = Arc::new(TestBudget {
            limit: 8 << 20,
            ..Default::default()
        });
        let mut d = Decoder::new(8 << 20);
        d.set_budget(budget.clone());
        let mut out = Vec::with_capacity(4096);
        let kept = out.as_ptr() as usize;
        let first = framed(&[1u8; 1000]);
        assert_eq!(
            d.decode_into(&first[..], &mut out).unwrap(),
            (first.len(), Some(Received::Message))
        );
        assert_eq!(out, [1u8; 1000]);
        assert_eq!(used(&budget), 4096, "the kept buffer is charged");
        let second = framed(&[2u8; 3000]);
        d.decode_into(&second[..], &mut out).unwrap();
        assert_eq!(out, [2u8; 3000]);
        assert_eq!(out.as_ptr() as usize, kept, "the kept buffer carried it");
        assert_eq!(
            used(&budget),
            1000,
            "the first message's buffer is kept now, charged as what it holds"
        );
        drop(d);
        assert_eq!(used(&budget), 0, "dropping the decoder gives it all back");

        let mut d = Decoder::new(8 << 20);
        d.set_budget(budget.clone());
        let mut out = Vec::with_capacity(MAX_SPARE + 1);
        d.decode_into(&first[..], &mut out).unwrap();
        assert_eq!(used(&budget), 0, "a buffer above the bound is freed");
        // A budget that cannot take the buffer frees it instead.
        let tight = Arc::new(TestBudget {
            limit: 100,
            ..Default::default()
        });
        let mut d = Decoder::new(8 << 20);
        d.set_budget(tight.clone());
        let mut out = Vec::with_capacity(4096);
        let small = framed(&[3u8; 50]);
        d.decode_into(&small[..], &mut out).unwrap();
        assert_eq!(out, [3u8; 50]);
        assert_eq!(used(&tight), 0, "nothing kept beyond the budget");
    }

    #[test]
    fn body_memory_is_charged_as_it_grows_and_released_when_it_leaves() {
        let budget = Arc::new(TestBudget {
            limit: 5 << 20,
            ..Default::default()
        });
        let mut d = Decoder::new(8 << 20);
        d.set_budget(budget.clone());
        let len = 3 << 20;
        let msg = vec![5u8; len];
        let mut bytes = encode_header(KIND_MESSAGE, len as u32).to_vec();
        bytes.extend_from_slice(&msg);
        assert_eq!(d.decode(&bytes[..8]).unwrap(), (8, None));
        assert_eq!(used(&budget), 0, "a header alone holds nothing");
        assert_eq!(d.decode(&bytes[8..9]).unwrap(), (1, None));
        assert_eq!(used(&budget), FIRST_BODY_CHUNK, "the first chunk");
        let (n, item) = d.decode(&bytes[9..(1 << 20) + 9]).unwrap();
        assert_eq!((n, item), (1 << 20, None));
        assert_eq!(used(&budget), 2 << 20, "doubled");
        let (_, item) = d.decode(&bytes[(1 << 20) + 9..]).unwrap();
        match item {
            Some(Item::Message(m)) => {
                assert_eq!(m.capacity(), len, "doubling is capped at the length");
                assert_eq!(m, msg);
            }
            other => panic!("expected the message, got {other:?}"),
        }
        assert_eq!(used(&budget), 0, "handed out: no longer the decoder's");

        // A body that would pass the budget is refused before it is allocated.
        let mut big = encode_header(KIND_MESSAGE, 6 << 20).to_vec();
        big.extend(std::iter::repeat_n(1u8, 5 << 20));
        let mut off = 0;
        let err = loop {
            let end = (off + (1 << 20)).min(big.len());
            match d.decode(&big[off..end]) {
                Ok((n, None)) if n > 0 => off += n,
                Ok(other) => panic!("unexpected {other:?} at {off}"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(&err, FrameError::NoMemory(m) if m.contains("6291456-byte message: test limit")),
            "{err:?}"
        );
        assert_eq!(
            used(&budget),
            4 << 20,
            "what was granted stays charged while held"
        );
        drop(d);
        assert_eq!(
            used(&budget),
            0,
            "dropping the decoder releases a partial body"
        );
    }

    #[test]
    fn out_frame_writes_in_pieces() {
        let mut f = OutFrame::message(&b"payload"[..]);
        let mut buf = vec![0u8; f.total_len()];
        let mut off = 0;
        while !f.is_done() {
            let room = 3.min(buf.len() - off);
            // SAFETY: `buf[off..off + room]` is in bounds and writable.
            off += unsafe { f.write_into(buf.as_mut_ptr().add(off), room) };
        }
        let mut d = Decoder::new(100);
        assert_eq!(
            d.decode(&buf[..]).unwrap(),
            (15, Some(Item::Message(b"payload".to_vec())))
        );
    }
}
