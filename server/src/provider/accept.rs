//! `org.shmlink.Provider1`, exported by a [`Provider`](super::Provider): the
//! broker hands over the server's side of a session with `AcceptSession`,
//! which the provider's session table adopts.

use super::ProviderObject;
use crate::accounting::Refusal;
use crate::log_bounds::{cut, LOGGED_ERROR, LOGGED_STRING};
use dbus_crossroads::{Context, Crossroads, MethodErr};
use shmlink_interfaces::{error, member, AcceptSession, AcceptSessionArgs, PROVIDER_INTERFACE};

/// A crossroads instance exporting `org.shmlink.Provider1` at `path`, its
/// object data `host`.
pub(super) fn crossroads(path: dbus::Path<'static>, host: ProviderObject) -> Crossroads {
    let mut cr = Crossroads::new();
    let token = cr.register(PROVIDER_INTERFACE, |b| {
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
            |ctx: &mut Context, host: &mut ProviderObject, args: AcceptSessionArgs| {
                let sender = ctx.message().sender().map(|s| s.to_string());
                if !host.is_broker(sender.as_deref()) {
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
                let call = AcceptSession::try_from(args)
                    .map_err(|e| method_err(&Refusal::InvalidOption(e.to_string())))?;
                let label = cut(&call.session, LOGGED_STRING).into_owned();
                let service = call.service.clone();
                host.sessions.adopt(call).map(|_| ()).map_err(|e| {
                    log::warn!(
                        "session {label} of {:?} refused: {}",
                        cut(&service, LOGGED_STRING),
                        cut(&e.to_string(), LOGGED_ERROR)
                    );
                    method_err(&e)
                })
            },
        );
    });
    cr.insert(path, &[token], host);
    cr
}

/// The D-Bus error for a refusal of `AcceptSession`.
fn method_err(e: &Refusal) -> MethodErr {
    crate::dbus::refusal_error(e)
}
