//! A live task's compact in-memory state and the transitions of its state
//! machine: QUEUED -> ASSIGNED -> RUNNING -> final, and back to QUEUED with
//! attempt + 1 on a retry or a node loss. Every transition writes the task's
//! record and a `StateChanged` event; reaching a final state also writes the
//! `finished` event and forgets the task (the store keeps it).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use weft_proto::{Attempt, NodeId, Outcome, TaskId, TaskSpec, TaskState};

use super::Scheduler;
use super::queue::ClassId;
use super::registry::SessionId;
use crate::store::{EventBody, Record, TaskEvent, TaskRecord};

/// Where the current attempt runs.
#[derive(Clone, Debug)]
pub(crate) struct Placement {
    pub session: SessionId,
    pub node_id: NodeId,
    pub node_name: Arc<str>,
}

/// A task that is not final yet. Kept small: a million of these may wait.
#[derive(Debug)]
pub(crate) struct LiveTask {
    pub spec: Arc<TaskSpec>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    /// Seq the next event of this task gets.
    pub next_seq: u64,
    /// Next output chunk seq expected from the current attempt (dedupe).
    pub next_chunk: u64,
    pub exit_code: Option<i32>,
    /// Node of the current attempt; `None` while queued.
    pub placement: Option<Placement>,
    /// What few tasks need (a pending cancel, lost nodes), boxed so the
    /// common task pays one pointer for it.
    pub rare: Option<Box<Rare>>,
    pub class: ClassId,
    /// Latest attempt (0 before the first assignment).
    pub attempt: u32,
    pub failures: u32,
    pub node_losses: u32,
    pub state: TaskState,
    /// How the latest attempt ended (`None` while it runs or was lost).
    pub last_outcome: Option<Outcome>,
    /// Queued but waiting out a retry backoff (not in a ready queue).
    pub delayed: bool,
}

impl LiveTask {
    pub fn new(spec: Arc<TaskSpec>, class: ClassId, now: SystemTime) -> Self {
        LiveTask {
            spec,
            created_at: now,
            updated_at: now,
            next_seq: 0,
            next_chunk: 0,
            exit_code: None,
            placement: None,
            rare: None,
            class,
            attempt: 0,
            failures: 0,
            node_losses: 0,
            state: TaskState::Queued,
            last_outcome: None,
            delayed: false,
        }
    }

    /// The record as the store keeps it.
    pub fn record(&self, id: TaskId) -> TaskRecord {
        TaskRecord {
            id,
            spec: Arc::clone(&self.spec),
            state: self.state,
            attempt: Attempt(self.attempt),
            node_id: self.placement.as_ref().map(|p| p.node_id),
            node_name: self.placement.as_ref().map(|p| Arc::clone(&p.node_name)),
            exit_code: self.exit_code,
            output: Bytes::new(),
            error: String::new(),
            pending_reason: String::new(),
            failures: self.failures,
            node_losses: self.node_losses,
            created_at: self.created_at,
            updated_at: self.updated_at,
            next_seq: self.next_seq,
            last_outcome: self.last_outcome,
            lost_nodes: self.lost_nodes().to_vec(),
        }
    }

    /// The reason a client gave when it cancelled this task while it ran;
    /// recorded as the error once the node reports or is lost.
    pub fn cancel_reason(&self) -> Option<&str> {
        self.rare.as_ref()?.cancel.as_deref()
    }

    /// Records a client's cancel of the running attempt.
    pub fn set_cancel(&mut self, reason: String) {
        self.rare.get_or_insert_default().cancel = Some(reason.into_boxed_str());
    }

    /// Different nodes lost while this task ran on them, oldest first.
    pub fn lost_nodes(&self) -> &[NodeRef] {
        self.rare.as_ref().map_or(&[], |r| &r.lost_nodes)
    }

    /// Notes that `node` was lost while this task ran on it (once per node).
    pub fn add_lost_node(&mut self, node: NodeRef) {
        if !self.lost_nodes().iter().any(|(id, _)| *id == node.0) {
            self.rare.get_or_insert_default().lost_nodes.push(node);
        }
    }

    /// True when `attempt` is this task's current attempt and it is running
    /// (or assigned) on `session`: the fencing rule.
    pub fn is_current(&self, attempt: Attempt, session: SessionId) -> bool {
        matches!(self.state, TaskState::Assigned | TaskState::Running)
            && self.attempt == attempt.0
            && self
                .placement
                .as_ref()
                .is_some_and(|p| p.session == session)
    }

