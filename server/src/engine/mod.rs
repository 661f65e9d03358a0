//! The broker's event loop: a fixed pool of worker threads, each with one
//! epoll set, serving any number of sessions.
//!
//! A worker owns its sessions' [`Pump`]s outright. The D-Bus thread never
//! touches them: it queues [`Command`]s (add, remove) and signals the
//! worker's wake eventfd, and never waits for a worker. A worker that ends a
//! session by itself (the client hung up or misbehaved, the service failed
//! or panicked) drops it and reports an [`Ended`] on a channel whose notify
//! eventfd the main loop polls.
//!
//! Each session registers three fds under its id (see [`Pump::fds`]), four
//! for a session a provider serves (the fourth is its link to the broker). A
//! wake-up queues the session on its worker's run queue; one run is bounded
//! by a time slice (then it is re-queued, so one busy session cannot starve
//! others). A failing or panicking session ends alone; its worker carries on.

mod pump;

pub(crate) use pump::Traffic;
use pump::{Pump, Slice, Step, FIRED_DATA, FIRED_HANGUP, FIRED_LINK, FIRED_ROOM};

use crate::lock;
use crate::service::{Memory, SessionHandler, SessionWaker};
use shmlink_endpoint::sys::{self, Events, Interest, Selector, Token};
use shmlink_endpoint::Endpoint;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Token of a worker's own wake-up eventfd.
const WAKE_TOKEN: Token = Token(u64::MAX);
/// Events fetched per `epoll_wait`.
const EVENT_BATCH: usize = 256;

/// A session's token is `id << 2 | which fd` (the index in
/// [`Pump::fds`]), so that a wake-up touches only the fd that fired.
fn token(id: u64, fd_index: usize) -> Token {
    Token((id << 2) | fd_index as u64)
}

/// A session the engine ended by itself, for the main loop to finish off.
#[derive(Debug)]
pub(crate) struct Ended {
    /// Session id.
    pub id: u64,
    /// Why.
    pub reason: String,
}

/// What the D-Bus thread (or a [`SessionWaker`]) asks of a worker.
enum Command {
    /// Start serving a session (its fds are already in the worker's epoll set).
    Add(u64, Box<Pump>),
    /// Stop serving a session and drop its rings and hang-up socket.
    Remove(u64),
    /// Run a session even though none of its fds fired.
    Kick(u64),
}

/// A worker's inbox: its command queue and the eventfd that wakes it.
struct Mailbox {
    selector: Selector,
    wake: OwnedFd,
    commands: Mutex<Vec<Command>>,
    /// `Remove` commands posted, for the tests.
    #[cfg(test)]
    removes_posted: std::sync::atomic::AtomicUsize,
}

impl Mailbox {
    fn post(&self, c: Command) {
        #[cfg(test)]
        if matches!(c, Command::Remove(_)) {
            self.removes_posted.fetch_add(1, Ordering::SeqCst);
        }
        self.queue(c);
        self.wake();
    }

    /// Queues `c` for the worker's next wake-up.
    fn queue(&self, c: Command) {
        lock(&self.commands).push(c);
    }

    fn wake(&self) {
        let _ = sys::eventfd_signal(self.wake.as_fd());
    }
}

/// The worker a session is served on, for [`Engine::remove`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WorkerId(usize);

/// The pool of workers, driven from the D-Bus thread.
pub(crate) struct Engine {
    mailboxes: Vec<Arc<Mailbox>>,
    threads: Vec<JoinHandle<()>>,
    next: usize,
    /// Mailboxes given sessions by [`Engine::add_held`] since the last
    /// [`Engine::wake_held`].
    held: Vec<usize>,
    stop: Arc<AtomicBool>,
    ended: mpsc::Receiver<Ended>,
    notify: Arc<OwnedFd>,
}

impl Engine {
    /// Starts `workers` threads (at least one).
    pub fn start(workers: usize) -> std::io::Result<Engine> {
        let notify = Arc::new(sys::new_eventfd()?);
        let stop = Arc::new(AtomicBool::new(false));
        let (ended_tx, ended) = mpsc::channel();
        let mut engine = Engine {
            mailboxes: Vec::new(),
            threads: Vec::new(),
            next: 0,
            held: Vec::new(),
            stop,
            ended,
            notify,
        };
        for i in 0..workers.max(1) {
            let selector = Selector::new()?;
            let wake = sys::new_eventfd()?;
            selector.add(&wake, WAKE_TOKEN, Interest::READABLE)?;
            let mailbox = Arc::new(Mailbox {
                selector,
                wake,
                commands: Mutex::new(Vec::new()),
                #[cfg(test)]
                removes_posted: Default::default(),
            });
            let worker = Worker {
                mailbox: mailbox.clone(),
                stop: engine.stop.clone(),
                ended: ended_tx.clone(),
                notify: engine.notify.clone(),
                sessions: HashMap::new(),
                runq: VecDeque::new(),
                queued: HashMap::new(),
            };
            engine.mailboxes.push(mailbox);
            // On error, dropping `engine` stops the threads started so far.
            engine.threads.push(
                std::thread::Builder::new()
                    .name(format!("shmlink-worker-{i}"))
                    .spawn(move || worker.run())?,
            );
        }
        Ok(engine)
    }

