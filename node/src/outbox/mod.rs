//! The node's outgoing work messages: attempt events drained from the event
//! channel into `TaskEvents` batches, the unsent buffer (events whose batch
//! the broken stream did not take), the redelivery window
//! ([`redelivery`]: sent `Finished` events kept to send again after a
//! reconnect), the sent output ([`resend`]: `Started` events and output
//! chunks kept to send again after a reconnect), and credit grants.
//!
//! Two orders are kept here. Within a session, an attempt's slots are
//! released when its `Finished` is put in a batch, so the `Credits` that
//! follow come after the `Finished` they answer. After `Registered`,
//! [`Outbox::resume`] sends the kept `Started` and output first (an
//! attempt's `Started`, then its chunks, before its result), then the
//! redelivered results, then what the last stream broke on, then the free
//! credits.
//!
//! The session owns the stream and decides when to send; this module does
//! not dial, read, or know about heartbeats and the lease. It holds events
//! as domain values ([`Event`]) and never builds a wire message itself:
//! each batch, and each `Credits`, is encoded by `codec.rs` as it goes
//! out. The batch limits count events and payload bytes (output, error and
//! progress texts: `EventBody::payload_len`), not encoded sizes: the ids
//! and framing of at most 512 events keep a batch of half a MiB of payload
//! under the smallest limit a coordinator may set (1 MiB). One event is
//! kept within the coordinator's limit (`Registered.max_message_size`) as
//! it enters a batch ([`fit`]): a result too large for any message is
//! reported as a failure saying so, instead of a batch the coordinator
//! would refuse (which would break the stream, again at every reconnect).

pub(crate) mod redelivery;
pub(crate) mod resend;

use std::iter::Peekable;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use std::vec;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use weft_proto::{Outcome, limits, pb};

use crate::codec;
use crate::error::Error;
use crate::events::{AttemptKey, Event, EventBody, EventRx};
use crate::executor::Executor;
use crate::outbox::redelivery::Redelivery;
use crate::outbox::resend::SentOutput;

/// Most events in one `TaskEvents` message.
const MAX_BATCH_EVENTS: usize = 512;
/// Payload bytes after which a batch is sent (within any coordinator's
/// message limit, with the framing of `MAX_BATCH_EVENTS` events).
const MAX_BATCH_BYTES: usize = limits::MAX_EVENT_BATCH_PAYLOAD;

/// The sending half of a session's stream.
pub(crate) type Out = mpsc::Sender<pb::NodeMessage>;

/// What outlives a session on the way out: the unsent buffer and the
/// redelivery window, and the executor whose slots sent results free.
pub(crate) struct Outbox {
    executor: Executor,
    /// Sent `Finished` events, kept to be sent again after a reconnect.
    redelivery: Mutex<Redelivery>,
    /// Sent output chunks, kept to be sent again after a reconnect.
    sent_output: Mutex<SentOutput>,
    /// Events taken from the event channel whose batch could not be sent
    /// because the stream broke; the next session sends them first.
    unsent: Mutex<Vec<Event>>,
    /// The largest message the coordinator takes (its `Registered` says;
    /// gRPC's default until then).
    message_limit: AtomicUsize,
}

impl Outbox {
    /// An empty outbox keeping sent results for `redeliver_window`.
    pub(crate) fn new(executor: Executor, redeliver_window: Duration) -> Self {
        Outbox {
            executor,
            redelivery: Mutex::new(Redelivery::new(redeliver_window)),
            sent_output: Mutex::new(SentOutput::new(redeliver_window)),
            unsent: Mutex::new(Vec::new()),
            message_limit: AtomicUsize::new(limits::LEGACY_MAX_MESSAGE_BYTES),
        }
    }

    /// Keeps every event sent from now on within `limit` bytes, what the
    /// coordinator's `Registered` says it takes.
    pub(crate) fn set_message_limit(&self, limit: usize) {
        self.message_limit.store(limit, Ordering::Relaxed);
    }

    fn redelivery(&self) -> MutexGuard<'_, Redelivery> {
        // No code panics while holding this lock; recover anyway.
        self.redelivery
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sent_output(&self) -> MutexGuard<'_, SentOutput> {
        // No code panics while holding this lock; recover anyway.
        self.sent_output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn unsent(&self) -> MutexGuard<'_, Vec<Event>> {
        // No code panics while holding this lock; recover anyway.
        self.unsent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Events waiting in the unsent buffer (for the metrics).
    pub(crate) fn unsent_len(&self) -> usize {
        self.unsent().len()
    }

