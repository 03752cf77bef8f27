//! What the store keeps: task records, per-task events, and what a restart
//! loads. Plain data only (no channels, no tonic types, no I/O), so every
//! engine serializes the same values and the scheduler builds them without
//! knowing which engine is behind the trait.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use weft_proto::{Attempt, NodeId, Outcome, OutputStream, SecretEnv, TaskId, TaskSpec, TaskState};

/// A task's record as stored: everything `Get` answers except
/// `pending_reason`, which the scheduler derives when it is read.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskRecord {
    /// The task.
    pub id: TaskId,
    /// What it runs; shared with the scheduler so it is kept once in memory.
    pub spec: Arc<TaskSpec>,
    /// Where it is in its life.
    pub state: TaskState,
    /// Latest attempt, from 1; 0 before the first assignment.
    pub attempt: Attempt,
    /// Node of the latest attempt, if any.
    pub node_id: Option<NodeId>,
    /// Name of that node.
    pub node_name: Option<Arc<str>>,
    /// Exit code of the latest attempt's process, if it exited.
    pub exit_code: Option<i32>,
    /// The handler result of the succeeding attempt.
    pub output: Bytes,
    /// Why the task failed, was cancelled or timed out.
    pub error: String,
    /// Why a queued task waits; filled on read, never stored.
    pub pending_reason: String,
    /// For a pending task, the tasks it runs after that are not final;
    /// filled on read, never stored.
    pub waiting_for: Vec<TaskId>,
    /// The job (Submit) it belongs to: its first task's id; `None` when
    /// that is this task itself (the one task of its Submit, or the first).
    pub job_id: Option<TaskId>,
    /// Attempts that ended in failure.
    pub failures: u32,
    /// Attempts lost with their node.
    pub node_losses: u32,
    /// When it was submitted.
    pub created_at: SystemTime,
    /// When its record last changed.
    pub updated_at: SystemTime,
    /// Sequence number the next event will get.
    pub next_seq: u64,
    /// How the latest attempt ended, as its node reported it; `None`
    /// before any attempt, while one runs, and when it was lost with its node.
    pub last_outcome: Option<Outcome>,
    /// The different nodes lost while this task was running on them, oldest
    /// first: the evidence for `--max-node-losses` (poison tasks), kept so
    /// a restart does not forget it.
    pub lost_nodes: Vec<(NodeId, Arc<str>)>,
    /// A client's cancel of the attempt on a node, with its reason, while
    /// the node has not answered yet: kept so that a restart still ends
    /// the task cancelled instead of running it again. Stored, never
    /// shown by `Get`.
    pub cancel_requested: Option<String>,
    /// The task's attempts, oldest first, at most [`MAX_ATTEMPT_HISTORY`]
    /// (the latest); the last is the current one while the task is on a
    /// node. Empty in records written before attempt history was kept.
    pub attempts: Vec<AttemptRecord>,
}

#[cfg(test)]
impl TaskRecord {
    /// A record as tests make one: `spec` in `state`, made and last changed
    /// `at`, attempt 0, no node, output, error, events or history. A test
    /// sets anything else with struct update syntax.
    pub(crate) fn for_test(
        id: TaskId,
        spec: Arc<TaskSpec>,
        state: TaskState,
        at: SystemTime,
    ) -> TaskRecord {
        TaskRecord {
            id,
            spec,
            state,
            attempt: Attempt(0),
            node_id: None,
            node_name: None,
            exit_code: None,
            output: Bytes::new(),
            error: String::new(),
            pending_reason: String::new(),
            waiting_for: Vec::new(),
            job_id: None,
            failures: 0,
            node_losses: 0,
            created_at: at,
            updated_at: at,
            next_seq: 0,
            last_outcome: None,
            cancel_requested: None,
            lost_nodes: Vec::new(),
            attempts: Vec::new(),
        }
    }
}

/// Most attempts a task record keeps (the latest ones).
pub const MAX_ATTEMPT_HISTORY: usize = 100;

/// One attempt of a task, as its record keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptRecord {
    /// Its number, from 1.
    pub number: Attempt,
    /// The node it was assigned to.
    pub node_id: NodeId,
    /// That node's name.
    pub node_name: Arc<str>,
    /// When it was assigned.
    pub assigned_at: SystemTime,
    /// When its node reported it started; `None` if it never did.
    pub started_at: Option<SystemTime>,
    /// When it ended; `None` while it is on its node.
    pub ended_at: Option<SystemTime>,
    /// How it ended as its node reported it; `None` while it runs and when
    /// it ended without a report (lost, taken back).
    pub outcome: Option<Outcome>,
    /// Exit code of its process, if it exited.
    pub exit_code: Option<i32>,
    /// Why it ended, in words; empty for a success and while it runs.
    pub reason: String,
}

/// One event in a task's history. Seqs start at 0 and have no gaps.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskEvent {
    /// The task.
    pub task_id: TaskId,
    /// Position in the task's history.
    pub seq: u64,
    /// Attempt it belongs to (0 before any assignment).
    pub attempt: Attempt,
    /// When the coordinator recorded it.
    pub time: SystemTime,
    /// What happened.
    pub body: EventBody,
}

