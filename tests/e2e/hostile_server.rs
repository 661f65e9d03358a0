//! The client facing a hostile broker: a fake `org.shmlink.Broker1` on a
//! private bus (`shmlink_tests::fake_broker`) offers rings larger than asked
//! for, a 4 GiB `max-message`, a datagram hang-up socket, or never answers,
//! or never writes. The client refuses each with a clear error, allocates
//! nothing big on the way, and never waits past its timeout; so does the CLI.

use shmlink::Error;
use shmlink_endpoint::{rounded_capacity, FrameError};
use shmlink_interfaces::limits;
use shmlink_test_support::PrivateBus;
use shmlink_tests::fake_broker::{message_header, Answer, Delivery, FakeBroker, Offer};
use shmlink_tests::{cli_binary, proc_status};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type E = shmlink_endpoint::Error;

/// Generous bound on how much this process's RSS may grow while a hostile
/// offer is refused: megabytes of noise from tests running alongside are
/// fine, the gigabytes an unchecked offer asks for are not.
const RSS_GROWTH_KB: u64 = 512 << 10;

/// A private bus with a fake broker answering `OpenSession` through `offer`.
fn fake(offer: impl Fn(Option<u64>) -> Answer + Send + 'static) -> (PrivateBus, FakeBroker) {
    let bus = PrivateBus::start().expect("start a private dbus-daemon");
    let broker = FakeBroker::start(bus.address(), move |req| offer(req.capacity));
    (bus, broker)
}

fn client(bus: &PrivateBus) -> shmlink::Client {
    shmlink::Client::connect(&bus.bus()).expect("connect to the private bus")
}

fn rss_kb() -> u64 {
    proc_status(std::process::id(), "VmRSS")
}

/// Runs `f`, asserting that this process's RSS did not grow by gigabytes.
fn without_growing<T>(f: impl FnOnce() -> T) -> T {
    let before = rss_kb();
    let r = f();
    let after = rss_kb();
    assert!(
        after.saturating_sub(before) < RSS_GROWTH_KB,
        "RSS grew from {before} kB to {after} kB"
    );
    r
}

fn refused(r: Result<shmlink::Session, Error>) -> Error {
    match r {
        Ok(s) => panic!("the hostile offer was accepted as {}", s.path()),
        Err(e) => e,
    }
}

#[test]
fn a_terabyte_ring_with_a_matching_sparse_memfd_is_refused() {
    let huge = (1u64 << 40) - 64;
    let (bus, _broker) = fake(move |_| Answer::Offer(Offer::honest(4096, 1 << 20).huge_ring(huge)));
    let err = without_growing(|| refused(client(&bus).session("echo").capacity(4096).open()));
    let limit = rounded_capacity(4096);
    assert!(
        matches!(
            err,
            Error::Session(E::OverLimit { what: "server-to-client ring", offered, limit: l })
                if offered == huge && l == limit
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&huge.to_string()) && text.contains(&limit.to_string()),
        "the error names the offer and the limit: {text}"
    );
}

#[test]
fn without_an_asked_capacity_the_client_limit_applies() {
    let big = 128u64 << 20;
    let (bus, _broker) = fake(move |asked| {
        assert_eq!(asked, None, "the client asked for no capacity");
        Answer::Offer(Offer::honest(big, 1 << 20))
    });
    let c = client(&bus);
    let err = without_growing(|| refused(c.session("echo").open()));
    assert!(
        matches!(
            err,
            Error::Session(E::OverLimit { offered, limit, .. })
                if offered == rounded_capacity(big)
                    && limit == rounded_capacity(limits::DEFAULT_MAX_CAPACITY)
        ),
        "{err:?}"
    );
    // A client that allows more takes the same offer.
    let s = c
        .session("echo")
        .max_capacity(big)
        .open()
        .expect("within a raised limit");
    assert_eq!(s.send_capacity(), rounded_capacity(big));
}