    /// The results to send again after the next `Registered`, as of `now`.
    /// Exactly these are sent, so every attempt listed as finished in
    /// `Register` gets its result.
    pub(crate) fn redeliverable(&self, now: Instant) -> Vec<Event> {
        self.redelivery().snapshot(now)
    }

    /// Never sends the output of `key` again, nor its result when
    /// `result_sent` (its result may have been sent): the coordinator
    /// cancelled it, so it is stale there. Looking for a sent result
    /// searches every result kept, so a cancel of an attempt still running
    /// here (the usual case) leaves that out.
    pub(crate) fn forget(&self, key: AttemptKey, result_sent: bool) {
        if result_sent {
            self.redelivery().forget(key);
        }
        self.sent_output().forget(key);
    }

    /// The `Started` events and output chunks to send again after the
    /// next `Registered`, as of `now`: those kept of the attempts `listed`
    /// in `Register` (sorted), each attempt's `Started` (while its result
    /// is unsent), then its chunks in seq order. The coordinator ignores a
    /// `Started` of an attempt it has running, and drops the chunks it
    /// has.
    pub(crate) fn resendable(&self, listed: &[AttemptKey], now: Instant) -> Vec<Event> {
        self.sent_output().resend(listed, now)
    }

    /// `Register.running`, sorted: the attempts this node still runs (or
    /// whose `Finished` has not been sent yet, also one whose batch broke
    /// with the last stream) AND the recently finished attempts whose
    /// `Finished` was sent before and is sent again right after
    /// `Registered` (`redeliver`). Listing the latter makes a coordinator
    /// that restarted before recording their results keep those attempts
    /// (rather than requeue them) until the result arrives; one that
    /// already recorded them ignores the repeat (or answers Cancel, which
    /// drops them from redelivery).
    pub(crate) fn listed(&self, redeliver: &[Event]) -> Vec<AttemptKey> {
        let mut running = self.executor.running_keys();
        running.extend(
            self.unsent()
                .iter()
                .filter(|event| event.is_finished())
                .map(Event::key),
        );
        running.extend(redeliver.iter().map(Event::key));
        running.sort_unstable();
        running.dedup();
        running
    }

    /// Right after `Registered`, in this order: the `Started` and output
    /// chunks sent on an earlier stream (`resend`: the coordinator may have
    /// died before recording them, or the stream broke with them; each
    /// attempt's `Started` first, then its chunks, before its result and
    /// newer output), the results of an earlier session (`redeliver`:
    /// listed attempts that no longer run stop counting against the slots
    /// once their `Finished` is in), then what the last stream broke on
    /// (before anything newer), then the free slots as credits.
    pub(crate) async fn resume(
        &self,
        out: &Out,
        resend: Vec<Event>,
        redeliver: Vec<Event>,
    ) -> Result<(), Error> {
        if !resend.is_empty() {
            debug!(events = resend.len(), "sending output chunks again");
        }
        send_again(out, resend).await?;
        send_again(out, redeliver).await?;
        let unsent = std::mem::take(&mut *self.unsent());
        if !unsent.is_empty() {
            debug!(
                events = unsent.len(),
                "sending events the last stream broke on"
            );
            self.send_events(out, unsent).await?;
        }
        self.grant(out).await
    }

