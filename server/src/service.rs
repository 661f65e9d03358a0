//! What a service author implements: [`Service`] opens per-session
//! [`SessionHandler`]s, which turn incoming messages into outgoing ones.
//!
//! The broker's event loop owns the rings; a handler never touches shared
//! memory. It sees whole messages, queues replies in an [`Outbox`], and the
//! loop writes them out with backpressure: while the outbox is not empty, the
//! loop reads no further input, so a client that stops reading stalls only
//! its own session and the broker's memory per session stays bounded.
//!
//! Every byte a session makes the daemon hold is charged to its owner's
//! [`Memory`] before it is allocated: the outbox charges each message it
//! queues until the message is written out, and a service that keeps data of
//! its own charges it through [`Options::memory`]. A charge that would pass
//! `memory_per_user` or `memory_total` fails with [`ServiceError::NoMemory`],
//! which ends the session with the limit's name as the reason.

use dbus::arg::{PropMap, RefArg, Variant};
use shmlink_endpoint::frame::{FillFrame, OutFrame, Piece, WriteFrame};
use shmlink_endpoint::Budget;
use shmlink_interfaces::dict;
use std::collections::VecDeque;
use std::sync::Arc;

/// Why a service refused or ended a session. The message reaches the client
/// as the D-Bus error text or the `SessionClosed` reason.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// An option is unknown to the service, ill-typed or out of range.
    #[error("{0}")]
    InvalidOption(String),
    /// The client broke the service's own protocol.
    #[error("{0}")]
    Protocol(String),
    /// The service failed for a reason of its own.
    #[error("{0}")]
    Failed(String),
    /// Memory for the session could not be had: a limit (named in the text)
    /// would be passed, or the allocator failed.
    #[error("{0}")]
    NoMemory(String),
}

/// The memory budget of a session's owner: its uid's `memory_per_user`
/// account and the daemon's `memory_total`, charged together. Cheap to clone.
#[derive(Clone, Default)]
pub struct Memory(Option<Arc<dyn Budget>>);

impl Memory {
    /// A budget drawing on `budget`.
    pub(crate) fn new(budget: Arc<dyn Budget>) -> Self {
        Memory(Some(budget))
    }

    /// A budget without limits (for tests and tools).
    pub fn unlimited() -> Self {
        Memory(None)
    }

    /// Charges `bytes`, to be given back when the returned [`Charge`] drops;
    /// fails (charging nothing) if a limit would be passed.
    pub fn try_charge(&self, bytes: usize) -> Result<Charge, ServiceError> {
        if let (Some(b), true) = (&self.0, bytes > 0) {
            b.try_charge(bytes).map_err(ServiceError::NoMemory)?;
        }
        Ok(Charge {
            budget: self.0.clone(),
            bytes,
        })
    }

    /// Allocates a zeroed buffer of `len` bytes, charged before it is
    /// allocated; an allocation failure is an error, not an abort.
    pub fn try_alloc(&self, len: usize) -> Result<(Vec<u8>, Charge), ServiceError> {
        let charge = self.try_charge(len)?;
        let mut v = Vec::new();
        v.try_reserve_exact(len)
            .map_err(|e| ServiceError::NoMemory(format!("cannot allocate {len} bytes: {e}")))?;
        v.resize(len, 0);
        Ok((v, charge))
    }
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Memory(limited)"
        } else {
            "Memory(unlimited)"
        })
    }
}

/// Bytes charged to a [`Memory`]; given back when dropped.
pub struct Charge {
    budget: Option<Arc<dyn Budget>>,
    bytes: usize,
}

impl Charge {
    /// The bytes charged.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let (Some(b), true) = (&self.budget, self.bytes > 0) {
            b.release(self.bytes);
        }
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Charge({} bytes)", self.bytes)
    }
}

/// The options of an `OpenSession` call, with typed accessors that produce
/// precise errors. Every key a service reads is marked as used; the broker
/// refuses the call if any key is left unused.
pub struct Options {
    map: PropMap,
    used: std::cell::RefCell<Vec<String>>,
    max_message: u64,
    memory: Memory,
}

