//! `org.shmlink.Provider1`, exported by a [`Provider`](crate::Provider):
//! the broker hands over the server's side of a session with `AcceptSession`.

use super::method_err;
use crate::broker::BrokerError;
use crate::lock;
use crate::logcap::{cut, LOGGED_ERROR, LOGGED_STRING};
use crate::provider::{AcceptRequest, Core};
use crate::service::Caller;
use dbus::arg::{OwnedFd, PropMap, RefArg};
use dbus_crossroads::{Context, Crossroads, MethodErr};
use shmlink_interfaces::{caller, error, member, PeerFds, RingFds, PROVIDER_INTERFACE};
use std::sync::{Arc, Mutex};

/// A ring as it travels: capacity, memfd, empty and full eventfds.
type RingArg = (u64, OwnedFd, OwnedFd, OwnedFd);

/// The arguments of `AcceptSession`, in wire order.
type AcceptArgs = (
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

/// A crossroads instance exporting `org.shmlink.Provider1` at `path` over `core`.
pub(crate) fn crossroads(path: &str, core: Arc<Mutex<Core>>) -> Crossroads {
    let mut cr = Crossroads::new();
    let token = cr.register(PROVIDER_INTERFACE, move |b| {
        let core = core.clone();
        b.method(
            member::ACCEPT_SESSION,
            (
                "session",
                "service",
                "caller",
                "options",
                "to_server",
                "to_client",
                "hangup",
                "link",
                "parameters",
            ),
            (),
            move |ctx: &mut Context, _: &mut (), args: AcceptArgs| {
                let sender = ctx.message().sender().map(|s| s.to_string());
                let mut c = lock(&core);
                if !c.is_broker(sender.as_deref()) {
                    // Any connection can call: not worth a warning each time.
                    log::debug!(
                        "AcceptSession from {} refused: not the broker",
                        sender.as_deref().unwrap_or("?")
                    );
                    return Err(MethodErr::from((
                        error::ACCESS_DENIED,
                        "only the broker this provider registered with may call AcceptSession",
                    )));
                }
                let req = request(args)?;
                let session = cut(&req.session, LOGGED_STRING).into_owned();
                let service = req.service.clone();
                c.accept(req).map_err(|e| {
                    log::warn!(
                        "session {session} of {:?} refused: {}",
                        cut(&service, LOGGED_STRING),
                        cut(&e.to_string(), LOGGED_ERROR)
                    );
                    method_err(&e)
                })
            },
        );
    });
    cr.insert(path.to_owned(), &[token], ());
    cr
}

fn ring((capacity, memfd, empty_signal, full_signal): RingArg) -> RingFds {
    RingFds {
        capacity,
        memfd,
        empty_signal,
        full_signal,
    }
}

/// The call's arguments in their roles; the `caller` dictionary typed.
fn request(args: AcceptArgs) -> Result<AcceptRequest, MethodErr> {
    let (session, service, who, options, to_server, to_client, hangup, link, parameters) = args;
    Ok(AcceptRequest {
        session: session.to_string(),
        service,
        caller: parse_caller(&who).map_err(|e| method_err(&e))?,
        options,
        fds: PeerFds {
            to_server: ring(to_server),
            to_client: ring(to_client),
            hangup,
        },
        link,
        parameters,
    })
}

/// The `caller` dictionary: `uid` (u), `pid` (u), `gids` (au), `bus-name` (s), all required.
pub(crate) fn parse_caller(dict: &PropMap) -> Result<Caller, BrokerError> {
    let bad = |key: &str, ty: &str| {
        BrokerError::InvalidOption(format!(
            "AcceptSession caller: {key:?} must be present with type {ty}"
        ))
    };
    let get = |key: &str| dict.get(key).map(|v| &v.0);
    let u32_of = |key: &str| {
        get(key)
            .filter(|v| &*v.signature() == "u")
            .and_then(|v| v.as_u64())
            .map(|n| n as u32)
            .ok_or_else(|| bad(key, "u"))
    };
    let bus_name = get(caller::BUS_NAME)
        .filter(|v| &*v.signature() == "s")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad(caller::BUS_NAME, "s"))?
        .to_owned();
    let gids = get(caller::GIDS)
        .filter(|v| &*v.signature() == "au")
        .and_then(|v| v.as_iter())
        .ok_or_else(|| bad(caller::GIDS, "au"))?
        .filter_map(|g| g.as_u64().map(|g| g as u32))
        .collect();
    Ok(Caller {
        bus_name,
        uid: u32_of(caller::UID)?,
        pid: u32_of(caller::PID)?,
        gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::prop;

    #[test]
    fn the_caller_dictionary_is_typed() {
        let mut d = PropMap::new();
        d.insert(caller::UID.into(), prop(1000u32));
        d.insert(caller::PID.into(), prop(42u32));
        d.insert(caller::GIDS.into(), prop(vec![1000u32, 27]));
        d.insert(caller::BUS_NAME.into(), prop(":1.9".to_owned()));
        let c = parse_caller(&d).expect("typed");
        assert_eq!(
            (c.uid, c.pid, c.gids.clone(), c.bus_name.as_str()),
            (1000, 42, vec![1000, 27], ":1.9")
        );
        d.insert(caller::UID.into(), prop(1000u64));
        let e = parse_caller(&d).expect_err("a uid as t is refused");
        assert!(
            e.to_string()
                .contains("\"uid\" must be present with type u"),
            "{e}"
        );
        d.insert(caller::UID.into(), prop(1000u32));
        d.remove(caller::GIDS);
        let e = parse_caller(&d).expect_err("gids are required");
        assert!(e.to_string().contains("\"gids\""), "{e}");
    }
}
