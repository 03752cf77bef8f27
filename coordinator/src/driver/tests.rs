//! The commit pipeline as users rely on it, driven through the inbox: with
//! the memory store, everything that leaves (replies, node messages,
//! watcher events) is already in the store; with a store that holds each
//! commit until the test releases it, nothing of a batch leaves before its
//! commit returned, batches leave in commit order, and a failed commit
//! sends none of its batch's acknowledgements or assignments and stops the
//! driver.
//!
//! Deterministic: the tests run on a current-thread runtime (commands sent
//! together without yielding land in one batch), a held commit is what
//! keeps a batch back, and `PendingReasons` (answered while the batch is
//! applied, without waiting for any commit) is the probe that tells when
//! the driver has applied what was sent before it. The timeouts only turn
//! a hang into a failure.
//!
//! The held store is shared with the pipeline's own tests in `commit.rs`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, mpsc as std_mpsc};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use weft_proto::{Attempt, NodeId, TaskId, TaskSpec, TaskState};

use super::watch::{SWEEP_AFTER, WatchBudget, event_bytes, page_len, record_bytes};
use super::{Command, Handle, ToNode, follow, wait_final};
use crate::Failure;
use crate::config::CoordinatorConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::scheduler::{NodeEventBody, NodeRegistration, NodeTaskEvent, Scheduler, SessionId};
use crate::store::{
    EventBody, Loaded, MemoryStore, Record, Store, StoreError, TaskEvent, TaskRecord,
};

/// Guards against a hang; never what a test waits for.
const HANG: Duration = Duration::from_secs(30);

async fn soon<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// The `Store` methods a test store hands to its `memory: MemoryStore`
/// as they are: the reads, and the token and node identity records.
macro_rules! forward_to_memory {
    (reads) => {
        fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
            self.memory.task(id)
        }

        fn list_page(
            &self,
            query: &crate::store::ListQuery,
        ) -> Result<crate::store::ListPage, StoreError> {
            self.memory.list_page(query)
        }

        fn events(
            &self,
            id: TaskId,
            from: u64,
            limit: usize,
        ) -> Result<Vec<TaskEvent>, StoreError> {
            self.memory.events(id, from, limit)
        }

        fn load(&self, since: SystemTime) -> Result<Loaded, StoreError> {
            self.memory.load(since)
        }
    };
    (expire) => {
        fn expire(
            &self,
            before: SystemTime,
            limit: usize,
            keep: &[TaskId],
        ) -> Result<Vec<TaskState>, StoreError> {
            self.memory.expire(before, limit, keep)
        }
    };
    (identities) => {
        fn tokens(&self) -> Result<Vec<crate::auth::TokenRecord>, StoreError> {
            self.memory.tokens()
        }

        fn put_token(&self, token: &crate::auth::TokenRecord) -> Result<(), StoreError> {
            self.memory.put_token(token)
        }

        fn node_identities(&self) -> Result<Vec<crate::store::NodeIdentityRecord>, StoreError> {
            self.memory.node_identities()
        }

        fn put_node_identity(
            &self,
            identity: &crate::store::NodeIdentityRecord,
            token: Option<&crate::auth::TokenRecord>,
        ) -> Result<(), StoreError> {
            self.memory.put_node_identity(identity, token)
        }
    };
}

/// How a held commit ends.
pub(super) enum CommitVerdict {
    Commit,
    Fail,
    DiskFull,
}

/// The memory store, but each commit announces itself and waits for the
/// test's verdict: written, or failed.
pub(super) struct HeldStore {
    memory: MemoryStore,
    entered: mpsc::UnboundedSender<Vec<Record>>,
    verdicts: Mutex<std_mpsc::Receiver<CommitVerdict>>,
}

/// The test's end of a [`HeldStore`].
pub(super) struct Gate {
    /// Each held commit's records, as it starts.
    pub(super) entered: mpsc::UnboundedReceiver<Vec<Record>>,
    verdicts: std_mpsc::Sender<CommitVerdict>,
}

impl Gate {
    /// Waits until a commit is held; returns its records.
    pub(super) async fn held(&mut self) -> Vec<Record> {
        soon("a commit", self.entered.recv())
            .await
            .unwrap_or_else(|| panic!("the store is gone"))
    }

    pub(super) fn release(&self, verdict: CommitVerdict) {
        self.verdicts
            .send(verdict)
            .unwrap_or_else(|_| panic!("no commit waits"));
    }
}

pub(super) fn held_store() -> (Arc<HeldStore>, Gate) {
    let (entered, entered_rx) = mpsc::unbounded_channel();
    let (verdicts, verdicts_rx) = std_mpsc::channel();
    let store = HeldStore {
        memory: MemoryStore::new(),
        entered,
        verdicts: Mutex::new(verdicts_rx),
    };
    let gate = Gate {
        entered: entered_rx,
        verdicts,
    };
    (Arc::new(store), gate)
}