impl Options {
    /// Wraps the `a{sv}` dictionary of a call for a session whose messages
    /// may be at most `max_message` bytes.
    pub(crate) fn new(map: PropMap, max_message: u64) -> Self {
        Options {
            map,
            used: Default::default(),
            max_message,
            memory: Memory::unlimited(),
        }
    }

    /// The same options for a session whose owner's budget is `memory`.
    pub(crate) fn with_memory(mut self, memory: Memory) -> Self {
        self.memory = memory;
        self
    }

    /// The budget of the session's owner: charge anything the handler keeps
    /// beyond a few fixed-size fields (buffers, queues) to it.
    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    /// The largest message the session will carry; services check their own
    /// message sizes against it.
    pub fn max_message(&self) -> u64 {
        self.max_message
    }

    fn mark(&self, key: &str) {
        self.used.borrow_mut().push(key.to_owned());
    }

    /// An unsigned integer option (`t`, `u`, `q` or `y`; non-negative `x`, `i` accepted too).
    pub fn u64(&self, key: &str) -> Result<Option<u64>, ServiceError> {
        self.mark(key);
        dict::get_u64(&self.map, key).map_err(|e| ServiceError::InvalidOption(e.to_string()))
    }

    /// A string option (`s`).
    pub fn string(&self, key: &str) -> Result<Option<String>, ServiceError> {
        self.mark(key);
        dict::get_string(&self.map, key).map_err(|e| ServiceError::InvalidOption(e.to_string()))
    }

    /// Keys present in the call that nobody read.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut keys: Vec<String> = self
            .map
            .keys()
            .filter(|k| !used.contains(k))
            .cloned()
            .collect();
        keys.sort();
        keys
    }
}

/// Who opened a session, as the bus reported it.
pub use shmlink_interfaces::Caller;

impl From<ServiceError> for crate::accounting::Refusal {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidOption(m) => Self::InvalidOption(m),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// A fill queued by [`Outbox::send_with`], run when the message's turn comes.
type BoxedFill = Box<dyn FnMut(Piece<'_>) + Send>;

/// A message queued for the client, as the frame the pump writes into the
/// ring, holding its charge until written out.
pub(crate) struct Outgoing {
    frame: OutgoingFrame,
    len: usize,
    _charge: Charge,
}

enum OutgoingFrame {
    Bytes(OutFrame<Payload>),
    Fill(FillFrame<BoxedFill>),
}

#[derive(Debug)]
enum Payload {
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>),
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        match self {
            Payload::Owned(v) => v,
            Payload::Shared(v) => v,
        }
    }
}

impl Outgoing {
    fn bytes(payload: Payload, charge: Charge) -> Self {
        Outgoing {
            len: payload.as_ref().len(),
            frame: OutgoingFrame::Bytes(OutFrame::message(payload)),
            _charge: charge,
        }
    }

    /// Payload bytes of the message.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The payload, as the client will receive it (runs a fill into a
    /// buffer of its own).
    #[cfg(test)]
    pub(crate) fn into_payload(mut self) -> Vec<u8> {
        let mut wire = vec![0u8; shmlink_endpoint::frame::HEADER_LEN + self.len];
        // SAFETY: `wire` is our own buffer, writable for its whole length,
        // and nothing else refers to it during the call.
        let n = unsafe { self.write_into(wire.as_mut_ptr(), wire.len()) };
        assert_eq!(n, wire.len(), "a frame fills its length exactly");
        wire.split_off(shmlink_endpoint::frame::HEADER_LEN)
    }
}

impl WriteFrame for Outgoing {
    fn is_done(&self) -> bool {
        match &self.frame {
            OutgoingFrame::Bytes(f) => f.is_done(),
            OutgoingFrame::Fill(f) => f.is_done(),
        }
    }

    fn is_partial(&self) -> bool {
        match &self.frame {
            OutgoingFrame::Bytes(f) => f.is_partial(),
            OutgoingFrame::Fill(f) => f.is_partial(),
        }
    }

