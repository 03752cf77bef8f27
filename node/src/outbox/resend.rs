//! `Started` events and output chunks kept after they were sent, to send
//! again after a reconnect.
//!
//! A coordinator may crash after reading a chunk and before recording it;
//! nobody acknowledged it, so without this it is lost for good (`weft
//! watch` would show every line but that one). So the node keeps the
//! chunks it sent of each attempt that still runs, or whose `Finished` is
//! within the redelivery window, and right after re-registering sends
//! them again, in seq order, ahead of everything else of theirs. The
//! coordinator drops a chunk whose seq it already has (it restores the
//! next seq it expects from its store), so this repeats nothing.
//!
//! The same goes for an attempt's `Started`, kept until its `Finished` is
//! sent and sent again first of all its events: one lost with a broken
//! stream (or with a coordinator that died before recording it) leaves
//! the attempt waiting to start there, and taken back after the start
//! timeout from a node that runs it. A coordinator that has the attempt
//! running already ignores the repeat. Only a `Started` that was sent is
//! kept, so one still waiting to be sent is never sent twice.
//!
//! Bounded in bytes ([`MAX_KEPT_BYTES`] per node, counting output only;
//! a `Started` is never dropped for room): past it the oldest chunks go
//! first, with a warning once per attempt (the coordinator then
//! counts a gap if it missed them). An attempt the coordinator cancelled,
//! or not listed in the next `Register`, is forgotten. Plain state with
//! `now` passed in: no timers, no locks, no I/O; the outbox sends.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::events::{AttemptKey, AttemptMap, Event, EventBody};

/// Most payload bytes of sent output kept per node: the last 8 MiB.
pub(crate) const MAX_KEPT_BYTES: usize = 8 * 1024 * 1024;

/// Sent output chunks, per attempt, oldest first.
#[derive(Debug)]
pub(crate) struct SentOutput {
    /// How long after its `Finished` was sent an attempt's chunks are kept
    /// (the redelivery window: its result is sent again that long too).
    window: Duration,
    max_bytes: usize,
    bytes: usize,
    /// Chunks kept, in all.
    count: usize,
    attempts: AttemptMap<Kept>,
    /// Every kept chunk by `(number, attempt)`, oldest first: which to drop
    /// past the byte bound. An item whose chunk is gone is skipped.
    order: VecDeque<(u64, AttemptKey)>,
    /// Attempts whose `Finished` was sent, with when, oldest first.
    finished: VecDeque<(Instant, AttemptKey)>,
    next_number: u64,
}

#[derive(Debug, Default)]
struct Kept {
    /// The attempt's `Started`, until its `Finished` is sent.
    started: Option<Event>,
    /// `(number, chunk)` in seq order.
    chunks: VecDeque<(u64, Event)>,
    /// Older chunks were dropped past the byte bound (warned once).
    truncated: bool,
}

impl SentOutput {
    /// Keeps up to [`MAX_KEPT_BYTES`], finished attempts for `window`.
    pub(crate) fn new(window: Duration) -> Self {
        Self::with_limit(window, MAX_KEPT_BYTES)
    }

    fn with_limit(window: Duration, max_bytes: usize) -> Self {
        SentOutput {
            window,
            max_bytes,
            bytes: 0,
            count: 0,
            attempts: AttemptMap::default(),
            order: VecDeque::new(),
            finished: VecDeque::new(),
            next_number: 0,
        }
    }

    /// Keeps `event` if it is a `Started` or an output chunk (it was just
    /// sent).
    pub(crate) fn record(&mut self, event: &Event) {
        let data = match &event.body {
            EventBody::Output { data, .. } => data,
            EventBody::Started { .. } => {
                self.attempts.entry(event.key()).or_default().started = Some(event.clone());
                return;
            }
            EventBody::Progress { .. } | EventBody::Finished(_) => return,
        };
        let number = self.next_number;
        self.next_number += 1;
        let key = event.key();
        self.bytes += data.len();
        self.attempts
            .entry(key)
            .or_default()
            .chunks
            .push_back((number, event.clone()));
        self.order.push_back((number, key));
        self.count += 1;
        while self.bytes > self.max_bytes {
            self.drop_oldest();
        }
        if self.order.len() > 2 * self.count + 64 {
            // Items of forgotten attempts pile up while others live on.
            let attempts = &self.attempts;
            self.order.retain(|(number, key)| {
                attempts
                    .get(key)
                    .and_then(|kept| kept.chunks.front())
                    .is_some_and(|(first, _)| first <= number)
            });
        }
    }