impl Store for HeldStore {
    fn commit(&self, records: &[Record]) -> Result<(), StoreError> {
        let _ = self.entered.send(records.to_vec());
        let verdict = self
            .verdicts
            .lock()
            .map_err(|_| StoreError::Poisoned)?
            .recv()
            .unwrap_or(CommitVerdict::Fail);
        match verdict {
            CommitVerdict::Commit => self.memory.commit(records),
            CommitVerdict::Fail => Err(StoreError::Backend {
                op: "committing",
                message: "disk full".into(),
            }),
            CommitVerdict::DiskFull => Err(StoreError::DiskFull {
                op: "committing",
                message: "No space left on device (os error 28)".into(),
            }),
        }
    }

    forward_to_memory!(reads);

    forward_to_memory!(expire);

    forward_to_memory!(identities);
}

/// A driver running on `store`, and one node connected to it.
struct Harness {
    handle: Handle,
    cancel: CancellationToken,
    run: JoinHandle<()>,
    /// Why the driver stopped by itself, once it did.
    failure: Arc<OnceLock<Failure>>,
    session: SessionId,
    node: mpsc::Receiver<ToNode>,
}

impl Harness {
    /// Starts the driver and registers a node serving `noop` (that batch
    /// writes nothing, so no commit is involved).
    async fn start(store: Arc<dyn Store>) -> Harness {
        let config = CoordinatorConfig {
            retention: Duration::ZERO,
            ..CoordinatorConfig::default()
        };
        Harness::start_with(store, config).await
    }

    /// [`Harness::start`] with `config` (but no node loss within the
    /// test).
    async fn start_with(store: Arc<dyn Store>, config: CoordinatorConfig) -> Harness {
        let config = CoordinatorConfig {
            heartbeat_timeout: Duration::from_secs(600),
            ..config
        };
        Harness::start_as_given(store, config).await
    }

    /// [`Harness::start`] with `config` as it is (its heartbeat timeout
    /// included).
    async fn start_as_given(store: Arc<dyn Store>, config: CoordinatorConfig) -> Harness {
        let mut scheduler = Scheduler::new((&config).into());
        let metrics = Arc::new(Metrics::default());
        scheduler.set_metrics(Arc::clone(metrics.tasks()));
        let cancel = CancellationToken::new();
        let (mut driver, handle) = super::new(
            scheduler,
            store,
            Arc::new(config),
            Arc::clone(&metrics),
            cancel.clone(),
            TaskTracker::new(),
        );
        let failure = Arc::new(std::sync::OnceLock::new());
        driver.share_failure(Arc::clone(&failure));
        let run = tokio::spawn(driver.run());
        let session = handle.next_session();
        let (tx, mut node) = mpsc::channel(64);
        let registration = NodeRegistration {
            node_id: NodeId::new(),
            name: "n1".into(),
            labels: BTreeMap::new(),
            slots: 4,
            prefetch: 0,
            handlers: vec!["noop".into()],
            exec: weft_proto::ExecPolicy::Allow,
            running: Vec::new(),
            resources: BTreeMap::new(),
        };
        let registered = handle.call(|reply| Command::Register {
            session,
            registration,
            tx,
            token: cancel.child_token(),
            reply,
        });
        soon("Register", registered)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
            .unwrap_or_else(|err| panic!("{err}"));
        let first = soon("Registered", node.recv()).await;
        assert!(
            matches!(first, Some(ToNode::Registered { .. })),
            "{first:?}"
        );
        Harness {
            handle,
            cancel,
            run,
            failure,
            session,
            node,
        }
    }

    /// Puts `command` in the inbox now, without yielding.
    fn send(&self, command: Command) {
        if self.handle.inbox.try_send(command).is_err() {
            panic!("inbox full or closed");
        }
    }

    fn submit(&self, input: &str) -> oneshot::Receiver<Result<Vec<TaskId>, Error>> {
        let (reply, rx) = oneshot::channel();
        let specs = vec![TaskSpec::call("noop", input.to_owned())];
        self.send(Command::Submit { specs, reply });
        rx
    }

    fn credits(&self, grant: u32) {
        self.send(Command::Credits {
            session: self.session,
            grant,
        });
    }

    fn node_event(&self, task_id: TaskId, body: NodeEventBody) {
        let events = vec![NodeTaskEvent {
            task_id,
            attempt: Attempt(1),
            body,
        }];
        self.send(Command::NodeEvents {
            session: self.session,
            events,
            in_flight: Default::default(),
        });
    }

    /// Sends a probe and waits for its answer: once it arrives, everything
    /// sent before it has been applied to the scheduler.
    async fn applied(&self) {
        let (reply, rx) = oneshot::channel();
        self.send(Command::PendingReasons {
            ids: Vec::new(),
            reply,
        });
        soon("the probe", rx)
            .await
            .unwrap_or_else(|_| panic!("the driver stopped"));
    }

    async fn watch(&self, id: TaskId) -> mpsc::Receiver<TaskEvent> {
        self.watch_within(id, WatchBudget::new(usize::MAX)).await
    }

