//! A deliberately malicious shmlink client, for the tests only.
//!
//! [`RawSession`] calls `OpenSession` over raw D-Bus, maps both rings itself
//! and speaks the ring protocol by hand (offset 0 of each memfd: the 8-byte
//! native-endian count of filled bytes; data from offset 64), so that a test
//! can follow the protocol honestly or break any rule of it at any moment:
//! corrupt the count, change it while the daemon reads, announce impossible
//! frames, flip `O_NONBLOCK` on the shared eventfds, saturate their
//! counters, close fds early, never read, or write to the hang-up socket.
//!
//! [`ClosedWatcher`] listens for `SessionClosed` on its own connection, and
//! [`Honest`] streams verified data through `echo` while an attack runs.

use dbus::arg::{OwnedFd, PropMap};
use dbus::blocking::Connection;
use dbus::channel::{Channel, Sender as _};
use dbus::Message;
use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use rustix::net::SendFlags;
use shmlink_endpoint::frame::{self, Decoder, Item};
use shmlink_endpoint::sys;
use shmlink_interfaces::{member, param, BROKER_INTERFACE, BROKER_PATH, BUS_NAME};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes shmem-ipc reserves at the start of each ring's memfd (the count lives at offset 0).
pub const RING_HEADER: usize = shmlink_interfaces::RING_HEADER as usize;
/// The largest value an eventfd counter can hold.
pub const EVENTFD_MAX: u64 = 0xffff_ffff_ffff_fffe;
/// Timeout of the raw D-Bus calls.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The reply of `OpenSession`, in wire order (the contract's type).
pub use shmlink_interfaces::OpenSessionArgs as OpenReply;

/// Connects to the bus at `address` as a fresh, registered connection.
pub fn connect(address: &str) -> Result<Connection, dbus::Error> {
    let mut ch = Channel::open_private(address)?;
    ch.register()?;
    Ok(Connection::from(ch))
}

/// A memfd mapped shared, read and write; unmapped on drop.
///
/// A raw mapping: the daemon may change any byte at any time, so every access
/// goes through raw pointers or atomics and no `&[u8]` into it is ever formed.
struct Mapping(MmapRaw);

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Mapping> {
        MmapOptions::new()
            .len(len)
            .map_raw(fd.as_raw_fd())
            .map(Mapping)
    }

    /// The first byte of the mapping.
    fn base(&self) -> *mut u8 {
        self.0.as_mut_ptr()
    }

    fn count(&self) -> &AtomicUsize {
        // SAFETY: the mapping is page-aligned, at least 64 bytes long and lives as
        // long as `self`; the count is an atomic both sides access atomically.
        unsafe { &*(self.base() as *const AtomicUsize) }
    }
}

/// A handle on a ring's shared count, usable from another thread (e.g. to hammer it).
#[derive(Clone)]
pub struct CountHandle(Arc<Mapping>);

impl CountHandle {
    /// Stores `v` as the ring's count.
    pub fn set(&self, v: usize) {
        self.0.count().store(v, Ordering::Release);
    }
    /// The ring's count.
    pub fn get(&self) -> usize {
        self.0.count().load(Ordering::Acquire)
    }
}

/// One ring as the hostile client sees it: the raw mapping, the fds, and our own position.
pub struct RawRing {
    /// Capacity the daemon advertised.
    pub capacity: u64,
    /// The memfd (None once closed early).
    pub memfd: Option<OwnedFd>,
    /// eventfd the writer signals when the ring goes from empty to non-empty.
    pub empty_signal: Option<OwnedFd>,
    /// eventfd the reader signals when the ring goes from full to not full.
    pub full_signal: Option<OwnedFd>,
    map: Option<Arc<Mapping>>,
    len: usize,
    pos: usize,
}

