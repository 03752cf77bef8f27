//! The node's one outgoing event channel, the [`Event`]s it carries and the
//! per-attempt [`Emitter`] that produces them.
//!
//! Every attempt event (started, output, progress, finished) goes through one
//! bounded channel that the outbox (`outbox/`) drains into `TaskEvents`
//! batches. The bound is the node's buffer while it is disconnected: when it
//! is full, attempts wait (their pipes fill, the children block) instead of
//! the node dropping output or growing without limit. Events are domain
//! values: typed ids ([`AttemptKey`]) and an [`EventBody`] typed with
//! `weft_proto`'s domain enums ([`Outcome`], [`OutputStream`]); output moves
//! as the `Bytes` it was read into. Nothing here knows the wire format: an
//! event becomes a protobuf message only in `codec.rs`, when the outbox
//! sends it. This is the producer side: nothing here sends on the stream or
//! knows about sessions.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc};

use weft_proto::{Attempt, Outcome, OutputStream, TaskId, limits};

/// Events buffered between the attempts and the session.
pub(crate) const EVENT_BUFFER: usize = 4096;

/// An attempt's key: the unit of fencing, slot accounting and redelivery.
pub(crate) type AttemptKey = (TaskId, Attempt);

/// A map by attempt, as the per-attempt tables on the hot path keep them
/// (running slots, output kept to resend, results kept to redeliver):
/// hashed with foldhash (seeded per process), several times faster than
/// the standard library's SipHash on a 20-byte key.
pub(crate) type AttemptMap<V> =
    std::collections::HashMap<AttemptKey, V, foldhash::fast::RandomState>;

/// One event of one attempt, as it waits to be sent.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Event {
    /// The task.
    pub(crate) task_id: TaskId,
    /// Its attempt.
    pub(crate) attempt: Attempt,
    /// What happened.
    pub(crate) body: EventBody,
}

/// What happened to an attempt: the body of an [`Event`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum EventBody {
    /// The attempt started (`pid` of the child for exec tasks, 0 for calls).
    Started {
        /// The child's process id, or 0.
        pid: u32,
    },
    /// A chunk of output.
    Output {
        /// Which stream it came from.
        stream: OutputStream,
        /// Its number within the attempt, from 0, one counter for both
        /// streams.
        seq: u64,
        /// The bytes, never empty.
        data: Bytes,
    },
    /// Progress: `fraction` in 0.0..=1.0, or negative when unknown.
    Progress {
        /// How far along.
        fraction: f64,
        /// In words.
        message: String,
    },
    /// The attempt ended: always its last event.
    Finished(Finished),
}

impl EventBody {
    /// The payload bytes it carries (output, error and progress texts): what
    /// the outbox's batch limit and the redelivery window's byte limit count.
    pub(crate) fn payload_len(&self) -> usize {
        match self {
            EventBody::Started { .. } => 0,
            EventBody::Output { data, .. } => data.len(),
            EventBody::Progress { message, .. } => message.len(),
            EventBody::Finished(done) => done.output.len() + done.error.len(),
        }
    }
}

/// How an attempt ended, as the node reports it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Finished {
    /// The outcome.
    pub(crate) outcome: Outcome,
    /// The process's exit code, when it exited (not when killed by a
    /// signal, and never for calls).
    pub(crate) exit_code: Option<i32>,
    /// The handler's return value (call tasks).
    pub(crate) output: Bytes,
    /// Why it failed, in words; empty when it succeeded.
    pub(crate) error: String,
}

impl Event {
    /// The attempt this event is about.
    pub(crate) fn key(&self) -> AttemptKey {
        (self.task_id, self.attempt)
    }

    /// Whether this is the attempt's `Finished` (its last event).
    pub(crate) fn is_finished(&self) -> bool {
        matches!(self.body, EventBody::Finished(_))
    }
}

/// Sending half of the outgoing event channel.
pub(crate) type EventTx = mpsc::Sender<Event>;
/// Receiving half, owned by the session loop.
pub(crate) type EventRx = mpsc::Receiver<Event>;

/// The node's outgoing event channel.
pub(crate) fn channel() -> (EventTx, EventRx) {
    mpsc::channel(EVENT_BUFFER)
}

/// Reports events of one attempt to the coordinator.
///
/// Output chunks are numbered per attempt from 0 with one counter across
/// stdout and stderr; the counter is held while a chunk is queued, so chunk
/// order in the channel is seq order even with concurrent emitters.
/// Every method answers `false` once the node no longer listens (it was
/// killed or stopped): the attempt is being torn down.
#[derive(Clone, Debug)]
pub struct Emitter {
    tx: EventTx,
    task_id: TaskId,
    attempt: Attempt,
    seq: Arc<Mutex<u64>>,
}

