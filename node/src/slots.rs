//! Slot and credit accounting: which attempts hold the node's slots, which
//! wait for one, and how many credits the session may grant. The node's
//! counterpart of the coordinator's sans-I/O scheduler: a plain struct with
//! no runtime, no clock, no lock and no I/O. The executor keeps it behind
//! its mutex and does the spawning and reporting; what time it needs comes
//! in as arguments (an attempt's run time, the lease's silence).
//!
//! Prefetch: the node grants `slots + prefetch` credits, so the coordinator
//! may assign more than the free slots. An assignment that finds no free
//! slot waits in a FIFO (assigned, not started) and starts as soon as a slot
//! frees, so the next task is already here when one ends. How much it holds
//! adapts to the work: enough queued attempts per slot to cover
//! [`REFILL_TIME`] at the average run time seen so far, never more than the
//! configured prefetch (none before the first attempt ends), so short tasks
//! stream while long ones stay spread over the nodes. Never more than
//! `slots` run at once.
//!
//! An attempt holds its slots until [`Slots::release`] (the session took its
//! `Finished`), so credits are only granted back after the `Finished` they
//! answer. Invariants: `used <= total`, and
//! `used + queued_slots + window <= total + prefetch`, where `window` is
//! what this session granted and the coordinator has not used yet.
//!
//! Generic over what the executor keeps per attempt: `C` stops a running
//! attempt (kept while it runs), `W` is what starting it takes.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use crate::events::{AttemptKey, AttemptMap};

/// How long the coordinator takes to refill a freed credit (the node's
/// `Finished` and `Credits`, a commit, the next `Assign`), with margin: the
/// node keeps enough queued work to cover it.
pub(crate) const REFILL_TIME: Duration = Duration::from_millis(10);

/// An attempt assigned to this node that does not run yet: queued for its
/// slots, or handed back to be started, refused or reported.
#[derive(Debug)]
pub(crate) struct Queued<C, W> {
    /// The attempt.
    pub(crate) key: AttemptKey,
    /// Slots it takes while it runs (at least 1).
    pub(crate) slots: u32,
    /// Stops it once it runs; kept in the running set.
    pub(crate) control: C,
    /// What starting it takes.
    pub(crate) work: W,
}

/// Why an assignment was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The attempt is already running or queued here: ignore the repeat.
    Duplicate,
    /// The node is draining.
    Draining,
    /// The lease ran out this long ago: the coordinator gave up on the node.
    LeaseExpired(Duration),
    /// More slots than the node has, or than its capacity leaves free.
    OverCapacity {
        /// Slots the task needs.
        needs: u32,
        /// Slots free now.
        free: u32,
        /// The node's slots.
        total: u32,
        /// Slots of the attempts queued for a slot.
        queued: u32,
        /// The most prefetch allowed.
        prefetch: u32,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Duplicate => f.write_str("duplicate assignment"),
            Refusal::Draining => f.write_str("node is draining"),
            Refusal::LeaseExpired(silence) => write!(f, "lease expired {silence:?} ago"),
            Refusal::OverCapacity {
                needs,
                free,
                total,
                queued,
                prefetch,
            } => write!(
                f,
                "node over capacity: task needs {needs} slots, {free} of {total} free, {queued} queued (prefetch {prefetch})"
            ),
        }
    }
}

/// What [`Slots::assign`] answers: the attempts that start now, or the
/// refused one with the reason.
pub(crate) type Taken<C, W> = Result<Vec<Queued<C, W>>, (Refusal, Queued<C, W>)>;

/// A running attempt's entry.
#[derive(Debug)]
struct Running<C> {
    slots: u32,
    control: C,
}

/// The node's slots, its prefetch queue and its credit window.
#[derive(Debug)]
pub(crate) struct Slots<C, W> {
    total: u32,
    /// The most prefetch allowed (configured).
    prefetch: u32,
    /// Average run time of the attempts that ended (EWMA), if any did.
    run_time: Option<Duration>,
    used: u32,
    /// Slots of the attempts waiting in `queued`.
    queued_slots: u32,
    /// Credits this session granted that the coordinator has not used yet.
    window: u32,
    draining: bool,
    running: AttemptMap<Running<C>>,
    /// Assigned, not started: FIFO, started as slots free.
    queued: VecDeque<Queued<C, W>>,
    /// The keys in `queued`, so a repeated assignment is found in one
    /// probe however long the queue (a node's prefetch may hold a
    /// thousand attempts).
    queued_keys: AttemptMap<()>,
}