    /// A live watcher whose queued events count against `budget`.
    async fn watch_within(
        &self,
        id: TaskId,
        budget: Arc<WatchBudget>,
    ) -> mpsc::Receiver<TaskEvent> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Watch { id, budget, reply });
        match soon("Watch", rx).await {
            Ok(Ok(Some(events))) => events,
            other => panic!("not watching: {:?}", other.map(|r| r.map(|o| o.is_some()))),
        }
    }

    /// The next message the node got.
    async fn next_message(&mut self) -> ToNode {
        soon("a node message", self.node.recv())
            .await
            .unwrap_or_else(|| panic!("the session ended"))
    }

    async fn stop(self) {
        self.cancel.cancel();
        soon("the driver to stop", self.run)
            .await
            .unwrap_or_else(|err| panic!("{err}"));
    }
}

fn ids(reply: Result<Result<Vec<TaskId>, Error>, oneshot::error::RecvError>) -> Vec<TaskId> {
    match reply {
        Ok(Ok(ids)) => ids,
        other => panic!("submit failed: {other:?}"),
    }
}

fn assigned(message: ToNode) -> Vec<TaskId> {
    match message {
        ToNode::Assign(tasks) => tasks.iter().map(|a| a.task_id).collect(),
        other => panic!("not an Assign: {other:?}"),
    }
}

/// The tasks whose records a commit writes.
fn tasks_in(records: &[Record]) -> Vec<TaskId> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Task(t) => Some(t.id),
            Record::Event(_)
            | Record::Secrets(..)
            | Record::ForgetSecrets(_)
            | Record::Schedule(_)
            | Record::DeleteSchedule(_)
            | Record::Limit(_)
            | Record::DeleteLimit { .. } => None,
        })
        .collect()
}

fn state_of(event: &TaskEvent) -> Option<TaskState> {
    match &event.body {
        EventBody::State { state, .. } => Some(*state),
        _ => None,
    }
}

fn succeeded() -> NodeEventBody {
    NodeEventBody::Finished {
        outcome: weft_proto::Outcome::Succeeded,
        exit_code: None,
        output: bytes::Bytes::new(),
        error: String::new(),
    }
}

/// A process that exited 0 with `output` as its result.
fn exited_ok_with(output: bytes::Bytes) -> NodeEventBody {
    NodeEventBody::Finished {
        outcome: weft_proto::Outcome::Succeeded,
        exit_code: Some(0),
        output,
        error: String::new(),
    }
}

#[tokio::test]
async fn with_the_memory_store_whatever_leaves_is_already_stored() {
    let store = Arc::new(MemoryStore::new());
    let mut h = Harness::start(Arc::clone(&store) as Arc<dyn Store>).await;
    h.credits(1);
    let id = ids(soon("Submit", h.submit("a")).await)[0];
    let stored = store.task(id).unwrap_or_default();
    assert!(stored.is_some(), "acknowledged before it was stored");

    assert_eq!(assigned(h.next_message().await), [id]);
    let stored = store.task(id).ok().flatten().map(|t| t.state);
    assert_eq!(
        stored,
        Some(TaskState::Assigned),
        "assigned before it was stored"
    );

    let mut events = h.watch(id).await;
    h.node_event(id, NodeEventBody::Started);
    let running = soon("Running", events.recv()).await.map(|e| e.seq);
    let logged: Vec<u64> = store
        .events(id, 0, 100)
        .unwrap_or_default()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert!(
        running.is_some_and(|seq| logged.contains(&seq)),
        "event {running:?} published before it was stored ({logged:?})"
    );
    h.stop().await;
}

#[tokio::test]
async fn nothing_of_a_batch_leaves_before_its_commit_returned() {
    let (store, mut gate) = held_store();
    let mut h = Harness::start(store).await;
    h.credits(1);
    let mut acked = h.submit("a");
    let records = gate.held().await;
    h.applied().await; // the driver now waits for that commit
    assert!(acked.try_recv().is_err(), "acknowledged before the commit");
    assert!(h.node.try_recv().is_err(), "assigned before the commit");

    gate.release(CommitVerdict::Commit);
    let id = ids(soon("Submit", acked).await)[0];
    assert_eq!(tasks_in(&records), [id]);
    assert_eq!(assigned(h.next_message().await), [id]);

    // A watcher's events wait for their commit too.
    let mut events = h.watch(id).await;
    h.node_event(id, NodeEventBody::Started);
    gate.held().await;
    h.applied().await;
    assert!(events.try_recv().is_err(), "published before the commit");
    gate.release(CommitVerdict::Commit);
    let running = soon("Running", events.recv()).await;
    assert_eq!(
        running.as_ref().and_then(state_of),
        Some(TaskState::Running)
    );
    h.stop().await;
}

