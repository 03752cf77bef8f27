//! Node sessions as the scheduler sees them: registration (and taking back
//! attempts after a reconnect), credits, heartbeats, draining, attempt
//! events with fencing, and node loss.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;

use weft_proto::{Attempt, NodeId, NodeInfo, Outcome, TaskId, TaskState};

use super::registry::{NodeEntry, NodeRegistration, SessionId};
use super::retry::{Setback, Verdict};
use super::{NodeEventBody, NodeTaskEvent, Now, Scheduler};
use crate::error::Error;
use crate::store::EventBody;

impl Scheduler {
    /// A node registered on `session`. Attempts it reports running carry on
    /// when they are still current and were on this node id (also those
    /// restored from the store after a coordinator restart); it is told to
    /// cancel the others, except attempts whose result is already recorded
    /// (it is about to redeliver those). Attempts restored on this node id
    /// that it does not report are requeued at once: it does not run them.
    /// If the node id was already connected on another session, that
    /// session is replaced (its unreported attempts are lost).
    pub fn register_node(&mut self, session: SessionId, reg: NodeRegistration, now: Now) {
        let reported: HashSet<(TaskId, Attempt)> = reg.running.iter().copied().collect();
        if let Some(old) = self.nodes.session_of(reg.node_id)
            && old != session
            && let Some(entry) = self.nodes.remove(old)
        {
            tracing::info!(node_id = %entry.id(), node_name = %entry.name, "node reconnected; replacing its old session");
            self.out.disconnect.push(old);
            let mut lost: Vec<(TaskId, Attempt)> = entry
                .running
                .iter()
                .map(|(t, a)| (*t, *a))
                .filter(|r| !reported.contains(r))
                .collect();
            lost.sort();
            if !lost.is_empty() {
                self.nodes_lost += 1;
            }
            for (id, attempt) in lost {
                self.lose_attempt(id, attempt, &entry.name, entry.id(), now);
            }
        }
        let node_id = reg.node_id;
        let running = reg.running.clone();
        let mut entry = NodeEntry::new(reg, now.instant);
        let name = std::sync::Arc::clone(&entry.name);
        let mut refused = Vec::new();
        for (id, attempt) in running {
            let adoptable = self.tasks.get(&id).is_some_and(|t| {
                matches!(t.state, TaskState::Assigned | TaskState::Running)
                    && t.attempt == attempt.0
                    && t.placement().is_some_and(|p| p.node_id == node_id)
            });
            match self.tasks.get_mut(&id) {
                Some(task) if adoptable => {
                    if let Some(p) = task.placement_mut() {
                        if p.session == SessionId::RESTORED {
                            self.recovered_attempts += 1;
                            tracing::info!(task_id = %id, attempt = attempt.0, node_id = %node_id, node_name = %name, "restored attempt claimed by its node");
                        }
                        p.session = session;
                        p.node_name = std::sync::Arc::clone(&name);
                    }
                    let slots = self.queue.example(task.class).slots;
                    entry.used = entry.used.saturating_add(slots);
                    entry.running.insert(id, attempt);
                }
                _ if self.recent.contains(id, attempt) => {}
                _ => refused.push((id, attempt)),
            }
        }
        tracing::info!(node_id = %node_id, node_name = %entry.name, slots = entry.slots, adopted = entry.running.len(), "node registered");
        self.nodes.insert(session, entry);
        for (id, attempt) in refused {
            self.order_cancel(session, id, attempt, "attempt is no longer current".into());
        }
        self.requeue_unclaimed(node_id, &name, now);
        if self.next_liveness_check.is_none() {
            self.next_liveness_check = Some(now.instant + self.liveness_interval());
        }
    }

    /// Requeues the attempts restored on `node_id` that it did not claim
    /// when it registered, and forgets orphans that are settled.
    fn requeue_unclaimed(&mut self, node_id: NodeId, name: &std::sync::Arc<str>, now: Now) {
        if self.orphans.is_empty() {
            return;
        }
        let mut unclaimed = Vec::new();
        self.orphans.retain(|(id, _)| {
            let Some(task) = self.tasks.get(id) else {
                return false;
            };
            match task.placement() {
                Some(p) if p.session == SessionId::RESTORED => {
                    if p.node_id == node_id {
                        unclaimed.push((*id, Attempt(task.attempt)));
                        false
                    } else {
                        true
                    }
                }
                _ => false,
            }
        });
        for (id, attempt) in unclaimed {
            let started = self
                .tasks
                .get(&id)
                .is_some_and(|t| t.state == TaskState::Running);
            tracing::info!(task_id = %id, attempt = attempt.0, node_id = %node_id, node_name = %name, started, "node came back without a restored attempt; requeueing it");
            if started {
                self.lose_attempt(id, attempt, name, node_id, now);
            } else {
                self.requeue_undelivered(id, attempt, name, node_id, now);
            }
        }
    }

