//! The one task that owns the [`Scheduler`].
//!
//! It drains its inbox in batches (wait for one command, then take what is
//! already there, up to `max_batch`), applies them to the scheduler, writes
//! the batch's records in ONE store commit (group commit), and only then
//! answers callers, sends node sessions their messages and publishes task
//! events to watchers. Ticks (heartbeat deadlines, retry backoff) run at the
//! scheduler's next wakeup.
//!
//! Watchers register here, so the registration and the live feed are
//! ordered with the commits: a watcher registered in batch N is answered
//! after N's commit and gets live every event from N on, so "read history
//! from the store, then live" has no gap. Live watchers get bounded
//! channels; one that falls behind is dropped from live delivery (never
//! slowing this loop) and resumes from the store by seq.
//!
//! `WaitMany` waiters register the same way for many ids at once: when
//! tasks finalize, their final records go to each waiter as one batch per
//! commit. A waiter whose (bounded) channel is full is dropped, never
//! waited for; it registers again for the ids it still lacks and reads the
//! final ones from the store.
//!
//! The commit (an fsync with the durable store) runs on the blocking pool,
//! pipelined: while batch N commits, the driver applies batch N+1 to the
//! scheduler (commands arriving meanwhile share it); N+1's commit starts
//! once N's returned, and N's effects leave only then, so effects leave in
//! commit order and never before their records are durable. Replies that
//! read the scheduler (`ListNodes`, `ClusterInfo`) read it at the end of
//! their own batch. Within a batch each task's record is written once, in
//! its latest state (every event is kept). Reads (`Get`,
//! `List`, watch history) never pass through here: services read the
//! store on the blocking pool themselves, and only ask the driver for what
//! the scheduler alone knows (`pending_reason`). A periodic sweep deletes
//! final tasks past the retention, a bounded number per sweep.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use weft_proto::convert::duration_to_pb;
use weft_proto::{TaskId, TaskSpec, pb};

use crate::config::CoordinatorConfig;
use crate::error::Error;
use crate::scheduler::{
    ClusterStats, Effects, NodeInfo, NodeOut, NodeRegistration, NodeTaskEvent, Now, Scheduler,
    SessionId,
};
use crate::store::{EventBody, Record, Store, StoreError, TaskEvent, TaskRecord};

