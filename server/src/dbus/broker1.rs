//! `org.shmlink.Broker1` at `/org/shmlink/Broker1`: open and list sessions,
//! register and list services, the broker's limits, and the
//! `SessionClosed` signal. (`OpenSession` of a registered service is
//! answered later, when its provider does: see [`super::provided`].)

use super::{method_err, Shared};
use crate::broker::BrokerError;
use crate::lock;
use crate::logcap::{cut, LOGGED_ERROR, LOGGED_STRING};
use crate::sessions::SessionRecord;
use dbus::arg::PropMap;
use dbus::Path;
use dbus_crossroads::{Context, Crossroads, IfaceToken, MethodErr};
use shmlink_interfaces::{member, OpenSessionArgs, OpenSessionReply, BROKER_INTERFACE};

pub(super) fn register(
    cr: &mut Crossroads,
    shared: Shared,
    session_token: IfaceToken<SessionRecord>,
) -> IfaceToken<()> {
    cr.register(BROKER_INTERFACE, move |b| {
        let sh = shared.clone();
        b.method_with_cr(
            member::OPEN_SESSION,
            ("service", "options"),
            (
                "session",
                "to_server_capacity",
                "to_server_memfd",
                "to_server_empty",
                "to_server_full",
                "to_client_capacity",
                "to_client_memfd",
                "to_client_empty",
                "to_client_full",
                "hangup",
                "parameters",
            ),
            move |ctx: &mut Context,
                  cr: &mut Crossroads,
                  (service, options): (String, PropMap)|
                  -> Result<OpenSessionArgs, MethodErr> {
                let mut c = lock(&sh);
                let caller = c.peers.caller_of(ctx.message())?;
                let opened = match c.sessions.open(&caller, &service, options) {
                    Ok(opened) => opened,
                    Err(e) => {
                        c.log_refusal(caller.uid, || {
                            format!(
                                "OpenSession({:?}) from {} (uid {}) refused: {}",
                                cut(&service, LOGGED_STRING),
                                caller.bus_name,
                                caller.uid,
                                cut(&e.to_string(), LOGGED_ERROR)
                            )
                        });
                        return Err(method_err(&e));
                    }
                };
                drop(c);
                let path = opened.record.path.clone();
                cr.insert(path.clone(), &[session_token], opened.record);
                Ok(OpenSessionReply {
                    session: path,
                    fds: opened.fds,
                    parameters: opened.params,
                }
                .into())
            },
        );
        let sh = shared.clone();
        b.method(
            member::LIST_SESSIONS,
            (),
            ("sessions",),
            move |_ctx, _: &mut (), ()| {
                let c = lock(&sh);
                let list: Vec<(Path<'static>, String, String, u32, u32)> = c
                    .sessions
                    .broker()
                    .reservations()
                    .filter(|r| c.sessions.is_open(r.id))
                    .map(|r| {
                        (
                            c.sessions.broker().session_path(r.id).into(),
                            r.service.clone(),
                            r.owner.bus_name.clone(),
                            r.owner.uid,
                            r.owner.pid,
                        )
                    })
                    .collect();
                Ok((list,))
            },
        );
        let sh = shared.clone();
        b.method(
            member::REGISTER_SERVICE,
            ("service", "object", "options"),
            (),
            move |ctx, _: &mut (), (service, object, options): (String, Path<'static>, PropMap)| {
                let mut c = lock(&sh);
                let caller = c.peers.caller_of(ctx.message())?;
                let result = if options.is_empty() {
                    let builtin = c.sessions.is_builtin(&service);
                    c.sessions
                        .broker_mut()
                        .register(&caller, &service, object.clone(), builtin)
                        .map(|_| ())
                } else {
                    let mut keys: Vec<&str> = options.keys().map(String::as_str).collect();
                    keys.sort_unstable();
                    Err(BrokerError::InvalidOption(format!(
                        "unknown registration option(s): {}",
                        cut(&keys.join(", "), LOGGED_STRING)
                    )))
                };
                if let Err(e) = result {
                    c.log_refusal(caller.uid, || {
                        format!(
                            "RegisterService({:?}) from {} (uid {}) refused: {}",
                            cut(&service, LOGGED_STRING),
                            caller.bus_name,
                            caller.uid,
                            cut(&e.to_string(), LOGGED_ERROR)
                        )
                    });
                    return Err(method_err(&e));
                }
                log::info!(
                    "service {service} registered by {} (uid {}, pid {}) at {object}",
                    caller.bus_name,
                    caller.uid,
                    caller.pid
                );
                ctx.push_msg(c.services_changed());
                Ok(())
            },
        );
        let sh = shared.clone();
        b.method(
            member::UNREGISTER_SERVICE,
            ("service",),
            (),
            move |ctx, _: &mut (), (service,): (String,)| {
                let mut c = lock(&sh);
                let sender = ctx
                    .message()
                    .sender()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                if let Err(e) = c.sessions.broker_mut().unregister(&sender, &service) {
                    let uid = c.peers.get(&sender).map_or(u32::MAX, |p| p.uid);
                    c.log_refusal(uid, || {
                        format!(
                            "UnregisterService from {sender} (uid {uid}) refused: {}",
                            cut(&e.to_string(), LOGGED_ERROR)
                        )
                    });
                    return Err(method_err(&e));
                }
                log::info!("service {service} withdrawn by {sender}");
                ctx.push_msg(c.services_changed());
                Ok(())
            },
        );
        let sh = shared.clone();
        b.method(
            member::LIST_SERVICES,
            (),
            ("services",),
            move |_ctx, _: &mut (), ()| {
                let c = lock(&sh);
                let own = c.sessions.broker().own_uid();
                let mut list: Vec<(String, String, u32)> = c
                    .sessions
                    .builtin_names()
                    .map(|n| (n.to_owned(), String::new(), own))
                    .chain(c.sessions.broker().registrations().map(|r| {
                        (
                            r.service.clone(),
                            r.provider.bus_name.clone(),
                            r.provider.uid,
                        )
                    }))
                    .collect();
                list.sort();
                Ok((list,))
            },
        );
        b.signal::<(Path<'static>, String), _>(member::SESSION_CLOSED, ("session", "reason"));
        b.property(member::VERSION)
            .emits_changed_const()
            .get(|_, _: &mut ()| Ok(env!("CARGO_PKG_VERSION").to_owned()));
        let sh = shared.clone();
        b.property(member::SERVICES)
            .emits_changed_true()
            .get(move |_, _: &mut ()| Ok(lock(&sh).sessions.service_names()));
        let sh = shared.clone();
        b.property(member::SESSION_COUNT)
            .emits_changed_false()
            .get(move |_, _: &mut ()| Ok(lock(&sh).sessions.open_count() as u32));
        let sh = shared.clone();
        b.property(member::MAX_CAPACITY)
            .emits_changed_const()
            .get(move |_, _: &mut ()| Ok(lock(&sh).sessions.broker().limits().max_capacity));
        let sh = shared.clone();
        b.property(member::MAX_MESSAGE_SIZE)
            .emits_changed_const()
            .get(move |_, _: &mut ()| Ok(lock(&sh).sessions.broker().limits().max_message));
    })
}
