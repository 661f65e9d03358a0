//! The daemon: connects to the bus, takes the well-known name, and runs
//! the [main loop](crate::main_loop) over the D-Bus adapter ([`crate::dbus`]),
//! which ties bus traffic, the engine's notifications, the provider links,
//! the providers' answer deadlines and the stop signal together. The
//! sessions live in [`crate::sessions`].

use crate::config::Config;
use crate::dbus::{name_owner_changed, Adapter};
use crate::main_loop;
use crate::names::Names;
use crate::service::Service;
use crate::sessions::Sessions;
use dbus::blocking::stdintf::org_freedesktop_dbus::RequestNameReply;
use dbus::blocking::Connection;
use dbus::channel::Sender;
use dbus::Message;
pub use shmlink_interfaces::Bus;
use shmlink_interfaces::{DBUS_NAME, DBUS_PATH};
use std::os::fd::BorrowedFd;
use std::sync::Arc;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Connecting to the bus failed.
    #[error("cannot connect to the bus ({bus}): {source}")]
    Connect {
        /// The bus.
        bus: String,
        /// libdbus's error.
        source: dbus::Error,
    },
    /// Another process owns the name, or the policy forbids owning it.
    #[error("cannot own the name {name}: {reason}")]
    Name {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Setting up the engine failed.
    #[error("cannot start the event loop: {0}")]
    Engine(#[from] std::io::Error),
    /// The bus connection dropped.
    #[error("lost the bus connection")]
    Disconnected,
}

/// The default of `limits.reply_fds` on the system bus: four `OpenSession`
/// replies' fds, well within the 64 fds the system bus lets the daemon
/// have in messages not yet read.
pub const SYSTEM_BUS_REPLY_FDS: u32 = 28;

/// The default of `providers.unanswered` on the system bus: two calls per
/// provider and four in all, 32 fds, which with [`SYSTEM_BUS_REPLY_FDS`]
/// stays within the system bus's 64.
pub const SYSTEM_BUS_UNANSWERED: u32 = 2;

/// A running broker on a bus.
pub struct Daemon {
    conn: Connection,
    bus_name: String,
    adapter: Adapter,
    bus_label: String,
}

impl Daemon {
    /// Connects to `bus`, starts the engine, registers the interfaces and
    /// takes the well-known name. Serve with [`Daemon::run`].
    pub fn create(
        bus: &Bus,
        config: Config,
        services: Vec<Arc<dyn Service>>,
    ) -> Result<Daemon, DaemonError> {
        Self::create_named(bus, Names::default(), config, services)
    }

    /// [`Daemon::create`] owning `names.bus_name()` with the broker object
    /// at `names.path()` and the sessions below it: an application's own
    /// broker, with its own services and limits, beside (or instead of)
    /// `shmlinkd`.
    pub fn create_named(
        bus: &Bus,
        names: Names,
        mut config: Config,
        services: Vec<Arc<dyn Service>>,
    ) -> Result<Daemon, DaemonError> {
        let bus_name = names.bus_name().to_owned();
        let mut channel = bus.connect().map_err(|source| DaemonError::Connect {
            bus: bus.to_string(),
            source,
        })?;
        channel.set_watch_enabled(true);
        let conn = Connection::from(channel);
        if *bus == Bus::System {
            // The system bus lets a sender have 64 fds in messages not yet
            // read; four replies' worth leaves room for everything else.
            config.limits.reply_fds.get_or_insert(SYSTEM_BUS_REPLY_FDS);
            config
                .providers
                .unanswered
                .get_or_insert(SYSTEM_BUS_UNANSWERED);
        }
        let mut adapter = Adapter::new(Sessions::start(config, services)?, names);

        // Learn when clients leave the bus.
        conn.add_match_no_cb(&name_owner_changed().match_str())
            .map_err(|source| DaemonError::Connect {
                bus: format!("{bus:?}"),
                source,
            })?;
        let name_err = |reason: String| DaemonError::Name {
            name: bus_name.clone(),
            reason,
        };
        match conn.request_name(bus_name.as_str(), false, false, true) {
            Ok(RequestNameReply::PrimaryOwner) => {}
            Ok(_) => return Err(name_err("another process owns it".into())),
            Err(e) => return Err(name_err(e.to_string())),
        }
        log::info!(
            "serving {bus_name} on {} as {} with {} worker thread(s)",
            match bus {
                Bus::Address(a) => a.clone(),
                other => format!("the {other:?} bus").to_lowercase(),
            },
            conn.channel().unique_name().unwrap_or("?"),
            adapter.worker_count()
        );
        Ok(Daemon {
            conn,
            bus_name,
            adapter,
            bus_label: format!("{bus:?}"),
        })
    }

    /// Serves until `stop` becomes readable (e.g. a signalfd for SIGTERM) or
    /// the bus connection drops. Closes every session before returning.
    pub fn run(mut self, stop: Option<BorrowedFd<'_>>) -> Result<(), DaemonError> {
        let result = self.serve(stop);
        self.shutdown();
        result
    }

    fn serve(&mut self, stop: Option<BorrowedFd<'_>>) -> Result<(), DaemonError> {
        match main_loop::run(&self.conn, stop, &mut self.adapter)? {
            main_loop::Ended::Stopped => {
                log::info!(
                    "stop requested; closing {} session(s)",
                    self.adapter.session_count()
                );
                Ok(())
            }
            main_loop::Ended::Disconnected => Err(DaemonError::Disconnected),
        }
    }

    fn shutdown(&mut self) {
        self.adapter.shutdown(&self.conn);
        // Not waited for: the bus may not be reading us (the name goes with
        // the connection anyway).
        if let Ok(call) = Message::new_method_call(DBUS_NAME, DBUS_PATH, DBUS_NAME, "ReleaseName") {
            let _ = self.conn.send(call.append1(self.bus_name.as_str()));
        }
        main_loop::send_within(&self.conn, main_loop::LAST_WORDS);
        log::info!("stopped serving on {}", self.bus_label);
    }
}
