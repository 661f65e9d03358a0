//! The contract's D-Bus side: which bus to use, and the `OpenSession` reply
//! as a named struct.

use crate::{PeerFds, RingFds};
use dbus::arg::{OwnedFd, PropMap};
use dbus::channel::{BusType, Channel};

/// Which bus the broker is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bus {
    /// The user's session bus (`DBUS_SESSION_BUS_ADDRESS`).
    Session,
    /// The system bus.
    System,
    /// A bus by address, e.g. `unix:path=/run/x`.
    Address(String),
}

impl Bus {
    /// Opens a private connection to this bus and registers it (`Hello`).
    ///
    /// The session bus needs `DBUS_SESSION_BUS_ADDRESS`: libdbus would
    /// otherwise try X11 autolaunch, which fails with an unhelpful message.
    pub fn connect(&self) -> Result<Channel, dbus::Error> {
        match self {
            Bus::Session => {
                if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none() {
                    return Err(dbus::Error::new_custom(
                        "org.freedesktop.DBus.Error.FileNotFound",
                        "DBUS_SESSION_BUS_ADDRESS is not set (no session bus here); \\
                         name a bus by address instead",
                    ));
                }
                Channel::get_private(BusType::Session)
            }
            Bus::System => Channel::get_private(BusType::System),
            Bus::Address(a) => {
                let mut c = Channel::open_private(a)?;
                c.register()?;
                Ok(c)
            }
        }
    }
}

impl std::str::FromStr for Bus {
    type Err = std::convert::Infallible;
    /// `session`, `system`, or anything else as an address.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "session" => Bus::Session,
            "system" => Bus::System,
            other => Bus::Address(other.to_owned()),
        })
    }
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bus::Session => f.write_str("session bus"),
            Bus::System => f.write_str("system bus"),
            Bus::Address(a) => write!(f, "bus at {a}"),
        }
    }
}

/// The reply of `OpenSession` as it travels, in wire order: session path;
/// client→server ring capacity, memfd, empty and full eventfds; the same
/// four for the server→client ring; the hang-up socket; the parameters.
pub type OpenSessionArgs = (
    dbus::Path<'static>,
    u64,
    OwnedFd,
    OwnedFd,
    OwnedFd,
    u64,
    OwnedFd,
    OwnedFd,
    OwnedFd,
    OwnedFd,
    PropMap,
);

/// The reply of `OpenSession`: the session's object path, the fds in their
/// roles, and the `parameters` dictionary.
#[derive(Debug)]
pub struct OpenSessionReply {
    /// The session object's path.
    pub session: dbus::Path<'static>,
    /// The rings and the hang-up socket.
    pub fds: PeerFds,
    /// Negotiated parameters (`max-message`, `wakeup`, `spin-us`).
    pub parameters: PropMap,
}

impl From<OpenSessionArgs> for OpenSessionReply {
    fn from(a: OpenSessionArgs) -> Self {
        let (
            session,
            ts_cap,
            ts_mem,
            ts_empty,
            ts_full,
            tc_cap,
            tc_mem,
            tc_empty,
            tc_full,
            hangup,
            parameters,
        ) = a;
        let ring = |capacity, memfd, empty_signal, full_signal| RingFds {
            capacity,
            memfd,
            empty_signal,
            full_signal,
        };
        OpenSessionReply {
            session,
            fds: PeerFds {
                to_server: ring(ts_cap, ts_mem, ts_empty, ts_full),
                to_client: ring(tc_cap, tc_mem, tc_empty, tc_full),
                hangup,
            },
            parameters,
        }
    }
}

impl From<OpenSessionReply> for OpenSessionArgs {
    fn from(r: OpenSessionReply) -> Self {
        let PeerFds {
            to_server: s,
            to_client: c,
            hangup,
        } = r.fds;
        (
            r.session,
            s.capacity,
            s.memfd,
            s.empty_signal,
            s.full_signal,
            c.capacity,
            c.memfd,
            c.empty_signal,
            c.full_signal,
            hangup,
            r.parameters,
        )
    }
}
