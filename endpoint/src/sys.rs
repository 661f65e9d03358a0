//! The Linux calls the data plane needs, through rustix.
//!
//! Everything here is safe code over [`rustix`]; the one part no crate
//! covers, interrupting an eventfd write that a hostile peer made block,
//! lives in [`write_guard`].

use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{memfd_create, FileType, MemfdFlags, SealFlags};
use rustix::io::{retry_on_intr, Errno, ReadWriteFlags};
use rustix::net::{sockopt, AddressFamily, RecvFlags, SocketFlags, SocketType};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

// Its own file, endpoint/src/write_guard.rs: the one part of the plumbing
// that is hand-written (and unsafe), kept apart from the safe wrappers.
#[path = "write_guard.rs"]
pub mod write_guard;

/// What [`poll_readable`] or [`poll`] learnt about one fd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// Readable (or, for a socket, closed by the peer).
    pub readable: bool,
    /// Writable (only reported for an fd [`poll`] was asked to watch for it).
    pub writable: bool,
    /// Hang-up or error reported.
    pub hangup: bool,
}

/// What [`poll`] waits for on one fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Readable, or hung up.
    Readable,
    /// Writable, or hung up (not readable: a side that waits for room to
    /// write does not read meanwhile).
    Writable,
}

/// Waits until one of `fds` is readable or hung up, or `deadline` passes.
///
/// Returns one [`Ready`] per fd; all false means the deadline passed.
pub fn poll_readable(fds: &[BorrowedFd<'_>], deadline: Option<Instant>) -> io::Result<Vec<Ready>> {
    let fds: Vec<(BorrowedFd<'_>, Wait)> = fds.iter().map(|&fd| (fd, Wait::Readable)).collect();
    poll(&fds, deadline)
}

/// Waits until one of `fds` is ready for what it is watched for, or hung
/// up, or `deadline` passes.
///
/// Returns one [`Ready`] per fd; all false means the deadline passed.
pub fn poll(fds: &[(BorrowedFd<'_>, Wait)], deadline: Option<Instant>) -> io::Result<Vec<Ready>> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|&(fd, wait)| {
            let flags = match wait {
                Wait::Readable => PollFlags::IN,
                Wait::Writable => PollFlags::OUT,
            };
            PollFd::from_borrowed_fd(fd, flags)
        })
        .collect();
    retry_on_intr(|| {
        // The timeout is a timespec (ppoll): no rounding to milliseconds, so
        // no early wake-up just before the deadline.
        let timeout = timeout_until(deadline);
        rustix::event::poll(&mut pfds, timeout.as_ref())
    })?;
    Ok(pfds
        .iter()
        .map(|p| {
            let r = p.revents();
            Ready {
                readable: r.contains(PollFlags::IN),
                writable: r.contains(PollFlags::OUT),
                hangup: r.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL),
            }
        })
        .collect())
}

server_pub! {
    /// A new eventfd at zero, close-on-exec and non-blocking: its owner never
    /// blocks on it, and a peer that shares it and stops reading it cannot stall
    /// the owner's writes.
    pub fn new_eventfd() -> io::Result<OwnedFd> {
        Ok(rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?)
    }
}

/// Resets an eventfd's counter without blocking and without touching the
/// O_NONBLOCK flag that the peer shares (`preadv2` with `RWF_NOWAIT`).
///
/// Returns the counter value read (a native-endian `u64`), 0 when it was
/// already zero.
pub fn eventfd_drain(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value = [0u8; 8];
    // rustix passes `u64::MAX` to the kernel as offset -1, "the current
    // position", the only offset an eventfd accepts (0 gives ESPIPE).
    let r = retry_on_intr(|| {
        rustix::io::preadv2(
            fd,
            &mut [io::IoSliceMut::new(&mut value)],
            u64::MAX,
            ReadWriteFlags::NOWAIT,
        )
    });
    match r {
        Ok(_) => Ok(u64::from_ne_bytes(value)),
        Err(Errno::AGAIN) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Adds 1 to an eventfd's counter without ever blocking.
///
/// A peer can saturate the counter (it shares the eventfd); then a write
/// would block. We check writability first and report a saturated counter as
/// `WouldBlock`, which callers treat as hostile.
pub fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut pfd = [PollFd::from_borrowed_fd(fd, PollFlags::OUT)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let n = retry_on_intr(|| rustix::event::poll(&mut pfd, Some(&zero)))?;
    if n == 0 || !pfd[0].revents().contains(PollFlags::OUT) {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    eventfd_add_one(fd)
}

/// Writes 1 to an eventfd, the step after [`eventfd_signal`]'s check.
///
/// The peer shares the open file description: it can clear `O_NONBLOCK` and
/// saturate the counter between our check and this write, which would then
/// block. On a thread that called [`write_guard::protect_this_thread`], a
/// watchdog interrupts a write stuck for more than [`write_guard::STUCK`]; an
/// interrupted write (`EINTR`, only possible when the write blocked, that is
/// when the counter was full) is reported as `WouldBlock`, like a flood.
fn eventfd_add_one(fd: BorrowedFd<'_>) -> io::Result<()> {
    let guard = write_guard::enter();
    let r = rustix::io::write(fd, &1u64.to_ne_bytes());
    drop(guard);
    match r {
        Ok(_) => Ok(()),
        Err(Errno::INTR) => Err(io::ErrorKind::WouldBlock.into()),
        Err(e) => Err(e.into()),
    }
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// A new eventfd at zero, close-on-exec and blocking (unlike
/// [`eventfd_signal`]'s peers-shared ones): for measuring the kernel's
/// blocking wake-up with [`eventfd_write`] and [`eventfd_read`].
pub fn blocking_eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC,
    )?)
}

/// Adds `value` to an eventfd's counter (blocking if it would overflow).
pub fn eventfd_write(fd: BorrowedFd<'_>, value: u64) -> io::Result<()> {
    match rustix::io::write(fd, &value.to_ne_bytes())? {
        8 => Ok(()),
        n => Err(io::Error::other(format!("eventfd write of {n} bytes"))),
    }
}

/// Waits for an eventfd's counter (if it is blocking), reads and resets it.
pub fn eventfd_read(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut b = [0u8; 8];
    match rustix::io::read(fd, &mut b)? {
        8 => Ok(u64::from_ne_bytes(b)),
        n => Err(io::Error::other(format!("eventfd read of {n} bytes"))),
    }
}

/// Restores the default disposition of `SIGPIPE` (the Rust runtime ignores
/// it): a program writing to a pipe whose reader left then ends quietly,
/// like other Unix tools, instead of failing in `println!`. Call it before
/// any thread starts.
pub fn default_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL installs no handler, only resets a
    // process-wide disposition; no Rust code depends on SIGPIPE being ignored
    // beyond the write errors it would otherwise get.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// Sets O_NONBLOCK on an open file description.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// Sends one byte (0) on the stream socket `socket` carrying `fds` as
/// `SCM_RIGHTS`, without blocking (`EAGAIN` if the socket has no room) and
/// without `SIGPIPE`.
pub fn send_fds(socket: BorrowedFd<'_>, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::mem::MaybeUninit;
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("fds do not fit the control buffer"));
    }
    let sent = retry_on_intr(|| {
        rustix::net::sendmsg(
            socket,
            &[io::IoSlice::new(&[0])],
            &mut control,
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        )
    })?;
    if sent != 1 {
        return Err(io::Error::other("the byte carrying the fds was not sent"));
    }
    Ok(())
}

