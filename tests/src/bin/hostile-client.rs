//! A hostile (or merely dying) shmlink client as a separate process, for the
//! tests that need one: SIGKILL mid-stream, exit in the middle of a call, or
//! another uid (run under `setpriv`).
//!
//! ```text
//! hostile-client ADDR open SERVICE        open one session, print "PATH p", wait for stdin EOF
//! hostile-client ADDR hold SERVICE N      open N sessions, print "READY N", wait for stdin EOF
//! hostile-client ADDR reopen SERVICE      for each line on stdin (a ring capacity in bytes),
//!                                         open a session of SERVICE on this one connection
//!                                         and drop its fds at once (no Close), then print
//!                                         "PATH p" or "ERR name message"; exit at stdin EOF
//! hostile-client ADDR stream              open a sink session, print "PATH p", stream until killed
//! hostile-client ADDR close PATH          call Close; print "OK" or "ERR name message"
//! hostile-client ADDR register SERVICE [hold]
//!                                         call RegisterService; print "OK" or "ERR name message";
//!                                         with `hold`, keep the connection until stdin EOF
//! hostile-client ADDR counters PATH       read BytesToServer; print "OK n" or "ERR name message"
//! hostile-client ADDR register-path PREFIX N BYTES
//!                                         N RegisterService calls of PREFIXi, each with an
//!                                         object path of BYTES bytes; print "FIRST name bytes"
//!                                         (the first refusal, its text's length), then
//!                                         "DONE refused registered"
//! hostile-client ADDR vanish SERVICE      send OpenSession and exit without waiting
//! hostile-client ADDR vanish-known SERVICE  same, after a first call (credentials cached)
//! hostile-client ADDR trickle feed|drain park|spin N
//!                                         N sink sessions fed (or source sessions drained)
//!                                         one byte per 2 ms; print "PATH p" each, "READY N",
//!                                         trickle until stdin EOF
//! hostile-client ADDR huge name|options BYTES
//!                                         OpenSession calls with a huge argument in a loop,
//!                                         each on a new connection;
//!                                         print "READY error-name" after the first, "DONE n µs"
//!                                         (calls made, slowest call) at stdin EOF
//! hostile-client ADDR churn SERVICE CAP1 CAP2
//!                                         open and close sessions in a loop, the capacity
//!                                         alternating between CAP1 and CAP2; print "READY"
//!                                         after the first, "DONE opened refused" at stdin EOF
//! hostile-client ADDR refuse N            N pipelined OpenSession calls of an unknown service;
//!                                         print "DONE refused"
//! hostile-client ADDR memory ATTACK MODE N SIZE  run a memory attack (see `memory_attacks`),
//!                                         print "READY opened=.. refused=.. closed=..", wait for stdin EOF
//! hostile-client ADDR park open|ping BYTES N [C]
//!                                         on each of C fresh connections (default 1; their
//!                                         credentials unknown to the broker), N calls written
//!                                         at once: OpenSession of echo with a BYTES-long
//!                                         option value, or a Ping of the broker carrying
//!                                         BYTES bytes; the last byte of every connection's
//!                                         calls is written only once all the rest is, so that
//!                                         the bus delivers the last calls together; print
//!                                         "READY", at stdin EOF read the answers and print
//!                                         "DONE name=count ..." (error names, `ok`, `unanswered`)
//! hostile-client ADDR never-read open SERVICE N
//! hostile-client ADDR never-read list N [HOLD [C]]
//!                                         after one Ping (credentials known), N OpenSession
//!                                         calls of SERVICE (4 KiB rings), or N ListSessions
//!                                         calls on each of C connections (default 1; with HOLD
//!                                         echo sessions held first on another connection, to
//!                                         make each answer long), written at once; print
//!                                         "READY" and never read the socket; leave the bus at
//!                                         stdin EOF
//! hostile-client ADDR provided-flood SERVICE BYTES N
//!                                         after one Ping, N OpenSession calls of SERVICE (a
//!                                         provider's) whose options carry a BYTES-long string
//!                                         (key `label`), written at once; print "READY", at
//!                                         stdin EOF read the answers and print "DONE ..." as park
//! ```
//! Exit status: 0 on success, 2 when the daemon refused, 1 on a local failure.

