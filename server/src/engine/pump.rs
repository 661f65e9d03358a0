//! One session's pump: moves data between its rings and its service handler.
//!
//! A pump owns the session's server endpoint, the handler, the handler's
//! outbox and the frame being written. [`Pump::run`] drains the eventfds
//! that fired, checks the hang-up socket, flushes queued output and reads
//! input until the rings leave nothing to do ([`Step::Idle`]), the time slice
//! is used ([`Step::More`]) or the session must end ([`Step::End`]).

use crate::service::{Memory, Outbox, Outgoing, ServiceError, SessionHandler};
use shmlink_endpoint::frame::OutFrame;
use shmlink_endpoint::{sys, Endpoint, Item, Wakeup};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Messages one session may move per run before yielding.
const SLICE_MESSAGES: u32 = 512;
/// Bytes one session may move per run before yielding.
const SLICE_BYTES: u64 = 8 << 20;

/// Which of a session's fds woke it, as a bit set (see [`Pump::fds`]).
pub(crate) const FIRED_DATA: u8 = 1;
/// The outgoing ring's space eventfd fired.
pub(crate) const FIRED_ROOM: u8 = 2;
/// The hang-up socket fired.
pub(crate) const FIRED_HANGUP: u8 = 4;

/// Byte and message counts of one session, updated by its pump and read by
/// the D-Bus side without waiting for it.
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
}

/// What one run of a pump ended with.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing to do until an fd wakes the session.
    Idle,
    /// Time slice used up with work left: run again soon.
    More,
    /// The session must end, for this reason.
    End(String),
}

/// One session as its worker serves it.
pub(crate) struct Pump {
    endpoint: Endpoint,
    handler: Box<dyn SessionHandler>,
    outbox: Outbox,
    traffic: Arc<Traffic>,
    /// A message frame partly written to the outgoing ring (still charged).
    pending: Option<OutFrame<Outgoing>>,
    /// The end-of-stream frame, once started.
    end_frame: Option<OutFrame<&'static [u8]>>,
    end_sent: bool,
}

impl Pump {
    /// A pump serving `endpoint` with `handler`, counting into `traffic`.
    pub fn new(
        endpoint: Endpoint,
        handler: Box<dyn SessionHandler>,
        traffic: Arc<Traffic>,
    ) -> Self {
        let memory = endpoint
            .budget()
            .map_or_else(Memory::unlimited, Memory::new);
        let outbox = Outbox::with_memory(u64::from(endpoint.max_message()), memory);
        Pump {
            endpoint,
            handler,
            outbox,
            traffic,
            pending: None,
            end_frame: None,
            end_sent: false,
        }
    }

    /// The fds to watch, in the order of the `FIRED_*` bits: the incoming
    /// ring's data eventfd, the outgoing ring's space eventfd, the hang-up socket.
    pub fn fds(&self) -> [BorrowedFd<'_>; 3] {
        [
            self.endpoint.readable_fd(),
            self.endpoint.writable_fd(),
            self.endpoint.hangup_fd(),
        ]
    }

    /// Moves as much data as the rings allow; `fired` says which fds woke
    /// the session (none for a kick or a re-queued time slice).
    pub fn run(&mut self, fired: u8) -> Step {
        match self.run_inner(fired) {
            Ok(step) => step,
            Err(reason) => Step::End(reason),
        }
    }

    fn run_inner(&mut self, fired: u8) -> Result<Step, String> {
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
        let spin = match self.endpoint.wakeup() {
            Wakeup::Spin(d) => d,
            Wakeup::Park => Duration::ZERO,
        };
        let (mut msgs, mut bytes) = (0u32, 0u64);
        loop {
            // 1. Flush what the service queued.
            if let Some(frame) = self.pending.as_mut() {
                if !self
                    .endpoint
                    .ring_sender()
                    .write_frame(frame)
                    .map_err(ep_err)?
                {
                    if spin.is_zero() || !spin_for(&mut self.endpoint, spin, true) {
                        return Ok(Step::Idle);
                    }
                    continue;
                }
                self.pending = None;
            }
            if let Some(msg) = self.outbox.pop() {
                let t = &self.traffic;
                t.bytes_to_client.fetch_add(msg.len() as u64, Relaxed);
                t.messages_to_client.fetch_add(1, Relaxed);
                bytes += msg.len() as u64;
                self.pending = Some(OutFrame::message(msg));
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
                if msgs >= SLICE_MESSAGES || bytes >= SLICE_BYTES {
                    return Ok(Step::More);
                }
                continue;
            }
            // 2. Read input (only once the outbox is flushed: backpressure).
            match self.endpoint.ring_receiver().read_item().map_err(ep_err)? {
                Some(Item::Message(m)) => {
                    let t = &self.traffic;
                    t.bytes_to_server.fetch_add(m.len() as u64, Relaxed);
                    t.messages_to_server.fetch_add(1, Relaxed);
                    bytes += m.len() as u64;
                    msgs += 1;
                    self.handler
                        .on_message(m, &mut self.outbox)
                        .map_err(|e| service_error("service refused input", e))?;
                }
                Some(Item::End) => {
                    self.handler
                        .on_end(&mut self.outbox)
                        .map_err(|e| service_error("service failed", e))?;
                }
                None => {
                    if spin.is_zero() || !spin_for(&mut self.endpoint, spin, false) {
                        return Ok(Step::Idle);
                    }
                }
            }
            if msgs >= SLICE_MESSAGES || bytes >= SLICE_BYTES {
                return Ok(Step::More);
            }
        }
    }
}

