//! Calls that wait for their sender's credentials: the broker learns who a
//! connection is from the bus before it handles its first call, and keeps
//! the calls that arrive meanwhile.
//!
//! Bounded per sender and in all, in calls and bytes, far below libdbus's
//! receive limit: libdbus counts every message still held against it and
//! stops reading at the limit, so holding calls without a bound would keep
//! the bus's answer about their sender from ever being read.

use dbus::Message;
use std::collections::HashMap;

/// Most calls one sender may have waiting (a client may pipeline its first
/// calls: a hundred opens at once is fine).
pub(super) const CALLS_PER_SENDER: usize = 256;
/// Most bytes (as sent) one sender's waiting calls may take.
pub(super) const BYTES_PER_SENDER: usize = 256 << 10;
/// Most bytes all waiting calls may take.
pub(super) const BYTES_IN_ALL: usize = 4 << 20;
/// Most calls that may wait in all (each costs libdbus some bookkeeping
/// beyond its bytes).
pub(super) const CALLS_IN_ALL: usize = 4096;

/// The waiting calls, by sender, in arrival order.
#[derive(Default)]
pub(super) struct Parked {
    by_sender: HashMap<String, Queue>,
    bytes: usize,
    calls: usize,
}

#[derive(Default)]
struct Queue {
    calls: Vec<Message>,
    bytes: usize,
}

/// Why a call could not wait.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Full {
    /// Its sender has [`CALLS_PER_SENDER`] calls or [`BYTES_PER_SENDER`]
    /// bytes waiting with it.
    Sender,
    /// All waiting calls would take more than [`BYTES_IN_ALL`] or be more
    /// than [`CALLS_IN_ALL`].
    All,
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Sender => write!(
                f,
                "the broker does not know this connection yet, and at most {CALLS_PER_SENDER} \
                 calls of {} KiB in all wait while the bus says who is calling; retry",
                BYTES_PER_SENDER >> 10
            ),
            Full::All => write!(
                f,
                "too many calls of new connections wait while the bus says who is calling; retry"
            ),
        }
    }
}

impl Parked {
    /// Whether calls of `sender` are waiting (a lookup is in flight).
    pub fn has(&self, sender: &str) -> bool {
        self.by_sender.contains_key(sender)
    }

    /// Keeps `call` of `sender`, `size` bytes as sent, if the bounds allow;
    /// else gives it back with the reason.
    pub fn park(
        &mut self,
        sender: &str,
        call: Message,
        size: usize,
    ) -> Result<(), (Message, Full)> {
        if self.bytes + size > BYTES_IN_ALL || self.calls >= CALLS_IN_ALL {
            return Err((call, Full::All));
        }
        let queue = self.by_sender.entry(sender.to_owned()).or_default();
        if queue.calls.len() >= CALLS_PER_SENDER || queue.bytes + size > BYTES_PER_SENDER {
            if queue.calls.is_empty() {
                self.by_sender.remove(sender);
            }
            return Err((call, Full::Sender));
        }
        queue.calls.push(call);
        queue.bytes += size;
        self.bytes += size;
        self.calls += 1;
        Ok(())
    }

    /// The calls of `sender`, in arrival order, no longer kept.
    pub fn release(&mut self, sender: &str) -> Vec<Message> {
        let Some(queue) = self.by_sender.remove(sender) else {
            return Vec::new();
        };
        self.bytes -= queue.bytes;
        self.calls -= queue.calls.len();
        queue.calls
    }
}

/// The size of `msg` as sent on the bus (one copy of it, made and dropped).
pub(super) fn wire_size(msg: &Message) -> usize {
    let mut size = 0;
    let _ = msg.marshal(|bytes| {
        size += bytes.len();
        Ok::<(), ()>(())
    });
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> Message {
        Message::new_method_call("org.example", "/", "org.example", "M").unwrap()
    }

    #[test]
    fn calls_wait_within_their_senders_bound_and_the_bound_in_all() {
        let mut parked = Parked::default();
        for _ in 0..CALLS_PER_SENDER {
            parked.park(":1.1", call(), 10).unwrap();
        }
        assert_eq!(parked.park(":1.1", call(), 10).unwrap_err().1, Full::Sender);
        assert_eq!(
            parked
                .park(":1.2", call(), BYTES_PER_SENDER + 1)
                .unwrap_err()
                .1,
            Full::Sender
        );
        assert!(!parked.has(":1.2"), "a refused first call leaves no queue");
        let per = BYTES_PER_SENDER;
        let fit = (BYTES_IN_ALL - parked.bytes) / per;
        for n in 0..fit {
            parked.park(&format!(":2.{n}"), call(), per).unwrap();
        }
        assert_eq!(parked.park(":3.1", call(), per).unwrap_err().1, Full::All);
        assert_eq!(parked.release(":1.1").len(), CALLS_PER_SENDER);
        assert!(!parked.has(":1.1"));
        parked.park(":3.1", call(), 10).unwrap();
        for n in 0..fit {
            parked.release(&format!(":2.{n}"));
        }
        // Small calls are bounded by their number in all.
        let mut n = parked.calls;
        while n < CALLS_IN_ALL {
            parked.park(&format!(":4.{n}"), call(), 1).unwrap();
            n += 1;
        }
        assert_eq!(parked.park(":5.1", call(), 1).unwrap_err().1, Full::All);
    }

    #[test]
    fn the_size_is_the_calls_size_as_sent() {
        let mut small = call();
        small.set_serial(1);
        let mut big = call().append1("x".repeat(100_000));
        big.set_serial(2);
        let (small, big) = (wire_size(&small), wire_size(&big));
        assert!(small > 0 && small < 200, "{small}");
        assert!(big > 100_000 && big < 100_200, "{big}");
    }
}
