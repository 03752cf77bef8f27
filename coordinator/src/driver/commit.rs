//! The pipelined group commit: each inbox batch's records are written in
//! ONE store commit, and what the batch would make leave the coordinator
//! (replies, node messages, events for watchers) is held until that commit
//! returned.
//!
//! The commit (an fsync with the durable store) runs on the blocking pool.
//! One commit is in flight at a time; while it runs, the driver applies the
//! next batch to the scheduler (commands arriving meanwhile share it). That
//! batch's commit starts once the one in flight returned, and only then
//! are the earlier batch's effects handed back for release, so effects
//! leave in commit order and never before their records are durable.
//!
//! After a failed commit nothing more is committed: the batch prepared
//! meanwhile is refused (its callers get an error) and the driver stops.
//!
//! This file knows nothing of sessions, watchers or the scheduler: it moves
//! batches through the store and hands back what may leave, in order. What
//! a batch holds back (`H`: replies, node messages, sessions to close) is
//! the driver's; the pipeline only carries it.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::store::{Record, Store, StoreError};

/// Answers a caller once its batch's commit returned (with its error, if
/// it failed).
pub(super) type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// One batch applied to the scheduler: what to write, and what may leave
/// once it is written.
pub(super) struct Batch<H> {
    /// The store writes, each task's record once (see
    /// `scheduler::Effects::write_task`).
    pub records: Vec<Record>,
    /// Held until the commit returned.
    pub held: H,
}

/// A batch whose commit returned.
pub(super) struct Committed<H> {
    /// What may leave now (if the commit succeeded).
    pub held: H,
    /// What was written: its events are what watchers get. Empty when
    /// the commit panicked.
    pub records: Vec<Record>,
    /// The commit's result.
    pub result: Result<(), StoreError>,
    /// When the store commit ran, start to end (`None`: nothing was
    /// written, or it panicked): the `commit` span of traces.
    pub ran: Option<(SystemTime, SystemTime)>,
}

/// What [`Pipeline::start`] did with a batch.
pub(super) enum Started<H> {
    /// Batches whose commits returned, oldest first, to release: the one
    /// that was in flight, and this one when it had nothing to write.
    Done([Option<Committed<H>>; 2]),
    /// The commit in flight failed: release it (its callers get the error)
    /// and refuse this batch, which was not committed.
    AfterFailure {
        /// The batch whose commit failed.
        failed: Committed<H>,
        /// The batch that was not committed.
        refused: H,
    },
}

/// The commit in flight and the effects it holds.
struct InFlight<H> {
    commit: JoinHandle<Ran>,
    held: H,
}

/// The store and the one commit in flight, holding back `H` per batch.
/// See the module docs.
pub(super) struct Pipeline<H> {
    store: Arc<dyn Store>,
    in_flight: Option<InFlight<H>>,
    /// Each commit's latency and size, observed once per commit.
    metrics: Arc<Metrics>,
}

impl<H: Default> Pipeline<H> {
    /// An idle pipeline into `store`.
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Pipeline {
            store,
            in_flight: None,
            metrics,
        }
    }

    /// True while a commit runs.
    pub fn is_busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Waits for the commit in flight (if any), then starts `batch`'s
    /// commit, and hands back what may leave now. Starting the next commit
    /// before releasing the previous one's effects keeps the store idle as
    /// little as possible; the order of release stays the commit order.
    pub async fn start(&mut self, batch: Batch<H>) -> Started<H> {
        let previous = match self.in_flight.take() {
            Some(mut in_flight) => Some(wait_for(&mut in_flight).await),
            None => None,
        };
        let previous = match previous {
            // Nothing after a failed commit may be committed or sent.
            Some(failed) if failed.result.is_err() => {
                return Started::AfterFailure {
                    failed,
                    refused: batch.held,
                };
            }
            previous => previous,
        };
        if batch.records.is_empty() {
            let this = Committed {
                held: batch.held,
                records: batch.records,
                result: Ok(()),
                ran: None,
            };
            return Started::Done([previous, Some(this)]);
        }
        let store = Arc::clone(&self.store);
        let metrics = Arc::clone(&self.metrics);
        let records = batch.records;
        self.in_flight = Some(InFlight {
            commit: tokio::task::spawn_blocking(move || {
                let began = Instant::now();
                let started = SystemTime::now();
                let committed = store.commit(&records);
                metrics.observe_commit(records.len(), began.elapsed());
                (records, committed, Some((started, SystemTime::now())))
            }),
            held: batch.held,
        });
        Started::Done([previous, None])
    }

    /// Waits for the commit in flight to return; never resolves when there
    /// is none. Cancel-safe: dropped before it resolves, the commit stays
    /// in flight.
    pub async fn returned(&mut self) -> Committed<H> {
        let Some(in_flight) = self.in_flight.as_mut() else {
            return std::future::pending().await;
        };
        let committed = wait_for(in_flight).await;
        self.in_flight = None;
        committed
    }

    /// Waits for the commit in flight, if any.
    pub async fn flush(&mut self) -> Option<Committed<H>> {
        match self.in_flight.take() {
            Some(mut in_flight) => Some(wait_for(&mut in_flight).await),
            None => None,
        }
    }
}

