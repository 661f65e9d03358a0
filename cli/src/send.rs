//! `shmlink send SERVICE [FILE]`: stream a file or stdin into a session.

use crate::{apply_options, parse_option, rate, OptValue};
use anyhow::{bail, Context, Result};
use shmlink::Bus;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Arguments of `shmlink send`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Service to open a session with (echo, sink, or another the daemon hosts).
    service: String,
    /// File to send; standard input when absent or `-`.
    file: Option<PathBuf>,
    /// Most bytes per message sent (a file is sent in chunks of this size;
    /// a terminal or pipe, as its data arrives).
    #[arg(long, default_value_t = 64 * 1024)]
    chunk: usize,
    /// Ring capacity in bytes.
    #[arg(long)]
    capacity: Option<u64>,
    /// Extra OpenSession option, KEY=VALUE (integers are sent as t). Repeatable.
    #[arg(short = 'o', long = "option", value_parser = parse_option)]
    options: Vec<(String, OptValue)>,
}

pub fn run(bus: &Bus, timeout: Duration, args: Args) -> Result<()> {
    if args.chunk == 0 {
        bail!("--chunk must be at least 1 byte");
    }
    let mut input: Box<dyn Read> = match &args.file {
        None => Box::new(std::io::stdin().lock()),
        Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdin().lock()),
        Some(p) => Box::new(
            std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
        ),
    };
    let client = crate::connect(bus, timeout)?;
    let mut builder = client.session(&args.service).timeout(timeout);
    if let Some(c) = args.capacity {
        builder = builder.capacity(c);
    }
    let session = apply_options(builder, &args.options)
        .open()
        .with_context(|| format!("cannot open a session with {:?}", args.service))?;
    let chunk = args.chunk.min(session.max_message() as usize);
    let is_sink = args.service == shmlink_interfaces::service::SINK;
    let (mut sender, mut receiver) = session.split();

    // When the input ended: from then on the service owes us the end of
    // its stream, and the receiver's timeout counts. Before, a service may
    // rightly stay silent for as long as the input takes (a sink, or a
    // terminal where nothing is typed).
    let finished_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let finished = finished_at.clone();

    // Whatever comes back goes to stdout, concurrently with sending.
    let printer = std::thread::spawn(move || -> Result<(shmlink::SessionReceiver, u64)> {
        let mut out = std::io::stdout().lock();
        let mut total = 0u64;
        loop {
            let m = match receiver.recv() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) if e.is_timeout() => {
                    let since = *finished.lock().unwrap_or_else(|p| p.into_inner());
                    if since.map_or(true, |t| t.elapsed() < timeout) {
                        continue;
                    }
                    return Err(e).context("the service did not end its stream");
                }
                Err(e) => return Err(e).context("receiving from the session failed"),
            };
            total += m.len() as u64;
            out.write_all(&m).context("cannot write to stdout")?;
        }
        out.flush()?;
        Ok((receiver, total))
    });

    let start = Instant::now();
    let mut crc = crc32fast::Hasher::new();
    let (mut sent, mut messages) = (0u64, 0u64);
    let mut buf = vec![0u8; chunk];
    loop {
        let n = read_some(&mut input, &mut buf).context("cannot read the input")?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        sender
            .send(&buf[..n])
            .context("sending into the session failed")?;
        sent += n as u64;
        messages += 1;
    }
    sender.finish().context("cannot finish the stream")?;
    *finished_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    let (receiver, received) = printer
        .join()
        .map_err(|_| anyhow::anyhow!("the receiving thread panicked"))??;
    let secs = start.elapsed().as_secs_f64();
    if is_sink {
        let state = receiver
            .service_state()
            .context("cannot read the sink's state")?;
        let got_bytes = state
            .get("bytes")
            .and_then(|v| v.0.as_u64())
            .unwrap_or(u64::MAX);
        let got_crc = state
            .get("crc32")
            .and_then(|v| v.0.as_u64())
            .unwrap_or(u64::MAX);
        let want_crc = u64::from(crc.finalize());
        if got_bytes != sent || got_crc != want_crc {
            bail!("sink verdict: MISMATCH: sent {sent} bytes crc32 {want_crc:08x}, sink saw {got_bytes} bytes crc32 {got_crc:08x}");
        }
        println!(
            "sink verdict: OK: {sent} bytes in {messages} messages, crc32 {want_crc:08x}, {} ({secs:.3} s)",
            rate(sent, secs)
        );
    } else {
        log::info!(
            "sent {sent} bytes in {messages} messages, received {received} bytes, {}",
            rate(sent, secs)
        );
    }
    let _ = receiver.close();
    Ok(())
}

/// Reads what the input has now, up to `buf.len()` bytes (0 at its end):
/// a file arrives in full chunks, a terminal or pipe line by line as typed.
fn read_some(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}
