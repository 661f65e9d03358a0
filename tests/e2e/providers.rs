//! Services served by a provider process instead of the broker.
//!
//! `the_broker_played_by_the_test`: a `Provider` (in a thread of the test)
//! registers with a connection of the test that owns the broker's name, and
//! that connection hands it sessions the way the broker does: fresh sealed
//! memfds, eventfds, a hang-up pair and a link pair, over `AcceptSession`.

use dbus::arg::{IterAppend, PropMap, RefArg, Variant};
use dbus::blocking::Connection;
use dbus::Message;
use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use shmlink_endpoint::{rounded_capacity, sys, Endpoint, PeerFds, RingFds, Wakeup};
use shmlink_interfaces::{
    caller, error, member, param, wakeup, Bus, BROKER_INTERFACE, BUS_NAME, PROVIDER_INTERFACE,
    RING_HEADER,
};
use shmlink_server::{builtin, Provider, DEFAULT_OBJECT_PATH};
use shmlink_test_support::PrivateBus;
use shmlink_tests::{frames_provider_binary, hostile, payload, KillOnDrop, DEADLINE};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A ring's fds as the broker makes them: a sealed memfd and two eventfds.
fn ring(capacity: u64) -> RingFds {
    let memfd =
        rustix::fs::memfd_create("test-ring", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .expect("memfd");
    rustix::fs::ftruncate(&memfd, capacity + RING_HEADER).expect("size");
    rustix::fs::fcntl_add_seals(&memfd, SealFlags::SHRINK | SealFlags::GROW).expect("seal");
    let ev = || eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).expect("eventfd");
    RingFds {
        capacity,
        memfd,
        empty_signal: ev(),
        full_signal: ev(),
    }
}

fn dup(r: &RingFds) -> RingFds {
    RingFds {
        capacity: r.capacity,
        memfd: r.memfd.try_clone().expect("dup"),
        empty_signal: r.empty_signal.try_clone().expect("dup"),
        full_signal: r.full_signal.try_clone().expect("dup"),
    }
}

fn stream_pair() -> (OwnedFd, OwnedFd) {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .expect("socketpair")
}

/// One session as the broker sets it up: the provider's fds, the client's,
/// and the broker's end of the link.
struct Handover {
    provider: PeerFds,
    provider_link: OwnedFd,
    client: PeerFds,
    broker_link: OwnedFd,
}

fn handover(capacity: u64) -> Handover {
    let capacity = rounded_capacity(capacity);
    let (to_server, to_client) = (ring(capacity), ring(capacity));
    let (server_hangup, client_hangup) = stream_pair();
    let (broker_link, provider_link) = stream_pair();
    Handover {
        client: PeerFds {
            to_server: dup(&to_server),
            to_client: dup(&to_client),
            hangup: client_hangup,
        },
        provider: PeerFds {
            to_server,
            to_client,
            hangup: server_hangup,
        },
        provider_link,
        broker_link,
    }
}

fn dict(pairs: Vec<(&str, Box<dyn RefArg>)>) -> PropMap {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Variant(v)))
        .collect()
}

/// An `AcceptSession` call to `provider` for session `n` of `service`.
fn accept_call(
    provider: &str,
    n: u32,
    service: &str,
    options: PropMap,
    fds: PeerFds,
    link: OwnedFd,
) -> Message {
    let mut m = Message::method_call(
        &provider.into(),
        &DEFAULT_OBJECT_PATH.into(),
        &PROVIDER_INTERFACE.into(),
        &member::ACCEPT_SESSION.into(),
    );
    let who = dict(vec![
        (caller::UID, Box::new(rustix::process::getuid().as_raw())),
        (caller::PID, Box::new(std::process::id())),
        (
            caller::GIDS,
            Box::new(vec![rustix::process::getgid().as_raw()]),
        ),
        (caller::BUS_NAME, Box::new(":1.999".to_owned())),
    ]);
    let params = dict(vec![
        (param::MAX_MESSAGE, Box::new(1u64 << 20)),
        (param::WAKEUP, Box::new(wakeup::PARK.to_owned())),
        (param::SPIN_US, Box::new(0u32)),
    ]);
    let ring = |r: RingFds| (r.capacity, r.memfd, r.empty_signal, r.full_signal);
    let mut ia = IterAppend::new(&mut m);
    ia.append(dbus::Path::from(format!(
        "/org/shmlink/Broker1/session/{n}"
    )));
    ia.append(service);
    ia.append(who);
    ia.append(options);
    ia.append(ring(fds.to_server));
    ia.append(ring(fds.to_client));
    ia.append(fds.hangup);
    ia.append(link);
    ia.append(params);
    m
}

