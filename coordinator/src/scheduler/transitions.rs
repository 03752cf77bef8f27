//! The transitions of a live task's state machine, as the scheduler makes
//! them: appending an event, moving to a non-final state, requeueing as
//! the next attempt, and finalizing. Each writes the task's record and its
//! events to the effects (the only place that does), and keeps the
//! per-state counters right and the attempt history (assigned, started,
//! ended) that rides in those records.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use weft_proto::{Attempt, TaskId, TaskState};

use super::task::{NodeRef, state_index};
use super::{Now, Scheduler};
use crate::metrics::Retry;
use crate::store::{EventBody, Record, TaskEvent};

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
        if task.state == TaskState::Queued {
            self.queue.forget_head(task.class, id);
        }
        task.state = state;
        match state {
            TaskState::Assigned => task.attempt_assigned(wall),
            TaskState::Running => task.attempt_started(wall),
            _ => {}
        }
        let (node_id, node_name) = match node {
            Some((id, name)) => (Some(id), Some(name)),
            None => task.node(),
        };
        let spec = task.spec.to_spec(self.queue.example(task.class));
        self.out.write_task(task.record(id, spec, wall));
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
        now: Now,
    ) {
        // A child that no longer fits one message (`graph.rs`) fails.
        if self.fail_if_oversized(id, now.wall) {
            return;
        }
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.attempt_ended(now.wall, &reason);
        task.attempt = task.attempt.saturating_add(1);
        task.unplace();
        self.metrics.retried(match delay {
            Some(_) => Retry::Failed,
            None => Retry::Node,
        });
        task.delayed = delay.is_some();
        let (class, attempt, created) = (task.class, task.attempt, task.created_nanos());
        self.policy_attempt_ended(class);
        self.change_state(id, TaskState::Queued, lost, reason, now.wall);
        match delay {
            Some(delay) => self.queue.delay(now.instant + delay, id, attempt),
            None => self.queue.push_front_ready(class, id, created),
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
        self.queue.parted(task.class);
        self.counts[state_index(task.state)] =
            self.counts[state_index(task.state)].saturating_sub(1);
        self.counts[state_index(state)] += 1;
        self.tasks_finished += 1;
        if task.state == TaskState::Queued {
            self.queue.forget_head(task.class, id);
        }
        let was_out = matches!(task.state, TaskState::Assigned | TaskState::Running);
        let counted = task.state != TaskState::Pending;
        if !counted {
            self.pending_ended();
        }
        self.policy_finalized(id, task.class, counted, was_out);
        task.state = state;
        task.attempt_ended(wall, &error);
        let spec = task.spec.to_spec(self.queue.example(task.class));
        self.metrics.finished(&spec.kind, state);
        let mut record = task.record(id, spec, wall);
        record.error = error.clone();
        record.output = output;
        record.next_seq = task.next_seq + 2;
        let (node_id, node_name) = task.node();
        let attempt = Attempt(task.attempt);
        // Dependencies (`graph.rs`): only when some task uses them.
        let graph = (!self.graph.is_empty()
            || !record.spec.ref_name.is_empty()
            || !record.spec.after.is_empty())
        .then(|| (record.output.clone(), record.spec.ref_name.clone()));
        self.out.write_task(record.clone());
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
            body: EventBody::Finished(Arc::new(record)),
        }));
        // Nothing can need its secrets any more: gone from memory, and from
        // the store in the commit that makes the task final.
        if !self.secrets.is_empty() && self.secrets.remove(&id).is_some() {
            self.out.records.push(Record::ForgetSecrets(id));
        }
        tracing::debug!(task_id = %id, attempt = task.attempt, state = %state, "task finished");
        if let Some((output, ref_name)) = graph {
            self.graph_finished(id, state, &output, &ref_name, wall);
        }
    }
}
