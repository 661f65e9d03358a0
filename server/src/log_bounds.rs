//! What a caller can make the daemon write to its log, bounded: strings a
//! caller chose are cut ([`cut`]), and refusals are rate-limited per uid
//! ([`Refusals`]): a few lines per second, then one line saying how many
//! were suppressed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Bytes of a caller-supplied string written to the log.
pub(crate) const LOGGED_STRING: usize = 200;
/// Bytes of a refusal's text (which may quote caller-supplied strings)
/// written to the log and returned in the D-Bus error.
pub(crate) const LOGGED_ERROR: usize = 400;
/// Refusal lines one uid may cause per [`WINDOW`].
const LINES_PER_WINDOW: u32 = 5;
/// The rate limit's window.
const WINDOW: Duration = Duration::from_secs(1);

pub(crate) use shmlink_interfaces::cut;

/// One uid's current window.
struct Window {
    start: Instant,
    lines: u32,
    suppressed: u64,
}

/// The per-uid rate limit of refusal lines.
#[derive(Default)]
pub(crate) struct Refusals {
    windows: HashMap<u32, Window>,
    last_sweep: Option<Instant>,
}

impl Refusals {
    /// Whether a refusal line caused by `uid` may be written now. Counts
    /// the lines it holds back, and reports them (one line) when the window
    /// ends.
    pub fn admit(&mut self, uid: u32, now: Instant) -> bool {
        self.sweep(now);
        let w = self.windows.entry(uid).or_insert(Window {
            start: now,
            lines: 0,
            suppressed: 0,
        });
        if now.duration_since(w.start) >= WINDOW {
            report(uid, w);
            *w = Window {
                start: now,
                lines: 0,
                suppressed: 0,
            };
        }
        if w.lines < LINES_PER_WINDOW {
            w.lines += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// Reports and forgets the windows that ended (at most once per window,
    /// so a burst's summary is written even if that uid goes quiet).
    pub fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < WINDOW)
        {
            return;
        }
        self.last_sweep = Some(now);
        self.windows.retain(|uid, w| {
            if now.duration_since(w.start) < WINDOW {
                return true;
            }
            report(*uid, w);
            false
        });
    }

    /// Reports every window with suppressed lines (at shutdown).
    pub fn flush(&mut self) {
        for (uid, w) in self.windows.drain() {
            report(uid, &w);
        }
    }
}

fn report(uid: u32, w: &Window) {
    if w.suppressed > 0 {
        log::warn!(
            "suppressed {} similar line(s) about refused calls of uid {uid}",
            w.suppressed
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_strings_are_cut_at_a_character_boundary_with_a_marker() {
        assert_eq!(cut("short", 10), "short");
        let s = "é".repeat(300); // 600 bytes
        let c = cut(&s, 201);
        assert!(c.starts_with(&"é".repeat(100)), "{c}");
        assert!(!c.starts_with(&"é".repeat(101)), "{c}");
        assert!(c.ends_with("…[cut: 600 bytes in all]"), "{c}");
        assert!(c.len() < 240);
    }

    #[test]
    fn refusals_are_limited_per_uid_and_per_window() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        let admitted = (0..1000).filter(|_| r.admit(7, t0)).count();
        assert_eq!(admitted, LINES_PER_WINDOW as usize);
        assert!(r.admit(8, t0), "another uid has its own budget");
        assert_eq!(r.windows[&7].suppressed, 1000 - u64::from(LINES_PER_WINDOW));
        let t1 = t0 + WINDOW;
        assert!(r.admit(7, t1), "a new window admits again");
        assert!(r.windows.len() <= 2);
        r.flush();
        assert!(r.windows.is_empty());
    }
}
