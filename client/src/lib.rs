//! Client library for shmlink: open a shared-memory session with a service
//! hosted by `shmlinkd`, then stream messages both ways at memory speed.
//!
//! D-Bus carries only the set-up (`OpenSession`); the data flows through two
//! sealed memfd rings that this library checks before mapping, so a lying
//! server cannot crash the client.
//!
//! ```no_run
//! let client = shmlink::Client::connect(&shmlink::Bus::Session)?;
//! let mut session = client.session("echo").capacity(1 << 20).open()?;
//! session.send(b"hello")?;
//! assert_eq!(session.recv()?.as_deref(), Some(&b"hello"[..]));
//! # Ok::<(), shmlink::Error>(())
//! ```
#![deny(missing_docs)]

#[cfg(feature = "tokio")]
mod async_session;
mod session;

#[cfg(feature = "tokio")]
pub use async_session::AsyncSession;
pub use session::{Counters, Session, SessionBuilder, SessionReceiver, SessionSender};
pub use shmlink_endpoint::Wakeup;
pub use shmlink_interfaces::Bus;

use dbus::arg::PropMap;
use dbus::blocking::stdintf::org_freedesktop_dbus::Properties;
use dbus::blocking::SyncConnection;
use shmlink_interfaces::{member, BROKER_INTERFACE, BROKER_PATH, BUS_NAME};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Timeout for D-Bus calls to the broker.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the client library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not reach the bus.
    #[error("cannot connect to the {bus}: {message}")]
    Connect {
        /// Which bus.
        bus: String,
        /// Why.
        message: String,
    },
    /// The broker (or the bus) answered a call with an error.
    #[error("{name}: {message}")]
    Refused {
        /// The D-Bus error name, e.g. `org.shmlink.Error.UnknownService`.
        name: String,
        /// The human-readable text.
        message: String,
    },
    /// The broker's reply did not have the expected shape.
    #[error("unexpected reply from the broker: {0}")]
    BadReply(String),
    /// The data plane failed (peer gone, corrupt ring, bad fd...).
    #[error(transparent)]
    Session(#[from] shmlink_endpoint::Error),
}

impl Error {
    /// The D-Bus error name if the broker refused the call.
    pub fn dbus_name(&self) -> Option<&str> {
        match self {
            Error::Refused { name, .. } => Some(name),
            _ => None,
        }
    }
}

impl From<dbus::Error> for Error {
    fn from(e: dbus::Error) -> Self {
        Error::Refused {
            name: e
                .name()
                .unwrap_or("org.freedesktop.DBus.Error.Failed")
                .to_owned(),
            message: e.message().unwrap_or("").to_owned(),
        }
    }
}

/// One row of `ListSessions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEntry {
    /// Object path.
    pub path: String,
    /// Service name.
    pub service: String,
    /// Owner's unique bus name.
    pub owner: String,
    /// Owner's uid.
    pub uid: u32,
    /// Owner's pid.
    pub pid: u32,
}

/// A connection to the broker.
#[derive(Clone)]
pub struct Client {
    conn: Arc<SyncConnection>,
}

impl Client {
    /// Connects to `bus`. Nothing is asked of the broker yet.
    pub fn connect(bus: &Bus) -> Result<Client, Error> {
        let channel = bus.connect().map_err(|e| Error::Connect {
            bus: bus.to_string(),
            message: e.message().unwrap_or("unknown error").to_owned(),
        })?;
        Ok(Client {
            conn: Arc::new(SyncConnection::from(channel)),
        })
    }

    pub(crate) fn proxy<'a>(
        &'a self,
        path: &'a str,
    ) -> dbus::blocking::Proxy<'a, &'a SyncConnection> {
        self.conn.with_proxy(BUS_NAME, path, CALL_TIMEOUT)
    }

    /// Starts building a session with `service`.
    pub fn session(&self, service: &str) -> SessionBuilder {
        SessionBuilder::new(self.clone(), service)
    }

    /// Calls `org.freedesktop.DBus.Peer.Ping` on the broker and returns the round trip.
    ///
    /// On a bus with activation this also starts the broker.
    pub fn ping(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        self.proxy(BROKER_PATH).method_call::<(), _, _, _>(
            "org.freedesktop.DBus.Peer",
            "Ping",
            (),
        )?;
        Ok(start.elapsed())
    }

    fn broker_prop<T: for<'b> dbus::arg::Get<'b> + 'static>(&self, name: &str) -> Result<T, Error> {
        Ok(self.proxy(BROKER_PATH).get(BROKER_INTERFACE, name)?)
    }

    /// The broker's version.
    pub fn version(&self) -> Result<String, Error> {
        self.broker_prop(member::VERSION)
    }

    /// Services the broker hosts.
    pub fn services(&self) -> Result<Vec<String>, Error> {
        self.broker_prop(member::SERVICES)
    }

    /// Sessions open right now.
    pub fn session_count(&self) -> Result<u32, Error> {
        self.broker_prop(member::SESSION_COUNT)
    }

    /// Largest ring capacity the broker accepts.
    pub fn max_capacity(&self) -> Result<u64, Error> {
        self.broker_prop(member::MAX_CAPACITY)
    }

    /// Largest message size the broker allows.
    pub fn max_message_size(&self) -> Result<u64, Error> {
        self.broker_prop(member::MAX_MESSAGE_SIZE)
    }

    /// Every open session.
    pub fn list_sessions(&self) -> Result<Vec<SessionEntry>, Error> {
        type Row = (dbus::Path<'static>, String, String, u32, u32);
        let (list,): (Vec<Row>,) =
            self.proxy(BROKER_PATH)
                .method_call(BROKER_INTERFACE, member::LIST_SESSIONS, ())?;
        Ok(list
            .into_iter()
            .map(|(path, service, owner, uid, pid)| SessionEntry {
                path: path.to_string(),
                service,
                owner,
                uid,
                pid,
            })
            .collect())
    }

    /// Calls `Close` on a session by path (owner or root only).
    pub fn close_session(&self, path: &str) -> Result<(), Error> {
        self.proxy(path).method_call::<(), _, _, _>(
            shmlink_interfaces::SESSION_INTERFACE,
            member::CLOSE,
            (),
        )?;
        Ok(())
    }

    /// All readable properties of a session (owner or root sees the counters).
    pub fn session_properties(&self, path: &str) -> Result<PropMap, Error> {
        Ok(self
            .proxy(path)
            .get_all(shmlink_interfaces::SESSION_INTERFACE)?)
    }
}