    /// The `Finished` of `key` was sent at `now`: its chunks stay for the
    /// window, like the result; its `Started` goes (sent again after the
    /// result, it would name an attempt the coordinator has ended).
    pub(crate) fn finished(&mut self, key: AttemptKey, now: Instant) {
        if let Some(kept) = self.attempts.get_mut(&key) {
            kept.started = None;
            if kept.chunks.is_empty() {
                self.forget(key);
            } else {
                self.finished.push_back((now, key));
            }
        }
        self.prune(now);
    }

    /// Forgets an attempt (the coordinator cancelled it: stale there).
    pub(crate) fn forget(&mut self, key: AttemptKey) {
        if let Some(kept) = self.attempts.remove(&key) {
            self.count -= kept.chunks.len();
            self.bytes -= kept
                .chunks
                .iter()
                .map(|(_, event)| event.body.payload_len())
                .sum::<usize>();
        }
        if self.attempts.is_empty() {
            self.order.clear();
            self.finished.clear();
        }
    }

    /// The events to send again on a new session, at `now`: only those of
    /// `listed` (the attempts the new `Register` lists; the rest are
    /// forgotten), attempt by attempt: its `Started`, then its chunks in
    /// seq order.
    pub(crate) fn resend(&mut self, listed: &[AttemptKey], now: Instant) -> Vec<Event> {
        self.prune(now);
        let stale: Vec<AttemptKey> = self
            .attempts
            .keys()
            .filter(|key| listed.binary_search(key).is_err())
            .copied()
            .collect();
        for key in stale {
            self.forget(key);
        }
        let mut keys: Vec<&AttemptKey> = self.attempts.keys().collect();
        keys.sort_unstable();
        keys.into_iter()
            .flat_map(|key| {
                let kept = &self.attempts[key];
                let chunks = kept.chunks.iter().map(|(_, e)| e);
                kept.started.iter().chain(chunks).cloned()
            })
            .collect()
    }

    /// Payload bytes kept.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops finished attempts past the window.
    fn prune(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.finished.front() {
            if now.saturating_duration_since(at) < self.window {
                break;
            }
            self.finished.pop_front();
            self.forget(key);
        }
    }

