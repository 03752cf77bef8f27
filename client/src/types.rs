//! Domain views of what the coordinator answers: [`Task`], [`TaskEvent`],
//! [`ClusterInfo`], each converted from its `pb` message with `TryFrom`, so
//! callers never unwrap an `Option` proto3 forced on a field. (`NodeInfo`
//! lives in `weft-proto`, shared with the coordinator.)
//! No I/O here.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use weft_proto::convert::{duration_from_pb, system_time};
use weft_proto::{
    Attempt, ConversionError, NodeId, Outcome, OutputStream, TaskId, TaskSpec, TaskState, pb,
};

/// A task's record, as the coordinator holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// The task's id.
    pub id: TaskId,
    /// What it runs (absent only if the coordinator did not send it).
    pub spec: Option<TaskSpec>,
    /// Where it is in its life.
    pub state: TaskState,
    /// The latest attempt, from 1; 0 before the first assignment.
    pub attempt: Attempt,
    /// Node of the latest attempt, if it was ever assigned.
    pub node_id: Option<NodeId>,
    /// Name of that node.
    pub node_name: Option<String>,
    /// Exit code of the latest attempt's process, if it exited.
    pub exit_code: Option<i32>,
    /// The handler's return value (call tasks).
    pub output: Bytes,
    /// Why it failed, was cancelled or timed out; empty otherwise.
    pub error: String,
    /// For a queued task: why it is still waiting.
    pub pending_reason: String,
    /// Attempts that ended in failure.
    pub failures: u32,
    /// Attempts lost with their node.
    pub node_losses: u32,
    /// When it was submitted.
    pub created_at: Option<SystemTime>,
    /// When its record last changed.
    pub updated_at: Option<SystemTime>,
    /// Sequence number its next event will get (where a watcher that has
    /// seen everything so far would resume).
    pub next_seq: u64,
    /// How the latest attempt ended, as its node reported it; `None` before
    /// any attempt, while one runs, and when it was lost with its node.
    pub last_outcome: Option<Outcome>,
    /// Its attempts, oldest first (the latest 100); the last is the
    /// current one while the task is on a node.
    pub attempts: Vec<TaskAttempt>,
    /// Its job: the first task of the Submit it came in (itself for the
    /// first one).
    pub job_id: Option<TaskId>,
    /// For a PENDING task: the tasks it runs after that are not final yet.
    pub waiting_for: Vec<TaskId>,
}

/// What one `Submit` made: its job and its tasks' ids, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitOutcome {
    /// The job: the first task's id; `weft job get/watch/cancel` take it.
    pub job_id: TaskId,
    /// Every task's id, in the order of the specs.
    pub task_ids: Vec<TaskId>,
}

/// What [`Client::cancel_job`](crate::Client::cancel_job) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobCancelled {
    /// Tasks that were live and are cancelled (running ones are being
    /// stopped).
    pub cancelled: u32,
    /// Tasks that were already final.
    pub already_final: u32,
}

/// Which tasks [`Client::list_filtered`](crate::Client::list_filtered)
/// answers: every filter given must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListFilter {
    /// Only tasks in this state.
    pub state: Option<TaskState>,
    /// Only tasks with every one of these labels (key and value equal).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Only tasks whose name contains this text (empty: any).
    pub name: String,
    /// Only tasks with an attempt on this node, by name or id (empty: any).
    pub node: String,
    /// Only tasks submitted at or after this time.
    pub since: Option<SystemTime>,
    /// Only tasks submitted at or before this time.
    pub until: Option<SystemTime>,
    /// Only the tasks of this job, oldest first.
    pub job: Option<weft_proto::TaskId>,
}

/// One attempt of a task: where it ran, when, and how it ended.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskAttempt {
    /// Its number, from 1.
    pub number: Attempt,
    /// The node it was assigned to.
    pub node_id: Option<NodeId>,
    /// That node's name.
    pub node_name: String,
    /// When it was assigned.
    pub assigned_at: Option<SystemTime>,
    /// When it started; `None` if it never did.
    pub started_at: Option<SystemTime>,
    /// When it ended; `None` while it is on its node.
    pub ended_at: Option<SystemTime>,
    /// How it ended as its node reported it; `None` while it runs and
    /// when it ended without a report (lost with its node, taken back).
    pub outcome: Option<Outcome>,
    /// Exit code of its process, if it exited.
    pub exit_code: Option<i32>,
    /// Why it ended, in words; empty for a success and while it runs.
    pub reason: String,
}

