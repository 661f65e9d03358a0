//! `shmlink ping`: is the broker there, and how fast does it answer?

use anyhow::{Context, Result};
use shmlink::Bus;
use std::time::{Duration, Instant};

/// Arguments of `shmlink ping`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Round trips through an echo session to time.
    #[arg(short = 'n', long, default_value_t = 100)]
    count: u32,
}

pub fn run(bus: &Bus, timeout: Duration, args: Args) -> Result<()> {
    let client = crate::connect(bus, timeout)?;
    let dbus_rtt = client
        .ping()
        .with_context(|| format!("shmlinkd does not answer on the {bus}"))?;
    let version = client
        .version()
        .context("cannot read the broker's Version")?;
    println!(
        "shmlinkd {version} on the {bus}: D-Bus ping {}",
        micros(dbus_rtt)
    );
    if args.count == 0 {
        return Ok(());
    }
    let mut session = client
        .session("echo")
        .capacity(64 * 1024)
        .timeout(timeout)
        .open()
        .context("cannot open an echo session")?;
    let msg = [0x5au8; 64];
    let mut times = Vec::with_capacity(args.count as usize);
    for i in 1..=args.count {
        let round = || format!("echo round trip {i} of {} failed", args.count);
        let t = Instant::now();
        session.send(&msg).with_context(round)?;
        let back = session
            .recv()
            .with_context(round)?
            .context("echo ended the stream early")?;
        times.push(t.elapsed());
        anyhow::ensure!(back == msg, "echo returned different bytes");
    }
    times.sort();
    println!(
        "{} echo round trips of 64 bytes through shared memory: min {}, median {}, max {}",
        times.len(),
        micros(times[0]),
        micros(times[times.len() / 2]),
        micros(times[times.len() - 1])
    );
    session.close().context("cannot close the session")?;
    Ok(())
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}