#[tokio::test]
async fn batches_leave_in_commit_order() {
    let (store, mut gate) = held_store();
    let mut h = Harness::start(store).await;
    h.credits(1);
    let first = h.submit("a");
    gate.held().await;
    gate.release(CommitVerdict::Commit);
    let a = ids(soon("Submit", first).await)[0];
    assert_eq!(assigned(h.next_message().await), [a]);
    let mut events = h.watch(a).await;

    // Batch 2 (a finishes) is held; batch 3 (b submitted) is applied
    // meanwhile and waits behind it.
    h.node_event(a, succeeded());
    let second = gate.held().await;
    let mut third = h.submit("b");
    h.applied().await;
    gate.release(CommitVerdict::Commit);
    let third_records = gate.held().await;
    assert_eq!(tasks_in(&second), [a], "batch 2 is a's");
    // Batch 2's effects are out while batch 3 is still being committed.
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push((state_of(&event), event.body.is_finished()));
    }
    assert_eq!(
        seen,
        [(Some(TaskState::Succeeded), false), (None, true)],
        "a's final events leave with batch 2"
    );
    assert!(
        third.try_recv().is_err(),
        "batch 3 acknowledged before its commit"
    );
    gate.release(CommitVerdict::Commit);
    let b = ids(soon("Submit", third).await)[0];
    assert_eq!(tasks_in(&third_records), [b], "batch 3 is b's");
    h.stop().await;
}

#[tokio::test]
async fn a_failed_commit_sends_nothing_of_its_batch_and_stops_the_driver() {
    let (store, mut gate) = held_store();
    let mut h = Harness::start(Arc::clone(&store) as Arc<dyn Store>).await;
    h.credits(2);
    let first = h.submit("a");
    gate.held().await;
    // Applied while the failing commit is held: never committed.
    let second = h.submit("b");
    h.applied().await;
    gate.release(CommitVerdict::Fail);

    match soon("Submit a", first).await {
        Ok(Err(Error::Store(StoreError::Backend { message, .. }))) => {
            assert_eq!(message, "disk full");
        }
        other => panic!("a was acknowledged: {other:?}"),
    }
    match soon("Submit b", second).await {
        Ok(Err(Error::Store(StoreError::Backend { message, .. }))) => {
            assert_eq!(message, "an earlier commit failed");
        }
        other => panic!("b was acknowledged: {other:?}"),
    }
    soon("the driver to stop", &mut h.run)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(h.cancel.is_cancelled(), "the coordinator keeps running");
    // The session ended without an Assign; nothing more was committed.
    let mut sent = Vec::new();
    while let Some(message) = soon("the session to end", h.node.recv()).await {
        sent.push(message);
    }
    assert!(sent.is_empty(), "sent after a failed commit: {sent:?}");
    assert!(
        gate.entered.try_recv().is_err(),
        "committed after a failure"
    );
    assert!(store.list(None, None, 10).unwrap_or_default().is_empty());
}

#[tokio::test]
async fn a_full_disk_refuses_its_batch_as_unavailable_and_says_why_the_coordinator_stopped() {
    let (store, mut gate) = held_store();
    let mut h = Harness::start(Arc::clone(&store) as Arc<dyn Store>).await;
    let first = h.submit("a");
    gate.held().await;
    let second = h.submit("b");
    h.applied().await;
    gate.release(CommitVerdict::DiskFull);

    for (name, reply) in [("a", first), ("b", second)] {
        let err = match soon("Submit", reply).await {
            Ok(Err(err)) => err,
            other => panic!("{name} was acknowledged: {other:?}"),
        };
        assert!(
            matches!(err, Error::Store(StoreError::DiskFull { .. })),
            "{name}: {err}"
        );
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::Unavailable, "{name}");
        assert!(
            status.message().contains("disk is full"),
            "{name}: {}",
            status.message()
        );
    }
    soon("the driver to stop", &mut h.run)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(h.cancel.is_cancelled(), "the coordinator keeps running");
    let failure = h.failure.get().cloned();
    let Some(failure @ Failure::Commit(StoreError::DiskFull { .. })) = failure else {
        panic!("the stop was not reported as a failed commit: {failure:?}");
    };
    assert_eq!(failure.exit_code(), crate::EXIT_COMMIT_FAILED);
    let told = failure.to_string();
    assert!(
        told.contains("disk is full") && told.contains("Nothing acknowledged was lost"),
        "{told}"
    );
    assert!(store.list(None, None, 10).unwrap_or_default().is_empty());
}

/// Output chunk `n` of the byte-budget tests: `size` bytes saying `n`.
fn chunk(n: u64, size: usize) -> NodeEventBody {
    let mut data = format!("{n:08} ").into_bytes();
    data.resize(size, b'.');
    NodeEventBody::Output {
        stream: weft_proto::OutputStream::Stdout,
        data: bytes::Bytes::from(data),
        seq: n,
    }
}

/// The output bytes of the events in `events`, in order.
fn output_of<'a>(events: impl IntoIterator<Item = &'a TaskEvent>) -> Vec<u8> {
    let mut all = Vec::new();
    for event in events {
        if let EventBody::Output { data, .. } = &event.body {
            all.extend_from_slice(data);
        }
    }
    all
}