/// Messages to a node session's Connect response stream.
pub(crate) type NodeTx = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// What services ask of the driver.
pub(crate) enum Command {
    Submit {
        specs: Vec<TaskSpec>,
        reply: oneshot::Sender<Result<Vec<TaskId>, Error>>,
    },
    /// Why each of these queued tasks waits (`None`: not queued here).
    PendingReasons {
        ids: Vec<TaskId>,
        reply: oneshot::Sender<Vec<Option<String>>>,
    },
    /// Answers after the cancel is committed: true when the task was live
    /// (the caller then reads the record from the store).
    Cancel {
        id: TaskId,
        reason: String,
        reply: oneshot::Sender<Result<bool, Error>>,
    },
    /// Registers a live watcher; `None` when the task is not live (final,
    /// or unknown: the caller checked the store first).
    Watch {
        id: TaskId,
        reply: oneshot::Sender<Result<Option<mpsc::Receiver<TaskEvent>>, Error>>,
    },
    /// Registers one waiter for the final records of the live tasks among
    /// `ids`. Answers (after the batch's commit) the ids that were NOT live
    /// (final or unknown: read them from the store), and the receiver of
    /// the live ones' final records, in batches (`None` when none was live).
    WaitMany {
        ids: Vec<TaskId>,
        reply: oneshot::Sender<WaitRegistration>,
    },
    Register {
        session: SessionId,
        registration: NodeRegistration,
        tx: NodeTx,
        token: CancellationToken,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Credits {
        session: SessionId,
        grant: u32,
    },
    Heartbeat {
        session: SessionId,
    },
    NodeEvents {
        session: SessionId,
        events: Vec<NodeTaskEvent>,
    },
    Draining {
        session: SessionId,
    },
    NodeGone {
        session: SessionId,
    },
    ListNodes {
        reply: oneshot::Sender<Vec<NodeInfo>>,
    },
    DrainNode {
        node: String,
        grace: Option<Duration>,
        reply: oneshot::Sender<Result<NodeInfo, Error>>,
    },
    ClusterInfo {
        reply: oneshot::Sender<(ClusterStats, Duration)>,
    },
}

/// What services hold: the inbox, the store for reads, and settings.
#[derive(Clone)]
pub(crate) struct Handle {
    pub inbox: mpsc::Sender<Command>,
    pub store: Arc<dyn Store>,
    pub config: Arc<CoordinatorConfig>,
    pub cancel: CancellationToken,
    pub tasks: tokio_util::task::TaskTracker,
    sessions: Arc<AtomicU64>,
}

impl Handle {
    /// Sends a command and waits for its reply. A stopped driver is
    /// `ShuttingDown`.
    pub async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.inbox
            .send(make(tx))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// Sends a command that has no reply.
    pub async fn tell(&self, command: Command) -> Result<(), Error> {
        self.inbox
            .send(command)
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// A fresh node session id.
    pub fn next_session(&self) -> SessionId {
        SessionId(self.sessions.fetch_add(1, Ordering::Relaxed))
    }
}

struct Session {
    tx: NodeTx,
    token: CancellationToken,
}

/// Final task records for a `WaitMany` waiter, one batch per commit.
pub(crate) type FinalTx = mpsc::Sender<Vec<TaskRecord>>;
/// Receiving half of [`FinalTx`].
pub(crate) type FinalRx = mpsc::Receiver<Vec<TaskRecord>>;

/// The driver's answer to [`Command::WaitMany`].
pub(crate) struct WaitRegistration {
    /// Ids that were not live: final (or unknown) in the store.
    pub not_live: Vec<TaskId>,
    /// Final records of the live ones as they finalize; closed when the
    /// waiter was dropped for lagging (register again for what is missing).
    pub live: Option<FinalRx>,
}

/// Batches a `WaitMany` waiter may have queued before it counts as lagging.
const WAIT_MANY_BUFFER: usize = 256;

/// Live `WaitMany` waiters and the ids they wait for. An id's entry may
/// name waiters that are gone (dropped for lagging, or the client left):
/// they are skipped and forgotten when the task finalizes.
#[derive(Default)]
struct ManyWaiters {
    next: u64,
    /// Each waiter's channel and how many of its ids are not final yet
    /// (it is forgotten at 0).
    waiters: HashMap<u64, (FinalTx, usize)>,
    by_task: HashMap<TaskId, Vec<u64>>,
}

/// Answers a caller once its batch's commit returned (with its error, if
/// it failed).
type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;
/// Reads the scheduler as of the end of its batch, before the next batch
/// is applied; answered like a [`Reply`].
type Deferred = Box<dyn FnOnce(&Scheduler) -> Reply + Send>;

/// Most final tasks one retention sweep deletes (one commit).
const SWEEP_LIMIT: usize = 2_000;

/// The driver task's state.
pub(crate) struct Driver {
    scheduler: Scheduler,
    store: Arc<dyn Store>,
    inbox: mpsc::Receiver<Command>,
    config: Arc<CoordinatorConfig>,
    sessions: HashMap<SessionId, Session>,
    watchers: HashMap<TaskId, Vec<mpsc::Sender<TaskEvent>>>,
    many: ManyWaiters,
    ids: ulid::Generator,
    started: Instant,
    cancel: CancellationToken,
    /// When the next retention sweep runs (`None`: retention is off).
    next_sweep: Option<Instant>,
}

/// Makes the driver and the handle services use to reach it.
pub(crate) fn new(
    scheduler: Scheduler,
    store: Arc<dyn Store>,
    config: Arc<CoordinatorConfig>,
    cancel: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
) -> (Driver, Handle) {
    let (tx, rx) = mpsc::channel(config.max_batch.max(64) * 4);
    let handle = Handle {
        inbox: tx,
        store: Arc::clone(&store),
        config: Arc::clone(&config),
        cancel: cancel.clone(),
        tasks,
        sessions: Arc::new(AtomicU64::new(1)),
    };
    let next_sweep = (!config.retention.is_zero()).then(Instant::now);
    let driver = Driver {
        scheduler,
        store,
        inbox: rx,
        config,
        sessions: HashMap::new(),
        watchers: HashMap::new(),
        many: ManyWaiters::default(),
        ids: ulid::Generator::new(),
        started: Instant::now(),
        next_sweep,
        cancel,
    };
    (driver, handle)
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        wall: SystemTime::now(),
    }
}

/// How often retention sweeps run: a tenth of the retention, between
/// 10 ms and a minute.
fn sweep_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_millis(10), Duration::from_secs(60))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs a store call on the blocking pool. A panic in it is a store error.
pub(crate) async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    op: &'static str,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .unwrap_or_else(|err| {
            Err(StoreError::Backend {
                op,
                message: err.to_string(),
            })
        })
}

