//! The accept loop's two pacing rules, as plain state with `now` passed
//! in: [`Backoff`], how long to wait after a failed `accept` (so a loop
//! that cannot accept, e.g. out of descriptors, never spins), and
//! [`Throttle`], when a warning a peer can cause in a flood may be logged
//! again (with the count of what it stands for). No timers, no logging.

use std::time::{Duration, Instant};

/// Exponential backoff: `min`, doubling per failure up to `max`; back to
/// `min` after a success.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The wait after one more failure.
    pub(crate) fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// A success: the next failure waits `min` again.
    pub(crate) fn succeeded(&mut self) {
        self.next = self.min;
    }
}

/// Lets a warning through at most once per `every`, counting the
/// occurrences in between so the warning that does go out says how many
/// it stands for.
#[derive(Debug)]
pub(crate) struct Throttle {
    every: Duration,
    last: Option<Instant>,
    count: u64,
}

impl Throttle {
    pub(crate) fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            count: 0,
        }
    }

    /// One more occurrence at `now`: `Some(n)` when a warning is due, `n`
    /// being the occurrences since the last one (this one included).
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        self.hit_by(now, 1)
    }

    /// [`hit`](Self::hit) for `n` occurrences at once.
    pub(crate) fn hit_by(&mut self, now: Instant, n: usize) -> Option<u64> {
        self.count += u64::try_from(n).unwrap_or(u64::MAX);
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.every);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Backoff, Throttle};

    #[test]
    fn backoff_doubles_to_its_ceiling_and_a_success_resets_it() {
        let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
        let waits: Vec<u128> = (0..10).map(|_| backoff.failed().as_millis()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), Duration::from_millis(5));
    }

    #[test]
    fn a_throttled_warning_goes_out_first_then_once_per_period_with_the_count() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut throttle = Throttle::new(Duration::from_secs(5));
        assert_eq!(throttle.hit(at(0)), Some(1));
        for ms in 1..1000 {
            assert_eq!(throttle.hit(at(ms)), None);
        }
        // The next one due stands for the 999 held back and itself.
        assert_eq!(throttle.hit(at(5000)), Some(1000));
        assert_eq!(throttle.hit(at(5001)), None);
        assert_eq!(throttle.hit(at(20_000)), Some(2));
    }
}