/// Waits for `in_flight`'s commit and pairs the result with its effects
/// (taken only once the commit returned, so dropping this early is safe).
async fn wait_for<H: Default>(in_flight: &mut InFlight<H>) -> Committed<H> {
    let (records, result, ran) = join(&mut in_flight.commit).await;
    Committed {
        held: std::mem::take(&mut in_flight.held),
        records,
        result,
        ran,
    }
}

/// What a commit on the blocking pool hands back: its records, its result
/// and when it ran.
type Ran = (
    Vec<Record>,
    Result<(), StoreError>,
    Option<(SystemTime, SystemTime)>,
);

/// A commit's records and result; a panic in it is a store error.
async fn join(commit: &mut JoinHandle<Ran>) -> Ran {
    commit.await.unwrap_or_else(|err| {
        (
            Vec::new(),
            Err(StoreError::from_join("committing", err)),
            None,
        )
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::UNIX_EPOCH;

    use weft_proto::{Attempt, TaskId, TaskSpec, TaskState};

    use super::super::tests::{CommitVerdict, held_store};
    use super::*;
    use crate::store::TaskRecord;

    type Log = Arc<Mutex<Vec<String>>>;

    /// What a test batch holds back: its callers.
    type Replies = Vec<Reply>;

    /// A batch writing `records` whose one reply logs `name` (or
    /// `name!` when it is answered with an error).
    fn batch(records: Vec<Record>, log: &Log, name: &'static str) -> Batch<Replies> {
        let log = Arc::clone(log);
        let reply: Reply = Box::new(move |failed| {
            let entry = match failed {
                Some(_) => format!("{name}!"),
                None => name.to_owned(),
            };
            log.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
        });
        Batch {
            records,
            held: vec![reply],
        }
    }

    /// Starts `batch` on `pipeline`, which must take it (no commit failed).
    async fn start(
        pipeline: &mut Pipeline<Replies>,
        batch: Batch<Replies>,
    ) -> [Option<Committed<Replies>>; 2] {
        match pipeline.start(batch).await {
            Started::Done(done) => done,
            Started::AfterFailure { .. } => panic!("refused"),
        }
    }

    /// Answers the replies of what came back, as the driver would.
    fn release(done: [Option<Committed<Replies>>; 2]) {
        for committed in done.into_iter().flatten() {
            let err = committed.result.err();
            for reply in committed.held {
                reply(err.as_ref());
            }
        }
    }

    fn logged(log: &Log) -> Vec<String> {
        log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    #[tokio::test]
    async fn batches_come_back_in_commit_order_and_an_empty_one_waits_its_turn() {
        let (store, mut gate) = held_store();
        let mut pipeline = Pipeline::new(Arc::clone(&store) as Arc<dyn Store>, Arc::default());
        let log = Log::default();
        let (a, b) = (TaskId::new(), TaskId::new());

        let done = start(
            &mut pipeline,
            batch(vec![task(a, TaskState::Queued)], &log, "a"),
        )
        .await;
        assert!(
            done.iter().all(Option::is_none),
            "a came back before its commit"
        );
        assert!(pipeline.is_busy());
        gate.held().await;
        gate.release(CommitVerdict::Commit);

        // b's commit starts only once a's returned; a comes back then.
        let done = start(
            &mut pipeline,
            batch(vec![task(b, TaskState::Queued)], &log, "b"),
        )
        .await;
        release(done);
        assert_eq!(logged(&log), ["a"]);
        assert!(
            store.task(a).ok().flatten().is_some(),
            "a released unwritten"
        );
        gate.held().await;

        // Nothing to write: it still waits for b, and comes back after it.
        gate.release(CommitVerdict::Commit);
        let done = start(&mut pipeline, batch(Vec::new(), &log, "c")).await;
        release(done);
        assert_eq!(logged(&log), ["a", "b", "c"]);
        assert!(!pipeline.is_busy());
        assert!(pipeline.flush().await.is_none());
    }

    #[tokio::test]
    async fn after_a_failed_commit_the_next_batch_is_refused_and_not_written() {
        let (store, mut gate) = held_store();
        let mut pipeline = Pipeline::new(Arc::clone(&store) as Arc<dyn Store>, Arc::default());
        let log = Log::default();
        let (a, b) = (TaskId::new(), TaskId::new());
        let done = start(
            &mut pipeline,
            batch(vec![task(a, TaskState::Queued)], &log, "a"),
        )
        .await;
        release(done);
        gate.held().await;
        gate.release(CommitVerdict::Fail);

        let started = pipeline
            .start(batch(vec![task(b, TaskState::Queued)], &log, "b"))
            .await;
        let Started::AfterFailure { failed, refused } = started else {
            panic!("a batch was committed after a failed commit");
        };
        let err = failed.result.err();
        assert!(err.is_some());
        for reply in failed.held {
            reply(err.as_ref());
        }
        for reply in refused {
            reply(err.as_ref());
        }
        assert_eq!(logged(&log), ["a!", "b!"]);
        assert!(!pipeline.is_busy(), "something is still committing");
        assert!(gate.entered.try_recv().is_err(), "b reached the store");
        assert!(store.list(None, None, 10).unwrap_or_default().is_empty());
    }

    fn task(id: TaskId, state: TaskState) -> Record {
        let spec = Arc::new(TaskSpec::call("noop", "in"));
        Record::Task(TaskRecord {
            attempt: Attempt(1),
            ..TaskRecord::for_test(id, spec, state, UNIX_EPOCH)
        })
    }
}
