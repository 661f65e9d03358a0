//! A shmlink client built the way another project builds it: `shmlink` by
//! path with default features, no cargo configuration of its own.
//!
//! `shmlink-downstream ADDRESS BYTES` raises the soft fd limit, holds more
//! than 1024 open fds so that its D-Bus socket gets an fd number above 1023,
//! connects to the bus at ADDRESS (which must have a `shmlinkd`), opens an
//! `echo` session and streams BYTES through it, checking a CRC-32 of what
//! went out against what came back. It prints what it found, one `key: value`
//! per line, for tests/e2e/downstream.rs to check: the C flags its build saw,
//! the number of open fds, the D-Bus socket's fd number, the libdbus it runs
//! with, and the bytes and checksum echoed.
//!
//! Manual check that the guard in shmlink's `vendored` feature is needed:
//! `--features unguarded-vendored` links the dbus crate's source build of
//! libdbus, compiled without HAVE_POLL. Built that way (outside the shmlink
//! workspace, so without its CFLAGS) the same program crashes once its D-Bus
//! socket's fd number is 1024 or more; see the README, "Building".

use anyhow::{bail, ensure, Context, Result};
use std::fs::File;
use std::io::Write;
use std::thread;

/// How many fds to hold before connecting: more than `FD_SETSIZE` (1024).
const HELD_FDS: usize = 1100;
/// Ring capacity: small, so the stream wraps both rings many times.
const CAPACITY: u64 = 64 * 1024;
/// Largest message sent.
const MAX_MESSAGE: usize = 48 * 1024;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(address), Some(bytes)) = (args.next(), args.next()) else {
        bail!("usage: shmlink-downstream BUS-ADDRESS BYTES");
    };
    let bytes: u64 = bytes.parse().context("BYTES must be a number")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "build CFLAGS: {}", env!("DOWNSTREAM_BUILD_CFLAGS"))?;

    let limit = rlimit::increase_nofile_limit(4096).context("raise RLIMIT_NOFILE")?;
    ensure!(
        limit as usize > HELD_FDS + 64,
        "the fd limit is only {limit}; cannot hold {HELD_FDS} fds"
    );
    let held: Vec<File> = (0..HELD_FDS)
        .map(|i| File::open("/dev/null").with_context(|| format!("open /dev/null #{i}")))
        .collect::<Result<_>>()?;
    let open = std::fs::read_dir("/proc/self/fd")
        .context("list /proc/self/fd")?
        .count();
    writeln!(out, "open fds: {open}")?;

    let client = shmlink::Client::connect(&shmlink::Bus::Address(address.clone()))
        .with_context(|| format!("connect to {address}"))?;
    let sockets = socket_fds()?;
    writeln!(out, "D-Bus socket fds: {sockets:?}")?;
    ensure!(
        !sockets.is_empty() && sockets.iter().all(|&fd| fd >= 1024),
        "expected the D-Bus socket at fd 1024 or above, found sockets at {sockets:?}"
    );
    writeln!(out, "libdbus: {}", mapped_libdbus()?)?;

    let session = client
        .session("echo")
        .capacity(CAPACITY)
        .open()
        .context("open an echo session")?;
    let (mut tx, mut rx) = session.split();
    let sender = thread::spawn(move || -> Result<(u64, u32)> {
        let mut crc = crc32fast::Hasher::new();
        let mut sent = 0u64;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        while sent < bytes {
            let len = (next(&mut seed) as usize % MAX_MESSAGE + 1).min((bytes - sent) as usize);
            let msg: Vec<u8> = (0..len).map(|_| next(&mut seed) as u8).collect();
            tx.send(&msg).context("send")?;
            crc.update(&msg);
            sent += len as u64;
        }
        tx.finish().context("finish the stream")?;
        Ok((sent, crc.finalize()))
    });
    let mut crc = crc32fast::Hasher::new();
    let (mut received, mut messages) = (0u64, 0u64);
    while let Some(msg) = rx.recv().context("receive")? {
        crc.update(&msg);
        received += msg.len() as u64;
        messages += 1;
    }
    let (sent, sent_crc) = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sending thread panicked"))??;
    let received_crc = crc.finalize();
    ensure!(
        sent == received && sent_crc == received_crc,
        "sent {sent} bytes with crc32 {sent_crc:08x}, got back {received} with {received_crc:08x}"
    );
    // One more D-Bus call on the high fd.
    rx.close().context("close the session")?;
    writeln!(
        out,
        "echoed: {received} bytes in {messages} messages, crc32 {received_crc:08x}"
    )?;
    drop(held);
    Ok(())
}

/// xorshift64: a reproducible stream of message lengths and bytes.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The numbers of this process's open socket fds.
fn socket_fds() -> Result<Vec<i32>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").context("list /proc/self/fd")? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // the directory's own fd, closed by now
        };
        if target.to_string_lossy().starts_with("socket:") {
            if let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                fds.push(fd);
            }
        }
    }
    fds.sort_unstable();
    Ok(fds)
}

/// The shared libdbus this process has mapped, or a note that there is none
/// (a static, vendored build).
fn mapped_libdbus() -> Result<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").context("read /proc/self/maps")?;
    Ok(maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|path| path.contains("/libdbus-1.so"))
        .map_or_else(|| "none mapped (static)".to_string(), str::to_string))
}