    fn node(&self) -> (Option<NodeId>, Option<Arc<str>>) {
        match &self.placement {
            Some(p) => (Some(p.node_id), Some(Arc::clone(&p.node_name))),
            None => (None, None),
        }
    }
}

/// The rarely needed part of a [`LiveTask`].
#[derive(Debug, Default)]
pub(crate) struct Rare {
    /// Set when a client cancelled a running task.
    pub cancel: Option<Box<str>>,
    /// Different nodes lost while this task ran on them (poison evidence).
    pub lost_nodes: Vec<NodeRef>,
}

/// Index of a state in the per-state counters.
pub(crate) fn state_index(state: TaskState) -> usize {
    TaskState::ALL.iter().position(|s| *s == state).unwrap_or(0)
}

/// A lost or previous node, named in a `StateChanged` event.
pub(crate) type NodeRef = (NodeId, Arc<str>);

impl Scheduler {
    /// Appends an event to a live task's history.
    pub(crate) fn emit(&mut self, id: TaskId, body: EventBody, wall: SystemTime) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let seq = task.next_seq;
        task.next_seq += 1;
        self.out.records.push(Record::Event(TaskEvent {
            task_id: id,
            seq,
            attempt: Attempt(task.attempt),
            time: wall,
            body,
        }));
    }

    /// Moves a live task to a non-final `state`, writing its record and a
    /// `StateChanged` event. `node` overrides the node named in the event.
    pub(crate) fn change_state(
        &mut self,
        id: TaskId,
        state: TaskState,
        node: Option<NodeRef>,
        reason: String,
        wall: SystemTime,
    ) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        self.counts[state_index(task.state)] =
            self.counts[state_index(task.state)].saturating_sub(1);
        self.counts[state_index(state)] += 1;
        task.state = state;
        task.updated_at = wall;
        let (node_id, node_name) = match node {
            Some((id, name)) => (Some(id), Some(name)),
            None => task.node(),
        };
        self.out.records.push(Record::Task(task.record(id)));
        self.emit(
            id,
            EventBody::State {
                state,
                node_id,
                node_name,
                reason,
            },
            wall,
        );
    }

    /// Puts a task back in the queue as its next attempt, at once or after
    /// `delay` (retry backoff).
    pub(crate) fn requeue(
        &mut self,
        id: TaskId,
        delay: Option<Duration>,
        lost: Option<NodeRef>,
        reason: String,
        now: super::Now,
    ) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.attempt = task.attempt.saturating_add(1);
        task.placement = None;
        task.next_chunk = 0;
        task.exit_code = None;
        task.delayed = delay.is_some();
        let (class, attempt) = (task.class, task.attempt);
        self.change_state(id, TaskState::Queued, lost, reason, now.wall);
        match delay {
            Some(delay) => self.queue.delay(now.instant + delay, id, attempt),
            None => self.queue.push_front_ready(class, id),
        }
    }

    /// Ends a task in a final `state`: writes its record, the final
    /// `StateChanged` and the `finished` event, and forgets it.
    pub(crate) fn finalize(
        &mut self,
        id: TaskId,
        state: TaskState,
        error: String,
        output: Bytes,
        wall: SystemTime,
    ) {
        let Some(mut task) = self.tasks.remove(&id) else {
            return;
        };
        self.counts[state_index(task.state)] =
            self.counts[state_index(task.state)].saturating_sub(1);
        self.counts[state_index(state)] += 1;
        task.state = state;
        task.updated_at = wall;
        let mut record = task.record(id);
        record.error = error.clone();
        record.output = output;
        record.next_seq = task.next_seq + 2;
        let (node_id, node_name) = task.node();
        let attempt = Attempt(task.attempt);
        self.out.records.push(Record::Task(record.clone()));
        self.out.records.push(Record::Event(TaskEvent {
            task_id: id,
            seq: task.next_seq,
            attempt,
            time: wall,
            body: EventBody::State {
                state,
                node_id,
                node_name,
                reason: error,
            },
        }));
        self.out.records.push(Record::Event(TaskEvent {
            task_id: id,
            seq: task.next_seq + 1,
            attempt,
            time: wall,
            body: EventBody::Finished(Box::new(record)),
        }));
        tracing::debug!(task_id = %id, attempt = task.attempt, state = %state, "task finished");
    }
}
