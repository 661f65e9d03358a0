//! Who is calling: the credentials the bus reports for each connection,
//! learnt once per connection and forgotten when it leaves the bus.

use crate::service::Caller;
use dbus::arg::PropMap;
use dbus::channel::Sender;
use dbus::message::MatchRule;
use dbus::Message;
use dbus_crossroads::MethodErr;
use shmlink_interfaces::{DBUS_NAME, DBUS_PATH};
use std::collections::HashMap;

/// The signal that tells us a connection left the bus (an empty new owner).
pub(crate) fn name_owner_changed() -> MatchRule<'static> {
    MatchRule::new_signal(DBUS_NAME, "NameOwnerChanged").with_sender(DBUS_NAME)
}

/// If `msg` says that the unique name of a connection lost its owner,
/// returns that name.
pub(crate) fn connection_left(msg: &Message) -> Option<String> {
    if !name_owner_changed().matches(msg) {
        return None;
    }
    let (name, _old, new) = msg.read3::<String, String, String>().ok()?;
    (new.is_empty() && name.starts_with(':')).then_some(name)
}

/// Credentials of the connections that called us, by unique name.
#[derive(Default)]
pub(crate) struct Callers {
    callers: HashMap<String, Caller>,
    /// Sender of the method call being dispatched (crossroads does not pass
    /// the message to property getters called from `GetAll`).
    current: String,
}

impl Callers {
    /// Whether the credentials of `sender` are known.
    pub fn knows(&self, sender: &str) -> bool {
        self.callers.contains_key(sender)
    }

    /// Records the credentials of a connection.
    pub fn insert(&mut self, caller: Caller) {
        self.callers.insert(caller.bus_name.clone(), caller);
    }

    /// Forgets a connection that left the bus.
    pub fn forget(&mut self, bus_name: &str) {
        self.callers.remove(bus_name);
    }

    /// The credentials of `sender`, if known.
    pub fn get(&self, sender: &str) -> Option<&Caller> {
        self.callers.get(sender)
    }

    /// Notes the sender of the method call being dispatched.
    pub fn set_current(&mut self, sender: &str) {
        sender.clone_into(&mut self.current);
    }

    /// The sender of the method call being dispatched.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// The credentials of the caller of `msg`, or an `Internal` error.
    pub fn caller_of(&self, msg: &Message) -> Result<Caller, MethodErr> {
        let sender = msg
            .sender()
            .ok_or_else(|| MethodErr::failed("message without sender"))?;
        self.callers.get(&*sender).cloned().ok_or_else(|| {
            MethodErr::from((
                shmlink_interfaces::error::INTERNAL,
                format!("could not learn the credentials of {sender}"),
            ))
        })
    }
}

/// Asks the bus who `sender` is (`GetConnectionCredentials`) without waiting
/// for the answer; returns the serial its reply will carry (see [`parse`]).
///
/// Never a blocking call: the bus may have megabytes of other callers'
/// messages queued for us ahead of the reply, and the D-Bus thread must go
/// on serving them meanwhile.
pub(crate) fn ask(conn: &impl Sender, sender: &str) -> Result<u32, dbus::Error> {
    let call =
        Message::new_method_call(DBUS_NAME, DBUS_PATH, DBUS_NAME, "GetConnectionCredentials")
            .map_err(|e| dbus::Error::new_failed(&e))?
            .append1(sender);
    conn.send(call)
        .map_err(|()| dbus::Error::new_failed("cannot queue GetConnectionCredentials"))
}

/// The credentials of `sender` from the bus's reply to [`ask`].
pub(crate) fn parse(sender: &str, reply: &Message) -> Result<Caller, dbus::Error> {
    if reply.msg_type() == dbus::message::MessageType::Error {
        let mut reply = reply.duplicate().map_err(|e| dbus::Error::new_failed(&e))?;
        return Err(reply
            .as_result()
            .err()
            .unwrap_or_else(|| dbus::Error::new_failed("error reply")));
    }
    let creds: PropMap = reply
        .read1()
        .map_err(|e| dbus::Error::new_failed(&e.to_string()))?;
    let uid = creds
        .get("UnixUserID")
        .and_then(|v| v.0.as_u64())
        .ok_or_else(|| dbus::Error::new_failed("bus did not report UnixUserID"))?;
    let pid = creds
        .get("ProcessID")
        .and_then(|v| v.0.as_u64())
        .unwrap_or(0);
    let gids = creds
        .get("UnixGroupIDs")
        .and_then(|v| v.0.as_iter())
        .map(|it| it.filter_map(|g| g.as_u64()).map(|g| g as u32).collect())
        .unwrap_or_default();
    Ok(Caller {
        bus_name: sender.to_owned(),
        uid: uid as u32,
        pid: pid as u32,
        gids,
    })
}
