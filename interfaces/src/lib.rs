//! The shmlink D-Bus contract, as Rust constants and the encodings of its arguments.
//!
//! This crate is the single source of truth for every name that crosses the
//! bus: the well-known name, object paths, interface and member names, option
//! and parameter keys, error names and the default limits. The introspection
//! XML beside it (`org.shmlink.Broker1.xml`, `org.shmlink.Session1.xml`,
//! `org.shmlink.Provider1.xml`) is
//! embedded here so that tests can compare it with a live daemon, and
//! `DATA-PLANE.md` documents what flows through the rings.
#![deny(missing_docs)]
//!
//! Without the default `dbus` feature the crate holds only plain data (names,
//! limits, the fd roles, [`Wakeup`], [`SessionParameters`], [`Caller`],
//! [`Traffic`]), so the
//! data plane can use it without linking libdbus. With it, the same types
//! get their D-Bus encodings: `OpenSessionReply`, `AcceptSession`, the
//! dictionaries (`dict`).

/// Well-known bus name the broker owns.
pub const BUS_NAME: &str = "org.shmlink.Broker1";
/// Object path of the broker object.
pub const BROKER_PATH: &str = "/org/shmlink/Broker1";
/// Interface of the broker object.
pub const BROKER_INTERFACE: &str = "org.shmlink.Broker1";
/// Interface a provider process exports for the broker to call.
pub const PROVIDER_INTERFACE: &str = "org.shmlink.Provider1";
/// Interface of each session object.
pub const SESSION_INTERFACE: &str = "org.shmlink.Session1";
/// Session objects live at this prefix followed by a decimal number.
pub const SESSION_PATH_PREFIX: &str = "/org/shmlink/Broker1/session/";
/// Where a provider exports `org.shmlink.Provider1` unless told otherwise
/// (it tells the broker the path it chose in `RegisterService`).
pub const PROVIDER_PATH: &str = "/org/shmlink/Provider1";

/// The bus daemon's own name, which is also the name of its interface: the
/// sender of `NameOwnerChanged` and of the errors the bus makes up.
pub const DBUS_NAME: &str = "org.freedesktop.DBus";
/// Object path of the bus daemon.
pub const DBUS_PATH: &str = "/org/freedesktop/DBus";

/// Introspection XML of `org.shmlink.Broker1`, with documentation.
pub const BROKER_XML: &str = include_str!("../org.shmlink.Broker1.xml");
/// Introspection XML of `org.shmlink.Session1`, with documentation.
pub const SESSION_XML: &str = include_str!("../org.shmlink.Session1.xml");
/// Introspection XML of `org.shmlink.Provider1`, with documentation.
pub const PROVIDER_XML: &str = include_str!("../org.shmlink.Provider1.xml");

/// Bytes shmem-ipc reserves at the start of each ring's memfd (the shared
/// `count` and padding); ring data starts at this offset.
pub const RING_HEADER: u64 = 64;

/// The file descriptors of one ring, as they cross the bus.
#[derive(Debug)]
pub struct RingFds {
    /// Usable bytes of the ring.
    pub capacity: u64,
    /// The memfd holding the ring.
    pub memfd: std::os::fd::OwnedFd,
    /// eventfd written when the ring goes from empty to non-empty.
    pub empty_signal: std::os::fd::OwnedFd,
    /// eventfd written when the ring goes from full to not full.
    pub full_signal: std::os::fd::OwnedFd,
}

impl RingFds {
    /// The same ring with each fd duplicated (`F_DUPFD_CLOEXEC`).
    pub fn try_clone(&self) -> std::io::Result<RingFds> {
        Ok(RingFds {
            capacity: self.capacity,
            memfd: self.memfd.try_clone()?,
            empty_signal: self.empty_signal.try_clone()?,
            full_signal: self.full_signal.try_clone()?,
        })
    }
}

/// Everything the server hands a client for one session.
#[derive(Debug)]
pub struct PeerFds {
    /// The client-to-server ring.
    pub to_server: RingFds,
    /// The server-to-client ring.
    pub to_client: RingFds,
    /// The client's end of the hang-up socket pair.
    pub hangup: std::os::fd::OwnedFd,
}