#[tokio::test]
async fn a_live_watcher_is_dropped_before_its_queued_events_pass_its_byte_budget() {
    let mut h = Harness::start(Arc::new(MemoryStore::new())).await;
    h.credits(1);
    let id = ids(soon("Submit", h.submit("a")).await)[0];
    assert_eq!(assigned(h.next_message().await), [id]);
    let budget = WatchBudget::new(64 << 10);
    let mut live = h.watch_within(id, Arc::clone(&budget)).await;

    // 30 KiB chunks: the third would take it past 64 KiB.
    h.node_event(id, NodeEventBody::Started);
    for n in 0..5 {
        h.node_event(id, chunk(n, 30 << 10));
    }
    h.applied().await;
    let mut got = Vec::new();
    while let Some(event) = soon("a live event", live.recv()).await {
        got.push(event);
    }
    let counted: usize = got.iter().map(event_bytes).sum();
    assert_eq!(budget.queued(), counted, "what was sent is what is counted");
    assert!(counted <= 64 << 10, "{counted} bytes queued");
    let outputs = got
        .iter()
        .filter(|e| matches!(e.body, EventBody::Output { .. }))
        .count();
    assert_eq!(outputs, 2, "dropped at the chunk that did not fit");
    h.stop().await;
}

#[tokio::test]
async fn a_stalled_watch_stream_holds_at_most_its_budget_and_then_gets_every_event_once_in_order() {
    let store = Arc::new(MemoryStore::new());
    let mut h = Harness::start(Arc::clone(&store) as Arc<dyn Store>).await;
    h.credits(1);
    let id = ids(soon("Submit", h.submit("a")).await)[0];
    assert_eq!(assigned(h.next_message().await), [id]);
    let limit = 64 << 10;
    let mut handle = h.handle.clone();
    handle.config = Arc::new(CoordinatorConfig {
        watch_buffer_bytes: limit,
        ..CoordinatorConfig::clone(&h.handle.config)
    });
    // Never read while the task writes 100 chunks of 16 KiB (25 times
    // the budget).
    let mut feed = follow(&handle, id, 0);
    h.node_event(id, NodeEventBody::Started);
    let mut sent = Vec::new();
    let mut got = Vec::new();
    for n in 0..100 {
        let body = chunk(n, 16 << 10);
        if let NodeEventBody::Output { data, .. } = &body {
            sent.extend_from_slice(data);
        }
        h.node_event(id, body);
        if n % 10 == 9 {
            h.applied().await;
            tokio::task::yield_now().await;
            assert!(feed.queued() <= limit, "{} bytes queued", feed.queued());
        }
        if n == 49 {
            // Half way, it reads a little and stalls again.
            for _ in 0..10 {
                let event = soon("an event", futures::StreamExt::next(&mut feed)).await;
                got.push(
                    event
                        .and_then(Result::ok)
                        .unwrap_or_else(|| panic!("ended")),
                );
            }
        }
    }
    h.node_event(id, succeeded());
    h.applied().await;

    while let Some(event) = soon("the next event", futures::StreamExt::next(&mut feed)).await {
        let event = event.unwrap_or_else(|err| panic!("{err}"));
        assert!(feed.queued() <= limit, "{} bytes queued", feed.queued());
        got.push(event);
    }
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    let stored: Vec<u64> = store
        .events(id, 0, 10_000)
        .unwrap_or_default()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, stored, "every stored event once, in order");
    assert!(got.last().is_some_and(|e| e.body.is_finished()));
    assert!(output_of(&got) == sent, "the output, whole and in order");
    assert_eq!(feed.queued(), 0);
    h.stop().await;
}

#[tokio::test]
async fn a_budget_always_takes_an_event_when_empty_and_a_release_wakes_the_waiter() {
    let budget = WatchBudget::new(100);
    assert!(budget.try_take(60));
    assert!(!budget.try_take(60), "past the limit");
    assert!(budget.try_take(40));
    budget.release(100);
    assert!(
        budget.try_take(500),
        "nothing queued: one event always fits"
    );
    let waiter = {
        let budget = Arc::clone(&budget);
        tokio::spawn(async move { budget.take(10).await })
    };
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished(), "waits while the budget is full");
    budget.release(500);
    soon("the waiter", waiter)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(budget.queued(), 10);
}

#[test]
fn a_history_page_of_full_output_chunks_fits_in_a_quarter_of_the_budget() {
    let full = weft_proto::limits::MAX_OUTPUT_CHUNK + 128;
    for limit in [64 << 10, 1 << 20, 16 << 20] {
        let n = page_len(limit);
        assert!(n >= 1 && (n == 1 || n * full <= limit / 4), "{limit}: {n}");
    }
    assert_eq!(page_len(1 << 20), 7);
    assert_eq!(page_len(1 << 30), 256, "never more than a page of 256");
}

