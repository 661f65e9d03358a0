//! Bulk transfers: 1 GiB into sink, source verified, both directions at once.

use shmlink_interfaces::{option, source_pattern_byte};
use shmlink_tests::{payload, Harness};

#[test]
fn one_gib_into_sink_with_checksum() {
    let h = Harness::start();
    let session = h
        .client()
        .session("sink")
        .capacity(1 << 20)
        .open()
        .expect("open sink");
    let (mut w, mut r) = session.split();
    let block = payload(42, 64 * 1024);
    let total: u64 = 1 << 30;
    let mut crc = crc32fast::Hasher::new();
    let mut sent = 0u64;
    let mut i = 0u64;
    while sent < total {
        // Vary the message a little so a lost or repeated message changes the checksum.
        let mut m = block.clone();
        m[..8].copy_from_slice(&i.to_le_bytes());
        w.send(&m).expect("send");
        crc.update(&m);
        sent += m.len() as u64;
        i += 1;
    }
    w.finish().expect("finish");
    assert_eq!(r.recv().expect("end of stream"), None);
    let state = r.service_state().expect("ServiceState");
    assert_eq!(state.get("bytes").and_then(|v| v.0.as_u64()), Some(total));
    assert_eq!(state.get("messages").and_then(|v| v.0.as_u64()), Some(i));
    assert_eq!(
        state.get("crc32").and_then(|v| v.0.as_u64()),
        Some(u64::from(crc.finalize()))
    );
    let c = r.counters().expect("counters");
    assert_eq!(c.bytes_to_server, total);
    assert_eq!(c.messages_to_server, i);
}

#[test]
fn source_stream_is_verified_by_the_client() {
    source_stream(&Harness::start());
}

/// The body of `source_stream_is_verified_by_the_client`, against any harness (shmlinkd or an embedded broker).
pub(crate) fn source_stream(h: &Harness) {
    let mut s = h
        .client()
        .session("source")
        .capacity(16 * 1024)
        .option(option::MESSAGE_SIZE, 40_000u64)
        .option(option::COUNT, 300u64)
        .open()
        .expect("open source");
    let mut n = 0u64;
    while let Some(m) = s.recv().expect("recv") {
        assert_eq!(m.len(), 40_000);
        for (j, &b) in m.iter().enumerate() {
            assert_eq!(b, source_pattern_byte(n, j as u64), "message {n} byte {j}");
        }
        n += 1;
    }
    assert_eq!(n, 300);
}

#[test]
fn both_directions_at_once_do_not_deadlock() {
    both_directions(&Harness::start());
}

/// The body of `both_directions_at_once_do_not_deadlock`, against any harness (shmlinkd or an embedded broker).
pub(crate) fn both_directions(h: &Harness) {
    // A small ring and large messages force both rings to fill at the same time.
    let session = h
        .client()
        .session("echo")
        .capacity(4096)
        .open()
        .expect("open echo");
    let (mut w, mut r) = session.split();
    let count = 2000u64;
    let reader = std::thread::spawn(move || {
        let mut n = 0;
        while let Some(m) = r.recv().expect("recv") {
            assert!(
                m == payload(n, 1000 + (n as usize % 9000)),
                "message {n} differs"
            );
            n += 1;
        }
        n
    });
    for n in 0..count {
        w.send(&payload(n, 1000 + (n as usize % 9000)))
            .expect("send");
    }
    w.finish().expect("finish");
    assert_eq!(reader.join().expect("reader"), count);
}