impl PeerFds {
    /// The same rings and hang-up socket with each fd duplicated (`F_DUPFD_CLOEXEC`).
    pub fn try_clone(&self) -> std::io::Result<PeerFds> {
        Ok(PeerFds {
            to_server: self.to_server.try_clone()?,
            to_client: self.to_client.try_clone()?,
            hangup: self.hangup.try_clone()?,
        })
    }
}

/// A session's two rings without the hang-up socket: what travels over the
/// socket of `OpenSessionVia`.
#[derive(Debug)]
pub struct RingPair {
    /// The client-to-server ring.
    pub to_server: RingFds,
    /// The server-to-client ring.
    pub to_client: RingFds,
}

impl RingPair {
    /// How many fds travel over the socket.
    pub const FDS: usize = 6;

    /// The capacities (to-server, to-client) and the fds in wire order:
    /// to-server memfd, *empty* and *full* eventfds, then the same three of
    /// the to-client ring (DATA-PLANE.md, section 1).
    pub fn into_fds(self) -> ([u64; 2], [std::os::fd::OwnedFd; RingPair::FDS]) {
        let RingPair {
            to_server: s,
            to_client: c,
        } = self;
        (
            [s.capacity, c.capacity],
            [
                s.memfd,
                s.empty_signal,
                s.full_signal,
                c.memfd,
                c.empty_signal,
                c.full_signal,
            ],
        )
    }

    /// The fds, borrowed, in wire order (see [`RingPair::into_fds`]).
    pub fn fds(&self) -> [std::os::fd::BorrowedFd<'_>; RingPair::FDS] {
        use std::os::fd::AsFd;
        let (s, c) = (&self.to_server, &self.to_client);
        [
            s.memfd.as_fd(),
            s.empty_signal.as_fd(),
            s.full_signal.as_fd(),
            c.memfd.as_fd(),
            c.empty_signal.as_fd(),
            c.full_signal.as_fd(),
        ]
    }

    /// The rings from their capacities and fds in wire order (see
    /// [`RingPair::into_fds`]).
    pub fn from_fds(
        [to_server, to_client]: [u64; 2],
        fds: [std::os::fd::OwnedFd; RingPair::FDS],
    ) -> RingPair {
        let [s_mem, s_empty, s_full, c_mem, c_empty, c_full] = fds;
        RingPair {
            to_server: RingFds {
                capacity: to_server,
                memfd: s_mem,
                empty_signal: s_empty,
                full_signal: s_full,
            },
            to_client: RingFds {
                capacity: to_client,
                memfd: c_mem,
                empty_signal: c_empty,
                full_signal: c_full,
            },
        }
    }

    /// The rings with each fd duplicated (`F_DUPFD_CLOEXEC`).
    pub fn try_clone(&self) -> std::io::Result<RingPair> {
        Ok(RingPair {
            to_server: self.to_server.try_clone()?,
            to_client: self.to_client.try_clone()?,
        })
    }
}

impl PeerFds {
    /// The rings and the hang-up socket, apart.
    pub fn split(self) -> (RingPair, std::os::fd::OwnedFd) {
        (
            RingPair {
                to_server: self.to_server,
                to_client: self.to_client,
            },
            self.hangup,
        )
    }

    /// A half from its rings and its end of the hang-up socket.
    pub fn join(rings: RingPair, hangup: std::os::fd::OwnedFd) -> PeerFds {
        PeerFds {
            to_server: rings.to_server,
            to_client: rings.to_client,
            hangup,
        }
    }
}

mod session;
pub use session::{cut, Caller, SessionParameters, Traffic, Wakeup, WakeupError};

#[cfg(feature = "dbus")]
mod accept;
#[cfg(feature = "dbus")]
mod bus;
#[cfg(feature = "dbus")]
pub mod dict;
#[cfg(feature = "dbus")]
pub use accept::{AcceptSession, AcceptSessionArgs};
#[cfg(feature = "dbus")]
pub use bus::{
    Bus, OpenSessionArgs, OpenSessionReply, OpenSessionViaArgs, OpenSessionViaReply, RingArg,
};
#[cfg(feature = "dbus")]
pub use dict::{CallerError, ParametersError, ValueError};

