//! The Linux calls the data plane needs, through rustix.
//!
//! Everything here is safe code over [`rustix`]; the one part no crate
//! covers, interrupting an eventfd write that a hostile peer made block,
//! lives in [`write_guard`].

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{FileType, SealFlags};
use rustix::io::{retry_on_intr, Errno, ReadWriteFlags};
use rustix::net::{AddressFamily, RecvFlags, SocketFlags, SocketType};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

// Its own file, endpoint/src/write_guard.rs: the one part of the plumbing
// that is hand-written (and unsafe), kept apart from the safe wrappers.
#[path = "write_guard.rs"]
pub mod write_guard;

/// What [`poll_readable`] learnt about one fd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// Readable (or, for a socket, closed by the peer).
    pub readable: bool,
    /// Hang-up or error reported.
    pub hangup: bool,
}

/// Waits until one of `fds` is readable or hung up, or `deadline` passes.
///
/// Returns one [`Ready`] per fd; all false means the deadline passed.
pub fn poll_readable(fds: &[BorrowedFd<'_>], deadline: Option<Instant>) -> io::Result<Vec<Ready>> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|&fd| PollFd::from_borrowed_fd(fd, PollFlags::IN))
        .collect();
    retry_on_intr(|| {
        // The timeout is a timespec (ppoll): no rounding to milliseconds, so
        // no early wake-up just before the deadline.
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            Timespec {
                tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX),
                tv_nsec: left.subsec_nanos().into(),
            }
        });
        rustix::event::poll(&mut pfds, timeout.as_ref())
    })?;
    Ok(pfds
        .iter()
        .map(|p| {
            let r = p.revents();
            Ready {
                readable: r.contains(PollFlags::IN),
                hangup: r.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL),
            }
        })
        .collect())
}

/// A new eventfd at zero, close-on-exec and non-blocking: its owner never
/// blocks on it, and a peer that shares it and stops reading it cannot stall
/// the owner's writes.
pub fn new_eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )?)
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

/// Sets O_NONBLOCK on an open file description.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{eventfd, EventfdFlags};
    use rustix::fs::{memfd_create, MemfdFlags};
    use std::os::fd::AsFd;

    fn blocking_eventfd(initial: u32) -> OwnedFd {
        eventfd(initial, EventfdFlags::CLOEXEC).expect("eventfd")
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
