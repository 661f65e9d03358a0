//! A provider process's D-Bus side, written raw with the plain dbus crate,
//! to test the broker against honest and hostile providers: it registers
//! names, and answers `AcceptSession` as told ([`Behaviour`]): refuse,
//! never answer, answer wrongly, accept and hold the fds, accept and close
//! them at once, or accept and act like a real provider on the hang-up.
//!
//! It runs on its own thread with its own connection; [`RawProvider::leave`]
//! (or drop) closes that connection, which the broker sees as the provider
//! leaving the bus.

use dbus::arg::{OwnedFd, PropMap};
use dbus::channel::Channel;
use dbus::message::MessageType;
use dbus::Message;
use shmlink_endpoint::sys::{self, HangupState};
use shmlink_endpoint::{PeerFds, RingFds};
use shmlink_interfaces::{member, BROKER_INTERFACE, BROKER_PATH, BUS_NAME, PROVIDER_INTERFACE};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where the raw provider exports `org.shmlink.Provider1`.
pub const PROVIDER_OBJECT: &str = "/com/example/Provider";

/// How the raw provider answers `AcceptSession`.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Accept and hold every fd until the test takes them.
    Accept,
    /// Accept, then close every fd at once.
    AcceptThenClose,
    /// Accept and behave as a provider must: when the client's hang-up
    /// socket closes, close everything.
    AcceptAndFollowHangup,
    /// Answer with this error name and message.
    Refuse(String, String),
    /// Never answer (the call is kept, unanswered).
    Silent,
    /// Answer with a method return that carries a body.
    ReplyWithBody,
}

/// One session the provider accepted, with what the broker handed over.
pub struct Accepted {
    /// The session's path at the broker.
    pub session: String,
    /// The service name.
    pub service: String,
    /// The `caller` dictionary.
    pub caller: PropMap,
    /// The forwarded options.
    pub options: PropMap,
    /// The provider's side: rings and the client's hang-up peer.
    pub fds: PeerFds,
    /// The provider's end of the link.
    pub link: OwnedFd,
}

#[derive(Default)]
struct State {
    calls: usize,
    accepted: Vec<Accepted>,
    unanswered: Vec<Message>,
}

type Job = Box<dyn FnOnce(&Channel) + Send>;

/// A raw provider on its own connection and thread.
pub struct RawProvider {
    name: String,
    behaviour: Arc<Mutex<Behaviour>>,
    state: Arc<Mutex<State>>,
    jobs: mpsc::Sender<Job>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RawProvider {
    /// Connects to the bus at `address` and serves with `behaviour`.
    pub fn start(address: &str, behaviour: Behaviour) -> RawProvider {
        let mut channel = Channel::open_private(address).expect("provider connects");
        channel.register().expect("provider says Hello");
        let name = channel.unique_name().expect("unique name").to_owned();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let state = Arc::new(Mutex::new(State::default()));
        let (jobs, inbox) = mpsc::channel::<Job>();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (behaviour, state, stop) = (behaviour.clone(), state.clone(), stop.clone());
            std::thread::spawn(move || serve(channel, &behaviour, &state, &inbox, &stop))
        };
        RawProvider {
            name,
            behaviour,
            state,
            jobs,
            stop,
            thread: Some(thread),
        }
    }

    /// The provider's unique bus name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Changes how later calls are answered.
    pub fn set_behaviour(&self, b: Behaviour) {
        *lock(&self.behaviour) = b;
    }

