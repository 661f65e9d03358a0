use crate::service::{prop, StateView};
use crate::{Caller, Message, Options, Outbox, Service, ServiceError, SessionHandler};
use dbus::arg::PropMap;
use shmlink_interfaces::service;
use std::sync::{Arc, Mutex};

/// Discards messages, counting them and keeping a CRC-32 of every byte, so a
/// client can check that what it sent is what arrived.
pub struct Sink;

impl Service for Sink {
    fn name(&self) -> &str {
        service::SINK
    }
    fn open(
        &self,
        _caller: &Caller,
        _options: &Options,
    ) -> Result<Box<dyn SessionHandler>, ServiceError> {
        Ok(Box::new(SinkSession::default()))
    }
}

/// What the sink has received so far.
#[derive(Clone, Default)]
struct Totals {
    bytes: u64,
    messages: u64,
    crc: crc32fast::Hasher,
}

#[derive(Default)]
struct SinkSession {
    tally: Totals,
    /// A copy of `tally`, refreshed after every message, for `ServiceState`.
    shared: Arc<SharedTotals>,
}

#[derive(Default)]
struct SharedTotals(Mutex<Totals>);

impl StateView for SharedTotals {
    fn state(&self) -> PropMap {
        let t = crate::lock(&self.0).clone();
        let mut m = PropMap::new();
        m.insert("bytes".into(), prop(t.bytes));
        m.insert("messages".into(), prop(t.messages));
        m.insert("crc32".into(), prop(t.crc.finalize()));
        m
    }
}

impl SessionHandler for SinkSession {
    fn on_message(&mut self, msg: Message<'_>, _out: &mut Outbox) -> Result<(), ServiceError> {
        self.tally.bytes += msg.len() as u64;
        self.tally.messages += 1;
        // Checksum outside the lock; the lock only guards a small copy.
        self.tally.crc.update(&msg);
        *crate::lock(&self.shared.0) = self.tally.clone();
        Ok(())
    }

    fn state_view(&self) -> Option<Arc<dyn StateView>> {
        Some(self.shared.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::tests::{caller, get_u64, options};

    #[test]
    fn counts_and_checksums_every_message() {
        let mut h = Sink.open(&caller(), &options(&[])).expect("open");
        let view = h.state_view().expect("sink has a state view");
        let mut out = Outbox::new(1 << 20);
        h.on_message(Message::new(&mut b"hello ".to_vec()), &mut out)
            .expect("msg");
        h.on_message(Message::new(&mut b"world".to_vec()), &mut out)
            .expect("msg");
        let st = view.state();
        assert_eq!(get_u64(&st, "bytes"), Some(11));
        assert_eq!(get_u64(&st, "messages"), Some(2));
        assert_eq!(
            get_u64(&st, "crc32"),
            Some(u64::from(crc32fast::hash(b"hello world")))
        );
        assert!(out.pop().is_none(), "the sink answers nothing");
        h.on_end(&mut out).expect("end");
        assert!(out.finished(), "end of input finishes the sink");
    }
}
