//! The shmlink binary's command line. (Having an integration test here also
//! makes `cargo test --workspace` build `shmlink` for the end-to-end tests.)

use std::process::Command;

fn shmlink() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shmlink"))
}

#[test]
fn help_lists_the_subcommands() {
    let out = shmlink()
        .arg("--help")
        .output()
        .expect("run shmlink --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["demo", "ping", "send", "status"] {
        assert!(text.contains(cmd), "--help lacks {cmd}:\n{text}");
    }
}

#[test]
fn an_unreachable_bus_is_a_clear_error_and_a_failure() {
    let out = shmlink()
        .args(["--bus", "unix:path=/nonexistent/bus", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the bus at unix:path=/nonexistent/bus"),
        "{err}"
    );
    // Each cause once: the bus is named by one part of the message only.
    assert_eq!(
        err.matches("bus at unix:path=/nonexistent/bus").count(),
        1,
        "{err}"
    );
}

#[test]
fn a_timeout_that_is_not_positive_is_refused() {
    for bad in ["0", "-3", "soon"] {
        let out = shmlink()
            .args([&format!("--timeout={bad}"), "status"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--timeout {bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--timeout"), "{err}");
    }
}
