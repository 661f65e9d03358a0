//! Gives the shared library its versioned soname, so programs linked against
//! `libshmlink.so` record `libshmlink.so.0` and keep working across
//! compatible upgrades.

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libshmlink.so.{major}");
    println!("cargo:rerun-if-changed=build.rs");
}