/// Waits for the provider's `RegisterService` and accepts it; returns the
/// provider's unique name.
fn accept_registration(broker: &Connection, service: &str) -> String {
    accept_registrations(broker, &[service])
}

/// Waits for one `RegisterService` per name in `services`, in that order,
/// and accepts them; returns the provider's unique name.
fn accept_registrations(broker: &Connection, services: &[&str]) -> String {
    let mut provider = String::new();
    for service in services {
        let p = accept_one_registration(broker, service);
        assert!(provider.is_empty() || provider == p, "one provider");
        provider = p;
    }
    provider
}

fn accept_one_registration(broker: &Connection, service: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        broker
            .channel()
            .read_write(Some(Duration::from_millis(50)))
            .expect("bus");
        while let Some(msg) = broker.channel().pop_message() {
            if msg.interface().as_deref() != Some(BROKER_INTERFACE)
                || msg.member().as_deref() != Some(member::REGISTER_SERVICE)
            {
                continue;
            }
            let (name, object, options): (String, dbus::Path, PropMap) =
                msg.read3().expect("RegisterService arguments");
            assert_eq!(name, service);
            assert_eq!(&*object, DEFAULT_OBJECT_PATH);
            assert!(options.is_empty());
            broker.channel().send(msg.method_return()).expect("reply");
            return msg.sender().expect("sender").to_string();
        }
    }
    panic!("no RegisterService within {DEADLINE:?}");
}

/// Sends `provider` the `AcceptSession` call numbered `n` from `from` (the
/// broker, or an intruder) and waits for its answer.
fn ask(
    from: &Connection,
    provider: &str,
    n: u32,
    service: &str,
    options: PropMap,
    fds: PeerFds,
    link: OwnedFd,
) -> Result<Message, dbus::Error> {
    from.channel().send_with_reply_and_block(
        accept_call(provider, n, service, options, fds, link),
        DEADLINE,
    )
}

fn error_name(e: &dbus::Error) -> &str {
    e.name().unwrap_or_default()
}

/// A connection of the test's own that owns the broker's name: the test
/// plays the broker.
fn play_broker(bus: &PrivateBus) -> Connection {
    let broker = hostile::connect(bus.address()).expect("connect");
    broker
        .request_name(BUS_NAME, false, true, true)
        .expect("own the broker's name");
    broker
}

/// A provider of `services` under `config`, run by the runtime in a thread
/// of this test until [`ProviderThread::stop`].
struct ProviderThread {
    stop: OwnedFd,
    thread: std::thread::JoinHandle<Result<(), shmlink_server::ProviderError>>,
}

impl ProviderThread {
    fn start(
        bus: &PrivateBus,
        config: shmlink_server::config::Config,
        services: Vec<Arc<dyn shmlink_server::Service>>,
    ) -> ProviderThread {
        let stop = eventfd(0, EventfdFlags::CLOEXEC).expect("stop fd");
        let stop_dup = stop.try_clone().expect("dup");
        let address = bus.address().to_owned();
        let thread = std::thread::spawn(move || {
            let mut builder = Provider::builder(&Bus::Address(address)).config(config);
            for service in services {
                builder = builder.service(service);
            }
            builder
                .register()
                .expect("register")
                .run(Some(stop_dup.as_fd()))
        });
        ProviderThread { stop, thread }
    }

    /// Stops the provider and checks that it stopped cleanly.
    fn stop(self) {
        rustix::io::write(&self.stop, &1u64.to_ne_bytes()).expect("stop");
        self.thread
            .join()
            .expect("provider thread")
            .expect("provider stopped cleanly");
    }
}

/// Hands `provider` an `echo` session of 64 KiB rings as the broker
/// (call number `n`), which it must accept; returns the client's side and
/// the broker's end of the link (dropping it ends the session).
fn accept_echo(broker: &Connection, provider: &str, n: u32) -> (Endpoint, OwnedFd) {
    let h = handover(64 << 10);
    ask(
        broker,
        provider,
        n,
        "echo",
        PropMap::new(),
        h.provider,
        h.provider_link,
    )
    .expect("accepted");
    let mut client = Endpoint::open_client(h.client, 1 << 20, Wakeup::Park).expect("client");
    client.set_timeout(Some(DEADLINE));
    (client, h.broker_link)
}