    /// Requeues an attempt recorded as assigned to a node that, back after
    /// a coordinator restart, says it does not have it: the `Assign` was
    /// lost with the old process before it reached the node (a node lists
    /// every attempt it runs, holds queued, or finished within its
    /// redelivery window). It is charged nothing (no node loss, no
    /// failure); it still gets a new attempt number, so nothing of the old
    /// one is accepted.
    fn requeue_undelivered(
        &mut self,
        id: TaskId,
        attempt: Attempt,
        node_name: &std::sync::Arc<str>,
        node_id: NodeId,
        now: Now,
    ) {
        if !self.take_back(id, attempt, &[TaskState::Assigned], now) {
            return;
        }
        let reason = format!(
            "the assignment to node {node_name} was lost in a coordinator restart before it arrived; retrying as attempt {}",
            attempt.0 + 1
        );
        let node = Some((node_id, std::sync::Arc::clone(node_name)));
        self.requeue(id, None, node, reason, now);
    }

    /// Whether `attempt` is the current attempt of task `id`, in one of
    /// `states`, and so to be taken back from its node. A task cancelled
    /// meanwhile ends `cancelled` here instead (answers false).
    fn take_back(&mut self, id: TaskId, attempt: Attempt, states: &[TaskState], now: Now) -> bool {
        let Some(task) = self.tasks.get(&id) else {
            return false;
        };
        if !states.contains(&task.state) || task.attempt != attempt.0 {
            return false;
        }
        if let Some(reason) = task.cancel_reason().map(str::to_owned) {
            self.finalize(id, TaskState::Cancelled, reason, Bytes::new(), now.wall);
            return false;
        }
        true
    }

    /// The node granted `grant` more slots. Ignored while it drains.
    pub fn credits(&mut self, session: SessionId, grant: u32, now: Now) {
        if let Some(node) = self.nodes.get_mut(session) {
            node.last_seen = now.instant;
            if !node.draining {
                node.grant(grant);
            }
        }
    }

    /// The node is alive (a heartbeat or any other message).
    pub fn heartbeat(&mut self, session: SessionId, now: Now) {
        if let Some(node) = self.nodes.get_mut(session) {
            node.last_seen = now.instant;
        }
    }

    /// The node says it is draining: it gets no new work.
    pub fn node_draining(&mut self, session: SessionId, now: Now) {
        if let Some(node) = self.nodes.get_mut(session) {
            node.last_seen = now.instant;
            node.draining = true;
            node.credits = 0;
            tracing::info!(node_id = %node.id(), node_name = %node.name, "node draining");
        }
    }

    /// The node's stream ended: it is lost at once (quietly when it had
    /// drained and runs nothing).
    pub fn node_gone(&mut self, session: SessionId, now: Now) {
        self.lose_node(session, "stream ended", now);
    }

    /// An operator drains a node, found by id or name. It is sent `Drain`
    /// and gets no new work from now on.
    pub fn drain_node(
        &mut self,
        selector: &str,
        grace: Option<Duration>,
        now: Instant,
    ) -> Result<NodeInfo, Error> {
        let session = self
            .nodes
            .find(selector)
            .ok_or_else(|| Error::NodeNotFound(selector.to_owned()))?;
        let node = self
            .nodes
            .get_mut(session)
            .ok_or_else(|| Error::NodeNotFound(selector.to_owned()))?;
        node.draining = true;
        node.credits = 0;
        tracing::info!(node_id = %node.id(), node_name = %node.name, ?grace, "draining node");
        let info = node.info(now);
        self.out.nodes.entry(session).or_default().drain = Some(grace);
        Ok(info)
    }

    /// A batch of attempt events from a node, in order.
    pub fn node_events(&mut self, session: SessionId, events: Vec<NodeTaskEvent>, now: Now) {
        match self.nodes.get_mut(session) {
            Some(node) => node.last_seen = now.instant,
            None => {
                // The session was already lost or replaced: nothing it says counts.
                self.stale_events_refused += events.len() as u64;
                return;
            }
        }
        for event in events {
            self.node_event(session, event, now);
        }
    }