impl<C: Clone, W> Slots<C, W> {
    /// `total` slots (at least 1) and at most `prefetch` queued besides.
    pub(crate) fn new(total: u32, prefetch: u32) -> Self {
        Slots {
            total: total.max(1),
            prefetch,
            run_time: None,
            used: 0,
            queued_slots: 0,
            window: 0,
            draining: false,
            running: AttemptMap::default(),
            queued: VecDeque::new(),
            queued_keys: AttemptMap::default(),
        }
    }

    /// Prefetch in use now: enough to cover [`REFILL_TIME`] at the average
    /// run time, per slot, within the configured prefetch; none before an
    /// attempt has ended.
    fn prefetch_now(&self) -> u32 {
        let Some(run_time) = self.run_time else {
            return 0;
        };
        let per_slot = REFILL_TIME.as_nanos() / run_time.as_nanos().max(1) + 1;
        let wanted = u32::try_from(per_slot).unwrap_or(u32::MAX);
        wanted.saturating_mul(self.total).min(self.prefetch)
    }

    /// Attempts the node holds: running or queued.
    pub(crate) fn held(&self) -> usize {
        self.running.len() + self.queued.len()
    }

    /// Whether `key` is running or queued here.
    pub(crate) fn holds(&self, key: AttemptKey) -> bool {
        self.running.contains_key(&key) || self.queued_keys.contains_key(&key)
    }

