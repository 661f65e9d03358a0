//! `org.shmlink.Broker1` on the broker object: open and list sessions,
//! register and list services, the broker's limits, and the
//! `SessionClosed` signal. Its data is the [`BrokerObject`]. (`OpenSession`
//! and `OpenSessionVia` of a registered service are answered later, when
//! its provider does: see [`super::handover`].)

use super::{open_member, sender_of, BrokerObject};
use crate::accounting::Refusal;
use crate::log_bounds::{cut, LOGGED_STRING};
use crate::sessions::{Handed, SessionInfo};
use dbus::arg::PropMap;
use dbus::Path;
use dbus_crossroads::{Context, Crossroads, IfaceToken, MethodErr};
use shmlink_interfaces::{
    member, OpenSessionArgs, OpenSessionReply, OpenSessionViaArgs, OpenSessionViaReply,
    BROKER_INTERFACE,
};
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// The broker object's data, which crossroads keeps at the path of the
/// object a method was called on.
fn control<'a>(cr: &'a mut Crossroads, ctx: &Context) -> Result<&'a mut BrokerObject, MethodErr> {
    cr.data_mut::<BrokerObject>(ctx.path())
        .ok_or_else(|| MethodErr::no_path(ctx.path()))
}

/// Opens a session of a hosted service for the caller of `ctx`'s call
/// (`OpenSession`, or `OpenSessionVia` with `via`) and publishes its
/// object: its path, the client's half and the reply's parameters.
fn open_hosted(
    ctx: &mut Context,
    cr: &mut Crossroads,
    session_token: IfaceToken<Arc<SessionInfo>>,
    service: &str,
    options: PropMap,
    via: Option<OwnedFd>,
) -> Result<(Path<'static>, Handed, PropMap), MethodErr> {
    let c = control(cr, ctx)?;
    let caller = c.caller_of(ctx.message())?;
    let call = open_member(via.is_some());
    let checked = c.reply_fds.check(&caller, via.is_none());
    let opened = match checked.and_then(|()| c.sessions.open(&caller, service, options, via)) {
        Ok(opened) => opened,
        Err(e) => {
            let uid = Some(caller.uid);
            c.refused(call, service, &caller.bus_name, uid, &e);
            return Err(c.method_err(&e));
        }
    };
    if matches!(opened.handed, Handed::Reply(_)) {
        c.reply_fds.charge(&caller);
    }
    let path: Path<'static> = c.names.session_path(opened.info.id).into();
    cr.insert(path.clone(), &[session_token], opened.info);
    Ok((path, opened.handed, opened.parameters.to_dict()))
}