/// Receives, without blocking, one byte carrying exactly `n` fds as
/// `SCM_RIGHTS` from the stream socket `socket` (the fds arrive
/// close-on-exec). Anything else is `InvalidData`: no byte or more than one,
/// fewer or more fds (the kernel closes those that did not fit), other
/// control messages. `WouldBlock` if nothing has arrived.
pub fn recv_fds(socket: BorrowedFd<'_>, n: usize) -> io::Result<Vec<OwnedFd>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, ReturnFlags};
    use std::mem::MaybeUninit;
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(n))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut bytes = [0u8; 2];
    let got = retry_on_intr(|| {
        rustix::net::recvmsg(
            socket,
            &mut [io::IoSliceMut::new(&mut bytes)],
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        )
    })?;
    let mut fds = Vec::with_capacity(n);
    let mut other = false;
    for message in control.drain() {
        match message {
            RecvAncillaryMessage::ScmRights(received) => fds.extend(received),
            _ => other = true,
        }
    }
    let bad = |what: String| Err(io::Error::new(io::ErrorKind::InvalidData, what));
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return bad(format!("more than {n} fds (or other control data) arrived"));
    }
    if other {
        return bad("control data other than fds arrived".into());
    }
    match got.bytes {
        0 => return bad("the socket was closed before the fds arrived".into()),
        1 => {}
        more => {
            return bad(format!(
                "{more} bytes arrived where one byte carries the fds"
            ))
        }
    }
    if fds.len() != n {
        return bad(format!("{} fds arrived, not {n}", fds.len()));
    }
    Ok(fds)
}

