//! `shmlink close PATH`: end a session (its owner or root only).

use anyhow::{Context, Result};
use shmlink::Bus;
use std::time::Duration;

/// Arguments of `shmlink close`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Object path of the session, as `shmlink status` lists it.
    path: String,
}

pub fn run(bus: &Bus, timeout: Duration, args: Args) -> Result<()> {
    let client = crate::connect(bus, timeout)?;
    client
        .close_session(&args.path)
        .with_context(|| format!("cannot close {}", args.path))?;
    println!("closed {}", args.path);
    Ok(())
}