pub(super) fn register(
    cr: &mut Crossroads,
    session_token: IfaceToken<Arc<SessionInfo>>,
) -> IfaceToken<BrokerObject> {
    cr.register(BROKER_INTERFACE, move |b| {
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
                let (session, handed, parameters) =
                    open_hosted(ctx, cr, session_token, &service, options, None)?;
                let Handed::Reply(fds) = handed else {
                    return Err(MethodErr::failed("rings sent over no socket"));
                };
                Ok(OpenSessionReply {
                    session,
                    fds,
                    parameters,
                }
                .into())
            },
        );
        b.method_with_cr(
            member::OPEN_SESSION_VIA,
            ("service", "options", "socket"),
            (
                "session",
                "to_server_capacity",
                "to_client_capacity",
                "parameters",
            ),
            move |ctx: &mut Context,
                  cr: &mut Crossroads,
                  (service, options, socket): (String, PropMap, OwnedFd)|
                  -> Result<OpenSessionViaArgs, MethodErr> {
                let (session, handed, parameters) =
                    open_hosted(ctx, cr, session_token, &service, options, Some(socket))?;
                let Handed::Sent(capacities) = handed else {
                    return Err(MethodErr::failed("rings for a reply, not a socket"));
                };
                Ok(OpenSessionViaReply {
                    session,
                    capacities,
                    parameters,
                }
                .into())
            },
        );
        b.method(
            member::LIST_SESSIONS,
            (),
            ("sessions",),
            |_ctx, c: &mut BrokerObject, ()| {
                let list: Vec<(Path<'static>, String, String, u32, u32)> = c
                    .sessions
                    .open_sessions()
                    .map(|s| {
                        (
                            c.names.session_path(s.id).into(),
                            s.service.clone(),
                            s.owner.bus_name.clone(),
                            s.owner.uid,
                            s.owner.pid,
                        )
                    })
                    .collect();
                Ok((list,))
            },
        );
        b.method(
            member::REGISTER_SERVICE,
            ("service", "object", "options"),
            (),
            |ctx,
             c: &mut BrokerObject,
             (service, object, options): (String, Path<'static>, PropMap)| {
                let caller = c.caller_of(ctx.message())?;
                let result = if options.is_empty() {
                    c.sessions.register(&caller, &service, &object)
                } else {
                    let mut keys: Vec<&str> = options.keys().map(String::as_str).collect();
                    keys.sort_unstable();
                    Err(Refusal::InvalidOption(format!(
                        "unknown registration option(s): {}",
                        cut(&keys.join(", "), LOGGED_STRING)
                    )))
                };
                let displaced = match result {
                    Ok(displaced) => displaced,
                    Err(e) => {
                        let uid = Some(caller.uid);
                        c.refused(
                            member::REGISTER_SERVICE,
                            &service,
                            &caller.bus_name,
                            uid,
                            &e,
                        );
                        return Err(c.method_err(&e));
                    }
                };
                if c.sessions.admit_success_line(caller.uid) {
                    log::info!(
                        "service {service} registered by {} (uid {}, pid {}) at {}",
                        caller.bus_name,
                        caller.uid,
                        caller.pid,
                        cut(&object, LOGGED_STRING)
                    );
                    if let Some(old) = displaced {
                        log::warn!(
                            "service {service} taken over from {} (uid {}) by {} (uid {}), \
                             whose claim to the name is stronger; sessions already open go on",
                            old.bus_name,
                            old.uid,
                            caller.bus_name,
                            caller.uid
                        );
                    }
                }
                ctx.push_msg(c.services_changed());
                Ok(())
            },
        );
        b.method(
            member::UNREGISTER_SERVICE,
            ("service",),
            (),
            |ctx, c: &mut BrokerObject, (service,): (String,)| {
                let sender = sender_of(ctx.message());
                if let Err(e) = c.sessions.unregister(&sender, &service) {
                    let uid = c.uid_of(&sender);
                    c.refused(member::UNREGISTER_SERVICE, &service, &sender, uid, &e);
                    return Err(c.method_err(&e));
                }
                let uid = c.uid_of(&sender).unwrap_or(u32::MAX);
                if c.sessions.admit_success_line(uid) {
                    log::info!(
                        "service {} withdrawn by {sender}",
                        cut(&service, LOGGED_STRING)
                    );
                }
                ctx.push_msg(c.services_changed());
                Ok(())
            },
        );
        b.method(
            member::LIST_SERVICES,
            (),
            ("services",),
            |_ctx, c: &mut BrokerObject, ()| {
                let accounting = c.sessions.accounting();
                let own = accounting.own_uid();
                let mut list: Vec<(String, String, u32)> = c
                    .sessions
                    .hosted_names()
                    .map(|n| (n.to_owned(), String::new(), own))
                    .chain(accounting.registrations().map(|r| {
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
            .get(|_, _: &mut BrokerObject| Ok(env!("CARGO_PKG_VERSION").to_owned()));
        b.property(member::SERVICES)
            .emits_changed_true()
            .get(|_, c: &mut BrokerObject| Ok(c.sessions.service_names()));
        b.property(member::SESSION_COUNT)
            .emits_changed_false()
            .get(|_, c: &mut BrokerObject| Ok(c.sessions.open_count() as u32));
        b.property(member::MAX_CAPACITY)
            .emits_changed_const()
            .get(|_, c: &mut BrokerObject| Ok(c.sessions.accounting().limits().max_capacity));
        b.property(member::MAX_MESSAGE_SIZE)
            .emits_changed_const()
            .get(|_, c: &mut BrokerObject| Ok(c.sessions.accounting().limits().max_message));
    })
}