    /// Drops the oldest kept chunk.
    fn drop_oldest(&mut self) {
        while let Some((number, key)) = self.order.pop_front() {
            let Some(kept) = self.attempts.get_mut(&key) else {
                continue; // forgotten
            };
            if kept.chunks.front().is_none_or(|(n, _)| *n != number) {
                continue;
            }
            let Some((_, event)) = kept.chunks.pop_front() else {
                continue;
            };
            self.bytes -= event.body.payload_len();
            self.count -= 1;
            if !kept.truncated {
                kept.truncated = true;
                let (task_id, attempt) = key;
                warn!(
                    %task_id,
                    attempt = attempt.0,
                    kept_bytes = self.max_bytes,
                    "output sent more than the last 8 MiB ago is no longer kept to send again; a coordinator crash now may lose some of it"
                );
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use weft_proto::{Attempt, OutputStream, TaskId};

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn chunk(key: AttemptKey, seq: u64, text: &str) -> Event {
        Event {
            task_id: key.0,
            attempt: key.1,
            body: EventBody::Output {
                stream: OutputStream::Stdout,
                seq,
                data: Bytes::from(text.to_owned()),
            },
        }
    }

    fn seqs(events: &[Event]) -> Vec<(AttemptKey, u64)> {
        events
            .iter()
            .map(|e| match e.body {
                EventBody::Output { seq, .. } => (e.key(), seq),
                _ => panic!("not output: {e:?}"),
            })
            .collect()
    }

    fn sorted(mut keys: Vec<AttemptKey>) -> Vec<AttemptKey> {
        keys.sort_unstable();
        keys
    }

    #[test]
    fn sent_chunks_are_kept_per_attempt_in_seq_order_until_forgotten() {
        let (a, b) = ((TaskId::new(), Attempt(1)), (TaskId::new(), Attempt(2)));
        let mut kept = SentOutput::new(60 * SECOND);
        let t0 = Instant::now();
        kept.record(&chunk(a, 0, "a0"));
        kept.record(&chunk(b, 0, "b0"));
        kept.record(&chunk(a, 1, "a1"));
        let listed = sorted(vec![a, b]);
        let again = kept.resend(&listed, t0);
        let mut expected = vec![(a, 0), (a, 1), (b, 0)];
        if b < a {
            expected.rotate_left(2);
        }
        assert_eq!(seqs(&again), expected);
        assert_eq!(
            seqs(&kept.resend(&listed, t0)),
            expected,
            "sending again keeps them"
        );
        kept.forget(a);
        assert_eq!(seqs(&kept.resend(&listed, t0)), [(b, 0)]);
        assert_eq!(
            kept.resend(&[], t0),
            [],
            "an attempt not listed is forgotten"
        );
        assert_eq!(kept.bytes(), 0);
    }

    #[test]
    fn the_oldest_chunks_go_first_past_the_byte_bound() {
        let (a, b) = ((TaskId::new(), Attempt(1)), (TaskId::new(), Attempt(1)));
        let mut kept = SentOutput::with_limit(60 * SECOND, 12);
        kept.record(&chunk(a, 0, "aaaa"));
        kept.record(&chunk(b, 0, "bbbb"));
        kept.record(&chunk(a, 1, "aaaa"));
        assert_eq!(kept.bytes(), 12);
        kept.record(&chunk(b, 1, "bbbb"));
        assert_eq!(kept.bytes(), 12, "a0 dropped");
        let listed = sorted(vec![a, b]);
        let mut again = seqs(&kept.resend(&listed, Instant::now()));
        again.sort_unstable();
        let mut expected = vec![(a, 1), (b, 0), (b, 1)];
        expected.sort_unstable();
        assert_eq!(again, expected);
    }

    #[test]
    fn what_forgotten_attempts_leave_behind_does_not_pile_up() {
        let long = (TaskId::new(), Attempt(1));
        let mut kept = SentOutput::new(60 * SECOND);
        kept.record(&chunk(long, 0, "long"));
        for _ in 0..1000 {
            let short = (TaskId::new(), Attempt(1));
            kept.record(&chunk(short, 0, "short"));
            kept.forget(short);
        }
        assert!(kept.order.len() <= 2 * kept.count + 64 + 1);
        assert_eq!((kept.count, kept.bytes()), (1, 4));
        assert_eq!(seqs(&kept.resend(&[long], Instant::now())), [(long, 0)]);
    }

    fn started(key: AttemptKey, pid: u32) -> Event {
        Event {
            task_id: key.0,
            attempt: key.1,
            body: EventBody::Started { pid },
        }
    }

    #[test]
    fn a_sent_started_goes_first_of_its_attempt_until_its_result_is_sent() {
        let (a, b) = ((TaskId::new(), Attempt(1)), (TaskId::new(), Attempt(1)));
        let mut kept = SentOutput::with_limit(60 * SECOND, 4);
        let t0 = Instant::now();
        kept.record(&started(a, 7));
        kept.record(&chunk(a, 0, "aaaa"));
        kept.record(&started(b, 8));
        kept.record(&chunk(a, 1, "aaaa"));
        let listed = sorted(vec![a, b]);
        let again = kept.resend(&listed, t0);
        let of_a: Vec<_> = again.iter().filter(|e| e.key() == a).collect();
        assert_eq!(
            of_a,
            [&started(a, 7), &chunk(a, 1, "aaaa")],
            "first, and never dropped for room"
        );
        assert!(again.contains(&started(b, 8)));
        // Once its result is sent, only its chunks are kept (for the
        // window); an attempt with none is forgotten.
        kept.finished(a, t0);
        kept.finished(b, t0);
        assert_eq!(kept.resend(&listed, t0), [chunk(a, 1, "aaaa")]);
    }

    #[test]
    fn a_finished_attempts_chunks_go_with_the_redelivery_window() {
        let a = (TaskId::new(), Attempt(1));
        let t0 = Instant::now();
        let mut kept = SentOutput::new(60 * SECOND);
        kept.record(&chunk(a, 0, "a0"));
        kept.finished(a, t0);
        assert_eq!(seqs(&kept.resend(&[a], t0 + 59 * SECOND)), [(a, 0)]);
        assert_eq!(kept.resend(&[a], t0 + 60 * SECOND), []);
        let mut kept = SentOutput::new(Duration::ZERO);
        kept.record(&chunk(a, 0, "a0"));
        kept.finished(a, t0);
        assert_eq!(kept.resend(&[a], t0), [], "a zero window keeps nothing");
    }
}
