//! The sans-I/O core: events in, effects out.
//!
//! [`Scheduler`] owns the live tasks, the ready queues and the node registry.
//! Its methods are the events (a submit batch, a node registered, credits,
//! node task events, a node stream ended, drain, cancel, a tick); each may
//! answer a reply directly and leaves its side effects in a buffer that
//! [`Scheduler::take_effects`] hands out: assignments, cancels and drains per
//! node session, sessions to disconnect, and the store records to write
//! (which include every client event with its per-task seq).
//!
//! No tokio, no clock, no sockets here: time comes in as [`Now`], so every
//! rule is tested directly and deterministically.
//!
//! Layout (the `impl Scheduler` blocks are split by concern):
//! - this file — `Scheduler`, its inputs and effects; submit, cancel, tick,
//!   restore, and the read-only views (stats, nodes).
//! - `membership` — nodes registering (reclaiming attempts), granting,
//!   draining, and being lost.
//! - `attempts` — attempt events with fencing, how an attempt ends, an
//!   attempt lost with its node.
//! - `retry` — the one retry rule and the backoff.
//! - `dispatch` — matching ready tasks to nodes; why a task still waits.
//! - `transitions` — the state changes that write records and events.
//! - `task` — a live task's compact state; `live` — the table of them.
//! - [`queue`] — ready queues per requirement class, the retry timer heap.
//! - [`registry`] — connected nodes (fields private, index by node id).
//! - [`recent`] — recently recorded results, to spot redeliveries.
//! - `gauges` — what the scheduler counts, read in one go for the metrics
//!   (the driver copies it once per batch).

mod attempts;
pub mod cron;
mod dispatch;
mod gauges;
pub mod graph;
mod limits;
mod live;
mod membership;
mod policy;
pub mod queue;
pub mod recent;
pub mod registry;
mod retry;
mod start;
pub(crate) mod task;
#[cfg(test)]
mod tests;
mod transitions;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use weft_proto::{
    Attempt, NodeId, Outcome, OutputStream, SecretEnv, TaskId, TaskKind, TaskSpec, TaskState,
};

use crate::config::CoordinatorConfig;
use crate::error::Error;
use crate::metrics::TaskMetrics;
use crate::store::{EventBody, FinalAttempt, Loaded, Record, ScheduleRecord, TaskRecord};
pub use gauges::Gauges;
pub use limits::LimitStatus;
use live::LiveTasks;
use queue::{ClassId, Queue};
use recent::RecentResults;
use registry::Registry;
pub use registry::{NodeRegistration, SessionId};
use retry::RetryRule;
use task::{LiveSpec, LiveTask, Placement, state_index};
pub use weft_proto::NodeInfo;

/// Bytes of one live task's entry in the scheduler, without its id, its
/// index and queue slots, or what it keeps on the heap (for measurements).
#[doc(hidden)]
pub fn live_task_size() -> usize {
    std::mem::size_of::<LiveTask>()
}

/// The moment an event is applied: a monotonic instant for deadlines and a
/// wall-clock time for records.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// For deadlines and backoff.
    pub instant: Instant,
    /// For `created_at`, `updated_at` and event times.
    pub wall: SystemTime,
}

/// The part of the configuration the scheduler's rules depend on.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Silence after which a node is lost.
    pub heartbeat_timeout: Duration,
    /// First retry delay.
    pub retry_backoff_base: Duration,
    /// Longest retry delay.
    pub retry_backoff_max: Duration,
    /// Most tasks not final at once.
    pub max_queued: usize,
    /// After a restart, how long attempts the store has on a node wait for
    /// that node to reconnect before they are requeued as node losses.
    pub restart_grace: Duration,
    /// How long the attempts of a node whose stream ended wait for it to
    /// reconnect and claim them.
    pub reconnect_grace: Duration,
    /// A task lost with this many different nodes while running ends
    /// FAILED instead of taking down another (0: no limit).
    pub max_node_losses: u32,
    /// Most slots a node may declare, and most prefetch it gets.
    pub max_node_slots: u32,
    /// How long a call whose handler no connected node serves waits for
    /// one before it fails (zero: forever).
    pub schedule_timeout: Duration,
    /// How long an attempt sent to a node may stay unstarted (see
    /// `CoordinatorConfig::start_timeout`).
    pub start_timeout: Duration,
    /// One level of effective priority per this much a queued task has
    /// waited (zero: strict priority order). See `policy.rs`.
    pub priority_aging: Duration,
    /// The largest message sent to a node (`--max-message-size`): a
    /// child whose spec and parents' results would not fit one `Assign`
    /// fails when released (`graph.rs`).
    pub max_message_size: usize,
}

impl From<&CoordinatorConfig> for SchedulerConfig {
    fn from(config: &CoordinatorConfig) -> Self {
        SchedulerConfig {
            heartbeat_timeout: config.heartbeat_timeout,
            retry_backoff_base: config.retry_backoff_base,
            retry_backoff_max: config.retry_backoff_max,
            max_queued: config.max_queued,
            restart_grace: config.restart_grace(),
            reconnect_grace: config.reconnect_grace(),
            max_node_losses: config.max_node_losses,
            max_node_slots: config.max_node_slots,
            start_timeout: config.start_timeout,
            schedule_timeout: config.schedule_timeout,
            priority_aging: config.priority_aging,
            max_message_size: config.max_message_size,
        }
    }
}