impl RawRing {
    fn new(
        capacity: u64,
        memfd: OwnedFd,
        empty_signal: OwnedFd,
        full_signal: OwnedFd,
    ) -> std::io::Result<RawRing> {
        let size = match sys::fd_kind(memfd.as_fd())? {
            sys::FdKind::Memfd { size, .. } => size as usize,
            other => return Err(std::io::Error::other(format!("not a memfd: {other:?}"))),
        };
        let map = Mapping::new(memfd.as_fd(), size)?;
        Ok(RawRing {
            capacity,
            memfd: Some(memfd),
            empty_signal: Some(empty_signal),
            full_signal: Some(full_signal),
            map: Some(Arc::new(map)),
            len: size - RING_HEADER,
            pos: 0,
        })
    }

    fn map(&self) -> &Mapping {
        self.map.as_ref().expect("ring still mapped")
    }

    /// Data bytes of the ring.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the ring holds no data bytes at all (never, for a mapped ring).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A handle on the shared count.
    pub fn count_handle(&self) -> CountHandle {
        CountHandle(self.map.clone().expect("ring still mapped"))
    }

    /// The shared count of filled bytes.
    pub fn count(&self) -> usize {
        self.map().count().load(Ordering::Acquire)
    }

    /// Overwrites the shared count.
    pub fn set_count(&self, v: usize) {
        self.map().count().store(v, Ordering::Release);
    }

    /// As the writer: copies as much of `bytes` as fits, publishes it and
    /// signals the reader on empty→non-empty, as shmem-ipc would. Returns how much was written.
    pub fn write(&mut self, bytes: &[u8]) -> usize {
        let count = self.count();
        if count > self.len {
            return 0;
        }
        let n = (self.len - count).min(bytes.len());
        let mut done = 0;
        while done < n {
            let k = (n - done).min(self.len - self.pos);
            // SAFETY: `pos + k <= len`, so the destination lies inside the data
            // area of our mapping; the source is our own slice.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes[done..].as_ptr(),
                    self.map().base().add(RING_HEADER + self.pos),
                    k,
                )
            };
            done += k;
            self.pos = (self.pos + k) % self.len;
        }
        let prev = self.map().count().fetch_add(n, Ordering::AcqRel);
        if prev == 0 && n > 0 {
            if let Some(fd) = &self.empty_signal {
                let _ = signal(fd.as_fd());
            }
        }
        n
    }

    /// As the reader: copies out up to `max` bytes, releases them and signals
    /// the writer on full→not-full. Returns the bytes read.
    pub fn read(&mut self, max: usize) -> Vec<u8> {
        let count = self.count();
        if count > self.len {
            return Vec::new();
        }
        let n = count.min(max);
        let mut out = vec![0u8; n];
        let mut done = 0;
        while done < n {
            let k = (n - done).min(self.len - self.pos);
            // SAFETY: `pos + k <= len` keeps the source inside our mapping's data
            // area; we copy bytes out and never form a reference into it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.map().base().add(RING_HEADER + self.pos),
                    out[done..].as_mut_ptr(),
                    k,
                )
            };
            done += k;
            self.pos = (self.pos + k) % self.len;
        }
        let prev = self.map().count().fetch_sub(n, Ordering::AcqRel);
        if prev >= self.len && n > 0 {
            if let Some(fd) = &self.full_signal {
                let _ = signal(fd.as_fd());
            }
        }
        out
    }

    /// Our position in the ring (next byte to write or read).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The data byte at `i` (modulo the ring length), read without a reference.
    pub fn data_byte(&self, i: usize) -> u8 {
        // SAFETY: `i % len < len` keeps the byte inside our mapping's data area.
        unsafe {
            self.map()
                .base()
                .add(RING_HEADER + i % self.len)
                .read_volatile()
        }
    }

    /// Overwrites the data byte at `i` (modulo the ring length).
    pub fn set_data_byte(&self, i: usize, v: u8) {
        // SAFETY: as in `data_byte`.
        unsafe {
            self.map()
                .base()
                .add(RING_HEADER + i % self.len)
                .write_volatile(v)
        }
    }

    /// Unmaps the ring and closes its memfd and eventfds.
    pub fn close_all(&mut self) {
        self.map = None;
        self.memfd = None;
        self.empty_signal = None;
        self.full_signal = None;
    }

    /// The eventfds of this ring that are still open.
    pub fn eventfds(&self) -> Vec<BorrowedFd<'_>> {
        [&self.empty_signal, &self.full_signal]
            .into_iter()
            .flatten()
            .map(|f| f.as_fd())
            .collect()
    }
}

