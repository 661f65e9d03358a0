//! Records the C flags this build saw, so the program can show which cargo
//! configuration was in effect: shmlink's workspace sets CFLAGS=-DHAVE_POLL in
//! its .cargo/config.toml, and a downstream build must not depend on that.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let mut seen = Vec::new();
    for (key, value) in std::env::vars() {
        if key == "CFLAGS" || key.starts_with("CFLAGS_") || key.ends_with("_CFLAGS") {
            seen.push(format!("{key}={value}"));
        }
    }
    let target = std::env::var("TARGET").unwrap_or_default();
    for key in [
        "CFLAGS".to_string(),
        "HOST_CFLAGS".to_string(),
        "TARGET_CFLAGS".to_string(),
        format!("CFLAGS_{target}"),
        format!("CFLAGS_{}", target.replace('-', "_")),
    ] {
        println!("cargo:rerun-if-env-changed={key}");
    }
    seen.sort();
    let seen = if seen.is_empty() {
        "(none)".to_string()
    } else {
        seen.join(" ").replace('\n', " ")
    };
    println!("cargo:rustc-env=DOWNSTREAM_BUILD_CFLAGS={seen}");
}
