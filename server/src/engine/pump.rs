//! One session's pump: moves data between its rings and its service handler.
//!
//! A pump owns the session's server endpoint, the handler, the handler's
//! outbox and the frame being written. [`Pump::run`] drains the eventfds
//! that fired, checks the hang-up socket, flushes queued output and reads
//! input until the rings leave nothing to do ([`Step::Idle`]), the time slice
//! is used ([`Step::More`]) or the session must end ([`Step::End`]).
//!
//! A run is bounded in time as well as in messages and bytes: the clock is
//! checked between every ring operation, partial reads and writes included,
//! so a client that trickles a frame one byte at a time (or drains one a byte
//! at a time) holds its worker for one slice at most. In spin mode a session
//! busy-polls its ring only for what is left of its spin budget (`spin-us`
//! after its last whole frame, in wall time) and of the slice, and never
//! while other sessions of the same worker wait to run: then it yields after
//! one look at its rings. Spin time and run time are counted per session.

use crate::service::{Memory, Message, Outbox, Outgoing, ServiceError, SessionHandler};
use shmlink_endpoint::frame::{OutFrame, Received};
use shmlink_endpoint::{spin_keeping_word, sys, Endpoint, ReadProgress, Wakeup, WriteProgress};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages one session may move per run before yielding.
const SLICE_MESSAGES: u32 = 512;
/// Bytes one session may move per run before yielding.
const SLICE_BYTES: u64 = 8 << 20;
/// Bytes one ring operation may copy before the slice is checked again:
/// copying runs at several GB/s, so this is a small fraction of the slice.
pub(crate) const RING_OP_BYTES: usize = 512 << 10;
/// Wall time one session may hold its worker per run before yielding.
pub(crate) const SLICE_TIME: Duration = Duration::from_millis(2);

/// Which of a session's fds woke it, as a bit set (see [`Pump::fds`]).
pub(crate) const FIRED_DATA: u8 = 1;
/// The outgoing ring's space eventfd fired.
pub(crate) const FIRED_ROOM: u8 = 2;
/// The hang-up socket fired.
pub(crate) const FIRED_HANGUP: u8 = 4;
/// The link to the broker fired (provided sessions only).
pub(crate) const FIRED_LINK: u8 = 8;

/// Byte, message and time counts of one session, updated by its pump and
/// read by the D-Bus side without waiting for it.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    /// Payload bytes received from the client.
    pub bytes_to_server: AtomicU64,
    /// Messages received from the client.
    pub messages_to_server: AtomicU64,
    /// Payload bytes queued for the client.
    pub bytes_to_client: AtomicU64,
    /// Messages queued for the client.
    pub messages_to_client: AtomicU64,
    /// Nanoseconds a worker spent busy-polling this session's rings.
    pub spin_ns: AtomicU64,
    /// Nanoseconds a worker spent running this session (spinning included).
    pub run_ns: AtomicU64,
    /// Runs cut short by the time slice.
    pub slices_used_up: AtomicU64,
}

impl Traffic {
    /// A one-line summary for the log.
    pub fn summary(&self) -> String {
        let ms = |n: &AtomicU64| n.load(Relaxed) as f64 / 1e6;
        format!(
            "{} message(s)/{} byte(s) in, {} message(s)/{} byte(s) out, \
             worker time {:.1} ms (spinning {:.1} ms, {} full slice(s))",
            self.messages_to_server.load(Relaxed),
            self.bytes_to_server.load(Relaxed),
            self.messages_to_client.load(Relaxed),
            self.bytes_to_client.load(Relaxed),
            ms(&self.run_ns),
            ms(&self.spin_ns),
            self.slices_used_up.load(Relaxed),
        )
    }
}

/// What one run of a pump ended with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing to do until an fd wakes the session.
    Idle,
    /// Time slice used up with work left (or, in spin mode, spin budget
    /// left while other sessions wait): run again soon.
    More,
    /// The session must end, for this reason.
    End(String),
}

/// The bounds of one run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slice {
    /// When the run must yield.
    pub deadline: Instant,
    /// Whether other sessions of the same worker wait to run (then a
    /// spinning session yields instead of spinning).
    pub contended: bool,
}

