//! Client library for shmlink: open a shared-memory session with a service
//! hosted by `shmlinkd`, then stream messages both ways at memory speed.
//!
//! D-Bus carries only the set-up (`OpenSessionVia`); the data flows through two
//! sealed memfd rings that this library checks before mapping, so a lying
//! server cannot crash the client. The client also bounds what a server can
//! make it spend: rings no larger than it asked for (or than
//! [`SessionBuilder::max_capacity`]), messages no larger than
//! [`SessionBuilder::max_message`], D-Bus calls that give up after
//! [`Client::call_timeout`] and blocking session calls after
//! [`SessionBuilder::timeout`].
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
pub use shmlink_endpoint::{Item, PeerLimits, Piece, Received, Wakeup};
pub use shmlink_interfaces::Bus;

use dbus::arg::PropMap;
use dbus::blocking::stdintf::org_freedesktop_dbus::Properties;
use dbus::blocking::SyncConnection;
use shmlink_interfaces::{member, BROKER_INTERFACE, BROKER_PATH, BUS_NAME};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default timeout for D-Bus calls to the broker (see [`Client::with_call_timeout`]).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The D-Bus error libdbus reports when a call's reply did not come in time.
const NO_REPLY: &str = "org.freedesktop.DBus.Error.NoReply";

/// How much earlier than its timeout libdbus may give up on a call (it
/// counts in whole milliseconds on its own clock).
const TIMER_SLACK: Duration = Duration::from_millis(50);

/// Formats a duration for messages: "10 s", "2.5 s", "250 ms".
pub(crate) fn human_duration(d: &Duration) -> String {
    if d.as_millis() >= 1000 {
        if d.subsec_millis() == 0 {
            format!("{} s", d.as_secs())
        } else {
            format!("{:.1} s", d.as_secs_f64())
        }
    } else if d.as_micros() >= 1000 || d.is_zero() {
        format!("{} ms", d.as_millis())
    } else {
        format!("{} µs", d.as_micros())
    }
}

/// Everything the client library can fail with.
///
/// Each message states its cause in full and no variant also reports that
/// cause as its `source()`, so a chain printed cause by cause says each
/// thing once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not reach the bus.
    #[error("cannot reach the {bus}: {message}")]
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
    /// A D-Bus call got no reply, or a blocking session call made no
    /// progress, within its timeout.
    #[error("{operation} timed out after {}", human_duration(.after))]
    TimedOut {
        /// What was waited for, e.g. "the D-Bus call OpenSessionVia" or "receiving from echo".
        operation: String,
        /// The timeout that passed.
        after: Duration,
    },
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

    /// Whether a timeout passed (a D-Bus call or a blocking session call).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::TimedOut { .. })
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
    call_timeout: Duration,
    /// The broker's well-known name and object path.
    name: Arc<str>,
    path: Arc<str>,
}

/// One row of `ListServices`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// The name `OpenSessionVia` takes.
    pub name: String,
    /// The provider's unique bus name, or empty for a service built into the broker.
    pub provider: String,
    /// The provider's uid (the broker's own for a built-in service).
    pub uid: u32,
}

/// The object path the D-Bus convention gives a well-known name:
/// `org.example.Frames1` → `/org/example/Frames1`.
pub fn default_path(bus_name: &str) -> String {
    format!("/{}", bus_name.replace('.', "/").replace('-', "_"))
}

/// A proxy for one object of the broker.
pub(crate) type Proxy<'a> = dbus::blocking::Proxy<'a, &'a SyncConnection>;

impl Client {
    /// Connects to `bus`, to talk to `shmlinkd` (`org.shmlink.Broker1`).
    /// Nothing is asked of the broker yet.
    pub fn connect(bus: &Bus) -> Result<Client, Error> {
        Self::connect_to(bus, BUS_NAME)
    }

    /// Connects to `bus`, to talk to the broker that owns `name` (any
    /// process implementing `org.shmlink.Broker1`, such as an application's
    /// embedded broker), at the path [`default_path`] derives from it; see
    /// [`Client::with_broker_path`] for another path.
    pub fn connect_to(bus: &Bus, name: &str) -> Result<Client, Error> {
        let path: Arc<str> = if name == BUS_NAME {
            BROKER_PATH.into()
        } else {
            default_path(name).into()
        };
        let channel = bus.connect().map_err(|e| Error::Connect {
            bus: bus.to_string(),
            message: e.message().unwrap_or("unknown error").to_owned(),
        })?;
        Ok(Client {
            conn: Arc::new(SyncConnection::from(channel)),
            call_timeout: CALL_TIMEOUT,
            name: name.into(),
            path,
        })
    }

    /// The same connection, talking to the broker object at `path`.
    pub fn with_broker_path(mut self, path: &str) -> Client {
        self.path = path.into();
        self
    }

    /// The broker's well-known name.
    pub fn broker_name(&self) -> &str {
        &self.name
    }

    /// The broker object's path.
    pub fn broker_path(&self) -> &str {
        &self.path
    }

    /// The same connection with another timeout for its D-Bus calls (and
    /// those of sessions opened from it); [`CALL_TIMEOUT`] by default. A call
    /// that gets no reply in time fails with [`Error::TimedOut`].
    pub fn with_call_timeout(mut self, timeout: Duration) -> Client {
        self.call_timeout = timeout;
        self
    }