/// Run this attempt (one entry of an `Assign`).
#[derive(Clone, Debug)]
pub struct Assignment {
    /// The task.
    pub task_id: TaskId,
    /// Its attempt.
    pub attempt: Attempt,
    /// What to run (never with secrets: see `secret_env`).
    pub spec: Arc<TaskSpec>,
    /// The task's secret environment, for this attempt's node only; kept
    /// apart from `spec`, which is also what readers see.
    pub secret_env: Option<Arc<SecretEnv>>,
    /// The results of the tasks it runs after, in `after` order (empty
    /// for most tasks; see `graph.rs`).
    pub parents: Vec<graph::ParentResult>,
}

/// Stop this attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct CancelOrder {
    /// The task.
    pub task_id: TaskId,
    /// The attempt to stop.
    pub attempt: Attempt,
    /// Why, in words.
    pub reason: String,
}

/// What one node session is to be sent.
#[derive(Clone, Debug, Default)]
pub struct NodeOut {
    /// Attempts to start, sent as one `Assign`.
    pub assign: Vec<Assignment>,
    /// Attempts to stop.
    pub cancel: Vec<CancelOrder>,
    /// `Some(grace)` when the node must drain (`None` grace: its default).
    pub drain: Option<Option<Duration>>,
}

/// Everything the scheduler wants done, in the order: commit `records`,
/// then send to nodes, publish events, disconnect sessions.
#[derive(Debug, Default)]
pub struct Effects {
    /// Store writes; the `Event` ones are also what watchers get. A task
    /// has at most one task record among them: its latest, at the place
    /// of its first (before its events), see [`Effects::write_task`].
    pub records: Vec<Record>,
    /// Messages per node session.
    pub nodes: BTreeMap<SessionId, NodeOut>,
    /// Sessions whose streams must be closed (lost or replaced).
    pub disconnect: Vec<SessionId>,
    /// Where each task's record is in `records`.
    task_at: crate::IdMap<TaskId, usize>,
    /// Where each schedule's record is in `records` (none after a delete
    /// of it in the batch).
    schedule_at: HashMap<String, usize>,
}

/// The most records (and tasks) a batch's effects are made room for ahead
/// of time (a record is a few hundred bytes).
const EFFECTS_ROOM_MAX: usize = 4096;

/// Record buffers of committed batches kept for the next batches (one
/// prepared while one commits, and one spare).
const SPARE_RECORD_BUFFERS: usize = 2;

/// The largest record buffer kept for reuse (about 5 MiB); a larger one,
/// grown by a burst, is given back.
const SPARE_RECORDS_MAX: usize = 16 * 1024;

impl Effects {
    /// Effects with room for `records` records of `tasks` tasks, so a
    /// batch the size of the last one fills them without growing them
    /// (each growth copies every record so far, and a record is a few
    /// hundred bytes). `buffer`, an emptied record buffer of a committed
    /// batch, is used when there is one: its pages are already mapped.
    fn with_room(
        records: usize,
        tasks: usize,
        buffer: Option<Vec<Record>>,
        mut task_at: crate::IdMap<TaskId, usize>,
    ) -> Effects {
        let mut buffer = buffer.unwrap_or_default();
        buffer.reserve(records.min(EFFECTS_ROOM_MAX));
        // Kept unless much larger than the last batch needed: spread over
        // the room a burst once needed, its lookups would miss the cache.
        if task_at.capacity() > 8 * tasks.max(1024) {
            task_at = crate::IdMap::default();
        } else {
            task_at.clear();
        }
        task_at.reserve(tasks.min(EFFECTS_ROOM_MAX));
        Effects {
            records: buffer,
            task_at,
            ..Effects::default()
        }
    }

    /// Makes room for `tasks` new tasks, each a record and its first
    /// event (a Submit of thousands would otherwise grow the vector and
    /// the table step by step, each step copying every record so far).
    fn reserve_new_tasks(&mut self, tasks: usize) {
        self.records.reserve(tasks.saturating_mul(2));
        self.task_at.reserve(tasks);
    }

    /// The whole spec of the record this batch writes for task `id`, if it
    /// writes one (a task submitted and assigned in one batch): shared
    /// rather than rebuilt from its class.
    pub(crate) fn spec_written(&self, id: TaskId) -> Option<Arc<TaskSpec>> {
        match self.records.get(*self.task_at.get(&id)?)? {
            Record::Task(record) => Some(Arc::clone(&record.spec)),
            _ => None,
        }
    }

    /// Writes `record` with this batch: a task changed again within the
    /// batch has its earlier record replaced where it stands, so the
    /// commit writes each task once, with its latest state, before its
    /// events (what a store needs: a task's record comes before events).
    /// Writes schedule `record` with this batch: a schedule changed again
    /// within the batch (a catch-up firing many times) has its earlier
    /// record replaced where it stands, so the commit writes it once.
    pub(crate) fn write_schedule(&mut self, record: Arc<ScheduleRecord>) {
        match self.schedule_at.get(record.name()) {
            Some(at) => self.records[*at] = Record::Schedule(record),
            None => {
                self.schedule_at
                    .insert(record.name().to_owned(), self.records.len());
                self.records.push(Record::Schedule(record));
            }
        }
    }

