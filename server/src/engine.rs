//! The broker's event loop: a fixed pool of worker threads, each with one
//! epoll set, serving any number of sessions.
//!
//! Each session registers three fds under its id: the client→server ring's
//! data eventfd, the server→client ring's space eventfd and the hang-up
//! socket. A wake-up "pumps" the session: drain both eventfds, check the
//! hang-up socket, flush queued output, read input and hand it to the
//! service, until the rings leave nothing to do or the session's time slice
//! is used (then it is re-queued, so one busy session cannot starve others).
//! A failing or panicking session is closed alone; its worker carries on.

use crate::service::{Outbox, SessionHandler, SessionWaker};
use shmlink_endpoint::frame::OutFrame;
use shmlink_endpoint::sys;

fn cvt(ret: i32) -> std::io::Result<i32> {
    if ret == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
use shmlink_endpoint::{Endpoint, Item, Wakeup};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Messages or bytes one session may move per wake-up before yielding.
const SLICE_MESSAGES: u32 = 512;
const SLICE_BYTES: u64 = 8 << 20;
/// epoll token of a worker's own wake-up eventfd.
const WAKE_TOKEN: u64 = u64::MAX;
/// A session's epoll token is `id << 2 | which fd`, so that a wake-up
/// touches only the fd that fired: these bits, also used as a set.
const FIRED_DATA: u8 = 1;
const FIRED_ROOM: u8 = 2;
const FIRED_HANGUP: u8 = 4;

fn token(id: u64, fd_index: usize) -> u64 {
    (id << 2) | fd_index as u64
}

/// Byte and message counters of one session, readable from any thread.
#[derive(Debug, Default)]
pub struct Counters {
    /// Payload bytes received from the client.
    pub bytes_to_server: AtomicU64,
    /// Messages received from the client.
    pub messages_to_server: AtomicU64,
    /// Payload bytes queued for the client.
    pub bytes_to_client: AtomicU64,
    /// Messages queued for the client.
    pub messages_to_client: AtomicU64,
}

/// A session the engine serves.
struct Live {
    endpoint: Endpoint,
    handler: Box<dyn SessionHandler>,
    outbox: Outbox,
    pending: Option<OutFrame<Vec<u8>>>,
    end_frame: Option<OutFrame<&'static [u8]>>,
    end_sent: bool,
}

/// One session's slot: shared between its worker and the D-Bus thread.
pub struct Slot {
    id: u64,
    worker: usize,
    live: Mutex<Option<Live>>,
    /// The session's counters.
    pub counters: Counters,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Option<Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The service's state for the `ServiceState` property, if the session is still live.
    pub fn service_state(&self) -> Option<dbus::arg::PropMap> {
        self.lock().as_ref().map(|l| l.handler.state())
    }
}

/// A session the engine closed by itself, for the D-Bus thread to announce.
#[derive(Debug)]
pub struct Closed {
    /// Session id.
    pub id: u64,
    /// Why.
    pub reason: String,
}

struct Worker {
    epoll: OwnedFd,
    wake: OwnedFd,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    /// Sessions to pump on the next wake-up even if none of their fds fired
    /// (new sessions, and sessions woken by a [`SessionWaker`]).
    kicks: Mutex<Vec<u64>>,
}

impl Worker {
    fn kick(&self, id: u64) {
        self.kicks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id);
        let _ = sys::eventfd_signal(self.wake.as_fd());
    }
}

/// The pool of workers.
pub struct Engine {
    workers: Vec<Arc<Worker>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next: AtomicUsize,
    stop: Arc<AtomicBool>,
    closed_tx: Mutex<mpsc::Sender<Closed>>,
    notify: OwnedFd,
}

fn epoll_add(epoll: BorrowedFd<'_>, fd: BorrowedFd<'_>, token: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: `ev` is a valid epoll_event; both fds are live.
    cvt(unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd.as_raw_fd(),
            &mut ev,
        )
    })?;
    Ok(())
}