    /// Sends one `TaskEvents` batch: `first` (if any) plus whatever else is
    /// ready, within the batch limits. Answers whether the batch held a
    /// `Finished`.
    pub(crate) async fn send_batch(
        &self,
        out: &Out,
        events: &mut EventRx,
        first: Option<Event>,
    ) -> Result<bool, Error> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        let limit = self.message_limit.load(Ordering::Relaxed);
        let mut next = first.or_else(|| events.try_recv().ok());
        while let Some(event) = next {
            let event = fit(event, limit);
            bytes += event.body.payload_len();
            batch.push(event);
            if batch.len() >= MAX_BATCH_EVENTS || bytes >= MAX_BATCH_BYTES {
                break;
            }
            next = events.try_recv().ok();
        }
        if batch.is_empty() {
            return Ok(false);
        }
        self.send_events(out, batch).await
    }

    /// Sends `batch` as `TaskEvents` messages within the batch limits.
    /// Slots of finished attempts are released here, so the grant that
    /// follows comes after their `Finished`; sent `Finished` events are
    /// kept for redelivery. If the stream is gone, the events not sent are
    /// kept for the next session (which lists their attempts in
    /// `Register`), so a result is never dropped between the channel and a
    /// broken stream. Answers whether the batch held a `Finished`.
    pub(crate) async fn send_events(&self, out: &Out, batch: Vec<Event>) -> Result<bool, Error> {
        let mut any_finished = false;
        let mut rest = batch.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk = next_chunk(&mut rest);
            let mut sent_finished = Vec::new();
            let mut sent_output = Vec::new();
            for event in &chunk {
                if let EventBody::Started { .. } | EventBody::Output { .. } = event.body {
                    // A clone shares the bytes.
                    sent_output.push(event.clone());
                }
                if event.is_finished() {
                    any_finished = true;
                    let key = event.key();
                    self.executor.release(key);
                    sent_finished.push((key, event.clone()));
                }
            }
            // Room first, so a closed stream hands the chunk back typed.
            let Ok(permit) = out.reserve().await else {
                let mut kept = self.unsent();
                kept.extend(chunk);
                kept.extend(rest);
                return Err(Error::StreamClosed);
            };
            permit.send(codec::events(chunk));
            if !sent_output.is_empty() || !sent_finished.is_empty() {
                let now = Instant::now();
                let mut kept = self.sent_output();
                for event in &sent_output {
                    kept.record(event);
                }
                for (key, _) in &sent_finished {
                    kept.finished(*key, now);
                }
            }
            if !sent_finished.is_empty() {
                let now = Instant::now();
                let mut redelivery = self.redelivery();
                for (_, event) in sent_finished {
                    redelivery.record(event, now);
                }
            }
        }
        Ok(any_finished)
    }

    /// Grants the free slots (none while draining).
    pub(crate) async fn grant(&self, out: &Out) -> Result<(), Error> {
        match self.executor.take_grant() {
            Some(grant) => {
                debug!(grant, "granting credits");
                send(out, codec::credits(grant)).await
            }
            None => Ok(()),
        }
    }

    /// Takes the unsent buffer (tests look at what a broken stream left).
    #[cfg(test)]
    pub(crate) fn take_unsent(&self) -> Vec<Event> {
        std::mem::take(&mut *self.unsent())
    }
}

/// Sends one message (encoded by `codec`) on the stream.
pub(crate) async fn send(out: &Out, message: pb::NodeMessage) -> Result<(), Error> {
    out.send(message).await.map_err(|_| Error::StreamClosed)
}

/// Sends again events of an earlier session (kept output, or `Finished`
/// events): one batch, or as few as the batch limits allow.
async fn send_again(out: &Out, events: Vec<Event>) -> Result<(), Error> {
    if events.is_empty() {
        return Ok(());
    }
    debug!(events = events.len(), "sending events again");
    let mut rest = events.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk = next_chunk(&mut rest);
        out.send(codec::events(chunk))
            .await
            .map_err(|_| Error::StreamClosed)?;
    }
    Ok(())
}

/// `event` as it may be sent to a coordinator taking messages of `limit`
/// bytes: its texts cut to `limits::MAX_NODE_TEXT_BYTES` (what the
/// coordinator stores of them), and a `Finished` whose output would not
/// fit even alone in a message sent without it: a success as a failure
/// that says so, any other outcome as it is. Output
/// chunks are small already (`Emitter::output` splits them).
fn fit(mut event: Event, limit: usize) -> Event {
    match &mut event.body {
        EventBody::Progress { message, .. } => limits::truncate_node_text(message),
        EventBody::Finished(done) => {
            limits::truncate_node_text(&mut done.error);
            // Ids, tags and lengths around the payload take far less than
            // the envelope reserve; counted, not encoded (no copy).
            if done.output.len() + done.error.len() > limits::max_spec_bytes(limit) {
                // Only a success is turned into a failure: any other
                // outcome (a timeout is retried as one) keeps its own,
                // without the output.
                if done.outcome == Outcome::Succeeded {
                    done.error = format!(
                        "the result is {} bytes; the coordinator takes at most {limit} in one message (--max-message-size)",
                        done.output.len()
                    );
                    done.outcome = Outcome::Failed;
                }
                done.output = bytes::Bytes::new();
            }
        }
        EventBody::Started { .. } | EventBody::Output { .. } => {}
    }
    event
}

