//! The shmlinkd binary's command line. (Having an integration test here also
//! makes `cargo test --workspace` build `shmlinkd` for the end-to-end tests.)

use std::process::Command;

fn shmlinkd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shmlinkd"))
}

#[test]
fn help_describes_the_bus_options() {
    let out = shmlinkd()
        .arg("--help")
        .output()
        .expect("run shmlinkd --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--session", "--system", "--address", "--config"] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
}

#[test]
fn a_bad_config_file_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("shmlinkd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[limits]\nmax_capacty = 5\n").unwrap();
    let out = shmlinkd()
        .args(["--address", "unix:path=/nonexistent", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_capacty"),
        "the error should name the bad key:\n{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreachable_bus_is_a_clear_error() {
    let out = shmlinkd()
        .args(["--address", "unix:path=/nonexistent/bus"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to the bus"), "{err}");
}