impl TaskAttempt {
    /// How long it ran: from start to end, or to `now` while it runs;
    /// `None` if it never started.
    pub fn run_time(&self, now: SystemTime) -> Option<std::time::Duration> {
        let started = self.started_at?;
        let end = self.ended_at.unwrap_or(now);
        Some(end.duration_since(started).unwrap_or_default())
    }
}

impl TryFrom<pb::Attempt> for TaskAttempt {
    type Error = ConversionError;

    fn try_from(attempt: pb::Attempt) -> Result<Self, Self::Error> {
        Ok(TaskAttempt {
            number: Attempt(attempt.number),
            node_id: optional_id(&attempt.node_id)?,
            node_name: attempt.node_name,
            assigned_at: attempt.assigned_at.as_ref().map(system_time),
            started_at: attempt.started_at.as_ref().map(system_time),
            ended_at: attempt.ended_at.as_ref().map(system_time),
            outcome: Outcome::try_from(attempt.outcome).ok(),
            exit_code: attempt.exit_code,
            reason: attempt.reason,
        })
    }
}

impl TryFrom<pb::Task> for Task {
    type Error = ConversionError;

    fn try_from(task: pb::Task) -> Result<Self, Self::Error> {
        Ok(Task {
            id: task.id.parse()?,
            spec: task.spec.map(TaskSpec::try_from).transpose()?,
            state: TaskState::try_from(task.state)?,
            attempt: Attempt(task.attempt),
            node_id: optional_id(&task.node_id)?,
            node_name: non_empty(task.node_name),
            exit_code: task.exit_code,
            output: task.output,
            error: task.error,
            pending_reason: task.pending_reason,
            failures: task.failures,
            node_losses: task.node_losses,
            created_at: task.created_at.as_ref().map(system_time),
            updated_at: task.updated_at.as_ref().map(system_time),
            next_seq: task.next_seq,
            // UNSPECIFIED (or a value this client does not know) is None.
            last_outcome: Outcome::try_from(task.last_outcome).ok(),
            attempts: task
                .attempts
                .into_iter()
                .map(TaskAttempt::try_from)
                .collect::<Result<_, _>>()?,
            job_id: match task.job_id.as_str() {
                "" => None,
                id => Some(id.parse()?),
            },
            waiting_for: task
                .waiting_for
                .iter()
                .map(|id| id.parse())
                .collect::<Result<_, _>>()?,
        })
    }
}

/// One event of a task's history. `seq` counts from 0 with no gaps, so a
/// watcher that lost its stream resumes at `seq + 1`.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskEvent {
    /// The task it belongs to.
    pub task_id: TaskId,
    /// Its place in the task's history.
    pub seq: u64,
    /// The attempt it belongs to (0 before any assignment).
    pub attempt: Attempt,
    /// What happened.
    pub body: EventBody,
}

/// What a [`TaskEvent`] says.
// `Finished` is much larger than the other arms, but events are handled one
// at a time, never stored in bulk, so boxing it would only cost callers a deref.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum EventBody {
    /// The task changed state.
    State {
        /// The new state.
        state: TaskState,
        /// The node involved, if any.
        node_name: Option<String>,
        /// Why, in words.
        reason: String,
    },
    /// A chunk of output.
    Output {
        /// Which stream.
        stream: OutputStream,
        /// The bytes.
        data: Bytes,
    },
    /// Progress reported by the running attempt.
    Progress {
        /// From 0 to 1.
        fraction: f64,
        /// In words.
        message: String,
    },
    /// The task reached a final state; always the last event.
    Finished(Task),
}

impl TaskEvent {
    /// The final task, when this is the last event.
    pub fn finished(&self) -> Option<&Task> {
        match &self.body {
            EventBody::Finished(task) => Some(task),
            _ => None,
        }
    }
}

