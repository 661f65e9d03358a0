//! What a caller can make the daemon write to its log, bounded: strings a
//! caller chose are cut ([`cut`]), and the lines a caller causes are
//! rate-limited per uid ([`Lines`]): refusals ([`Lines::refusals`]) and
//! successes ([`Lines::successes`]: sessions opened and ended, services
//! registered and withdrawn), each a few lines per second, then one line
//! saying how many were suppressed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Bytes of a caller-supplied string written to the log.
pub(crate) const LOGGED_STRING: usize = 200;
/// Bytes of a refusal's text (which may quote caller-supplied strings)
/// written to the log and returned in the D-Bus error.
pub(crate) const LOGGED_ERROR: usize = 400;
/// Refusal lines one uid may cause per [`WINDOW`].
const LINES_PER_WINDOW: u32 = 5;
/// Success lines one uid may cause per [`WINDOW`]: enough for a client
/// opening and closing a few dozen sessions at once to have each logged.
const SUCCESS_LINES_PER_WINDOW: u32 = 32;
/// The rate limit's window.
const WINDOW: Duration = Duration::from_secs(1);

pub(crate) use shmlink_interfaces::cut;

/// One uid's current window.
struct Window {
    start: Instant,
    lines: u32,
    suppressed: u64,
}

/// A per-uid rate limit of one kind of log line.
pub(crate) struct Lines {
    /// What the lines are about, as the summary of suppressed ones says it.
    about: &'static str,
    per_window: u32,
    windows: HashMap<u32, Window>,
    last_sweep: Option<Instant>,
}

impl Lines {
    /// The limit of refusal lines.
    pub fn refusals() -> Self {
        Lines::new("refused calls", LINES_PER_WINDOW)
    }

    /// The limit of success lines: sessions opened and ended, services
    /// registered and withdrawn.
    pub fn successes() -> Self {
        Lines::new("sessions and registrations", SUCCESS_LINES_PER_WINDOW)
    }

    fn new(about: &'static str, per_window: u32) -> Self {
        Lines {
            about,
            per_window,
            windows: HashMap::new(),
            last_sweep: None,
        }
    }

    /// Whether a line caused by `uid` may be written now. Counts
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
            report(self.about, uid, w);
            *w = Window {
                start: now,
                lines: 0,
                suppressed: 0,
            };
        }
        if w.lines < self.per_window {
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
        let about = self.about;
        self.windows.retain(|uid, w| {
            if now.duration_since(w.start) < WINDOW {
                return true;
            }
            report(about, *uid, w);
            false
        });
    }

    /// Reports every window with suppressed lines (at shutdown).
    pub fn flush(&mut self) {
        for (uid, w) in self.windows.drain() {
            report(self.about, uid, &w);
        }
    }
}

fn report(about: &str, uid: u32, w: &Window) {
    if w.suppressed > 0 {
        log::warn!(
            "suppressed {} similar line(s) about {about} of uid {uid}",
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
        let mut r = Lines::refusals();
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

    #[test]
    fn successes_are_limited_per_uid_and_per_window_with_a_larger_budget() {
        let mut s = Lines::successes();
        let t0 = Instant::now();
        let admitted = (0..10_000).filter(|_| s.admit(65534, t0)).count();
        assert_eq!(admitted, SUCCESS_LINES_PER_WINDOW as usize);
        assert!(admitted > LINES_PER_WINDOW as usize);
        assert_eq!(
            s.windows[&65534].suppressed,
            10_000 - u64::from(SUCCESS_LINES_PER_WINDOW)
        );
        assert!(s.admit(0, t0), "another uid has its own budget");
        // Within the window, still held back; the next window admits again,
        // and a sweep after it forgets the quiet uid (reporting its count).
        assert!(!s.admit(65534, t0 + WINDOW / 2));
        assert!(s.admit(65534, t0 + WINDOW));
        assert_eq!(s.windows[&65534].suppressed, 0, "the count was reported");
        s.sweep(t0 + 3 * WINDOW);
        assert!(s.windows.is_empty());
    }
}