/// The reason a handler's error ends its session with: a memory limit
/// speaks for itself (it names the limit), anything else says what failed.
fn service_error(what: &str, e: ServiceError) -> String {
    match e {
        ServiceError::NoMemory(m) => m,
        other => format!("{what}: {other}"),
    }
}

/// Spin mode: busy-polls the ring for up to `budget`; true if it became ready.
fn spin_for(ep: &mut Endpoint, budget: Duration, for_room: bool) -> bool {
    sys::spin_until(budget, || {
        if for_room {
            ep.ring_sender().has_room().unwrap_or(true)
        } else {
            ep.ring_receiver().has_data().unwrap_or(true)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::tests::{caller, options};
    use crate::builtin::{Echo, Sink, Source};
    use crate::service::{prop, Service, ServiceError};
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

    fn try_recv(client: &mut Endpoint) -> Option<Item> {
        client.try_recv().expect("client read")
    }

    #[test]
    fn echo_round_trip_and_end_of_stream() {
        let (mut pump, mut client, traffic) = pair(&Echo, 4096, &[]);
        assert_eq!(pump.run(0), Step::Idle, "nothing to do before input");
        client.send(b"ping").expect("send");
        client.send(b"pong").expect("send");
        assert_eq!(pump.run(FIRED_DATA), Step::Idle);
        assert_eq!(try_recv(&mut client), Some(Item::Message(b"ping".to_vec())));
        assert_eq!(try_recv(&mut client), Some(Item::Message(b"pong".to_vec())));
        assert_eq!(traffic.messages_to_server.load(Relaxed), 2);
        assert_eq!(traffic.bytes_to_client.load(Relaxed), 8);
        client.finish().expect("finish");
        assert_eq!(pump.run(FIRED_DATA), Step::Idle);
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
        assert_eq!(pump.run(FIRED_DATA), Step::Idle);
        assert_eq!(traffic.messages_to_server.load(Relaxed), 5);
        for _ in 0..5 {
            client.send(&msg).expect("send");
        }
        assert_eq!(
            pump.run(FIRED_DATA),
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
                None => assert_eq!(pump.run(FIRED_ROOM), Step::Idle),
            }
        }
        assert_eq!(traffic.messages_to_server.load(Relaxed), 10);
    }

    #[test]
    fn a_protocol_violation_ends_the_session() {
        let (mut pump, mut client, _) = pair(&Source, 4096, &[(option::COUNT, prop(0u64))]);
        client.send(b"source takes no input").expect("send");
        match pump.run(FIRED_DATA) {
            Step::End(reason) => assert!(reason.starts_with("service refused input"), "{reason}"),
            other => panic!("expected the end, got {other:?}"),
        }
    }

    #[test]
    fn a_hang_up_ends_the_session() {
        let (mut pump, client, _) = pair(&Echo, 4096, &[]);
        drop(client);
        assert_eq!(pump.run(FIRED_HANGUP), Step::End("client hung up".into()));
    }

    #[test]
    fn a_busy_session_yields_its_time_slice() {
        let opts = [
            (option::COUNT, prop(u64::from(SLICE_MESSAGES) + 10)),
            (option::MESSAGE_SIZE, prop(1u64)),
        ];
        let (mut pump, mut client, traffic) = pair(&Source, 1 << 20, &opts);
        assert_eq!(pump.run(0), Step::More, "the slice ends before the stream");
        let first = traffic.messages_to_client.load(Relaxed);
        assert!(
            first < u64::from(SLICE_MESSAGES + 10),
            "only part was sent ({first})"
        );
        assert_eq!(pump.run(0), Step::Idle);
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
        assert_eq!(pump.run(FIRED_DATA), Step::Idle);
        assert_eq!(try_recv(&mut client), Some(Item::End));
        let st = view.state();
        assert_eq!(st.get("messages").and_then(|v| v.0.as_u64()), Some(3));
        assert_eq!(st.get("bytes").and_then(|v| v.0.as_u64()), Some(30));
    }

    #[test]
    fn a_failing_service_ends_the_session() {
        struct Failing;
        impl crate::SessionHandler for Failing {
            fn on_message(&mut self, _: Vec<u8>, _: &mut Outbox) -> Result<(), ServiceError> {
                Err(ServiceError::Failed("no".into()))
            }
        }
        let (server, fds) =
            Endpoint::create_server(4096, MAX_MESSAGE, Wakeup::Park).expect("rings");
        let mut client = Endpoint::open_client(fds, MAX_MESSAGE, Wakeup::Park).expect("client");
        let mut pump = Pump::new(server, Box::new(Failing), Arc::default());
        client.send(b"x").expect("send");
        assert_eq!(
            pump.run(FIRED_DATA),
            Step::End("service refused input: no".into())
        );
    }
}
