//! `shmlink demo`: everything in one command, on a private bus when none is given.

use crate::rate;
use anyhow::{ensure, Context, Result};
use shmlink::Bus;
use shmlink_interfaces::{option, service, source_pattern_byte};
use shmlink_test_support::{locate_daemon, DaemonProcess, PrivateBus};
use std::time::{Duration, Instant};

/// Arguments of `shmlink demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// MiB to stream into the sink.
    #[arg(long, default_value_t = 1024)]
    sink_mib: u64,
    /// Bytes per message for the sink transfer.
    #[arg(long, default_value_t = 64 * 1024)]
    message_size: usize,
}

pub fn run(bus: Option<Bus>, timeout: Duration, args: Args) -> Result<()> {
    ensure!(args.message_size > 0, "--message-size must be at least 1");
    // Keep the children alive for the whole demo; they stop on drop or below.
    let mut children = None;
    let bus = match bus {
        Some(b) => b,
        None => {
            let private = PrivateBus::start().context("cannot start a private dbus-daemon")?;
            println!(
                "started a private dbus-daemon (pid {}) at {}",
                private.pid(),
                private.address()
            );
            let program = locate_daemon()?;
            let daemon = DaemonProcess::start(&program, private.address(), &[])
                .with_context(|| format!("cannot start {}", program.display()))?;
            println!("started {} (pid {})", program.display(), daemon.pid());
            let b = private.bus();
            children = Some((private, daemon));
            b
        }
    };
    let client = crate::connect(&bus, timeout)?;
    println!(
        "shmlinkd {} serves: {}",
        client.version()?,
        client.services()?.join(", ")
    );

    // Echo: a few round trips, including one larger than the ring.
    let mut echo = client
        .session(service::ECHO)
        .capacity(64 * 1024)
        .timeout(timeout)
        .open()
        .context("cannot open an echo session")?;
    let greeting = b"hello through shared memory";
    let t = Instant::now();
    echo.send(greeting)?;
    let back = echo.recv()?.context("echo ended early")?;
    let rtt = t.elapsed();
    ensure!(back == greeting, "echo returned different bytes");
    println!(
        "echo: {:?} came back in {:.1} µs ({})",
        String::from_utf8_lossy(&back),
        rtt.as_secs_f64() * 1e6,
        echo.path()
    );
    let big: Vec<u8> = (0..(echo.send_capacity() * 3 + 7))
        .map(|i| (i % 253) as u8)
        .collect();
    let (mut w, mut r) = echo.split();
    let reader = std::thread::spawn(move || r.recv().map(|m| (m, r)));
    w.send(&big)?;
    let (m, r) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("echo reader panicked"))??;
    ensure!(
        m.as_deref() == Some(&big[..]),
        "echo returned a different large message"
    );
    println!(
        "echo: a {}-byte message (3× the ring) came back intact",
        big.len()
    );
    r.close()?;

    // Sink: stream and verify by checksum.
    let sink = client
        .session(service::SINK)
        .capacity(1 << 20)
        .timeout(timeout)
        .open()
        .context("cannot open a sink session")?;
    let (mut w, mut r) = sink.split();
    let total = args.sink_mib << 20;
    let msg: Vec<u8> = (0..args.message_size)
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    let mut crc = crc32fast::Hasher::new();
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(msg.len() as u64) as usize;
        w.send(&msg[..n])?;
        crc.update(&msg[..n]);
        sent += n as u64;
    }
    w.finish()?;
    ensure!(r.recv()?.is_none(), "sink sent data back");
    let secs = t.elapsed().as_secs_f64();
    let state = r.service_state()?;
    let got = state.get("crc32").and_then(|v| v.0.as_u64());
    ensure!(
        got == Some(u64::from(crc.finalize())),
        "sink checksum mismatch"
    );
    println!(
        "sink: {} MiB in {}-byte messages in {secs:.3} s = {}, checksum verified",
        args.sink_mib,
        args.message_size,
        rate(sent, secs)
    );
    r.close()?;

    // Source: the daemon streams a verifiable pattern to us.
    let mut src = client
        .session(service::SOURCE)
        .option(option::MESSAGE_SIZE, 65536u64)
        .option(option::COUNT, 256u64)
        .timeout(timeout)
        .open()
        .context("cannot open a source session")?;
    let t = Instant::now();
    let mut n = 0u64;
    while let Some(m) = src.recv()? {
        ensure!(
            m.iter()
                .enumerate()
                .all(|(i, &b)| b == source_pattern_byte(n, i as u64)),
            "source message {n} corrupt"
        );
        n += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "source: {n} messages of 64 KiB verified, {}",
        rate(n * 65536, secs)
    );
    src.close()?;

    if let Some((private, daemon)) = children {
        drop(client);
        let status = daemon.stop().context("cannot stop shmlinkd")?;
        ensure!(status.success(), "shmlinkd exited with {status}");
        private.stop().context("cannot stop the private bus")?;
        println!("stopped shmlinkd ({status}) and the private bus");
    }
    Ok(())
}
