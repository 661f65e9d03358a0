//! Writing messages in place and receiving into reused buffers, through the
//! real daemon, in both wake-up modes: what arrives is what was filled, the
//! sink's checksum agrees, and `source`'s in-place fills verify.

use shmlink::{Error, Piece, Wakeup};
use shmlink_interfaces::{option, source_pattern_byte};
use shmlink_tests::Harness;
use std::time::Duration;

/// The byte a fill writes at `offset` of message `index`.
fn byte(index: u64, offset: usize) -> u8 {
    (index as usize).wrapping_mul(131).wrapping_add(offset * 7) as u8
}

/// The fill of message `index`: writes `byte(index, offset)` at each offset.
fn fill(index: u64) -> impl FnMut(Piece<'_>) + Send + 'static {
    move |mut piece| {
        let at = piece.offset();
        let bytes: Vec<u8> = (at..at + piece.len()).map(|i| byte(index, i)).collect();
        piece.write_at(0, &bytes);
    }
}

fn modes() -> [Wakeup; 2] {
    [Wakeup::Park, Wakeup::Spin(Duration::from_micros(50))]
}

/// Messages of every size against a small ring, written in place, come
/// back from `echo` byte for byte into one reused buffer.
#[test]
fn messages_written_in_place_echo_back_into_a_reused_buffer() {
    let h = Harness::start();
    for wake in modes() {
        let mut s = h
            .client()
            .session("echo")
            .capacity(4096)
            .wakeup(wake)
            .timeout(Duration::from_secs(30))
            .open()
            .expect("open echo");
        let cap = s.send_capacity() as usize;
        let (mut w, mut r) = {
            // The sizes include messages larger than the ring, which only a
            // reader running at the same time lets through.
            s.set_timeout(Some(Duration::from_secs(30)));
            s.split()
        };
        let sizes = [0, 1, 100, cap - 8, cap, cap + 1, 5 * cap + 3];
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut got = 0u64;
            while r.recv_into(&mut buf).expect("recv_into") {
                let len = sizes[got as usize % sizes.len()];
                assert_eq!(buf.len(), len, "message {got}");
                assert!(
                    buf.iter().enumerate().all(|(i, &b)| b == byte(got, i)),
                    "message {got} arrived as filled"
                );
                got += 1;
            }
            (got, r)
        });
        let mut sent = 0u64;
        for _ in 0..20 {
            for &len in &sizes {
                w.send_with(len, fill(sent)).expect("send_with");
                sent += 1;
            }
        }
        w.finish().expect("finish");
        let (got, r) = reader.join().expect("reader");
        assert_eq!(got, sent, "{wake:?}");
        r.close().expect("close");
    }
}

/// The sink's checksum of messages written in place is the checksum of
/// what the fills wrote.
#[test]
fn the_sink_checksums_messages_written_in_place() {
    let h = Harness::start();
    for wake in modes() {
        let mut s = h
            .client()
            .session("sink")
            .capacity(64 << 10)
            .wakeup(wake)
            .open()
            .expect("open sink");
        let mut crc = crc32fast::Hasher::new();
        let (mut bytes, count) = (0u64, 200u64);
        for index in 0..count {
            let len = 1 + (index as usize * 977) % (200 << 10);
            let mut expected = vec![0u8; len];
            s.send_with(len, |mut piece| {
                let at = piece.offset();
                let part: Vec<u8> = (at..at + piece.len()).map(|i| byte(index, i)).collect();
                expected[at..at + part.len()].copy_from_slice(&part);
                piece.write_at(0, &part);
            })
            .expect("send_with");
            crc.update(&expected);
            bytes += len as u64;
        }
        s.finish().expect("finish");
        assert_eq!(s.recv().expect("end"), None);
        let state = s.service_state().expect("ServiceState");
        let get = |k: &str| state.get(k).and_then(|v| v.0.as_u64());
        assert_eq!(get("bytes"), Some(bytes), "{wake:?}");
        assert_eq!(get("messages"), Some(count));
        assert_eq!(get("crc32"), Some(u64::from(crc.finalize())));
        s.close().expect("close");
    }
}

