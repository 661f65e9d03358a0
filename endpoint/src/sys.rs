//! Thin wrappers over the Linux system calls the data plane needs.
//!
//! Every libc call goes through [`cvt`], which turns `-1` into `io::Error`,
//! so the rest of the crate never looks at `errno`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Turns a libc return value of `-1` into the current `errno` as `io::Error`.
pub fn cvt<T: PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Retries `f` while it fails with `EINTR`.
fn retry<T, F: FnMut() -> io::Result<T>>(mut f: F) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// What [`poll`] learnt about one fd.
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
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    retry(|| {
        let timeout = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so that we never wake just before the deadline and spin.
                left.as_millis().min(i32::MAX as u128) as i32
                    + i32::from(left.subsec_nanos() % 1_000_000 != 0)
            }
        };
        // SAFETY: `pfds` is a valid, exclusively borrowed array of `pfds.len()` pollfd structs.
        cvt(unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) })
    })?;
    Ok(pfds
        .iter()
        .map(|p| Ready {
            readable: p.revents & libc::POLLIN != 0,
            hangup: p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
        })
        .collect())
}

/// Resets an eventfd's counter without blocking and without touching the
/// O_NONBLOCK flag that the peer shares (`preadv2` with `RWF_NOWAIT`).
///
/// Returns the counter value read, 0 when it was already zero.
pub fn eventfd_drain(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value = 0u64;
    let iov = libc::iovec {
        iov_base: (&mut value as *mut u64).cast(),
        iov_len: 8,
    };
    // SAFETY: `iov` points at 8 writable bytes owned by this frame; `fd` is a live borrowed fd.
    let r = retry(|| cvt(unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) }));
    match r {
        Ok(_) => Ok(value),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// Adds 1 to an eventfd's counter without ever blocking.
///
/// A peer can saturate the counter (it shares the eventfd); then a write
/// would block. We check writability first and report a saturated counter as
/// `WouldBlock`, which callers treat as hostile.
pub fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd; timeout 0 never blocks.
    let n = retry(|| cvt(unsafe { libc::poll(&mut pfd, 1, 0) }))?;
    if n == 0 || pfd.revents & libc::POLLOUT == 0 {
        return Err(io::Error::from(io::ErrorKind::WouldBlock));
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
    let one = 1u64.to_ne_bytes();
    let guard = write_guard::enter();
    // SAFETY: `one` is 8 readable bytes; `fd` is a live borrowed fd.
    let r = cvt(unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) });
    drop(guard);
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            Err(io::Error::from(io::ErrorKind::WouldBlock))
        }
        Err(e) => Err(e),
    }
}

