//! The other process of `shmlink bench`'s two-process baselines:
//! `shmlink __bench-peer ROLE`.

use super::*;
use dbus::blocking::stdintf::org_freedesktop_dbus::RequestNameReply;

pub fn peer(args: PeerArgs) -> Result<()> {
    match args.role.as_str() {
        "stream-sink" => {
            let mut input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let mut out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
            out.write_all(&total.to_le_bytes())?;
            Ok(())
        }
        "stream-echo" => {
            let mut input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
            let mut out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
            let mut buf = vec![0u8; args.size];
            loop {
                if let Err(e) = input.read_exact(&mut buf) {
                    return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        Ok(())
                    } else {
                        Err(e.into())
                    };
                }
                out.write_all(&buf)?;
            }
        }
        "eventfd-echo" => {
            let ping = std::io::stdin().as_fd().try_clone_to_owned()?;
            let pong = std::io::stdout().as_fd().try_clone_to_owned()?;
            loop {
                if eventfd_read(&ping)? >= QUIT {
                    return Ok(());
                }
                eventfd_write(&pong, 1)?;
            }
        }
        "provided-sink" => provided_sink(
            args.address
                .as_deref()
                .context("provided-sink needs --address")?,
        ),
        "dbus-echo" => dbus_peer(
            args.address
                .as_deref()
                .context("dbus-echo needs --address")?,
        ),
        other => bail!("unknown peer role {other:?}"),
    }
}

/// A minimal D-Bus service: `Echo(ay) -> ay`, `Sink(ay) -> u` (the length),
/// both reading and writing the bytes as `&[u8]`, the fast path.
pub(super) fn dbus_peer(address: &str) -> Result<()> {
    let mut channel = Channel::open_private(address)?;
    channel.register()?;
    let conn = dbus::blocking::Connection::from(channel);
    let reply = conn.request_name(PEER_NAME, false, false, true)?;
    ensure!(
        reply == RequestNameReply::PrimaryOwner,
        "cannot own {PEER_NAME} ({reply:?})"
    );
    // Served from the raw channel: the handler reads and writes the bytes as `&[u8]`.
    let c = conn.channel();
    println!("ready");
    std::io::stdout().flush()?;
    loop {
        if c.read_write(None).is_err() {
            return Ok(());
        }
        while let Some(msg) = c.pop_message() {
            if msg.msg_type() != MessageType::MethodCall {
                continue;
            }
            let reply = match msg.member().as_deref() {
                Some("Echo") => match msg.read1::<&[u8]>() {
                    Ok(b) => msg.method_return().append1(b),
                    Err(e) => msg.error(
                        &"org.shmlink.Error.Bench".into(),
                        &std::ffi::CString::new(e.to_string())?,
                    ),
                },
                Some("Sink") => match msg.read1::<&[u8]>() {
                    Ok(b) => msg.method_return().append1(b.len() as u32),
                    Err(e) => msg.error(
                        &"org.shmlink.Error.Bench".into(),
                        &std::ffi::CString::new(e.to_string())?,
                    ),
                },
                _ => msg.method_return(),
            };
            let _ = c.send(reply);
        }
        c.flush();
    }
}

/// The built-in sink under another name, so that a provider can offer it
/// beside the broker's own.
struct Renamed(&'static str, Arc<dyn shmlink_server::Service>);

impl shmlink_server::Service for Renamed {
    fn name(&self) -> &str {
        self.0
    }
    fn open(
        &self,
        caller: &shmlink_server::Caller,
        options: &shmlink_server::Options,
    ) -> Result<Box<dyn shmlink_server::SessionHandler>, shmlink_server::ServiceError> {
        self.1.open(caller, options)
    }
}

/// A provider process serving the built-in sink as [`PROVIDED_SINK`]
/// through the broker on the bus at `address`; says "ready" once registered
/// and serves until its stdin closes.
fn provided_sink(address: &str) -> Result<()> {
    let provider = shmlink_server::Provider::builder(&Bus::Address(address.to_owned()))
        .service(Arc::new(Renamed(
            PROVIDED_SINK,
            Arc::new(shmlink_server::builtin::Sink),
        )))
        .register()
        .context("cannot register the provided sink")?;
    println!("ready");
    std::io::stdout().flush()?;
    // Stop when the benchmark closes our stdin (or dies).
    let stdin = std::io::stdin().as_fd().try_clone_to_owned()?;
    provider
        .run(Some(stdin.as_fd()))
        .context("the provided sink stopped")
}