    /// Calls the broker's method `name` from the provider's connection,
    /// its arguments appended by `build`; returns the error's name and
    /// message if it failed.
    pub fn call_broker(
        &self,
        name: &'static str,
        build: impl FnOnce(Message) -> Message + Send + 'static,
    ) -> Result<(), (String, String)> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |ch: &Channel| {
            let call = build(
                Message::new_method_call(BUS_NAME, BROKER_PATH, BROKER_INTERFACE, name)
                    .expect("call"),
            );
            let r = ch
                .send_with_reply_and_block(call, Duration::from_secs(10))
                .map(|_| ())
                .map_err(|e| {
                    (
                        e.name().unwrap_or("").to_owned(),
                        e.message().unwrap_or("").to_owned(),
                    )
                });
            let _ = tx.send(r);
        });
        self.jobs.send(job).expect("provider thread alive");
        rx.recv().expect("provider thread answers")
    }

    /// `RegisterService(service, PROVIDER_OBJECT, {})`.
    pub fn register(&self, service: &str) -> Result<(), (String, String)> {
        let service = service.to_owned();
        self.call_broker(member::REGISTER_SERVICE, move |m| {
            m.append3(service, dbus::Path::from(PROVIDER_OBJECT), PropMap::new())
        })
    }

    /// `UnregisterService(service)`.
    pub fn unregister(&self, service: &str) -> Result<(), (String, String)> {
        let service = service.to_owned();
        self.call_broker(member::UNREGISTER_SERVICE, move |m| m.append1(service))
    }

    /// `AcceptSession` calls received so far.
    pub fn calls(&self) -> usize {
        lock(&self.state).calls
    }

    /// Takes the sessions accepted and held so far.
    pub fn take_accepted(&self) -> Vec<Accepted> {
        std::mem::take(&mut lock(&self.state).accepted)
    }

    /// Number of accepted sessions held now.
    pub fn held(&self) -> usize {
        lock(&self.state).accepted.len()
    }

    /// Closes the provider's connection: it leaves the bus.
    pub fn leave(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RawProvider {
    fn drop(&mut self) {
        self.leave();
    }
}

type AcceptArgs = (
    dbus::Path<'static>,
    String,
    PropMap,
    PropMap,
    (u64, OwnedFd, OwnedFd, OwnedFd),
    (u64, OwnedFd, OwnedFd, OwnedFd),
    OwnedFd,
    OwnedFd,
    PropMap,
);

fn ring((capacity, memfd, empty_signal, full_signal): (u64, OwnedFd, OwnedFd, OwnedFd)) -> RingFds {
    RingFds {
        capacity,
        memfd,
        empty_signal,
        full_signal,
    }
}

fn serve(
    channel: Channel,
    behaviour: &Mutex<Behaviour>,
    state: &Mutex<State>,
    jobs: &mpsc::Receiver<Job>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        while let Ok(job) = jobs.try_recv() {
            job(&channel);
        }
        if channel.read_write(Some(Duration::from_millis(5))).is_err() {
            return;
        }
        while let Some(msg) = channel.pop_message() {
            if msg.msg_type() != MessageType::MethodCall
                || msg.interface().as_deref() != Some(PROVIDER_INTERFACE)
                || msg.member().as_deref() != Some(member::ACCEPT_SESSION)
            {
                continue;
            }
            lock(state).calls += 1;
            let b = lock(behaviour).clone();
            answer(&channel, msg, &b, state);
        }
        // A real provider ends a session whose client hung up.
        if matches!(*lock(behaviour), Behaviour::AcceptAndFollowHangup) {
            lock(state).accepted.retain(|a| {
                matches!(
                    sys::hangup_state(a.fds.hangup.as_fd()),
                    Ok(HangupState::Open)
                )
            });
        }
        channel.flush();
    }
}

fn answer(channel: &Channel, msg: Message, b: &Behaviour, state: &Mutex<State>) {
    let reply = match b {
        Behaviour::Silent => {
            lock(state).unanswered.push(msg);
            return;
        }
        Behaviour::Refuse(name, text) => msg.error(
            &name.as_str().into(),
            &std::ffi::CString::new(text.as_str()).expect("no NUL"),
        ),
        Behaviour::ReplyWithBody => msg.method_return().append1(42u32),
        Behaviour::Accept | Behaviour::AcceptThenClose | Behaviour::AcceptAndFollowHangup => {
            let args: AcceptArgs = msg.read_all().expect("AcceptSession arguments");
            let (session, service, caller, options, ts, tc, hangup, link, _params) = args;
            let accepted = Accepted {
                session: session.to_string(),
                service,
                caller,
                options,
                fds: PeerFds {
                    to_server: ring(ts),
                    to_client: ring(tc),
                    hangup,
                },
                link,
            };
            if !matches!(b, Behaviour::AcceptThenClose) {
                lock(state).accepted.push(accepted);
            }
            msg.method_return()
        }
    };
    let _ = channel.send(reply);
}