/// Creates a connected pair of `AF_UNIX` stream sockets, close-on-exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}
/// A new memfd of `len` bytes for shared memory, close-on-exec, with every
/// seal the data plane can afford: `MFD_NOEXEC_SEAL` (Linux 6.3 and later;
/// an older kernel refuses the flag with `EINVAL` and the memfd is made
/// without it), then `F_SEAL_SHRINK`, `F_SEAL_GROW` and `F_SEAL_SEAL`.
pub(crate) fn sealed_memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    let fd = match memfd_create(name, flags | MemfdFlags::NOEXEC_SEAL) {
        Err(Errno::INVAL) => memfd_create(name, flags),
        other => other,
    }?;
    rustix::fs::ftruncate(&fd, len)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// What [`stream_socket`] found a socket to be.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StreamSocket {
    /// A connected `AF_UNIX` `SOCK_STREAM` socket.
    Connected,
    /// Not `AF_UNIX`: the address family's number.
    NotUnix { family: u32 },
    /// `AF_UNIX`, but not `SOCK_STREAM`: the type's name.
    NotStream { kind: String },
    /// An `AF_UNIX` stream socket without a peer, listening or not.
    NotConnected { listening: bool },
}

/// Tells whether the socket `fd` is a connected `AF_UNIX` stream socket,
/// and if not, why not.
pub(crate) fn stream_socket(fd: BorrowedFd<'_>) -> io::Result<StreamSocket> {
    let family = sockopt::socket_domain(fd)?;
    if family != AddressFamily::UNIX {
        return Ok(StreamSocket::NotUnix {
            family: family.as_raw().into(),
        });
    }
    let kind = sockopt::socket_type(fd)?;
    if kind != SocketType::STREAM {
        let kind = match kind {
            SocketType::DGRAM => "SOCK_DGRAM".into(),
            SocketType::SEQPACKET => "SOCK_SEQPACKET".into(),
            SocketType::RAW => "SOCK_RAW".into(),
            other => format!("socket type {}", other.as_raw()),
        };
        return Ok(StreamSocket::NotStream { kind });
    }
    match rustix::net::getpeername(fd) {
        Ok(_) => Ok(StreamSocket::Connected),
        Err(Errno::NOTCONN) => Ok(StreamSocket::NotConnected {
            listening: sockopt::socket_acceptconn(fd).unwrap_or(false),
        }),
        Err(e) => Err(e.into()),
    }
}

/// State of a hang-up socket as seen without blocking.
#[derive(Debug, PartialEq, Eq)]
pub enum HangupState {
    /// The peer's end is still open.
    Open,
    /// The peer closed its end (or its process died).
    Closed,
    /// The peer wrote to a socket that must stay silent.
    Written,
}