impl Emitter {
    pub(crate) fn new(tx: EventTx, task_id: TaskId, attempt: Attempt) -> Self {
        Emitter {
            tx,
            task_id,
            attempt,
            seq: Arc::new(Mutex::new(0)),
        }
    }

    /// An emitter whose events go nowhere, for calling a handler directly
    /// (tests, benchmarks).
    pub fn detached(task_id: TaskId, attempt: Attempt) -> Self {
        let (tx, _) = mpsc::channel(1);
        Self::new(tx, task_id, attempt)
    }

    /// The task whose events this emits.
    pub fn task_id(&self) -> TaskId {
        self.task_id
    }

    /// The attempt whose events this emits.
    pub fn attempt(&self) -> Attempt {
        self.attempt
    }

    fn event(&self, body: EventBody) -> Event {
        Event {
            task_id: self.task_id,
            attempt: self.attempt,
            body,
        }
    }

    async fn send(&self, body: EventBody) -> bool {
        self.tx.send(self.event(body)).await.is_ok()
    }

    /// The attempt started (`pid` of the child for exec tasks, 0 for calls).
    pub(crate) async fn started(&self, pid: u32) -> bool {
        self.send(EventBody::Started { pid }).await
    }

    /// The attempt ended. Always its last event.
    pub(crate) async fn finished(&self, finished: Finished) -> bool {
        self.send(EventBody::Finished(finished)).await
    }

    /// Queues `Finished` without waiting: `Err(Some(finished))` when the
    /// channel is full (send it later), `Err(None)` when nobody listens.
    pub(crate) fn try_finished(&self, finished: Finished) -> Result<(), Option<Finished>> {
        match self.tx.try_send(self.event(EventBody::Finished(finished))) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(event)) => match event.body {
                EventBody::Finished(finished) => Err(Some(finished)),
                _ => Err(None),
            },
            Err(mpsc::error::TrySendError::Closed(_)) => Err(None),
        }
    }

    /// Streams a chunk of output. Empty chunks are skipped; one larger than
    /// `limits::MAX_OUTPUT_CHUNK` goes as several (so every event fits in
    /// any message the coordinator takes).
    pub async fn output(&self, stream: OutputStream, data: impl Into<Bytes>) -> bool {
        let mut data = data.into();
        let mut seq = self.seq.lock().await;
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(limits::MAX_OUTPUT_CHUNK));
            let chunk = EventBody::Output {
                stream,
                seq: *seq,
                data: piece,
            };
            *seq += 1;
            if !self.send(chunk).await {
                return false;
            }
        }
        true
    }

    /// Reports progress: `fraction` in 0.0..=1.0, or negative when unknown.
    pub async fn progress(&self, fraction: f64, message: impl Into<String>) -> bool {
        let progress = EventBody::Progress {
            fraction,
            message: message.into(),
        };
        self.send(progress).await
    }

    /// [`Emitter::output`] for blocking handlers (on a blocking thread, not
    /// inside async code, where it would panic).
    pub fn blocking_output(&self, stream: OutputStream, data: impl Into<Bytes>) -> bool {
        let mut data = data.into();
        let mut seq = self.seq.blocking_lock();
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(limits::MAX_OUTPUT_CHUNK));
            let chunk = EventBody::Output {
                stream,
                seq: *seq,
                data: piece,
            };
            *seq += 1;
            if self.tx.blocking_send(self.event(chunk)).is_err() {
                return false;
            }
        }
        true
    }

    /// [`Emitter::progress`] for blocking handlers.
    pub fn blocking_progress(&self, fraction: f64, message: impl Into<String>) -> bool {
        let progress = EventBody::Progress {
            fraction,
            message: message.into(),
        };
        self.tx.blocking_send(self.event(progress)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_large_output_chunk_goes_as_numbered_pieces_within_the_chunk_limit() {
        let (tx, mut rx) = mpsc::channel(16);
        let emitter = Emitter::new(tx, TaskId::new(), Attempt::FIRST);
        let size = limits::MAX_OUTPUT_CHUNK * 3 + 10;
        assert!(emitter.output(OutputStream::Stdout, vec![7u8; size]).await);
        assert!(emitter.output(OutputStream::Stderr, "tail").await);
        drop(emitter);
        let mut pieces = Vec::new();
        while let Some(event) = rx.recv().await {
            let EventBody::Output { seq, data, .. } = event.body else {
                panic!("not output");
            };
            pieces.push((seq, data.len()));
        }
        let chunk = limits::MAX_OUTPUT_CHUNK;
        assert_eq!(
            pieces,
            [(0, chunk), (1, chunk), (2, chunk), (3, 10), (4, 4)]
        );
    }
}
