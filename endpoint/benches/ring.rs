//! Criterion benchmarks of the data plane in one process: frames through a
//! ring pair between two threads (the whole path: framing, shmem-ipc, the
//! wake-up eventfds, decoding into a fresh Vec), against a single-thread
//! memcpy of the same sizes.
//!
//! `cargo bench -p shmlink-endpoint` (add `-- --quick` for a rough pass).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shmlink_endpoint::{Endpoint, Wakeup};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const SIZES: [usize; 4] = [64, 4 << 10, 64 << 10, 1 << 20];
const RING: u64 = 1 << 20;

/// A writer endpoint whose peer, on another thread, receives everything and
/// reports on `done` each time an empty message (a batch marker) arrives.
struct Pair {
    writer: Endpoint,
    done: mpsc::Receiver<u64>,
    reader: Option<JoinHandle<()>>,
}

impl Pair {
    fn new(wakeup: Wakeup) -> Pair {
        let (mut server, fds) =
            Endpoint::create_server(RING, 1 << 24, wakeup).expect("create rings");
        let writer = Endpoint::open_client(fds, 1 << 24, wakeup).expect("open rings");
        let (tx, done) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut bytes = 0u64;
            while let Ok(Some(m)) = server.recv() {
                if m.is_empty() {
                    if tx.send(bytes).is_err() {
                        return;
                    }
                    bytes = 0;
                } else {
                    bytes += m.len() as u64;
                }
            }
        });
        Pair {
            writer,
            done,
            reader: Some(reader),
        }
    }

    /// Sends `iters` messages and waits until the reader has decoded them all.
    fn run(&mut self, msg: &[u8], iters: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..iters {
            self.writer.send(msg).expect("send");
        }
        self.writer.send(&[]).expect("send marker");
        let got = self.done.recv().expect("reader alive");
        let elapsed = start.elapsed();
        assert_eq!(got, iters * msg.len() as u64);
        elapsed
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.writer.finish();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn ring_throughput(c: &mut Criterion) {
    for (label, wakeup) in [
        ("park", Wakeup::Park),
        ("spin", Wakeup::Spin(Duration::from_micros(50))),
    ] {
        let mut group = c.benchmark_group(format!("ring_two_threads_{label}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        let mut pair = Pair::new(wakeup);
        for size in SIZES {
            let msg: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_with_input(BenchmarkId::from_parameter(size), &msg, |b, msg| {
                b.iter_custom(|iters| pair.run(msg, iters))
            });
        }
        group.finish();
    }
}

fn memcpy(c: &mut Criterion) {
    let mut group = c.benchmark_group("memcpy_one_thread");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for size in SIZES {
        let src: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
        // A ring-sized destination walked through, as a ring writer does.
        let mut dst = vec![0u8; RING as usize + size];
        let mut off = 0;
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &src, |b, src| {
            b.iter(|| {
                dst[off..off + src.len()].copy_from_slice(std::hint::black_box(src));
                off = (off + src.len()) % RING as usize;
                std::hint::black_box(&mut dst);
            })
        });
    }
    group.finish();
}

/// The data-plane part of opening a session, without D-Bus: the server
/// creates the rings (memfds, eventfds, hang-up socket) and the client checks
/// every fd and maps both rings (64 KiB rings, as `shmlink bench` opens).
fn setup(c: &mut Criterion) {
    let mut group = c.benchmark_group("session_rings");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("create_server+open_client", |b| {
        b.iter(|| {
            let (server, fds) =
                Endpoint::create_server(64 << 10, 1 << 20, Wakeup::Park).expect("create");
            let client = Endpoint::open_client(fds, 1 << 20, Wakeup::Park).expect("open");
            (server, client)
        })
    });
    group.finish();
}

criterion_group!(benches, ring_throughput, memcpy, setup);
criterion_main!(benches);
