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

/// Most results kept.
const MAX_KEPT: usize = weft_proto::limits::MAX_NODE_RESULTS_KEPT;
/// Most payload bytes (outputs and error texts) kept.
const MAX_KEPT_BYTES: usize = 64 * 1024 * 1024;

/// The sent `Finished` events still within the redelivery window.
///
/// A queue in the order they were sent, and nothing else: keeping one
/// costs a push and, once the window is full, a pop, with no table to
/// look it up in (results stream at tens of thousands a second, and a
/// node used to spend a twentieth of its CPU keeping such a table). Only
/// the rare cases search the queue: a cancelled attempt (forgotten, out of
/// at most `MAX_KEPT` entries), and an attempt sent again, whose earlier
/// copy stays until it leaves the front and is left out of
/// [`snapshot`](Self::snapshot).
#[derive(Debug)]
pub(crate) struct Redelivery {
    window: Duration,
    max: usize,
    max_bytes: usize,
    /// Sent results, oldest first.
    kept: VecDeque<Kept>,
    /// Payload bytes of `kept`.
    bytes: usize,
}

#[derive(Debug)]
struct Kept {
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
            kept: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Keeps `event` (a `Finished`, sent at `now`) for the window.
    pub(crate) fn record(&mut self, event: Event, now: Instant) {
        if self.window.is_zero() {
            return;
        }
        let bytes = event.body.payload_len();
        self.bytes += bytes;
        self.kept.push_back(Kept {
            sent_at: now,
            event,
            bytes,
        });
        self.prune(now);
    }

    /// Forgets an attempt the coordinator cancelled: it is stale there.
    pub(crate) fn forget(&mut self, key: AttemptKey) {
        if !self.kept.iter().any(|kept| kept.event.key() == key) {
            return;
        }
        let mut freed = 0;
        self.kept.retain(|kept| {
            let stale = kept.event.key() == key;
            if stale {
                freed += kept.bytes;
            }
            !stale
        });
        self.bytes -= freed;
    }

    /// The events still within the window at `now`, each attempt's latest
    /// once, in the order those were sent (sending them again does not
    /// extend the window).
    pub(crate) fn snapshot(&mut self, now: Instant) -> Vec<Event> {
        self.prune(now);
        let mut seen: AttemptMap<()> = AttemptMap::default();
        let mut latest: Vec<Event> = self
            .kept
            .iter()
            .rev()
            .filter(|kept| seen.insert(kept.event.key(), ()).is_none())
            .map(|kept| kept.event.clone())
            .collect();
        latest.reverse();
        latest
    }

    /// Number of attempts kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        let keys: std::collections::HashSet<AttemptKey> =
            self.kept.iter().map(|kept| kept.event.key()).collect();
        keys.len()
    }

    /// Drops the oldest entries while they are past the window or over the
    /// limits.
    fn prune(&mut self, now: Instant) {
        while let Some(oldest) = self.kept.front() {
            let expired = now.saturating_duration_since(oldest.sent_at) >= self.window;
            if !expired && self.kept.len() <= self.max && self.bytes <= self.max_bytes {
                break;
            }
            self.bytes -= oldest.bytes;
            self.kept.pop_front();
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

    fn finished(error: &str) -> Event {
        Event {
            task_id: TaskId::new(),
            attempt: Attempt::FIRST,
            body: Body::Finished(Finished {
                outcome: Outcome::Failed,
                exit_code: None,
                output: Bytes::new(),
                error: error.to_owned(),
            }),
        }
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
            let event = finished(name);
            kept.record(event, t0 + i as u32 * 10 * SECOND);
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
        let event = finished("stale");
        let stale = event.key();
        kept.record(event, t0);
        let event = finished("current");
        kept.record(event, t0);
        kept.forget(stale);
        kept.forget((TaskId::new(), Attempt::FIRST)); // unknown: ignored
        assert_eq!(errors(&kept.snapshot(t0)), ["current"]);
    }

    #[test]
    fn the_oldest_go_first_past_the_count_or_byte_limit() {
        let t0 = Instant::now();
        let mut kept = Redelivery::with_limits(60 * SECOND, 2, 1000);
        for name in ["a", "b", "c"] {
            let event = finished(name);
            kept.record(event, t0);
        }
        assert_eq!(errors(&kept.snapshot(t0)), ["b", "c"]);
        let mut kept = Redelivery::with_limits(60 * SECOND, 100, 10);
        for name in ["aaaa", "bbbb", "cccc"] {
            let event = finished(name);
            kept.record(event, t0);
        }
        assert_eq!(errors(&kept.snapshot(t0)), ["bbbb", "cccc"]);
    }

    #[test]
    fn a_zero_window_keeps_nothing_and_a_repeated_attempt_is_kept_once() {
        let t0 = Instant::now();
        let mut kept = Redelivery::new(Duration::ZERO);
        let event = finished("a");
        kept.record(event, t0);
        assert!(kept.snapshot(t0).is_empty());
        let mut kept = Redelivery::new(60 * SECOND);
        let event = finished("first");
        kept.record(event.clone(), t0);
        let mut again = event;
        again.body = finished("second").body;
        kept.record(again, t0);
        assert_eq!(errors(&kept.snapshot(t0)), ["second"]);
        assert_eq!(kept.len(), 1);
    }

    #[test]
    fn an_attempt_sent_again_is_kept_at_its_latest_and_one_sent_after_its_cancel_is_kept() {
        let t0 = Instant::now();
        let mut kept = Redelivery::new(60 * SECOND);
        let a = finished("a");
        kept.record(a.clone(), t0);
        kept.record(finished("b"), t0);
        kept.record(a.clone(), t0 + SECOND);
        assert_eq!(
            errors(&kept.snapshot(t0 + SECOND)),
            ["b", "a"],
            "each attempt once, where it was last sent"
        );
        assert_eq!(kept.len(), 2);
        kept.forget(a.key());
        assert_eq!(errors(&kept.snapshot(t0 + SECOND)), ["b"]);
        assert_eq!(kept.bytes, "b".len(), "every copy of a left with its bytes");
        // The attempt's CANCELLED result, sent after the Cancel, is kept:
        // the coordinator has not recorded it yet.
        kept.record(a, t0 + 2 * SECOND);
        assert_eq!(errors(&kept.snapshot(t0 + 2 * SECOND)), ["b", "a"]);
        assert_eq!(
            errors(&kept.snapshot(t0 + 61 * SECOND)),
            ["a"],
            "the window runs from each copy's own send"
        );
    }
}
