//! A fake broker, for testing the client against a hostile server.
//!
//! [`FakeBroker`] owns `org.shmlink.Broker1` on a private bus from a thread of
//! the test process and answers `OpenSessionVia` (and `OpenSession`) with
//! whatever [`Offer`] the test builds: honest rings from
//! [`Endpoint::create_server`], doctored ones (a huge sparse memfd, a 4 GiB
//! `max-message`, rings sent wrongly over the client's socket), forged
//! frames already waiting in the ring, or no answer at all. It also
//! answers `Peer.Ping` and the `Version` property, so that the CLI's `ping`
//! gets as far as opening a session.

use crate::hostile;
use dbus::arg::{PropMap, RefArg, Variant};
use dbus::Message;
use rustix::fs::{MemfdFlags, SealFlags};
use shmlink_endpoint::frame::encode_header;
use shmlink_endpoint::{sys, Endpoint, PeerFds, RingPair, Wakeup};
use shmlink_interfaces::{
    member, option, param, wakeup, OpenSessionArgs, OpenSessionReply, OpenSessionViaArgs,
    OpenSessionViaReply, BROKER_INTERFACE, BUS_NAME, RING_HEADER, SESSION_PATH_PREFIX,
};
use std::any::Any;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// What a client asked `OpenSession` for.
#[derive(Clone, Debug)]
pub struct Request {
    /// The service name.
    pub service: String,
    /// The `capacity` option, if given.
    pub capacity: Option<u64>,
}

/// An `OpenSession` reply under construction: the fds, the parameters, and
/// whatever must live as long as the session (the server's side).
pub struct Offer {
    /// The fds handed over.
    pub fds: PeerFds,
    /// The `parameters` dictionary.
    pub parameters: PropMap,
    /// How the rings go over the socket of `OpenSessionVia`.
    pub delivery: Delivery,
    keep: Vec<Box<dyn Any + Send>>,
}

/// How the fake broker sends the rings over the client's socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// As the contract says: one byte with the six fds.
    Whole,
    /// Not at all: the reply comes without them.
    Nothing,
    /// The first `n` fds of the six (or the six and more, repeated).
    Fds(usize),
    /// The six fds, then stray bytes on the socket.
    WithBytes,
}

impl Offer {
    /// Honest rings of `capacity` (rounded as the real broker rounds) and
    /// `max-message`, in park mode. The server's side is kept, silent: it
    /// never reads nor writes, but the hang-up socket stays open.
    pub fn honest(capacity: u64, max_message: u32) -> Offer {
        let (server, fds) =
            Endpoint::create_server(capacity, max_message, Wakeup::Park).expect("create rings");
        let mut parameters = PropMap::new();
        parameters.insert(
            param::MAX_MESSAGE.into(),
            Variant(Box::new(u64::from(max_message))),
        );
        parameters.insert(
            param::WAKEUP.into(),
            Variant(Box::new(wakeup::PARK.to_owned())),
        );
        Offer {
            fds,
            parameters,
            delivery: Delivery::Whole,
            keep: vec![Box::new(server)],
        }
    }

    /// Announces `max_message` in the parameters (any value, 4 GiB included).
    pub fn max_message(mut self, max_message: u64) -> Offer {
        self.parameters.insert(
            param::MAX_MESSAGE.into(),
            Variant(Box::new(max_message) as Box<dyn RefArg>),
        );
        self
    }

    /// Announces spin mode with a budget of `spin_us` microseconds.
    pub fn spin(mut self, spin_us: u32) -> Offer {
        self.parameters.insert(
            param::WAKEUP.into(),
            Variant(Box::new(wakeup::SPIN.to_owned()) as Box<dyn RefArg>),
        );
        self.parameters
            .insert(param::SPIN_US.into(), Variant(Box::new(spin_us)));
        self
    }

