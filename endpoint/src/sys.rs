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
    let one = 1u64.to_ne_bytes();
    // SAFETY: `one` is 8 readable bytes; `fd` is a live borrowed fd.
    retry(|| cvt(unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) }))?;
    Ok(())
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
        if i % 64 == 0 && start.elapsed() >= budget {
            return ready();
        }
    }
}