#[test]
fn the_broker_played_by_the_test() {
    let bus = PrivateBus::start().expect("bus");
    let broker = play_broker(&bus);
    let provider_thread =
        ProviderThread::start(&bus, Default::default(), vec![Arc::new(builtin::Echo)]);
    let provider = accept_registration(&broker, "echo");

    // An honest session: accepted, and echo works through the rings.
    let (mut client, broker_link) = accept_echo(&broker, &provider, 1);
    for i in 0..50u64 {
        let msg = payload(i, (i as usize * 4099) % (200 << 10));
        client.send(&msg).expect("send");
        let back = client.recv().expect("recv").expect("echo ended early");
        assert!(back == msg, "echo {i} differs");
    }

    // Unknown option keys and services are refused as the broker would.
    let h2 = handover(4096);
    let opts = dict(vec![("bogus", Box::new(1u32))]);
    let e = ask(
        &broker,
        &provider,
        2,
        "echo",
        opts,
        h2.provider,
        h2.provider_link,
    )
    .expect_err("unknown option");
    assert_eq!(error_name(&e), error::INVALID_OPTION, "{e:?}");
    assert!(e.message().unwrap_or("").contains("bogus"), "{e:?}");
    let h3 = handover(4096);
    let e = ask(
        &broker,
        &provider,
        3,
        "nope",
        PropMap::new(),
        h3.provider,
        h3.provider_link,
    )
    .expect_err("unknown service");
    assert_eq!(error_name(&e), error::UNKNOWN_SERVICE, "{e:?}");
    // A refused session's fds are dropped: the link closes at once.
    let ready = sys::poll_readable(&[h3.broker_link.as_fd()], Some(Instant::now() + DEADLINE))
        .expect("poll");
    assert!(ready[0].hangup || ready[0].readable, "refused link closed");

    // Anyone but the broker is refused.
    let intruder = hostile::connect(bus.address()).expect("connect");
    let h4 = handover(4096);
    let e = ask(
        &intruder,
        &provider,
        4,
        "echo",
        PropMap::new(),
        h4.provider,
        h4.provider_link,
    )
    .expect_err("not the broker");
    assert_eq!(error_name(&e), error::ACCESS_DENIED, "{e:?}");

    // The broker ends session 1 by closing its link: the client sees the hang-up.
    drop(broker_link);
    let ready =
        sys::poll_readable(&[client.hangup_fd()], Some(Instant::now() + DEADLINE)).expect("poll");
    assert!(ready[0].hangup || ready[0].readable, "client saw the end");
    assert!(client.peer_gone().expect("peer_gone"));

    provider_thread.stop();
}

#[test]
fn an_embedded_broker_serves_under_its_own_name_beside_shmlinkd() {
    use shmlink::Client;
    let h = shmlink_tests::Harness::start();
    let bus = PrivateBus::start().expect("bus");
    let names = shmlink_server::Names::new("org.example.Embedded1").expect("names");
    let _broker = shmlink_tests::EmbeddedBroker::start(&bus.bus(), names);
    let client = Client::connect_to(&bus.bus(), "org.example.Embedded1")
        .expect("connect")
        .with_call_timeout(DEADLINE);
    assert_eq!(client.broker_path(), "/org/example/Embedded1");
    client.ping().expect("the embedded broker answers");

    // Echo, byte for byte, and the session lives below the broker's own path.
    let session = client
        .session("echo")
        .capacity(8192)
        .open()
        .expect("open echo");
    assert!(
        session
            .path()
            .starts_with("/org/example/Embedded1/session/"),
        "{}",
        session.path()
    );
    let (mut w, mut r) = session.split();
    let sizes = [0usize, 1, 4095, 8192, 100_000];
    let reader = std::thread::spawn(move || {
        for (i, &n) in sizes.iter().enumerate() {
            let got = r.recv().expect("recv").expect("echo ended early");
            assert!(got == payload(i as u64, n), "echo {i} differs");
        }
    });
    for (i, &n) in sizes.iter().enumerate() {
        w.send(&payload(i as u64, n)).expect("send");
    }
    reader.join().expect("reader");
    let sessions = client.list_sessions().expect("list");
    assert_eq!(sessions.len(), 1);
    assert!(sessions[0]
        .path
        .starts_with("/org/example/Embedded1/session/"));

    // The CLI reaches it by name, sink verdict and all; shmlinkd on the
    // harness's bus is another broker and sees none of it.
    let file = std::env::temp_dir().join(format!("shmlink-embedded-{}", std::process::id()));
    std::fs::write(&file, payload(7, 300_000)).expect("write");
    let out = std::process::Command::new(shmlink_tests::cli_binary())
        .args([
            "--bus",
            bus.address(),
            "--name",
            "org.example.Embedded1",
            "send",
            "sink",
        ])
        .arg(&file)
        .output()
        .expect("run shmlink");
    let _ = std::fs::remove_file(&file);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let crc = format!("{:08x}", crc32fast::hash(&payload(7, 300_000)));
    assert!(
        text.contains(&crc),
        "the sink's checksum {crc} missing: {text}"
    );
    let out = std::process::Command::new(shmlink_tests::cli_binary())
        .args([
            "--bus",
            bus.address(),
            "--name",
            "org.example.Embedded1",
            "status",
        ])
        .output()
        .expect("run shmlink");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("broker org.example.Embedded1"), "{text}");
    assert!(text.contains("/org/example/Embedded1/session/"), "{text}");
    assert_eq!(h.session_count(), 0, "shmlinkd saw nothing");
    // Under the default name there is no broker on this bus.
    let e = Client::connect(&bus.bus())
        .expect("connect")
        .ping()
        .expect_err("no shmlinkd on this bus");
    assert_eq!(
        e.dbus_name(),
        Some("org.freedesktop.DBus.Error.ServiceUnknown"),
        "{e}"
    );
}

