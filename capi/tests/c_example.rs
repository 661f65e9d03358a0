//! Installs the C library with `make install-lib` into a staging directory,
//! builds `examples/echo_poll.c` against the installed copy with
//! `cc $(pkg-config --cflags --libs shmlink)`, and runs it against a real
//! dbus-daemon and shmlinkd.

use shmlink_test_support::{locate_daemon, DaemonProcess, PrivateBus};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The directory cargo put this crate's libraries in (`target/<profile>`):
/// the test binary lives in its `deps/`.
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .ancestors()
        .nth(2)
        .expect("test binary in target/<profile>/deps")
        .to_path_buf();
    assert!(
        dir.join("libshmlink_capi.so").is_file(),
        "{} lacks libshmlink_capi.so (tests/run builds it: cargo build --workspace)",
        dir.display()
    );
    dir
}

/// Runs `cmd`, failing the test with its output unless it succeeds.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn example_builds_against_the_installed_library_and_echoes() {
    let capi = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = capi.parent().expect("workspace root");
    let stage = tempfile::tempdir().expect("tempdir");
    let stage = stage.path();

    run(Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(root)
        .arg("install-lib")
        .arg(format!("DESTDIR={}", stage.display()))
        .arg("PREFIX=/usr")
        .arg(format!("LIBDIR_SRC={}", build_dir().display())));
    let libdir = stage.join("usr/lib");
    for name in [
        "libshmlink.so",
        "libshmlink.so.0",
        "libshmlink.a",
        "pkgconfig/shmlink.pc",
    ] {
        assert!(
            libdir.join(name).exists(),
            "make install-lib did not install {name}"
        );
    }
    assert!(stage.join("usr/include/shmlink.h").is_file());

    // pkg-config reads the staged .pc; the sysroot maps its /usr paths into the stage.
    let flags = run(Command::new("pkg-config")
        .args(["--cflags", "--libs", "shmlink"])
        .env("PKG_CONFIG_PATH", libdir.join("pkgconfig"))
        .env("PKG_CONFIG_SYSROOT_DIR", stage));
    let flags = String::from_utf8(flags.stdout).expect("pkg-config output");
    assert!(flags.contains("-lshmlink"), "pkg-config said {flags}");
    let exe = stage.join("echo_poll");
    run(Command::new("cc")
        .args([
            "-std=c11",
            "-D_DEFAULT_SOURCE",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
        ])
        .arg(&exe)
        .arg(capi.join("examples/echo_poll.c"))
        .args(flags.split_whitespace()));

    // The program records the soname, not the development link.
    let dynamic = run(Command::new("readelf").arg("-d").arg(&exe));
    let dynamic = String::from_utf8_lossy(&dynamic.stdout);
    assert!(
        dynamic.contains("Shared library: [libshmlink.so.0]"),
        "echo_poll does not need libshmlink.so.0:\n{dynamic}"
    );

    let bus = PrivateBus::start().expect("dbus-daemon");
    let daemon = locate_daemon().expect("shmlinkd (cargo build -p shmlinkd)");
    let _shmlinkd = DaemonProcess::start(&daemon, bus.address(), &[]).expect("shmlinkd");
    let out = run(Command::new(&exe)
        .args([bus.address(), "200"])
        .env("LD_LIBRARY_PATH", &libdir));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bytes: usize = (0..200).map(|i| 97 * i).sum();
    assert!(
        stdout.contains("refused: org.shmlink.Error.UnknownService"),
        "{stdout}"
    );
    let summary = format!("echoed 200 messages, {bytes} bytes, buffer grown ");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&summary))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    let grown: u32 = line[summary.len()..]
        .trim_end_matches(" times")
        .parse()
        .expect("grow count");
    assert!(grown > 0, "the buffer never had to grow: {line}");
}