fn epoll_del(epoll: BorrowedFd<'_>, fd: BorrowedFd<'_>) {
    // SAFETY: a null event pointer is allowed for EPOLL_CTL_DEL; both fds are live.
    let r = cvt(unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_DEL,
            fd.as_raw_fd(),
            std::ptr::null_mut(),
        )
    });
    if let Err(e) = r {
        log::warn!("epoll_ctl(DEL) failed: {e}");
    }
}

fn new_eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: eventfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Engine {
    /// Starts `workers` threads. Sessions the engine closes by itself are
    /// sent on `closed`, and `notify` (an eventfd the caller polls) is signalled.
    pub fn start(workers: usize, closed: mpsc::Sender<Closed>) -> std::io::Result<Arc<Engine>> {
        let notify = new_eventfd()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut ws = Vec::new();
        for _ in 0..workers.max(1) {
            // SAFETY: epoll_create1 takes no pointers.
            let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
            // SAFETY: epoll_create1 returned a new fd that nothing else owns.
            let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
            let wake = new_eventfd()?;
            epoll_add(epoll.as_fd(), wake.as_fd(), WAKE_TOKEN)?;
            ws.push(Arc::new(Worker {
                epoll,
                wake,
                slots: Mutex::new(HashMap::new()),
                kicks: Mutex::new(Vec::new()),
            }));
        }
        let engine = Arc::new(Engine {
            workers: ws,
            threads: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            stop,
            closed_tx: Mutex::new(closed),
            notify,
        });
        let mut threads = Vec::new();
        for (i, w) in engine.workers.iter().enumerate() {
            let w = w.clone();
            let e = Arc::downgrade(&engine);
            let stop = engine.stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("shmlink-worker-{i}"))
                    .spawn(move || run_worker(w, e, stop))?,
            );
        }
        *engine.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
        Ok(engine)
    }

    /// The eventfd that becomes readable when closed sessions are waiting on the channel.
    pub fn notify_fd(&self) -> BorrowedFd<'_> {
        self.notify.as_fd()
    }

    /// Resets the notification eventfd.
    pub fn drain_notify(&self) {
        let _ = sys::eventfd_drain(self.notify.as_fd());
    }

    /// Starts serving a session; returns its slot.
    pub fn add(
        &self,
        id: u64,
        endpoint: Endpoint,
        handler: Box<dyn SessionHandler>,
    ) -> std::io::Result<Arc<Slot>> {
        let worker = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let w = &self.workers[worker];
        let max_message = u64::from(endpoint.max_message());
        // Register the endpoint's own fds (not duplicates): epoll keys its
        // entries by fd number and file, and `close` removes them by the same fds.
        let raw: [std::os::fd::RawFd; 3] = [
            endpoint.readable_fd().as_raw_fd(),
            endpoint.writable_fd().as_raw_fd(),
            endpoint.hangup_fd().as_raw_fd(),
        ];
        let slot = Arc::new(Slot {
            id,
            worker,
            live: Mutex::new(Some(Live {
                endpoint,
                handler,
                outbox: Outbox::new(max_message),
                pending: None,
                end_frame: None,
                end_sent: false,
            })),
            counters: Counters::default(),
        });
        w.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, slot.clone());
        for (n, &fd) in raw.iter().enumerate() {
            // SAFETY: the fds belong to the endpoint now owned by `slot`, which we hold.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            if let Err(e) = epoll_add(w.epoll.as_fd(), borrowed, token(id, n)) {
                for &done in &raw[..n] {
                    // SAFETY: as above; the endpoint is still alive in `slot`.
                    epoll_del(w.epoll.as_fd(), unsafe { BorrowedFd::borrow_raw(done) });
                }
                w.slots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                return Err(e);
            }
        }
        let waker_worker = Arc::downgrade(w);
        let waker = SessionWaker::new(move || {
            if let Some(w) = waker_worker.upgrade() {
                w.kick(id);
            }
        });
        slot.lock()
            .as_mut()
            .expect("just created")
            .handler
            .attach(waker);
        // Sessions like `source` have work before the client sends anything.
        w.kick(id);
        Ok(slot)
    }

    /// Stops serving a session and frees its rings; the client sees its
    /// hang-up socket close. Returns false if it was already gone.
    pub fn close(&self, id: u64, worker: usize) -> bool {
        let w = &self.workers[worker];
        let Some(slot) = w
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
        else {
            return false;
        };
        let live = slot.lock().take();
        if let Some(live) = live {
            for fd in [
                live.endpoint.readable_fd(),
                live.endpoint.writable_fd(),
                live.endpoint.hangup_fd(),
            ] {
                epoll_del(w.epoll.as_fd(), fd);
            }
        }
        true
    }

    /// Closes the session in `slot` (see [`Engine::close`]).
    pub fn close_slot(&self, slot: &Slot) -> bool {
        self.close(slot.id, slot.worker)
    }

    fn closed_by_engine(&self, id: u64, worker: usize, reason: String) {
        if self.close(id, worker) {
            let _ = self
                .closed_tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(Closed { id, reason });
            let _ = sys::eventfd_signal(self.notify.as_fd());
        }
    }

    /// Stops the workers and closes every session.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in &self.workers {
            let _ = sys::eventfd_signal(w.wake.as_fd());
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        for (i, w) in self.workers.iter().enumerate() {
            let ids: Vec<u64> = w
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .copied()
                .collect();
            for id in ids {
                self.close(id, i);
            }
        }
    }

    /// Number of worker threads.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }
}

