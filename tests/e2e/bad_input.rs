//! Bad input gets a specific D-Bus error, and the daemon keeps serving.

use shmlink_interfaces::{error, option};
use shmlink_tests::Harness;

fn assert_refused(r: Result<shmlink::Session, shmlink::Error>, name: &str, text: &str) {
    match r {
        Ok(s) => panic!("expected {name}, got session {}", s.path()),
        Err(e) => {
            assert_eq!(e.dbus_name(), Some(name), "{e}");
            assert!(
                e.to_string().contains(text),
                "error {e:?} should mention {text:?}"
            );
        }
    }
}

fn still_serves(h: &Harness) {
    let mut s = h
        .client()
        .session("echo")
        .capacity(4096)
        .open()
        .expect("daemon still serves");
    s.send(b"ok").expect("send");
    assert_eq!(s.recv().expect("recv"), Some(b"ok".to_vec()));
}

#[test]
fn open_session_refuses_bad_arguments_with_specific_errors() {
    let h = Harness::with_args(&["--max-capacity", "1048576"]);
    let c = h.client();
    assert_refused(c.session("nope").open(), error::UNKNOWN_SERVICE, "nope");
    assert_refused(
        c.session("echo").option("colour", 3u64).open(),
        error::INVALID_OPTION,
        "colour",
    );
    assert_refused(
        c.session("echo")
            .option(option::CAPACITY, "big".to_string())
            .open(),
        error::INVALID_OPTION,
        "capacity",
    );
    assert_refused(
        c.session("echo").option(option::CAPACITY, -5i64).open(),
        error::INVALID_OPTION,
        "negative",
    );
    assert_refused(
        c.session("echo").capacity(0).open(),
        error::INVALID_CAPACITY,
        "capacity 0",
    );
    assert_refused(
        c.session("echo").capacity(63).open(),
        error::INVALID_CAPACITY,
        "capacity 63",
    );
    assert_refused(
        c.session("echo").capacity(1_048_577).open(),
        error::INVALID_CAPACITY,
        "1048577",
    );
    assert_refused(
        c.session("echo")
            .option(option::WAKEUP, "nap".to_string())
            .open(),
        error::INVALID_OPTION,
        "nap",
    );
    assert_refused(
        c.session("echo")
            .option(option::WAKEUP, "spin".to_string())
            .option(option::SPIN_US, 1_000_000u32)
            .open(),
        error::INVALID_OPTION,
        "spin-us",
    );
    assert_refused(
        c.session("echo").option(option::SPIN_US, 10u32).open(),
        error::INVALID_OPTION,
        "spin-us",
    );
    assert_refused(
        c.session("source")
            .option(option::MESSAGE_SIZE, u64::MAX)
            .open(),
        error::INVALID_OPTION,
        "message-size",
    );
    assert_refused(
        c.session("echo").option(option::COUNT, 5u64).open(),
        error::INVALID_OPTION,
        "count",
    );
    // Nothing was half-created.
    assert_eq!(h.session_count(), 0);
    still_serves(&h);
}

/// Runs the `shmlink` CLI as the unprivileged user `nobody`.
fn cli_as_nobody(h: &Harness, args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(shmlink_tests::world_executable(&shmlink_tests::cli_binary()))
        .args(["--bus", h.address()])
        .args(args)
        .output()
        .expect("run setpriv (util-linux)")
}

#[test]
fn close_and_counters_are_for_the_owner_only() {
    let h = Harness::start();
    let owner = h.client();
    let s = owner.session("sink").capacity(4096).open().expect("open");
    // Another uid may not close it.
    let out = cli_as_nobody(&h, &["close", s.path()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "nobody closed root's session: {err}"
    );
    assert!(err.contains(error::ACCESS_DENIED), "{err}");
    assert_eq!(h.session_count(), 1, "the session must survive the attempt");
    // Another connection of the owner's uid that is not root is covered by the
    // owner check too; root (these tests' uid) may close any session.
    let props = owner
        .session_properties(s.path())
        .expect("owner reads all properties");
    assert_eq!(
        props
            .get("Service")
            .and_then(|v| v.0.as_str().map(str::to_owned))
            .as_deref(),
        Some("sink")
    );
    assert!(props.contains_key("BytesToServer"));
    owner.close_session(s.path()).expect("owner closes");
    assert_eq!(h.session_count(), 0);
    still_serves(&h);
}

#[test]
fn closing_a_missing_session_is_unknown_session() {
    let h = Harness::start();
    let c = h.client();
    let e = c
        .close_session("/org/shmlink/Broker1/session/999")
        .expect_err("no such session");
    assert_eq!(e.dbus_name(), Some(error::UNKNOWN_SESSION), "{e}");
    let s = c.session("echo").capacity(4096).open().expect("open");
    let path = s.path().to_owned();
    c.close_session(&path).expect("close");
    let e = c.close_session(&path).expect_err("closed twice");
    assert_eq!(e.dbus_name(), Some(error::UNKNOWN_SESSION), "{e}");
    still_serves(&h);
}
