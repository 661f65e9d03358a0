//! Who is calling: the credentials the bus reports for each connection,
//! learnt once per connection and forgotten when it leaves the bus.

use crate::service::Caller;
use dbus::arg::PropMap;
use dbus::blocking::Connection;
use dbus::message::MatchRule;
use dbus::Message;
use dbus_crossroads::MethodErr;
use std::collections::HashMap;
use std::time::Duration;

/// Timeout for our own calls to the bus daemon.
const BUS_CALL_TIMEOUT: Duration = Duration::from_secs(5);
const DBUS_NAME: &str = "org.freedesktop.DBus";
const DBUS_PATH: &str = "/org/freedesktop/DBus";

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
pub(crate) struct Peers {
    callers: HashMap<String, Caller>,
    /// Sender of the method call being dispatched (crossroads does not pass
    /// the message to property getters called from `GetAll`).
    current: String,
}

impl Peers {
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

/// Asks the bus who `sender` is (`GetConnectionCredentials`).
pub(crate) fn lookup(conn: &Connection, sender: &str) -> Result<Caller, dbus::Error> {
    let proxy = conn.with_proxy(DBUS_NAME, DBUS_PATH, BUS_CALL_TIMEOUT);
    let (creds,): (PropMap,) =
        proxy.method_call(DBUS_NAME, "GetConnectionCredentials", (sender,))?;
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