impl Slice {
    /// A slice of [`SLICE_TIME`] from now.
    pub fn starting_now(contended: bool) -> Slice {
        Slice {
            deadline: Instant::now() + SLICE_TIME,
            contended,
        }
    }
}

/// One session as its worker serves it.
pub(crate) struct Pump {
    endpoint: Endpoint,
    handler: Box<dyn SessionHandler>,
    outbox: Outbox,
    traffic: Arc<Traffic>,
    /// A provided session's end of its link to the broker: it closes when
    /// the broker ends the session, and dropping it tells the broker.
    link: Option<OwnedFd>,
    /// A message frame partly written to the outgoing ring (still charged).
    pending: Option<Outgoing>,
    /// The buffer an incoming message is decoded into and handed to the
    /// handler in; given back to the decoder right after (which keeps it,
    /// charged, for the next body), so a steady stream of messages
    /// allocates nothing and the pump holds nothing between messages.
    incoming: Vec<u8>,
    /// The end-of-stream frame, once started.
    end_frame: Option<OutFrame<&'static [u8]>>,
    end_sent: bool,
    /// Spin mode: since when the session has waited without moving a whole
    /// frame (its spin budget runs from there).
    waiting_since: Option<Instant>,
    /// Spin mode: a successful spin left our polling word on a ring set (see
    /// [`spin_keeping_word`]), so the client skips its signals while we serve
    /// what it sent; cleared, with the rings looked at again, before the
    /// worker waits for the session's fds.
    polling: bool,
}

/// Why a run stopped moving data.
enum Blocked {
    /// The outgoing ring is full.
    Room,
    /// The incoming ring holds no complete frame.
    Data,
}

impl Pump {
    /// A pump serving `endpoint` with `handler`, counting into `traffic`;
    /// what it queues for the client is bounded by the largest message only
    /// until [`Pump::with_memory`].
    pub fn new(
        endpoint: Endpoint,
        handler: Box<dyn SessionHandler>,
        traffic: Arc<Traffic>,
    ) -> Self {
        let outbox = Outbox::with_memory(u64::from(endpoint.max_message()), Memory::unlimited());
        Pump {
            endpoint,
            handler,
            outbox,
            traffic,
            link: None,
            pending: None,
            incoming: Vec::new(),
            end_frame: None,
            end_sent: false,
            waiting_since: None,
            polling: false,
        }
    }

    /// The same pump, charging what it queues for the client to `memory`
    /// (its owner's budget, which the endpoint charges incoming messages to).
    pub fn with_memory(mut self, memory: Memory) -> Self {
        self.outbox = Outbox::with_memory(u64::from(self.endpoint.max_message()), memory);
        self
    }

    /// The same pump, also watching `link` (a provided session's link to
    /// the broker): the session ends when the broker closes its end.
    pub fn with_link(mut self, link: OwnedFd) -> Self {
        self.link = Some(link);
        self
    }

