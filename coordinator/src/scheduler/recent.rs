//! Attempts whose result was recorded recently, so a node that sends the
//! same `Finished` again (it redelivers its results after every
//! re-registration, for a window) is recognised and ignored quietly instead
//! of being refused as stale and sent a Cancel.
//!
//! Bounded in time ([`WINDOW`]) and in count ([`MAX_ENTRIES`]); after a
//! restart it is filled from the store's recently final tasks.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use weft_proto::{Attempt, Outcome, TaskId};

/// How long a recorded result is remembered. Longer than a node keeps its
/// results for redelivery (60 s by default), with room for reconnect
/// backoff.
pub const WINDOW: Duration = Duration::from_secs(300);

/// Most results remembered at once (about 60 bytes each).
pub const MAX_ENTRIES: usize = 200_000;

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct RecentResults {
    results: crate::IdMap<(TaskId, u32), Option<Outcome>>,
    order: VecDeque<(Instant, TaskId, u32)>,
}

impl RecentResults {
    /// Remembers that `attempt` of `task` ended with `outcome` (`None`:
    /// result unknown, e.g. restored from an older record).
    pub fn insert(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        outcome: Option<Outcome>,
        now: Instant,
    ) {
        if self.results.insert((task, attempt.0), outcome).is_none() {
            self.order.push_back((now, task, attempt.0));
        }
        while self.order.len() > MAX_ENTRIES {
            self.pop_oldest();
        }
    }

    /// True when a `Finished` with `outcome` for this attempt repeats the
    /// result already recorded.
    pub fn is_duplicate(&self, task: TaskId, attempt: Attempt, outcome: Outcome) -> bool {
        match self.results.get(&(task, attempt.0)) {
            Some(Some(recorded)) => *recorded == outcome,
            Some(None) => true,
            None => false,
        }
    }

    /// True when this attempt's result was recorded (whatever it was).
    pub fn contains(&self, task: TaskId, attempt: Attempt) -> bool {
        self.results.contains_key(&(task, attempt.0))
    }

    /// Forgets results older than the window.
    pub fn expire(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < WINDOW {
                break;
            }
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, task, attempt)) = self.order.pop_front() {
            self.results.remove(&(task, attempt));
        }
    }

    /// How many results are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_result_is_a_duplicate_until_the_window_ends() {
        let mut recent = RecentResults::default();
        let t0 = Instant::now();
        let id = TaskId::new();
        recent.insert(id, Attempt(1), Some(Outcome::Succeeded), t0);
        assert!(recent.is_duplicate(id, Attempt(1), Outcome::Succeeded));
        assert!(!recent.is_duplicate(id, Attempt(1), Outcome::Failed));
        assert!(!recent.is_duplicate(id, Attempt(2), Outcome::Succeeded));
        recent.expire(t0 + WINDOW - Duration::from_secs(1));
        assert!(recent.contains(id, Attempt(1)));
        recent.expire(t0 + WINDOW);
        assert!(!recent.contains(id, Attempt(1)));
        assert_eq!(recent.len(), 0);
    }
}
