//! The committed C header must be what cbindgen makes of the sources now.
//! `SHMLINK_BLESS=1` rewrites it instead of failing.

use std::path::Path;

#[test]
fn committed_header_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .with_src(dir.join("src/error.rs"))
        .generate()
        .expect("cbindgen failed on capi/src")
        .write(&mut generated);
    let path = dir.join("include/shmlink.h");
    if std::env::var_os("SHMLINK_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("writing include/shmlink.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "capi/include/shmlink.h is out of date with capi/src: regenerate it with \
         `SHMLINK_BLESS=1 cargo test -p shmlink-capi --test header` and commit it"
    );
}