    unsafe fn write_into(&mut self, dst: *mut u8, room: usize) -> usize {
        // SAFETY: the caller's guarantee for `dst` and `room` is passed on unchanged.
        unsafe {
            match &mut self.frame {
                OutgoingFrame::Bytes(f) => f.write_into(dst, room),
                OutgoingFrame::Fill(f) => f.write_into(dst, room),
            }
        }
    }
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.frame {
            OutgoingFrame::Bytes(_) => "bytes",
            OutgoingFrame::Fill(_) => "fill",
        };
        write!(f, "Outgoing({kind}, {} bytes)", self.len)
    }
}

/// A message from the client as a handler receives it: its bytes, in a
/// buffer the session's pump reuses for the next message, so receiving
/// allocates nothing. Read it through `Deref<Target = [u8]>`; a handler that
/// keeps the message takes the buffer with [`Message::into_vec`].
pub struct Message<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Message<'a> {
    /// A message held in `buf` (for tests and tools that drive handlers).
    pub fn new(buf: &'a mut Vec<u8>) -> Self {
        Message { buf }
    }

    /// Takes the buffer without copying it (the pump then allocates a new
    /// one for the next message).
    pub fn into_vec(self) -> Vec<u8> {
        std::mem::take(self.buf)
    }
}

impl std::ops::Deref for Message<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf
    }
}

impl std::fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Message({} bytes)", self.buf.len())
    }
}

/// Outgoing messages a handler queues for the client. Each queued message
/// is charged to the session owner's [`Memory`] until it is written out.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Outgoing>,
    finished: bool,
    max_message: u64,
    memory: Memory,
}

impl Outbox {
    /// An outbox for messages of at most `max_message` bytes, without limits.
    #[cfg(test)]
    pub(crate) fn new(max_message: u64) -> Self {
        Outbox::with_memory(max_message, Memory::unlimited())
    }

    /// An outbox for messages of at most `max_message` bytes, charging `memory`.
    pub(crate) fn with_memory(max_message: u64, memory: Memory) -> Self {
        Outbox {
            queue: VecDeque::new(),
            finished: false,
            max_message,
            memory,
        }
    }

    fn check(&self, len: usize) -> Result<(), ServiceError> {
        if self.finished {
            return Err(ServiceError::Failed("service sent after finishing".into()));
        }
        if len as u64 > self.max_message {
            return Err(ServiceError::Failed(format!(
                "service produced a {len}-byte message, above the session maximum of {}",
                self.max_message
            )));
        }
        Ok(())
    }

    /// Queues one message for the client, charging its buffer.
    pub fn send(&mut self, msg: Vec<u8>) -> Result<(), ServiceError> {
        self.check(msg.len())?;
        let charge = self.memory.try_charge(msg.capacity())?;
        self.queue
            .push_back(Outgoing::bytes(Payload::Owned(msg), charge));
        Ok(())
    }

    /// Queues a message whose buffer others share (one buffer for many
    /// clients, as a fan-out does), without copying it. The session is charged
    /// its length as if it held it alone.
    pub fn send_shared(&mut self, msg: Arc<Vec<u8>>) -> Result<(), ServiceError> {
        self.check(msg.len())?;
        let charge = self.memory.try_charge(msg.len())?;
        self.queue
            .push_back(Outgoing::bytes(Payload::Shared(msg), charge));
        Ok(())
    }

    /// Queues a message of `len` bytes that `fill` writes straight into the
    /// ring to the client when its turn comes: no buffer is allocated, and
    /// only the closure itself is charged. `fill` is called once for each
    /// [`Piece`] of the message, in order (a message can wrap around the
    /// ring's end or be larger than the ring); bytes of a piece it leaves
    /// unwritten carry whatever the ring held there before (earlier bytes
    /// of this session, never another's). A fill that panics ends the session.
    pub fn send_with(
        &mut self,
        len: usize,
        fill: impl FnMut(Piece<'_>) + Send + 'static,
    ) -> Result<(), ServiceError> {
        self.check(len)?;
        let charge = self.memory.try_charge(std::mem::size_of_val(&fill))?;
        let fill: BoxedFill = Box::new(fill);
        self.queue.push_back(Outgoing {
            frame: OutgoingFrame::Fill(FillFrame::message(len, fill)),
            len,
            _charge: charge,
        });
        Ok(())
    }

    /// Declares that the service will send nothing more: once the queue is
    /// flushed, the client receives end-of-stream.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    pub(crate) fn pop(&mut self) -> Option<Outgoing> {
        self.queue.pop_front()
    }

