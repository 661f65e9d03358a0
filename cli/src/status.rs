//! `shmlink status`: the broker's services and sessions, like `ipcs`.

use anyhow::{Context, Result};
use shmlink::Bus;
use std::time::Duration;

/// Arguments of `shmlink status`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(bus: &Bus, timeout: Duration, _args: Args) -> Result<()> {
    let client = crate::connect(bus, timeout)?;
    let version = client
        .version()
        .with_context(|| format!("shmlinkd does not answer on the {bus}"))?;
    let services = client.services()?;
    let sessions = client.list_sessions()?;
    println!("shmlinkd {version} on the {bus}");
    println!("services: {}", services.join(", "));
    println!(
        "limits: ring capacity up to {} bytes, messages up to {} bytes",
        client.max_capacity()?,
        client.max_message_size()?
    );
    println!("sessions: {}", sessions.len());
    if !sessions.is_empty() {
        println!(
            "{:<36} {:<10} {:<12} {:>6} {:>8}",
            "PATH", "SERVICE", "OWNER", "UID", "PID"
        );
        for s in sessions {
            println!(
                "{:<36} {:<10} {:<12} {:>6} {:>8}",
                s.path, s.service, s.owner, s.uid, s.pid
            );
        }
    }
    Ok(())
}