    /// Replaces the server-to-client ring's memfd with a sparse sealed memfd
    /// of `capacity` + 64 bytes and announces that capacity: everything a
    /// size check asks for, and terabytes of address space for whoever maps it.
    pub fn huge_ring(mut self, capacity: u64) -> Offer {
        let memfd = rustix::fs::memfd_create(
            "shmlink-fake-huge",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .expect("memfd_create");
        rustix::fs::ftruncate(&memfd, capacity + RING_HEADER).expect("grow the memfd (sparse)");
        rustix::fs::fcntl_add_seals(&memfd, SealFlags::SHRINK).expect("seal");
        self.fds.to_client.memfd = memfd;
        self.fds.to_client.capacity = capacity;
        self
    }

    /// Sends the rings over the client's socket as `delivery` says.
    pub fn deliver(mut self, delivery: Delivery) -> Offer {
        self.delivery = delivery;
        self
    }

    /// Writes raw `bytes` (at most the ring's capacity) into the
    /// server-to-client ring as a server would, behind the back of the
    /// server's side: the client finds them there when it reads.
    pub fn forge_to_client(self, bytes: &[u8]) -> Offer {
        let ring = &self.fds.to_client;
        assert!(bytes.len() as u64 <= ring.capacity, "the forged bytes fit");
        // Data first, then the count (offset 0, native endian), then the
        // wake-up: the order a sender publishes in. Plain file writes reach
        // the shared pages the client maps.
        rustix::io::pwrite(&ring.memfd, bytes, RING_HEADER).expect("write the ring data");
        rustix::io::pwrite(&ring.memfd, &(bytes.len() as u64).to_ne_bytes(), 0)
            .expect("write the ring count");
        rustix::io::write(&ring.empty_signal, &1u64.to_ne_bytes()).expect("signal");
        self
    }
}

/// A frame header announcing `len` payload bytes of an ordinary message.
pub fn message_header(len: u32) -> [u8; 8] {
    encode_header(shmlink_endpoint::frame::KIND_MESSAGE, len)
}

/// How the fake broker answers `OpenSession`.
pub enum Answer {
    /// With this offer.
    Offer(Offer),
    /// Not at all: the caller waits for its timeout.
    Never,
}

/// A thread that owns `org.shmlink.Broker1` on a bus and answers as told.
///
/// It stops (and releases everything it handed out) when dropped.
pub struct FakeBroker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeBroker {
    /// Owns the broker's name on the bus at `address`, answering
    /// `OpenSession` through `respond`; returns once the name is owned.
    pub fn start(
        address: &str,
        respond: impl FnMut(&Request) -> Answer + Send + 'static,
    ) -> FakeBroker {
        Self::run(address, Some(Box::new(respond)))
    }

    /// Owns the broker's name and answers nothing at all, not even `Ping`.
    pub fn silent(address: &str) -> FakeBroker {
        Self::run(address, None)
    }

