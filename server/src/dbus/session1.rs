//! `org.shmlink.Session1` on each session object: its owner, its traffic,
//! its service's state, and `Close`. Each object carries its own
//! [`SessionRecord`], so reading a property never waits for the worker that
//! serves the session.

use super::{method_err, retire, Shared};
use crate::broker::BrokerError;
use crate::lock;
use crate::sessions::SessionRecord;
use dbus::arg::PropMap;
use dbus_crossroads::{Context, Crossroads, IfaceToken, MethodErr, PropContext};
use shmlink_interfaces::{member, SESSION_INTERFACE};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Checks that the reader of a property of `record` is its owner or root.
fn authorize(shared: &Shared, ctx: &PropContext, record: &SessionRecord) -> Result<(), MethodErr> {
    let c = lock(shared);
    let sender = match ctx.message() {
        Some(msg) => msg.sender().map(|s| s.to_string()).unwrap_or_default(),
        None => c.peers.current().to_owned(),
    };
    c.sessions
        .broker()
        .authorize(record.id, c.peers.get(&sender), &sender)
        .map(|_| ())
        .map_err(|e| method_err(&e))
}

/// Picks one of a session's traffic counters.
type Counter = fn(&SessionRecord) -> &AtomicU64;

pub(super) fn register(cr: &mut Crossroads, shared: Shared) -> IfaceToken<SessionRecord> {
    cr.register(SESSION_INTERFACE, move |b| {
        let sh = shared.clone();
        b.method_with_cr(
            member::CLOSE,
            (),
            (),
            move |ctx: &mut Context, cr: &mut Crossroads, ()| {
                let id = cr
                    .data_mut::<SessionRecord>(ctx.path())
                    .map(|r| r.id)
                    .ok_or_else(|| {
                        method_err(&BrokerError::UnknownSession(ctx.path().to_string()))
                    })?;
                let sender = ctx
                    .message()
                    .sender()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let mut c = lock(&sh);
                let owner = c
                    .sessions
                    .broker()
                    .authorize(id, c.peers.get(&sender), &sender)
                    .map(|r| r.owner.bus_name.clone());
                let owner = match owner {
                    Ok(owner) => owner,
                    Err(e) => {
                        let uid = c.peers.get(&sender).map_or(u32::MAX, |p| p.uid);
                        c.log_refusal(uid, || {
                            format!("Close of session {id} by {sender} (uid {uid}) refused: {e}")
                        });
                        return Err(method_err(&e));
                    }
                };
                // `authorize` let through the owner or root; say which.
                let reason = if owner == sender {
                    "closed by its owner".to_owned()
                } else {
                    format!("closed by root ({sender})")
                };
                let ended = c.sessions.end_session(id, &reason);
                drop(c);
                if let Some(ended) = ended {
                    ctx.push_msg(retire(cr, &ended, &reason));
                }
                Ok(())
            },
        );
        b.property::<String, _>(member::SERVICE)
            .emits_changed_const()
            .get(|_, r: &mut SessionRecord| Ok(r.service.clone()));
        b.property::<String, _>(member::OWNER)
            .emits_changed_const()
            .get(|_, r: &mut SessionRecord| Ok(r.owner.bus_name.clone()));
        b.property::<u32, _>(member::OWNER_UID)
            .emits_changed_const()
            .get(|_, r: &mut SessionRecord| Ok(r.owner.uid));
        b.property::<u32, _>(member::OWNER_PID)
            .emits_changed_const()
            .get(|_, r: &mut SessionRecord| Ok(r.owner.pid));
        let counters: [(&str, Counter); 4] = [
            (member::BYTES_TO_SERVER, |r| &r.traffic.bytes_to_server),
            (member::MESSAGES_TO_SERVER, |r| {
                &r.traffic.messages_to_server
            }),
            (member::BYTES_TO_CLIENT, |r| &r.traffic.bytes_to_client),
            (member::MESSAGES_TO_CLIENT, |r| {
                &r.traffic.messages_to_client
            }),
        ];
        for (name, counter) in counters {
            let sh = shared.clone();
            b.property::<u64, _>(name).emits_changed_false().get(
                move |ctx, r: &mut SessionRecord| {
                    authorize(&sh, ctx, r)?;
                    Ok(counter(r).load(Relaxed))
                },
            );
        }
        let sh = shared.clone();
        b.property::<PropMap, _>(member::SERVICE_STATE)
            .emits_changed_false()
            .get(move |ctx, r: &mut SessionRecord| {
                authorize(&sh, ctx, r)?;
                Ok(r.state.as_ref().map(|s| s.state()).unwrap_or_default())
            });
    })
}
