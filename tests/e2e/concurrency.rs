//! Many clients at once, each with its own sessions and data.

use shmlink_tests::{payload, Harness};

#[test]
fn eight_clients_each_with_their_own_sessions() {
    let h = Harness::start();
    let addr = h.bus();
    let threads: Vec<_> = (0..8u64)
        .map(|c| {
            let bus = addr.clone();
            std::thread::spawn(move || {
                let client = shmlink::Client::connect(&bus).expect("connect");
                // One echo session (verified replies) and one sink session (verified checksum).
                let echo = client
                    .session("echo")
                    .capacity(16 * 1024)
                    .open()
                    .expect("open echo");
                let (mut w, mut r) = echo.split();
                let reader = std::thread::spawn(move || {
                    for i in 0..500u64 {
                        let m = r.recv().expect("recv").expect("echo ended early");
                        assert!(
                            m == payload(c * 10_000 + i, (i as usize * 37) % 20_000),
                            "client {c} msg {i}"
                        );
                    }
                    assert_eq!(r.recv().expect("end"), None);
                });
                for i in 0..500u64 {
                    w.send(&payload(c * 10_000 + i, (i as usize * 37) % 20_000))
                        .expect("send");
                }
                w.finish().expect("finish");
                reader.join().expect("echo reader");

                let mut sink = client
                    .session("sink")
                    .capacity(64 * 1024)
                    .open()
                    .expect("open sink");
                let mut crc = crc32fast::Hasher::new();
                for i in 0..200u64 {
                    let m = payload(c * 777 + i, 50_000);
                    crc.update(&m);
                    sink.send(&m).expect("send to sink");
                }
                sink.finish().expect("finish sink");
                assert_eq!(sink.recv().expect("sink end"), None);
                let st = sink.service_state().expect("state");
                assert_eq!(
                    st.get("crc32").and_then(|v| v.0.as_u64()),
                    Some(u64::from(crc.finalize())),
                    "client {c}"
                );
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
}