    pub(crate) fn finished(&self) -> bool {
        self.finished
    }
}

/// Wakes a session's event loop from outside its own fds: another session
/// (a channel publishing to it), a timer or a producer thread. After a wake,
/// the loop calls `wants_to_produce`/`produce` again. Cheap to clone.
#[derive(Clone)]
pub struct SessionWaker(Arc<dyn Fn() + Send + Sync>);

impl SessionWaker {
    pub(crate) fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        SessionWaker(Arc::new(f))
    }

    /// Asks the event loop to run this session soon. Never blocks.
    pub fn wake(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for SessionWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionWaker")
    }
}

/// A service the broker hosts, such as `echo`.
pub trait Service: Send + Sync + 'static {
    /// The name clients pass to `OpenSession`.
    fn name(&self) -> &str;
    /// Checks the service's options and creates the per-session handler.
    ///
    /// Read every option the service understands through `options`; keys
    /// nobody reads make the broker refuse the call.
    fn open(
        &self,
        caller: &Caller,
        options: &Options,
    ) -> Result<Box<dyn SessionHandler>, ServiceError>;
}

/// One session's logic, driven by the broker's event loop.
pub trait SessionHandler: Send + 'static {
    /// A complete message arrived from the client.
    fn on_message(&mut self, msg: Message<'_>, out: &mut Outbox) -> Result<(), ServiceError>;

    /// The client finished sending. The default finishes too.
    fn on_end(&mut self, out: &mut Outbox) -> Result<(), ServiceError> {
        out.finish();
        Ok(())
    }

    /// Whether [`SessionHandler::produce`] has something to send on its own.
    fn wants_to_produce(&self) -> bool {
        false
    }

    /// Called when the outbox is empty and `wants_to_produce` is true: queue
    /// the next message(s), or finish.
    fn produce(&mut self, out: &mut Outbox) -> Result<(), ServiceError> {
        let _ = out;
        Ok(())
    }

    /// Called once when the session starts being served, with the handle
    /// that wakes it from outside (see [`SessionWaker`]).
    fn attach(&mut self, waker: SessionWaker) {
        let _ = waker;
    }

    /// A view of the session's service-specific state for the `ServiceState`
    /// property, asked for once when the session starts. The D-Bus side reads
    /// it while a worker serves the session, so it shares only what the
    /// handler publishes into it; `None` shows an empty state.
    fn state_view(&self) -> Option<Arc<dyn StateView>> {
        None
    }
}

/// Service-specific state of one session, readable from the D-Bus thread
/// while a worker thread runs the session's handler.
///
/// A handler keeps the shared part (atomics, or a small lock it holds only to
/// copy values in) and updates it as it works, so a reader never waits for a
/// pump. Update it before the change can be observed on the rings (e.g. count
/// a message in `on_message`): a client that reads the state after the reply
/// or end-of-stream then sees every message counted.
pub trait StateView: Send + Sync + 'static {
    /// The state now, as the `ServiceState` property shows it.
    fn state(&self) -> PropMap;
}

