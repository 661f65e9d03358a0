//! The example provider's command line. (Having an integration test here also
//! makes `cargo test --workspace` build the binary, which the end-to-end tests
//! and the real-systemd test run.)

use std::process::Command;

#[test]
fn an_unreachable_bus_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_shmlink-frames-provider"))
        .args(["--bus", "unix:path=/nonexistent/shmlink-test-bus"])
        .env("RUST_LOG", "off")
        .output()
        .expect("run shmlink-frames-provider");
    assert!(!out.status.success(), "it must fail without a bus");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot offer the frames and digest services"),
        "stderr: {stderr}"
    );
}