    /// Number of worker threads.
    pub fn worker_count(&self) -> usize {
        self.mailboxes.len()
    }

    /// The eventfd that becomes readable when [`Engine::take_ended`] has news.
    pub fn notify_fd(&self) -> Arc<OwnedFd> {
        self.notify.clone()
    }

    /// The sessions workers ended since the last call (each worker dropped
    /// its session already: it needs no [`Engine::remove`]); resets the
    /// notify fd.
    pub fn take_ended(&mut self) -> Vec<Ended> {
        let _ = sys::eventfd_drain(self.notify.as_fd());
        self.ended.try_iter().collect()
    }

    /// Starts serving session `id`, which a provider serves: watches its
    /// fds and `link` on the next worker in turn, hands it the handler
    /// (attached to a waker) and wakes that worker, which runs it once. The
    /// worker ends the session when the broker closes the other end of
    /// `link`; ending the session (however it ends) drops `link`, which the
    /// broker sees.
    pub fn add_linked(
        &mut self,
        id: u64,
        endpoint: Endpoint,
        handler: Box<dyn SessionHandler>,
        traffic: Arc<Traffic>,
        memory: Memory,
        link: OwnedFd,
    ) -> std::io::Result<WorkerId> {
        let index = self.place(id, endpoint, handler, traffic, memory, Some(link))?;
        self.mailboxes[index].wake();
        Ok(WorkerId(index))
    }

    /// Starts serving session `id` like [`Engine::add_linked`] (without a
    /// link), but the worker is woken only by the next [`Engine::wake_held`]. The D-Bus side uses it to send the
    /// `OpenSession` reply first: waking a worker costs the D-Bus thread a
    /// system call and, when the worker is woken on the same CPU, its time
    /// slice, and the client waits for neither.
    pub fn add_held(
        &mut self,
        id: u64,
        endpoint: Endpoint,
        handler: Box<dyn SessionHandler>,
        traffic: Arc<Traffic>,
        memory: Memory,
    ) -> std::io::Result<WorkerId> {
        let index = self.place(id, endpoint, handler, traffic, memory, None)?;
        if !self.held.contains(&index) {
            self.held.push(index);
        }
        Ok(WorkerId(index))
    }

    /// Wakes the workers given sessions by [`Engine::add_held`] since the
    /// last call, so that they start serving them.
    pub fn wake_held(&mut self) {
        for index in self.held.drain(..) {
            self.mailboxes[index].wake();
        }
    }

    /// Queues session `id` (with a first run: sessions like `source` have
    /// work before the client sends anything) on the next worker in turn,
    /// without waking it; returns that worker's index.
    fn place(
        &mut self,
        id: u64,
        endpoint: Endpoint,
        mut handler: Box<dyn SessionHandler>,
        traffic: Arc<Traffic>,
        memory: Memory,
        link: Option<OwnedFd>,
    ) -> std::io::Result<usize> {
        let index = self.next % self.mailboxes.len();
        let mailbox = &self.mailboxes[index];
        let weak = Arc::downgrade(mailbox);
        handler.attach(SessionWaker::new(move || {
            if let Some(m) = weak.upgrade() {
                m.post(Command::Kick(id));
            }
        }));
        let mut pump = Pump::new(endpoint, handler, traffic.clone()).with_memory(memory);
        if let Some(link) = link {
            pump = pump.with_link(link);
        }
        let pump = Box::new(pump);
        // Watch the pump's own fds (not duplicates): epoll keys its entries
        // by fd and file, and the worker removes them by the same fds.
        let fds = pump.fds();
        for (n, fd) in fds.iter().enumerate() {
            if let Err(e) = mailbox.selector.add(fd, token(id, n), Interest::READABLE) {
                unwatch(&mailbox.selector, &fds[..n]);
                return Err(e);
            }
        }
        self.next += 1;
        mailbox.queue(Command::Add(id, pump));
        Ok(index)
    }