    /// The fds to watch, in the order of the `FIRED_*` bits: the incoming
    /// ring's data eventfd, the outgoing ring's space eventfd, the hang-up
    /// socket, and the link if there is one.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![
            self.endpoint.readable_fd(),
            self.endpoint.writable_fd(),
            self.endpoint.hangup_fd(),
        ];
        fds.extend(self.link.as_ref().map(|l| l.as_fd()));
        fds
    }

    /// Moves as much data as the rings and `slice` allow; `fired` says which
    /// fds woke the session (none for a kick or a re-queued time slice).
    pub fn run(&mut self, fired: u8, slice: Slice) -> Step {
        let start = Instant::now();
        let step = match self.run_inner(fired, slice) {
            Ok(Step::Idle) if self.polling => self.stop_polling(),
            Ok(step) => step,
            Err(reason) => Step::End(reason),
        };
        let t = &self.traffic;
        t.run_ns.fetch_add(nanos(start.elapsed()), Relaxed);
        if step == Step::More && Instant::now() >= slice.deadline {
            t.slices_used_up.fetch_add(1, Relaxed);
        }
        step
    }

    fn run_inner(&mut self, fired: u8, slice: Slice) -> Result<Step, String> {
        let ep_err = |e: shmlink_endpoint::Error| {
            if e.is_peer_fault() {
                format!("client misbehaved: {e}")
            } else {
                e.to_string()
            }
        };
        // Reset only the eventfds that fired (level-triggered: an undrained one
        // fires again), and look at the hang-up socket only when it fired: the
        // rings are re-checked below whatever woke us, so a wake-up costs one
        // system call instead of three. (Edge-triggered eventfds that are never
        // read would save that one too, but a client that saturates its own
        // counter would then never wake its session again; draining keeps a
        // flooded counter harmless.)
        if fired & FIRED_DATA != 0 {
            sys::eventfd_drain(self.endpoint.readable_fd()).map_err(|e| ep_err(e.into()))?;
        }
        if fired & FIRED_ROOM != 0 {
            sys::eventfd_drain(self.endpoint.writable_fd()).map_err(|e| ep_err(e.into()))?;
        }
        if fired & FIRED_HANGUP != 0 && self.endpoint.peer_gone().map_err(ep_err)? {
            return Err("client hung up".into());
        }
        if fired & FIRED_LINK != 0 {
            if let Some(link) = &self.link {
                match sys::hangup_state(link.as_fd()) {
                    Ok(sys::HangupState::Open) => {}
                    Ok(sys::HangupState::Closed) => {
                        return Err("the broker ended the session".into())
                    }
                    Ok(sys::HangupState::Written) => {
                        return Err("the broker wrote to the session's link".into())
                    }
                    Err(e) => return Err(format!("the session's link failed: {e}")),
                }
            }
        }
        let (mut msgs, mut bytes) = (0u32, 0u64);
        loop {
            // Every pass makes at most one ring operation (or one call into
            // the service): check the slice first.
            if msgs >= SLICE_MESSAGES || bytes >= SLICE_BYTES || Instant::now() >= slice.deadline {
                return Ok(Step::More);
            }
            // 1. Flush what the service queued.
            if let Some(frame) = self.pending.as_mut() {
                match self
                    .endpoint
                    .ring_sender()
                    .write_frame_bounded(frame, RING_OP_BYTES)
                    .map_err(ep_err)?
                {
                    WriteProgress::Done => {}
                    WriteProgress::Bounded => continue,
                    WriteProgress::Blocked => match self.wait(Blocked::Room, slice) {
                        Some(step) => return Ok(step),
                        None => continue,
                    },
                }
                self.pending = None;
                self.waiting_since = None;
            }
            if let Some(msg) = self.outbox.pop() {
                let t = &self.traffic;
                t.bytes_to_client.fetch_add(msg.len() as u64, Relaxed);
                t.messages_to_client.fetch_add(1, Relaxed);
                bytes += msg.len() as u64;
                self.pending = Some(msg);
                continue;
            }
            if self.outbox.finished() {
                if !self.end_sent {
                    let end = self.end_frame.get_or_insert_with(OutFrame::end);
                    if !self
                        .endpoint
                        .ring_sender()
                        .write_frame(end)
                        .map_err(ep_err)?
                    {
                        return Ok(Step::Idle);
                    }
                    self.end_sent = true;
                }
            } else if self.handler.wants_to_produce() {
                self.handler
                    .produce(&mut self.outbox)
                    .map_err(|e| service_error("service failed", e))?;
                msgs += 1;
                continue;
            }
            // 2. Read input (only once the outbox is flushed: backpressure).
            let read = self
                .endpoint
                .ring_receiver()
                .read_bounded(RING_OP_BYTES, &mut self.incoming)
                .map_err(ep_err)?;
            match read {
                ReadProgress::Received(Received::Message) => {
                    self.waiting_since = None;
                    let len = self.incoming.len() as u64;
                    let t = &self.traffic;
                    t.bytes_to_server.fetch_add(len, Relaxed);
                    t.messages_to_server.fetch_add(1, Relaxed);
                    bytes += len;
                    msgs += 1;
                    let handled = self
                        .handler
                        .on_message(Message::new(&mut self.incoming), &mut self.outbox);
                    let buf = std::mem::take(&mut self.incoming);
                    self.endpoint.ring_receiver().recycle(buf);
                    handled.map_err(|e| service_error("service refused input", e))?;
                }
                ReadProgress::Received(Received::End) => {
                    self.waiting_since = None;
                    self.handler
                        .on_end(&mut self.outbox)
                        .map_err(|e| service_error("service failed", e))?;
                }
                ReadProgress::Bounded => {}
                ReadProgress::Empty => {
                    if let Some(step) = self.wait(Blocked::Data, slice) {
                        return Ok(step);
                    }
                }
            }
        }
    }

    /// Clears the polling words a successful spin left set, then looks at
    /// the rings again: a client that saw a word still set did not signal,
    /// so what it wrote meanwhile must be found now, not by the worker's
    /// wait for the fds.
    fn stop_polling(&mut self) -> Step {
        self.polling = false;
        self.endpoint.ring_receiver().set_polling(false);
        self.endpoint.ring_sender().set_polling(false);
        // An error reading a ring counts as work: the next run reports it.
        let data = self.endpoint.ring_receiver().has_data().unwrap_or(true);
        let blocked_on_room = self.pending.is_some() || (self.outbox.finished() && !self.end_sent);
        if data || (blocked_on_room && self.endpoint.ring_sender().has_room().unwrap_or(true)) {
            Step::More
        } else {
            Step::Idle
        }
    }

    /// The rings are blocked: in park mode, or with the spin budget spent,
    /// wait for an fd ([`Step::Idle`]); in spin mode, yield if other
    /// sessions wait ([`Step::More`]), else busy-poll for what is left of
    /// the spin budget and the slice. `None`: the ring became ready, go on.
    fn wait(&mut self, blocked: Blocked, slice: Slice) -> Option<Step> {
        let Wakeup::Spin(spin) = self.endpoint.wakeup() else {
            return Some(Step::Idle);
        };
        let now = Instant::now();
        let since = *self.waiting_since.get_or_insert(now);
        let budget = (since + spin).saturating_duration_since(now);
        if budget.is_zero() {
            return Some(Step::Idle);
        }
        if slice.contended {
            return Some(Step::More);
        }
        let limit = budget.min(slice.deadline.saturating_duration_since(now));
        let ready = spin_for(&mut self.endpoint, limit, blocked);
        self.polling |= ready;
        self.traffic
            .spin_ns
            .fetch_add(nanos(now.elapsed()), Relaxed);
        if ready {
            None
        } else {
            // Out of slice (re-queued) or out of spin budget (next time: Idle).
            Some(Step::More)
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The reason a handler's error ends its session with: a memory limit
/// speaks for itself (it names the limit), anything else says what failed.
fn service_error(what: &str, e: ServiceError) -> String {
    match e {
        ServiceError::NoMemory(m) => m,
        other => format!("{what}: {other}"),
    }
}

/// Spin mode: busy-polls the ring for up to `budget`; true if it became
/// ready, and then our polling word stays set (see [`spin_keeping_word`]
/// and [`Pump::stop_polling`]).
fn spin_for(ep: &mut Endpoint, budget: Duration, blocked: Blocked) -> bool {
    match blocked {
        Blocked::Room => spin_keeping_word(ep.ring_sender(), budget),
        Blocked::Data => spin_keeping_word(ep.ring_receiver(), budget),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::tests::{caller, options};
    use crate::builtin::{Echo, Sink, Source};
    use crate::service::{prop, Service, ServiceError};
    use shmlink_endpoint::Item;
    use shmlink_interfaces::option;

    const MAX_MESSAGE: u32 = 1 << 16;

    /// A pump for `service` and the client's endpoint of the same rings.
    fn pair(
        service: &dyn Service,
        capacity: u64,
        opts: &[(&str, dbus::arg::Variant<Box<dyn dbus::arg::RefArg>>)],
    ) -> (Pump, Endpoint, Arc<Traffic>) {
        let (server, fds) =
            Endpoint::create_server(capacity, MAX_MESSAGE, Wakeup::Park).expect("rings");
        let client = Endpoint::open_client(fds, MAX_MESSAGE, Wakeup::Park).expect("client side");
        let handler = service.open(&caller(), &options(opts)).expect("open");
        let traffic = Arc::new(Traffic::default());
        (Pump::new(server, handler, traffic.clone()), client, traffic)
    }

    /// A slice long enough that only the message and byte counts end a run.
    fn roomy() -> Slice {
        Slice {
            deadline: Instant::now() + Duration::from_secs(30),
            contended: false,
        }
    }

    fn try_recv(client: &mut Endpoint) -> Option<Item> {
        client.try_recv().expect("client read")
    }

    #[test]
    fn echo_round_trip_and_end_of_stream() {
        let (mut pump, mut client, traffic) = pair(&Echo, 4096, &[]);
        assert_eq!(
            pump.run(0, roomy()),
            Step::Idle,
            "nothing to do before input"
        );
        client.send(b"ping").expect("send");
        client.send(b"pong").expect("send");
        assert_eq!(pump.run(FIRED_DATA, roomy()), Step::Idle);
        assert_eq!(try_recv(&mut client), Some(Item::Message(b"ping".to_vec())));
        assert_eq!(try_recv(&mut client), Some(Item::Message(b"pong".to_vec())));
        assert_eq!(traffic.messages_to_server.load(Relaxed), 2);
        assert_eq!(traffic.bytes_to_client.load(Relaxed), 8);
        client.finish().expect("finish");
        assert_eq!(pump.run(FIRED_DATA, roomy()), Step::Idle);
        assert_eq!(
            try_recv(&mut client),
            Some(Item::End),
            "end answered with end"
        );
    }

    #[test]
    fn a_client_that_does_not_read_stalls_only_the_outbox() {
        // A 4096-byte request is rounded to 8128 bytes per ring: eight of
        // these messages fit, so five and five more overflow the ring to the client.
        let (mut pump, mut client, traffic) = pair(&Echo, 4096, &[]);
        let msg = vec![7u8; 1000];
        for _ in 0..5 {
            client.send(&msg).expect("send");
        }
        assert_eq!(pump.run(FIRED_DATA, roomy()), Step::Idle);
        assert_eq!(traffic.messages_to_server.load(Relaxed), 5);
        for _ in 0..5 {
            client.send(&msg).expect("send");
        }
        assert_eq!(
            pump.run(FIRED_DATA, roomy()),
            Step::Idle,
            "a full ring idles the pump"
        );
        let read = traffic.messages_to_server.load(Relaxed);
        assert!(
            read < 10,
            "input stops while output is blocked (read {read})"
        );
        let mut got = 0;
        while got < 10 {
            match try_recv(&mut client) {
                Some(Item::Message(m)) => {
                    assert_eq!(m, msg);
                    got += 1;
                }
                Some(Item::End) => panic!("unexpected end"),
                None => assert_eq!(pump.run(FIRED_ROOM, roomy()), Step::Idle),
            }
        }
        assert_eq!(traffic.messages_to_server.load(Relaxed), 10);
    }

    /// Whether `fd` (an eventfd) was written since it was last drained; drains it.
    fn signalled(fd: std::os::fd::BorrowedFd<'_>) -> bool {
        let now = sys::poll_readable(&[fd], Some(Instant::now())).expect("poll")[0].readable;
        sys::eventfd_drain(fd).expect("drain");
        now
    }

    #[test]
    fn a_polling_word_left_set_is_cleared_before_the_worker_waits() {
        let (mut pump, mut client, _) = pair(&Echo, 4096, &[]);
        client.send(b"one").expect("send");
        assert_eq!(pump.run(FIRED_DATA, roomy()), Step::Idle);
        assert_eq!(try_recv(&mut client), Some(Item::Message(b"one".to_vec())));
        // As a spin that found data leaves it: the word set, the pump told.
        pump.endpoint.ring_receiver().set_polling(true);
        pump.polling = true;
        client.send(b"two").expect("send");
        assert!(
            !signalled(pump.endpoint.readable_fd()),
            "the client skips its signal while the word is set"
        );
        assert_eq!(pump.run(0, roomy()), Step::Idle);
        assert_eq!(try_recv(&mut client), Some(Item::Message(b"two".to_vec())));
        client.send(b"three").expect("send");
        assert!(
            signalled(pump.endpoint.readable_fd()),
            "a pump that goes idle clears its word first"
        );
        assert_eq!(pump.run(FIRED_DATA, roomy()), Step::Idle);
        assert_eq!(
            try_recv(&mut client),
            Some(Item::Message(b"three".to_vec()))
        );
        // What arrives unsignalled while the word is still set is found by
        // the look at the ring that follows the clearing.
        pump.endpoint.ring_receiver().set_polling(true);
        pump.polling = true;
        client.send(b"four").expect("send");
        assert!(!signalled(pump.endpoint.readable_fd()));
        assert_eq!(
            pump.stop_polling(),
            Step::More,
            "the unsignalled message is seen"
        );
        assert_eq!(pump.run(0, roomy()), Step::Idle);
        assert_eq!(try_recv(&mut client), Some(Item::Message(b"four".to_vec())));
    }

    #[test]
    fn a_protocol_violation_ends_the_session() {
        let (mut pump, mut client, _) = pair(&Source, 4096, &[(option::COUNT, prop(0u64))]);
        client.send(b"source takes no input").expect("send");
        match pump.run(FIRED_DATA, roomy()) {
            Step::End(reason) => assert!(reason.starts_with("service refused input"), "{reason}"),
            other => panic!("expected the end, got {other:?}"),
        }
    }

    #[test]
    fn a_hang_up_ends_the_session() {
        let (mut pump, client, _) = pair(&Echo, 4096, &[]);
        drop(client);
        assert_eq!(
            pump.run(FIRED_HANGUP, roomy()),
            Step::End("client hung up".into())
        );
    }

    #[test]
    fn the_broker_closing_the_link_ends_the_session() {
        let (pump, _client, _) = pair(&Echo, 4096, &[]);
        let (broker_end, link) = sys::socketpair().expect("link");
        let mut pump = pump.with_link(link);
        assert_eq!(pump.fds().len(), 4, "the link is watched");
        assert_eq!(
            pump.run(FIRED_LINK, roomy()),
            Step::Idle,
            "an open link is no end"
        );
        drop(broker_end);
        assert_eq!(
            pump.run(FIRED_LINK, roomy()),
            Step::End("the broker ended the session".into())
        );
    }

    #[test]
    fn a_broker_writing_to_the_link_ends_the_session() {
        let (pump, _client, _) = pair(&Echo, 4096, &[]);
        let (broker_end, link) = sys::socketpair().expect("link");
        let mut pump = pump.with_link(link);
        rustix::io::write(&broker_end, b"x").expect("write");
        assert_eq!(
            pump.run(FIRED_LINK, roomy()),
            Step::End("the broker wrote to the session's link".into())
        );
    }

    #[test]
    fn a_busy_session_yields_its_time_slice() {
        let opts = [
            (option::COUNT, prop(u64::from(SLICE_MESSAGES) + 10)),
            (option::MESSAGE_SIZE, prop(1u64)),
        ];
        let (mut pump, mut client, traffic) = pair(&Source, 1 << 20, &opts);
        assert_eq!(
            pump.run(0, roomy()),
            Step::More,
            "the slice ends before the stream"
        );
        let first = traffic.messages_to_client.load(Relaxed);
        assert!(
            first < u64::from(SLICE_MESSAGES + 10),
            "only part was sent ({first})"
        );
        assert_eq!(pump.run(0, roomy()), Step::Idle);
        let mut n = 0;
        while let Some(Item::Message(_)) = try_recv(&mut client) {
            n += 1;
        }
        assert_eq!(n, SLICE_MESSAGES + 10, "then the rest and the end");
    }

    #[test]
    fn sink_state_counts_everything_before_the_end_frame() {
        let (mut pump, mut client, _) = pair(&Sink, 4096, &[]);
        let view = pump.handler.state_view().expect("sink view");
        for i in 0..3u8 {
            client.send(&[i; 10]).expect("send");
        }
        client.finish().expect("finish");
        assert_eq!(pump.run(FIRED_DATA, roomy()), Step::Idle);
        assert_eq!(try_recv(&mut client), Some(Item::End));
        let st = view.state();
        assert_eq!(st.get("messages").and_then(|v| v.0.as_u64()), Some(3));
        assert_eq!(st.get("bytes").and_then(|v| v.0.as_u64()), Some(30));
    }

    #[test]
    fn a_failing_service_ends_the_session() {
        struct Failing;
        impl crate::SessionHandler for Failing {
            fn on_message(&mut self, _: Message<'_>, _: &mut Outbox) -> Result<(), ServiceError> {
                Err(ServiceError::Failed("no".into()))
            }
        }
        let (server, fds) =
            Endpoint::create_server(4096, MAX_MESSAGE, Wakeup::Park).expect("rings");
        let mut client = Endpoint::open_client(fds, MAX_MESSAGE, Wakeup::Park).expect("client");
        let mut pump = Pump::new(server, Box::new(Failing), Arc::default());
        client.send(b"x").expect("send");
        assert_eq!(
            pump.run(FIRED_DATA, roomy()),
            Step::End("service refused input: no".into())
        );
    }

    /// A pump in spin mode and the client's endpoint of the same rings.
    fn spinning(
        service: &dyn Service,
        capacity: u64,
        spin: Duration,
    ) -> (Pump, Endpoint, Arc<Traffic>) {
        let (server, fds) =
            Endpoint::create_server(capacity, MAX_MESSAGE, Wakeup::Spin(spin)).expect("rings");
        let client = Endpoint::open_client(fds, MAX_MESSAGE, Wakeup::Park).expect("client side");
        let handler = service.open(&caller(), &options(&[])).expect("open");
        let traffic = Arc::new(Traffic::default());
        (Pump::new(server, handler, traffic.clone()), client, traffic)
    }

    #[test]
    fn an_idle_spinning_session_spins_within_its_slice_then_parks() {
        let spin = Duration::from_millis(10);
        let (mut pump, _client, traffic) = spinning(&Echo, 4096, spin);
        let started = Instant::now();
        let mut runs = 0;
        loop {
            let t = Instant::now();
            let step = pump.run(0, Slice::starting_now(false));
            let took = t.elapsed();
            // Generous: the slice is 2 ms, the machine may be busy.
            assert!(took < Duration::from_millis(100), "one run took {took:?}");
            runs += 1;
            match step {
                Step::More => continue,
                Step::Idle => break,
                Step::End(r) => panic!("ended: {r}"),
            }
        }
        assert!(
            runs > 1,
            "the 10 ms spin was cut into slices ({runs} run(s))"
        );
        assert!(started.elapsed() >= spin, "it spun its whole budget first");
        let spun = Duration::from_nanos(traffic.spin_ns.load(Relaxed));
        assert!(
            spun > Duration::ZERO && spun <= started.elapsed(),
            "{spun:?}"
        );
        assert!(traffic.run_ns.load(Relaxed) >= traffic.spin_ns.load(Relaxed));
        assert_eq!(
            pump.run(0, Slice::starting_now(false)),
            Step::Idle,
            "budget spent"
        );
    }

    #[test]
    fn a_spinning_session_yields_at_once_when_others_wait() {
        let (mut pump, _client, traffic) = spinning(&Echo, 4096, Duration::from_millis(10));
        assert_eq!(pump.run(0, Slice::starting_now(true)), Step::More);
        assert_eq!(
            traffic.spin_ns.load(Relaxed),
            0,
            "no spinning while others wait"
        );
    }

    #[test]
    fn a_frame_that_arrives_in_pieces_holds_the_worker_one_slice_at_most() {
        // The client writes a 60 KiB message into a 4 KiB ring a piece every
        // 8 ms (about 120 ms in all): with a 10 ms spin budget, a pump
        // without a time slice would spin on the partial frame until its end.
        let (mut pump, mut client, traffic) = spinning(&Sink, 1024, Duration::from_millis(10));
        let view = pump.handler.state_view().expect("sink view");
        let msg: Vec<u8> = (0..60 * 1024).map(|i| (i % 251) as u8).collect();
        let expected_crc = crc32fast::hash(&msg);
        let writer = std::thread::spawn(move || {
            let mut frame = OutFrame::message(msg);
            while !client.ring_sender().write_frame(&mut frame).expect("write") {
                // The trickle's pace, not a synchronisation.
                std::thread::sleep(Duration::from_millis(8));
            }
            client
        });
        let longest = drive(&mut pump, FIRED_DATA, || {
            traffic.messages_to_server.load(Relaxed) > 0
        });
        let _client = writer.join().expect("writer");
        assert!(
            longest < Duration::from_millis(60),
            "a run took {longest:?}"
        );
        let st = view.state();
        assert_eq!(st.get("bytes").and_then(|v| v.0.as_u64()), Some(60 * 1024));
        assert_eq!(
            st.get("crc32").and_then(|v| v.0.as_u64()),
            Some(u64::from(expected_crc)),
            "the message arrived intact"
        );
    }

    /// Between messages the pump holds no message buffer of its own: the
    /// one a message was handed over in goes back to the decoder, which
    /// keeps it charged (up to its bound) or frees it.
    #[test]
    fn between_messages_only_the_charged_kept_buffer_remains() {
        let mut config = crate::config::Config::default();
        config.limits.memory_per_user = 64 << 20;
        let mut books = crate::accounting::Accounting::new(config);
        let (mut server, fds) = Endpoint::create_server(1 << 20, 8 << 20, Wakeup::Park).unwrap();
        let budget = books.budget_of(1);
        server.set_budget(budget.clone());
        let client = Endpoint::open_client(fds, 8 << 20, Wakeup::Park).expect("client");
        let handler = Sink.open(&caller(), &options(&[])).expect("open");
        let traffic = Arc::new(Traffic::default());
        let mut pump = Pump::new(server, handler, traffic.clone()).with_memory(Memory::new(budget));
        let writer = std::thread::spawn(move || {
            let mut client = client;
            client.set_timeout(Some(Duration::from_secs(30)));
            client
                .send(&vec![1u8; 3 << 20])
                .expect("a message above the kept bound");
            client
        });
        drive(&mut pump, FIRED_DATA, || {
            traffic.messages_to_server.load(Relaxed) == 1
        });
        let mut client = writer.join().expect("writer");
        assert_eq!(books.memory_of(1), 0, "a 3 MiB buffer is not kept");
        client.send(&[2u8; 100_000]).expect("send");
        drive(&mut pump, FIRED_DATA, || {
            traffic.messages_to_server.load(Relaxed) == 2
        });
        assert_eq!(
            books.memory_of(1),
            100_000,
            "the buffer kept for the next message, charged"
        );
        drop(pump);
        assert_eq!(books.memory_of(1), 0, "and given back with the session");
    }

    /// Runs `pump` (woken by `fired`, waiting on that fd when idle) until
    /// `done`, within 30 s; returns the longest single run.
    fn drive(pump: &mut Pump, fired: u8, mut done: impl FnMut() -> bool) -> Duration {
        let fd_index = if fired == FIRED_DATA { 0 } else { 1 };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut longest = Duration::ZERO;
        while !done() {
            assert!(Instant::now() < deadline, "the transfer never finished");
            let t = Instant::now();
            let step = pump.run(fired, Slice::starting_now(false));
            longest = longest.max(t.elapsed());
            match step {
                Step::More => {}
                Step::Idle => {
                    let fd = [pump.fds()[fd_index]];
                    let _ =
                        sys::poll_readable(&fd, Some(Instant::now() + Duration::from_millis(5)));
                }
                Step::End(r) => panic!("ended: {r}"),
            }
        }
        longest
    }

    #[test]
    fn a_frame_drained_in_pieces_holds_the_worker_one_slice_at_most() {
        // The mirror image: a 60 KiB message from `source` to a client that
        // empties the 4 KiB ring every 8 ms.
        let (server, fds) =
            Endpoint::create_server(1024, MAX_MESSAGE, Wakeup::Spin(Duration::from_millis(10)))
                .expect("rings");
        let mut client = Endpoint::open_client(fds, MAX_MESSAGE, Wakeup::Park).expect("client");
        let opts = [
            (option::COUNT, prop(1u64)),
            (option::MESSAGE_SIZE, prop(60 * 1024u64)),
        ];
        let handler = Source.open(&caller(), &options(&opts)).expect("open");
        let traffic = Arc::new(Traffic::default());
        let mut pump = Pump::new(server, handler, traffic.clone());
        let reader = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match client.ring_receiver().read_item().expect("read") {
                    Some(Item::Message(m)) => return m.len(),
                    Some(Item::End) => panic!("end before the message"),
                    // The drain's pace, not a synchronisation.
                    None => std::thread::sleep(Duration::from_millis(8)),
                }
                assert!(Instant::now() < deadline, "the message never arrived");
            }
        });
        let longest = drive(&mut pump, FIRED_ROOM, || reader.is_finished());
        assert_eq!(reader.join().expect("reader"), 60 * 1024);
        assert!(
            longest < Duration::from_millis(60),
            "a run took {longest:?}"
        );
        assert!(
            traffic.spin_ns.load(Relaxed) > 0,
            "it spun, and that was counted"
        );
    }
}
