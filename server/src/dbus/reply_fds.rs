//! The fds the broker has put in `OpenSession` replies.
//!
//! A bus charges a message's fds to its sender until the receiver has read
//! it, and stops reading a sender past its allowance (the system bus: 64 fds
//! per connection). A client that never reads its replies would so hold the
//! broker's allowance with each reply's seven fds, and the bus would stop
//! reading the broker for everyone. Whether a reply was read cannot be
//! known, so the fds of the replies sent to a connection count until it
//! leaves the bus; past the bound `OpenSession` is refused, and
//! `OpenSessionVia`, whose reply carries no fds (the rings go over a socket
//! the client passes), is the way on.

use crate::accounting::Refusal;
use crate::service::Caller;
use std::collections::HashMap;

/// The fds of one `OpenSession` reply: two rings of three and the hang-up socket.
pub(super) const PER_REPLY: u32 = 7;

/// The fds in replies to connections still on the bus, per uid and in all.
pub(super) struct ReplyFds {
    /// Most fds in all; `None`: no bound (a bus that does not charge fds,
    /// as a session bus in effect does not).
    limit: Option<u32>,
    by_connection: HashMap<String, (u32, u32)>,
    by_uid: HashMap<u32, u32>,
    total: u32,
}

impl ReplyFds {
    /// Books bounding the fds in replies to `limit` in all and half of it per uid.
    pub fn new(limit: Option<u32>) -> Self {
        ReplyFds {
            limit,
            by_connection: HashMap::new(),
            by_uid: HashMap::new(),
            total: 0,
        }
    }

    /// Whether the reply to `caller`'s open stays within the bounds: one
    /// with fds (`OpenSession`, `in_reply`) must; one without
    /// (`OpenSessionVia`) always does.
    pub fn check(&self, caller: &Caller, in_reply: bool) -> Result<(), Refusal> {
        let Some(limit) = self.limit.filter(|_| in_reply) else {
            return Ok(());
        };
        let per_uid = limit / 2;
        let of_uid = self.by_uid.get(&caller.uid).copied().unwrap_or(0);
        let refuse = |what: String| {
            Err(Refusal::LimitExceeded(format!(
                "{what}: the fds of OpenSession replies count against the broker's allowance \
                 on the bus until their connection leaves it; use OpenSessionVia, whose reply \
                 carries no fds"
            )))
        };
        if of_uid + PER_REPLY > per_uid {
            return refuse(format!(
                "reply_fds: uid {} has {of_uid} fds in replies (limit {per_uid} per uid)",
                caller.uid
            ));
        }
        if self.total + PER_REPLY > limit {
            return refuse(format!(
                "reply_fds: {} fds in replies (limit {limit})",
                self.total
            ));
        }
        Ok(())
    }

    /// Counts a reply with fds sent to `caller`.
    pub fn charge(&mut self, caller: &Caller) {
        if self.limit.is_none() {
            return;
        }
        let entry = self
            .by_connection
            .entry(caller.bus_name.clone())
            .or_insert((caller.uid, 0));
        entry.1 += PER_REPLY;
        *self.by_uid.entry(caller.uid).or_default() += PER_REPLY;
        self.total += PER_REPLY;
    }

    /// The connection `bus_name` left the bus, and the bus dropped what it
    /// still held for it.
    pub fn connection_left(&mut self, bus_name: &str) {
        let Some((uid, fds)) = self.by_connection.remove(bus_name) else {
            return;
        };
        self.total -= fds;
        if let Some(n) = self.by_uid.get_mut(&uid) {
            *n -= fds;
            if *n == 0 {
                self.by_uid.remove(&uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str, uid: u32) -> Caller {
        Caller {
            bus_name: name.into(),
            uid,
            pid: 1,
            gids: vec![],
        }
    }

    #[test]
    fn replies_count_per_uid_and_in_all_until_their_connection_leaves() {
        let mut books = ReplyFds::new(Some(28));
        let a = caller(":1.1", 1000);
        for _ in 0..2 {
            books.check(&a, true).expect("within the uid's half");
            books.charge(&a);
        }
        let e = books.check(&caller(":1.9", 1000), true).unwrap_err();
        assert!(e.to_string().contains("uid 1000 has 14 fds"), "{e}");
        let b = caller(":1.2", 1001);
        for _ in 0..2 {
            books.check(&b, true).expect("another uid");
            books.charge(&b);
        }
        let e = books.check(&caller(":1.3", 1002), true).unwrap_err();
        assert!(e.to_string().contains("28 fds in replies"), "{e}");
        books.connection_left(":1.1");
        books
            .check(&caller(":1.3", 1002), true)
            .expect("room again");
        books
            .check(&caller(":1.4", 1000), true)
            .expect("and for uid 1000");
        assert!(
            books.check(&caller(":1.4", 1000), false).is_ok(),
            "no fds in the reply"
        );
        let mut unbounded = ReplyFds::new(None);
        for _ in 0..100 {
            unbounded.check(&a, true).expect("no bound");
            unbounded.charge(&a);
        }
    }
}