/// The next `TaskEvents` worth of `rest`: at least one event, then as many
/// as the batch limits allow.
fn next_chunk(rest: &mut Peekable<vec::IntoIter<Event>>) -> Vec<Event> {
    let mut chunk = Vec::new();
    let mut bytes = 0;
    while let Some(event) = rest.next_if(|event| {
        chunk.is_empty()
            || (chunk.len() < MAX_BATCH_EVENTS
                && bytes + event.body.payload_len() <= MAX_BATCH_BYTES)
    }) {
        bytes += event.body.payload_len();
        chunk.push(event);
    }
    chunk
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use weft_proto::{Attempt, OutputStream, TaskId};

    use super::*;
    use crate::events::EventBody;

    fn output(bytes: usize) -> Event {
        Event {
            task_id: TaskId::new(),
            attempt: Attempt::FIRST,
            body: EventBody::Output {
                stream: OutputStream::Stdout,
                seq: 0,
                data: Bytes::from(vec![b'x'; bytes]),
            },
        }
    }

    #[test]
    fn chunks_keep_the_event_and_byte_limits_and_take_at_least_one_event() {
        let events: Vec<_> = (0..MAX_BATCH_EVENTS + 3).map(|_| output(1)).collect();
        let mut rest = events.into_iter().peekable();
        assert_eq!(next_chunk(&mut rest).len(), MAX_BATCH_EVENTS);
        assert_eq!(next_chunk(&mut rest).len(), 3);
        assert!(rest.peek().is_none());

        let big = MAX_BATCH_BYTES / 2 + 1;
        let huge = vec![output(MAX_BATCH_BYTES * 2), output(big), output(big)];
        let mut rest = huge.into_iter().peekable();
        assert_eq!(
            next_chunk(&mut rest).len(),
            1,
            "an oversized event goes alone"
        );
        assert_eq!(
            next_chunk(&mut rest).len(),
            1,
            "two halves exceed the limit"
        );
        assert_eq!(next_chunk(&mut rest).len(), 1);
    }

    fn finished(output: usize, error: usize) -> Event {
        Event {
            task_id: TaskId::new(),
            attempt: Attempt::FIRST,
            body: EventBody::Finished(crate::events::Finished {
                outcome: Outcome::Succeeded,
                exit_code: None,
                output: Bytes::from(vec![b'o'; output]),
                error: "e".repeat(error),
            }),
        }
    }

    #[test]
    fn a_full_batch_fits_in_the_smallest_message_a_coordinator_takes() {
        use prost::Message;
        let per_event = MAX_BATCH_BYTES / MAX_BATCH_EVENTS;
        let events: Vec<_> = (0..MAX_BATCH_EVENTS).map(|_| output(per_event)).collect();
        let mut rest = events.into_iter().peekable();
        let message = codec::events(next_chunk(&mut rest));
        assert!(rest.peek().is_none());
        assert!(message.encoded_len() <= limits::MIN_MAX_MESSAGE_BYTES);
    }

    #[test]
    fn a_result_too_large_for_any_message_is_a_failure_saying_so() {
        use prost::Message;
        let limit = limits::MIN_MAX_MESSAGE_BYTES;
        let at = finished(limits::max_spec_bytes(limit) - 200, 0);
        let kept = fit(at.clone(), limit);
        assert_eq!(kept, at, "a result that fits is sent as it is");
        assert!(codec::events(vec![kept]).encoded_len() <= limit);

        let over = fit(finished(limit, 10), limit);
        let EventBody::Finished(done) = &over.body else {
            panic!("not finished");
        };
        assert_eq!(done.outcome, Outcome::Failed);
        assert!(done.output.is_empty());
        assert!(
            done.error.contains(&limit.to_string()) && done.error.contains("--max-message-size"),
            "{}",
            done.error
        );

        let texts = fit(finished(0, 1024 * 1024), limit);
        let EventBody::Finished(done) = &texts.body else {
            panic!("not finished");
        };
        assert_eq!(done.outcome, Outcome::Succeeded);
        assert!(done.error.len() <= limits::MAX_NODE_TEXT_BYTES);
        assert!(done.error.ends_with(limits::TRUNCATED_MARKER));
    }

    /// Only a success turns into a failure for its size: a timeout or a
    /// cancel keeps its outcome (a timeout is retried as one), without
    /// the output.
    #[test]
    fn a_result_too_large_that_did_not_succeed_keeps_its_outcome_without_the_output() {
        let limit = limits::MIN_MAX_MESSAGE_BYTES;
        for outcome in [Outcome::TimedOut, Outcome::Cancelled, Outcome::Failed] {
            let mut event = finished(limit, 0);
            if let EventBody::Finished(done) = &mut event.body {
                done.outcome = outcome;
                done.error = "timed out after 1s".into();
            }
            let EventBody::Finished(done) = fit(event, limit).body else {
                panic!("not finished");
            };
            assert_eq!(
                (done.outcome, done.output.len(), done.error.as_str()),
                (outcome, 0, "timed out after 1s")
            );
        }
    }
}
