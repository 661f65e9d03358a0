//! SIGTERM and SIGINT as a file descriptor, so the main loop can poll for them.
//!
//! A signalfd rather than a handler: the signals stay blocked, so no handler
//! runs at an arbitrary point and no system call fails with `EINTR`; they wait
//! in the fd until the main loop looks.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::OwnedFd;

/// Blocks SIGTERM and SIGINT in this thread (and every thread it spawns
/// afterwards) and returns a signalfd that becomes readable when one arrives.
///
/// Call it before starting any thread: a thread started earlier keeps the
/// signals unblocked, and the kernel may deliver them there instead.
pub fn termination_fd() -> std::io::Result<OwnedFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    Ok(fd.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read};

    /// Reads one pending `signalfd_siginfo` and returns its signal number.
    fn read_signal(fd: &mut std::fs::File) -> std::io::Result<u32> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        fd.read_exact(&mut info)?;
        // `ssi_signo` is the first field, a u32 in native byte order.
        Ok(u32::from_ne_bytes(info[..4].try_into().unwrap()))
    }

    #[test]
    fn sigterm_and_sigint_make_the_fd_readable() {
        // `raise` targets the calling thread, where the signals are now
        // blocked, so no other test thread can receive them.
        let mut fd = std::fs::File::from(termination_fd().expect("signalfd"));
        let idle = read_signal(&mut fd).expect_err("nothing is pending yet");
        assert_eq!(idle.kind(), ErrorKind::WouldBlock, "{idle}");

        for signal in [Signal::SIGTERM, Signal::SIGINT] {
            nix::sys::signal::raise(signal).expect("raise");
            assert_eq!(read_signal(&mut fd).expect("pending signal"), signal as u32);
        }
        let drained = read_signal(&mut fd).expect_err("each signal is read once");
        assert_eq!(drained.kind(), ErrorKind::WouldBlock, "{drained}");
    }
}
