//! Fuzz targets for the code that reads what a peer controls: the frame
//! decoder, and the ring reader and writer with the shared header (the
//! count) and the data overwritten by the "peer" between operations.
//!
//! The same functions run under cargo-fuzz (`fuzz/`, nightly, libFuzzer) and
//! on stable, in this crate's tests, over a fixed-seed stream of random
//! inputs for a bounded time ([`run_random`]). They panic on any broken
//! invariant, so a panic is a finding. Built for this crate's tests and
//! with the `fuzzing` feature (which `fuzz/` enables); not part of the stable API.

use crate::frame::{self, Decoder, Item, OutFrame, WriteFrame};
use crate::{Endpoint, Error, Wakeup};
use memmap2::{MmapOptions, MmapRaw};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Reads a little-endian number of `n` bytes from `data` at `*pos`, zero-padded.
fn take(data: &[u8], pos: &mut usize, n: usize) -> u64 {
    let mut v = 0u64;
    for i in 0..n {
        let b = data.get(*pos + i).copied().unwrap_or(0);
        v |= u64::from(b) << (8 * i);
    }
    *pos += n;
    v
}

/// Frame decoder: arbitrary bytes in arbitrary splits never panic, never
/// consume more than given, never stall, never yield a message over the
/// maximum; and honestly encoded messages, written by [`OutFrame`] in random
/// pieces, decode back exactly in any split.
pub fn frame_decoder(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let max = u32::from(data[0]) * 97 + u32::from(data[1]);
    let mut split = usize::from(data[2]) | 1;
    let body = &data[3..];

    // 1. Hostile bytes.
    let mut d = Decoder::new(max);
    let mut off = 0;
    while off < body.len() {
        let chunk = &body[off..(off + split).min(body.len())];
        match d.decode(chunk) {
            Ok((used, item)) => {
                assert!(
                    used <= chunk.len(),
                    "decoder consumed {used} of {}",
                    chunk.len()
                );
                assert!(
                    used > 0 || item.is_some(),
                    "decoder stalled on {} bytes",
                    chunk.len()
                );
                if let Some(Item::Message(m)) = &item {
                    assert!(
                        m.len() <= max as usize,
                        "message of {} bytes over max {max}",
                        m.len()
                    );
                }
                off += used;
            }
            Err(_) => break,
        }
        split = split.wrapping_mul(5).wrapping_add(3) % 97 + 1;
    }

    // 2. Honest round trip: the body, cut into messages by its own bytes.
    let mut msgs: Vec<&[u8]> = Vec::new();
    let mut rest = body;
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n).min(tail.len()).min(max as usize);
        msgs.push(&tail[..n]);
        rest = &tail[n..];
    }
    let mut wire = Vec::new();
    let mut room = split;
    for m in &msgs {
        let mut f = OutFrame::message(*m);
        while !f.is_done() {
            let start = wire.len();
            wire.resize(start + room, 0);
            // SAFETY: `wire[start..start + room]` was just allocated and is writable.
            let n = unsafe { f.write_into(wire.as_mut_ptr().add(start), room) };
            wire.truncate(start + n);
            room = room % 13 + 1;
        }
    }
    wire.extend_from_slice(&frame::encode_header(frame::KIND_END, 0));
    let mut d = Decoder::new(max);
    let mut got = Vec::new();
    let mut off = 0;
    while off < wire.len() {
        let chunk = &wire[off..(off + split).min(wire.len())];
        let (used, item) = d.decode(chunk).expect("honest frames decode");
        off += used;
        got.extend(item);
        split = split % 31 + 1;
    }
    assert_eq!(got.pop(), Some(Item::End));
    assert_eq!(got.len(), msgs.len());
    for (g, m) in got.iter().zip(&msgs) {
        assert_eq!(g, &Item::Message(m.to_vec()));
    }
}

/// Bytes before a ring's data area (the shared count and padding).
const HEADER: usize = shmlink_interfaces::RING_HEADER as usize;

/// A memfd mapped shared, as the peer would map it.
struct Peer {
    map: MmapRaw,
}

impl Peer {
    fn map(fd: BorrowedFd<'_>) -> Peer {
        // The whole file (memmap2 takes its length from fstat), read-write, shared.
        let map = MmapOptions::new().map_raw(&fd).expect("mmap the ring");
        Peer { map }
    }

    /// Bytes the data area holds: the mapping after the ring header.
    fn data_len(&self) -> usize {
        self.map.len() - HEADER
    }

    fn count(&self) -> &AtomicUsize {
        // SAFETY: the mapping is page-aligned, at least a page long, and lives
        // as long as `self`; the count is an atomic that both sides only access
        // atomically.
        unsafe { &*self.map.as_mut_ptr().cast::<AtomicUsize>() }
    }

    /// Copies `bytes` into the data area at `offset` (wrapping around the ring).
    fn poke(&self, offset: usize, bytes: &[u8]) {
        let data = self.data_len();
        let base = self.map.as_mut_ptr();
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: `HEADER + (offset + i) % data < map.len()`, so the byte
            // is inside our mapping; volatile because the ring reads it through
            // its own mapping of the same memory.
            unsafe { base.add(HEADER + (offset + i) % data).write_volatile(*b) };
        }
    }
}