/// Adds 1 to an eventfd (non-blocking: a full counter is reported, not waited on).
pub fn signal(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    sys::eventfd_signal(fd)
}

/// Saturates an eventfd's counter at [`EVENTFD_MAX`] without blocking.
pub fn flood(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    sys::eventfd_drain(fd)?;
    // The counter is 0 after the drain, so the write cannot block (unless
    // another party raced us, which only we have).
    eventfd_add(fd, EVENTFD_MAX)
}

/// Adds `v` to an eventfd's counter with one 8-byte write.
fn eventfd_add(fd: BorrowedFd<'_>, v: u64) -> std::io::Result<()> {
    match rustix::io::write(fd, &v.to_ne_bytes())? {
        8 => Ok(()),
        n => Err(std::io::Error::other(format!("eventfd write of {n} bytes"))),
    }
}

/// Sets or clears `O_NONBLOCK` on the open file description behind `fd`
/// (shared with the daemon, which is the point).
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> std::io::Result<()> {
    let mut flags = fcntl_getfl(fd)?;
    flags.set(OFlags::NONBLOCK, on);
    Ok(fcntl_setfl(fd, flags)?)
}

/// Whether `O_NONBLOCK` is set on the open file description behind `fd`.
pub fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
    fcntl_getfl(fd).is_ok_and(|f| f.contains(OFlags::NONBLOCK))
}

/// A session opened by the hostile client, with the rings mapped by hand.
pub struct RawSession {
    /// The bus connection that opened it (None once dropped).
    pub conn: Option<Connection>,
    /// The session's object path.
    pub path: String,
    /// Client→server ring (we write).
    pub to_server: RawRing,
    /// Server→client ring (we read).
    pub to_client: RawRing,
    /// Our end of the hang-up socket (None once closed).
    pub hangup: Option<OwnedFd>,
    /// The session's maximum message size.
    pub max_message: u64,
    inbuf: Vec<u8>,
    decoder: Decoder,
}

/// Calls `OpenSession(service, options)` on `conn` and returns the raw reply.
pub fn open_session_raw(
    conn: &Connection,
    service: &str,
    options: PropMap,
) -> Result<OpenReply, dbus::Error> {
    conn.with_proxy(BUS_NAME, BROKER_PATH, CALL_TIMEOUT)
        .method_call(BROKER_INTERFACE, member::OPEN_SESSION, (service, options))
}

/// Options with just a capacity.
pub fn capacity_option(capacity: u64) -> PropMap {
    let mut m = PropMap::new();
    m.insert(
        shmlink_interfaces::option::CAPACITY.into(),
        dbus::arg::Variant(Box::new(capacity)),
    );
    m
}

impl RawSession {
    /// Opens a session with `service` on a new connection to `address` and maps its rings.
    pub fn open(address: &str, service: &str, capacity: u64) -> Result<RawSession, String> {
        let conn = connect(address).map_err(|e| format!("connect: {e}"))?;
        Self::open_on(conn, service, capacity_option(capacity))
    }