#[tokio::test]
async fn a_stalled_wait_many_stream_holds_at_most_its_budget_and_then_gets_every_task_once() {
    const TASKS: usize = 40;
    let store = Arc::new(MemoryStore::new());
    let mut h = Harness::start(Arc::clone(&store) as Arc<dyn Store>).await;
    let limit = 64 << 10;
    let mut handle = h.handle.clone();
    handle.config = Arc::new(CoordinatorConfig {
        watch_buffer_bytes: limit,
        ..CoordinatorConfig::clone(&h.handle.config)
    });
    let mut all = Vec::new();
    for n in 0..TASKS {
        all.extend(ids(soon("Submit", h.submit(&n.to_string())).await));
    }
    // Half already final before the call, half finishing while it is
    // not read; each result 16 KiB (40 of them: 10 times the budget).
    let result = |n: usize| {
        let mut output = format!("{n:04}").into_bytes();
        output.resize(16 << 10, b'.');
        bytes::Bytes::from(output)
    };
    let finish = |h: &mut Harness, n: usize| {
        h.node_event(all[n], NodeEventBody::Started);
        h.node_event(all[n], exited_ok_with(result(n)));
    };
    #[allow(clippy::needless_range_loop)]
    for n in 0..TASKS / 2 {
        h.credits(1);
        assert_eq!(assigned(h.next_message().await), [all[n]]);
        finish(&mut h, n);
    }
    h.applied().await;
    let pending = all.iter().copied().collect();
    let mut feed = soon("WaitMany", wait_final(&handle, all.clone(), pending, false))
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    #[allow(clippy::needless_range_loop)]
    for n in TASKS / 2..TASKS {
        h.credits(1);
        assert_eq!(assigned(h.next_message().await), [all[n]]);
        finish(&mut h, n);
        h.applied().await;
        tokio::task::yield_now().await;
        assert!(feed.queued() <= limit, "{} bytes queued", feed.queued());
    }
    let mut got = std::collections::HashMap::new();
    while let Some(task) = soon("the next task", futures::StreamExt::next(&mut feed)).await {
        let task = task.unwrap_or_else(|err| panic!("{err}"));
        assert!(feed.queued() <= limit, "{} bytes queued", feed.queued());
        assert!(
            got.insert(task.id, task.output.clone()).is_none(),
            "a task twice"
        );
    }
    assert_eq!(got.len(), TASKS);
    for (n, id) in all.iter().enumerate() {
        assert!(got[id] == result(n), "task {n}'s result");
    }
    assert_eq!(feed.queued(), 0);
    h.stop().await;
}

/// The memory store, knowing how many bytes of the task records it handed
/// out are still held somewhere (as a watch budget counts them): each
/// record gets a spec of its own, whose `Arc` says when its last copy is
/// gone.
#[derive(Default)]
struct HeldReads {
    memory: MemoryStore,
    handed: Mutex<Vec<(std::sync::Weak<TaskSpec>, usize)>>,
}

impl HeldReads {
    fn held(&self) -> usize {
        let handed = self.handed.lock().unwrap_or_else(|e| e.into_inner());
        handed
            .iter()
            .filter(|(spec, _)| spec.strong_count() > 0)
            .map(|(_, bytes)| bytes)
            .sum()
    }
}

impl Store for HeldReads {
    fn commit(&self, records: &[Record]) -> Result<(), StoreError> {
        self.memory.commit(records)
    }

    fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let Some(mut record) = self.memory.task(id)? else {
            return Ok(None);
        };
        let spec = Arc::new(TaskSpec::clone(&record.spec));
        let mut handed = self.handed.lock().map_err(|_| StoreError::Poisoned)?;
        handed.push((Arc::downgrade(&spec), record_bytes(&record)));
        record.spec = spec;
        Ok(Some(record))
    }

    fn task_outcomes(&self, ids: &[TaskId]) -> Result<Vec<Option<TaskRecord>>, StoreError> {
        ids.iter().map(|id| self.task(*id)).collect()
    }

    fn list_page(
        &self,
        query: &crate::store::ListQuery,
    ) -> Result<crate::store::ListPage, StoreError> {
        self.memory.list_page(query)
    }

    fn events(&self, id: TaskId, from: u64, limit: usize) -> Result<Vec<TaskEvent>, StoreError> {
        self.memory.events(id, from, limit)
    }

    fn load(&self, since: SystemTime) -> Result<Loaded, StoreError> {
        self.memory.load(since)
    }

    forward_to_memory!(expire);

    forward_to_memory!(identities);
}