/// Members of `org.shmlink.Broker1` and `org.shmlink.Session1`.
pub mod member {
    /// Broker method that creates a session and returns its fds in the reply.
    pub const OPEN_SESSION: &str = "OpenSession";
    /// Broker method that creates a session and sends its rings over a
    /// socket the client passes (the reply carries no fds).
    pub const OPEN_SESSION_VIA: &str = "OpenSessionVia";
    /// Broker method that lists open sessions.
    pub const LIST_SESSIONS: &str = "ListSessions";
    /// Broker method with which a provider offers a service.
    pub const REGISTER_SERVICE: &str = "RegisterService";
    /// Broker method with which a provider withdraws a service.
    pub const UNREGISTER_SERVICE: &str = "UnregisterService";
    /// Broker method that lists services with their providers.
    pub const LIST_SERVICES: &str = "ListServices";
    /// Provider method the broker calls to hand over a session.
    pub const ACCEPT_SESSION: &str = "AcceptSession";
    /// Broker signal emitted when a session ends.
    pub const SESSION_CLOSED: &str = "SessionClosed";
    /// Broker property: version string.
    pub const VERSION: &str = "Version";
    /// Broker property: names of the hosted services.
    pub const SERVICES: &str = "Services";
    /// Broker property: number of open sessions.
    pub const SESSION_COUNT: &str = "SessionCount";
    /// Broker property: largest accepted ring capacity.
    pub const MAX_CAPACITY: &str = "MaxCapacity";
    /// Broker property: largest message a session carries.
    pub const MAX_MESSAGE_SIZE: &str = "MaxMessageSize";
    /// Session method that ends the session.
    pub const CLOSE: &str = "Close";
    /// Session property: service name.
    pub const SERVICE: &str = "Service";
    /// Session property: owner's unique bus name.
    pub const OWNER: &str = "Owner";
    /// Session property: owner's uid.
    pub const OWNER_UID: &str = "OwnerUid";
    /// Session property: owner's pid.
    pub const OWNER_PID: &str = "OwnerPid";
    /// Session property: payload bytes received by the service.
    pub const BYTES_TO_SERVER: &str = "BytesToServer";
    /// Session property: messages received by the service.
    pub const MESSAGES_TO_SERVER: &str = "MessagesToServer";
    /// Session property: payload bytes queued for the client.
    pub const BYTES_TO_CLIENT: &str = "BytesToClient";
    /// Session property: messages queued for the client.
    pub const MESSAGES_TO_CLIENT: &str = "MessagesToClient";
    /// Session property: service-specific state dictionary.
    pub const SERVICE_STATE: &str = "ServiceState";
}

/// Keys of the `options` dictionary of `OpenSession`.
pub mod option {
    /// Bytes per ring (`t` or `u`).
    pub const CAPACITY: &str = "capacity";
    /// Wake-up strategy (`s`): [`super::wakeup::PARK`] or [`super::wakeup::SPIN`].
    pub const WAKEUP: &str = "wakeup";
    /// Spin budget in microseconds for spin mode (`u`).
    pub const SPIN_US: &str = "spin-us";
    /// `source` service: size of each message (`t` or `u`).
    pub const MESSAGE_SIZE: &str = "message-size";
    /// `source` service: number of messages (`t` or `u`).
    pub const COUNT: &str = "count";
    /// `channel` service: name of the channel to join (`s`, required).
    pub const CHANNEL: &str = "channel";
}

/// Keys of the `parameters` dictionary `OpenSession` returns and `AcceptSession` carries
/// ([`SessionParameters`]).
pub mod param {
    /// Largest message either side may send (`t`).
    pub const MAX_MESSAGE: &str = "max-message";
    /// Negotiated wake-up strategy (`s`).
    pub const WAKEUP: &str = "wakeup";
    /// Negotiated spin budget in microseconds (`u`).
    pub const SPIN_US: &str = "spin-us";
}

/// Keys of the `caller` dictionary of `Provider1.AcceptSession` ([`Caller`]).
pub mod caller {
    /// The client's uid (`u`).
    pub const UID: &str = "uid";
    /// The client's pid (`u`).
    pub const PID: &str = "pid";
    /// The client's primary and supplementary gids (`au`).
    pub const GIDS: &str = "gids";
    /// The client's unique bus name (`s`).
    pub const BUS_NAME: &str = "bus-name";
}

/// Values of the `wakeup` option.
pub mod wakeup {
    /// Block on the eventfd as soon as the ring has nothing to do (default).
    pub const PARK: &str = "park";
    /// Busy-poll the ring for up to `spin-us` microseconds before blocking.
    pub const SPIN: &str = "spin";
}