    /// Opens a session on an existing connection and maps its rings.
    pub fn open_on(
        conn: Connection,
        service: &str,
        options: PropMap,
    ) -> Result<RawSession, String> {
        let reply = open_session_raw(&conn, service, options)
            .map_err(|e| format!("{}: {}", e.name().unwrap_or("?"), e.message().unwrap_or("")))?;
        let shmlink_interfaces::OpenSessionReply {
            session: path,
            fds,
            parameters: params,
        } = reply.into();
        let max_message = params
            .get(param::MAX_MESSAGE)
            .and_then(|v| v.0.as_u64())
            .unwrap_or(0);
        let ring = |r: shmlink_endpoint::RingFds| {
            RawRing::new(r.capacity, r.memfd, r.empty_signal, r.full_signal)
                .map_err(|e| format!("map: {e}"))
        };
        let to_server = ring(fds.to_server)?;
        let to_client = ring(fds.to_client)?;
        Ok(RawSession {
            conn: Some(conn),
            path: path.to_string(),
            to_server,
            to_client,
            hangup: Some(fds.hangup),
            max_message,
            inbuf: Vec::new(),
            decoder: Decoder::new(u32::try_from(max_message).unwrap_or(u32::MAX)),
        })
    }

    /// Writes all of `bytes` into the client→server ring, waiting for room
    /// (on the space eventfd, with a deadline).
    pub fn write_all(&mut self, mut bytes: &[u8], deadline: Duration) -> Result<(), String> {
        let end = Instant::now() + deadline;
        while !bytes.is_empty() {
            let n = self.to_server.write(bytes);
            bytes = &bytes[n..];
            if n == 0 {
                self.wait(true, end)?;
            }
        }
        Ok(())
    }

    fn wait(&self, for_room: bool, end: Instant) -> Result<(), String> {
        let ring = if for_room {
            &self.to_server
        } else {
            &self.to_client
        };
        let fd = if for_room {
            &ring.full_signal
        } else {
            &ring.empty_signal
        };
        let fd = fd.as_ref().ok_or("eventfd closed")?;
        if Instant::now() >= end {
            return Err(format!(
                "timed out waiting for {}",
                if for_room { "room" } else { "data" }
            ));
        }
        // Wake at least every 10 ms: the count is the truth, the eventfd only a hint.
        let _ = sys::poll_readable(
            &[fd.as_fd()],
            Some((Instant::now() + Duration::from_millis(10)).min(end)),
        );
        let _ = sys::eventfd_drain(fd.as_fd());
        Ok(())
    }

    /// Sends one well-formed message frame.
    pub fn send_message(&mut self, msg: &[u8], deadline: Duration) -> Result<(), String> {
        let mut f = frame::encode_header(frame::KIND_MESSAGE, msg.len() as u32).to_vec();
        f.extend_from_slice(msg);
        self.write_all(&f, deadline)
    }

    /// Sends a frame header only (any length and kind, however impossible).
    pub fn send_header(&mut self, kind: u32, len: u32) -> usize {
        self.to_server.write(&frame::encode_header(kind, len))
    }

    /// Receives the next message (None at end of stream), waiting with a deadline.
    pub fn recv_message(&mut self, deadline: Duration) -> Result<Option<Vec<u8>>, String> {
        let end = Instant::now() + deadline;
        loop {
            while !self.inbuf.is_empty() {
                let (used, item) = self
                    .decoder
                    .decode(&self.inbuf[..])
                    .map_err(|e| e.to_string())?;
                self.inbuf.drain(..used);
                match item {
                    Some(Item::Message(m)) => return Ok(Some(m)),
                    Some(Item::End) => return Ok(None),
                    None if used == 0 => break,
                    None => {}
                }
            }
            let got = self.to_client.read(1 << 20);
            if got.is_empty() {
                self.wait(false, end)?;
            }
            self.inbuf.extend_from_slice(&got);
        }
    }

    /// Wakes the daemon's reader of the client→server ring without writing data.
    pub fn poke(&self) {
        if let Some(fd) = &self.to_server.empty_signal {
            let _ = signal(fd.as_fd());
        }
    }

