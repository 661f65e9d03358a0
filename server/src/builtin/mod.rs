//! The reference daemon's built-in services, written against the public
//! [`Service`](crate::Service) trait exactly as a third-party service would be.

mod channel;
mod echo;
mod sink;
mod source;

pub use channel::Channel;
pub use echo::Echo;
pub use sink::Sink;
pub use source::Source;

use crate::Service;
use std::sync::Arc;

/// All built-in services.
pub fn all() -> Vec<Arc<dyn Service>> {
    vec![
        Arc::new(Echo),
        Arc::new(Sink),
        Arc::new(Source),
        Arc::new(Channel::default()),
    ]
}

/// Fixtures shared by the unit tests of the built-in services, the pump and the lifecycle.
#[cfg(test)]
pub(crate) mod tests {
    use crate::{Caller, Options};
    use dbus::arg::{PropMap, RefArg, Variant};

    /// An ordinary (non-root) caller.
    pub(crate) fn caller() -> Caller {
        Caller {
            bus_name: ":1.7".into(),
            uid: 1000,
            pid: 42,
            gids: vec![1000],
        }
    }

    /// Options as a client would pass them, for messages of at most 1 MiB.
    pub(crate) fn options(pairs: &[(&str, Variant<Box<dyn RefArg>>)]) -> Options {
        let map: PropMap = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Variant(v.0.box_clone())))
            .collect();
        Options::new(map, 1 << 20)
    }

    /// An unsigned value of a state map.
    pub(crate) fn get_u64(m: &PropMap, key: &str) -> Option<u64> {
        m.get(key).and_then(|v| v.0.as_u64())
    }

    #[test]
    fn all_lists_each_service_once() {
        let mut names: Vec<String> = super::all().iter().map(|s| s.name().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["channel", "echo", "sink", "source"]);
    }
}
