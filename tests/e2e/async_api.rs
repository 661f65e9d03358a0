//! The async API (feature `tokio`) against a real daemon: messages, byte
//! streams through `AsyncRead`/`AsyncWrite`, messages larger than the ring,
//! and a daemon that dies while a task waits.

use shmlink::Wakeup;
use shmlink_tests::{payload, Harness};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

/// Every await here finishes in milliseconds; this only turns a hang into a failure.
const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "current_thread")]
async fn async_echo_messages_and_end_of_stream() {
    let h = Harness::start();
    let client = h.client();
    let mut s = timeout(LIMIT, client.session("echo").capacity(4096).open_async())
        .await
        .expect("open in time")
        .expect("open echo");
    for i in 0..200u64 {
        let m = payload(i, (i as usize * 13) % 3000);
        timeout(LIMIT, s.send(&m))
            .await
            .expect("send in time")
            .expect("send");
        let back = timeout(LIMIT, s.recv())
            .await
            .expect("recv in time")
            .expect("recv");
        assert_eq!(back.as_deref(), Some(&m[..]), "message {i}");
    }
    timeout(LIMIT, s.finish())
        .await
        .expect("finish in time")
        .expect("finish");
    assert_eq!(
        timeout(LIMIT, s.recv())
            .await
            .expect("end in time")
            .expect("end"),
        None
    );
    assert!(
        s.send(b"late").await.is_err(),
        "sending after finish must fail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_byte_stream_larger_than_the_ring_in_spin_mode() {
    let h = Harness::start();
    let client = h.client();
    let s = client
        .session("echo")
        .capacity(4096)
        .wakeup(Wakeup::Spin(Duration::from_micros(20)))
        .open_async()
        .await
        .expect("open echo");
    // 1 MiB through a 4 KiB ring: writes and reads must interleave.
    let data = payload(7, 1 << 20);
    let (mut r, mut w) = tokio::io::split(s);
    let expected = data.clone();
    let writer = async move {
        for chunk in data.chunks(10_000) {
            w.write_all(chunk).await.expect("write");
        }
        w.shutdown().await.expect("shutdown");
    };
    let reader = async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read to end");
        got
    };
    let ((), got) = timeout(LIMIT, async { tokio::join!(writer, reader) })
        .await
        .expect("stream in time");
    assert!(
        got == expected,
        "echoed stream differs ({} bytes back)",
        got.len()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn async_sink_checksum_and_counters() {
    let h = Harness::start();
    let client = h.client();
    let mut s = client
        .session("sink")
        .capacity(8192)
        .open_async()
        .await
        .expect("open sink");
    let mut crc = crc32fast::Hasher::new();
    for i in 0..100u64 {
        let m = payload(i, 20_000);
        crc.update(&m);
        timeout(LIMIT, s.send(&m))
            .await
            .expect("send in time")
            .expect("send");
    }
    s.finish().await.expect("finish");
    assert_eq!(
        timeout(LIMIT, s.recv())
            .await
            .expect("end in time")
            .expect("end"),
        None
    );
    let state = s.service_state().await.expect("service state");
    assert_eq!(
        state.get("crc32").and_then(|v| v.0.as_u64()),
        Some(u64::from(crc.finalize()))
    );
    let c = s.counters().await.expect("counters");
    assert_eq!((c.messages_to_server, c.bytes_to_server), (100, 2_000_000));
    s.close().await.expect("close");
}

#[tokio::test(flavor = "current_thread")]
async fn async_waiter_sees_a_dead_daemon() {
    let mut h = Harness::start();
    let client = h.client();
    let mut s = client
        .session("echo")
        .capacity(4096)
        .open_async()
        .await
        .expect("open echo");
    let daemon = h.take_daemon();
    let waiting = tokio::spawn(async move { s.recv().await });
    daemon.kill().expect("kill shmlinkd");
    let r = timeout(LIMIT, waiting)
        .await
        .expect("woken in time")
        .expect("task");
    assert!(
        matches!(
            r,
            Err(shmlink::Error::Session(shmlink_endpoint::Error::Closed))
        ),
        "{r:?}"
    );
}