/// `source` writes its messages in place on the daemon's side: each one,
/// received into a reused buffer, carries its verifiable pattern.
#[test]
fn source_messages_written_in_place_verify() {
    let h = Harness::start();
    for wake in modes() {
        let mut s = h
            .client()
            .session("source")
            .capacity(16 << 10)
            .wakeup(wake)
            .option(option::MESSAGE_SIZE, 70_001u64)
            .option(option::COUNT, 40u64)
            .open()
            .expect("open source");
        let mut buf = Vec::new();
        let mut n = 0u64;
        while s.recv_into(&mut buf).expect("recv_into") {
            assert_eq!(buf.len(), 70_001);
            assert!(
                buf.iter()
                    .enumerate()
                    .all(|(j, &b)| b == source_pattern_byte(n, j as u64)),
                "message {n} verifies"
            );
            n += 1;
        }
        assert_eq!(n, 40, "{wake:?}");
    }
}

/// A fill that panics mid-message stops the session's sending side; the
/// daemon sees a torn stream end only as that session's end.
#[test]
fn a_panicking_fill_leaves_the_session_unable_to_send() {
    let h = Harness::start();
    let mut s = h
        .client()
        .session("echo")
        .capacity(4096)
        .open()
        .expect("open echo");
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.send_with(10_000, |piece| {
            if piece.offset() > 0 {
                panic!("the fill gives up");
            }
        })
    }));
    assert!(panicked.is_err());
    let err = s.send(b"next").expect_err("no more sending");
    assert!(
        matches!(err, Error::Session(shmlink_endpoint::Error::HalfSent)),
        "{err}"
    );
    // Another session of the same client is untouched.
    let mut other = h.client().session("echo").open().expect("open");
    other.send(b"fine").expect("send");
    assert_eq!(other.recv().expect("recv").as_deref(), Some(&b"fine"[..]));
}

/// The async API writes in place too, and a `send_with` future dropped
/// part-way through its message keeps the fill: the rest goes out before
/// anything else, so the service never sees a torn frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_messages_written_in_place_and_a_dropped_send() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limit = Duration::from_secs(30);
    let h = Harness::start();
    let client = h.client();
    let mut s = client
        .session("echo")
        .capacity(4096)
        .open_async()
        .await
        .expect("open echo");
    let mut buf = Vec::new();
    for index in 0..50u64 {
        let len = (index as usize * 61) % 4000;
        tokio::time::timeout(limit, s.send_with(len, fill(index)))
            .await
            .expect("in time")
            .expect("send_with");
        assert!(tokio::time::timeout(limit, s.recv_into(&mut buf))
            .await
            .expect("in time")
            .expect("recv_into"));
        assert_eq!(buf.len(), len);
        assert!(buf.iter().enumerate().all(|(i, &b)| b == byte(index, i)));
    }
    // Nobody reads the echo: once an answer fills the ring back, echo
    // stops reading, and a message ten rings long cannot finish.
    let first = 10_000;
    tokio::time::timeout(limit, s.send_with(first, fill(6)))
        .await
        .expect("in time")
        .expect("a message echo takes whole");
    let big = 40_000;
    let dropped = tokio::time::timeout(Duration::from_millis(200), s.send_with(big, fill(7))).await;
    assert!(dropped.is_err(), "the message cannot finish while unread");
    // Finishing flushes the kept rest first; the echo reader sees it whole.
    let (mut rd, mut wr) = tokio::io::split(s);
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        rd.read_to_end(&mut all).await.expect("read");
        all
    });
    tokio::time::timeout(limit, wr.shutdown())
        .await
        .expect("in time")
        .expect("flush and finish");
    let all = tokio::time::timeout(limit, reader)
        .await
        .expect("in time")
        .expect("reader");
    assert_eq!(all.len(), first + big, "exactly the two messages came back");
    assert!(all[..first]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == byte(6, i)));
    assert!(all[first..]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == byte(7, i)));
}