    /// All four eventfds still open.
    pub fn eventfds(&self) -> Vec<BorrowedFd<'_>> {
        let mut v = self.to_server.eventfds();
        v.extend(self.to_client.eventfds());
        v
    }

    /// Writes `bytes` into the hang-up socket, which must stay silent.
    pub fn write_hangup(&self, bytes: &[u8]) -> std::io::Result<usize> {
        let fd = self
            .hangup
            .as_ref()
            .ok_or_else(|| std::io::Error::other("hang-up closed"))?;
        Ok(rustix::net::send(fd, bytes, SendFlags::NOSIGNAL)?)
    }

    /// Calls `Close` on the session.
    pub fn close(&self) -> Result<(), dbus::Error> {
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(|| dbus::Error::new_failed("connection dropped"))?;
        conn.with_proxy(BUS_NAME, self.path.as_str(), CALL_TIMEOUT)
            .method_call(shmlink_interfaces::SESSION_INTERFACE, member::CLOSE, ())
    }
}

/// A thread that keeps changing a ring's count between two values until stopped.
pub struct Hammer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Hammer {
    /// Starts alternating `count` between `a` and `b` as fast as possible.
    pub fn start(count: CountHandle, a: usize, b: usize) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                count.set(if n.is_multiple_of(2) { a } else { b });
                n += 1;
            }
            n
        });
        Hammer {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread; returns how many times it stored the count.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("hammer thread"))
            .unwrap_or(0)
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `OpenSession` and returns at once without reading the reply, for a
/// process that exits in the middle of the call.
pub fn send_open_and_forget(conn: &Connection, service: &str) -> Result<(), String> {
    let msg = Message::new_method_call(
        BUS_NAME,
        BROKER_PATH,
        BROKER_INTERFACE,
        member::OPEN_SESSION,
    )
    .map_err(|e| e.to_string())?
    .append2(service, PropMap::new());
    conn.send(msg).map_err(|_| "send failed".to_string())?;
    conn.channel().flush();
    Ok(())
}

/// Listens for `SessionClosed` on its own connection and remembers every reason.
pub struct ClosedWatcher {
    channel: Channel,
    seen: HashMap<String, String>,
}

impl ClosedWatcher {
    /// Subscribes to `SessionClosed` on the bus at `address`.
    pub fn new(address: &str) -> ClosedWatcher {
        let mut channel = Channel::open_private(address).expect("watcher connects");
        channel.register().expect("watcher registers");
        let rule = format!(
            "type='signal',interface='{BROKER_INTERFACE}',member='{}'",
            member::SESSION_CLOSED
        );
        let m = Message::new_method_call(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "AddMatch",
        )
        .expect("AddMatch message")
        .append1(rule);
        channel
            .send_with_reply_and_block(m, CALL_TIMEOUT)
            .expect("AddMatch");
        ClosedWatcher {
            channel,
            seen: HashMap::new(),
        }
    }

    fn pump(&mut self, timeout: Duration) {
        let _ = self.channel.read_write(Some(timeout));
        while let Some(msg) = self.channel.pop_message() {
            if msg.member().is_some_and(|m| &*m == member::SESSION_CLOSED) {
                if let Ok((path, reason)) = msg.read2::<dbus::Path, String>() {
                    self.seen.insert(path.to_string(), reason);
                }
            }
        }
    }

    /// Waits up to `deadline` for `SessionClosed` about `path`; returns its reason.
    pub fn wait_for(&mut self, path: &str, deadline: Duration) -> Option<String> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(r) = self.seen.get(path) {
                return Some(r.clone());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.pump(left.min(Duration::from_millis(100)));
        }
    }

    /// Reasons seen so far, by path.
    pub fn seen(&mut self) -> &HashMap<String, String> {
        self.pump(Duration::ZERO);
        &self.seen
    }
}

/// An honest client streaming verified messages through `echo` on its own
/// connection until stopped.
pub struct Honest {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<u64, String>>>,
}