#[test]
fn a_provider_bounds_its_sessions_checks_fds_and_registers_again_after_a_broker_restart() {
    let bus = PrivateBus::start().expect("bus");
    let first = play_broker(&bus);
    // Room for one 64 KiB session per uid (both rings, their headers, the
    // fixed overhead) and its buffers, not for two.
    let mut config = shmlink_server::config::Config::default();
    config.limits.memory_per_user = 250_000;
    config.engine.workers = 1;
    let provider_thread = ProviderThread::start(&bus, config, vec![Arc::new(builtin::Echo)]);
    let provider = accept_registration(&first, "echo");
    let call = |broker: &Connection, n: u32, h: Handover| {
        // The broker's and the client's ends stay with the caller, or go.
        ask(
            broker,
            &provider,
            n,
            "echo",
            PropMap::new(),
            h.provider,
            h.provider_link,
        )
    };

    let (a, client_fds, a_link) = split(handover(64 << 10));
    call(&first, 1, a).expect("the first session fits");
    let mut client = Endpoint::open_client(client_fds, 1 << 20, Wakeup::Park).expect("client");
    client.set_timeout(Some(DEADLINE));
    client.send(b"ping").expect("send");
    assert_eq!(client.recv().expect("recv").as_deref(), Some(&b"ping"[..]));
    let e = call(&first, 2, handover(64 << 10)).expect_err("a second one does not");
    assert_eq!(error_name(&e), error::LIMIT_EXCEEDED, "{e:?}");
    assert!(
        e.message().unwrap_or("").contains("memory_per_user"),
        "{e:?}"
    );

    // Fds that are not what they claim are refused before anything is mapped.
    let mut bad = handover(4096);
    bad.provider.to_client.capacity = rounded_capacity(1 << 20);
    let e = call(&first, 3, bad).expect_err("a ring larger than its memfd");
    assert_eq!(error_name(&e), error::INTERNAL, "{e:?}");
    assert!(e.message().unwrap_or("").contains("memfd holds"), "{e:?}");
    let mut bad = handover(4096);
    bad.provider.hangup = eventfd(0, EventfdFlags::CLOEXEC).expect("eventfd");
    let e = call(&first, 4, bad).expect_err("an eventfd as hang-up socket");
    assert!(
        e.message()
            .unwrap_or("")
            .contains("hang-up fd is not a socket"),
        "{e:?}"
    );

    // The broker dies: its link ends close with it, the session ends, the
    // client sees the hang-up.
    drop(a_link);
    drop(first);
    let ready =
        sys::poll_readable(&[client.hangup_fd()], Some(Instant::now() + DEADLINE)).expect("poll");
    assert!(ready[0].hangup || ready[0].readable, "client saw the end");

    // A new broker takes the name: the provider registers again, accepts
    // from it (its budget free again) and from nobody else.
    let second = play_broker(&bus);
    assert_eq!(accept_registration(&second, "echo"), provider);
    let (b, b_client, b_link) = split(handover(64 << 10));
    call(&second, 1, b).expect("the new broker's session is accepted");
    let mut client = Endpoint::open_client(b_client, 1 << 20, Wakeup::Park).expect("client");
    client.set_timeout(Some(DEADLINE));
    client.send(b"again").expect("send");
    assert_eq!(client.recv().expect("recv").as_deref(), Some(&b"again"[..]));

    // Stopping the provider ends its sessions: the broker's link and the
    // client's hang-up both close.
    provider_thread.stop();
    let deadline = Some(Instant::now() + DEADLINE);
    let ready = sys::poll_readable(&[b_link.as_fd(), client.hangup_fd()], deadline).expect("poll");
    assert!(
        ready[0].hangup || ready[0].readable,
        "the broker saw the end"
    );
    assert!(
        client.peer_gone().expect("peer_gone"),
        "the client saw the end"
    );
}