impl TryFrom<pb::TaskEvent> for TaskEvent {
    type Error = ConversionError;

    fn try_from(event: pb::TaskEvent) -> Result<Self, Self::Error> {
        use pb::task_event::Body;
        let body = match event.body {
            None => return Err(ConversionError::MissingField("TaskEvent.body")),
            Some(Body::State(state)) => EventBody::State {
                state: TaskState::try_from(state.state)?,
                node_name: non_empty(state.node_name),
                reason: state.reason,
            },
            Some(Body::Output(output)) => EventBody::Output {
                stream: OutputStream::try_from(output.stream)?,
                data: output.data,
            },
            Some(Body::Progress(progress)) => EventBody::Progress {
                fraction: progress.fraction,
                message: progress.message,
            },
            Some(Body::Finished(task)) => EventBody::Finished(Task::try_from(task)?),
        };
        Ok(TaskEvent {
            task_id: event.task_id.parse()?,
            seq: event.seq,
            attempt: Attempt(event.attempt),
            body,
        })
    }
}

/// Cluster-wide figures.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterInfo {
    /// The coordinator's version.
    pub version: String,
    /// Connected nodes.
    pub nodes: u32,
    /// Slots of all connected nodes.
    pub slots: u32,
    /// Free slots: at most slots minus slots used (a node's prefetch never
    /// counts); the sum of the nodes' `slots_free`.
    pub slots_free: u32,
    /// How many tasks are in each state.
    pub tasks: Vec<(TaskState, u64)>,
    /// Time since the coordinator started.
    pub uptime: Duration,
    /// Node events refused by fencing.
    pub stale_events_refused: u64,
    /// Nodes declared lost since start.
    pub nodes_lost: u64,
    /// What revoked nodes tried since start (connects, renewals, events),
    /// all refused.
    pub revoked_node_refusals: u64,
    /// Node events refused since start because their attempt is leased to
    /// another node.
    pub foreign_events_refused: u64,
    /// Attempts taken back since start because their node had not started
    /// them within the coordinator's start timeout.
    pub attempts_not_started: u64,
    /// Attempts whose node's stream ended and that the node came back and
    /// claimed within the reconnect grace, since start.
    pub reclaimed_attempts: u64,
    /// Tasks that reached a final state since the coordinator started:
    /// only grows (0 again after a restart), unlike the per-state counts,
    /// which retention lowers; its rate is the cluster's throughput.
    pub tasks_finished: u64,
}

impl ClusterInfo {
    /// Tasks in `state` (0 when the coordinator did not list it).
    pub fn count(&self, state: TaskState) -> u64 {
        self.tasks
            .iter()
            .filter(|(s, _)| *s == state)
            .map(|(_, n)| n)
            .sum()
    }
}

impl TryFrom<pb::ClusterInfoResponse> for ClusterInfo {
    type Error = ConversionError;

    fn try_from(info: pb::ClusterInfoResponse) -> Result<Self, Self::Error> {
        let tasks = info
            .tasks
            .iter()
            .map(|c| Ok((TaskState::try_from(c.state)?, c.count)))
            .collect::<Result<Vec<_>, ConversionError>>()?;
        let uptime = match &info.uptime {
            Some(d) => duration_from_pb("uptime", d)?,
            None => Duration::ZERO,
        };
        Ok(ClusterInfo {
            version: info.version,
            nodes: info.nodes,
            slots: info.slots,
            slots_free: info.slots_free,
            tasks,
            uptime,
            stale_events_refused: info.stale_events_refused,
            nodes_lost: info.nodes_lost,
            revoked_node_refusals: info.revoked_node_refusals,
            foreign_events_refused: info.foreign_events_refused,
            attempts_not_started: info.attempts_not_started,
            reclaimed_attempts: info.reclaimed_attempts,
            tasks_finished: info.tasks_finished,
        })
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

fn optional_id(text: &str) -> Result<Option<NodeId>, ConversionError> {
    if text.is_empty() {
        Ok(None)
    } else {
        text.parse().map(Some)
    }
}
