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
    // A broker older than ListServices (or whose bus policy predates it)
    // lists its names only.
    let older = |e: &shmlink::Error| {
        matches!(
            e.dbus_name(),
            Some(
                "org.freedesktop.DBus.Error.UnknownMethod"
                    | "org.freedesktop.DBus.Error.AccessDenied"
            )
        )
    };
    let services = match client.list_services() {
        Ok(list) => list,
        Err(e) if older(&e) => client
            .services()?
            .into_iter()
            .map(|name| shmlink::ServiceEntry {
                name,
                provider: String::new(),
                uid: u32::MAX,
            })
            .collect(),
        Err(e) => return Err(e.into()),
    };
    let sessions = client.list_sessions()?;
    println!(
        "broker {} {version} at {} on the {bus}",
        client.broker_name(),
        client.broker_path()
    );
    println!("services: {}", services.len());
    println!("{:<24} {:<14} {:>6}", "SERVICE", "PROVIDER", "UID");
    for s in &services {
        let provider = if s.provider.is_empty() {
            "(built in)"
        } else {
            s.provider.as_str()
        };
        let uid = if s.uid == u32::MAX {
            "?".to_owned()
        } else {
            s.uid.to_string()
        };
        println!("{:<24} {:<14} {:>6}", s.name, provider, uid);
    }
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