/// A handover's client fds and broker link taken out (the rest keeps dups).
fn split(h: Handover) -> (Handover, PeerFds, OwnedFd) {
    let client = PeerFds {
        to_server: dup(&h.client.to_server),
        to_client: dup(&h.client.to_client),
        hangup: h.client.hangup.try_clone().expect("dup"),
    };
    let link = h.broker_link.try_clone().expect("dup");
    (h, client, link)
}

#[test]
fn a_provider_process_streams_both_ways_and_its_death_unblocks_the_client_at_once() {
    let bus = PrivateBus::start().expect("bus");
    let broker = play_broker(&bus);
    let mut child = KillOnDrop(
        std::process::Command::new(frames_provider_binary())
            .args(["--bus", bus.address()])
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start the provider"),
    );
    let provider = accept_registrations(&broker, &["digest", "frames"]);
    let accept = |n: u32, service: &str, options: PropMap, h: Handover| {
        ask(
            &broker,
            &provider,
            n,
            service,
            options,
            h.provider,
            h.provider_link,
        )
    };

    // Both ways: every message comes back as its length and CRC-32.
    let (h, client_fds, digest_link) = split(handover(256 << 10));
    accept(1, "digest", PropMap::new(), h).expect("digest accepted");
    let client = Endpoint::open_client(client_fds, 1 << 20, Wakeup::Park).expect("client");
    let (mut tx, mut rx) = client.split();
    tx.set_timeout(Some(DEADLINE));
    rx.set_timeout(Some(DEADLINE));
    let sizes: Vec<usize> = (0..300u64)
        .map(|i| ((i * 7919) % (700 << 10)) as usize)
        .collect();
    let expected: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let msg = payload(i as u64, n);
            let mut d = (msg.len() as u64).to_le_bytes().to_vec();
            d.extend(crc32fast::hash(&msg).to_le_bytes());
            d
        })
        .collect();
    let writer = std::thread::spawn(move || {
        for (i, &n) in sizes.iter().enumerate() {
            tx.send(&payload(i as u64, n)).expect("send");
        }
        tx
    });
    for (i, want) in expected.iter().enumerate() {
        let got = rx.recv().expect("recv").expect("digest ended early");
        assert_eq!(&got, want, "digest {i}");
    }
    let tx = writer.join().expect("writer");
    // The client goes away: the provider ends the session, the broker's link closes.
    drop((tx, rx));
    let ready =
        sys::poll_readable(&[digest_link.as_fd()], Some(Instant::now() + DEADLINE)).expect("poll");
    assert!(
        ready[0].hangup || ready[0].readable,
        "the broker saw the client's end"
    );

    // Frames stream out; the provider is killed mid-stream.
    let (h, client_fds, frames_link) = split(handover(1 << 20));
    let opts = dict(vec![
        ("width", Box::new(640u32)),
        ("height", Box::new(480u32)),
        ("count", Box::new(1_000_000u64)),
    ]);
    accept(2, "frames", opts, h).expect("frames accepted");
    let mut client = Endpoint::open_client(client_fds, 1 << 20, Wakeup::Park).expect("client");
    client.set_timeout(Some(DEADLINE));
    for i in 0..20u64 {
        let f = client.recv().expect("recv").expect("frames ended early");
        assert_eq!(f.len(), 16 + 640 * 480, "frame {i}");
        assert_eq!(u64::from_le_bytes(f[8..16].try_into().unwrap()), i, "index");
        let (x, y) = (17usize, 300usize);
        assert_eq!(
            f[16 + y * 640 + x],
            (x as u64 + y as u64 + i) as u8,
            "pixel of frame {i}"
        );
    }
    let killed = Instant::now();
    child.0.kill().expect("kill the provider");
    let unblocked = loop {
        match client.recv() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a killed provider sent an end of stream"),
            Err(e) => break (killed.elapsed(), e),
        }
    };
    eprintln!(
        "client unblocked {:?} after the kill: {}",
        unblocked.0, unblocked.1
    );
    assert!(
        unblocked.0 < Duration::from_millis(100),
        "the client waited {:?} after the provider's death",
        unblocked.0
    );
    assert!(client.peer_gone().expect("peer_gone"));
    let ready =
        sys::poll_readable(&[frames_link.as_fd()], Some(Instant::now() + DEADLINE)).expect("poll");
    assert!(
        ready[0].hangup || ready[0].readable,
        "the broker saw the provider's death"
    );
}

