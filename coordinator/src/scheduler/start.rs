//! The start deadline: an attempt sent to a node must start (the node
//! reports `Started`) within `start_timeout`, or it is taken back.
//!
//! A node that takes an `Assign` starts the attempt at once when it has a
//! free slot, or holds it queued (prefetch) until one frees. So an attempt
//! still unstarted after the deadline means one of two things:
//! - the node runs nothing at all: it had every slot free and started
//!   none of what it was sent. It does not read its stream, or cannot run
//!   anything; it is declared lost (its session ends). Its attempts never
//!   ran, so they go back to the queue at no cost to the tasks (no failure,
//!   no node loss), as the next attempt;
//! - the node is busy running other attempts and held this one queued
//!   behind them: only this attempt is taken back (the node is told to
//!   cancel it), at no cost to the task, so a node with room can run it.
//!
//! Deadlines are kept in assignment order (each is its assignment's time
//! plus the same timeout), so only the oldest is ever looked at; entries
//! of attempts that started or ended meanwhile are dropped as they reach
//! the front. Ticks come with every batch, so the queue holds about one
//! batch of assignments unless an attempt really waits.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use weft_proto::{Attempt, TaskId, TaskState};

use super::registry::SessionId;
use super::{Now, Scheduler};

/// Attempts sent to nodes, oldest first, with the time each must have
/// started by.
#[derive(Debug, Default)]
pub(super) struct StartDeadlines {
    queue: VecDeque<(Instant, TaskId, Attempt, SessionId)>,
}

impl StartDeadlines {
    /// The earliest deadline kept (perhaps of an attempt that started).
    pub fn next(&self) -> Option<Instant> {
        self.queue.front().map(|(deadline, ..)| *deadline)
    }
}

impl Scheduler {
    /// `attempt` of task `id` was just sent to (or claimed by) the node on
    /// `session`: it must start within the start timeout. (A claim after a
    /// reconnect is a new session, so the old session's deadline lapses.)
    pub(super) fn expect_start(
        &mut self,
        id: TaskId,
        attempt: Attempt,
        session: SessionId,
        now: Instant,
    ) {
        let deadline = now + self.config.start_timeout;
        self.start_deadlines
            .queue
            .push_back((deadline, id, attempt, session));
    }

    /// Takes back the attempts past their start deadline (see the module
    /// docs).
    pub(super) fn expire_unstarted(&mut self, now: Now) {
        while let Some(&(deadline, id, attempt, sent_to)) = self.start_deadlines.queue.front() {
            let Some(session) = self.unstarted_on(id, attempt).filter(|s| *s == sent_to) else {
                self.start_deadlines.queue.pop_front();
                continue;
            };
            if deadline > now.instant {
                return;
            }
            self.start_deadlines.queue.pop_front();
            let busy = self.nodes.get(session).is_some_and(|node| {
                node.running.keys().any(|task| {
                    self.tasks
                        .get(task)
                        .is_some_and(|t| t.state == TaskState::Running)
                })
            });
            if busy {
                self.give_back_unstarted(session, id, attempt, now);
                continue;
            }
            let Some(node) = self.nodes.get(session) else {
                continue;
            };
            let mut held: Vec<(TaskId, Attempt)> =
                node.running.iter().map(|(t, a)| (*t, *a)).collect();
            held.sort();
            let timeout = self.config.start_timeout;
            tracing::warn!(node_id = %node.id(), node_name = %node.name, attempts = held.len(), ?timeout, "node started none of its attempts within the start timeout; declaring it lost");
            for (task, attempt) in held {
                self.give_back_unstarted(session, task, attempt, now);
            }
            self.nodes_stuck += 1;
            let why = format!("started none of its attempts within --start-timeout ({timeout:?})");
            self.lose_node(session, &why, now);
        }
    }

    /// The session of the node holding `attempt` of `id` unstarted, if it
    /// still does (current attempt, assigned, on a connected node).
    fn unstarted_on(&self, id: TaskId, attempt: Attempt) -> Option<SessionId> {
        let task = self.tasks.get(&id)?;
        if task.state != TaskState::Assigned || task.attempt != attempt.0 {
            return None;
        }
        let session = task.placement()?.session;
        self.nodes.get(session).map(|_| session)
    }

    /// Takes `attempt` of `id` back from the node on `session`, which has
    /// not started it: the node is told to cancel it, and the task is
    /// queued again as the next attempt, charged nothing.
    fn give_back_unstarted(&mut self, session: SessionId, id: TaskId, attempt: Attempt, now: Now) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        if self.unstarted_on(id, attempt) != Some(session)
            || task.state != TaskState::Assigned
            || task.attempt != attempt.0
        {
            return;
        }
        // The node's slot and resources come back whatever happens to the
        // task: a task cancelled meanwhile ends here (`take_back`), and
        // the node's own answer for it then counts for nothing.
        let example = self.queue.example(task.class);
        let slots = example.slots;
        let Some(node) = self.nodes.get_mut(session) else {
            return;
        };
        node.running.remove(&id);
        node.used = node.used.saturating_sub(slots);
        node.release_resources(&example.resources);
        let node_ref = (node.id(), Arc::clone(&node.name));
        if !self.take_back(id, attempt, &[TaskState::Assigned], now) {
            return;
        }
        let timeout = self.config.start_timeout;
        self.attempts_not_started += 1;
        self.order_cancel(
            session,
            id,
            attempt,
            format!("not started within the start timeout ({timeout:?}); given back"),
        );
        let reason = format!(
            "attempt {} not started by node {} within --start-timeout ({timeout:?}); retrying as attempt {}",
            attempt.0,
            node_ref.1,
            attempt.0 + 1
        );
        self.requeue(id, None, Some(node_ref), reason, now);
    }
}
