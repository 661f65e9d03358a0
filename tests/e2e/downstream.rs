//! shmlink used from another project: tests/downstream, a crate with its own
//! workspace that depends on `shmlink` by path, is built the way its authors
//! would build it (without this workspace's .cargo/config.toml and its
//! CFLAGS=-DHAVE_POLL) and run with more than 1024 open fds against a real
//! bus and daemon. It must link the system libdbus and stream through an
//! echo session from a D-Bus socket whose fd number is above 1023.

use shmlink_tests::Harness;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// What the downstream program streams through its echo session.
const BYTES: u64 = 24 << 20;
/// A cold build compiles the client library and its dependencies again.
const BUILD_DEADLINE: Duration = Duration::from_secs(30 * 60);
const RUN_DEADLINE: Duration = Duration::from_secs(120);

/// This workspace's root directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Copies tests/downstream to `dir`, pointing its path dependency at this
/// workspace's client and seeding its lock file with this workspace's, so it
/// builds the same dependency versions. Files are rewritten only when their
/// content changed, which keeps repeated builds incremental.
fn stage_crate(dir: &Path) {
    let root = workspace_root();
    let src = root.join("tests/downstream");
    let client = root.join("client");
    let manifest = std::fs::read_to_string(src.join("Cargo.toml")).expect("read Cargo.toml");
    let relative = r#"path = "../../client""#;
    assert!(
        manifest.contains(relative),
        "tests/downstream/Cargo.toml no longer has `{relative}`"
    );
    let absolute = format!("path = {:?}", client.to_str().expect("UTF-8 path"));
    let files = [
        ("Cargo.toml", manifest.replace(relative, &absolute)),
        (
            "Cargo.lock",
            std::fs::read_to_string(root.join("Cargo.lock")).expect("read Cargo.lock"),
        ),
        (
            "build.rs",
            std::fs::read_to_string(src.join("build.rs")).expect("read build.rs"),
        ),
        (
            "src/main.rs",
            std::fs::read_to_string(src.join("src/main.rs")).expect("read main.rs"),
        ),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("create dir");
            std::fs::write(&path, text).expect("write staged file");
        }
    }
}

/// Runs `cmd` with stdout and stderr captured to files, killing it after
/// `deadline`.
fn run_with_deadline(mut cmd: Command, logs: &Path, deadline: Duration) -> Output {
    let out_path = logs.with_extension("stdout");
    let err_path = logs.with_extension("stderr");
    let out = std::fs::File::create(&out_path).expect("create stdout log");
    let err = std::fs::File::create(&err_path).expect("create stderr log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let end = Instant::now() + deadline;
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {deadline:?}; output in {}",
                logs.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).expect("read stdout log"),
        stderr: std::fs::read(&err_path).expect("read stderr log"),
    }
}

/// The value of the `key: value` line `key` in `text`.
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
        .unwrap_or_else(|| panic!("no `{key}:` line in the program's output:\n{text}"))
}

#[test]
fn a_downstream_crate_links_the_system_libdbus_and_streams_from_a_high_fd() {
    // Under this workspace's target directory, so repeated runs are incremental.
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("downstream");
    let staged = base.join("crate");
    stage_crate(&staged);

    // Cargo reads configuration from the directory it runs in and its
    // parents, so building from outside this workspace leaves its
    // .cargo/config.toml out. The variables cargo set for this test process go
    // too (its [env] CFLAGS among them), and so do C flags of the environment:
    // the downstream build gets no HAVE_POLL from anywhere.
    let cwd = std::env::temp_dir();
    assert!(
        !cwd.starts_with(workspace_root()),
        "the temporary directory {} is inside the workspace; set TMPDIR elsewhere",
        cwd.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .current_dir(&cwd)
        .args(["build", "--quiet", "--manifest-path"])
        .arg(staged.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(base.join("target"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let cflags = key == "CFLAGS" || key.starts_with("CFLAGS_") || key.ends_with("_CFLAGS");
        let about_this_package = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || [
                "CARGO",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_DIR",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&&*key);
        if cflags || about_this_package {
            build.env_remove(&*key);
        }
    }
    let built = run_with_deadline(build, &base.join("build"), BUILD_DEADLINE);
    assert!(
        built.status.success(),
        "building tests/downstream failed ({}):\n{}",
        built.status,
        String::from_utf8_lossy(&built.stderr)
    );

    let h = Harness::start();
    let mut run = Command::new(base.join("target/debug/shmlink-downstream"));
    run.arg(h.address()).arg(BYTES.to_string());
    let ran = run_with_deadline(run, &base.join("run"), RUN_DEADLINE);
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "shmlink-downstream failed ({}):\n{stdout}{}",
        ran.status,
        String::from_utf8_lossy(&ran.stderr)
    );

    // Built without this workspace's configuration: no HAVE_POLL in its C flags.
    let cflags = field(&stdout, "build CFLAGS");
    assert!(
        !cflags.contains("HAVE_POLL"),
        "the workspace's CFLAGS reached the downstream build: {cflags}"
    );
    // Linked against the system's shared libdbus, not a static vendored copy.
    let libdbus = field(&stdout, "libdbus");
    assert!(
        libdbus.starts_with('/') && libdbus.contains("/libdbus-1.so"),
        "expected the system libdbus-1.so, found: {libdbus}"
    );
    let open: usize = field(&stdout, "open fds").parse().expect("open fds");
    assert!(open > 1024, "only {open} fds were open");
    let sockets = field(&stdout, "D-Bus socket fds");
    let lowest: i32 = sockets
        .trim_matches(['[', ']'])
        .split(',')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no socket fd in {sockets}"));
    assert!(lowest >= 1024, "D-Bus socket fds: {sockets}");
    let echoed = field(&stdout, "echoed");
    assert!(
        echoed.starts_with(&format!("{BYTES} bytes in ")),
        "echoed: {echoed}"
    );
}
