//! The `AcceptSession` calls each provider has not answered yet.
//!
//! Each call carries the provider's eight fds, which a bus charges to the
//! broker until the provider reads the call (the system bus stops reading a
//! sender past 64). A provider answers its calls in the order it read them,
//! so an answer from it shows that every call sent to it before was read;
//! until then they count. A provider that stops reading (hung, or hostile)
//! so holds at most its own share; the opens of its services wait for room
//! (until their deadline) instead of the bus stopping reading the broker for
//! everyone.

use std::collections::HashMap;

/// Calls sent and not yet known to be read, per provider and in all.
pub(super) struct Unanswered {
    /// Most calls per provider (in all, twice that); `None`: no bound.
    per_provider: Option<u32>,
    /// The serials of the calls sent to each provider, oldest first.
    by_provider: HashMap<String, Vec<u32>>,
    total: u32,
}

impl Unanswered {
    /// Books allowing `per_provider` unanswered calls per provider and
    /// twice that in all (`None`: no bound).
    pub fn new(per_provider: Option<u32>) -> Self {
        Unanswered {
            per_provider,
            by_provider: HashMap::new(),
            total: 0,
        }
    }

    /// Whether one more call to `provider` stays within the bounds.
    pub fn has_room(&self, provider: &str) -> bool {
        let Some(per) = self.per_provider else {
            return true;
        };
        let own = self.by_provider.get(provider).map_or(0, |s| s.len() as u32);
        own < per && self.total < 2 * per
    }

    /// A call with `serial` was sent to `provider`.
    pub fn sent(&mut self, provider: &str, serial: u32) {
        self.by_provider
            .entry(provider.to_owned())
            .or_default()
            .push(serial);
        self.total += 1;
    }

    /// `provider` itself answered the call `serial`: it and every call sent
    /// to it before were read. Returns whether room was freed.
    pub fn answered(&mut self, provider: &str, serial: u32) -> bool {
        let Some(serials) = self.by_provider.get_mut(provider) else {
            return false;
        };
        let Some(at) = serials.iter().position(|s| *s == serial) else {
            return false;
        };
        let read = at as u32 + 1;
        serials.drain(..=at);
        if serials.is_empty() {
            self.by_provider.remove(provider);
        }
        self.total -= read;
        true
    }

    /// `provider` left the bus, and the bus dropped what it held for it.
    pub fn left(&mut self, provider: &str) -> bool {
        match self.by_provider.remove(provider) {
            Some(serials) => {
                self.total -= serials.len() as u32;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_frees_its_call_and_every_earlier_one_a_silent_provider_holds_its_share() {
        let mut books = Unanswered::new(Some(2));
        assert!(books.has_room(":1.1"));
        books.sent(":1.1", 10);
        books.sent(":1.1", 11);
        assert!(!books.has_room(":1.1"), "its share is full");
        assert!(books.has_room(":1.2"));
        books.sent(":1.2", 12);
        books.sent(":1.2", 13);
        assert!(!books.has_room(":1.3"), "full in all");
        assert!(!books.answered(":1.2", 11), "not its call");
        assert!(
            books.answered(":1.1", 11),
            "the later answer shows both were read"
        );
        assert!(books.has_room(":1.1") && books.has_room(":1.3"));
        books.sent(":1.3", 14);
        assert!(books.left(":1.2"));
        assert!(books.has_room(":1.2"));
        let mut unbounded = Unanswered::new(None);
        for serial in 0..100 {
            assert!(unbounded.has_room(":1.1"));
            unbounded.sent(":1.1", serial);
        }
    }
}
