//! Echo round trips across every interesting size, with wrap-arounds.

use shmlink_tests::{payload, Harness};

#[test]
fn echo_round_trips_every_edge_size_byte_for_byte() {
    echo_edge_sizes(&Harness::start());
}

/// The body of `echo_round_trips_every_edge_size_byte_for_byte`, against any harness (shmlinkd or an embedded broker).
pub(crate) fn echo_edge_sizes(h: &Harness) {
    let client = h.client();
    let session = client
        .session("echo")
        .capacity(4096)
        .open()
        .expect("open echo");
    let cap = session.send_capacity() as usize;
    assert!(cap >= 4096, "capacity {cap} below what was asked");
    let sizes = [0, 1, 63, 64, 4095, 4096, cap - 1, cap, cap + 1, 10 * cap];
    let (mut w, mut r) = session.split();
    // Many rounds so the ring wraps at every offset pattern the sizes produce.
    let rounds = 25u64;
    let reader = std::thread::spawn(move || {
        let mut n = 0u64;
        for round in 0..rounds {
            for (i, &s) in sizes.iter().enumerate() {
                let got = r.recv().expect("recv").expect("echo ended early");
                let want = payload(round * 100 + i as u64, s);
                assert_eq!(got.len(), want.len(), "size of echo {round}/{i}");
                assert!(got == want, "echo {round}/{i} of {s} bytes differs");
                n += 1;
            }
        }
        assert_eq!(
            r.recv().expect("recv end"),
            None,
            "echo must end the stream after ours"
        );
        n
    });
    for round in 0..rounds {
        for (i, &s) in sizes.iter().enumerate() {
            w.send(&payload(round * 100 + i as u64, s)).expect("send");
        }
    }
    w.finish().expect("finish");
    assert_eq!(
        reader.join().expect("reader thread"),
        rounds * sizes.len() as u64
    );
}

#[test]
fn messages_above_the_maximum_are_refused_clearly() {
    let h = Harness::with_args(&["--max-message", "100000"]);
    let mut s = h
        .client()
        .session("echo")
        .capacity(4096)
        .open()
        .expect("open echo");
    assert_eq!(s.max_message(), 100_000);
    let err = s
        .send(&vec![0u8; 100_001])
        .expect_err("a message above max-message must be refused");
    assert!(
        err.to_string().contains("exceeds the session maximum"),
        "{err}"
    );
    // The session still works after the refusal.
    s.send(&[1, 2, 3]).expect("send after refusal");
    assert_eq!(s.recv().expect("recv"), Some(vec![1, 2, 3]));
}

#[test]
fn read_and_write_adapters_stream_bytes() {
    read_write_adapters(&Harness::start());
}

/// The body of `read_and_write_adapters_stream_bytes`, against any harness (shmlinkd or an embedded broker).
pub(crate) fn read_write_adapters(h: &Harness) {
    use std::io::{Read, Write};
    let session = h
        .client()
        .session("echo")
        .capacity(8192)
        .open()
        .expect("open echo");
    let (mut w, mut r) = session.split();
    let data = payload(7, 300_000);
    let expected = data.clone();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        r.read_to_end(&mut got).expect("read_to_end");
        got
    });
    w.write_all(&data).expect("write_all");
    w.finish().expect("finish");
    assert!(
        reader.join().expect("reader") == expected,
        "byte stream differs"
    );
}