    #[allow(clippy::type_complexity)]
    fn run(
        address: &str,
        mut respond: Option<Box<dyn FnMut(&Request) -> Answer + Send>>,
    ) -> FakeBroker {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let address = address.to_owned();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let conn = hostile::connect(&address).expect("connect the fake broker");
            conn.request_name(BUS_NAME, false, true, true)
                .expect("own the broker's name");
            let _ = ready_tx.send(());
            let ch = conn.channel();
            let mut kept: Vec<Box<dyn Any + Send>> = Vec::new();
            let mut sessions = 0u32;
            while !stopping.load(Ordering::Relaxed) {
                if ch.read_write(Some(Duration::from_millis(20))).is_err() {
                    break;
                }
                while let Some(msg) = ch.pop_message() {
                    let Some(respond) = respond.as_mut() else {
                        // Silent: swallow every call.
                        continue;
                    };
                    if let Some(reply) = answer(&msg, respond, &mut kept, &mut sessions) {
                        let _ = ch.send(reply);
                    }
                }
            }
            ch.flush();
        });
        ready_rx
            .recv_timeout(crate::DEADLINE)
            .expect("the fake broker owns its name");
        FakeBroker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn error(msg: &Message, text: &str) -> Message {
    msg.error(
        &"org.freedesktop.DBus.Error.Failed".into(),
        &std::ffi::CString::new(text).expect("no NUL"),
    )
}

/// The reply to one incoming message, if it is a call we answer.
fn answer(
    msg: &Message,
    respond: &mut Box<dyn FnMut(&Request) -> Answer + Send>,
    kept: &mut Vec<Box<dyn Any + Send>>,
    sessions: &mut u32,
) -> Option<Message> {
    if msg.msg_type() != dbus::MessageType::MethodCall {
        return None;
    }
    let iface = msg.interface().map(|i| i.to_string()).unwrap_or_default();
    let name = msg.member().map(|m| m.to_string()).unwrap_or_default();
    match (iface.as_str(), name.as_str()) {
        ("org.freedesktop.DBus.Peer", "Ping") => Some(msg.method_return()),
        ("org.freedesktop.DBus.Properties", "Get") => match msg.read2::<&str, &str>() {
            Ok((BROKER_INTERFACE, member::VERSION)) => {
                Some(msg.method_return().append1(Variant("0.0.0-fake")))
            }
            _ => Some(error(msg, "the fake broker has no such property")),
        },
        (BROKER_INTERFACE, member::OPEN_SESSION | member::OPEN_SESSION_VIA) => {
            let via = name == member::OPEN_SESSION_VIA;
            let (service, options, socket) = if via {
                let Ok((service, options, socket)) = msg.read3::<String, PropMap, OwnedFd>() else {
                    return Some(error(msg, "bad arguments"));
                };
                (service, options, Some(socket))
            } else {
                let Ok((service, options)) = msg.read2::<String, PropMap>() else {
                    return Some(error(msg, "bad arguments"));
                };
                (service, options, None)
            };
            let request = Request {
                service,
                capacity: options.get(option::CAPACITY).and_then(|v| v.0.as_u64()),
            };
            match respond(&request) {
                Answer::Never => {
                    kept.extend(socket.map(|s| Box::new(s) as Box<dyn Any + Send>));
                    None
                }
                Answer::Offer(offer) => {
                    *sessions += 1;
                    let path = dbus::Path::new(format!("{SESSION_PATH_PREFIX}{sessions}"))
                        .expect("a valid path");
                    let Offer {
                        fds,
                        parameters,
                        delivery,
                        keep,
                    } = offer;
                    kept.extend(keep);
                    let mut reply = msg.method_return();
                    match socket {
                        None => {
                            let args: OpenSessionArgs = OpenSessionReply {
                                session: path,
                                fds,
                                parameters,
                            }
                            .into();
                            reply.append_all(args);
                        }
                        Some(socket) => {
                            let (rings, hangup) = fds.split();
                            let capacities = [rings.to_server.capacity, rings.to_client.capacity];
                            deliver(socket.as_fd(), rings, delivery);
                            // The server's side keeps its own hang-up end
                            // (the one `hangup` pairs with); the client's
                            // socket stays open beside it.
                            kept.push(Box::new(socket));
                            kept.push(Box::new(hangup));
                            let args: OpenSessionViaArgs = OpenSessionViaReply {
                                session: path,
                                capacities,
                                parameters,
                            }
                            .into();
                            reply.append_all(args);
                        }
                    }
                    Some(reply)
                }
            }
        }
        _ => Some(error(msg, "the fake broker does not know this call")),
    }
}

/// Sends `rings` over `socket` as `delivery` says.
fn deliver(socket: BorrowedFd<'_>, rings: RingPair, delivery: Delivery) {
    let all = rings.fds();
    match delivery {
        Delivery::Whole => sys::send_fds(socket, &all).expect("send the rings"),
        Delivery::Nothing => {}
        Delivery::Fds(n) => {
            let some: Vec<BorrowedFd<'_>> = all.iter().copied().cycle().take(n).collect();
            sys::send_fds(socket, &some).expect("send some fds");
        }
        Delivery::WithBytes => {
            sys::send_fds(socket, &all).expect("send the rings");
            rustix::io::write(socket, b"stray").expect("write stray bytes");
        }
    }
}
