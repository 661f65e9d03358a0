//! An example provider: the `frames` service streams generated grey-scale
//! video frames to every client that opens it, each at its own pace (the
//! ring's backpressure paces the producer; nothing is dropped).
//!
//! A frame is a 16-byte header (width `u32`, height `u32`, index `u64`, all
//! little-endian) followed by `width × height` pixels, pixel `(x, y)` of
//! frame `i` being `(x + y + i) mod 256`, so a client can check every byte.
//! Options: `width` and `height` (default 320 × 240), `count` (frames to
//! send before the end of the stream, default 100).
//!
//! The `digest` service takes large inputs and answers: each message the
//! client sends comes back as its length (`u64`) and CRC-32 (`u32`), both
//! little-endian.

use shmlink_server::{
    Caller, Message, Options, Outbox, Piece, Service, ServiceError, SessionHandler,
};

/// The name clients open.
pub const SERVICE: &str = "frames";
/// Bytes before the pixels of each frame.
pub const HEADER: usize = 16;

/// The `frames` service.
pub struct Frames;

impl Service for Frames {
    fn name(&self) -> &str {
        SERVICE
    }

    fn open(
        &self,
        caller: &Caller,
        options: &Options,
    ) -> Result<Box<dyn SessionHandler>, ServiceError> {
        let width = options.u64("width")?.unwrap_or(320);
        let height = options.u64("height")?.unwrap_or(240);
        let count = options.u64("count")?.unwrap_or(100);
        let size = width
            .checked_mul(height)
            .and_then(|p| p.checked_add(HEADER as u64))
            .filter(|&s| {
                width > 0
                    && height > 0
                    && width <= u32::MAX.into()
                    && height <= u32::MAX.into()
                    && s <= options.max_message()
            })
            .ok_or_else(|| {
                ServiceError::InvalidOption(format!(
                    "a {width}×{height} frame does not fit a message of at most {} bytes",
                    options.max_message()
                ))
            })?;
        log::info!(
            "frames for {} (uid {}): {count} frame(s) of {width}×{height}",
            caller.bus_name,
            caller.uid
        );
        Ok(Box::new(Stream {
            width: width as u32,
            height: height as u32,
            size: size as usize,
            count,
            next: 0,
        }))
    }
}

/// One client's stream.
struct Stream {
    width: u32,
    height: u32,
    size: usize,
    count: u64,
    next: u64,
}

/// Writes frame `index` of `width × height` into `buf` (header and pixels).
pub fn render(width: u32, height: u32, index: u64, buf: &mut [u8]) {
    buf[0..4].copy_from_slice(&width.to_le_bytes());
    buf[4..8].copy_from_slice(&height.to_le_bytes());
    buf[8..16].copy_from_slice(&index.to_le_bytes());
    for (y, row) in buf[HEADER..].chunks_mut(width as usize).enumerate() {
        for (x, px) in row.iter_mut().enumerate() {
            *px = (x as u64 + y as u64 + index) as u8;
        }
    }
}

/// Writes one piece of frame `index` (the bytes `render` would put at the
/// piece's offset) straight into the ring, a stretch of a row at a time.
pub fn render_piece(width: u32, height: u32, index: u64, mut piece: Piece<'_>) {
    let mut header = [0u8; HEADER];
    header[0..4].copy_from_slice(&width.to_le_bytes());
    header[4..8].copy_from_slice(&height.to_le_bytes());
    header[8..16].copy_from_slice(&index.to_le_bytes());
    let (start, len) = (piece.offset(), piece.len());
    let mut at = 0;
    let mut row = [0u8; 4096];
    while at < len {
        let pos = start + at;
        if pos < HEADER {
            let n = (HEADER - pos).min(len - at);
            piece.write_at(at, &header[pos..pos + n]);
            at += n;
            continue;
        }
        let p = (pos - HEADER) as u64;
        let (x, y) = (p % u64::from(width), p / u64::from(width));
        let n = ((u64::from(width) - x) as usize)
            .min(len - at)
            .min(row.len());
        for (i, b) in row[..n].iter_mut().enumerate() {
            *b = (x + i as u64 + y + index) as u8;
        }
        piece.write_at(at, &row[..n]);
        at += n;
    }
}

impl SessionHandler for Stream {
    fn on_message(&mut self, _msg: Message<'_>, _out: &mut Outbox) -> Result<(), ServiceError> {
        Err(ServiceError::Protocol(
            "the frames service takes no input".into(),
        ))
    }

    fn on_end(&mut self, _out: &mut Outbox) -> Result<(), ServiceError> {
        Ok(())
    }

    fn wants_to_produce(&self) -> bool {
        true
    }

    fn produce(&mut self, out: &mut Outbox) -> Result<(), ServiceError> {
        if self.next >= self.count {
            out.finish();
            return Ok(());
        }
        let (w, h, i) = (self.width, self.height, self.next);
        out.send_with(self.size, move |piece| render_piece(w, h, i, piece))?;
        self.next += 1;
        Ok(())
    }
}

/// The name of the digest service.
pub const DIGEST: &str = "digest";

/// The `digest` service.
pub struct Digest;

impl Service for Digest {
    fn name(&self) -> &str {
        DIGEST
    }

    fn open(&self, _: &Caller, _: &Options) -> Result<Box<dyn SessionHandler>, ServiceError> {
        Ok(Box::new(DigestSession))
    }
}

struct DigestSession;

/// The answer `digest` gives for `msg`.
pub fn digest(msg: &[u8]) -> [u8; 12] {
    let mut d = [0u8; 12];
    d[..8].copy_from_slice(&(msg.len() as u64).to_le_bytes());
    d[8..].copy_from_slice(&crc32fast::hash(msg).to_le_bytes());
    d
}

impl SessionHandler for DigestSession {
    fn on_message(&mut self, msg: Message<'_>, out: &mut Outbox) -> Result<(), ServiceError> {
        out.send(digest(&msg).to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_carries_its_size_index_and_pixels() {
        let mut buf = vec![0u8; HEADER + 4 * 3];
        render(4, 3, 300, &mut buf);
        assert_eq!(u32::from_le_bytes(buf[0..4].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(buf[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(buf[8..16].try_into().unwrap()), 300);
        // Pixel (x=1, y=2) of frame 300: (1 + 2 + 300) mod 256 = 47.
        assert_eq!(buf[HEADER + 2 * 4 + 1], 47);
    }

    /// Written in place, piece by piece at any split, a frame is the one
    /// `render` makes.
    #[test]
    fn a_frame_written_in_pieces_is_the_rendered_frame() {
        let (w, h, i) = (1000, 7, 12);
        let mut whole = vec![0u8; HEADER + 1000 * 7];
        render(w, h, i, &mut whole);
        for piece in [1, 5, 16, 999, 4096, 10_000] {
            let got = shmlink_endpoint::frame::fill_to_vec(whole.len(), piece, |p| {
                render_piece(w, h, i, p)
            });
            assert!(got == whole, "pieces of {piece} bytes");
        }
    }
}