/// D-Bus error names the broker returns.
pub mod error {
    /// `OpenSession` named a service the broker does not host.
    pub const UNKNOWN_SERVICE: &str = "org.shmlink.Error.UnknownService";
    /// An option key is unknown, ill-typed or out of range.
    pub const INVALID_OPTION: &str = "org.shmlink.Error.InvalidOption";
    /// An argument other than an option is wrong (the socket passed to
    /// `OpenSessionVia`): the standard D-Bus error.
    pub const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
    /// The `capacity` option is below the minimum or above the maximum.
    pub const INVALID_CAPACITY: &str = "org.shmlink.Error.InvalidCapacity";
    /// The session does not exist (any more).
    pub const UNKNOWN_SESSION: &str = "org.shmlink.Error.UnknownSession";
    /// A configured limit would be exceeded; the message names the limit.
    pub const LIMIT_EXCEEDED: &str = "org.shmlink.Error.LimitExceeded";
    /// The caller may not do this (not the owner, not allowed to use the service).
    pub const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
    /// The broker failed for a reason of its own (out of memory, fds, ...).
    pub const INTERNAL: &str = "org.shmlink.Error.Internal";
    /// `RegisterService`: a built-in service or another registration has the name.
    pub const NAME_TAKEN: &str = "org.shmlink.Error.NameTaken";
    /// A provider refused the session with an error outside this list; the
    /// message gives its reason.
    pub const REFUSED: &str = "org.shmlink.Error.Refused";
    /// The provider did not answer `AcceptSession` in time, left the bus, or
    /// answered wrongly.
    pub const PROVIDER_UNAVAILABLE: &str = "org.shmlink.Error.ProviderUnavailable";
}

/// Default and hard limits shared by both sides.
pub mod limits {
    /// How long the broker waits for a provider's `AcceptSession` answer by default.
    pub const DEFAULT_ACCEPT_TIMEOUT_MS: u64 = 5_000;
    /// Longest service name `RegisterService` accepts, in bytes.
    pub const MAX_SERVICE_NAME: usize = 255;
    /// Longest object path `RegisterService` accepts, in bytes: as long as
    /// the longest name D-Bus allows (bus, interface and member names), so a
    /// provider's object costs the broker no more to keep and log than its name.
    pub const MAX_OBJECT_PATH: usize = 255;
    /// Largest `OpenSession` call, in bytes as sent: far more than the
    /// options of any service need, and little for the broker to hold, or
    /// forward to a provider.
    pub const MAX_OPEN_SESSION: usize = 64 << 10;
    /// Ring capacity when the client does not ask for one.
    pub const DEFAULT_CAPACITY: u64 = 1 << 20;
    /// Smallest ring capacity a broker accepts.
    pub const MIN_CAPACITY: u64 = 64;
    /// Default largest ring capacity a broker accepts.
    pub const DEFAULT_MAX_CAPACITY: u64 = 64 << 20;
    /// Default largest message size.
    pub const DEFAULT_MAX_MESSAGE: u64 = 64 << 20;
    /// Largest message size any broker may configure (the frame length field is 32 bits).
    pub const HARD_MAX_MESSAGE: u64 = u32::MAX as u64;
    /// Default spin budget in microseconds for spin mode.
    pub const DEFAULT_SPIN_US: u32 = 50;
    /// Largest spin budget in microseconds.
    pub const MAX_SPIN_US: u32 = 10_000;
}

/// Built-in service names of the reference daemon.
pub mod service {
    /// Every message comes back unchanged, in order.
    pub const ECHO: &str = "echo";
    /// Discards messages, counting bytes and messages and keeping a CRC-32.
    pub const SINK: &str = "sink";
    /// Sends `count` messages of `message-size` bytes with a verifiable pattern.
    pub const SOURCE: &str = "source";
    /// Named channels: every message a member sends reaches every other member.
    pub const CHANNEL: &str = "channel";
}

