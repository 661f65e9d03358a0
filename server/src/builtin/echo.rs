use crate::{Caller, Options, Outbox, Service, ServiceError, SessionHandler};
use shmlink_interfaces::service;

/// Sends every message back unchanged, in order.
pub struct Echo;

impl Service for Echo {
    fn name(&self) -> &str {
        service::ECHO
    }
    fn open(
        &self,
        _caller: &Caller,
        _options: &Options,
    ) -> Result<Box<dyn SessionHandler>, ServiceError> {
        Ok(Box::new(EchoSession))
    }
}

struct EchoSession;

impl SessionHandler for EchoSession {
    fn on_message(&mut self, msg: Vec<u8>, out: &mut Outbox) -> Result<(), ServiceError> {
        out.send(msg)
    }
}