/// Peeks at a hang-up socket without blocking and without consuming anything.
pub fn hangup_state(fd: BorrowedFd<'_>) -> io::Result<HangupState> {
    let mut byte = [0u8; 1];
    let r =
        retry_on_intr(|| rustix::net::recv(fd, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT));
    match r {
        Ok((_, 0)) => Ok(HangupState::Closed),
        Ok(_) => Ok(HangupState::Written),
        Err(Errno::AGAIN) => Ok(HangupState::Open),
        Err(Errno::CONNRESET) => Ok(HangupState::Closed),
        Err(e) => Err(e.into()),
    }
}

/// What kind of file an fd refers to, as far as shmlink cares.
#[derive(Debug, PartialEq, Eq)]
pub enum FdKind {
    /// A memfd (a sealable shared-memory file), with its size and whether
    /// `F_SEAL_SHRINK` is set.
    Memfd {
        /// Size in bytes from `fstat`.
        size: u64,
        /// Whether the shrink seal is present.
        shrink_sealed: bool,
    },
    /// An eventfd.
    Eventfd,
    /// A socket.
    Socket,
    /// Anything else, with the target of its `/proc/self/fd` link.
    Other(String),
}

/// Identifies what `fd` is.
///
/// Sockets and memfds are told apart with `fstat` and `F_GET_SEALS` alone:
/// only shared-memory files answer `F_GET_SEALS`, and of those only memfds
/// can carry any seal but `F_SEAL_SEAL` (a tmpfs file opened by path is born
/// with `F_SEAL_SEAL` and so can never gain `F_SEAL_SHRINK`, which the ring
/// checks require). An eventfd shares one anonymous inode with timerfds,
/// signalfds and epoll fds, so nothing `fstat` returns distinguishes it; the
/// kernel names it in the `/proc/self/fd` link (`anon_inode:[eventfd]`),
/// the one check that neither touches the counter nor wakes the peer.
pub fn fd_kind(fd: BorrowedFd<'_>) -> io::Result<FdKind> {
    let st = rustix::fs::fstat(fd)?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Socket => return Ok(FdKind::Socket),
        FileType::RegularFile => match rustix::fs::fcntl_get_seals(fd) {
            Ok(seals) => {
                return Ok(FdKind::Memfd {
                    size: st.st_size.try_into().unwrap_or(0),
                    shrink_sealed: seals.contains(SealFlags::SHRINK),
                })
            }
            // Not a shared-memory file (or an anonymous inode on kernels
            // that report those as regular files).
            Err(Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        },
        _ => {}
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let link = link.to_string_lossy().into_owned();
    if link == "anon_inode:[eventfd]" {
        return Ok(FdKind::Eventfd);
    }
    Ok(FdKind::Other(link))
}

server_pub! {
    /// The effective uid of this process (a broker lets its own uid register
    /// services, as root may).
    pub fn effective_uid() -> u32 {
        rustix::process::geteuid().as_raw()
    }
}

server_pub! {
    /// Raises the soft limit on open files to the hard one; returns the
    /// soft limit now in force (`None`: unlimited).
    pub fn raise_fd_limit() -> io::Result<Option<u64>> {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut limit = getrlimit(Resource::Nofile);
        if limit.current != limit.maximum {
            limit.current = limit.maximum;
            setrlimit(Resource::Nofile, limit)?;
        }
        Ok(getrlimit(Resource::Nofile).current)
    }
}

server_pub! {
    /// How many more fds this process may open before its soft open-file
    /// limit (`None`: unlimited), counted from `/proc/self/fd`.
    pub fn fd_headroom() -> io::Result<Option<u64>> {
        let Some(limit) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current
        else {
            return Ok(None);
        };
        // The directory's own fd is listed too, and is closed again after.
        let open = std::fs::read_dir("/proc/self/fd")?.count().saturating_sub(1) as u64;
        Ok(Some(limit.saturating_sub(open)))
    }
}

/// The system page size.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// How long a spinner polls before it starts yielding its CPU (see [`spin_until`]).
///
/// Well above a round trip between two spinning sides (1-2 µs here), so
/// that an answer that comes soon is never held up by a `sched_yield`: with
/// any other thread runnable on the CPU (even at the lowest priority), a
/// yield hands the CPU over for tens of microseconds. Measured here with a
/// `nice 19` busy loop beside a spinning echo: yielding every 256 polls from
/// the start made 3-6 % of round trips take over 10 µs (p99 22-24 µs);
/// yielding only after 50 µs, p99 2.1-3.6 µs.
pub const SPIN_BEFORE_YIELD: Duration = Duration::from_micros(50);

/// Spins until `ready()` or `budget` has passed; returns whether it became ready.
///
/// After [`SPIN_BEFORE_YIELD`] without success, every 256 polls the spinner
/// also yields its CPU: when the peer it waits for is runnable on the same
/// CPU (more spinners than free cores), a plain spin would hold it off for the
/// whole budget; with nothing else runnable, `sched_yield` returns at once.
pub fn spin_until(budget: Duration, mut ready: impl FnMut() -> bool) -> bool {
    if budget.is_zero() {
        return ready();
    }
    let start = Instant::now();
    let mut i = 0u32;
    loop {
        if ready() {
            return true;
        }
        std::hint::spin_loop();
        i = i.wrapping_add(1);
        if i % 64 == 0 {
            let spun = start.elapsed();
            if spun >= budget {
                return ready();
            }
            if i % 256 == 0 && spun >= SPIN_BEFORE_YIELD {
                std::thread::yield_now();
            }
        }
    }
}

/// The `ppoll`/`epoll_pwait2`-style timeout left until `deadline` (`None`:
/// no deadline; a deadline already past gives zero, a look without waiting).
fn timeout_until(deadline: Option<Instant>) -> Option<Timespec> {
    deadline.map(|d| {
        let left = d.saturating_duration_since(Instant::now());
        Timespec {
            tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: left.subsec_nanos().into(),
        }
    })
}

/// The key under which a [`Selector`] reports an fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

/// What a [`Selector`] watches an fd for (level-triggered); combine with `|`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest(EventFlags);

impl Interest {
    /// The fd is readable (`EPOLLIN`).
    pub const READABLE: Interest = Interest(EventFlags::IN);
    /// The peer shut down its end of a stream socket (`EPOLLRDHUP`).
    pub const PEER_CLOSED: Interest = Interest(EventFlags::RDHUP);
}

impl std::ops::BitOr for Interest {
    type Output = Interest;
    fn bitor(self, other: Interest) -> Interest {
        Interest(self.0 | other.0)
    }
}

/// One fd a [`Selector::wait`] found ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The token the fd was registered under.
    pub token: Token,
    /// Readable (or, for a socket, closed by the peer).
    pub readable: bool,
    /// Hang-up, peer shut-down or error reported.
    pub hangup: bool,
}

