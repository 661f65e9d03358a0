//! With the `vendored` feature, refuses to build unless the C flags that the
//! vendored libdbus is compiled with define `HAVE_POLL`.
//!
//! The dbus crate's source build of libdbus leaves `HAVE_POLL` undefined, so
//! libdbus emulates poll() with select() and an `fd_set`: a process whose D-Bus
//! socket has an fd number of 1024 or more then writes past that `fd_set`
//! (crash, memory corruption). Build scripts see the same environment as the
//! libdbus-sys build script, so the flags checked here are the flags it uses.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_VENDORED").is_none() {
        return;
    }
    let target = env::var("TARGET").unwrap_or_default();
    let host = env::var("HOST").unwrap_or_default();
    let kind = if host == target { "HOST" } else { "TARGET" };
    // The variables the `cc` crate reads, lowest precedence first; it passes
    // the flags of all of them to the compiler in this order.
    let vars = [
        "CFLAGS".to_string(),
        format!("{kind}_CFLAGS"),
        format!("CFLAGS_{}", target.replace('-', "_")),
        format!("CFLAGS_{target}"),
    ];
    let mut have_poll = false;
    for var in &vars {
        println!("cargo:rerun-if-env-changed={var}");
        let Ok(value) = env::var(var) else { continue };
        let mut words = value.split_ascii_whitespace().peekable();
        while let Some(word) = words.next() {
            // `-DHAVE_POLL`, `-DHAVE_POLL=1`, `-D HAVE_POLL`; `-UHAVE_POLL` undoes it.
            let (flag, name) = match (word.get(..2), word.get(2..)) {
                (Some(flag), Some("")) => (flag, words.next().unwrap_or_default()),
                (Some(flag), Some(name)) => (flag, name),
                _ => continue,
            };
            let name = name.split('=').next().unwrap_or_default();
            if name == "HAVE_POLL" {
                match flag {
                    "-D" => have_poll = true,
                    "-U" => have_poll = false,
                    _ => {}
                }
            }
        }
    }
    if !have_poll {
        eprintln!(
            "error: the `vendored` feature of the shmlink crates builds libdbus from source, \
             which is only safe with CFLAGS=-DHAVE_POLL (without it libdbus uses select() and \
             corrupts memory once a D-Bus socket's fd number reaches 1024).\n\
             Add to your project's .cargo/config.toml:\n\n    [env]\n    CFLAGS = \"-DHAVE_POLL\"\n\n\
             (or add -DHAVE_POLL to the CFLAGS you export), or drop the `vendored` feature to \
             link the system libdbus (Debian: apt-get install libdbus-1-dev pkg-config)."
        );
        std::process::exit(1);
    }
}
