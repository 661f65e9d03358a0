use crate::{Caller, Message, Options, Outbox, Service, ServiceError, SessionHandler};
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
    fn on_message(&mut self, msg: Message<'_>, out: &mut Outbox) -> Result<(), ServiceError> {
        // The message's buffer goes out as it is, without a copy.
        out.send(msg.into_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::tests::{caller, options};
    use crate::service::Outgoing;

    #[test]
    fn sends_every_message_back_in_order() {
        let mut h = Echo.open(&caller(), &options(&[])).expect("open");
        let mut out = Outbox::new(1 << 20);
        h.on_message(Message::new(&mut b"one".to_vec()), &mut out)
            .expect("one");
        h.on_message(Message::new(&mut b"two".to_vec()), &mut out)
            .expect("two");
        assert_eq!(
            out.pop().map(Outgoing::into_payload).as_deref(),
            Some(&b"one"[..])
        );
        assert_eq!(
            out.pop().map(Outgoing::into_payload).as_deref(),
            Some(&b"two"[..])
        );
        assert!(out.pop().is_none());
        assert!(!h.wants_to_produce());
        h.on_end(&mut out).expect("end");
        assert!(out.finished(), "end of input is echoed as end of stream");
    }
}
