//! The contract's D-Bus side: which bus to use, a ring as it travels, and
//! the `OpenSession` reply as a named struct.

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

/// Why the session bus cannot be reached when `DBUS_SESSION_BUS_ADDRESS`
/// is not set: one line, as every front end prints it.
const NO_SESSION_BUS: &str =
    "DBUS_SESSION_BUS_ADDRESS is not set (no session bus here); name a bus by address instead";

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
                        NO_SESSION_BUS,
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

/// A ring as it travels (`(thhh)` in `AcceptSession`, four consecutive
/// arguments in the `OpenSession` reply): capacity, memfd, empty and full
/// eventfds.
pub type RingArg = (u64, OwnedFd, OwnedFd, OwnedFd);

impl From<RingArg> for RingFds {
    fn from((capacity, memfd, empty_signal, full_signal): RingArg) -> Self {
        RingFds {
            capacity,
            memfd,
            empty_signal,
            full_signal,
        }
    }
}

impl From<RingFds> for RingArg {
    fn from(r: RingFds) -> Self {
        (r.capacity, r.memfd, r.empty_signal, r.full_signal)
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
/// roles, and the `parameters` dictionary (decoded with
/// [`SessionParameters::from_dict`](crate::SessionParameters::from_dict)).
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
        OpenSessionReply {
            session,
            fds: PeerFds {
                to_server: (ts_cap, ts_mem, ts_empty, ts_full).into(),
                to_client: (tc_cap, tc_mem, tc_empty, tc_full).into(),
                hangup,
            },
            parameters,
        }
    }
}

impl From<OpenSessionReply> for OpenSessionArgs {
    fn from(r: OpenSessionReply) -> Self {
        let PeerFds {
            to_server,
            to_client,
            hangup,
        } = r.fds;
        let (ts_cap, ts_mem, ts_empty, ts_full) = RingArg::from(to_server);
        let (tc_cap, tc_mem, tc_empty, tc_full) = RingArg::from(to_client);
        (
            r.session,
            ts_cap,
            ts_mem,
            ts_empty,
            ts_full,
            tc_cap,
            tc_mem,
            tc_empty,
            tc_full,
            hangup,
            r.parameters,
        )
    }
}

/// The reply of `OpenSessionVia` as it travels: session path, the
/// client→server and server→client ring capacities, the parameters. The
/// rings' fds travel over the socket the call passed (see
/// [`RingPair`](crate::RingPair)).
pub type OpenSessionViaArgs = (dbus::Path<'static>, u64, u64, PropMap);

/// The reply of `OpenSessionVia`.
#[derive(Debug)]
pub struct OpenSessionViaReply {
    /// The session object's path.
    pub session: dbus::Path<'static>,
    /// Usable bytes of the client→server and server→client rings, the
    /// capacities of the rings that arrive over the socket.
    pub capacities: [u64; 2],
    /// Negotiated parameters (`max-message`, `wakeup`, `spin-us`).
    pub parameters: PropMap,
}

impl From<OpenSessionViaArgs> for OpenSessionViaReply {
    fn from((session, to_server, to_client, parameters): OpenSessionViaArgs) -> Self {
        OpenSessionViaReply {
            session,
            capacities: [to_server, to_client],
            parameters,
        }
    }
}

impl From<OpenSessionViaReply> for OpenSessionViaArgs {
    fn from(r: OpenSessionViaReply) -> Self {
        let [to_server, to_client] = r.capacities;
        (r.session, to_server, to_client, r.parameters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_no_session_bus_message_is_one_clean_line() {
        assert!(!NO_SESSION_BUS.contains(['\\', '\n']), "{NO_SESSION_BUS:?}");
        assert!(!NO_SESSION_BUS.contains("  "), "{NO_SESSION_BUS:?}");
    }
    use std::os::fd::AsRawFd;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").expect("open").into()
    }

    fn raw(r: &RingFds) -> [i32; 3] {
        [
            r.memfd.as_raw_fd(),
            r.empty_signal.as_raw_fd(),
            r.full_signal.as_raw_fd(),
        ]
    }

    #[test]
    fn a_ring_arg_keeps_its_fds_in_their_roles() {
        let arg: RingArg = (4096, fd(), fd(), fd());
        let order = [arg.1.as_raw_fd(), arg.2.as_raw_fd(), arg.3.as_raw_fd()];
        let ring = RingFds::from(arg);
        assert_eq!((ring.capacity, raw(&ring)), (4096, order));
        let (cap, memfd, empty, full) = RingArg::from(ring);
        assert_eq!(
            (
                cap,
                [memfd.as_raw_fd(), empty.as_raw_fd(), full.as_raw_fd()]
            ),
            (4096, order)
        );
    }

    #[test]
    fn the_open_session_reply_round_trips_in_wire_order() {
        let args: OpenSessionArgs = (
            dbus::Path::from("/org/shmlink/Broker1/session/1"),
            100,
            fd(),
            fd(),
            fd(),
            200,
            fd(),
            fd(),
            fd(),
            fd(),
            PropMap::new(),
        );
        let wire = [
            args.2.as_raw_fd(),
            args.3.as_raw_fd(),
            args.4.as_raw_fd(),
            args.6.as_raw_fd(),
            args.7.as_raw_fd(),
            args.8.as_raw_fd(),
            args.9.as_raw_fd(),
        ];
        let reply = OpenSessionReply::from(args);
        assert_eq!(
            (reply.fds.to_server.capacity, reply.fds.to_client.capacity),
            (100, 200)
        );
        assert_eq!(raw(&reply.fds.to_server), wire[0..3]);
        assert_eq!(raw(&reply.fds.to_client), wire[3..6]);
        assert_eq!(reply.fds.hangup.as_raw_fd(), wire[6]);
        let back = OpenSessionArgs::from(reply);
        assert_eq!((back.1, back.5), (100, 200));
        assert_eq!(
            [
                back.2.as_raw_fd(),
                back.3.as_raw_fd(),
                back.4.as_raw_fd(),
                back.6.as_raw_fd(),
                back.7.as_raw_fd(),
                back.8.as_raw_fd(),
                back.9.as_raw_fd(),
            ],
            wire
        );
    }
}
