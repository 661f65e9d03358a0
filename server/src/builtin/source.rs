use crate::{Caller, Message, Options, Outbox, Piece, Service, ServiceError, SessionHandler};
use shmlink_interfaces::{option, service, source_pattern_byte};

/// Default size of each message `source` sends.
const DEFAULT_MESSAGE_SIZE: u64 = 64 * 1024;
/// Default number of messages `source` sends.
const DEFAULT_COUNT: u64 = 16;

/// Sends `count` messages of `message-size` bytes whose content the client
/// can verify (see `source_pattern_byte`), then end-of-stream.
pub struct Source;

impl Service for Source {
    fn name(&self) -> &str {
        service::SOURCE
    }
    fn open(
        &self,
        _caller: &Caller,
        options: &Options,
    ) -> Result<Box<dyn SessionHandler>, ServiceError> {
        let size = options
            .u64(option::MESSAGE_SIZE)?
            .unwrap_or(DEFAULT_MESSAGE_SIZE);
        let count = options.u64(option::COUNT)?.unwrap_or(DEFAULT_COUNT);
        if size > options.max_message() {
            return Err(ServiceError::InvalidOption(format!(
                "option {:?} is {size}, above the maximum message size of {}",
                option::MESSAGE_SIZE,
                options.max_message()
            )));
        }
        Ok(Box::new(SourceSession {
            size,
            count,
            next: 0,
        }))
    }
}

/// The pattern repeats every 251 bytes (see `source_pattern_byte`).
const PERIOD: usize = 251;

struct SourceSession {
    size: u64,
    count: u64,
    next: u64,
}

/// Writes message `index`'s pattern into one piece of it, straight into
/// the ring, one period at a time: no buffer holds the message.
fn fill_pattern(period: &[u8; PERIOD], mut piece: Piece<'_>) {
    let mut at = 0;
    while at < piece.len() {
        let phase = (piece.offset() + at) % PERIOD;
        let n = (PERIOD - phase).min(piece.len() - at);
        piece.write_at(at, &period[phase..phase + n]);
        at += n;
    }
}

impl SessionHandler for SourceSession {
    fn on_message(&mut self, _msg: Message<'_>, _out: &mut Outbox) -> Result<(), ServiceError> {
        Err(ServiceError::Protocol(
            "the source service accepts no messages".into(),
        ))
    }

    fn on_end(&mut self, _out: &mut Outbox) -> Result<(), ServiceError> {
        Ok(())
    }

    fn wants_to_produce(&self) -> bool {
        true
    }

    fn produce(&mut self, out: &mut Outbox) -> Result<(), ServiceError> {
        if self.next >= self.count {
            out.finish();
            return Ok(());
        }
        let index = self.next;
        let size = usize::try_from(self.size).unwrap_or(usize::MAX);
        let period: [u8; PERIOD] = std::array::from_fn(|i| source_pattern_byte(index, i as u64));
        out.send_with(size, move |piece| fill_pattern(&period, piece))?;
        self.next += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::tests::{caller, options};
    use crate::service::prop;

    #[test]
    fn sends_count_verifiable_messages_then_finishes() {
        let opts = options(&[
            (option::MESSAGE_SIZE, prop(300u64)),
            (option::COUNT, prop(3u64)),
        ]);
        let mut h = Source.open(&caller(), &opts).expect("open");
        assert!(opts.unused().is_empty(), "source reads both options");
        let mut out = Outbox::new(1 << 20);
        for n in 0..3u64 {
            assert!(h.wants_to_produce());
            h.produce(&mut out).expect("produce");
            let m = out.pop().expect("one message per produce").into_payload();
            assert_eq!(m.len(), 300);
            for (j, &b) in m.iter().enumerate() {
                assert_eq!(b, source_pattern_byte(n, j as u64), "message {n} byte {j}");
            }
        }
        assert!(!out.finished());
        h.produce(&mut out).expect("finish");
        assert!(out.finished() && out.pop().is_none());
    }

    #[test]
    fn refuses_input_and_oversized_messages() {
        let mut h = Source.open(&caller(), &options(&[])).expect("defaults");
        let mut out = Outbox::new(1 << 20);
        assert!(matches!(
            h.on_message(Message::new(&mut b"x".to_vec()), &mut out),
            Err(ServiceError::Protocol(_))
        ));
        let too_big = options(&[(option::MESSAGE_SIZE, prop((1u64 << 20) + 1))]);
        assert!(matches!(
            Source.open(&caller(), &too_big),
            Err(ServiceError::InvalidOption(_))
        ));
    }
}