use shmlink_interfaces::{member, BUS_NAME, SESSION_INTERFACE};
use shmlink_tests::attacks::{self, Huge, Trickle};
use shmlink_tests::hostile::{self, RawSession};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn refused(e: &dbus::Error) -> ! {
    println!(
        "ERR {} {}",
        e.name().unwrap_or("?"),
        e.message().unwrap_or("")
    );
    std::process::exit(2)
}

/// How long an attacker waits for the answers to its pipelined calls.
const REPLIES_DEADLINE: Duration = Duration::from_secs(5);

fn usage_error(usage: &str) -> ! {
    eprintln!("hostile-client: {usage}");
    std::process::exit(1)
}

fn wait_for_stdin_eof() {
    let mut buf = [0u8; 64];
    let mut stdin = std::io::stdin();
    while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
}

/// A flag that becomes true when stdin reaches EOF (read on a thread).
fn stdin_closed() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        wait_for_stdin_eof();
        f.store(true, Ordering::SeqCst);
    });
    flag
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: hostile-client ADDR COMMAND ARGS... (see the source)");
        std::process::exit(1);
    }
    let addr = &args[0];
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("echo");
    let conn = match hostile::connect(addr) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hostile-client: cannot connect to {addr}: {e}");
            std::process::exit(1)
        }
    };
    let mut out = std::io::stdout();
    match args[1].as_str() {
        "open" => {
            let s = match RawSession::open_on(conn, arg(2), hostile::capacity_option(4096)) {
                Ok(s) => s,
                Err(e) => {
                    println!("ERR {e}");
                    std::process::exit(2)
                }
            };
            let _ = writeln!(out, "PATH {}", s.path);
            let _ = out.flush();
            wait_for_stdin_eof();
        }
        "hold" => {
            let n: usize = arg(3).parse().unwrap_or(1);
            // One pipelined batch; the replies (and their fds) stay alive until we die.
            let replies = hostile::open_many(conn.channel(), arg(2), 64, n);
            let mut held = Vec::with_capacity(n);
            for r in replies {
                match r {
                    Ok(r) => held.push(r),
                    Err(e) => {
                        println!("ERR {e}");
                        std::process::exit(2)
                    }
                }
            }
            let _ = writeln!(out, "READY {}", held.len());
            let _ = out.flush();
            wait_for_stdin_eof();
        }
        "reopen" => {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                let capacity: u64 = line.trim().parse().unwrap_or(4096);
                let reply =
                    hostile::open_session_raw(&conn, arg(2), hostile::capacity_option(capacity));
                match reply {
                    Ok(reply) => {
                        let reply = shmlink_interfaces::OpenSessionReply::from(reply);
                        // The client is gone from this session (its hang-up
                        // end closed with the rest) but stays on the bus.
                        drop(reply.fds);
                        let _ = writeln!(out, "PATH {}", reply.session);
                    }
                    Err(e) => {
                        let _ = writeln!(
                            out,
                            "ERR {} {}",
                            e.name().unwrap_or("?"),
                            e.message().unwrap_or("")
                        );
                    }
                }
                let _ = out.flush();
            }
        }
        "hold-some" => {
            let n: usize = arg(3).parse().unwrap_or(1);
            // Like "hold", but keeps what was granted past the first refusal.
            let replies = hostile::open_many(conn.channel(), arg(2), 64, n);
            let mut held = Vec::with_capacity(n);
            let mut refused = None;
            for r in replies {
                match r {
                    Ok(r) => held.push(r),
                    Err(e) => refused = refused.or(Some(e)),
                }
            }
            let refused = refused.unwrap_or_else(|| "none".into());
            let _ = writeln!(out, "HELD {} REFUSED {refused}", held.len());
            let _ = out.flush();
            wait_for_stdin_eof();
        }
        "stream" => {
            let mut s = match RawSession::open_on(conn, "sink", hostile::capacity_option(16 * 1024))
            {
                Ok(s) => s,
                Err(e) => {
                    println!("ERR {e}");
                    std::process::exit(2)
                }
            };
            let _ = writeln!(out, "PATH {}", s.path);
            let _ = out.flush();
            let block = shmlink_tests::payload(7, 3000);
            loop {
                if let Err(e) = s.send_message(&block, Duration::from_secs(60)) {
                    eprintln!("hostile-client: stream stopped: {e}");
                    std::process::exit(1);
                }
            }
        }
        "close" => {
            let r: Result<(), dbus::Error> = conn
                .with_proxy(BUS_NAME, arg(2), hostile::CALL_TIMEOUT)
                .method_call(SESSION_INTERFACE, member::CLOSE, ());
            match r {
                Ok(()) => println!("OK"),
                Err(e) => refused(&e),
            }
        }
        "register" => {
            let r: Result<(), dbus::Error> = conn
                .with_proxy(
                    BUS_NAME,
                    shmlink_interfaces::BROKER_PATH,
                    hostile::CALL_TIMEOUT,
                )
                .method_call(
                    shmlink_interfaces::BROKER_INTERFACE,
                    member::REGISTER_SERVICE,
                    (
                        arg(2),
                        dbus::Path::from("/com/example/Provider"),
                        dbus::arg::PropMap::new(),
                    ),
                );
            match r {
                Ok(()) => println!("OK"),
                Err(e) => refused(&e),
            }
            if args.get(3).map(String::as_str) == Some("hold") {
                let _ = std::io::stdin().read_to_end(&mut Vec::new());
            }
        }
        "register-path" => {
            let n: usize = arg(3).parse().unwrap_or(32);
            let bytes: usize = arg(4).parse().unwrap_or(4 << 20);
            let object = format!("/{}", "p".repeat(bytes.saturating_sub(1)));
            let broker = conn.with_proxy(
                BUS_NAME,
                shmlink_interfaces::BROKER_PATH,
                hostile::CALL_TIMEOUT,
            );
            let (mut n_refused, mut n_registered) = (0u64, 0u64);
            for i in 0..n {
                let r: Result<(), dbus::Error> = broker.method_call(
                    shmlink_interfaces::BROKER_INTERFACE,
                    member::REGISTER_SERVICE,
                    (
                        format!("{}{i}", arg(2)),
                        dbus::Path::from(object.as_str()),
                        dbus::arg::PropMap::new(),
                    ),
                );
                match r {
                    Ok(()) => n_registered += 1,
                    Err(e) => {
                        if n_refused == 0 {
                            let _ = writeln!(
                                out,
                                "FIRST {} {}",
                                e.name().unwrap_or("?"),
                                e.message().unwrap_or("").len()
                            );
                        }
                        n_refused += 1;
                    }
                }
            }
            println!("DONE {n_refused} {n_registered}");
        }
        "counters" => {
            use dbus::blocking::stdintf::org_freedesktop_dbus::Properties;
            let r: Result<u64, dbus::Error> = conn
                .with_proxy(BUS_NAME, arg(2), hostile::CALL_TIMEOUT)
                .get(SESSION_INTERFACE, member::BYTES_TO_SERVER);
            match r {
                Ok(n) => println!("OK {n}"),
                Err(e) => refused(&e),
            }
        }
        "vanish" | "vanish-known" => {
            if args[1] == "vanish-known" {
                let r: Result<(), dbus::Error> = conn
                    .with_proxy(
                        BUS_NAME,
                        shmlink_interfaces::BROKER_PATH,
                        hostile::CALL_TIMEOUT,
                    )
                    .method_call("org.freedesktop.DBus.Peer", "Ping", ());
                if let Err(e) = r {
                    refused(&e);
                }
            }
            if let Err(e) = hostile::send_open_and_forget(&conn, arg(2)) {
                eprintln!("hostile-client: {e}");
                std::process::exit(1);
            }
            // Leave in the middle of the call: no reply is read, nothing is cleaned up.
            std::process::exit(0);
        }
        "trickle" => {
            let spin = arg(3) == "spin";
            let n: usize = arg(4).parse().unwrap_or(1);
            drop(conn);
            let t = if arg(2) == "drain" {
                Trickle::drain(addr, n, spin, 1 << 20)
            } else {
                Trickle::feed(addr, n, spin)
            };
            let mut t = match t {
                Ok(t) => t,
                Err(e) => {
                    println!("ERR {e}");
                    std::process::exit(2)
                }
            };
            for s in &t.sessions {
                let _ = writeln!(out, "PATH {}", s.path);
            }
            let _ = writeln!(out, "READY {}", t.sessions.len());
            let _ = out.flush();
            let done = stdin_closed();
            while !done.load(Ordering::SeqCst) {
                t.tick();
                // The attack's pace: a byte every 2 ms.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        "huge" => {
            let bytes: usize = arg(3).parse().unwrap_or(16 << 20);
            let what = if arg(2) == "options" {
                Huge::OptionValue(bytes)
            } else {
                Huge::ServiceName(bytes)
            };
            let done = stdin_closed();
            let mut n = 0u64;
            let mut slowest = Duration::ZERO;
            drop(conn);
            while !done.load(Ordering::SeqCst) {
                // A new connection per call, as a process per call would
                // have: the daemon learns each one's credentials anew.
                let conn = match hostile::connect(addr) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("hostile-client: cannot connect to {addr}: {e}");
                        std::process::exit(1)
                    }
                };
                let (name, took) = attacks::huge_call(&conn, what);
                if n == 0 {
                    let _ = writeln!(out, "READY {name}");
                    let _ = out.flush();
                }
                slowest = slowest.max(took);
                n += 1;
            }
            println!("DONE {n} {}", slowest.as_micros());
        }
        "churn" => {
            let caps: [u64; 2] = [
                arg(3).parse().unwrap_or(4096),
                arg(4).parse().unwrap_or(1 << 20),
            ];
            let done = stdin_closed();
            let (mut n_opened, mut n_refused) = (0u64, 0u64);
            while !done.load(Ordering::SeqCst) {
                let options = hostile::capacity_option(caps[(n_opened + n_refused) as usize % 2]);
                match hostile::open_session_raw(&conn, arg(2), options) {
                    Ok(reply) => {
                        let reply: shmlink_interfaces::OpenSessionReply = reply.into();
                        // Closed while its fds are held: dropping them
                        // first would end the session (a hang-up) before Close.
                        let closed: Result<(), dbus::Error> = conn
                            .with_proxy(BUS_NAME, &reply.session, hostile::CALL_TIMEOUT)
                            .method_call(SESSION_INTERFACE, member::CLOSE, ());
                        drop(reply);
                        if let Err(e) = closed {
                            refused(&e);
                        }
                        n_opened += 1;
                    }
                    Err(_) => n_refused += 1,
                }
                if n_opened + n_refused == 1 {
                    let _ = writeln!(out, "READY");
                    let _ = out.flush();
                }
            }
            println!("DONE {n_opened} {n_refused}");
        }
        "refuse" => {
            let n: usize = arg(2).parse().unwrap_or(1000);
            let replies = hostile::open_many(conn.channel(), "no-such-service", 4096, n);
            println!("DONE {}", replies.iter().filter(|r| r.is_err()).count());
        }
        "memory" => {
            drop(conn);
            let attack = shmlink_tests::memory_attacks::Attack::parse(arg(2));
            let n = arg(4).parse::<usize>().ok();
            let size = arg(5).parse::<u64>().ok();
            let (Some(attack), Some(n), Some(size)) = (attack, n, size) else {
                eprintln!("hostile-client: memory ATTACK MODE N SIZE");
                std::process::exit(1);
            };
            match shmlink_tests::memory_attacks::run(addr, attack, arg(3), n, size) {
                Ok(held) => {
                    let _ = writeln!(out, "{}", held.summary());
                    for r in held.refused.iter().take(1) {
                        let _ = writeln!(out, "REFUSED {r}");
                    }
                    let _ = out.flush();
                    wait_for_stdin_eof();
                }
                Err(e) => {
                    eprintln!("hostile-client: {e}");
                    std::process::exit(1);
                }
            }
        }
        "park" | "never-read" | "provided-flood" => {
            drop(conn);
            let usage = "park open|ping BYTES N [C] | never-read open SERVICE N | never-read list N [HOLD [C]] | provided-flood SERVICE BYTES N";
            let number = |i: usize| arg(i).parse::<usize>().ok();
            // An optional count, `default` if absent.
            let optional = |i: usize, default: usize| match args.get(i) {
                Some(_) => number(i).unwrap_or_else(|| usage_error(usage)),
                None => default,
            };
            // Built one at a time as they are written: N huge calls need
            // not fit in memory together.
            type Calls = Box<dyn Iterator<Item = dbus::Message>>;
            let opens = |service: &str, options: dbus::arg::PropMap, n: usize| -> Calls {
                let service = service.to_owned();
                Box::new((0..n).map(move |_| {
                    let options = options
                        .iter()
                        .map(|(k, v)| (k.clone(), dbus::arg::Variant(v.0.box_clone())))
                        .collect();
                    attacks::open_call(&service, options)
                }))
            };
            let huge = |bytes: usize| attacks::huge_option("label", bytes);
            // Per connection: its calls; whether the broker learns our
            // credentials first; whether the answers are read at stdin EOF.
            let (calls, introduce, read): (Vec<Calls>, bool, bool) =
                match (args[1].as_str(), arg(2)) {
                    ("park", kind @ ("open" | "ping")) => match (number(3), number(4)) {
                        (Some(bytes), Some(n)) => {
                            let calls = (0..optional(5, 1))
                                .map(|_| -> Calls {
                                    if kind == "ping" {
                                        Box::new((0..n).map(move |_| attacks::ping_call(bytes)))
                                    } else {
                                        opens("echo", huge(bytes), n)
                                    }
                                })
                                .collect();
                            (calls, false, true)
                        }
                        _ => usage_error(usage),
                    },
                    ("never-read", "open") => match number(4) {
                        Some(n) => (
                            vec![opens(arg(3), hostile::capacity_option(4096), n)],
                            true,
                            false,
                        ),
                        None => usage_error(usage),
                    },
                    ("never-read", "list") => match number(3) {
                        Some(n) => {
                            let hold = optional(4, 0);
                            if hold > 0 {
                                // Opened as an honest client would (their
                                // replies carry no fds).
                                let bus = shmlink::Bus::Address(addr.clone());
                                let held = shmlink::Client::connect(&bus).and_then(|c| {
                                    let s = (0..hold)
                                        .map(|_| c.session("echo").capacity(4096).open())
                                        .collect::<Result<Vec<_>, _>>()?;
                                    Ok((c, s))
                                });
                                match held {
                                    // They live as long as this process.
                                    Ok(held) => std::mem::forget(held),
                                    Err(e) => {
                                        println!("ERR {e}");
                                        std::process::exit(2)
                                    }
                                }
                            }
                            let calls = (0..optional(5, 1))
                                .map(|_| -> Calls {
                                    Box::new((0..n).map(|_| attacks::list_call()))
                                })
                                .collect();
                            (calls, true, false)
                        }
                        None => usage_error(usage),
                    },
                    ("provided-flood", _) => match (number(3), number(4)) {
                        (Some(bytes), Some(n)) => (vec![opens(arg(2), huge(bytes), n)], true, true),
                        _ => usage_error(usage),
                    },
                    _ => usage_error(usage),
                };
            let fail = |e: String| -> ! {
                eprintln!("hostile-client: {e}");
                std::process::exit(1)
            };
            // Every connection is known to the broker (if it is to be)
            // before any of them sends its calls.
            let mut pipelines = Vec::with_capacity(calls.len());
            for _ in 0..calls.len() {
                let p = attacks::Pipeline::connect(addr).unwrap_or_else(|e| fail(e));
                if introduce {
                    if let Err(e) = p.introduce() {
                        println!("ERR {e}");
                        std::process::exit(2)
                    }
                }
                pipelines.push(p);
            }
            for (p, calls) in pipelines.iter_mut().zip(calls) {
                p.send(calls, true).unwrap_or_else(|e| fail(e));
            }
            for p in &mut pipelines {
                p.release().unwrap_or_else(|e| fail(e));
            }
            let _ = writeln!(out, "READY");
            let _ = out.flush();
            wait_for_stdin_eof();
            if read {
                let mut counts = std::collections::BTreeMap::new();
                for p in &mut pipelines {
                    for (name, n) in p.replies(REPLIES_DEADLINE) {
                        *counts.entry(name).or_insert(0) += n;
                    }
                }
                println!("{}", attacks::done_line(&counts));
            }
        }
        other => {
            eprintln!("hostile-client: unknown command {other:?}");
            std::process::exit(1);
        }
    }
}
