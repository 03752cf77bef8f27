//! The driver's protocol with the services: the [`Command`]s they send to
//! its inbox, the [`Handle`] they hold to send them, and what comes back
//! (replies, a node session's outgoing messages, `WaitMany` batches).
//!
//! Plain types and channels only: what a command does is the driver's
//! business (`driver/mod.rs`); how a message looks on the wire is the
//! services' (`service/node/codec.rs` for the node stream).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use weft_proto::{NodeId, TaskId, TaskSpec};

use crate::config::CoordinatorConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::scheduler::{
    Assignment, CancelOrder, ClusterStats, NodeInfo, NodeRegistration, NodeTaskEvent, SessionId,
};
use crate::store::{Store, TaskEvent, TaskRecord};

/// One message for a node session's `Connect` response stream, as domain
/// values; `service/node/codec.rs` encodes it as it leaves.
#[derive(Debug)]
pub(crate) enum ToNode {
    /// Always the first message of a session.
    Registered {
        /// The id the node has from now on.
        node_id: NodeId,
        /// How often the node sends heartbeats.
        heartbeat_interval: Duration,
        /// Silence after which the coordinator declares it lost.
        heartbeat_timeout: Duration,
        /// The largest message either side sends on the stream.
        max_message_size: usize,
        /// How long an attempt sent may stay unstarted.
        start_timeout: Duration,
    },
    /// Attempts to start, in one message.
    Assign(Vec<Assignment>),
    /// Attempts to stop (one batch's, each its own `Cancel` on the wire).
    Cancel(CancelBatch),
    /// Drain, within `grace` (`None`: the node's default).
    Drain(Option<Duration>),
    /// Keeps an idle stream from looking dead.
    Heartbeat,
    /// The answer to the node's `RenewCertificate` (sent by the service,
    /// not the driver): a new certificate chain, or why none.
    Certificate(Result<(String, SystemTime), String>),
    /// The last item of a revoked node's stream: it ends with
    /// PERMISSION_DENIED, so the node stops at once instead of
    /// reconnecting to hear it.
    Revoked,
}

/// The Cancels of one batch for one session, counted in the session's
/// queued cancels until the stream takes them (dropped after encoding).
#[derive(Debug)]
pub(crate) struct CancelBatch {
    /// The attempts to stop, in order.
    pub orders: Vec<CancelOrder>,
    /// How many `queued` counts for this batch.
    counted: usize,
    /// The session's count of cancels queued, less these when dropped.
    queued: Arc<AtomicUsize>,
}

impl CancelBatch {
    /// `orders`, counted in `queued` until dropped.
    pub fn new(orders: Vec<CancelOrder>, queued: Arc<AtomicUsize>) -> CancelBatch {
        let counted = orders.len();
        queued.fetch_add(counted, Ordering::Relaxed);
        CancelBatch {
            orders,
            counted,
            queued,
        }
    }
}

impl Drop for CancelBatch {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.counted, Ordering::Relaxed);
    }
}

/// What a PENDING task waits for (`Task.waiting_for`) and why, in words.
pub(crate) type Waiting = (Vec<TaskId>, String);

/// Messages to a node session's Connect response stream.
pub(crate) type NodeTx = mpsc::Sender<ToNode>;