    /// How long a D-Bus call waits for the broker's reply.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// Makes one D-Bus call to the object at `path` through `f`, turning a
    /// reply that did not come within the timeout into [`Error::TimedOut`]
    /// for `operation`.
    pub(crate) fn call<T>(
        &self,
        path: &str,
        operation: impl FnOnce() -> String,
        f: impl FnOnce(&Proxy<'_>) -> Result<T, dbus::Error>,
    ) -> Result<T, Error> {
        let start = Instant::now();
        let proxy = self.conn.with_proxy(&*self.name, path, self.call_timeout);
        f(&proxy).map_err(|e| {
            // The bus also answers NoReply when the callee leaves without
            // replying; only a call that lasted its whole timeout timed out.
            if e.name() == Some(NO_REPLY) && start.elapsed() + TIMER_SLACK >= self.call_timeout {
                Error::TimedOut {
                    operation: operation(),
                    after: self.call_timeout,
                }
            } else {
                e.into()
            }
        })
    }

    /// A call of `member` on `interface` at `path` (for the common case).
    pub(crate) fn method<A: dbus::arg::AppendAll, R: dbus::arg::ReadAll>(
        &self,
        path: &str,
        interface: &str,
        member: &str,
        args: A,
    ) -> Result<R, Error> {
        self.call(
            path,
            || format!("the D-Bus call {member}"),
            |p| p.method_call(interface, member, args),
        )
    }

    /// Reads the property `name` of `interface` at `path`.
    pub(crate) fn property<T: for<'b> dbus::arg::Get<'b> + 'static>(
        &self,
        path: &str,
        interface: &str,
        name: &str,
    ) -> Result<T, Error> {
        self.call(
            path,
            || format!("reading the property {name}"),
            |p| p.get(interface, name),
        )
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
        self.method::<_, ()>(&self.path, "org.freedesktop.DBus.Peer", "Ping", ())?;
        Ok(start.elapsed())
    }

    fn broker_prop<T: for<'b> dbus::arg::Get<'b> + 'static>(&self, name: &str) -> Result<T, Error> {
        self.property(&self.path, BROKER_INTERFACE, name)
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
            self.method(&self.path, BROKER_INTERFACE, member::LIST_SESSIONS, ())?;
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

    /// Every service a session can be opened with, and its provider (`ListServices`).
    pub fn list_services(&self) -> Result<Vec<ServiceEntry>, Error> {
        let (list,): (Vec<(String, String, u32)>,) =
            self.method(&self.path, BROKER_INTERFACE, member::LIST_SERVICES, ())?;
        Ok(list
            .into_iter()
            .map(|(name, provider, uid)| ServiceEntry {
                name,
                provider,
                uid,
            })
            .collect())
    }

    /// Calls `Close` on a session by path (owner or root only).
    pub fn close_session(&self, path: &str) -> Result<(), Error> {
        self.method(
            path,
            shmlink_interfaces::SESSION_INTERFACE,
            member::CLOSE,
            (),
        )
    }

    /// All readable properties of a session (owner or root sees the counters).
    pub fn session_properties(&self, path: &str) -> Result<PropMap, Error> {
        self.call(
            path,
            || "reading the session's properties".to_owned(),
            |p| p.get_all(shmlink_interfaces::SESSION_INTERFACE),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each error's message, then its sources' messages, as `{:#}` prints them.
    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        let mut out = vec![e.to_string()];
        let mut next = e.source();
        while let Some(s) = next {
            out.push(s.to_string());
            next = s.source();
        }
        out
    }

    #[test]
    fn every_cause_is_printed_once() {
        use shmlink_endpoint::{Error as E, FrameError};
        let all = [
            Error::Connect {
                bus: "bus at unix:path=/x".into(),
                message: "Failed to connect to socket /x: No such file or directory".into(),
            },
            Error::Refused {
                name: "org.shmlink.Error.UnknownService".into(),
                message: "no service named nope".into(),
            },
            Error::BadReply("parameters lack max-message".into()),
            Error::TimedOut {
                operation: "the D-Bus call OpenSessionVia".into(),
                after: Duration::from_secs(10),
            },
            Error::from(dbus::Error::new_custom(NO_REPLY, "Did not receive a reply")),
            Error::Session(E::Protocol(FrameError::UnknownKind(7))),
            Error::Session(E::Io(std::io::Error::other("disk on fire"))),
            Error::Session(E::BadFd("hang-up socket is not connected".into())),
            Error::Session(E::OverLimit {
                what: "max-message",
                offered: 1 << 32,
                limit: 1 << 26,
            }),
            Error::Session(E::Closed),
            Error::Session(E::TimedOut),
        ];
        for e in all {
            let links = chain(&e);
            for (i, outer) in links.iter().enumerate() {
                for inner in &links[i + 1..] {
                    assert!(
                        !outer.contains(inner.as_str()),
                        "{e:?} prints {inner:?} twice: {}",
                        links.join(": ")
                    );
                }
            }
        }
        let kind7 = Error::Session(E::Protocol(FrameError::UnknownKind(7)));
        let text = chain(&kind7).join(": ");
        assert_eq!(text.matches("unknown kind 7").count(), 1, "{text}");
    }

    #[test]
    fn a_timeout_says_what_and_how_long() {
        let e = Error::TimedOut {
            operation: "receiving from echo".into(),
            after: Duration::from_millis(2500),
        };
        assert_eq!(e.to_string(), "receiving from echo timed out after 2.5 s");
        assert!(e.is_timeout());
        assert_eq!(human_duration(&Duration::from_secs(10)), "10 s");
        assert_eq!(human_duration(&Duration::from_millis(250)), "250 ms");
        assert_eq!(human_duration(&Duration::from_micros(40)), "40 µs");
    }
}
