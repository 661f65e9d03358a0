//! When a provider registers a service again after the broker refused it
//! or could not be reached: exponential back-off, and a log line per
//! retry that stays bounded.

use std::time::{Duration, Instant};

/// The first wait after a refused registration.
pub(super) const FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
pub(super) const LONGEST: Duration = Duration::from_secs(60);

/// The back-off of one service's registration.
#[derive(Debug, Clone)]
pub(super) struct Backoff {
    /// How long the next failure waits.
    next: Duration,
    /// When the next attempt is due, once one failed.
    due: Option<Instant>,
    /// Attempts that failed since the last success.
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: FIRST,
            due: None,
            failures: 0,
        }
    }
}

impl Backoff {
    /// An attempt failed at `now`: the next one is due after the current
    /// wait, which then doubles (up to [`LONGEST`]). Returns the wait.
    pub(super) fn failed(&mut self, now: Instant) -> Duration {
        let wait = self.next;
        self.due = Some(now + wait);
        self.next = (wait * 2).min(LONGEST);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// When the next attempt is due, if one failed.
    pub(super) fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Whether an attempt is due at `now`; if so it is taken (no longer due).
    pub(super) fn take_due(&mut self, now: Instant) -> bool {
        match self.due {
            Some(at) if at <= now => {
                self.due = None;
                true
            }
            _ => false,
        }
    }

    /// Whether the failure just counted is worth a log line: the first few
    /// and then every tenth, so that a broker that keeps refusing (one
    /// attempt a minute at most) fills no log.
    pub(super) fn worth_logging(&self) -> bool {
        self.failures <= 5 || self.failures % 10 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_from_one_second_up_to_a_minute() {
        let mut b = Backoff::default();
        let t0 = Instant::now();
        assert_eq!(b.due(), None);
        assert!(!b.take_due(t0));
        let waits: Vec<u64> = (0..9).map(|_| b.failed(t0).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.due(), Some(t0 + LONGEST));
    }

    #[test]
    fn an_attempt_is_due_once_its_wait_passed_and_is_taken_once() {
        let mut b = Backoff::default();
        let t0 = Instant::now();
        b.failed(t0);
        assert!(!b.take_due(t0 + Duration::from_millis(999)));
        assert!(b.take_due(t0 + FIRST));
        assert!(!b.take_due(t0 + FIRST), "taken twice");
        assert_eq!(b.failed(t0 + FIRST), Duration::from_secs(2));
        assert_eq!(b.due(), Some(t0 + Duration::from_secs(3)));
    }

    #[test]
    fn retries_are_logged_sparsely() {
        let mut b = Backoff::default();
        let logged = (0..100)
            .filter(|_| {
                b.failed(Instant::now());
                b.worth_logging()
            })
            .count();
        assert_eq!(logged, 5 + 10);
    }
}
