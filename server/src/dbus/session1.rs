//! `org.shmlink.Session1` on each session object: its owner, its traffic,
//! its service's state, and `Close`. Each object carries its session's
//! [`SessionInfo`], so reading a property never waits for the worker that
//! serves the session.

use super::callers::Callers;
use super::{sender_of, BrokerObject};
use crate::lock;
use crate::names::broker_path_of;
use crate::sessions::SessionInfo;
use dbus::arg::PropMap;
use dbus_crossroads::{Context, Crossroads, IfaceToken, MethodErr, PropContext};
use shmlink_interfaces::{error, member, SESSION_INTERFACE};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Checks that the reader of a property of `info` is its owner or root.
fn authorize(
    callers: &Mutex<Callers>,
    ctx: &PropContext,
    info: &SessionInfo,
) -> Result<(), MethodErr> {
    let callers = lock(callers);
    let sender = match ctx.message() {
        Some(msg) => sender_of(msg),
        None => callers.current().to_owned(),
    };
    let root = callers.get(&sender).is_some_and(|c| c.uid == 0);
    if info.owner.bus_name == sender || root {
        return Ok(());
    }
    let text = super::not_owner(ctx.path(), &info.owner.bus_name, &sender);
    Err(MethodErr::from((error::ACCESS_DENIED, text)))
}

/// Picks one of a session's traffic counters.
type Counter = fn(&SessionInfo) -> &AtomicU64;

pub(super) fn register(
    cr: &mut Crossroads,
    callers: Arc<Mutex<Callers>>,
) -> IfaceToken<Arc<SessionInfo>> {
    cr.register(SESSION_INTERFACE, move |b| {
        b.method_with_cr(
            member::CLOSE,
            (),
            (),
            move |ctx: &mut Context, cr: &mut Crossroads, ()| {
                let id = cr
                    .data_mut::<Arc<SessionInfo>>(ctx.path())
                    .map(|s| s.id)
                    .ok_or_else(|| MethodErr::no_path(ctx.path()))?;
                let sender = sender_of(ctx.message());
                let broker: dbus::Path<'static> = broker_path_of(ctx.path()).to_owned().into();
                let c = cr
                    .data_mut::<BrokerObject>(&broker)
                    .ok_or_else(|| MethodErr::no_path(&broker))?;
                let caller = lock(&c.callers).get(&sender).cloned();
                let owner = match c.sessions.authorize(id, caller.as_ref(), &sender) {
                    Ok(info) => info.owner.bus_name.clone(),
                    Err(e) => {
                        let uid = caller.map(|c| c.uid);
                        c.refused(member::CLOSE, ctx.path(), &sender, uid, &e);
                        return Err(c.method_err(&e));
                    }
                };
                // `authorize` let through the owner or root; say which.
                let reason = if owner == sender {
                    "closed by its owner".to_owned()
                } else {
                    format!("closed by root ({sender})")
                };
                if let Some(ended) = c.sessions.end(id, &reason) {
                    let signal = super::session_closed(&broker, ctx.path().clone(), &ended.reason);
                    cr.remove::<Arc<SessionInfo>>(ctx.path());
                    ctx.push_msg(signal);
                }
                Ok(())
            },
        );
        b.property::<String, _>(member::SERVICE)
            .emits_changed_const()
            .get(|_, s: &mut Arc<SessionInfo>| Ok(s.service.clone()));
        b.property::<String, _>(member::OWNER)
            .emits_changed_const()
            .get(|_, s: &mut Arc<SessionInfo>| Ok(s.owner.bus_name.clone()));
        b.property::<u32, _>(member::OWNER_UID)
            .emits_changed_const()
            .get(|_, s: &mut Arc<SessionInfo>| Ok(s.owner.uid));
        b.property::<u32, _>(member::OWNER_PID)
            .emits_changed_const()
            .get(|_, s: &mut Arc<SessionInfo>| Ok(s.owner.pid));
        let counters: [(&str, Counter); 4] = [
            (member::BYTES_TO_SERVER, |s| &s.traffic.bytes_to_server),
            (member::MESSAGES_TO_SERVER, |s| {
                &s.traffic.messages_to_server
            }),
            (member::BYTES_TO_CLIENT, |s| &s.traffic.bytes_to_client),
            (member::MESSAGES_TO_CLIENT, |s| {
                &s.traffic.messages_to_client
            }),
        ];
        for (name, counter) in counters {
            let callers = callers.clone();
            b.property::<u64, _>(name).emits_changed_false().get(
                move |ctx, s: &mut Arc<SessionInfo>| {
                    authorize(&callers, ctx, s)?;
                    Ok(counter(s).load(Relaxed))
                },
            );
        }
        let callers = callers.clone();
        b.property::<PropMap, _>(member::SERVICE_STATE)
            .emits_changed_false()
            .get(move |ctx, s: &mut Arc<SessionInfo>| {
                authorize(&callers, ctx, s)?;
                Ok(s.state.as_ref().map(|s| s.state()).unwrap_or_default())
            });
    })
}