#[tokio::test]
async fn a_stalled_wait_many_stream_of_tasks_already_final_holds_at_most_its_budget_of_them() {
    const TASKS: usize = 40;
    for outcomes_only in [false, true] {
        let store = Arc::new(HeldReads::default());
        let mut h = Harness::start(Arc::clone(&store) as Arc<dyn Store>).await;
        let limit = 64 << 10;
        let mut handle = h.handle.clone();
        handle.config = Arc::new(CoordinatorConfig {
            watch_buffer_bytes: limit,
            ..CoordinatorConfig::clone(&h.handle.config)
        });
        // Every task final before the call; each result 16 KiB (40 of
        // them: 10 times the budget).
        let result = |n: usize| {
            let mut output = format!("{n:04}").into_bytes();
            output.resize(16 << 10, b'.');
            bytes::Bytes::from(output)
        };
        let mut all = Vec::new();
        for n in 0..TASKS {
            all.extend(ids(soon("Submit", h.submit(&n.to_string())).await));
            h.credits(1);
            assert_eq!(assigned(h.next_message().await), [all[n]]);
            h.node_event(all[n], NodeEventBody::Started);
            h.node_event(all[n], exited_ok_with(result(n)));
        }
        h.applied().await;
        // Read a piece at a time, yet checked whole: an unknown id past
        // the first piece fails the call.
        let unknown = TaskId::new();
        let with_unknown: Vec<TaskId> = all.iter().copied().chain([unknown]).collect();
        let pending = with_unknown.iter().copied().collect();
        match soon(
            "WaitMany",
            wait_final(&handle, with_unknown, pending, outcomes_only),
        )
        .await
        {
            Err(Error::TaskNotFound(id)) => assert_eq!(id, unknown),
            Err(err) => panic!("{err}"),
            Ok(_) => panic!("an unknown id is not found"),
        }
        let pending = all.iter().copied().collect();
        let mut feed = soon(
            "WaitMany",
            wait_final(&handle, all.clone(), pending, outcomes_only),
        )
        .await
        .unwrap_or_else(|err| panic!("{err}"));
        // The client takes nothing until the stream has queued what its
        // budget takes.
        let one = 128 + (16 << 10);
        soon("the budget to fill", async {
            while feed.queued() + one <= limit {
                tokio::task::yield_now().await;
            }
        })
        .await;
        let held = store.held();
        assert!(
            held <= limit + one,
            "{held} bytes of records held by a stream of budget {limit} (view: outcomes only {outcomes_only})"
        );
        let mut got = std::collections::HashMap::new();
        while let Some(task) = soon("the next task", futures::StreamExt::next(&mut feed)).await {
            let task = task.unwrap_or_else(|err| panic!("{err}"));
            assert!(
                got.insert(task.id, task.output.clone()).is_none(),
                "a task twice"
            );
            drop(task);
            assert!(store.held() <= limit + one, "{} bytes held", store.held());
        }
        assert_eq!(got.len(), TASKS);
        for (n, id) in all.iter().enumerate() {
            assert!(got[id] == result(n), "task {n}'s result");
        }
        assert_eq!(feed.queued(), 0);
        h.stop().await;
    }
}

#[tokio::test]
async fn a_quiet_task_watched_and_left_again_and_again_keeps_one_watcher() {
    let h = Harness::start(Arc::new(MemoryStore::new())).await;
    // Queued, and no credits: no event will come for it.
    let id = ids(soon("Submit", h.submit("quiet")).await)[0];
    let budget = WatchBudget::new(usize::MAX);
    for _ in 0..3 * SWEEP_AFTER {
        drop(h.watch_within(id, Arc::clone(&budget)).await);
    }
    h.applied().await;
    // Each watcher holds the budget: the test's and the latest one's.
    assert_eq!(Arc::strong_count(&budget), 2);
    h.stop().await;
}

#[tokio::test]
async fn watchers_of_quiet_tasks_whose_clients_left_are_forgotten() {
    let h = Harness::start(Arc::new(MemoryStore::new())).await;
    let mut quiet = Vec::new();
    for n in 0..3 * SWEEP_AFTER {
        quiet.extend(ids(soon("Submit", h.submit(&n.to_string())).await));
    }
    let budget = WatchBudget::new(usize::MAX);
    for id in &quiet {
        drop(h.watch_within(*id, Arc::clone(&budget)).await);
    }
    h.applied().await;
    // Three times the sweep's threshold registered, each gone at once:
    // at most one threshold's worth is still held.
    let held = Arc::strong_count(&budget) - 1;
    assert!(held <= SWEEP_AFTER + 1, "{held} gone watchers held");
    h.stop().await;
}

#[tokio::test]
async fn a_wait_many_whose_client_left_is_forgotten_before_its_tasks_end() {
    let h = Harness::start(Arc::new(MemoryStore::new())).await;
    let mut quiet = Vec::new();
    for n in 0..2 * SWEEP_AFTER {
        quiet.extend(ids(soon("Submit", h.submit(&n.to_string())).await));
    }
    let register = |ids: Vec<TaskId>, budget: &Arc<WatchBudget>| {
        let (reply, rx) = oneshot::channel();
        h.send(Command::WaitMany {
            ids,
            budget: Arc::clone(budget),
            reply,
        });
        rx
    };
    let gone = WatchBudget::new(usize::MAX);
    let registration = soon("WaitMany", register(quiet.clone(), &gone))
        .await
        .unwrap_or_else(|_| panic!("the driver stopped"));
    assert!(registration.live.is_some() && registration.not_live.is_empty());
    drop(registration);
    assert_eq!(
        Arc::strong_count(&gone),
        2,
        "registered while its client is there"
    );
    // The next registration finds the first one's client gone.
    let next = WatchBudget::new(usize::MAX);
    let kept = soon("WaitMany", register(vec![quiet[0]], &next))
        .await
        .unwrap_or_else(|_| panic!("the driver stopped"));
    assert_eq!(Arc::strong_count(&gone), 1, "the gone waiter is forgotten");
    assert_eq!(Arc::strong_count(&next), 2, "the new one is kept");
    drop(kept);
    h.stop().await;
}