    fn node_event(&mut self, session: SessionId, event: NodeTaskEvent, now: Now) {
        let id = event.task_id;
        let Some(task) = self
            .tasks
            .get_mut(&id)
            .filter(|t| t.is_current(event.attempt, session))
        else {
            if let NodeEventBody::Finished { outcome, .. } = &event.body
                && self.recent.is_duplicate(id, event.attempt, *outcome)
            {
                // A node redelivering a result we already recorded.
                tracing::debug!(task_id = %id, attempt = event.attempt.0, "ignored a redelivered result");
                return;
            }
            self.stale_events_refused += 1;
            tracing::debug!(task_id = %id, attempt = event.attempt.0, "refused event for a stale attempt");
            self.order_cancel(
                session,
                id,
                event.attempt,
                "stale attempt: not the task's current attempt on this node".into(),
            );
            return;
        };
        match event.body {
            NodeEventBody::Started => {
                if task.state == TaskState::Assigned {
                    self.change_state(id, TaskState::Running, None, String::new(), now.wall);
                }
            }
            NodeEventBody::Output { stream, data, seq } => {
                if seq < task.next_chunk() {
                    return; // a chunk we already have (resent after a reconnect)
                }
                task.set_next_chunk(seq + 1);
                self.emit(id, EventBody::Output { stream, data }, now.wall);
            }
            NodeEventBody::Progress { fraction, message } => {
                self.emit(id, EventBody::Progress { fraction, message }, now.wall);
            }
            NodeEventBody::Finished {
                outcome,
                exit_code,
                output,
                error,
            } => self.attempt_finished(session, id, outcome, exit_code, output, error, now),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt_finished(
        &mut self,
        session: SessionId,
        id: TaskId,
        outcome: Outcome,
        exit_code: Option<i32>,
        output: Bytes,
        error: String,
        now: Now,
    ) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.set_exit_code(exit_code);
        task.last_outcome = Some(outcome);
        // No `Started` came: the node never ran it (e.g. prefetched, then
        // the node drained).
        let started = task.state == TaskState::Running;
        let attempt = task.attempt;
        self.recent
            .insert(id, Attempt(attempt), Some(outcome), now.instant);
        let spec = task.spec.template(self.queue.example(task.class));
        let (max, slots, timeout) = (spec.max_attempts, spec.slots, spec.timeout);
        let cancel = task.cancel_reason().map(str::to_owned);
        let node_ref = task.placement().map(|p| (p.node_id, p.node_name.clone()));
        if let Some(node) = self.nodes.get_mut(session) {
            node.running.remove(&id);
            node.used = node.used.saturating_sub(slots);
            node.finished += 1;
        }
        if outcome == Outcome::Succeeded {
            self.finalize(id, TaskState::Succeeded, String::new(), output, now.wall);
            return;
        }
        if let Some(reason) = cancel {
            self.finalize(id, TaskState::Cancelled, reason, Bytes::new(), now.wall);
            return;
        }
        let error = if !error.is_empty() {
            error
        } else if let Some(code) = exit_code {
            format!("exited with code {code}")
        } else {
            format!("attempt ended {outcome}")
        };
        match outcome {
            Outcome::Succeeded => {}
            Outcome::Failed => match self.retry.judge(task, Setback::Failed, max) {
                Verdict::Requeue { delay } => {
                    let after = delay.map_or_else(String::new, |d| format!(" in {d:?}"));
                    let reason = format!(
                        "attempt {attempt} failed: {error}; retrying as attempt {}{after}",
                        attempt + 1
                    );
                    self.requeue(id, delay, node_ref, reason, now);
                }
                Verdict::Fail => {
                    let error = format!("{error} (attempt {attempt} of {max})");
                    self.finalize(id, TaskState::Failed, error, Bytes::new(), now.wall);
                }
            },
            Outcome::StartFailed => {
                task.failures += 1;
                let error = format!("failed to start: {error}");
                self.finalize(id, TaskState::Failed, error, Bytes::new(), now.wall);
            }
            Outcome::TimedOut => {
                let error = match timeout {
                    Some(t) if error.starts_with("attempt ended") => {
                        format!("timed out after {t:?}")
                    }
                    _ => error,
                };
                self.finalize(id, TaskState::TimedOut, error, Bytes::new(), now.wall);
            }
            Outcome::Cancelled if !started => {
                // Handed back before it ran (a draining node returns what it
                // held queued): neither a failure nor a lost run, so it costs
                // no attempt; it only takes a new attempt number (fencing).
                let name = node_ref
                    .as_ref()
                    .map_or_else(|| "?".to_owned(), |(_, n)| n.to_string());
                let reason = format!(
                    "attempt {attempt} returned unstarted by node {name} ({error}); retrying as attempt {}",
                    attempt + 1
                );
                self.requeue(id, None, node_ref, reason, now);
            }
            Outcome::Cancelled => {
                // Not asked for by a client: the node drained past its grace.
                // That is the node's doing, not the task's, so it counts like
                // a node loss.
                let name = node_ref
                    .as_ref()
                    .map_or_else(|| "?".to_owned(), |(_, n)| n.to_string());
                match self.retry.judge(task, Setback::NodeLost, max) {
                    Verdict::Requeue { delay } => {
                        let reason = format!(
                            "attempt {attempt} cancelled by node {name}; retrying as attempt {}",
                            attempt + 1
                        );
                        self.requeue(id, delay, node_ref, reason, now);
                    }
                    Verdict::Fail => {
                        let error = format!(
                            "attempt {attempt} of {max} cancelled by node {name}; no attempts left"
                        );
                        self.finalize(id, TaskState::Failed, error, Bytes::new(), now.wall);
                    }
                }
            }
        }
    }

    /// Declares the node on `session` lost and requeues its attempts.
    pub(crate) fn lose_node(&mut self, session: SessionId, why: &str, now: Now) {
        let Some(entry) = self.nodes.remove(session) else {
            return;
        };
        self.out.disconnect.push(session);
        if entry.draining && entry.running.is_empty() {
            tracing::info!(node_id = %entry.id(), node_name = %entry.name, "drained node left");
        } else {
            self.nodes_lost += 1;
            tracing::warn!(node_id = %entry.id(), node_name = %entry.name, attempts = entry.running.len(), why, "node lost");
        }
        let mut running: Vec<(TaskId, Attempt)> =
            entry.running.iter().map(|(t, a)| (*t, *a)).collect();
        running.sort();
        for (id, attempt) in running {
            self.lose_attempt(id, attempt, &entry.name, entry.id(), now);
        }
        if self.nodes.is_empty() {
            self.next_liveness_check = None;
        }
    }

    /// An attempt went down with its node: requeued as the next attempt,
    /// CANCELLED if a client had cancelled it, FAILED when no attempts are
    /// left or when it has now been running on `max_node_losses` different
    /// nodes that were lost (a poison task: not retried, to spare the rest).
    pub(crate) fn lose_attempt(
        &mut self,
        id: TaskId,
        attempt: Attempt,
        node_name: &std::sync::Arc<str>,
        node_id: NodeId,
        now: Now,
    ) {
        let out_on_a_node = [TaskState::Assigned, TaskState::Running];
        if !self.take_back(id, attempt, &out_on_a_node, now) {
            return;
        }
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let max = task
            .spec
            .template(self.queue.example(task.class))
            .max_attempts;
        let verdict = self.retry.judge(task, Setback::NodeLost, max);
        task.last_outcome = None;
        if task.state == TaskState::Running {
            task.add_lost_node((node_id, std::sync::Arc::clone(node_name)));
        }
        let limit = self.config.max_node_losses;
        if limit > 0 && task.lost_nodes().len() >= limit as usize {
            let names: Vec<&str> = task.lost_nodes().iter().map(|(_, n)| &**n).collect();
            let error = format!(
                "lost with {} different nodes ({}) while running; not retried to protect the cluster (--max-node-losses)",
                names.len(),
                names.join(", ")
            );
            tracing::warn!(task_id = %id, attempt = attempt.0, node_id = %node_id, node_name = %node_name, "poison task: failing it instead of retrying");
            self.finalize(id, TaskState::Failed, error, Bytes::new(), now.wall);
            return;
        }
        let node = Some((node_id, std::sync::Arc::clone(node_name)));
        match verdict {
            Verdict::Requeue { delay } => {
                let reason = format!(
                    "node {node_name} lost; retrying as attempt {}",
                    attempt.0 + 1
                );
                self.requeue(id, delay, node, reason, now);
            }
            Verdict::Fail => {
                let error = format!(
                    "node {node_name} lost during attempt {} of {max}; no attempts left",
                    attempt.0
                );
                self.finalize(id, TaskState::Failed, error, Bytes::new(), now.wall);
            }
        }
    }
}