/// One batch applied to the scheduler, waiting for its commit before its
/// effects leave the coordinator.
struct Prepared {
    records: Vec<Record>,
    nodes: BTreeMap<SessionId, NodeOut>,
    disconnect: Vec<SessionId>,
    deferred: Vec<Reply>,
}

/// A batch whose commit runs on the blocking pool.
struct InFlight {
    commit: tokio::task::JoinHandle<(Vec<Record>, Result<(), StoreError>)>,
    nodes: BTreeMap<SessionId, NodeOut>,
    disconnect: Vec<SessionId>,
    deferred: Vec<Reply>,
}

/// Waits for the commit in flight (never resolves when there is none).
async fn wait_commit(in_flight: &mut Option<InFlight>) -> (Vec<Record>, Result<(), StoreError>) {
    match in_flight {
        Some(f) => join(&mut f.commit).await,
        None => std::future::pending().await,
    }
}

/// A commit's records and result; a panic in it is a store error.
async fn join(
    commit: &mut tokio::task::JoinHandle<(Vec<Record>, Result<(), StoreError>)>,
) -> (Vec<Record>, Result<(), StoreError>) {
    commit.await.unwrap_or_else(|err| {
        let err = StoreError::Backend {
            op: "committing",
            message: err.to_string(),
        };
        (Vec::new(), Err(err))
    })
}

/// Keeps each task's record once per commit: its latest state, at the
/// position of its first write (so it still precedes the task's events).
/// Every event stays, in order.
fn coalesce(records: Vec<Record>) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::with_capacity(records.len());
    let mut at: HashMap<TaskId, usize> = HashMap::new();
    for record in records {
        match record {
            Record::Task(task) => match at.get(&task.id) {
                Some(&index) => out[index] = Record::Task(task),
                None => {
                    at.insert(task.id, out.len());
                    out.push(Record::Task(task));
                }
            },
            event @ Record::Event(_) => out.push(event),
        }
    }
    out
}