/// The byte at `offset` of message number `index` that the `source` service sends.
///
/// Documented in DATA-PLANE.md so that clients in any language can verify it.
pub fn source_pattern_byte(index: u64, offset: u64) -> u8 {
    (index.wrapping_add(offset) % 251) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_names_every_constant() {
        for name in [
            member::OPEN_SESSION,
            member::OPEN_SESSION_VIA,
            member::LIST_SESSIONS,
            member::SESSION_CLOSED,
            member::VERSION,
            member::SERVICES,
            member::SESSION_COUNT,
            member::MAX_CAPACITY,
            member::MAX_MESSAGE_SIZE,
            member::REGISTER_SERVICE,
            member::UNREGISTER_SERVICE,
            member::LIST_SERVICES,
            BROKER_INTERFACE,
        ] {
            assert!(
                BROKER_XML.contains(&format!("\"{name}\"")),
                "{name} missing from Broker1 XML"
            );
        }
        for name in [
            member::CLOSE,
            member::SERVICE,
            member::OWNER,
            member::OWNER_UID,
            member::OWNER_PID,
            member::BYTES_TO_SERVER,
            member::MESSAGES_TO_SERVER,
            member::BYTES_TO_CLIENT,
            member::MESSAGES_TO_CLIENT,
            member::SERVICE_STATE,
            SESSION_INTERFACE,
        ] {
            assert!(
                SESSION_XML.contains(&format!("\"{name}\"")),
                "{name} missing from Session1 XML"
            );
        }
        for name in [member::ACCEPT_SESSION, PROVIDER_INTERFACE] {
            assert!(
                PROVIDER_XML.contains(&format!("\"{name}\"")),
                "{name} missing from Provider1 XML"
            );
        }
        for name in [
            error::UNKNOWN_SERVICE,
            error::INVALID_OPTION,
            error::INVALID_CAPACITY,
            error::LIMIT_EXCEEDED,
            error::ACCESS_DENIED,
            error::INTERNAL,
            error::NAME_TAKEN,
            error::REFUSED,
            error::PROVIDER_UNAVAILABLE,
        ] {
            assert!(
                BROKER_XML.contains(name),
                "{name} undocumented in Broker1 XML"
            );
        }
        assert!(SESSION_XML.contains(error::UNKNOWN_SESSION));
    }

    #[test]
    fn cloned_fds_are_new_fds_of_the_same_files() {
        use std::os::fd::{AsRawFd, OwnedFd};
        let file = |name: &str| -> OwnedFd {
            let path = std::env::temp_dir()
                .join(format!("shmlink-interfaces-{}-{name}", std::process::id()));
            let f = std::fs::File::create(&path).expect("create");
            std::fs::remove_file(&path).expect("remove");
            f.into()
        };
        let ring = |n: &str| RingFds {
            capacity: 64,
            memfd: file(&format!("{n}-memfd")),
            empty_signal: file(&format!("{n}-empty")),
            full_signal: file(&format!("{n}-full")),
        };
        let fds = PeerFds {
            to_server: ring("s"),
            to_client: ring("c"),
            hangup: file("hangup"),
        };
        let copy = fds.try_clone().expect("dup");
        let all = |f: &PeerFds| -> Vec<(i32, u64)> {
            use std::os::unix::fs::MetadataExt;
            [
                &f.to_server.memfd,
                &f.to_server.empty_signal,
                &f.to_server.full_signal,
                &f.to_client.memfd,
                &f.to_client.empty_signal,
                &f.to_client.full_signal,
                &f.hangup,
            ]
            .map(|fd| {
                let meta = std::fs::File::from(fd.try_clone().expect("dup"))
                    .metadata()
                    .expect("fstat");
                (fd.as_raw_fd(), meta.ino())
            })
            .to_vec()
        };
        let (a, b) = (all(&fds), all(&copy));
        assert_eq!(copy.to_server.capacity, 64);
        for ((fd_a, ino_a), (fd_b, ino_b)) in a.iter().zip(&b) {
            assert_ne!(fd_a, fd_b, "a new fd");
            assert_eq!(ino_a, ino_b, "of the same file, in the same role");
        }
        let distinct: std::collections::HashSet<u64> = a.iter().map(|(_, ino)| *ino).collect();
        assert_eq!(distinct.len(), 7);
    }

    #[test]
    fn source_pattern_is_periodic_in_251() {
        assert_eq!(source_pattern_byte(0, 0), 0);
        assert_eq!(source_pattern_byte(1, 250), 0);
        assert_eq!(source_pattern_byte(3, 4), 7);
    }
}