#[test]
fn a_max_message_of_4_gib_is_refused() {
    let (bus, _broker) = fake(|_| Answer::Offer(Offer::honest(4096, 1 << 20).max_message(1 << 32)));
    let c = client(&bus);
    for builder in [
        c.session("echo").capacity(4096),
        // Even a client that accepts the largest 32-bit maximum: 4 GiB is above it.
        c.session("echo").capacity(4096).max_message(u32::MAX),
    ] {
        let err = without_growing(|| refused(builder.open()));
        assert!(
            matches!(
                err,
                Error::Session(E::OverLimit { what: "max-message", offered, .. })
                    if offered == 1 << 32
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("max-message of 4294967296 bytes"),
            "{err}"
        );
    }
    let err = refused(c.session("echo").capacity(4096).open());
    assert!(
        err.to_string()
            .contains(&format!("limit of {}", limits::DEFAULT_MAX_MESSAGE)),
        "{err}"
    );
}

#[test]
fn a_4_gib_frame_header_allocates_nothing_big() {
    // Within the client's default limit of 64 MiB: refused as a protocol
    // violation on the first read.
    let max = limits::DEFAULT_MAX_MESSAGE as u32;
    let (bus, _broker) = fake(move |_| {
        Answer::Offer(Offer::honest(4096, max).forge_to_client(&message_header(u32::MAX)))
    });
    let mut s = client(&bus)
        .session("echo")
        .capacity(4096)
        .timeout(Duration::from_secs(10))
        .open()
        .expect("an honest-looking offer");
    let err = without_growing(|| s.recv()).expect_err("a frame above max-message");
    assert!(
        matches!(
            err,
            Error::Session(E::Protocol(FrameError::TooLong { len: u32::MAX, max: m })) if m == max
        ),
        "{err:?}"
    );

    // A client that agreed to 4 GiB messages: the header is legal, and the
    // receive buffer grows only as bytes arrive (none do).
    let (bus, _broker) = fake(|_| {
        Answer::Offer(Offer::honest(4096, u32::MAX).forge_to_client(&message_header(u32::MAX)))
    });
    let mut s = client(&bus)
        .session("echo")
        .capacity(4096)
        .max_message(u32::MAX)
        .timeout(Duration::from_millis(300))
        .open()
        .expect("within the raised limit");
    let err = without_growing(|| s.recv()).expect_err("the rest never comes");
    assert!(err.is_timeout(), "{err:?}");
}

#[test]
fn rings_sent_wrongly_over_the_clients_socket_are_refused() {
    let cases = [
        (Delivery::Nothing, "replied before sending the rings"),
        (Delivery::Fds(5), "5 fds arrived, not 6"),
        (Delivery::Fds(64), "more than 6 fds"),
        (Delivery::WithBytes, "bytes arrived after the one byte"),
    ];
    for (delivery, expected) in cases {
        let (bus, _broker) =
            fake(move |_| Answer::Offer(Offer::honest(4096, 1 << 20).deliver(delivery)));
        let err = refused(client(&bus).session("echo").capacity(4096).open());
        assert!(
            matches!(err, Error::Session(E::BadFd(ref m)) if m.contains(expected)
                || (delivery == Delivery::Fds(64) && m.contains("fds arrived, not 6"))),
            "{delivery:?}: {err:?}"
        );
    }
    let (bus, _broker) = fake(|_| Answer::Offer(Offer::honest(4096, 1 << 20)));
    client(&bus)
        .session("echo")
        .capacity(4096)
        .open()
        .expect("the same offer delivered whole is taken");
}

#[test]
fn a_broker_that_never_answers_times_out() {
    let bus = PrivateBus::start().expect("start a private dbus-daemon");
    let _broker = FakeBroker::silent(bus.address());
    let c = client(&bus).with_call_timeout(Duration::from_secs(1));
    for (what, call) in [
        (
            "OpenSession",
            Box::new(|| c.session("echo").open().map(drop)) as Box<dyn Fn() -> Result<(), Error>>,
        ),
        ("Ping", Box::new(|| c.ping().map(drop))),
        ("Version", Box::new(|| c.version().map(drop))),
    ] {
        let start = Instant::now();
        let err = call().expect_err("no answer");
        let took = start.elapsed();
        assert!(
            matches!(err, Error::TimedOut { ref operation, after } if operation.contains(what) && after == Duration::from_secs(1)),
            "{err:?}"
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{what} gave up after {took:?}"
        );
        assert!(err.to_string().ends_with("timed out after 1 s"), "{err}");
    }
}

#[test]
fn a_broker_that_never_writes_nor_reads_times_out_in_every_wakeup_mode() {
    // Spin mode with the largest budget a broker may announce: the spinning
    // is bounded and the timeout still holds.
    for spin_us in [None, Some(limits::MAX_SPIN_US)] {
        let (bus, _broker) = fake(move |_| {
            let offer = Offer::honest(4096, 1 << 20);
            Answer::Offer(match spin_us {
                Some(us) => offer.spin(us),
                None => offer,
            })
        });
        let timeout = Duration::from_millis(300);
        let mut s = client(&bus)
            .session("echo")
            .capacity(4096)
            .timeout(timeout)
            .open()
            .expect("an honest offer");
        let start = Instant::now();
        let err = s.recv().expect_err("nothing comes");
        let took = start.elapsed();
        assert!(
            took >= timeout && took < Duration::from_secs(5),
            "{spin_us:?}: {took:?}"
        );
        assert_eq!(
            err.to_string(),
            "receiving from echo timed out after 300 ms"
        );
        // Nobody reads: a message larger than the ring cannot go out.
        let big = vec![7u8; 3 * s.send_capacity() as usize];
        let start = Instant::now();
        let err = s.send(&big).expect_err("the ring stays full");
        let took = start.elapsed();
        assert!(
            took >= timeout && took < Duration::from_secs(5),
            "{spin_us:?}: {took:?}"
        );
        assert_eq!(err.to_string(), "sending to echo timed out after 300 ms");
    }
}

/// Runs the CLI against `bus` with `args`; returns its stderr, exit code and run time.
fn cli(bus: &str, args: &[&str]) -> (String, Option<i32>, Duration) {
    let start = Instant::now();
    let out = Command::new(cli_binary())
        .args(["--bus", bus])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run shmlink");
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
        start.elapsed(),
    )
}