    /// Stops serving session `id` on `worker` (where [`Engine::add_held`]
    /// or [`Engine::add_linked`] put it); the worker drops the rings and the
    /// hang-up socket at its next wake-up, which this triggers. Not for a
    /// session the worker ended by itself ([`Engine::take_ended`]).
    pub fn remove(&mut self, id: u64, worker: WorkerId) {
        self.mailboxes[worker.0].post(Command::Remove(id));
    }

    /// `Remove` commands posted to each worker so far.
    #[cfg(test)]
    pub fn removes_posted(&self) -> usize {
        self.mailboxes
            .iter()
            .map(|m| m.removes_posted.load(Ordering::SeqCst))
            .sum()
    }

    /// Stops the workers; each drops every session it still serves.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for m in &self.mailboxes {
            m.wake();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn unwatch(selector: &Selector, fds: &[BorrowedFd<'_>]) {
    for fd in fds {
        if let Err(e) = selector.delete(fd) {
            log::warn!("epoll_ctl(DEL) failed: {e}");
        }
    }
}

/// One worker thread's state: the sessions it owns and its run queue.
struct Worker {
    mailbox: Arc<Mailbox>,
    stop: Arc<AtomicBool>,
    ended: mpsc::Sender<Ended>,
    notify: Arc<OwnedFd>,
    sessions: HashMap<u64, Box<Pump>>,
    runq: VecDeque<u64>,
    /// The ids in `runq` (so that a session is queued at most once), with
    /// the set of its fds that fired since it was queued.
    queued: HashMap<u64, u8>,
}

impl Worker {
    fn run(mut self) {
        // A client can make our wake-up write block (it shares the eventfd's
        // O_NONBLOCK flag and counter); have such a write interrupted.
        if let Err(e) = sys::write_guard::protect_this_thread() {
            log::warn!("cannot guard worker against blocking eventfd writes: {e}");
        }
        let mut events = Events::with_capacity(EVENT_BATCH);
        loop {
            // Sessions queued: only look, do not wait.
            let deadline = if self.runq.is_empty() {
                None
            } else {
                Some(Instant::now())
            };
            if let Err(e) = self.mailbox.selector.wait(&mut events, deadline) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("epoll_wait failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                continue;
            }
            for ev in events.iter() {
                if ev.token == WAKE_TOKEN {
                    let _ = sys::eventfd_drain(self.mailbox.wake.as_fd());
                } else {
                    let Token(token) = ev.token;
                    let fired =
                        [FIRED_DATA, FIRED_ROOM, FIRED_HANGUP, FIRED_LINK][(token & 3) as usize];
                    self.enqueue(token >> 2, fired);
                }
            }
            // Commands after events: a session whose fds fired before its
            // `Add` arrived is still run (every `Add` runs the session once).
            let commands = std::mem::take(&mut *lock(&self.mailbox.commands));
            for c in commands {
                match c {
                    Command::Add(id, pump) => {
                        self.sessions.insert(id, pump);
                        self.enqueue(id, 0);
                    }
                    Command::Remove(id) => self.drop_session(id),
                    Command::Kick(id) => self.enqueue(id, 0),
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                let ids: Vec<u64> = self.sessions.keys().copied().collect();
                for id in ids {
                    self.drop_session(id);
                }
                return;
            }
            self.run_queue();
        }
    }

    fn enqueue(&mut self, id: u64, fired: u8) {
        match self.queued.entry(id) {
            std::collections::hash_map::Entry::Occupied(mut e) => *e.get_mut() |= fired,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(fired);
                self.runq.push_back(id);
            }
        }
    }

    /// Runs each queued session once, each for one slice at most; stops
    /// early when the engine is stopping.
    fn run_queue(&mut self) {
        for _ in 0..self.runq.len() {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let Some(id) = self.runq.pop_front() else {
                break;
            };
            // Others queued behind it: a spinning session yields instead of spinning.
            let slice = Slice::starting_now(!self.runq.is_empty());
            let fired = self.queued.remove(&id).unwrap_or(0);
            let Some(pump) = self.sessions.get_mut(&id) else {
                continue;
            };
            let step =
                catch_unwind(AssertUnwindSafe(|| pump.run(fired, slice))).unwrap_or_else(|_| {
                    Step::End("internal error: the session's service panicked".into())
                });
            match step {
                Step::Idle => {}
                Step::More => self.enqueue(id, 0),
                Step::End(reason) => {
                    self.drop_session(id);
                    let _ = self.ended.send(Ended { id, reason });
                    let _ = sys::eventfd_signal(self.notify.as_fd());
                }
            }
        }
    }

    /// Stops watching a session's fds and drops it (closing its rings and
    /// hang-up socket, which the client sees).
    fn drop_session(&mut self, id: u64) {
        if let Some(pump) = self.sessions.remove(&id) {
            unwatch(&self.mailbox.selector, &pump.fds());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::tests::{caller, options};
    use crate::builtin::Echo;
    use crate::service::Service;
    use shmlink_endpoint::Wakeup;
    use std::time::{Duration, Instant};

    #[test]
    fn a_removed_session_hangs_up_promptly_and_others_keep_running() {
        let mut engine = Engine::start(1).expect("start");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut clients = Vec::new();
        let mut workers = Vec::new();
        for id in 1..=2 {
            let (server, fds) = Endpoint::create_server(4096, 1024, Wakeup::Park).expect("rings");
            let handler = Echo.open(&caller(), &options(&[])).expect("open");
            let worker = engine
                .add_held(id, server, handler, Arc::default(), Memory::unlimited())
                .expect("add");
            workers.push(worker);
            engine.wake_held();
            let mut client = Endpoint::open_client(fds, 1024, Wakeup::Park).expect("client");
            client.set_timeout(Some(Duration::from_secs(10)));
            clients.push(client);
        }
        engine.remove(1, workers[0]);
        let ready = sys::poll_readable(&[clients[0].hangup_fd()], Some(deadline)).expect("poll");
        assert!(
            ready[0].hangup || ready[0].readable,
            "the removed session's socket closed"
        );
        assert!(clients[0].peer_gone().expect("peer_gone"));
        clients[1].send(b"still served").expect("send");
        assert_eq!(
            clients[1].recv().expect("recv").as_deref(),
            Some(&b"still served"[..])
        );
        engine.remove(1, workers[0]);
        assert_eq!(engine.removes_posted(), 2);
        assert!(
            engine.take_ended().is_empty(),
            "a removal is not reported back"
        );
        engine.shutdown();
        let ready = sys::poll_readable(&[clients[1].hangup_fd()], Some(deadline)).expect("poll");
        assert!(
            ready[0].hangup || ready[0].readable,
            "shutdown drops every session"
        );
    }

    /// The sessions the engine's workers ended, once there are some or
    /// `deadline` passed.
    fn wait_for_ended(engine: &mut Engine, deadline: Instant) -> Vec<Ended> {
        loop {
            let ended = engine.take_ended();
            if !ended.is_empty() || Instant::now() > deadline {
                return ended;
            }
            let notify = engine.notify_fd();
            let _ = sys::poll_readable(&[notify.as_fd()], Some(deadline));
        }
    }

    #[test]
    fn a_linked_session_ends_with_its_link_and_drops_it_when_it_ends() {
        let mut engine = Engine::start(1).expect("start");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut links = Vec::new();
        let mut clients = Vec::new();
        let mut workers = Vec::new();
        for id in 1..=2 {
            let (server, fds) = Endpoint::create_server(4096, 1024, Wakeup::Park).expect("rings");
            let handler = Echo.open(&caller(), &options(&[])).expect("open");
            let (broker_end, link) = sys::socketpair().expect("link");
            let worker = engine
                .add_linked(
                    id,
                    server,
                    handler,
                    Arc::default(),
                    Memory::unlimited(),
                    link,
                )
                .expect("add");
            workers.push(worker);
            clients.push(Endpoint::open_client(fds, 1024, Wakeup::Park).expect("client"));
            links.push(broker_end);
        }
        // The broker ends session 1: the worker reports it and the client sees the hang-up.
        drop(links.remove(0));
        let ended = wait_for_ended(&mut engine, deadline);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].id, 1);
        assert_eq!(ended[0].reason, "the broker ended the session");
        let ready = sys::poll_readable(&[clients[0].hangup_fd()], Some(deadline)).expect("poll");
        assert!(
            ready[0].hangup || ready[0].readable,
            "the client sees the end"
        );
        // Session 2 ends on the provider's side: the broker sees its link close.
        engine.remove(2, workers[1]);
        let ready = sys::poll_readable(&[links[0].as_fd()], Some(deadline)).expect("poll");
        assert!(
            ready[0].hangup || ready[0].readable,
            "the broker sees the end"
        );
        assert_eq!(
            sys::hangup_state(links[0].as_fd()).expect("peek"),
            sys::HangupState::Closed
        );
    }
}
