//! Dying peers: a SIGKILLed client's sessions vanish; a dead daemon wakes blocked clients.

use shmlink_tests::{cli_binary, payload, wait_until, Harness, DEADLINE};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn killed_client_sessions_vanish_and_others_are_unaffected() {
    let h = Harness::start();
    let baseline = h.session_count();

    // An honest client streaming through echo the whole time.
    let bus = h.bus();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let honest = std::thread::spawn(move || {
        let client = shmlink::Client::connect(&bus).expect("connect");
        let mut s = client
            .session("echo")
            .capacity(8192)
            .open()
            .expect("open echo");
        let mut n = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            let m = payload(n, 3000 + (n as usize % 5000));
            s.send(&m).expect("honest send");
            assert!(
                s.recv().expect("honest recv").as_deref() == Some(&m[..]),
                "honest echo {n} differs"
            );
            n += 1;
        }
        n
    });

    // A CLI client streaming stdin into sink, killed mid-stream.
    let mut child = Command::new(cli_binary())
        .args(["--bus", h.address(), "send", "sink"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn shmlink send");
    let mut stdin = child.stdin.take().expect("stdin");
    let feeder = std::thread::spawn(move || {
        let block = vec![7u8; 65536];
        while stdin.write_all(&block).is_ok() {}
    });
    assert!(
        wait_until(DEADLINE, || h.session_count() >= baseline + 2),
        "the CLI client's session never appeared"
    );
    child.kill().expect("SIGKILL the client");
    child.wait().expect("reap the client");
    feeder.join().expect("feeder");
    assert!(
        wait_until(DEADLINE, || h.session_count() == baseline + 1),
        "the killed client's session did not vanish (count {})",
        h.session_count()
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = honest.join().expect("honest client");
    assert!(rounds > 0);
    assert!(
        h.daemon_log().contains("client hung up") || h.daemon_log().contains("owner left the bus")
    );
}

#[test]
fn dead_daemon_wakes_a_blocked_receiver_with_an_error() {
    let mut h = Harness::start();
    let mut s = h
        .client()
        .session("echo")
        .capacity(8192)
        .open()
        .expect("open echo");
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let r = s.recv();
        tx.send(r.is_err()).expect("report");
        r
    });
    h.take_daemon().kill().expect("SIGKILL the daemon");
    let errored = rx
        .recv_timeout(DEADLINE)
        .expect("blocked recv did not return after the daemon died");
    assert!(errored, "recv must fail, not return data");
    let err = t.join().expect("thread").expect_err("recv error");
    assert!(
        err.to_string().contains("closed by the other side"),
        "{err}"
    );
}

#[test]
fn dead_daemon_wakes_a_blocked_sender_with_an_error() {
    let mut h = Harness::start();
    let mut s = h
        .client()
        .session("echo")
        .capacity(4096)
        .open()
        .expect("open echo");
    // Fill both rings: we never read, so echo stops reading and our send blocks.
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let m = vec![1u8; 1000];
        let r = loop {
            if let Err(e) = s.send(&m) {
                break e;
            }
        };
        tx.send(()).expect("report");
        r
    });
    // The sender must be blocked before the daemon dies: its ring stays full.
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "send should block while nobody reads"
    );
    h.take_daemon().kill().expect("SIGKILL the daemon");
    rx.recv_timeout(DEADLINE)
        .expect("blocked send did not return after the daemon died");
    let err = t.join().expect("thread");
    assert!(
        err.to_string().contains("closed by the other side"),
        "{err}"
    );
}

#[test]
fn closing_a_session_wakes_its_client() {
    let h = Harness::start();
    let client = h.client();
    let s = client
        .session("echo")
        .capacity(4096)
        .open()
        .expect("open echo");
    let path = s.path().to_owned();
    let (_w, mut r) = s.split();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(r.recv().map(|_| ()));
    });
    client.close_session(&path).expect("Close by the owner");
    let woke = rx
        .recv_timeout(DEADLINE)
        .expect("receiver not woken by Close");
    assert!(woke.is_err(), "recv after Close must fail");
    assert_eq!(h.session_count(), 0);
}