#[test]
fn a_hostile_client_of_a_provided_service_ends_only_its_own_session() {
    let bus = PrivateBus::start().expect("bus");
    let broker = play_broker(&bus);
    let mut child = KillOnDrop(
        std::process::Command::new(frames_provider_binary())
            .args(["--bus", bus.address()])
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start the provider"),
    );
    let provider = accept_registrations(&broker, &["digest", "frames"]);
    let mut sessions = Vec::new();
    for n in 1..=2 {
        let (h, client_fds, link) = split(handover(64 << 10));
        let raw = dup(&client_fds.to_server);
        ask(
            &broker,
            &provider,
            n,
            "digest",
            PropMap::new(),
            h.provider,
            h.provider_link,
        )
        .expect("accepted");
        let mut client = Endpoint::open_client(client_fds, 1 << 20, Wakeup::Park).expect("client");
        client.set_timeout(Some(DEADLINE));
        sessions.push((client, raw, link));
    }
    // Session 1's client claims more bytes in its ring than the ring holds.
    let (_, raw, link) = &sessions[0];
    rustix::io::pwrite(&raw.memfd, &u64::MAX.to_ne_bytes(), 0).expect("corrupt the count");
    hostile::signal(raw.empty_signal.as_fd()).expect("wake the provider");
    let ready = sys::poll_readable(&[link.as_fd()], Some(Instant::now() + DEADLINE)).expect("poll");
    assert!(
        ready[0].hangup || ready[0].readable,
        "the corrupt session ended"
    );
    assert!(
        sessions[0].0.peer_gone().expect("peer_gone"),
        "its client saw it"
    );
    // The other session, and the provider, go on.
    let client = &mut sessions[1].0;
    for i in 0..20u64 {
        let msg = payload(i, 100_000);
        client.send(&msg).expect("send");
        let d = client.recv().expect("recv").expect("digest ended early");
        assert_eq!(d[8..], crc32fast::hash(&msg).to_le_bytes(), "digest {i}");
    }
    assert_eq!(
        sys::hangup_state(sessions[1].2.as_fd()).expect("peek"),
        sys::HangupState::Open
    );
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "the provider lives"
    );
}

/// Part of the suite, against a broker embedded under another name.
mod embedded {
    use shmlink_tests::Harness;

    #[test]
    fn echo_edge_sizes() {
        crate::echo::echo_edge_sizes(&Harness::embedded());
    }

    #[test]
    fn read_write_adapters() {
        crate::echo::read_write_adapters(&Harness::embedded());
    }

    #[test]
    fn source_stream() {
        crate::streaming::source_stream(&Harness::embedded());
    }

    #[test]
    fn both_directions() {
        crate::streaming::both_directions(&Harness::embedded());
    }
}