/// What a [`TaskEvent`] says.
#[derive(Clone, Debug, PartialEq)]
pub enum EventBody {
    /// The task changed state.
    State {
        /// The new state.
        state: TaskState,
        /// Node involved (assigned to, running on, or lost).
        node_id: Option<NodeId>,
        /// Its name.
        node_name: Option<Arc<str>>,
        /// Why, in words.
        reason: String,
    },
    /// A chunk of output.
    Output {
        /// Which stream.
        stream: OutputStream,
        /// The bytes.
        data: Bytes,
        /// The chunk's number within its attempt, as the node numbered it
        /// (`OutputChunk.seq`): after a restart, the next chunk expected
        /// from a reclaimed attempt follows the last one stored, so chunks
        /// a node sends again are recognised. `None` in events stored by
        /// older coordinators.
        chunk: Option<u64>,
    },
    /// Progress reported by the attempt.
    Progress {
        /// 0..=1, or negative when unknown.
        fraction: f64,
        /// Free text.
        message: String,
    },
    /// The task reached a final state; always the last event.
    Finished(Arc<TaskRecord>),
}

impl EventBody {
    /// True for the last event of a task.
    pub fn is_finished(&self) -> bool {
        matches!(self, EventBody::Finished(_))
    }
}

/// One write of a commit.
#[derive(Clone, Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "most records of a commit are task records, made and dropped a batch at a time: \
              boxing them would add an allocation to each"
)]
pub enum Record {
    /// Insert or replace a task's record. A task's spec never changes after
    /// its first record: an engine may keep it once.
    Task(TaskRecord),
    /// Append an event to a task's log (its task record comes first).
    Event(TaskEvent),
    /// Keep a task's secret environment, apart from its record (which
    /// `Get`, `List` and `Watch` read, and which never holds it). Written
    /// in the commit that submits the task.
    Secrets(TaskId, Arc<SecretEnv>),
    /// Delete a task's secret environment: written in the commit that makes
    /// the task final, since nothing can need it after that.
    ForgetSecrets(TaskId),
    /// Insert or replace a cron schedule (created, fired, paused); a fire
    /// writes it in the commit of the task it submitted.
    Schedule(Arc<super::ScheduleRecord>),
    /// Delete a schedule by name (the tasks it fired are kept).
    DeleteSchedule(String),
    /// Set (create or replace) a named limit (`SetLimit`).
    Limit(weft_proto::policy::Limit),
    /// Delete a named limit of a kind ("rate" or "concurrency").
    DeleteLimit {
        /// Its name.
        name: String,
        /// Its kind.
        kind: String,
    },
}

/// What a store holds when the coordinator starts.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Tasks not in a final state, to put back in the scheduler.
    pub live: Vec<TaskRecord>,
    /// How many tasks ended in each final state.
    pub final_counts: Vec<(TaskState, u64)>,
    /// The secret environments the store holds, by task (only tasks not
    /// yet final have one).
    pub secrets: Vec<(TaskId, Arc<SecretEnv>)>,
    /// Tasks that became final since the time `load` was given, newest
    /// first (bounded): their results may still be redelivered by nodes and
    /// must then be recognised as duplicates.
    pub recently_final: Vec<FinalAttempt>,
    /// For live tasks whose current attempt is on a node (assigned or
    /// running) and sent output: the seq of the next output chunk expected
    /// from that attempt ([`next_chunk`]).
    pub next_chunks: Vec<(TaskId, u64)>,
    /// Every cron schedule, by name.
    pub schedules: Vec<super::ScheduleRecord>,
    /// The named limits set (`SetLimit`), put back before the tasks.
    pub limits: Vec<weft_proto::policy::Limit>,
}

/// The next output chunk seq expected from `attempt`, given a task's
/// stored events newest first: one past the last chunk the attempt stored.
/// Events stored without a chunk number (by older coordinators) count one
/// each. Reads back only to the attempt's last numbered chunk (usually the
/// newest event), never past the attempt's own events.
pub fn next_chunk(attempt: Attempt, newest_first: impl IntoIterator<Item = TaskEvent>) -> u64 {
    let mut unnumbered = 0;
    for event in newest_first {
        if event.attempt != attempt {
            break;
        }
        if let EventBody::Output { chunk, .. } = event.body {
            match chunk {
                Some(chunk) => return chunk.saturating_add(1).saturating_add(unnumbered),
                None => unnumbered += 1,
            }
        }
    }
    unnumbered
}

/// The attempt that ended a final task, and how it ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FinalAttempt {
    /// The task.
    pub task_id: TaskId,
    /// Its last attempt.
    pub attempt: Attempt,
    /// How that attempt ended, if its node reported it.
    pub outcome: Option<Outcome>,
}

/// Most [`Loaded::recently_final`] entries a store returns.
pub const MAX_RECENTLY_FINAL: usize = 100_000;

/// A node that joined (or, with node authentication off, a node an admin
/// revoked): what `Connect` checks a node certificate's id against.
/// Written synchronously by `Join` and `RevokeNode`, not by the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentityRecord {
    /// The node id its certificate names.
    pub id: NodeId,
    /// The name it joined with (unique among identities not revoked).
    pub name: String,
    /// When it joined (or was recorded).
    pub created: SystemTime,
    /// The join token it joined with (empty for a node that never joined).
    pub token_id: String,
    /// When an admin revoked it; `None`: not revoked.
    pub revoked: Option<SystemTime>,
}
