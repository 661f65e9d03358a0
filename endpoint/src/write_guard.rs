//! A watchdog that un-sticks protected threads blocked in an eventfd write.
//!
//! The peer shares each eventfd's open file description, so it can clear
//! `O_NONBLOCK` and fill the counter between our writability check and our
//! write, which then blocks. No crate covers that case; this module does.
//!
//! Each protected thread counts its writes in a sequence number (odd while
//! inside one: two atomic increments, no system call). Every [`STUCK`] the
//! watchdog thread looks at all of them; a thread seen inside the same write
//! twice in a row gets `SIGURG`, whose handler does nothing and is installed
//! without `SA_RESTART`, so the blocked `write` returns `EINTR`. A signal
//! that arrives just after the write finished only interrupts something
//! else, which every call on a protected thread retries (`epoll_wait`,
//! `poll`, `preadv2`) or never sees (futexes restart).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;

/// How long a write may block before the watchdog interrupts it.
pub const STUCK: Duration = Duration::from_millis(20);

/// One protected thread, as the watchdog sees it.
struct Slot {
    thread: libc::pthread_t,
    /// Odd while the thread is inside a write.
    seq: AtomicU64,
    /// `seq` as the watchdog saw it last time (only the watchdog touches it).
    seen: AtomicU64,
}

/// The protected threads that are still running.
static SLOTS: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());
static START: Once = Once::new();

/// A protected thread's own slot; dropping it (when the thread exits)
/// takes the slot off [`SLOTS`], so the watchdog never signals a thread
/// that is gone.
struct Registration(OnceLock<Arc<Slot>>);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(mine) = self.0.get() {
            let mut slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
            slots.retain(|s| !Arc::ptr_eq(s, mine));
        }
    }
}

thread_local! {
    static MINE: Registration = const { Registration(OnceLock::new()) };
}

extern "C" fn on_sigurg(_: libc::c_int) {}

/// Installs the do-nothing `SIGURG` handler, without `SA_RESTART`.
fn install_handler() -> io::Result<()> {
    // SAFETY: an all-zero `sigaction` is a valid value (no flags, no
    // restorer); `sigemptyset` then initialises its mask through a pointer
    // to that local. The handler does nothing, so it is async-signal-safe,
    // and its type matches what `sa_sigaction` holds without `SA_SIGINFO`.
    // SIGURG's default action is to ignore it, so replacing that changes
    // nothing for code that does not expect the signal.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigurg as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = 0; // no SA_RESTART: the blocked write must return EINTR
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGURG, &sa, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn start_watchdog() -> io::Result<()> {
    install_handler()?;
    std::thread::Builder::new()
        .name("shmlink-write-watchdog".into())
        .spawn(|| loop {
            std::thread::sleep(STUCK);
            let slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
            for slot in slots.iter() {
                let now = slot.seq.load(Ordering::Acquire);
                if now % 2 == 1 && now == slot.seen.load(Ordering::Relaxed) {
                    log::warn!("an eventfd write has blocked for {STUCK:?}: the peer cleared O_NONBLOCK and filled the counter; interrupting it");
                    // SAFETY: `slot.thread` is alive: a thread takes its slot
                    // off SLOTS (under the lock we hold) in a thread-local
                    // destructor, which runs before the thread ends. SIGURG
                    // has our no-op handler, installed before this thread started.
                    unsafe { libc::pthread_kill(slot.thread, libc::SIGURG) };
                }
                slot.seen.store(now, Ordering::Relaxed);
            }
        })?;
    Ok(())
}

/// Protects the calling thread: its eventfd writes that block are
/// interrupted (and reported as a flood). Meant for long-lived threads (the
/// daemon's workers); the protection ends when the thread does.
pub fn protect_this_thread() -> io::Result<()> {
    let mut err = None;
    START.call_once(|| err = start_watchdog().err());
    if let Some(e) = err {
        return Err(e);
    }
    MINE.try_with(|mine| {
        mine.0.get_or_init(|| {
            // SAFETY: pthread_self has no preconditions and cannot fail.
            let thread = unsafe { libc::pthread_self() };
            let slot = Arc::new(Slot {
                thread,
                seq: AtomicU64::new(0),
                seen: AtomicU64::new(0),
            });
            SLOTS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Arc::clone(&slot));
            slot
        });
    })
    .map_err(|_| io::Error::other("the thread is exiting"))
}

/// While alive, marks the calling thread as inside a write that the
/// watchdog may interrupt (if the thread is protected; otherwise inert).
pub struct Guard(Option<Arc<Slot>>);

/// Marks the calling thread as inside a write until the guard drops.
pub fn enter() -> Guard {
    let slot = MINE.try_with(|m| m.0.get().cloned()).ok().flatten();
    if let Some(s) = &slot {
        s.seq.fetch_add(1, Ordering::AcqRel);
    }
    Guard(slot)
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.seq.fetch_add(1, Ordering::AcqRel);
        }
    }
}