/// The memory store, but each commit takes a millisecond (the driver's
/// next batch gathers meanwhile), and retention sweeps are counted.
struct SlowCommits {
    memory: MemoryStore,
    sweeps: tokio::sync::watch::Sender<usize>,
}

impl Store for SlowCommits {
    fn commit(&self, records: &[Record]) -> Result<(), StoreError> {
        std::thread::sleep(Duration::from_millis(1));
        self.memory.commit(records)
    }

    forward_to_memory!(reads);

    fn expire(
        &self,
        before: SystemTime,
        limit: usize,
        keep: &[TaskId],
    ) -> Result<Vec<TaskState>, StoreError> {
        self.sweeps.send_modify(|n| *n += 1);
        self.memory.expire(before, limit, keep)
    }

    forward_to_memory!(identities);
}

/// Not on the current thread: the gRPC services fill the inbox from other
/// threads while the driver works, as here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_sweeps_go_on_while_commands_keep_coming() {
    let (sweeps, mut swept) = tokio::sync::watch::channel(0);
    let store = Arc::new(SlowCommits {
        memory: MemoryStore::new(),
        sweeps,
    });
    // Sweeps due every 10 ms; one command per batch, so the inbox (room
    // for 256) is never empty once the Submits below fill it.
    let config = CoordinatorConfig {
        retention: Duration::from_millis(100),
        max_batch: 1,
        ..CoordinatorConfig::default()
    };
    let h = Harness::start_with(store, config).await;
    let at_start = *swept.borrow_and_update();
    let inbox = h.handle.inbox.clone();
    let flood = tokio::spawn(async move {
        for n in 0u64.. {
            let (reply, _answer) = oneshot::channel();
            let specs = vec![TaskSpec::call("noop", n.to_string())];
            if inbox.send(Command::Submit { specs, reply }).await.is_err() {
                break;
            }
        }
    });
    let later = tokio::time::timeout(
        Duration::from_secs(10),
        swept.wait_for(|n| *n >= at_start + 10),
    )
    .await
    .is_ok_and(|seen| seen.is_ok());
    flood.abort();
    assert!(
        later,
        "{} sweeps in 10 s of Submits",
        *swept.borrow() - at_start
    );
    h.stop().await;
}

/// The memory store, but its first commit takes `slow` (a slow disk,
/// once).
struct OneSlowCommit {
    memory: MemoryStore,
    slow: Duration,
    slowed: std::sync::atomic::AtomicBool,
}

impl Store for OneSlowCommit {
    fn commit(&self, records: &[Record]) -> Result<(), StoreError> {
        if !self.slowed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(self.slow);
        }
        self.memory.commit(records)
    }

    forward_to_memory!(reads);

    forward_to_memory!(expire);

    forward_to_memory!(identities);
}

/// A node whose heartbeats waited in the inbox while a commit took longer
/// than the heartbeat timeout was heard from: the batch that holds them is
/// applied before the liveness check runs.
#[tokio::test]
async fn a_commit_slower_than_the_heartbeat_timeout_loses_no_node_that_kept_sending() {
    let timeout = Duration::from_millis(200);
    let store = Arc::new(OneSlowCommit {
        memory: MemoryStore::new(),
        slow: timeout * 4,
        slowed: std::sync::atomic::AtomicBool::new(false),
    });
    let config = CoordinatorConfig {
        retention: Duration::ZERO,
        heartbeat_interval: timeout / 10,
        heartbeat_timeout: timeout,
        ..CoordinatorConfig::default()
    };
    let mut h = Harness::start_as_given(store, config).await;
    // The node keeps sending, as a live node does, all along: the slow
    // commit holds the driver back, not the node.
    let inbox = h.handle.inbox.clone();
    let session = h.session;
    let beating = tokio::spawn(async move {
        let mut every = tokio::time::interval(timeout / 10);
        loop {
            every.tick().await;
            if inbox.send(Command::Heartbeat { session }).await.is_err() {
                break;
            }
        }
    });
    h.credits(1);
    // Its commit is the slow one.
    let id = ids(soon("Submit", h.submit("a")).await)[0];
    assert_eq!(assigned(h.next_message().await), [id]);
    // Read after the batch that held the heartbeats sent meanwhile.
    let (reply, info) = oneshot::channel();
    h.send(Command::ClusterInfo { reply });
    let (stats, _) = soon("ClusterInfo", info)
        .await
        .unwrap_or_else(|_| panic!("the driver stopped"));
    beating.abort();
    assert_eq!((stats.nodes, stats.nodes_lost), (1, 0));
    assert!(h.node.try_recv().is_err(), "nothing more for the node");
    h.stop().await;
}