/// The buffer [`Selector::wait`] fills, reused from one wait to the next.
pub struct Events {
    raw: Vec<epoll::Event>,
}

impl Events {
    /// Room for `capacity` events per wait (at least one); more wait for the next.
    pub fn with_capacity(capacity: usize) -> Events {
        Events {
            raw: Vec::with_capacity(capacity.max(1)),
        }
    }

    /// The events of the last wait.
    pub fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        self.raw.iter().map(|e| {
            // Copied out: the kernel's struct is packed.
            let (flags, data) = (e.flags, e.data);
            Event {
                token: Token(data.u64()),
                readable: flags.contains(EventFlags::IN),
                hangup: flags.intersects(EventFlags::HUP | EventFlags::RDHUP | EventFlags::ERR),
            }
        })
    }

    /// Whether the last wait found nothing.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
}

/// A set of fds, each under a [`Token`], waited on together (an epoll set,
/// level-triggered, close-on-exec). Its own fd is readable while any fd in
/// the set is ready, so a selector can itself be polled by another loop.
#[derive(Debug)]
pub struct Selector {
    epoll: OwnedFd,
}

impl Selector {
    /// An empty set.
    pub fn new() -> io::Result<Selector> {
        Ok(Selector {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
        })
    }

    /// Watches `fd` for `interest`, reported under `token`. The set keys its
    /// entries by fd and open file: [`Selector::delete`] takes the same fd.
    pub fn add(&self, fd: impl AsFd, token: Token, interest: Interest) -> io::Result<()> {
        Ok(epoll::add(
            &self.epoll,
            fd,
            EventData::new_u64(token.0),
            interest.0,
        )?)
    }

