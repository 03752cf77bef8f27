//! Attempts whose result was recorded recently, so a node that sends the
//! same `Finished` again (it redelivers its results after every
//! re-registration, for a window) is recognised and ignored quietly instead
//! of being refused as stale and sent a Cancel.
//!
//! Bounded in time ([`WINDOW`]) and in count ([`MAX_ENTRIES`]); after a
//! restart it is filled from the store's recently final tasks.
//!
//! Every attempt that ends is remembered, but it is looked up only for an
//! event about an attempt that is no longer live (a redelivery, a stale
//! node) or a node registering with attempts the scheduler does not know:
//! rare, and in bursts. So results are kept in the order they came, which
//! costs an append each, and the lookup index (a hash table: a cache miss
//! per insert and per expiry) is built only when a lookup comes, kept up
//! while lookups keep coming, and dropped once none came for
//! [`INDEX_IDLE`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use weft_proto::{Attempt, Outcome, TaskId};

/// How long a recorded result is remembered. Longer than a node keeps its
/// results for redelivery (60 s by default), with room for reconnect
/// backoff.
pub const WINDOW: Duration = Duration::from_secs(300);

/// Most results remembered at once (about 40 bytes each, and as much again
/// while the index is built).
pub const MAX_ENTRIES: usize = 200_000;

/// How long the index is kept with no lookup.
pub const INDEX_IDLE: Duration = Duration::from_secs(30);

/// One remembered result: when it was recorded, the attempt, its outcome.
type Entry = (Instant, TaskId, u32, Option<Outcome>);

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct RecentResults {
    /// Oldest first.
    order: VecDeque<Entry>,
    /// Entries taken off the front of `order` so far: entry `n` of all
    /// ever remembered is `order[n - popped]`.
    popped: u64,
    /// While built: each attempt's latest entry number and outcome.
    index: Option<Index>,
}

