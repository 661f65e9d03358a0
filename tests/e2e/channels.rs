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
        matches!(elsewhere.try_recv().expect("try_recv"), None),
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
    let (_kw, mut kr) = keen_s.split();
    let count = 5000u64;
    let reader = std::thread::spawn(move || {
        for i in 0..count {
            let m = kr.recv().expect("keen recv").expect("ended early");
            assert!(m == payload(i, 4096), "keen message {i} differs");
        }
    });
    // 5000 × 4 KiB = 20 MiB: more than the lazy member's ring and inbox hold.
    for i in 0..count {
        pa.send(&payload(i, 4096))
            .expect("the publisher must never block on a lazy member");
    }
    reader.join().expect("keen reader");
    let st = lazy_s.service_state().expect("lazy state");
    let dropped = st.get("dropped").and_then(|v| v.0.as_u64()).unwrap_or(0);
    assert!(
        dropped > 0,
        "the lazy member should have lost messages, state {st:?}"
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