impl Honest {
    /// Starts streaming on the bus `bus`: message `n` is `payload(n, ...)`, and
    /// every echoed message must come back identical within 10 s.
    pub fn start(bus: shmlink::Bus) -> Honest {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), rounds.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<u64, String> {
            let client = shmlink::Client::connect(&bus).map_err(|e| e.to_string())?;
            let mut session = client
                .session("echo")
                .capacity(16 * 1024)
                .timeout(Duration::from_secs(10))
                .open()
                .map_err(|e| e.to_string())?;
            let _ = ready_tx.send(());
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                let m = crate::payload(n, 1000 + (n as usize * 7919) % 30_000);
                session
                    .send(&m)
                    .map_err(|e| format!("honest send {n}: {e}"))?;
                let back = session
                    .recv()
                    .map_err(|e| format!("honest recv {n}: {e}"))?;
                if back.as_deref() != Some(&m[..]) {
                    return Err(format!("honest message {n} came back different"));
                }
                n += 1;
                r.store(n, Ordering::SeqCst);
            }
            session.close().map_err(|e| format!("honest close: {e}"))?;
            Ok(n)
        });
        let _ = ready_rx.recv_timeout(crate::DEADLINE);
        Honest {
            stop,
            rounds,
            thread: Some(thread),
        }
    }

    /// Messages echoed and verified so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    /// Waits until at least `more` further rounds complete; false if it stalls for `deadline`.
    pub fn progresses(&self, more: u64, deadline: Duration) -> bool {
        let start = self.rounds();
        crate::wait_until(deadline, || self.rounds() >= start + more)
    }

    /// Stops and returns the number of verified rounds; panics on any error.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.take().expect("honest thread");
        match t.join().expect("honest thread panicked") {
            Ok(n) => n,
            Err(e) => panic!("honest client failed: {e}"),
        }
    }
}

impl Drop for Honest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `hostile-client` binary cargo built for this test run.
pub fn hostile_binary() -> std::path::PathBuf {
    let d = crate::daemon_binary();
    let b = d.with_file_name("hostile-client");
    assert!(
        b.is_file(),
        "{} missing (run the tests with `cargo test --workspace`)",
        b.display()
    );
    b
}

/// Sends all `msgs` at once on `channel`, then collects their replies (in
/// order), so that thousands of calls cost one round trip each way.
pub fn pipelined_calls(channel: &Channel, msgs: Vec<Message>) -> Vec<Result<Message, String>> {
    let mut serials = Vec::with_capacity(msgs.len());
    for m in msgs {
        serials.push(channel.send(m).expect("queue a call"));
    }
    channel.flush();
    let mut replies: HashMap<u32, Result<Message, String>> = HashMap::new();
    let end = Instant::now() + CALL_TIMEOUT;
    while replies.len() < serials.len() {
        let left = end.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no reply to {} of {} pipelined calls",
            serials.len() - replies.len(),
            serials.len()
        );
        let Ok(Some(mut msg)) = channel.blocking_pop_message(left) else {
            continue;
        };
        let Some(serial) = msg.get_reply_serial() else {
            continue;
        };
        let r = match msg.msg_type() {
            dbus::MessageType::Error => {
                let text = msg.get1::<String>().unwrap_or_default();
                let name = msg
                    .as_result()
                    .err()
                    .and_then(|e| e.name().map(str::to_owned))
                    .unwrap_or_default();
                Err(format!("{name}: {text}"))
            }
            _ => Ok(msg),
        };
        replies.insert(serial, r);
    }
    serials
        .into_iter()
        .map(|s| replies.remove(&s).expect("reply present"))
        .collect()
}

/// Opens `n` sessions with `service` on `channel` in one pipelined batch;
/// returns each reply (holding the session's fds: drop them to hang up).
pub fn open_many(
    channel: &Channel,
    service: &str,
    capacity: u64,
    n: usize,
) -> Vec<Result<OpenReply, String>> {
    let msgs = (0..n)
        .map(|_| crate::attacks::open_call(service, capacity_option(capacity)))
        .collect();
    pipelined_calls(channel, msgs)
        .into_iter()
        .map(|r| r.and_then(|m| m.read_all::<OpenReply>().map_err(|e| e.to_string())))
        .collect()
}