/// The error line says each thing once.
fn assert_no_repeats(err: &str) {
    let line = err.lines().last().unwrap_or_default();
    let parts: Vec<&str> = line.split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "{p:?} repeats in {line:?}");
    }
}

#[test]
fn every_cli_command_gives_up_on_a_silent_broker_within_its_default_timeout() {
    let bus = PrivateBus::start().expect("start a private dbus-daemon");
    let _broker = FakeBroker::silent(bus.address());
    let default = Duration::from_secs(10);
    let path = format!("{}1", shmlink_interfaces::SESSION_PATH_PREFIX);
    let commands: Vec<Vec<&str>> = vec![
        vec!["ping"],
        vec!["status"],
        vec!["close", &path],
        vec!["send", "echo"],
        vec!["demo"],
    ];
    std::thread::scope(|s| {
        let runs: Vec<_> = commands
            .iter()
            .map(|args| {
                let bus = bus.address();
                s.spawn(move || (args, cli(bus, args)))
            })
            .collect();
        for run in runs {
            let (args, (err, code, took)) = run.join().expect("runner");
            assert_eq!(code, Some(1), "{args:?}: {err}");
            assert!(
                err.contains("timed out after 10 s"),
                "{args:?} does not say it timed out: {err}"
            );
            assert!(
                took >= default - Duration::from_millis(100)
                    && took < default + Duration::from_secs(10),
                "{args:?} gave up after {took:?}"
            );
            assert_no_repeats(&err);
        }
    });
}

#[test]
fn cli_ping_gives_up_on_a_broker_that_never_echoes() {
    let (bus, _broker) = fake(|_| Answer::Offer(Offer::honest(64 * 1024, 1 << 20)));
    let (err, code, took) = cli(bus.address(), &["--timeout", "1.5", "ping", "-n", "3"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("echo round trip 1 of 3 failed: receiving from echo timed out after 1.5 s"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_no_repeats(&err);
}