    /// Number of attempts holding slots.
    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    /// Number of assigned attempts waiting for a slot.
    pub(crate) fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Slots taken by running attempts, and whether the node drains (for
    /// the metrics).
    pub(crate) fn used(&self) -> (u32, bool) {
        (self.used, self.draining)
    }

    /// The attempts holding slots or queued for one, sorted.
    pub(crate) fn keys(&self) -> Vec<AttemptKey> {
        let mut keys: Vec<_> = self
            .running
            .keys()
            .chain(self.queued.iter().map(|q| &q.key))
            .copied()
            .collect();
        keys.sort_unstable();
        keys
    }

    /// A new session starts with an empty credit window.
    pub(crate) fn reset_window(&mut self) {
        self.window = 0;
    }

    /// Credits to grant now so that `used + queued + window == total +
    /// prefetch`, or `None` (nothing free, or draining: a draining node
    /// never grants).
    pub(crate) fn take_grant(&mut self) -> Option<u32> {
        if self.draining {
            return None;
        }
        let capacity = self.total.saturating_add(self.prefetch_now());
        let grant = capacity.saturating_sub(self.used + self.queued_slots + self.window);
        self.window += grant;
        (grant > 0).then_some(grant)
    }

    /// An assignment used `slots` of the granted window, whether it runs or
    /// not.
    pub(crate) fn consume_window(&mut self, slots: u32) {
        self.window = self.window.saturating_sub(slots);
    }

    /// Takes an assignment: queues it, then answers the queue's head
    /// attempts that now have their slots (to be started, in order). A
    /// refused one comes back with the reason. `lease_overdue` is asked
    /// only when the attempt would otherwise be taken, with the caller's
    /// lock held, so an expiry that stops every attempt under that lock
    /// either sees this one or refuses it.
    pub(crate) fn assign(
        &mut self,
        attempt: Queued<C, W>,
        lease_overdue: impl FnOnce() -> Option<Duration>,
    ) -> Taken<C, W> {
        self.consume_window(attempt.slots);
        let key = attempt.key;
        if self.running.contains_key(&key) || self.queued_keys.contains_key(&key) {
            return Err((Refusal::Duplicate, attempt));
        }
        if self.draining {
            return Err((Refusal::Draining, attempt));
        }
        if let Some(silence) = lease_overdue() {
            return Err((Refusal::LeaseExpired(silence), attempt));
        }
        let capacity = self.total.saturating_add(self.prefetch);
        if attempt.slots > self.total || self.used + self.queued_slots + attempt.slots > capacity {
            let refusal = Refusal::OverCapacity {
                needs: attempt.slots,
                free: self.total - self.used,
                total: self.total,
                queued: self.queued_slots,
                prefetch: self.prefetch,
            };
            return Err((refusal, attempt));
        }
        self.queued_slots += attempt.slots;
        self.queued_keys.insert(key, ());
        self.queued.push_back(attempt);
        Ok(self.start_queued())
    }

    /// Frees the slots of an attempt whose `Finished` the session took, and
    /// answers the queued attempts that now fit (to be started, in order).
    pub(crate) fn release(&mut self, key: AttemptKey) -> Vec<Queued<C, W>> {
        if let Some(done) = self.running.remove(&key) {
            self.used = self.used.saturating_sub(done.slots);
        }
        self.start_queued()
    }

    /// Folds one attempt's run time into the average prefetch follows.
    pub(crate) fn record_run_time(&mut self, took: Duration) {
        self.run_time = Some(match self.run_time {
            None => took,
            Some(average) => (average * 7 + took) / 8,
        });
    }

    /// Stops granting and taking assignments; answers the queued attempts
    /// (they never ran) to be reported.
    pub(crate) fn set_draining(&mut self) -> Vec<Queued<C, W>> {
        self.draining = true;
        self.take_queued()
    }

    /// The control of a running attempt.
    pub(crate) fn control(&self, key: AttemptKey) -> Option<&C> {
        self.running.get(&key).map(|running| &running.control)
    }

    /// The controls of every running attempt.
    pub(crate) fn controls(&self) -> impl Iterator<Item = &C> {
        self.running.values().map(|running| &running.control)
    }

    /// Takes a queued attempt off the queue (it never ran).
    pub(crate) fn dequeue(&mut self, key: AttemptKey) -> Option<Queued<C, W>> {
        self.queued_keys.remove(&key)?;
        let index = self.queued.iter().position(|q| q.key == key)?;
        let queued = self.queued.remove(index)?;
        self.queued_slots = self.queued_slots.saturating_sub(queued.slots);
        Some(queued)
    }

    /// Empties the queue (its attempts never ran).
    pub(crate) fn take_queued(&mut self) -> Vec<Queued<C, W>> {
        self.queued_slots = 0;
        self.queued_keys.clear();
        self.queued.drain(..).collect()
    }

    /// Moves the queue's head attempts into `running` while their slots
    /// fit; answers them.
    fn start_queued(&mut self) -> Vec<Queued<C, W>> {
        let mut ready = Vec::new();
        while let Some(head) = self.queued.front() {
            if self.used + head.slots > self.total {
                break;
            }
            let Some(next) = self.queued.pop_front() else {
                break;
            };
            self.queued_slots = self.queued_slots.saturating_sub(next.slots);
            self.queued_keys.remove(&next.key);
            self.used += next.slots;
            self.running.insert(
                next.key,
                Running {
                    slots: next.slots,
                    control: next.control.clone(),
                },
            );
            ready.push(next);
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::{Attempt, TaskId};

    use super::*;

    /// Controls and work are plain labels here.
    type TestSlots = Slots<&'static str, &'static str>;

    fn attempt(slots: u32, label: &'static str) -> Queued<&'static str, &'static str> {
        Queued {
            key: (TaskId::new(), Attempt::FIRST),
            slots,
            control: label,
            work: label,
        }
    }

    fn labels(started: &[Queued<&'static str, &'static str>]) -> Vec<&'static str> {
        started.iter().map(|q| q.work).collect()
    }

    fn no_lease_trouble() -> Option<Duration> {
        None
    }

    /// Takes `attempt`, panicking on a refusal; answers what started.
    fn take(
        slots: &mut TestSlots,
        attempt: Queued<&'static str, &'static str>,
    ) -> Vec<&'static str> {
        match slots.assign(attempt, no_lease_trouble) {
            Ok(started) => labels(&started),
            Err((refusal, _)) => panic!("refused: {refusal}"),
        }
    }

    fn refusal(slots: &mut TestSlots, attempt: Queued<&'static str, &'static str>) -> Refusal {
        match slots.assign(attempt, no_lease_trouble) {
            Ok(started) => panic!("taken: {:?}", labels(&started)),
            Err((refusal, _)) => refusal,
        }
    }

    /// An attempt is held from its assignment, queued or running, to its
    /// release; a cancel asks this to know whether it may have sent its
    /// result already.
    #[test]
    fn an_attempt_is_held_queued_or_running_until_its_release() {
        let mut slots = TestSlots::new(1, 1);
        let (a, b) = (attempt(1, "a"), attempt(1, "b"));
        let (a_key, b_key) = (a.key, b.key);
        assert!(!slots.holds(a_key));
        assert_eq!(take(&mut slots, a), ["a"]);
        assert!(take(&mut slots, b).is_empty(), "b waits for a's slot");
        assert!(
            slots.holds(a_key) && slots.holds(b_key),
            "running and queued"
        );
        assert_eq!(labels(&slots.release(a_key)), ["b"]);
        assert!(!slots.holds(a_key) && slots.holds(b_key));
        assert!(slots.release(b_key).is_empty());
        assert!(!slots.holds(b_key));
    }

    #[test]
    fn free_slots_are_granted_once_and_topped_up_after_a_release() {
        let mut slots = TestSlots::new(2, 0);
        assert_eq!(slots.take_grant(), Some(2));
        assert_eq!(slots.take_grant(), None, "the window holds both");
        let a = attempt(1, "a");
        let key = a.key;
        assert_eq!(take(&mut slots, a), ["a"]);
        assert_eq!(slots.take_grant(), None, "one slot used, one still granted");
        assert!(slots.release(key).is_empty());
        assert_eq!(slots.take_grant(), Some(1));
        slots.reset_window();
        assert_eq!(slots.take_grant(), Some(2), "a new session grants afresh");
    }

    #[test]
    fn a_task_larger_than_the_node_or_its_free_capacity_is_refused() {
        let mut slots = TestSlots::new(2, 0);
        assert!(matches!(
            refusal(&mut slots, attempt(3, "huge")),
            Refusal::OverCapacity { needs: 3, .. }
        ));
        assert_eq!(take(&mut slots, attempt(2, "big")), ["big"]);
        let over = refusal(&mut slots, attempt(1, "over"));
        assert_eq!(
            over.to_string(),
            "node over capacity: task needs 1 slots, 0 of 2 free, 0 queued (prefetch 0)"
        );
        assert_eq!((slots.running(), slots.queued()), (1, 0));
    }

    #[test]
    fn prefetch_follows_the_average_run_time_within_its_maximum() {
        let mut slots = TestSlots::new(2, 8);
        assert_eq!(
            slots.take_grant(),
            Some(2),
            "no prefetch before a run time is known"
        );
        slots.reset_window();
        slots.record_run_time(REFILL_TIME);
        // Two queued per slot cover the refill time at that run time.
        assert_eq!(slots.take_grant(), Some(2 + 4));
        let mut short = TestSlots::new(2, 8);
        short.record_run_time(Duration::from_micros(1));
        assert_eq!(short.take_grant(), Some(2 + 8), "capped at the maximum");
        let mut long = TestSlots::new(2, 8);
        long.record_run_time(Duration::from_secs(60));
        assert_eq!(
            long.take_grant(),
            Some(2 + 2),
            "one per slot for long tasks"
        );
    }

    #[test]
    fn queued_attempts_start_in_order_as_slots_free_and_never_overcommit() {
        let mut slots = TestSlots::new(2, 2);
        let first = attempt(2, "first");
        let first_key = first.key;
        assert_eq!(take(&mut slots, first), ["first"]);
        assert!(take(&mut slots, attempt(1, "second")).is_empty());
        assert!(take(&mut slots, attempt(1, "third")).is_empty());
        assert!(matches!(
            refusal(&mut slots, attempt(1, "fourth")),
            Refusal::OverCapacity { queued: 2, .. }
        ));
        assert_eq!((slots.running(), slots.queued(), slots.held()), (1, 2, 3));
        assert_eq!(labels(&slots.release(first_key)), ["second", "third"]);
        assert_eq!((slots.running(), slots.queued()), (2, 0));
        assert_eq!(slots.keys().len(), 2);
    }

    #[test]
    fn a_repeated_assignment_is_a_duplicate_and_consumes_its_window() {
        let mut slots = TestSlots::new(1, 0);
        assert_eq!(slots.take_grant(), Some(1));
        let a = attempt(1, "a");
        let again = Queued {
            key: a.key,
            ..attempt(1, "again")
        };
        take(&mut slots, a);
        assert_eq!(refusal(&mut slots, again), Refusal::Duplicate);
        assert_eq!(slots.take_grant(), None);
    }

    #[test]
    fn a_queued_attempt_assigned_again_is_a_duplicate_until_it_leaves_the_queue() {
        let mut slots = TestSlots::new(1, 4);
        take(&mut slots, attempt(1, "running"));
        let queued: Vec<_> = (0..3).map(|_| attempt(1, "queued")).collect();
        let keys: Vec<AttemptKey> = queued.iter().map(|q| q.key).collect();
        for q in queued {
            assert!(take(&mut slots, q).is_empty());
        }
        let again = |key, label| Queued {
            key,
            ..attempt(1, label)
        };
        for key in &keys {
            assert_eq!(
                refusal(&mut slots, again(*key, "again")),
                Refusal::Duplicate
            );
        }
        // Dequeued (cancelled before it ran): no longer held, so taken.
        assert!(slots.dequeue(keys[1]).is_some());
        assert!(take(&mut slots, again(keys[1], "back")).is_empty());
        assert_eq!(slots.queued(), 3);
        // Drained: nothing is held any more but the running attempt.
        let handed_back = slots.take_queued();
        assert_eq!(labels(&handed_back), ["queued", "queued", "back"]);
        assert!(take(&mut slots, again(keys[0], "after drain")).is_empty());
        assert_eq!(slots.queued(), 1);
    }

    #[test]
    fn a_draining_node_refuses_work_hands_back_its_queue_and_never_grants() {
        let mut slots = TestSlots::new(1, 1);
        slots.record_run_time(Duration::from_secs(1));
        take(&mut slots, attempt(1, "running"));
        assert!(take(&mut slots, attempt(1, "queued")).is_empty());
        assert_eq!(labels(&slots.set_draining()), ["queued"]);
        assert_eq!(refusal(&mut slots, attempt(1, "late")), Refusal::Draining);
        slots.reset_window();
        assert_eq!(slots.take_grant(), None);
        assert_eq!((slots.running(), slots.queued()), (1, 0));
    }

    #[test]
    fn the_lease_is_asked_only_for_an_attempt_that_would_be_taken() {
        let mut slots = TestSlots::new(1, 0);
        let a = attempt(1, "a");
        let key = a.key;
        take(&mut slots, a);
        let duplicate = Queued {
            key,
            ..attempt(1, "dup")
        };
        let asked = std::cell::Cell::new(false);
        let overdue = || {
            asked.set(true);
            Some(Duration::from_secs(7))
        };
        assert!(matches!(
            slots.assign(duplicate, overdue),
            Err((Refusal::Duplicate, _))
        ));
        assert!(!asked.get());
        let refused = slots.assign(attempt(1, "late"), overdue);
        assert!(matches!(
            refused,
            Err((Refusal::LeaseExpired(silence), _)) if silence == Duration::from_secs(7)
        ));
        assert!(asked.get());
    }

    #[test]
    fn a_cancelled_queued_attempt_leaves_the_queue_and_its_slots() {
        let mut slots = TestSlots::new(1, 1);
        let running = attempt(1, "running");
        let running_key = running.key;
        take(&mut slots, running);
        let queued = attempt(1, "queued");
        let queued_key = queued.key;
        take(&mut slots, queued);
        assert_eq!(slots.control(running_key), Some(&"running"));
        assert_eq!(
            slots.control(queued_key),
            None,
            "queued attempts do not run"
        );
        assert_eq!(slots.dequeue(queued_key).map(|q| q.work), Some("queued"));
        assert!(slots.dequeue(queued_key).is_none());
        assert_eq!(slots.controls().copied().collect::<Vec<_>>(), ["running"]);
        assert!(
            take(&mut slots, attempt(1, "next")).is_empty(),
            "room again"
        );
    }
}