    /// Changes the token and interest of an fd already watched.
    pub fn modify(&self, fd: impl AsFd, token: Token, interest: Interest) -> io::Result<()> {
        Ok(epoll::modify(
            &self.epoll,
            fd,
            EventData::new_u64(token.0),
            interest.0,
        )?)
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: impl AsFd) -> io::Result<()> {
        Ok(epoll::delete(&self.epoll, fd)?)
    }

    /// Waits until a watched fd is ready or `deadline` passes (`None`: no
    /// deadline; a deadline already past only looks), and puts what was
    /// ready into `events` (as many as it has room for). An interrupted wait
    /// fails with [`io::ErrorKind::Interrupted`], for the caller to decide.
    pub fn wait(&self, events: &mut Events, deadline: Option<Instant>) -> io::Result<()> {
        events.raw.clear();
        let timeout = timeout_until(deadline);
        epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(&mut events.raw),
            timeout.as_ref(),
        )?;
        Ok(())
    }
}

impl AsFd for Selector {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

impl From<Selector> for OwnedFd {
    /// The epoll fd, for a caller that hands the set to another event loop.
    fn from(selector: Selector) -> OwnedFd {
        selector.epoll
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{eventfd, EventfdFlags};
    use rustix::fs::{memfd_create, MemfdFlags};
    use std::os::fd::AsFd;

    fn blocking_eventfd(initial: u32) -> OwnedFd {
        eventfd(initial, EventfdFlags::CLOEXEC).expect("eventfd")
    }

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_one_and_headroom_is_below_it() {
        use rustix::process::{getrlimit, Resource};
        let soft = raise_fd_limit().expect("raise");
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(soft, limit.maximum);
        assert_eq!(limit.current, limit.maximum);
        if let Some(soft) = soft {
            // Other tests open and close fds meanwhile: only bounds hold.
            let room = fd_headroom().expect("headroom").expect("limited");
            assert!(room > 0 && room < soft, "{room} of {soft}");
        }
    }

    fn sealable_memfd(len: u64) -> OwnedFd {
        let fd = memfd_create(
            "shmlink-test",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .expect("memfd_create");
        rustix::fs::ftruncate(&fd, len).expect("ftruncate");
        fd
    }

    /// What a selector reports after one wait that only looks.
    fn ready_now(selector: &Selector) -> Vec<Event> {
        let mut events = Events::with_capacity(8);
        selector
            .wait(&mut events, Some(Instant::now()))
            .expect("wait");
        let mut ready: Vec<Event> = events.iter().collect();
        ready.sort_by_key(|e| e.token.0);
        ready
    }

    #[test]
    fn a_selector_reports_ready_fds_by_token_until_deleted() {
        let selector = Selector::new().expect("selector");
        let wake = new_eventfd().expect("eventfd");
        let (ours, theirs) = socketpair().expect("pair");
        selector
            .add(&wake, Token(1), Interest::READABLE)
            .expect("add");
        selector
            .add(&ours, Token(2), Interest::READABLE | Interest::PEER_CLOSED)
            .expect("add");
        assert!(ready_now(&selector).is_empty(), "nothing happened yet");

        eventfd_signal(wake.as_fd()).expect("signal");
        let ready = ready_now(&selector);
        assert_eq!(
            ready,
            vec![Event {
                token: Token(1),
                readable: true,
                hangup: false
            }]
        );
        assert_eq!(ready_now(&selector), ready, "level-triggered");
        eventfd_drain(wake.as_fd()).expect("drain");
        assert!(ready_now(&selector).is_empty());

        selector
            .modify(&ours, Token(3), Interest::READABLE | Interest::PEER_CLOSED)
            .expect("modify");
        drop(theirs);
        let ready = ready_now(&selector);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].token, Token(3));
        assert!(ready[0].readable && ready[0].hangup, "{ready:?}");

        selector.delete(&ours).expect("delete");
        assert!(ready_now(&selector).is_empty(), "deleted");
    }