/// Ring reader and writer against a peer that rewrites the shared count and
/// data between operations: nothing panics, every message is within the
/// maximum, and once a ring is found corrupt it stays refused.
pub fn ring_reader(data: &[u8]) {
    let max_message = 600;
    let (mut ep, fds) =
        Endpoint::create_server(64, max_message, Wakeup::Park).expect("create rings");
    use std::os::fd::AsFd;
    let inbound = Peer::map(fds.to_server.memfd.as_fd());
    let outbound = Peer::map(fds.to_client.memfd.as_fd());
    let ring_len = inbound.data_len();
    // Where an honest peer would write next, to mix valid frames with garbage.
    let mut honest_pos = 0usize;
    let (mut rx_broken, mut tx_broken) = (false, false);
    let mut pos = 0;
    while pos < data.len() {
        let op = data[pos];
        pos += 1;
        match op % 9 {
            0 => {
                let off = take(data, &mut pos, 2) as usize;
                let n = take(data, &mut pos, 1) as usize;
                let end = (pos + n).min(data.len());
                inbound.poke(off, &data[pos.min(end)..end]);
                pos = end;
            }
            1 => inbound
                .count()
                .store(take(data, &mut pos, 8) as usize, Ordering::SeqCst),
            2 => inbound.count().store(
                take(data, &mut pos, 2) as usize % (ring_len + 2),
                Ordering::SeqCst,
            ),
            3 => {
                // An honest frame, written where the reader expects it.
                let n = take(data, &mut pos, 2) as usize % (max_message as usize + 50);
                let count = inbound.count().load(Ordering::SeqCst);
                let mut f = frame::encode_header(frame::KIND_MESSAGE, n as u32).to_vec();
                f.resize(8 + n, op);
                if count <= ring_len && f.len() <= ring_len - count {
                    inbound.poke(honest_pos, &f);
                    honest_pos = (honest_pos + f.len()) % ring_len;
                    inbound.count().fetch_add(f.len(), Ordering::SeqCst);
                }
            }
            4 | 5 => match ep.ring_receiver().read_item() {
                Ok(Some(Item::Message(m))) => {
                    assert!(!rx_broken, "a corrupt ring yielded a message");
                    assert!(
                        m.len() <= max_message as usize,
                        "message of {} bytes over the maximum",
                        m.len()
                    );
                }
                Ok(_) => assert!(!rx_broken, "a corrupt ring was read again"),
                Err(Error::Corrupt(_) | Error::Protocol(_)) => rx_broken = true,
                Err(e) => panic!("unexpected reader error {e}"),
            },
            6 => {
                let r = ep.ring_receiver().has_data();
                assert!(!(rx_broken && r.is_ok()), "a corrupt ring was read again");
            }
            7 => {
                let n = take(data, &mut pos, 2) as usize % (max_message as usize + 1);
                let mut f = OutFrame::message(vec![op; n]);
                match ep.ring_sender().write_frame(&mut f) {
                    Ok(_) => assert!(!tx_broken, "a corrupt ring was written again"),
                    Err(Error::Corrupt(_)) => tx_broken = true,
                    Err(Error::SignalFlooded) => {}
                    Err(e) => panic!("unexpected writer error {e}"),
                }
            }
            _ => outbound.count().store(
                take(data, &mut pos, 2) as usize % (ring_len + 2),
                Ordering::SeqCst,
            ),
        }
    }
}

/// Runs `target` on pseudo-random inputs (fixed `seed`, lengths up to
/// `max_len`) for `budget` or `max_runs` runs, whichever ends first; returns the runs done.
pub fn run_random(
    target: fn(&[u8]),
    seed: u64,
    max_len: usize,
    budget: Duration,
    max_runs: u64,
) -> u64 {
    let mut rng = fastrand::Rng::with_seed(seed);
    let end = Instant::now() + budget;
    let mut runs = 0;
    let mut input = Vec::with_capacity(max_len);
    while runs < max_runs && Instant::now() < end {
        input.clear();
        let len = rng.usize(..=max_len);
        // Mostly small numbers and repeated bytes, which reach deeper than uniform noise.
        let style = rng.u8(..3);
        for _ in 0..len {
            input.push(match style {
                0 => rng.u8(..),
                1 => rng.u8(..12),
                _ => {
                    if rng.u8(..4) == 0 {
                        rng.u8(..)
                    } else {
                        rng.u8(..16)
                    }
                }
            });
        }
        target(&input);
        runs += 1;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Duration {
        let secs = std::env::var("SHMLINK_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2);
        Duration::from_secs(secs)
    }

    #[test]
    fn frame_decoder_on_random_inputs() {
        let runs = run_random(frame_decoder, 0x5eed_f00d, 4096, budget(), u64::MAX);
        assert!(runs > 100, "only {runs} runs");
    }

    #[test]
    fn ring_reader_on_random_inputs() {
        let runs = run_random(ring_reader, 0xdead_beef, 2048, budget(), u64::MAX);
        assert!(runs > 100, "only {runs} runs");
    }
}
