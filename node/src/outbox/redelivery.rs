//! `Finished` events kept after they were sent, to send again after a
//! reconnect.
//!
//! The coordinator may crash after the node sent an attempt's `Finished`
//! but before it durably recorded it; the restarted coordinator would then
//! wait for a result that never comes. So the node keeps what it sent for a
//! window (bounded in count and bytes), lists those attempts in the next
//! `Register.running`, and sends them again right after re-registering. The
//! coordinator ignores a result it already recorded, so this is idempotent.
//! An attempt the coordinator sent `Cancel` for is forgotten: it is stale
//! there. Plain state with `now` passed in: no timers, no locks, no I/O;
//! the outbox sends.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::events::{AttemptKey, AttemptMap, Event};

/// Most attempts kept.
const MAX_KEPT: usize = 10_000;
/// Most payload bytes (outputs and error texts) kept.
const MAX_KEPT_BYTES: usize = 64 * 1024 * 1024;

/// The sent `Finished` events still within the redelivery window.
#[derive(Debug)]
pub(crate) struct Redelivery {
    window: Duration,
    max: usize,
    max_bytes: usize,
    entries: AttemptMap<Entry>,
    /// Entries in the order they were sent, by `(seq, key)`; an entry that
    /// was replaced or forgotten leaves a stale item here, skipped later.
    order: VecDeque<(u64, AttemptKey)>,
    next_seq: u64,
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    sent_at: Instant,
    event: Event,
    bytes: usize,
}

impl Redelivery {
    pub(crate) fn new(window: Duration) -> Self {
        Self::with_limits(window, MAX_KEPT, MAX_KEPT_BYTES)
    }

    fn with_limits(window: Duration, max: usize, max_bytes: usize) -> Self {
        Redelivery {
            window,
            max,
            max_bytes,
            entries: AttemptMap::default(),
            order: VecDeque::new(),
            next_seq: 0,
            bytes: 0,
        }
    }

    /// Keeps `event` (a `Finished`, sent at `now`) for the window.
    pub(crate) fn record(&mut self, key: AttemptKey, event: Event, now: Instant) {
        if self.window.is_zero() {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let bytes = event.body.payload_len();
        let entry = Entry {
            seq,
            sent_at: now,
            event,
            bytes,
        };
        self.bytes += bytes;
        if let Some(old) = self.entries.insert(key, entry) {
            self.bytes -= old.bytes;
        }
        self.order.push_back((seq, key));
        self.prune(now);
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order
                .retain(|(seq, key)| entries.get(key).is_some_and(|e| e.seq == *seq));
        }
    }

    /// Forgets an attempt the coordinator cancelled: it is stale there.
    pub(crate) fn forget(&mut self, key: AttemptKey) {
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= old.bytes;
        }
    }

    /// The events still within the window at `now`, in the order they were
    /// first sent (sending them again does not extend the window).
    pub(crate) fn snapshot(&mut self, now: Instant) -> Vec<Event> {
        self.prune(now);
        self.order
            .iter()
            .filter_map(|(seq, key)| self.entries.get(key).filter(|e| e.seq == *seq))
            .map(|entry| entry.event.clone())
            .collect()
    }

    /// Number of attempts kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Drops the oldest entries while they are past the window or over the
    /// limits.
    fn prune(&mut self, now: Instant) {
        while let Some(&(seq, key)) = self.order.front() {
            let live = self.entries.get(&key).filter(|e| e.seq == seq);
            let Some(entry) = live else {
                self.order.pop_front(); // stale item
                continue;
            };
            let expired = now.saturating_duration_since(entry.sent_at) >= self.window;
            if !expired && self.entries.len() <= self.max && self.bytes <= self.max_bytes {
                break;
            }
            self.order.pop_front();
            self.forget(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use weft_proto::{Attempt, Outcome, TaskId};

    use super::*;
    use crate::events::{EventBody as Body, Finished};

    const SECOND: Duration = Duration::from_secs(1);

    fn finished(error: &str) -> (AttemptKey, Event) {
        let task_id = TaskId::new();
        let event = Event {
            task_id,
            attempt: Attempt::FIRST,
            body: Body::Finished(Finished {
                outcome: Outcome::Failed,
                exit_code: None,
                output: Bytes::new(),
                error: error.to_owned(),
            }),
        };
        ((task_id, Attempt::FIRST), event)
    }

    fn errors(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match &e.body {
                Body::Finished(done) => done.error.clone(),
                _ => String::new(),
            })
            .collect()
    }

    #[test]
    fn sent_results_are_kept_in_order_for_the_window_and_no_longer() {
        let mut kept = Redelivery::new(60 * SECOND);
        let t0 = Instant::now();
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let (key, event) = finished(name);
            kept.record(key, event, t0 + i as u32 * 10 * SECOND);
        }
        assert_eq!(errors(&kept.snapshot(t0 + 30 * SECOND)), ["a", "b", "c"]);
        assert_eq!(
            errors(&kept.snapshot(t0 + 30 * SECOND)),
            ["a", "b", "c"],
            "sending again keeps them, and does not extend the window"
        );
        assert_eq!(errors(&kept.snapshot(t0 + 65 * SECOND)), ["b", "c"]);
        assert_eq!(
            errors(&kept.snapshot(t0 + 80 * SECOND)),
            Vec::<String>::new()
        );
        assert_eq!(kept.len(), 0);
    }

    #[test]
    fn cancelled_attempts_are_forgotten() {
        let mut kept = Redelivery::new(60 * SECOND);
        let t0 = Instant::now();
        let (stale, event) = finished("stale");
        kept.record(stale, event, t0);
        let (key, event) = finished("current");
        kept.record(key, event, t0);
        kept.forget(stale);
        kept.forget((TaskId::new(), Attempt::FIRST)); // unknown: ignored
        assert_eq!(errors(&kept.snapshot(t0)), ["current"]);
    }

    #[test]
    fn the_oldest_go_first_past_the_count_or_byte_limit() {
        let t0 = Instant::now();
        let mut kept = Redelivery::with_limits(60 * SECOND, 2, 1000);
        for name in ["a", "b", "c"] {
            let (key, event) = finished(name);
            kept.record(key, event, t0);
        }
        assert_eq!(errors(&kept.snapshot(t0)), ["b", "c"]);
        let mut kept = Redelivery::with_limits(60 * SECOND, 100, 10);
        for name in ["aaaa", "bbbb", "cccc"] {
            let (key, event) = finished(name);
            kept.record(key, event, t0);
        }
        assert_eq!(errors(&kept.snapshot(t0)), ["bbbb", "cccc"]);
    }

    #[test]
    fn a_zero_window_keeps_nothing_and_a_repeated_attempt_is_kept_once() {
        let t0 = Instant::now();
        let mut kept = Redelivery::new(Duration::ZERO);
        let (key, event) = finished("a");
        kept.record(key, event, t0);
        assert!(kept.snapshot(t0).is_empty());
        let mut kept = Redelivery::new(60 * SECOND);
        let (key, event) = finished("first");
        kept.record(key, event.clone(), t0);
        let mut again = event;
        again.body = finished("second").1.body;
        kept.record(key, again, t0);
        assert_eq!(errors(&kept.snapshot(t0)), ["second"]);
        assert_eq!(kept.len(), 1);
    }
}