    /// Deletes schedule `name` with this batch; a record of it written
    /// later in the batch comes after the delete.
    pub(crate) fn delete_schedule(&mut self, name: &str) {
        self.schedule_at.remove(name);
        self.records.push(Record::DeleteSchedule(name.to_owned()));
    }

    pub(crate) fn write_task(&mut self, record: TaskRecord) {
        match self.task_at.entry(record.id) {
            std::collections::hash_map::Entry::Occupied(at) => {
                self.records[*at.get()] = Record::Task(record);
            }
            std::collections::hash_map::Entry::Vacant(at) => {
                at.insert(self.records.len());
                self.records.push(Record::Task(record));
            }
        }
    }
}

/// One event a node reported about one attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeTaskEvent {
    /// The task.
    pub task_id: TaskId,
    /// The attempt it is about.
    pub attempt: Attempt,
    /// What happened.
    pub body: NodeEventBody,
}

/// What a node reported.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeEventBody {
    /// The attempt started.
    Started,
    /// A chunk of output with the node's per-attempt chunk seq.
    Output {
        /// Which stream.
        stream: OutputStream,
        /// The bytes.
        data: Bytes,
        /// Per-attempt chunk seq, for dedupe.
        seq: u64,
    },
    /// Progress.
    Progress {
        /// 0..=1 or negative.
        fraction: f64,
        /// Free text.
        message: String,
    },
    /// The attempt ended.
    Finished {
        /// How.
        outcome: Outcome,
        /// Process exit code, if it exited.
        exit_code: Option<i32>,
        /// Handler result.
        output: Bytes,
        /// Why it failed.
        error: String,
    },
}

/// Cluster-wide figures for `ClusterInfo`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterStats {
    /// Connected nodes.
    pub nodes: u32,
    /// Their slots in all.
    pub slots: u32,
    /// Free slots: per node, its granted credits up to its slots not in
    /// use (at most slots minus slots used; prefetch never counts).
    pub slots_free: u32,
    /// Tasks per state (every state listed).
    pub tasks: Vec<(TaskState, u64)>,
    /// Node events refused by fencing.
    pub stale_events_refused: u64,
    /// Nodes declared lost.
    pub nodes_lost: u64,
    /// Attempts restored from the store at start that their node came back
    /// and claimed (they carried on instead of running again).
    pub recovered_attempts: u64,
    /// Registers of revoked nodes refused, and events that arrived from a
    /// session after its node was revoked (the edge adds its own refusals).
    pub revoked_node_refusals: u64,
    /// Node events refused because their attempt is leased to another node
    /// (also counted in `stale_events_refused`: fencing refused them).
    pub foreign_events_refused: u64,
    /// Output chunks that never arrived: a later chunk of the same attempt
    /// did (its node had dropped them from what it keeps to send again
    /// after a reconnect, or never kept them). Logged; not on the wire yet.
    pub output_chunks_missed: u64,
    /// Attempts taken back because their node had not started them within
    /// the start timeout.
    pub attempts_not_started: u64,
    /// Nodes declared lost for starting none of their attempts within the
    /// start timeout (also counted in `nodes_lost`).
    pub nodes_stuck: u64,
    /// Attempts whose node's stream ended and that it came back and
    /// claimed within the reconnect grace (they carried on, not rerun).
    pub reclaimed_attempts: u64,
    /// Tasks that reached a final state since this scheduler was made
    /// (never restored from the store, never lowered by retention): a
    /// monotonic count clients take a throughput from.
    pub tasks_finished: u64,
}

