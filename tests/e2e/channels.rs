//! Named channels fan out between clients; a slow member slows nobody.

use shmlink_interfaces::{error, option};
use shmlink_tests::{payload, Harness};

fn join(c: &shmlink::Client, name: &str) -> shmlink::Session {
    c.session("channel")
        .capacity(64 * 1024)
        .option(option::CHANNEL, name.to_string())
        .open()
        .expect("join channel")
}

#[test]
fn every_member_but_the_sender_gets_every_message_in_order() {
    let h = Harness::start();
    let (a, b, c, other) = (h.client(), h.client(), h.client(), h.client());
    let mut pa = join(&a, "news");
    let mut sb = join(&b, "news");
    let mut sc = join(&c, "news");
    let mut elsewhere = join(&other, "sports");
    for i in 0..300u64 {
        pa.send(&payload(i, 1 + (i as usize * 97) % 5000))
            .expect("publish");
    }
    for (who, s) in [("b", &mut sb), ("c", &mut sc)] {
        for i in 0..300u64 {
            let m = s.recv().expect("recv").expect("channel ended early");
            assert!(
                m == payload(i, 1 + (i as usize * 97) % 5000),
                "{who} message {i} differs"
            );
        }
    }
    // The sender gets nothing back and another channel hears nothing.
    sb.send(b"from b").expect("b publishes");
    assert_eq!(sc.recv().expect("c recv"), Some(b"from b".to_vec()));
    assert_eq!(
        pa.recv().expect("a recv"),
        Some(b"from b".to_vec()),
        "a hears b, not itself"
    );
    assert!(
        elsewhere.try_recv().expect("try_recv").is_none(),
        "another channel must hear nothing"
    );
    let st = pa.service_state().expect("state");
    assert_eq!(st.get("members").and_then(|v| v.0.as_u64()), Some(3));
    assert_eq!(st.get("published").and_then(|v| v.0.as_u64()), Some(300));
    drop(sc);
    assert!(
        shmlink_tests::wait_until(shmlink_tests::DEADLINE, || {
            pa.service_state()
                .ok()
                .and_then(|s| s.get("members").and_then(|v| v.0.as_u64()))
                == Some(2)
        }),
        "a member that left must leave the channel"
    );
    elsewhere.send(b"x").expect("publish to an empty room");
}

#[test]
fn a_member_that_never_reads_does_not_stall_the_publisher() {
    let h = Harness::start();
    let (a, lazy, keen) = (h.client(), h.client(), h.client());
    let mut pa = join(&a, "firehose");
    let lazy_s = join(&lazy, "firehose");
    let keen_s = join(&keen, "firehose");
    let keen_path = keen_s.path().to_owned();
    let (_kw, mut kr) = keen_s.split();
    let count = 5000u64;
    // Message i carries i in its first 8 bytes, then a pattern.
    let msg = |i: u64| {
        let mut m = payload(i, 4096);
        m[..8].copy_from_slice(&i.to_le_bytes());
        m
    };
    let (expect_tx, expect_rx) = std::sync::mpsc::channel::<u64>();
    let reader = std::thread::spawn(move || {
        // A reader that keeps up may still lose messages when the publisher
        // outruns it; what it gets must be intact and in order. It learns how
        // many to expect once the publisher is done, so it waits in short steps.
        kr.set_timeout(Some(std::time::Duration::from_millis(20)));
        let (mut got, mut last, mut expected) = (0u64, None, None);
        while expected != Some(got) {
            if expected.is_none() {
                expected = expect_rx.try_recv().ok();
                if expected == Some(got) {
                    break;
                }
            }
            let m = match kr.recv() {
                Ok(m) => m.expect("ended early"),
                Err(e) if e.to_string().contains("timed out") => continue,
                Err(e) => panic!("keen recv: {e}"),
            };
            let i = u64::from_le_bytes(m[..8].try_into().unwrap());
            assert!(last.is_none_or(|l| i > l), "keen got {i} after {last:?}");
            assert!(m == msg(i), "keen message {i} differs");
            last = Some(i);
            got += 1;
        }
        got
    });
    // 5000 × 4 KiB = 20 MiB: more than the lazy member's ring and inbox hold.
    for i in 0..count {
        pa.send(&msg(i))
            .expect("the publisher must never block on a lazy member");
    }
    // Once our own end of stream comes back, every message was fanned out.
    pa.finish().expect("finish");
    assert_eq!(pa.recv().expect("publisher end"), None);
    let keen_dropped = {
        use dbus::blocking::stdintf::org_freedesktop_dbus::Properties;
        let _ = &keen;
        let conn = dbus::blocking::Connection::new_address(h.address()).expect("connect");
        let proxy = conn.with_proxy(
            shmlink_interfaces::BUS_NAME,
            &keen_path,
            shmlink::CALL_TIMEOUT,
        );
        let st: dbus::arg::PropMap = proxy
            .get(shmlink_interfaces::SESSION_INTERFACE, "ServiceState")
            .expect("keen's state (as root)");
        st.get("dropped")
            .and_then(|v| v.0.as_u64())
            .expect("keen's dropped counter")
    };
    expect_tx
        .send(count - keen_dropped)
        .expect("tell the reader");
    assert_eq!(reader.join().expect("keen reader"), count - keen_dropped);
    let st = lazy_s.service_state().expect("lazy state");
    let dropped = st.get("dropped").and_then(|v| v.0.as_u64()).unwrap_or(0);
    assert!(
        dropped > 0,
        "the lazy member should have lost messages, state {st:?}"
    );
    assert!(
        keen_dropped < dropped,
        "the reader that keeps up loses less ({keen_dropped} vs {dropped})"
    );
}

#[test]
fn a_channel_name_is_required() {
    let h = Harness::start();
    let e = match h.client().session("channel").open() {
        Ok(s) => panic!("joined {} without a channel name", s.path()),
        Err(e) => e,
    };
    assert_eq!(e.dbus_name(), Some(error::INVALID_OPTION), "{e}");
    assert!(e.to_string().contains("channel"), "{e}");
}