impl Driver {
    /// Runs until the coordinator shuts down.
    ///
    /// Commits are pipelined: while batch N's commit runs on the blocking
    /// pool, batch N+1 is applied to the scheduler; N's effects (replies,
    /// node messages, published events) leave only after N's commit
    /// returns, and batches are committed and released in order.
    #[tracing::instrument(name = "driver", skip_all)]
    pub async fn run(mut self) {
        let max_batch = self.config.max_batch.max(1);
        let mut batch = Vec::with_capacity(max_batch);
        let mut in_flight: Option<InFlight> = None;
        // Anything restore produced (requeues) is committed before serving.
        let prepared = self.prepare(&mut batch);
        if self.submit(&mut in_flight, prepared).await {
            self.finish(&mut in_flight).await;
        }
        loop {
            let wake = self.scheduler.next_wakeup();
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                received = self.inbox.recv_many(&mut batch, max_batch) => {
                    if received == 0 {
                        break;
                    }
                }
                result = wait_commit(&mut in_flight), if in_flight.is_some() => {
                    if let Some(f) = in_flight.take() {
                        self.release(f.nodes, f.disconnect, f.deferred, result);
                    }
                    continue;
                }
                _ = sleep_until(wake) => {}
                _ = sleep_until(self.next_sweep) => {
                    if self.finish(&mut in_flight).await {
                        self.sweep().await;
                    }
                    continue;
                }
            }
            let prepared = self.prepare(&mut batch);
            if !self.submit(&mut in_flight, prepared).await {
                break;
            }
        }
        self.finish(&mut in_flight).await;
        for session in self.sessions.values() {
            session.token.cancel();
        }
        tracing::debug!("driver stopped");
    }

    /// Applies a batch of commands (and a tick) to the scheduler.
    fn prepare(&mut self, batch: &mut Vec<Command>) -> Prepared {
        let now = now();
        self.scheduler.tick(now);
        let mut deferred: Vec<Reply> = Vec::new();
        let mut reads: Vec<Deferred> = Vec::new();
        for command in batch.drain(..) {
            self.apply(command, now, &mut deferred, &mut reads);
        }
        let Effects {
            records,
            nodes,
            disconnect,
        } = self.scheduler.take_effects(now);
        // Replies that read the scheduler read it now, as of this batch.
        deferred.extend(reads.into_iter().map(|read| read(&self.scheduler)));
        Prepared {
            records: coalesce(records),
            nodes,
            disconnect,
            deferred,
        }
    }

    /// Starts `prepared`'s commit once the one in flight returned, then
    /// releases that one's effects (so the store is idle as little as
    /// possible, and effects still leave in commit order). Returns false
    /// when a commit failed (the coordinator is stopping).
    async fn submit(&mut self, in_flight: &mut Option<InFlight>, prepared: Prepared) -> bool {
        let Prepared {
            records,
            nodes,
            disconnect,
            deferred,
        } = prepared;
        let mut previous = None;
        if let Some(mut f) = in_flight.take() {
            let result = join(&mut f.commit).await;
            if result.1.is_err() {
                self.release(f.nodes, f.disconnect, f.deferred, result);
                // Nothing after a failed commit may be committed or sent.
                let err = StoreError::Backend {
                    op: "committing",
                    message: "an earlier commit failed".into(),
                };
                for reply in deferred {
                    reply(Some(&err));
                }
                return false;
            }
            previous = Some((f, result));
        }
        if records.is_empty() {
            if let Some((f, result)) = previous {
                self.release(f.nodes, f.disconnect, f.deferred, result);
            }
            return self.release(nodes, disconnect, deferred, (records, Ok(())));
        }
        let store = Arc::clone(&self.store);
        *in_flight = Some(InFlight {
            commit: tokio::task::spawn_blocking(move || {
                let committed = store.commit(&records);
                (records, committed)
            }),
            nodes,
            disconnect,
            deferred,
        });
        match previous {
            Some((f, result)) => self.release(f.nodes, f.disconnect, f.deferred, result),
            None => true,
        }
    }

    /// Waits for the commit in flight (if any) and releases its effects.
    /// Returns false when it failed.
    async fn finish(&mut self, in_flight: &mut Option<InFlight>) -> bool {
        let Some(mut f) = in_flight.take() else {
            return true;
        };
        let result = join(&mut f.commit).await;
        self.release(f.nodes, f.disconnect, f.deferred, result)
    }

    /// Sends a committed batch's effects: replies, node messages, events.
    /// On a failed commit, fails the replies and stops the coordinator.
    fn release(
        &mut self,
        nodes: BTreeMap<SessionId, NodeOut>,
        disconnect: Vec<SessionId>,
        deferred: Vec<Reply>,
        (records, committed): (Vec<Record>, Result<(), StoreError>),
    ) -> bool {
        if let Err(err) = &committed {
            // The scheduler already moved on from what the store refused;
            // carrying on would record later events against a history the
            // store does not have. Stop, so a restart reloads what was
            // committed (nothing acknowledged is lost: this batch's callers
            // get the error).
            tracing::error!(error = %err, "store commit failed; stopping the coordinator");
            self.cancel.cancel();
        }
        for reply in deferred {
            reply(committed.as_ref().err());
        }
        if committed.is_err() {
            return false;
        }
        for (session, out) in nodes {
            self.send_to_node(session, out);
        }
        self.publish(&records);
        for session in disconnect {
            if let Some(session) = self.sessions.remove(&session) {
                session.token.cancel();
            }
        }
        true
    }

    fn apply(
        &mut self,
        command: Command,
        now: Now,
        deferred: &mut Vec<Reply>,
        reads: &mut Vec<Deferred>,
    ) {
        match command {
            Command::Submit { specs, reply } => {
                let ids: Vec<TaskId> = specs
                    .iter()
                    .map(|_| {
                        let ulid = self.ids.generate().unwrap_or_else(|_| ulid::Ulid::new());
                        TaskId::from_ulid(ulid)
                    })
                    .collect();
                let batch = ids.iter().copied().zip(specs).collect();
                let result = self.scheduler.submit(batch, now).map(|()| ids);
                deferred.push(Box::new(move |failed| {
                    let result = match failed {
                        Some(err) => Err(Error::Store(err.clone())),
                        None => result,
                    };
                    let _ = reply.send(result);
                }));
            }
            Command::PendingReasons { ids, reply } => {
                let reasons = ids
                    .iter()
                    .map(|id| self.scheduler.pending_reason(*id))
                    .collect();
                let _ = reply.send(reasons);
            }
            Command::Cancel { id, reason, reply } => {
                let live = self.scheduler.cancel(id, &reason, now);
                deferred.push(Box::new(move |failed| {
                    let result = match failed {
                        Some(err) => Err(Error::Store(err.clone())),
                        None => Ok(live),
                    };
                    let _ = reply.send(result);
                }));
            }
            Command::Watch { id, reply } => {
                if self.scheduler.is_live(id) {
                    let (tx, rx) = mpsc::channel(self.config.watch_buffer.max(16));
                    self.watchers.entry(id).or_default().push(tx);
                    deferred.push(Box::new(move |_| {
                        let _ = reply.send(Ok(Some(rx)));
                    }));
                } else {
                    deferred.push(Box::new(move |_| {
                        let _ = reply.send(Ok(None));
                    }));
                }
            }
            Command::WaitMany { ids, reply } => {
                let mut not_live = Vec::new();
                let mut live = Vec::new();
                for id in ids {
                    if self.scheduler.is_live(id) {
                        live.push(id);
                    } else {
                        not_live.push(id);
                    }
                }
                let rx = (!live.is_empty()).then(|| {
                    let (tx, rx) = mpsc::channel(WAIT_MANY_BUFFER);
                    let waiter = self.many.next;
                    self.many.next += 1;
                    self.many.waiters.insert(waiter, (tx, live.len()));
                    for id in live {
                        self.many.by_task.entry(id).or_default().push(waiter);
                    }
                    rx
                });
                deferred.push(Box::new(move |_| {
                    let _ = reply.send(WaitRegistration { not_live, live: rx });
                }));
            }
            Command::Register {
                session,
                registration,
                tx,
                token,
                reply,
            } => {
                let registered = pb::CoordinatorMessage {
                    body: Some(pb::coordinator_message::Body::Registered(pb::Registered {
                        node_id: registration.node_id.to_string(),
                        heartbeat_interval: Some(duration_to_pb(self.config.heartbeat_interval)),
                        heartbeat_timeout: Some(duration_to_pb(self.config.heartbeat_timeout)),
                    })),
                };
                // Registered goes first on the stream, before any Cancel or
                // Assign this registration leads to.
                if tx.try_send(Ok(registered)).is_err() {
                    token.cancel();
                    let _ = reply.send(Err(Error::ShuttingDown));
                    return;
                }
                self.sessions.insert(session, Session { tx, token });
                self.scheduler.register_node(session, registration, now);
                deferred.push(Box::new(move |_| {
                    let _ = reply.send(Ok(()));
                }));
            }
            Command::Credits { session, grant } => self.scheduler.credits(session, grant, now),
            Command::Heartbeat { session } => self.scheduler.heartbeat(session, now),
            Command::NodeEvents { session, events } => {
                self.scheduler.node_events(session, events, now);
            }
            Command::Draining { session } => self.scheduler.node_draining(session, now),
            Command::NodeGone { session } => self.scheduler.node_gone(session, now),
            Command::ListNodes { reply } => {
                let instant = now.instant;
                reads.push(Box::new(move |scheduler| {
                    let nodes = scheduler.nodes(instant);
                    Box::new(move |_| {
                        let _ = reply.send(nodes);
                    })
                }));
            }
            Command::DrainNode { node, grace, reply } => {
                let result = self.scheduler.drain_node(&node, grace, now.instant);
                deferred.push(Box::new(move |_| {
                    let _ = reply.send(result);
                }));
            }
            Command::ClusterInfo { reply } => {
                let uptime = now.instant.saturating_duration_since(self.started);
                reads.push(Box::new(move |scheduler| {
                    let stats = scheduler.stats();
                    Box::new(move |_| {
                        let _ = reply.send((stats, uptime));
                    })
                }));
            }
        }
    }

    /// Deletes final tasks past the retention (at most [`SWEEP_LIMIT`]) and
    /// schedules the next sweep: soon when there was more to delete.
    async fn sweep(&mut self) {
        let retention = self.config.retention;
        let Some(cutoff) = SystemTime::now().checked_sub(retention) else {
            self.next_sweep = Some(Instant::now() + sweep_interval(retention));
            return;
        };
        let removed = blocking(&self.store, "expiring", move |store| {
            store.expire(cutoff, SWEEP_LIMIT)
        })
        .await;
        let next = match removed {
            Ok(removed) => {
                if !removed.is_empty() {
                    tracing::debug!(tasks = removed.len(), "expired finished tasks");
                }
                self.scheduler.forget_expired(&removed);
                if removed.len() >= SWEEP_LIMIT {
                    Duration::from_millis(10)
                } else {
                    sweep_interval(retention)
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "retention sweep failed; retrying later");
                sweep_interval(retention)
            }
        };
        self.next_sweep = Some(Instant::now() + next);
    }

    fn send_to_node(&mut self, session: SessionId, out: NodeOut) {
        let Some(target) = self.sessions.get(&session) else {
            return;
        };
        let mut messages = Vec::new();
        if !out.assign.is_empty() {
            let tasks = out
                .assign
                .into_iter()
                .map(|a| pb::Assignment {
                    task_id: a.task_id.to_string(),
                    attempt: a.attempt.0,
                    spec: Some(pb::TaskSpec::from(TaskSpec::clone(&a.spec))),
                })
                .collect();
            messages.push(pb::coordinator_message::Body::Assign(pb::Assign { tasks }));
        }
        for cancel in out.cancel {
            messages.push(pb::coordinator_message::Body::Cancel(pb::Cancel {
                task_id: cancel.task_id.to_string(),
                attempt: cancel.attempt.0,
                reason: cancel.reason,
            }));
        }
        if let Some(grace) = out.drain {
            messages.push(pb::coordinator_message::Body::Drain(pb::Drain {
                grace: grace.map(duration_to_pb),
            }));
        }
        for body in messages {
            let message = pb::CoordinatorMessage { body: Some(body) };
            if let Err(err) = target.tx.try_send(Ok(message)) {
                // A node this far behind (or gone) cannot be trusted with
                // work: end its session; the reader reports it gone and its
                // attempts are requeued.
                tracing::warn!(session = session.0, error = %err, "node session cannot keep up; closing it");
                target.token.cancel();
                break;
            }
        }
    }

    fn publish(&mut self, records: &[Record]) {
        self.publish_final(records);
        if self.watchers.is_empty() {
            return;
        }
        for record in records {
            let Record::Event(event) = record else {
                continue;
            };
            let Some(watchers) = self.watchers.get_mut(&event.task_id) else {
                continue;
            };
            // Full or closed: drop it from live; it resumes from the store.
            watchers.retain(|w| w.try_send(event.clone()).is_ok());
            if event.body.is_finished() || watchers.is_empty() {
                self.watchers.remove(&event.task_id);
            }
        }
    }

    /// Hands the final records of this commit to the `WaitMany` waiters,
    /// one batch per waiter. A full or closed waiter is dropped (its
    /// service registers again and reads the store), never waited for.
    fn publish_final(&mut self, records: &[Record]) {
        if self.many.by_task.is_empty() {
            return;
        }
        let mut batches: HashMap<u64, Vec<TaskRecord>> = HashMap::new();
        for record in records {
            let Record::Event(TaskEvent {
                task_id,
                body: EventBody::Finished(task),
                ..
            }) = record
            else {
                continue;
            };
            let Some(waiters) = self.many.by_task.remove(task_id) else {
                continue;
            };
            for waiter in waiters {
                if self.many.waiters.contains_key(&waiter) {
                    batches
                        .entry(waiter)
                        .or_default()
                        .push(TaskRecord::clone(task));
                }
            }
        }
        for (waiter, batch) in batches {
            let Some((tx, pending)) = self.many.waiters.get_mut(&waiter) else {
                continue;
            };
            *pending = pending.saturating_sub(batch.len());
            let done = *pending == 0;
            if tx.try_send(batch).is_err() {
                tracing::debug!(waiter, "WaitMany waiter lagging or gone; dropped from live");
                self.many.waiters.remove(&waiter);
            } else if done {
                self.many.waiters.remove(&waiter);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use bytes::Bytes;
    use weft_proto::{Attempt, TaskState};

    use super::*;

    fn task(id: TaskId, state: TaskState) -> Record {
        Record::Task(TaskRecord {
            id,
            spec: Arc::new(TaskSpec::call("noop", "in")),
            state,
            attempt: Attempt(1),
            node_id: None,
            node_name: None,
            exit_code: None,
            output: Bytes::new(),
            error: String::new(),
            pending_reason: String::new(),
            failures: 0,
            node_losses: 0,
            created_at: UNIX_EPOCH,
            updated_at: UNIX_EPOCH,
            next_seq: 0,
            last_outcome: None,
            lost_nodes: Vec::new(),
        })
    }

    fn event(id: TaskId, seq: u64, state: TaskState) -> Record {
        Record::Event(TaskEvent {
            task_id: id,
            seq,
            attempt: Attempt(1),
            time: UNIX_EPOCH,
            body: EventBody::State {
                state,
                node_id: None,
                node_name: None,
                reason: String::new(),
            },
        })
    }

    #[test]
    fn a_batch_writes_each_task_once_with_its_latest_state_before_its_events() {
        let (a, b) = (TaskId::new(), TaskId::new());
        let records = vec![
            task(a, TaskState::Queued),
            event(a, 0, TaskState::Queued),
            task(b, TaskState::Running),
            task(a, TaskState::Assigned),
            event(a, 1, TaskState::Assigned),
            event(b, 3, TaskState::Succeeded),
            task(a, TaskState::Running),
            event(a, 2, TaskState::Running),
            task(b, TaskState::Succeeded),
        ];
        let expected = vec![
            task(a, TaskState::Running),
            event(a, 0, TaskState::Queued),
            task(b, TaskState::Succeeded),
            event(a, 1, TaskState::Assigned),
            event(b, 3, TaskState::Succeeded),
            event(a, 2, TaskState::Running),
        ];
        assert_eq!(coalesce(records), expected);
    }
}