/// What one pump of a session ended with.
enum Pump {
    /// Nothing to do until an fd wakes us.
    Idle,
    /// Time slice used up with work left: run again soon.
    More,
    /// The session must end, for this reason.
    End(String),
}

fn run_worker(w: Arc<Worker>, engine: std::sync::Weak<Engine>, stop: Arc<AtomicBool>) {
    // A client can make our wake-up write block (it shares the eventfd's
    // O_NONBLOCK flag and counter); have such a write interrupted.
    if let Err(e) = sys::write_guard::protect_this_thread() {
        log::warn!("cannot guard worker against blocking eventfd writes: {e}");
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut runq: VecDeque<u64> = VecDeque::new();
    // The ids in `runq` (so that a session is queued at most once), with
    // the set of its fds that fired since it was queued.
    let mut queued: HashMap<u64, u8> = HashMap::new();
    loop {
        let timeout = if runq.is_empty() { -1 } else { 0 };
        // SAFETY: `events` is a valid buffer of `events.len()` epoll_event structs.
        let n = unsafe {
            libc::epoll_wait(
                w.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                log::error!("epoll_wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == WAKE_TOKEN {
                let _ = sys::eventfd_drain(w.wake.as_fd());
                let kicked =
                    std::mem::take(&mut *w.kicks.lock().unwrap_or_else(|e| e.into_inner()));
                for id in kicked {
                    if queued.insert(id, 0).is_none() {
                        runq.push_back(id);
                    }
                }
            } else {
                let (id, fired) = (
                    token >> 2,
                    [FIRED_DATA, FIRED_ROOM, FIRED_HANGUP][(token & 3).min(2) as usize],
                );
                match queued.entry(id) {
                    std::collections::hash_map::Entry::Occupied(mut e) => *e.get_mut() |= fired,
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(fired);
                        runq.push_back(id);
                    }
                }
            }
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(engine) = engine.upgrade() else {
            return;
        };
        for _ in 0..runq.len() {
            let Some(id) = runq.pop_front() else { break };
            let fired = queued.remove(&id).unwrap_or(0);
            let slot = w
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned();
            let Some(slot) = slot else { continue };
            let outcome = {
                let mut guard = slot.lock();
                match guard.as_mut() {
                    None => Pump::Idle,
                    Some(live) => {
                        match catch_unwind(AssertUnwindSafe(|| pump(live, &slot.counters, fired))) {
                            Ok(p) => p,
                            Err(_) => {
                                Pump::End("internal error: the session's service panicked".into())
                            }
                        }
                    }
                }
            };
            match outcome {
                Pump::Idle => {}
                Pump::More => {
                    if queued.insert(id, 0).is_none() {
                        runq.push_back(id);
                    }
                }
                Pump::End(reason) => {
                    log::info!("session {id} closed: {reason}");
                    engine.closed_by_engine(id, slot.worker, reason);
                }
            }
        }
    }
}

/// Moves as much data as the rings allow for one session; `fired` says
/// which of its fds woke us (none for a kick or a re-queued time slice).
fn pump(live: &mut Live, counters: &Counters, fired: u8) -> Pump {
    match pump_inner(live, counters, fired) {
        Ok(p) => p,
        Err(reason) => Pump::End(reason),
    }
}

fn pump_inner(live: &mut Live, counters: &Counters, fired: u8) -> Result<Pump, String> {
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
        sys::eventfd_drain(live.endpoint.readable_fd()).map_err(|e| ep_err(e.into()))?;
    }
    if fired & FIRED_ROOM != 0 {
        sys::eventfd_drain(live.endpoint.writable_fd()).map_err(|e| ep_err(e.into()))?;
    }
    if fired & FIRED_HANGUP != 0 && live.endpoint.peer_gone().map_err(ep_err)? {
        return Err("client hung up".into());
    }
    let spin = match live.endpoint.wakeup() {
        Wakeup::Spin(d) => d,
        Wakeup::Park => Duration::ZERO,
    };
    let (mut msgs, mut bytes) = (0u32, 0u64);
    loop {
        // 1. Flush what the service queued.
        if let Some(frame) = live.pending.as_mut() {
            if !live
                .endpoint
                .ring_sender()
                .write_frame(frame)
                .map_err(ep_err)?
            {
                if spin.is_zero() || !spin_for(&mut live.endpoint, spin, true) {
                    return Ok(Pump::Idle);
                }
                continue;
            }
            live.pending = None;
        }
        if let Some(msg) = live.outbox.pop() {
            counters
                .bytes_to_client
                .fetch_add(msg.len() as u64, Ordering::Relaxed);
            counters.messages_to_client.fetch_add(1, Ordering::Relaxed);
            bytes += msg.len() as u64;
            live.pending = Some(OutFrame::message(msg));
            continue;
        }
        if live.outbox.finished() {
            if !live.end_sent {
                let end = live.end_frame.get_or_insert_with(OutFrame::end);
                if !live
                    .endpoint
                    .ring_sender()
                    .write_frame(end)
                    .map_err(ep_err)?
                {
                    return Ok(Pump::Idle);
                }
                live.end_sent = true;
            }
        } else if live.handler.wants_to_produce() {
            live.handler
                .produce(&mut live.outbox)
                .map_err(|e| format!("service failed: {e}"))?;
            msgs += 1;
            if msgs >= SLICE_MESSAGES || bytes >= SLICE_BYTES {
                return Ok(Pump::More);
            }
            continue;
        }
        // 2. Read input.
        match live.endpoint.ring_receiver().read_item().map_err(ep_err)? {
            Some(Item::Message(m)) => {
                counters
                    .bytes_to_server
                    .fetch_add(m.len() as u64, Ordering::Relaxed);
                counters.messages_to_server.fetch_add(1, Ordering::Relaxed);
                bytes += m.len() as u64;
                msgs += 1;
                live.handler
                    .on_message(m, &mut live.outbox)
                    .map_err(|e| format!("service refused input: {e}"))?;
            }
            Some(Item::End) => {
                live.handler
                    .on_end(&mut live.outbox)
                    .map_err(|e| format!("service failed: {e}"))?;
            }
            None => {
                if spin.is_zero() || !spin_for(&mut live.endpoint, spin, false) {
                    return Ok(Pump::Idle);
                }
            }
        }
        if msgs >= SLICE_MESSAGES || bytes >= SLICE_BYTES {
            return Ok(Pump::More);
        }
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