#[test]
fn through_shmlinkd_a_provider_process_streams_and_its_death_ends_the_session() {
    let h = shmlink_tests::Harness::start();
    let mut child = h.start_frames_provider();
    let client = h.client().with_call_timeout(DEADLINE);
    let listed = client.list_services().expect("ListServices");
    let frames = listed.iter().find(|s| s.name == "frames").expect("listed");
    assert!(!frames.provider.is_empty(), "{listed:?}");

    // Both ways through the provider, checksummed.
    let session = client
        .session("digest")
        .capacity(256 << 10)
        .open()
        .expect("open digest");
    let (mut w, mut r) = session.split();
    let sizes: Vec<usize> = (0..200u64)
        .map(|i| ((i * 7919) % (500 << 10)) as usize)
        .collect();
    let want: Vec<u32> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| crc32fast::hash(&payload(i as u64, n)))
        .collect();
    let writer = std::thread::spawn(move || {
        for (i, &n) in sizes.iter().enumerate() {
            w.send(&payload(i as u64, n)).expect("send");
        }
        w.finish().expect("finish");
    });
    for (i, crc) in want.iter().enumerate() {
        let d = r.recv().expect("recv").expect("digest ended early");
        assert_eq!(d[8..], crc.to_le_bytes(), "digest {i}");
    }
    assert_eq!(r.recv().expect("end"), None);
    writer.join().expect("writer");

    // Frames stream out; the provider dies mid-stream.
    let mut session = client
        .session("frames")
        .option("count", 1_000_000u64)
        .option("width", 640u64)
        .option("height", 480u64)
        .open()
        .expect("open frames");
    for i in 0..10u64 {
        let f = session.recv().expect("recv").expect("frame");
        assert_eq!(u64::from_le_bytes(f[8..16].try_into().unwrap()), i);
    }
    assert!(h.session_count() >= 1);
    let killed = Instant::now();
    child.0.kill().expect("kill");
    let unblocked = loop {
        match session.recv() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a killed provider sent an end of stream"),
            Err(_) => break killed.elapsed(),
        }
    };
    eprintln!("client unblocked {unblocked:?} after the provider's kill");
    assert!(unblocked < Duration::from_millis(100), "{unblocked:?}");
    // The broker ends it too (its link closed) and releases it.
    assert!(
        shmlink_tests::wait_until(DEADLINE, || h.session_count() == 0),
        "the broker kept the session"
    );
    assert!(
        shmlink_tests::wait_until(DEADLINE, || client
            .services()
            .is_ok_and(|s| !s.iter().any(|n| n == "frames"))),
        "the registration outlived the provider"
    );
}