/// Wraps a value for a [`PropMap`].
pub fn prop<T: RefArg + 'static>(v: T) -> Variant<Box<dyn RefArg>> {
    Variant(Box::new(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: Vec<(&str, Box<dyn RefArg>)>) -> Options {
        let map = pairs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Variant(v)))
            .collect();
        Options::new(map, 100)
    }

    #[test]
    fn unsigned_options_accept_unsigned_and_non_negative_signed() {
        let o = options(vec![
            ("t", Box::new(7u64)),
            ("u", Box::new(8u32)),
            ("y", Box::new(9u8)),
            ("x", Box::new(10i64)),
            ("i", Box::new(11i32)),
        ]);
        assert_eq!(o.u64("t").expect("t"), Some(7));
        assert_eq!(o.u64("u").expect("u"), Some(8));
        assert_eq!(o.u64("y").expect("y"), Some(9));
        assert_eq!(o.u64("x").expect("x"), Some(10));
        assert_eq!(o.u64("i").expect("i"), Some(11));
        assert_eq!(o.u64("absent").expect("absent"), None);
    }

    #[test]
    fn ill_typed_options_are_refused_by_name() {
        let o = options(vec![
            ("neg", Box::new(-1i64)),
            ("text", Box::new("x".to_owned())),
            ("num", Box::new(1u64)),
        ]);
        fn err<T: std::fmt::Debug>(r: Result<T, ServiceError>) -> String {
            match r {
                Err(ServiceError::InvalidOption(m)) => m,
                other => panic!("expected InvalidOption, got {other:?}"),
            }
        }
        assert!(err(o.u64("neg")).contains("must not be negative"));
        assert!(err(o.u64("text")).contains("\"text\" must be an unsigned integer"));
        assert!(err(o.string("num")).contains("\"num\" must be a string"));
        assert_eq!(o.string("text").expect("string").as_deref(), Some("x"));
    }

    #[test]
    fn unused_lists_keys_nobody_read_sorted() {
        let o = options(vec![
            ("b", Box::new(1u64)),
            ("a", Box::new(1u64)),
            ("read", Box::new(1u64)),
        ]);
        o.u64("read").expect("read");
        assert_eq!(o.unused(), ["a", "b"]);
        assert_eq!(o.max_message(), 100);
    }

    #[test]
    fn outbox_enforces_the_message_size_and_finish() {
        let mut out = Outbox::new(4);
        out.send(vec![0; 4]).expect("at the maximum");
        assert!(matches!(out.send(vec![0; 5]), Err(ServiceError::Failed(_))));
        out.finish();
        assert!(out.finished());
        assert!(
            matches!(out.send(vec![1]), Err(ServiceError::Failed(m)) if m.contains("after finishing"))
        );
        assert_eq!(
            out.pop().map(Outgoing::into_payload).as_deref(),
            Some(&[0u8; 4][..]),
            "queued messages still flush"
        );
        assert!(out.pop().is_none());
    }

    /// Books whose uid 1 may hold `limit` bytes, and that uid's memory.
    fn limited(limit: u64) -> (crate::accounting::Accounting, Memory) {
        let mut config = crate::config::Config::default();
        config.limits.memory_per_user = limit;
        let mut books = crate::accounting::Accounting::new(config);
        let memory = Memory::new(books.budget_of(1));
        (books, memory)
    }

    #[test]
    fn queued_messages_are_charged_until_written_out() {
        let (books, memory) = limited(100);
        let mut out = Outbox::with_memory(100, memory);
        out.send(Vec::with_capacity(60))
            .expect("60 bytes of buffer");
        let shared = Arc::new(vec![1u8; 30]);
        out.send_shared(shared.clone()).expect("shared");
        assert_eq!(books.memory_of(1), 90);
        let err = out.send(Vec::with_capacity(11));
        assert!(
            matches!(&err, Err(ServiceError::NoMemory(m)) if m.starts_with("memory_per_user: uid 1")),
            "{err:?}"
        );
        // A fill is charged its closure, not its message length.
        let state = [7u8; 9];
        out.send_with(100, move |mut p| p.fill(state[p.offset() % 9]))
            .expect("the closure fits what is left");
        assert_eq!(books.memory_of(1), 99);
        let first = out.pop().expect("first");
        assert_eq!(books.memory_of(1), 99, "popped but not yet written out");
        drop(first);
        assert_eq!(books.memory_of(1), 39);
        assert_eq!(
            out.pop().map(Outgoing::into_payload).as_deref(),
            Some(&shared[..])
        );
        assert_eq!(
            out.pop().map(Outgoing::into_payload).as_deref(),
            Some(&[7u8; 100][..])
        );
        assert_eq!(books.memory_of(1), 0);
    }

    #[test]
    fn a_waker_calls_its_function() {
        let n = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let m = n.clone();
        let w = SessionWaker::new(move || {
            m.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        w.clone().wake();
        w.wake();
        assert_eq!(n.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}