/// What services ask of the driver.
pub(crate) enum Command {
    /// Creates a cron schedule; answered once committed.
    CreateSchedule {
        parsed: Box<crate::scheduler::cron::ParsedSchedule>,
        reply: oneshot::Sender<Result<weft_proto::pb::Schedule, Error>>,
    },
    /// A page of cron schedules by name, after `after` (`None`: from the
    /// first), at most `limit` and `LIST_PAGE_BYTES`; read at the end of
    /// the batch.
    ListSchedules {
        after: Option<String>,
        limit: usize,
        reply: oneshot::Sender<crate::scheduler::cron::SchedulePage>,
    },
    /// Pauses (true) or resumes a schedule; answered once committed.
    PauseSchedule {
        name: String,
        paused: bool,
        reply: oneshot::Sender<Result<weft_proto::pb::Schedule, Error>>,
    },
    /// Deletes a schedule; answered once committed.
    DeleteSchedule {
        name: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// New tasks; answered with their ids once committed.
    Submit {
        specs: Vec<TaskSpec>,
        reply: oneshot::Sender<Result<Vec<TaskId>, Error>>,
    },
    /// New tasks, some of which run after others or wait for a start time
    /// (`scheduler/graph.rs`); `known` is what the store held about the
    /// existing tasks they name.
    SubmitGraph {
        specs: Vec<TaskSpec>,
        known: crate::scheduler::graph::KnownParents,
        reply: oneshot::Sender<Result<Vec<TaskId>, Error>>,
    },
    /// For each of these tasks that is PENDING: what it waits for and why.
    /// Answered at once: it reads the scheduler and writes nothing.
    Waiting {
        ids: Vec<TaskId>,
        reply: oneshot::Sender<Vec<Option<Waiting>>>,
    },
    /// Why each of these queued tasks waits (`None`: not queued here).
    /// Answered at once: it reads the scheduler and writes nothing.
    PendingReasons {
        ids: Vec<TaskId>,
        reply: oneshot::Sender<Vec<Option<String>>>,
    },
    /// Cancels each of these tasks (a job's, newest first); answers, after
    /// the commit, how many were live.
    CancelMany {
        ids: Vec<TaskId>,
        reason: String,
        reply: oneshot::Sender<Result<u32, Error>>,
    },
    /// Answers after the cancel is committed: true when the task was live
    /// (the caller then reads the record from the store).
    Cancel {
        id: TaskId,
        reason: String,
        reply: oneshot::Sender<Result<bool, Error>>,
    },
    /// Registers a live watcher, whose queued events count against
    /// `budget`; `None` when the task is not live (final, or unknown: the
    /// caller checked the store first).
    Watch {
        id: TaskId,
        budget: Arc<super::watch::WatchBudget>,
        reply: oneshot::Sender<Result<Option<mpsc::Receiver<TaskEvent>>, Error>>,
    },
    /// Registers one waiter for the final records of the live tasks among
    /// `ids`. Answers (after the batch's commit) the ids that were NOT live
    /// (final or unknown: read them from the store), and the receiver of
    /// the live ones' final records, in batches (`None` when none was live).
    WaitMany {
        ids: Vec<TaskId>,
        /// What the stream may hold queued (the driver counts what it sends).
        budget: Arc<super::watch::WatchBudget>,
        reply: oneshot::Sender<WaitRegistration>,
    },
    /// A node's validated `Register`; `tx` is its session's outgoing
    /// stream, `token` ends the session.
    Register {
        session: SessionId,
        registration: NodeRegistration,
        tx: NodeTx,
        token: CancellationToken,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// The node granted more slots.
    Credits { session: SessionId, grant: u32 },
    /// The node is alive.
    Heartbeat { session: SessionId },
    /// Attempt events from the node, in order.
    NodeEvents {
        session: SessionId,
        events: Vec<NodeTaskEvent>,
        /// Counts the batch as its session's, not applied, until the
        /// driver is done with the command.
        in_flight: InFlight,
    },
    /// The node says it drains.
    Draining { session: SessionId },
    /// The node's stream ended.
    NodeGone { session: SessionId },
    /// Every connected node, as of the end of the batch.
    ListNodes {
        reply: oneshot::Sender<Vec<NodeInfo>>,
    },
    /// An operator drains a node (by id or name).
    DrainNode {
        node: String,
        grace: Option<Duration>,
        reply: oneshot::Sender<Result<NodeInfo, Error>>,
    },
    /// The connected node with this id or name: its id and name. Answered
    /// at once (a read).
    FindNode {
        selector: String,
        reply: oneshot::Sender<Option<(NodeId, String)>>,
    },
    /// An admin revoked this node (its identity is already stored as
    /// revoked): it may not register again; if connected, its session is
    /// closed and its attempts requeued. Answers (after the commit)
    /// whether it was connected and how many attempts were requeued.
    RevokeNode {
        node_id: NodeId,
        reply: oneshot::Sender<Result<(bool, u32), Error>>,
    },
    /// Cluster figures as of the end of the batch, and the uptime.
    ClusterInfo {
        reply: oneshot::Sender<(ClusterStats, Duration)>,
    },
    /// An admin sets a named limit; answered after the commit.
    SetLimit {
        limit: weft_proto::policy::Limit,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// An admin deletes a named limit; answered after the commit.
    DeleteLimit {
        name: String,
        kind: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Every limit and how it stands, read at the end of the batch.
    ListLimits {
        reply: oneshot::Sender<Vec<crate::scheduler::LimitStatus>>,
    },
}

/// What one node session has handed the driver and the driver has not
/// applied yet: its reader reads no more while that and its own backlog
/// are too much, so the inbox is no unbounded buffer for one node.
#[derive(Debug, Default)]
pub(crate) struct Unapplied {
    bytes: AtomicUsize,
    applied: Notify,
}

impl Unapplied {
    /// Bytes handed over and not applied yet.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Resolves once something was applied since the last call.
    pub async fn applied(&self) {
        self.applied.notified().await;
    }
}

/// Counts a command's bytes on its session's [`Unapplied`] from when it
/// is made until the driver drops it, applied.
#[derive(Debug, Default)]
pub(crate) struct InFlight(Option<(Arc<Unapplied>, usize)>);

impl InFlight {
    /// `bytes` more not applied on `unapplied`.
    pub fn new(unapplied: &Arc<Unapplied>, bytes: usize) -> InFlight {
        unapplied.bytes.fetch_add(bytes, Ordering::Relaxed);
        InFlight(Some((Arc::clone(unapplied), bytes)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some((unapplied, bytes)) = &self.0 {
            unapplied.bytes.fetch_sub(*bytes, Ordering::Relaxed);
            unapplied.applied.notify_one();
        }
    }
}

/// Final task records for a `WaitMany` waiter, one batch per commit.
pub(crate) type FinalTx = mpsc::Sender<Vec<Arc<TaskRecord>>>;
/// Receiving half of [`FinalTx`].
pub(crate) type FinalRx = mpsc::Receiver<Vec<Arc<TaskRecord>>>;

/// The driver's answer to [`Command::WaitMany`].
pub(crate) struct WaitRegistration {
    /// Ids that were not live: final (or unknown) in the store.
    pub not_live: Vec<TaskId>,
    /// Final records of the live ones as they finalize; closed when the
    /// waiter was dropped for lagging (register again for what is missing).
    pub live: Option<FinalRx>,
}

/// What services hold: the inbox, the store for reads, and settings.
#[derive(Clone)]
pub(crate) struct Handle {
    pub inbox: mpsc::Sender<Command>,
    pub store: Arc<dyn Store>,
    pub config: Arc<CoordinatorConfig>,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
    sessions: Arc<AtomicU64>,
    /// Where services count submits and open streams.
    pub metrics: Arc<Metrics>,
    /// Trace export, when on (`--otlp-endpoint`): services send each
    /// Submit's timing.
    pub trace: Option<crate::trace::Export>,
}

impl Handle {
    /// A handle on an inbox of `capacity` commands, and the inbox.
    pub(super) fn new(
        capacity: usize,
        store: Arc<dyn Store>,
        config: Arc<CoordinatorConfig>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> (Handle, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(capacity);
        let handle = Handle {
            inbox: tx,
            store,
            config,
            cancel,
            tasks,
            sessions: Arc::new(AtomicU64::new(1)),
            metrics,
            trace: None,
        };
        (handle, rx)
    }

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