/// A watchdog that un-sticks protected threads blocked in an eventfd write.
///
/// Each protected thread counts its writes in a sequence number (odd while
/// inside one: two relaxed atomic increments, no system call). Every
/// [`STUCK`] the watchdog thread looks at all of them; a thread seen inside
/// the same write twice in a row gets `SIGURG`, whose handler does nothing
/// and is installed without `SA_RESTART`, so the blocked `write` returns
/// `EINTR`. A signal that arrives just after the write finished only
/// interrupts something else, which every call on a protected thread retries
/// (`epoll_wait`, `poll`, `preadv2`) or never sees (futexes restart).
pub mod write_guard {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, Once};
    use std::time::Duration;

    /// How long a write may block before the watchdog interrupts it.
    pub const STUCK: Duration = Duration::from_millis(20);

    struct Slot {
        thread: libc::pthread_t,
        seq: AtomicU64,
    }

    static SLOTS: Mutex<Vec<&'static Slot>> = Mutex::new(Vec::new());
    static START: Once = Once::new();

    thread_local! {
        static MINE: Cell<Option<&'static Slot>> = const { Cell::new(None) };
    }

    extern "C" fn on_sigurg(_: libc::c_int) {}

    fn start_watchdog() -> std::io::Result<()> {
        // SAFETY: an all-zero sigaction is a valid value to fill in.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigurg as *const () as libc::sighandler_t;
        sa.sa_flags = 0; // no SA_RESTART: the blocked write must return EINTR
                         // SAFETY: `sa.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: `sa` is initialised; the handler is async-signal-safe (it does nothing).
        if unsafe { libc::sigaction(libc::SIGURG, &sa, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::thread::Builder::new().name("shmlink-write-watchdog".into()).spawn(|| {
            let mut last: Vec<u64> = Vec::new();
            loop {
                std::thread::sleep(STUCK);
                let slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
                last.resize(slots.len(), 0);
                for (slot, seen) in slots.iter().zip(last.iter_mut()) {
                    let now = slot.seq.load(Ordering::Acquire);
                    if now % 2 == 1 && now == *seen {
                        log::warn!("an eventfd write has blocked for {STUCK:?}: the peer cleared O_NONBLOCK and filled the counter; interrupting it");
                        // SAFETY: the thread registered itself and, being a
                        // long-lived worker, is still running; SIGURG has our no-op handler.
                        unsafe { libc::pthread_kill(slot.thread, libc::SIGURG) };
                    }
                    *seen = now;
                }
            }
        })?;
        Ok(())
    }

    /// Protects the calling thread: its eventfd writes that block are
    /// interrupted. For long-lived threads only (the daemon's workers); the
    /// registration lasts for the life of the process.
    pub fn protect_this_thread() -> std::io::Result<()> {
        let mut err = None;
        START.call_once(|| err = start_watchdog().err());
        if let Some(e) = err {
            return Err(e);
        }
        if MINE.with(|m| m.get().is_some()) {
            return Ok(());
        }
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        // One small slot per protected thread, kept for the life of the process.
        let slot: &'static Slot = Box::leak(Box::new(Slot {
            thread,
            seq: AtomicU64::new(0),
        }));
        SLOTS.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
        MINE.with(|m| m.set(Some(slot)));
        Ok(())
    }

    /// While alive, marks the calling thread as inside a write that the
    /// watchdog may interrupt (if the thread is protected; otherwise inert).
    pub struct Guard(Option<&'static Slot>);

    /// Marks the calling thread as inside a write until the guard drops.
    pub fn enter() -> Guard {
        let slot = MINE.with(|m| m.get());
        if let Some(s) = slot {
            s.seq.fetch_add(1, Ordering::AcqRel);
        }
        Guard(slot)
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(s) = self.0 {
                s.seq.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// Sets O_NONBLOCK on an open file description.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no pointer argument; `fd` is live.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: F_SETFL takes an int argument; `fd` is live.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Creates a connected pair of `AF_UNIX` stream sockets, close-on-exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two fds socketpair writes.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
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
    let mut byte = 0u8;
    let r = retry(|| {
        // SAFETY: `byte` is one writable byte; MSG_PEEK|MSG_DONTWAIT neither consumes nor blocks.
        cvt(unsafe {
            libc::recv(
                fd.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        })
    });
    match r {
        Ok(0) => Ok(HangupState::Closed),
        Ok(_) => Ok(HangupState::Written),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(HangupState::Open),
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Ok(HangupState::Closed),
        Err(e) => Err(e),
    }
}

/// What kind of file an fd refers to, as far as shmlink cares.
#[derive(Debug, PartialEq, Eq)]
pub enum FdKind {
    /// A memfd (`/memfd:NAME`), with its size and whether `F_SEAL_SHRINK` is set.
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

/// Identifies what `fd` is, from `/proc/self/fd`, `fstat` and `F_GET_SEALS`.
pub fn fd_kind(fd: BorrowedFd<'_>) -> io::Result<FdKind> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let link = link.to_string_lossy().into_owned();
    // SAFETY: an all-zero `stat` is a valid value to be overwritten by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer; `fd` is live.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    let fmt = st.st_mode & libc::S_IFMT;
    if fmt == libc::S_IFSOCK {
        return Ok(FdKind::Socket);
    }
    if link == "anon_inode:[eventfd]" {
        return Ok(FdKind::Eventfd);
    }
    if fmt == libc::S_IFREG && link.starts_with("/memfd:") {
        // SAFETY: F_GET_SEALS takes no argument; `fd` is live.
        let seals = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
        return Ok(FdKind::Memfd {
            size: st.st_size as u64,
            shrink_sealed: seals & libc::F_SEAL_SHRINK != 0,
        });
    }
    Ok(FdKind::Other(link))
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps <= 0 {
        4096
    } else {
        ps as usize
    }
}

/// Spins until `ready()` or `budget` has passed; returns whether it became ready.
///
/// Every 256 polls the spinner also yields its CPU: when the peer it waits
/// for is runnable on the same CPU (more spinners than free cores), a plain
/// spin would hold it off for the whole budget; with nothing else runnable,
/// `sched_yield` returns at once.
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
            if start.elapsed() >= budget {
                return ready();
            }
            if i % 256 == 0 {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A peer cleared O_NONBLOCK and filled the counter after our check: the
    /// write blocks, and the watchdog must interrupt it on a protected thread.
    #[test]
    fn a_blocked_eventfd_write_is_interrupted_on_a_protected_thread() {
        // SAFETY: eventfd takes no pointers; blocking mode on purpose.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }).expect("eventfd");
        // SAFETY: eventfd returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let full = 0xffff_ffff_ffff_fffeu64.to_ne_bytes();
        // SAFETY: `full` is 8 readable bytes; the counter is 0, so this cannot block.
        let written = unsafe { libc::write(fd.as_raw_fd(), full.as_ptr().cast(), 8) };
        assert_eq!(written, 8);
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
}
