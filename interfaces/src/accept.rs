//! `Provider1.AcceptSession`: its arguments as a named struct and as they
//! travel.

use crate::bus::RingArg;
use crate::{Caller, CallerError, PeerFds};
use dbus::arg::{OwnedFd, PropMap};

/// The arguments of `AcceptSession` as they travel, in wire order: session
/// path, service, `caller`, `options`, the client→server ring, the
/// server→client ring (each `(thhh)`), the hang-up socket, the link, the
/// `parameters`.
pub type AcceptSessionArgs = (
    dbus::Path<'static>,
    String,
    PropMap,
    PropMap,
    RingArg,
    RingArg,
    OwnedFd,
    OwnedFd,
    PropMap,
);

/// The arguments of `AcceptSession`: what the broker hands a provider for
/// one session.
#[derive(Debug)]
pub struct AcceptSession {
    /// The session's object path at the broker.
    pub session: dbus::Path<'static>,
    /// The registered name the client opened.
    pub service: String,
    /// Who opened the session.
    pub caller: Caller,
    /// The client's options without the ring options.
    pub options: PropMap,
    /// The rings (the provider reads `to_server`, writes `to_client`) and
    /// the provider's end of a hang-up socket whose other end the broker
    /// holds.
    pub fds: PeerFds,
    /// The provider's end of the link to the broker.
    pub link: OwnedFd,
    /// The negotiated parameters, as the client gets them; a provider
    /// decodes them against its own `max-message` limit with
    /// [`SessionParameters::from_dict`](crate::SessionParameters::from_dict).
    pub parameters: PropMap,
}

impl From<AcceptSession> for AcceptSessionArgs {
    fn from(a: AcceptSession) -> Self {
        let PeerFds {
            to_server,
            to_client,
            hangup,
        } = a.fds;
        (
            a.session,
            a.service,
            a.caller.to_dict(),
            a.options,
            to_server.into(),
            to_client.into(),
            hangup,
            a.link,
            a.parameters,
        )
    }
}

impl TryFrom<AcceptSessionArgs> for AcceptSession {
    type Error = CallerError;

    /// Fails only on the `caller` dictionary ([`Caller::from_dict`]).
    fn try_from(args: AcceptSessionArgs) -> Result<Self, CallerError> {
        let (session, service, caller, options, to_server, to_client, hangup, link, parameters) =
            args;
        Ok(AcceptSession {
            session,
            service,
            caller: Caller::from_dict(&caller)?,
            options,
            fds: PeerFds {
                to_server: to_server.into(),
                to_client: to_client.into(),
                hangup,
            },
            link,
            parameters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SessionParameters, Wakeup};
    use dbus::arg::{RefArg, Variant};
    use std::os::fd::{AsRawFd, OwnedFd};

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").expect("open").into()
    }

    fn ring(capacity: u64) -> crate::RingFds {
        crate::RingFds {
            capacity,
            memfd: fd(),
            empty_signal: fd(),
            full_signal: fd(),
        }
    }

    /// The fd numbers of a half, in wire order.
    fn raw_fds(f: &PeerFds) -> [std::os::fd::RawFd; 7] {
        [
            f.to_server.memfd.as_raw_fd(),
            f.to_server.empty_signal.as_raw_fd(),
            f.to_server.full_signal.as_raw_fd(),
            f.to_client.memfd.as_raw_fd(),
            f.to_client.empty_signal.as_raw_fd(),
            f.to_client.full_signal.as_raw_fd(),
            f.hangup.as_raw_fd(),
        ]
    }

    #[test]
    fn accept_session_round_trips_with_its_fds_in_their_roles() {
        let fds = PeerFds {
            to_server: ring(4096),
            to_client: ring(8192),
            hangup: fd(),
        };
        let raw = raw_fds(&fds);
        let link = fd();
        let link_raw = link.as_raw_fd();
        let mut options = PropMap::new();
        options.insert("count".into(), Variant(Box::new(3u32) as Box<dyn RefArg>));
        let parameters = SessionParameters {
            max_message: 1 << 20,
            wakeup: Wakeup::Park,
        };
        let call = AcceptSession {
            session: dbus::Path::from("/org/shmlink/Broker1/session/7"),
            service: "frames".into(),
            caller: Caller {
                bus_name: ":1.4".into(),
                uid: 1000,
                pid: 99,
                gids: vec![1000],
            },
            options,
            fds,
            link,
            parameters: parameters.to_dict(),
        };
        let args = AcceptSessionArgs::from(call);
        assert_eq!((args.4 .0, args.5 .0), (4096, 8192));
        assert_eq!(args.2.len(), 4, "caller as its dictionary");
        let back = AcceptSession::try_from(args).expect("decodes");
        assert_eq!(&*back.session, "/org/shmlink/Broker1/session/7");
        assert_eq!(back.service, "frames");
        assert_eq!((back.caller.uid, back.caller.pid), (1000, 99));
        assert_eq!(back.options["count"].0.as_u64(), Some(3));
        assert_eq!(
            SessionParameters::from_dict(&back.parameters, 1 << 20),
            Ok(parameters)
        );
        assert_eq!(raw_fds(&back.fds), raw);
        assert_eq!(back.link.as_raw_fd(), link_raw);
    }

    #[test]
    fn a_bad_caller_dictionary_is_the_only_failure() {
        let args: AcceptSessionArgs = (
            dbus::Path::from("/x"),
            "s".into(),
            PropMap::new(),
            PropMap::new(),
            (64, fd(), fd(), fd()),
            (64, fd(), fd(), fd()),
            fd(),
            fd(),
            PropMap::new(),
        );
        let e = AcceptSession::try_from(args).expect_err("no caller");
        assert_eq!(e.key, crate::caller::BUS_NAME);
    }
}