/// The scheduler. See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    /// The retry rule with the configured backoff.
    retry: RetryRule,
    tasks: LiveTasks,
    queue: Queue,
    nodes: Registry,
    counts: [u64; weft_proto::TASK_STATES],
    stale_events_refused: u64,
    nodes_lost: u64,
    recovered_attempts: u64,
    revoked_node_refusals: u64,
    foreign_events_refused: u64,
    output_chunks_missed: u64,
    /// Attempts taken back from a node that had not started them within
    /// the start timeout.
    attempts_not_started: u64,
    /// Nodes declared lost for starting none of their attempts in time.
    nodes_stuck: u64,
    /// Attempts whose node's stream ended and that it came back and
    /// claimed within the reconnect grace (they carried on).
    reclaimed_attempts: u64,
    /// Tasks made final since start (see [`ClusterStats::tasks_finished`]).
    tasks_finished: u64,
    /// Nodes whose stream ended while they held attempts, by id: their
    /// name and when their reconnect grace ends (then they count as lost).
    disconnected: HashMap<NodeId, (Arc<str>, Instant)>,
    /// Attempts sent to nodes that must start by a deadline.
    start_deadlines: start::StartDeadlines,
    /// Calls submitted while no connected node served their handler, by
    /// the time they fail unless one comes (earliest first).
    unplaceable: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, TaskId)>>,
    /// The Cancels ordered in this batch, so each attempt gets one however
    /// many of its events a node sent (e.g. output resent after a long
    /// partition).
    cancels_ordered: HashSet<(SessionId, TaskId, Attempt)>,
    /// Node ids an admin revoked: never registered again. Revocations are
    /// rare admin acts, so this stays small.
    revoked: HashSet<NodeId>,
    /// Sessions closed by a revocation whose stream has not ended yet:
    /// what they still send is counted as a revoked node's.
    revoked_sessions: HashSet<SessionId>,
    /// Restored attempts waiting for their node to reconnect, with deadlines.
    orphans: Vec<(TaskId, Instant)>,
    /// Results recorded recently, to recognise redelivered ones.
    recent: RecentResults,
    next_liveness_check: Option<Instant>,
    /// Secret environments of live tasks that have one (most have none, and
    /// cost nothing here), apart from their specs; dropped when the task
    /// becomes final.
    secrets: HashMap<TaskId, Arc<SecretEnv>>,
    /// Dependencies and start times (`graph.rs`): side tables, empty
    /// while no task uses them.
    graph: graph::Graph,
    out: Effects,
    /// Emptied record buffers of committed batches (`recycle_records`).
    spare_records: Vec<Vec<Record>>,
    /// Cron schedules (`cron`): empty unless some were created.
    schedules: cron::Schedules,
    /// What is observed per task as it happens (durations, how tasks end,
    /// retries): atomics the metrics read at scrape time.
    metrics: Arc<TaskMetrics>,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            retry: RetryRule {
                backoff_base: config.retry_backoff_base,
                backoff_max: config.retry_backoff_max,
            },
            queue: Queue::with_aging(config.priority_aging),
            config,
            tasks: LiveTasks::new(),
            nodes: Registry::default(),
            counts: [0; weft_proto::TASK_STATES],
            stale_events_refused: 0,
            nodes_lost: 0,
            recovered_attempts: 0,
            revoked_node_refusals: 0,
            foreign_events_refused: 0,
            output_chunks_missed: 0,
            attempts_not_started: 0,
            nodes_stuck: 0,
            reclaimed_attempts: 0,
            tasks_finished: 0,
            disconnected: HashMap::new(),
            start_deadlines: start::StartDeadlines::default(),
            unplaceable: std::collections::BinaryHeap::new(),
            cancels_ordered: HashSet::new(),
            revoked: HashSet::new(),
            revoked_sessions: HashSet::new(),
            orphans: Vec::new(),
            recent: RecentResults::default(),
            next_liveness_check: None,
            secrets: HashMap::new(),
            graph: graph::Graph::default(),
            out: Effects::default(),
            spare_records: Vec::new(),
            schedules: cron::Schedules::default(),
            metrics: Arc::default(),
        }
    }

    /// Observes into `metrics` from now on (the coordinator's registry
    /// reads them; a scheduler made by `new` has its own, read by none).
    pub fn set_metrics(&mut self, metrics: Arc<TaskMetrics>) {
        self.metrics = metrics;
    }

    /// Puts back what the store held at startup. Queued tasks are ready at
    /// once; assigned or running ones stay on their node and attempt, and
    /// wait up to the restart grace for that node to reconnect and claim
    /// them (see [`register_node`](Self::register_node)); then they are
    /// requeued as node losses.
    pub fn restore(&mut self, loaded: Loaded, now: Now) {
        let Loaded {
            live,
            final_counts,
            secrets,
            recently_final,
            next_chunks,
            schedules,
            limits,
        } = loaded;
        self.restore_summary(final_counts, recently_final, now);
        // Only for tasks still live: a final task needs none.
        let mut secrets: HashMap<TaskId, Arc<SecretEnv>> = secrets.into_iter().collect();
        for record in live {
            let secret = secrets.remove(&record.id);
            self.restore_task(record, secret, now);
        }
        self.restore_next_chunks(next_chunks);
        self.restore_schedules(schedules, now);
        self.restore_limits(limits);
    }

    /// The first part of [`restore`](Self::restore): final counts and
    /// recent results. The live tasks follow one at a time through
    /// [`restore_task`](Self::restore_task) (what a restart does, so it
    /// never holds every full record at once).
    pub fn restore_summary(
        &mut self,
        final_counts: Vec<(TaskState, u64)>,
        recently_final: Vec<FinalAttempt>,
        now: Now,
    ) {
        for (state, count) in final_counts {
            self.counts[state_index(state)] += count;
        }
        for done in recently_final {
            self.recent
                .insert(done.task_id, done.attempt, done.outcome, now.instant);
        }
    }

    /// Puts back one live task the store held at startup, with its secret
    /// environment if it has one; tasks come in id order. See
    /// [`restore`](Self::restore).
    pub fn restore_task(&mut self, record: TaskRecord, secret: Option<Arc<SecretEnv>>, now: Now) {
        let grace_ends = now.instant + self.config.restart_grace;
        let class = match secret {
            Some(env) => {
                let class = match record.spec.kind {
                    TaskKind::Exec(_) => {
                        let mut spec = TaskSpec::clone(&record.spec);
                        spec.secret_env = SecretEnv::clone(&env);
                        self.class_of(&spec)
                    }
                    TaskKind::Call(_) => self.class_of(&record.spec),
                };
                self.secrets.insert(record.id, env);
                class
            }
            None => self.class_of(&record.spec),
        };
        let spec = LiveSpec::compact(&record.spec, self.queue.example(class))
            .unwrap_or_else(|| LiveSpec::Full(Arc::clone(&record.spec)));
        self.graph_restored(record.id, &record.spec);
        let mut task = LiveTask::new(spec, class, record.created_at);
        task.next_seq = record.next_seq;
        task.attempt = record.attempt.0;
        task.failures = record.failures;
        task.node_losses = record.node_losses;
        task.last_outcome = record.last_outcome;
        for node in record.lost_nodes {
            task.add_lost_node(node);
        }
        task.state = record.state;
        let on_node = matches!(record.state, TaskState::Assigned | TaskState::Running)
            && record.node_id.is_some();
        task.restore_attempts(record.attempts, on_node);
        // Cancelled by a client while on its node, before the restart:
        // its node is told again once it claims the attempt.
        if on_node && let Some(reason) = record.cancel_requested {
            task.set_cancel(reason);
        }
        if !self.queue.classes[class as usize].policy.plain {
            let counted = record.state != TaskState::Pending;
            self.policy_restored(record.id, class, &record.spec, counted, on_node);
        }
        self.counts[state_index(record.state)] += 1;
        match (record.state, record.node_id) {
            (TaskState::Assigned | TaskState::Running, Some(node_id)) => {
                task.place(Placement {
                    session: SessionId::RESTORED,
                    node_id,
                    node_name: record.node_name.unwrap_or_else(|| Arc::from("unknown")),
                });
                self.orphans.push((record.id, grace_ends));
                self.admit(record.id, task);
            }
            // Linked to its parents and start time in `finish_restore`.
            (TaskState::Pending, _) => {
                self.admit(record.id, task);
            }
            _ => {
                let created = task.created_nanos();
                self.admit(record.id, task);
                if record.state != TaskState::Queued {
                    self.change_state(
                        record.id,
                        TaskState::Queued,
                        None,
                        "restored without a node".into(),
                        now.wall,
                    );
                }
                self.queue.push_ready(class, record.id, created);
            }
        }
    }

    /// After the live tasks are restored: where each attempt on a node
    /// stands in its output. Chunks a reclaimed attempt sends again (its
    /// node cannot know which ones were stored) are dropped by seq, as on a
    /// live coordinator.
    pub fn restore_next_chunks(&mut self, next_chunks: Vec<(TaskId, u64)>) {
        for (id, next) in next_chunks {
            if let Some(task) = self.tasks.get_mut(&id).filter(|t| t.placement().is_some()) {
                task.set_next_chunk(next);
            }
        }
    }

    /// Accepts a batch of new tasks (ids chosen by the caller), all or
    /// nothing. A call task whose handler no connected node serves waits
    /// for one (its worker may be restarting) up to the schedule timeout,
    /// then fails saying so (when nodes are connected; with none, and for
    /// an exec task no node allows, it waits).
    pub fn submit(&mut self, batch: Vec<(TaskId, TaskSpec)>, now: Now) -> Result<(), Error> {
        self.submit_graph(batch, &graph::KnownParents::new(), now)
    }

    /// [`submit`](Self::submit) for a Submit whose tasks may run after
    /// others (`after`, refs resolved here) or wait for a start time: they
    /// start PENDING (see `graph.rs`). `known` is what the Submit path read
    /// from the store about the existing tasks it names. All or nothing.
    pub fn submit_graph(
        &mut self,
        mut batch: Vec<(TaskId, TaskSpec)>,
        known: &graph::KnownParents,
        now: Now,
    ) -> Result<(), Error> {
        let queued = self.tasks.len().saturating_add(batch.len());
        let max = self.config.max_queued.min(live::CAPACITY);
        if queued > max {
            return Err(Error::QueueFull { queued, max });
        }
        graph::resolve(&mut batch)?;
        self.check_parents(&batch, known)?;
        self.out.reserve_new_tasks(batch.len());
        let mut pending: Vec<TaskId> = Vec::new();
        let mut served: Vec<(ClassId, bool)> = Vec::new();
        // A queued task's policy hook may end a task at once
        // (cancel_newest, cancel_oldest, fail_if_infeasible) before this
        // Submit's PENDING tasks are linked: what ended is kept for them,
        // so a child is given its parent's real state and ref.
        if batch
            .iter()
            .any(|(_, spec)| Self::starts_pending(spec, now.wall))
        {
            self.keep_results_ended_in_submit();
        }
        for (id, mut spec) in batch {
            if Self::starts_pending(&spec, now.wall) {
                self.submit_pending(id, spec, now);
                pending.push(id);
                continue;
            }
            // Kept apart from the spec, which records, events and queue
            // classes share with every reader.
            let class = self.class_of(&spec);
            let secret_env = std::mem::take(&mut spec.secret_env);
            // A queued task keeps only what its class's example lacks.
            let (live, spec) = match LiveSpec::compact(&spec, self.queue.example(class)) {
                Some(live) => {
                    // Its resources are its class's (the class compares
                    // them): the example's map is shared instead, so the
                    // node accounting and the records read one warm map,
                    // and this task's own copy goes now.
                    if !spec.resources.is_empty() {
                        spec.resources = self.queue.example(class).resources.clone();
                    }
                    // Its record's spec becomes the live task's when it is
                    // assigned in this batch (`Effects::spec_written`).
                    task::own_input(&mut spec);
                    (live, Arc::new(spec))
                }
                None => LiveSpec::full(spec),
            };
            let is_served = match served.iter().find(|(c, _)| *c == class) {
                Some((_, s)) => *s,
                None => {
                    let s = self.is_served(&spec);
                    served.push((class, s));
                    s
                }
            };
            let task = LiveTask::new(live, class, now.wall);
            let created = task.created_nanos();
            self.out
                .write_task(task.record(id, Arc::clone(&spec), now.wall));
            self.keep_secrets(id, secret_env);
            self.admit(id, task);
            self.counts[state_index(TaskState::Queued)] += 1;
            self.emit(
                id,
                EventBody::State {
                    state: TaskState::Queued,
                    node_id: None,
                    node_name: None,
                    reason: match is_served {
                        true => "submitted".into(),
                        false => self.unserved_reason(&spec),
                    },
                },
                now.wall,
            );
            self.queue.push_ready(class, id, created);
            if !self.queue.classes[class as usize].policy.plain {
                self.policy_submitted(id, class, &spec, now.wall);
            }
            let wait = self.schedule_timeout(&spec);
            if !is_served && !wait.is_zero() {
                // Nodes are connected but none serves its handler (its
                // worker may be restarting): it waits for one, up to the
                // schedule timeout (`expire_unplaceable`).
                let deadline = now.instant + wait;
                self.unplaceable.push(std::cmp::Reverse((deadline, id)));
            }
        }
        self.link_pending(&pending, known, now);
        self.settle_pending(pending, now);
        Ok(())
    }

    /// Adds a live task, counted as a member of its class.
    fn admit(&mut self, id: TaskId, task: LiveTask) {
        if let Some(old) = self.tasks.get(&id).map(|t| t.class) {
            self.queue.parted(old);
        }
        self.queue.joined(task.class);
        self.tasks.insert(id, task);
    }

    /// The class of `spec` (see `Queue::class_for`). A class number the
    /// queue gave a new class after retiring the old one is forgotten by
    /// every node, which remembered whether it could run the old one.
    fn class_of(&mut self, spec: &TaskSpec) -> ClassId {
        let class = self.queue.class_for(spec);
        for reused in self.queue.take_reused() {
            for node in self.nodes.values_mut() {
                node.forget_class(reused);
            }
        }
        class
    }

    /// Keeps a new task's secret environment (if any), recorded in the same
    /// commit as the task's first record.
    fn keep_secrets(&mut self, id: TaskId, secret_env: SecretEnv) {
        if !secret_env.is_empty() {
            let env = Arc::new(secret_env);
            self.out.records.push(Record::Secrets(id, Arc::clone(&env)));
            self.secrets.insert(id, env);
        }
    }

    /// Whether a queued `spec` has a connected node to run it, or may wait
    /// without a deadline: no node at all, or an exec task (an exec task no
    /// node allows waits, saying why, for one that does: exec policies are
    /// the nodes' owners' choice, not a mistake in the spec). A call no
    /// connected node serves waits up to its schedule timeout.
    pub(crate) fn is_served(&self, spec: &TaskSpec) -> bool {
        self.nodes.is_empty()
            || matches!(spec.kind, TaskKind::Exec(_))
            || self.nodes.values().any(|n| n.serves(spec))
    }

    /// One task of a Submit that starts PENDING: recorded, not queued.
    fn submit_pending(&mut self, id: TaskId, mut spec: TaskSpec, now: Now) {
        let class = self.class_of(&spec);
        let secret_env = std::mem::take(&mut spec.secret_env);
        let (live, spec) = LiveSpec::full(spec);
        let mut task = LiveTask::new(live, class, now.wall);
        task.state = TaskState::Pending;
        self.out
            .write_task(task.record(id, Arc::clone(&spec), now.wall));
        self.keep_secrets(id, secret_env);
        self.admit(id, task);
        self.counts[state_index(TaskState::Pending)] += 1;
        self.emit(id, graph::pending_event(&spec), now.wall);
    }

    /// A client cancels a task. Returns false when the task is not live
    /// (unknown or already final: the caller tells which from the store).
    /// A queued task ends CANCELLED at once; a running one is sent Cancel and
    /// ends CANCELLED when its node reports or is lost.
    pub fn cancel(&mut self, id: TaskId, reason: &str, now: Now) -> bool {
        self.cancel_at(id, reason, now.wall)
    }

    /// Cancels each of `ids` (a job's tasks) with `reason`: the tasks that
    /// wait for others among them first, so they end CANCELLED themselves
    /// rather than by their rule when a parent's cancel ends it at once.
    /// Answers how many were not final yet.
    pub fn cancel_many(&mut self, ids: &[TaskId], reason: &str, now: Now) -> usize {
        let ordered = self.graph.children_first(ids);
        ordered
            .into_iter()
            .filter(|id| self.cancel(*id, reason, now))
            .count()
    }

    /// [`cancel`](Self::cancel) with only the wall-clock time it needs.
    pub(crate) fn cancel_at(&mut self, id: TaskId, reason: &str, wall: SystemTime) -> bool {
        let Some(task) = self.tasks.get_mut(&id) else {
            return false;
        };
        let reason = if reason.trim().is_empty() {
            "cancelled by client".to_owned()
        } else {
            reason.to_owned()
        };
        match task.state {
            TaskState::Assigned | TaskState::Running => {
                if task.cancel_reason().is_none() {
                    task.set_cancel(reason.clone());
                    let placed = task.placement().map(|p| (p.session, Attempt(task.attempt)));
                    // Written with the task's record: a restart before the
                    // node's answer still ends the task cancelled.
                    let spec = task.spec.to_spec(self.queue.example(task.class));
                    self.out.write_task(task.record(id, spec, wall));
                    if let Some((session, attempt)) = placed {
                        self.order_cancel(session, id, attempt, reason);
                    }
                }
            }
            _ => self.finalize(id, TaskState::Cancelled, reason, Bytes::new(), wall),
        }
        true
    }

    /// Advances time: retries whose backoff is over become ready, nodes
    /// silent past the heartbeat timeout are lost, restored attempts whose
    /// node did not come back are requeued.
    pub fn tick(&mut self, now: Now) {
        self.recent.expire(now.instant);
        self.expire_unstarted(now);
        self.expire_unplaceable(now);
        if !self.graph.is_empty() {
            self.graph_tick(now);
        }
        self.fire_schedules(now);
        while let Some((id, attempt)) = self.queue.pop_due(now.instant) {
            if let Some(task) = self.tasks.get_mut(&id)
                && task.state == TaskState::Queued
                && task.delayed
                && task.attempt == attempt
            {
                task.delayed = false;
                self.queue
                    .push_front_ready(task.class, id, task.created_nanos());
            }
        }
        if let Some(check) = self.next_liveness_check
            && now.instant >= check
        {
            let timeout = self.config.heartbeat_timeout;
            let silent: Vec<SessionId> = self
                .nodes
                .iter()
                .filter(|(_, n)| now.instant.saturating_duration_since(n.last_seen) > timeout)
                .map(|(s, _)| s)
                .collect();
            for session in silent {
                let why = format!("no heartbeat for {timeout:?}");
                self.lose_node(session, &why, now);
            }
            self.next_liveness_check =
                (!self.nodes.is_empty()).then(|| now.instant + self.liveness_interval());
        }
        if !self.disconnected.is_empty() {
            let gone: Vec<NodeId> = self
                .disconnected
                .iter()
                .filter(|(_, (_, deadline))| *deadline <= now.instant)
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                if let Some((name, _)) = self.disconnected.remove(&id) {
                    self.nodes_lost += 1;
                    let grace = self.config.reconnect_grace;
                    tracing::warn!(node_id = %id, node_name = %name, ?grace, "node lost: it did not reconnect within the reconnect grace; its attempts are requeued");
                }
            }
        }
        if !self.orphans.is_empty() {
            let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.orphans)
                .into_iter()
                .partition(|(_, deadline)| *deadline <= now.instant);
            self.orphans = waiting;
            for (id, _) in expired {
                let orphaned = self.tasks.get(&id).and_then(|t| {
                    let p = t.placement()?;
                    p.session
                        .is_placeholder()
                        .then(|| (Attempt(t.attempt), p.clone()))
                });
                if let Some((attempt, placement)) = orphaned {
                    self.lose_attempt(id, attempt, &placement.node_name, placement.node_id, now);
                }
            }
        }
    }

    /// When [`tick`](Self::tick) next has something to do.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let orphan = self.orphans.iter().map(|(_, d)| *d).min();
        [
            self.queue.next_due(),
            self.next_liveness_check,
            orphan,
            self.start_deadlines.next(),
            self.graph_wakeup(),
            self.schedules.next_due(),
            self.queue.policy.rate_wakeup,
            self.unplaceable
                .peek()
                .map(|std::cmp::Reverse((at, _))| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn liveness_interval(&self) -> Duration {
        (self.config.heartbeat_timeout / 10)
            .clamp(Duration::from_millis(5), Duration::from_millis(500))
    }

    /// Matches ready tasks to nodes with credits, then hands out everything
    /// the events since the last call produced.
    pub fn take_effects(&mut self, now: Now) -> Effects {
        self.queue.retire_unused();
        for (id, wait) in std::mem::take(&mut self.graph.unserved) {
            self.unplaceable
                .push(std::cmp::Reverse((now.instant + wait, id)));
        }
        self.dispatch(now);
        self.attach_parents();
        if self.cancels_ordered.capacity() > 4096 {
            self.cancels_ordered = HashSet::new(); // give a flood's memory back
        } else {
            self.cancels_ordered.clear();
        }
        // The next batch is made room for at this one's size, in a buffer
        // a committed batch gave back where there is one.
        let task_at = std::mem::take(&mut self.out.task_at);
        let room = Effects::with_room(
            self.out.records.len(),
            task_at.len(),
            self.spare_records.pop(),
            task_at,
        );
        std::mem::replace(&mut self.out, room)
    }

    /// Takes back the record buffer of a committed batch (its records
    /// released), emptied, for a later batch: a new buffer each batch
    /// would have its pages mapped and grown again. One that a burst grew
    /// past [`SPARE_RECORDS_MAX`], or that was mostly empty, is dropped.
    pub fn recycle_records(&mut self, mut records: Vec<Record>) {
        let capacity = records.capacity();
        if capacity == 0
            || capacity > SPARE_RECORDS_MAX
            || (capacity > EFFECTS_ROOM_MAX && records.len() < capacity / 4)
            || self.spare_records.len() >= SPARE_RECORD_BUFFERS
        {
            return;
        }
        records.clear();
        self.spare_records.push(records);
    }

    /// How long `spec` may wait for a connected node serving its handler:
    /// its own schedule timeout, else the coordinator's (zero: forever).
    pub(crate) fn schedule_timeout(&self, spec: &TaskSpec) -> Duration {
        spec.schedule_timeout
            .unwrap_or(self.config.schedule_timeout)
    }

    /// Why a call no connected node serves waits, as its first event says.
    pub(crate) fn unserved_reason(&self, spec: &TaskSpec) -> String {
        let handler = match &spec.kind {
            TaskKind::Call(call) => call.handler.as_str(),
            TaskKind::Exec(_) => "",
        };
        let known = self.nodes.known_handlers().join(", ");
        match self.schedule_timeout(spec) {
            wait if wait.is_zero() => format!(
                "waiting: no connected node serves handler '{handler}' (known: {known}); it waits until one connects"
            ),
            wait => format!(
                "waiting: no connected node serves handler '{handler}' (known: {known}); it fails unless one connects within {wait:?} (schedule timeout)"
            ),
        }
    }

    /// Fails the calls whose schedule timeout passed while still no
    /// connected node serves their handler; those a node serves now (it
    /// may be busy) wait on as any queued task.
    fn expire_unplaceable(&mut self, now: Now) {
        while let Some(std::cmp::Reverse((deadline, id))) = self.unplaceable.peek().copied() {
            if deadline > now.instant {
                return;
            }
            self.unplaceable.pop();
            let Some(task) = self.tasks.get(&id) else {
                continue;
            };
            // Assigned once (a node served it then): it waits under its
            // retry policy, as any task whose node was lost. With no node
            // connected at all it waits too, as at submit.
            if task.state != TaskState::Queued || task.attempt > 0 || self.nodes.is_empty() {
                continue;
            }
            let spec = task.spec.template(self.queue.example(task.class));
            let TaskKind::Call(call) = &spec.kind else {
                continue;
            };
            if self.nodes.values().any(|n| n.serves(spec)) {
                continue;
            }
            let error = format!(
                "unknown handler '{}': no connected node served it within {:?} (schedule timeout; known: {})",
                call.handler,
                self.schedule_timeout(spec),
                self.nodes.known_handlers().join(", ")
            );
            self.finalize(id, TaskState::Failed, error, Bytes::new(), now.wall);
        }
    }

    /// Queues a Cancel for a node session, once per attempt per batch.
    pub(crate) fn order_cancel(
        &mut self,
        session: SessionId,
        task_id: TaskId,
        attempt: Attempt,
        reason: String,
    ) {
        if self.cancels_ordered.insert((session, task_id, attempt)) {
            let out = self.out.nodes.entry(session).or_default();
            out.cancel.push(CancelOrder {
                task_id,
                attempt,
                reason,
            });
        }
    }

    /// True while the task is not final.
    pub fn is_live(&self, id: TaskId) -> bool {
        self.tasks.contains_key(&id)
    }

    /// Every connected node.
    pub fn nodes(&self, now: Instant) -> Vec<NodeInfo> {
        self.nodes.values().map(|n| n.info(now)).collect()
    }

    /// Tasks not final (queued, assigned, running).
    pub fn live_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Cluster-wide figures.
    pub fn stats(&self) -> ClusterStats {
        let nodes = &self.nodes;
        ClusterStats {
            nodes: u32::try_from(nodes.len()).unwrap_or(u32::MAX),
            slots: nodes.values().map(|n| n.slots).fold(0, u32::saturating_add),
            // What `ListNodes` shows per node: never the credits beyond
            // the slots not in use (a node's prefetch).
            slots_free: nodes
                .values()
                .map(|n| n.free_slots())
                .fold(0, u32::saturating_add),
            tasks: TaskState::ALL
                .iter()
                .map(|s| (*s, self.counts[state_index(*s)]))
                .collect(),
            stale_events_refused: self.stale_events_refused,
            nodes_lost: self.nodes_lost,
            recovered_attempts: self.recovered_attempts,
            revoked_node_refusals: self.revoked_node_refusals,
            foreign_events_refused: self.foreign_events_refused,
            output_chunks_missed: self.output_chunks_missed,
            attempts_not_started: self.attempts_not_started,
            nodes_stuck: self.nodes_stuck,
            reclaimed_attempts: self.reclaimed_attempts,
            tasks_finished: self.tasks_finished,
        }
    }

    /// The store deleted final tasks past retention: stop counting them.
    pub fn forget_expired(&mut self, states: &[TaskState]) {
        for state in states {
            let count = &mut self.counts[state_index(*state)];
            *count = count.saturating_sub(1);
        }
    }
}