    #[test]
    fn a_selector_waits_until_its_deadline_and_is_itself_pollable() {
        let selector = Selector::new().expect("selector");
        let wake = new_eventfd().expect("eventfd");
        selector
            .add(&wake, Token(7), Interest::READABLE)
            .expect("add");
        let start = Instant::now();
        let mut events = Events::with_capacity(1);
        selector
            .wait(&mut events, Some(start + Duration::from_millis(20)))
            .expect("wait");
        assert!(events.is_empty());
        assert!(start.elapsed() >= Duration::from_millis(20));
        eventfd_signal(wake.as_fd()).expect("signal");
        let polled = poll_readable(&[selector.as_fd()], Some(Instant::now())).expect("poll");
        assert!(polled[0].readable, "the selector's own fd is readable");
        let fd = OwnedFd::from(selector);
        let polled = poll_readable(&[fd.as_fd()], Some(Instant::now())).expect("poll");
        assert!(polled[0].readable, "and stays so as a plain fd");
    }

    /// The drain reads through `preadv2` at "the current position": a wrong
    /// offset would fail with ESPIPE here, and the value must come back whole.
    #[test]
    fn drain_returns_the_counter_and_resets_it() {
        let fd = blocking_eventfd(0);
        rustix::io::write(&fd, &0x0102_0304_0506_0708u64.to_ne_bytes()).expect("write");
        assert_eq!(
            eventfd_drain(fd.as_fd()).expect("drain"),
            0x0102_0304_0506_0708
        );
        assert_eq!(eventfd_drain(fd.as_fd()).expect("drain again"), 0);
    }

