//! The names a broker answers to: its well-known bus name and the object
//! path of its `org.shmlink.Broker1` object (sessions live below it).
//!
//! `shmlinkd` uses `org.shmlink.Broker1` at `/org/shmlink/Broker1`; an
//! application that embeds a broker of its own (its own services, its own
//! limits) can own any name, with the path derived by the D-Bus convention
//! or given.

use shmlink_interfaces::{BROKER_PATH, BUS_NAME};

/// A bad bus name or object path.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NamesError(String);

/// A broker's well-known bus name and object path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    bus_name: String,
    path: String,
}

impl Default for Names {
    /// `org.shmlink.Broker1` at `/org/shmlink/Broker1`.
    fn default() -> Self {
        Names {
            bus_name: BUS_NAME.to_owned(),
            path: BROKER_PATH.to_owned(),
        }
    }
}

impl Names {
    /// `bus_name` (a well-known name) with the object path the D-Bus
    /// convention derives from it: `org.example.Frames1` → `/org/example/Frames1`.
    pub fn new(bus_name: &str) -> Result<Names, NamesError> {
        if bus_name.starts_with(':') {
            return Err(NamesError(format!(
                "{bus_name:?} is a unique name; a broker owns a well-known name"
            )));
        }
        dbus::strings::BusName::new(bus_name)
            .map_err(|e| NamesError(format!("bad bus name {bus_name:?}: {e}")))?;
        let path = format!("/{}", bus_name.replace('.', "/").replace('-', "_"));
        Names {
            bus_name: bus_name.to_owned(),
            path: String::new(),
        }
        .with_path(&path)
    }

    /// The same name with the broker object at `path` (not `/`).
    pub fn with_path(mut self, path: &str) -> Result<Names, NamesError> {
        dbus::Path::new(path).map_err(|e| NamesError(format!("bad object path {path:?}: {e}")))?;
        if path == "/" {
            return Err(NamesError(
                "the broker object needs a path below \"/\"".into(),
            ));
        }
        self.path = path.to_owned();
        Ok(self)
    }

    /// The well-known bus name.
    pub fn bus_name(&self) -> &str {
        &self.bus_name
    }

    /// The broker object's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The parent of the session objects, with a trailing `/`.
    pub fn session_prefix(&self) -> String {
        format!("{}{SESSIONS_NODE}/", self.path)
    }

    /// The object path of session `id`.
    pub fn session_path(&self, id: u64) -> String {
        format!("{}{SESSIONS_NODE}/{id}", self.path)
    }
}

/// The node below a broker object that holds its sessions.
const SESSIONS_NODE: &str = "/session";

/// The path of the broker object a session object at `session` belongs to.
pub(crate) fn broker_path_of(session: &str) -> &str {
    let parent = session.rsplit_once('/').map_or("", |(p, _)| p);
    parent.strip_suffix(SESSIONS_NODE).unwrap_or(parent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shmlink_interfaces::SESSION_PATH_PREFIX;

    #[test]
    fn paths_follow_the_name_or_are_given() {
        let d = Names::default();
        assert_eq!(d.session_prefix(), SESSION_PATH_PREFIX);
        assert_eq!(Names::new(BUS_NAME).unwrap(), d);
        let n = Names::new("org.example.my-app.Frames1").unwrap();
        assert_eq!(n.path(), "/org/example/my_app/Frames1");
        assert_eq!(n.session_path(7), "/org/example/my_app/Frames1/session/7");
        assert_eq!(broker_path_of(&n.session_path(7)), n.path());
        let n = n.with_path("/x").unwrap();
        assert_eq!(
            (n.bus_name(), n.path()),
            ("org.example.my-app.Frames1", "/x")
        );
        for bad in ["", "nodot", ":1.5", "org..x", "org.x/"] {
            assert!(Names::new(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["", "/", "x", "/a/", "/a b"] {
            assert!(Names::default().with_path(bad).is_err(), "{bad:?} accepted");
        }
    }
}