/// A provider under a low open-file limit, and `nobody` opening sessions
/// of it until refused: each refusal is `LimitExceeded` from the provider,
/// the provider lives on, and once the attacker's sessions are gone an
/// honest client opens and uses one.
#[test]
fn a_provider_short_of_fds_refuses_sessions_and_lives_on() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let h = shmlink_tests::Harness::start();
    // Hard limit 128: the provider's own raise stops there, so a few
    // sessions (8 fds each, with the copies made while decoding) use it up.
    let mut child = KillOnDrop(
        std::process::Command::new("prlimit")
            .arg("--nofile=128:128")
            .arg("--")
            .arg(frames_provider_binary())
            .args(["--bus", h.address()])
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start the provider under prlimit"),
    );
    let client = h.client().with_call_timeout(DEADLINE);
    assert!(
        shmlink_tests::wait_until(DEADLINE, || client
            .services()
            .is_ok_and(|s| s.iter().any(|n| n == "frames"))),
        "the provider never registered"
    );

    // setpriv can fail to exec the fresh copy of the binary ("Text file
    // busy") while another test's fork still holds it open: start again.
    let (mut attacker, line) = (0..5)
        .find_map(|_| {
            let mut child = std::process::Command::new("setpriv")
                .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                .arg(shmlink_tests::world_executable(&hostile::hostile_binary()))
                .args([h.address(), "hold-some", "frames", "60"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn setpriv hostile-client hold-some");
            let mut line = String::new();
            BufReader::new(child.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("read the attacker's line");
            if line.is_empty() {
                let _ = child.wait();
                None
            } else {
                Some((child, line))
            }
        })
        .expect("the attacker never started");
    eprintln!("attacker: {}", line.trim());
    let rest = line
        .trim()
        .strip_prefix("HELD ")
        .expect("HELD n REFUSED ...");
    let (held, refused) = rest.split_once(" REFUSED ").expect("REFUSED");
    let held: usize = held.parse().expect("a count");
    assert!((1..60).contains(&held), "{line}");
    assert!(
        refused.starts_with(&format!("{}: ", error::LIMIT_EXCEEDED))
            && refused.contains("cannot take more fds"),
        "{refused}"
    );
    assert!(
        child.0.try_wait().expect("try_wait").is_none(),
        "the provider died"
    );
    assert!(
        client
            .services()
            .is_ok_and(|s| s.iter().any(|n| n == "frames")),
        "frames is gone"
    );

    // The attacker leaves; its sessions end and their fds come back.
    drop(attacker.stdin.take());
    attacker.wait().expect("the attacker exits");
    let mut session = None;
    assert!(
        shmlink_tests::wait_until(DEADLINE, || {
            session = client.session("frames").option("count", 5u64).open().ok();
            session.is_some()
        }),
        "an honest client never got a session"
    );
    let mut session = session.expect("opened");
    for i in 0..5u64 {
        let f = session.recv().expect("recv").expect("frame");
        assert_eq!(u64::from_le_bytes(f[8..16].try_into().unwrap()), i);
    }
    assert!(
        child.0.try_wait().expect("try_wait").is_none(),
        "the provider died"
    );
}

/// A service whose `open` panics.
struct Panicky;

impl shmlink_server::Service for Panicky {
    fn name(&self) -> &str {
        "panicky"
    }
    fn open(
        &self,
        _caller: &shmlink_server::Caller,
        _options: &shmlink_server::Options,
    ) -> Result<Box<dyn shmlink_server::SessionHandler>, shmlink_server::ServiceError> {
        panic!("this service cannot open sessions");
    }
}

/// A panic while handling `AcceptSession` is answered with an error; the
/// provider serves the next call, of the same method, as before.
#[test]
fn a_panic_in_accept_session_is_answered_and_the_provider_serves_on() {
    let bus = PrivateBus::start().expect("bus");
    let broker = play_broker(&bus);
    let provider_thread = ProviderThread::start(
        &bus,
        Default::default(),
        vec![Arc::new(builtin::Echo), Arc::new(Panicky)],
    );
    let provider = accept_registrations(&broker, &["echo", "panicky"]);
    for n in 1..=2 {
        let h = handover(4096);
        let e = ask(
            &broker,
            &provider,
            n,
            "panicky",
            PropMap::new(),
            h.provider,
            h.provider_link,
        )
        .expect_err("a panicking open");
        assert_eq!(error_name(&e), error::INTERNAL, "{e:?}");
    }
    let (mut client, _link) = accept_echo(&broker, &provider, 3);
    client.send(b"still here").expect("send");
    let back = client.recv().expect("recv").expect("echo");
    assert_eq!(&back[..], b"still here");

    provider_thread.stop();
}

/// Waits for a `RegisterService` of `service` and answers it with
/// `refusal` (an error name), or accepts it if `None`.
fn answer_registration(broker: &Connection, service: &str, refusal: Option<&str>) {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        broker
            .channel()
            .read_write(Some(Duration::from_millis(50)))
            .expect("bus");
        while let Some(msg) = broker.channel().pop_message() {
            if msg.member().as_deref() != Some(member::REGISTER_SERVICE) {
                continue;
            }
            let name: String = msg.read1().expect("RegisterService arguments");
            assert_eq!(name, service);
            let answer = match refusal {
                Some(e) => msg.error(&e.into(), c"registered by another uid"),
                None => msg.method_return(),
            };
            broker.channel().send(answer).expect("answer");
            return;
        }
    }
    panic!("no RegisterService within {DEADLINE:?}");
}

/// After a broker restart, a refused registration is tried again, sooner
/// than the next restart, until the broker takes it.
#[test]
fn a_refused_registration_after_a_broker_restart_is_retried() {
    let bus = PrivateBus::start().expect("bus");
    let first = play_broker(&bus);
    let provider_thread =
        ProviderThread::start(&bus, Default::default(), vec![Arc::new(builtin::Echo)]);
    accept_registration(&first, "echo");
    // The broker restarts: a new connection owns the name.
    drop(first);
    let second = play_broker(&bus);
    // Refused when it registers again, and on the first retry (1 s later).
    answer_registration(&second, "echo", Some(error::NAME_TAKEN));
    let refused_at = Instant::now();
    answer_registration(&second, "echo", Some(error::NAME_TAKEN));
    answer_registration(&second, "echo", Some(error::NAME_TAKEN));
    let retried = refused_at.elapsed();
    // The second retry waits 2 s after the first (1 s): about 3 s in all.
    assert!(retried >= Duration::from_millis(2500), "{retried:?}");
    answer_registration(&second, "echo", None);

    provider_thread.stop();
}

/// The provider runtime lifts its soft open-file limit to the hard one.
#[test]
fn a_provider_raises_its_soft_fd_limit_to_the_hard_one() {
    let h = shmlink_tests::Harness::start();
    let child = KillOnDrop(
        std::process::Command::new("prlimit")
            .arg("--nofile=64:4096")
            .arg("--")
            .arg(frames_provider_binary())
            .args(["--bus", h.address()])
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start the provider under prlimit"),
    );
    let client = h.client();
    assert!(
        shmlink_tests::wait_until(DEADLINE, || client
            .services()
            .is_ok_and(|s| s.iter().any(|n| n == "frames"))),
        "the provider never registered"
    );
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).expect("its limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3..5], ["4096", "4096"], "{line}");
}
