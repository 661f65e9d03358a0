//! `shmlink-frames-provider`: registers the `frames` service with a running
//! broker and serves it until SIGTERM or SIGINT.

use anyhow::{Context, Result};
use clap::Parser;
use shmlink_server::{signals, Bus, Names, Provider};
use std::os::fd::AsFd;
use std::sync::Arc;

/// Stream generated video frames to shmlink clients (`shmlink send frames`),
/// and digest what they send (`shmlink send digest FILE`).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Bus: session, system, or a D-Bus address.
    #[arg(long, default_value = "session", value_name = "session|system|ADDR")]
    bus: Bus,
    /// Well-known name of the broker to register with.
    #[arg(long, default_value = shmlink_interfaces::BUS_NAME, value_name = "BUS_NAME")]
    broker: String,
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    // Before any thread starts, so that every thread keeps the signals blocked.
    let stop = signals::termination_fd().context("cannot watch SIGTERM and SIGINT")?;
    let names = if args.broker == shmlink_interfaces::BUS_NAME {
        Names::default()
    } else {
        Names::new(&args.broker)?
    };
    let provider = Provider::builder(&args.bus)
        .broker(&names)
        .service(Arc::new(shmlink_frames_provider::Frames))
        .service(Arc::new(shmlink_frames_provider::Digest))
        .register()
        .with_context(|| {
            format!(
                "cannot offer the frames and digest services through {}",
                args.broker
            )
        })?;
    log::info!("serving frames and digest as {}", provider.unique_name());
    provider
        .run(Some(stop.as_fd()))
        .context("the provider stopped")
}