#[derive(Debug)]
struct Index {
    entries: crate::IdMap<(TaskId, u32), (u64, Option<Outcome>)>,
    /// The last lookup.
    used: Instant,
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
        let number = self.popped + self.order.len() as u64;
        self.order.push_back((now, task, attempt.0, outcome));
        if let Some(index) = &mut self.index {
            index.entries.insert((task, attempt.0), (number, outcome));
        }
        while self.order.len() > MAX_ENTRIES {
            self.pop_oldest();
        }
    }

    /// True when a `Finished` with `outcome` for this attempt repeats the
    /// result already recorded.
    pub fn is_duplicate(
        &mut self,
        task: TaskId,
        attempt: Attempt,
        outcome: Outcome,
        now: Instant,
    ) -> bool {
        match self.lookup(task, attempt, now) {
            Some(Some(recorded)) => recorded == outcome,
            Some(None) => true,
            None => false,
        }
    }

    /// True when this attempt's result was recorded (whatever it was).
    pub fn contains(&mut self, task: TaskId, attempt: Attempt, now: Instant) -> bool {
        self.lookup(task, attempt, now).is_some()
    }

    /// The recorded outcome of this attempt (`Some(None)`: recorded, not
    /// known), building the index first if it is not built.
    fn lookup(&mut self, task: TaskId, attempt: Attempt, now: Instant) -> Option<Option<Outcome>> {
        let popped = self.popped;
        let order = &self.order;
        let index = self.index.get_or_insert_with(|| {
            let mut entries = crate::IdMap::default();
            entries.reserve(order.len());
            for (n, (_, task, attempt, outcome)) in order.iter().enumerate() {
                entries.insert((*task, *attempt), (popped + n as u64, *outcome));
            }
            Index { entries, used: now }
        });
        index.used = now;
        index
            .entries
            .get(&(task, attempt.0))
            .map(|(_, outcome)| *outcome)
    }

    /// Forgets results older than the window, and the index when it has
    /// not been used for [`INDEX_IDLE`].
    pub fn expire(&mut self, now: Instant) {
        while let Some((at, ..)) = self.order.front() {
            if now.saturating_duration_since(*at) < WINDOW {
                break;
            }
            self.pop_oldest();
        }
        if self
            .index
            .as_ref()
            .is_some_and(|index| now.saturating_duration_since(index.used) >= INDEX_IDLE)
        {
            self.index = None;
        }
    }

    fn pop_oldest(&mut self) {
        let Some((_, task, attempt, _)) = self.order.pop_front() else {
            return;
        };
        let number = self.popped;
        self.popped += 1;
        if let Some(index) = &mut self.index
            && index
                .entries
                .get(&(task, attempt))
                .is_some_and(|(n, _)| *n == number)
        {
            // Only if no later entry for the same attempt replaced it.
            index.entries.remove(&(task, attempt));
        }
    }

    /// How many results are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the lookup index is built now.
    #[cfg(test)]
    pub fn indexed(&self) -> bool {
        self.index.is_some()
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
        assert!(recent.is_duplicate(id, Attempt(1), Outcome::Succeeded, t0));
        assert!(!recent.is_duplicate(id, Attempt(1), Outcome::Failed, t0));
        assert!(!recent.is_duplicate(id, Attempt(2), Outcome::Succeeded, t0));
        let late = t0 + WINDOW - Duration::from_secs(1);
        recent.expire(late);
        assert!(recent.contains(id, Attempt(1), late));
        recent.expire(t0 + WINDOW);
        assert!(!recent.contains(id, Attempt(1), t0 + WINDOW));
        assert_eq!(recent.len(), 0);
    }

    #[test]
    fn the_index_is_built_at_the_first_lookup_kept_up_while_used_and_dropped_when_idle() {
        let mut recent = RecentResults::default();
        let t0 = Instant::now();
        let ids: Vec<TaskId> = (0..100).map(|_| TaskId::new()).collect();
        for id in &ids[..50] {
            recent.insert(*id, Attempt(1), Some(Outcome::Succeeded), t0);
        }
        assert!(!recent.indexed(), "recording results builds no index");
        assert!(recent.contains(ids[7], Attempt(1), t0));
        assert!(recent.indexed());
        // Recorded while the index is up: found through it.
        for id in &ids[50..] {
            recent.insert(*id, Attempt(1), Some(Outcome::Failed), t0);
        }
        assert!(recent.is_duplicate(ids[99], Attempt(1), Outcome::Failed, t0));
        assert!(!recent.contains(ids[99], Attempt(2), t0));
        // Unused for INDEX_IDLE: dropped; the next lookup builds it again
        // from every result still remembered.
        let idle = t0 + INDEX_IDLE;
        recent.expire(idle);
        assert!(!recent.indexed());
        assert_eq!(recent.len(), 100, "the results themselves are kept");
        assert!(recent.is_duplicate(ids[0], Attempt(1), Outcome::Succeeded, idle));
        assert!(recent.is_duplicate(ids[60], Attempt(1), Outcome::Failed, idle));
        assert!(recent.indexed());
    }

    #[test]
    fn an_attempt_recorded_twice_is_remembered_until_its_later_entry_expires() {
        let mut recent = RecentResults::default();
        let t0 = Instant::now();
        let id = TaskId::new();
        recent.insert(id, Attempt(1), None, t0);
        assert!(recent.contains(id, Attempt(1), t0), "index built");
        let t1 = t0 + Duration::from_secs(100);
        recent.insert(id, Attempt(1), Some(Outcome::Succeeded), t1);
        // The first entry leaves with the window; the second stands.
        recent.expire(t0 + WINDOW);
        assert_eq!(recent.len(), 1);
        assert!(recent.is_duplicate(id, Attempt(1), Outcome::Succeeded, t0 + WINDOW));
        assert!(!recent.is_duplicate(id, Attempt(1), Outcome::Failed, t0 + WINDOW));
        recent.expire(t1 + WINDOW);
        assert!(!recent.contains(id, Attempt(1), t1 + WINDOW));
    }

    #[test]
    fn at_most_max_entries_are_kept_the_oldest_going_first() {
        let mut recent = RecentResults::default();
        let t0 = Instant::now();
        let first = TaskId::new();
        recent.insert(first, Attempt(1), Some(Outcome::Succeeded), t0);
        assert!(recent.contains(first, Attempt(1), t0));
        let mut last = first;
        for _ in 0..MAX_ENTRIES {
            last = TaskId::new();
            recent.insert(last, Attempt(1), Some(Outcome::Succeeded), t0);
        }
        assert_eq!(recent.len(), MAX_ENTRIES);
        assert!(!recent.contains(first, Attempt(1), t0));
        assert!(recent.contains(last, Attempt(1), t0));
    }
}