/// Calls `Close` on every path in one pipelined batch.
pub fn close_many(channel: &Channel, paths: &[String]) -> Vec<Result<(), String>> {
    let msgs = paths
        .iter()
        .map(|p| {
            Message::new_method_call(
                BUS_NAME,
                p.as_str(),
                shmlink_interfaces::SESSION_INTERFACE,
                member::CLOSE,
            )
            .expect("Close message")
        })
        .collect();
    pipelined_calls(channel, msgs)
        .into_iter()
        .map(|r| r.map(|_| ()))
        .collect()
}

/// A fresh registered channel to the bus at `address`.
pub fn channel(address: &str) -> Channel {
    let mut ch = Channel::open_private(address).expect("connect to the bus");
    ch.register().expect("register on the bus");
    ch
}

/// How one round of [`race_blocking_flood`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaceOutcome {
    /// The daemon signalled before we filled the counter: try again with less delay.
    TooLate,
    /// The daemon ended the session (it saw the full counter, or its blocked write was interrupted).
    Closed,
    /// Neither within the deadline.
    Undecided,
}

/// One try at the narrowest attack on the daemon's wake-ups: `O_NONBLOCK`
/// cleared on the eventfd the daemon writes, its counter at `EVENTFD_MAX - 1`
/// (still writable), an echo of `msg_len` bytes requested; when the reply's
/// last byte lands in the ring, wait `delay_spins` and add the last 1,
/// hoping the daemon checked the counter before and writes it after: a write
/// that then blocks (until the daemon's watchdog interrupts it). Our own
/// write may lose the race and block instead: call
/// `shmlink_endpoint::sys::write_guard::protect_this_thread` first.
pub fn race_blocking_flood(
    s: &mut RawSession,
    msg_len: usize,
    delay_spins: u32,
    deadline: Duration,
) -> RaceOutcome {
    let fd = s
        .to_client
        .empty_signal
        .as_ref()
        .expect("eventfd")
        .as_raw_fd();
    // SAFETY: `fd` belongs to `s`, which outlives every use below.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = set_nonblocking(fd, true);
    let _ = sys::eventfd_drain(fd);
    // Non-blocking, so this cannot block.
    let _ = eventfd_add(fd, EVENTFD_MAX - 1);
    let _ = set_nonblocking(fd, false);
    // Make room for the reply, mark where its last byte will land, ask for it.
    let _ = s.to_client.read(usize::MAX);
    let last = s.to_client.position() + frame::HEADER_LEN + msg_len - 1;
    s.to_client.set_data_byte(last, 0);
    let mut req = frame::encode_header(frame::KIND_MESSAGE, msg_len as u32).to_vec();
    req.resize(frame::HEADER_LEN + msg_len, 0xab);
    s.to_server.write(&req);
    let spin_end = Instant::now() + deadline;
    while s.to_client.data_byte(last) != 0xab && Instant::now() < spin_end {
        std::hint::spin_loop();
    }
    for _ in 0..delay_spins {
        std::hint::spin_loop();
    }
    let guard = sys::write_guard::enter();
    // It blocks if the daemon's 1 came first; the caller's write guard interrupts it then.
    let r = eventfd_add(fd, 1);
    drop(guard);
    if r.is_err() {
        let _ = set_nonblocking(fd, true);
        return RaceOutcome::TooLate;
    }
    let _ = set_nonblocking(fd, false);
    let end = Instant::now() + deadline;
    let hangup = s.hangup.as_ref().expect("hang-up").as_fd();
    loop {
        if sys::hangup_state(hangup).is_ok_and(|h| h == sys::HangupState::Closed) {
            return RaceOutcome::Closed;
        }
        if Instant::now() >= end {
            return RaceOutcome::Undecided;
        }
        let _ = sys::poll_readable(
            &[hangup],
            Some((Instant::now() + Duration::from_millis(5)).min(end)),
        );
    }
}
