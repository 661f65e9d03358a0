use crate::service::prop;
use crate::{Caller, Options, Outbox, Service, ServiceError, SessionHandler};
use dbus::arg::PropMap;
use shmlink_interfaces::service;

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

#[derive(Default)]
struct SinkSession {
    bytes: u64,
    messages: u64,
    crc: crc32fast::Hasher,
}

impl SessionHandler for SinkSession {
    fn on_message(&mut self, msg: Vec<u8>, _out: &mut Outbox) -> Result<(), ServiceError> {
        self.bytes += msg.len() as u64;
        self.messages += 1;
        self.crc.update(&msg);
        Ok(())
    }

    fn state(&self) -> PropMap {
        let mut m = PropMap::new();
        m.insert("bytes".into(), prop(self.bytes));
        m.insert("messages".into(), prop(self.messages));
        m.insert("crc32".into(), prop(self.crc.clone().finalize()));
        m
    }
}