    /// An empty blocking eventfd: the drain returns at once (RWF_NOWAIT) and
    /// leaves the shared O_NONBLOCK flag alone.
    #[test]
    fn drain_of_an_empty_blocking_eventfd_returns_at_once() {
        let fd = blocking_eventfd(0);
        let start = Instant::now();
        assert_eq!(eventfd_drain(fd.as_fd()).expect("drain"), 0);
        assert!(start.elapsed() < Duration::from_secs(5));
        let flags = rustix::fs::fcntl_getfl(&fd).expect("getfl");
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK));
    }

    #[test]
    fn signal_adds_one_and_a_full_counter_is_refused() {
        let fd = blocking_eventfd(0);
        eventfd_signal(fd.as_fd()).expect("signal");
        eventfd_signal(fd.as_fd()).expect("signal");
        assert_eq!(eventfd_drain(fd.as_fd()).expect("drain"), 2);
        rustix::io::write(&fd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).expect("fill");
        let err = eventfd_signal(fd.as_fd()).expect_err("a full counter");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(
            eventfd_drain(fd.as_fd()).expect("drain"),
            0xffff_ffff_ffff_fffe
        );
    }

    #[test]
    fn poll_reports_readable_hangup_and_deadline() {
        let ev = blocking_eventfd(0);
        let (a, b) = socketpair().expect("socketpair");
        let fds = [ev.as_fd(), a.as_fd()];

        let start = Instant::now();
        let deadline = start + Duration::from_millis(30);
        let r = poll_readable(&fds, Some(deadline)).expect("poll");
        assert_eq!(r, vec![Ready::default(); 2]);
        assert!(Instant::now() >= deadline, "woke before the deadline");

        eventfd_signal(ev.as_fd()).expect("signal");
        let r = poll_readable(&fds, None).expect("poll");
        assert!(r[0].readable && !r[1].readable && !r[1].hangup);

        drop(b);
        let r = poll_readable(&fds[1..], None).expect("poll");
        assert!(r[0].hangup);
    }

    #[test]
    fn hangup_state_tells_open_written_and_closed() {
        let (a, b) = socketpair().expect("socketpair");
        assert_eq!(hangup_state(a.as_fd()).expect("peek"), HangupState::Open);
        rustix::io::write(&b, b"x").expect("write");
        // Peeking consumes nothing: it stays written.
        assert_eq!(hangup_state(a.as_fd()).expect("peek"), HangupState::Written);
        assert_eq!(hangup_state(a.as_fd()).expect("peek"), HangupState::Written);
        let (c, d) = socketpair().expect("socketpair");
        drop(d);
        assert_eq!(hangup_state(c.as_fd()).expect("peek"), HangupState::Closed);
    }

    #[test]
    fn fd_kind_identifies_each_kind() {
        let (a, _b) = socketpair().expect("socketpair");
        assert_eq!(fd_kind(a.as_fd()).expect("kind"), FdKind::Socket);
        assert_eq!(
            fd_kind(blocking_eventfd(0).as_fd()).expect("kind"),
            FdKind::Eventfd
        );

        let m = sealable_memfd(10_000);
        assert_eq!(
            fd_kind(m.as_fd()).expect("kind"),
            FdKind::Memfd {
                size: 10_000,
                shrink_sealed: false
            }
        );
        rustix::fs::fcntl_add_seals(&m, SealFlags::SHRINK).expect("seal");
        assert_eq!(
            fd_kind(m.as_fd()).expect("kind"),
            FdKind::Memfd {
                size: 10_000,
                shrink_sealed: true
            }
        );

        let (r, _w) = rustix::pipe::pipe().expect("pipe");
        assert!(
            matches!(fd_kind(r.as_fd()).expect("kind"), FdKind::Other(l) if l.starts_with("pipe:"))
        );
        let exe = std::fs::File::open(std::env::current_exe().expect("exe")).expect("open");
        assert!(
            matches!(fd_kind(exe.as_fd()).expect("kind"), FdKind::Other(l) if l.starts_with('/'))
        );
        // Another anonymous-inode fd that is not an eventfd.
        let ep = rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC)
            .expect("epoll");
        assert!(
            matches!(fd_kind(ep.as_fd()).expect("kind"), FdKind::Other(l) if l.contains("eventpoll"))
        );
    }

    #[test]
    fn set_nonblocking_sets_the_flag() {
        let fd = blocking_eventfd(0);
        set_nonblocking(fd.as_fd()).expect("set");
        let flags = rustix::fs::fcntl_getfl(&fd).expect("getfl");
        assert!(flags.contains(rustix::fs::OFlags::NONBLOCK));
    }

    #[test]
    fn page_size_is_a_power_of_two() {
        let ps = page_size();
        assert!(ps >= 4096 && ps.is_power_of_two(), "{ps}");
    }

    /// A peer cleared O_NONBLOCK and filled the counter after our check: the
    /// write blocks, and the watchdog must interrupt it on a protected thread.
    #[test]
    fn a_blocked_eventfd_write_is_interrupted_on_a_protected_thread() {
        let fd = blocking_eventfd(0);
        // The counter is 0, so this cannot block.
        rustix::io::write(&fd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).expect("fill");
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            write_guard::protect_this_thread().expect("protect");
            let start = Instant::now();
            let r = eventfd_add_one(fd.as_fd());
            let _ = tx.send(());
            (r.map_err(|e| e.kind()), start.elapsed())
        });
        // Bounded wait: if the write stays blocked the test fails instead of hanging.
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the blocked write was never interrupted");
        let (r, took) = t.join().expect("thread");
        assert_eq!(r, Err(io::ErrorKind::WouldBlock));
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }

    /// Protected threads that come and go are taken off the watchdog's list
    /// when they end, and each new one is still interrupted.
    #[test]
    fn protection_survives_threads_that_end() {
        for _ in 0..3 {
            let fd = blocking_eventfd(0);
            rustix::io::write(&fd, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).expect("fill");
            let (tx, rx) = std::sync::mpsc::channel();
            let t = std::thread::spawn(move || {
                write_guard::protect_this_thread().expect("protect");
                write_guard::protect_this_thread().expect("protect twice");
                let _ = tx.send(eventfd_add_one(fd.as_fd()).map_err(|e| e.kind()));
            });
            let r = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the blocked write was never interrupted");
            assert_eq!(r, Err(io::ErrorKind::WouldBlock));
            t.join().expect("thread");
        }
    }
}
