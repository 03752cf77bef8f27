//! Attempts as their nodes report them: fencing (only the current attempt
//! on its own session counts; anything else is refused and told to stop;
//! an event for an attempt leased to another node is counted apart, as
//! foreign),
//! output dedupe by chunk seq (gaps counted), how an attempt ends
//! (success, failure, timeout, cancel) and what a lost node means for the attempt it ran. Whether a task gets
//! another attempt is `retry.rs`'s rule.

use bytes::Bytes;

use weft_proto::limits::MAX_OUTPUT_CHUNK;
use weft_proto::{Attempt, NodeId, Outcome, TaskId, TaskState};

use super::registry::SessionId;
use super::retry::Verdict;
use super::{NodeEventBody, NodeTaskEvent, Now, Scheduler};
use crate::store::EventBody;

/// When "refused events for an attempt leased to another node" was last
/// logged (a logging rule only: the refusals are all counted, and `now`
/// is the scheduler's).
static FOREIGN_EVENTS: std::sync::LazyLock<std::sync::Mutex<crate::listener::backoff::Throttle>> =
    std::sync::LazyLock::new(|| {
        std::sync::Mutex::new(crate::listener::backoff::Throttle::new(
            std::time::Duration::from_secs(10),
        ))
    });

impl NodeTaskEvent {
    /// An event whose task id, as the node sent it, could not be read.
    /// It names the nil ULID, which no task has (every task id carries the
    /// time it was made), so fencing refuses and counts it like any event
    /// for an attempt that is not current; no `Cancel` answers it, as none
    /// could name the id the node sent. Its body is never looked at.
    pub(crate) fn unreadable(attempt: Attempt) -> NodeTaskEvent {
        NodeTaskEvent {
            task_id: TaskId::from_u128(0),
            attempt,
            body: NodeEventBody::Started,
        }
    }

    /// Whether this is an [`unreadable`](Self::unreadable) event.
    fn is_unreadable(&self) -> bool {
        self.task_id.as_u128() == 0
    }
}

impl Scheduler {
    /// A batch of attempt events from a node, in order.
    pub fn node_events(&mut self, session: SessionId, events: Vec<NodeTaskEvent>, now: Now) {
        match self.nodes.get_mut(session) {
            Some(node) => node.last_seen = now.instant,
            None => {
                // The session was already lost or replaced: nothing it says
                // counts. A revoked node's late reports are counted apart.
                let refused = events.len() as u64;
                if self.revoked_sessions.contains(&session) {
                    self.revoked_node_refusals += refused;
                } else {
                    self.stale_events_refused += refused;
                }
                return;
            }
        }
        self.tasks.warm(events.iter().map(|e| e.task_id));
        for event in events {
            self.node_event(session, event, now);
        }
    }

    fn node_event(&mut self, session: SessionId, event: NodeTaskEvent, now: Now) {
        if event.is_unreadable() {
            // Not current, as no task has its id; a Cancel could only name
            // an id the node never sent, so none goes.
            self.stale_events_refused += 1;
            return;
        }
        let id = event.task_id;
        let Some(task) = self
            .tasks
            .get_mut(&id)
            .filter(|t| t.is_current(event.attempt, session))
        else {
            if self.tasks.get(&id).is_some_and(|t| {
                t.attempt == event.attempt.0
                    && matches!(t.state, TaskState::Assigned | TaskState::Running)
                    && t.placement().is_some_and(|p| p.session != session)
            }) {
                // The current attempt, but leased to another node: this
                // node has no say over it. The real attempt is untouched;
                // the sender is told to stop whatever it thinks it runs.
                // Refused by fencing like any event not from the attempt's
                // own session, and counted apart as well.
                self.stale_events_refused += 1;
                self.foreign_events_refused += 1;
                // A node may send these in a flood: logged at most every
                // 10 s, with how many came meanwhile (all are counted).
                let due = FOREIGN_EVENTS
                    .lock()
                    .ok()
                    .and_then(|mut throttle| throttle.hit(now.instant));
                if let Some(refused) = due {
                    tracing::warn!(task_id = %id, attempt = event.attempt.0, session = session.0, refused, "refused events for an attempt leased to another node");
                }
                self.order_cancel(
                    session,
                    id,
                    event.attempt,
                    "attempt is leased to another node".into(),
                );
                return;
            }
            if let NodeEventBody::Finished { outcome, .. } = &event.body
                && self
                    .recent
                    .is_duplicate(id, event.attempt, *outcome, now.instant)
            {
                // A node redelivering a result we already recorded.
                tracing::debug!(task_id = %id, attempt = event.attempt.0, "ignored a redelivered result");
                return;
            }
            if let NodeEventBody::Output { .. } = &event.body
                && self.recent.contains(id, event.attempt, now.instant)
            {
                // Output sent again after a reconnect, ahead of its
                // redelivered result: the attempt's output was all in
                // before its result was recorded.
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
                    // The task's first start: an earlier attempt may have
                    // been taken back unstarted (start timeout, its node
                    // lost or drained while it was assigned).
                    if !task.started_before() {
                        let waited = now.wall.duration_since(task.created_at());
                        self.metrics
                            .submit_to_start
                            .observe_duration(waited.unwrap_or_default());
                    }
                    self.change_state(id, TaskState::Running, None, String::new(), now.wall);
                }
            }
            NodeEventBody::Output { stream, data, seq } => {
                let next = task.next_chunk();
                // Counting from 0 with no gaps, no node gets to the last
                // number: one sent is a broken node's, and taking it would
                // leave no next number to tell a repeat by.
                if seq == u64::MAX {
                    tracing::debug!(task_id = %id, "dropped an output chunk numbered u64::MAX");
                    return;
                }
                if seq < next {
                    return; // a chunk we already have (resent after a reconnect)
                }
                if seq > next {
                    // Chunks in between never came and will not: a node
                    // sends in order, and after a reconnect first sends
                    // again what it kept (bounded), so the gap is what it
                    // no longer had. Take the chunk and count the gap; its
                    // seq is stored with it, so a restart still knows the
                    // next one expected.
                    let missing = seq - next;
                    self.output_chunks_missed = self.output_chunks_missed.saturating_add(missing);
                    tracing::warn!(task_id = %id, attempt = event.attempt.0, missing, first = next, "output chunks missing; the node no longer had them");
                }
                // A seq is the node's to choose: the last one possible
                // takes no next.
                task.set_next_chunk(seq.saturating_add(1));
                let chunk = Some(seq);
                // A chunk over the size readers plan for (a worker may send
                // up to a whole message) is stored as several events of
                // its number, so every event a watch reads is bounded.
                let mut data = data;
                while data.len() > MAX_OUTPUT_CHUNK {
                    let piece = data.split_to(MAX_OUTPUT_CHUNK);
                    self.emit(
                        id,
                        EventBody::Output {
                            stream,
                            data: piece,
                            chunk,
                        },
                        now.wall,
                    );
                }
                self.emit(
                    id,
                    EventBody::Output {
                        stream,
                        data,
                        chunk,
                    },
                    now.wall,
                );
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
        if let Some(ran) = task.run_time(now.wall).filter(|_| started) {
            self.metrics.run.observe_duration(ran);
        }
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
            node.release_resources(&spec.resources);
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
            Outcome::Failed => match self.retry.after_failure(task, max) {
                Verdict::Requeue(delay) => {
                    let reason = format!(
                        "attempt {attempt} failed: {error}; retrying as attempt {} in {delay:?}",
                        attempt + 1
                    );
                    self.requeue(id, Some(delay), node_ref, reason, now);
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
            Outcome::Cancelled if !started && free_requeues(task) < MAX_FREE_REQUEUES => {
                // Handed back before it ran (a draining node returns what it
                // held queued): neither a failure nor a lost run, so it costs
                // no attempt; it only takes a new attempt number (fencing).
                // Past MAX_FREE_REQUEUES, a hand-back counts as below: a
                // node that hands every assignment back cannot bounce a
                // task forever.
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
                // Not asked for by a client: the node drained past its grace
                // (or kept handing the task back unstarted). That is the
                // node's doing, not the task's, so it counts like a node loss.
                let name = node_ref
                    .as_ref()
                    .map_or_else(|| "?".to_owned(), |(_, n)| n.to_string());
                match self.retry.after_node_loss(task, max) {
                    Verdict::Requeue(()) => {
                        let reason = format!(
                            "attempt {attempt} cancelled by node {name}; retrying as attempt {}",
                            attempt + 1
                        );
                        self.requeue(id, None, node_ref, reason, now);
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
        let verdict = self.retry.after_node_loss(task, max);
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
            Verdict::Requeue(()) => {
                let reason = format!(
                    "node {node_name} lost; retrying as attempt {}",
                    attempt.0 + 1
                );
                self.requeue(id, None, node, reason, now);
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

    /// Whether `attempt` is the current attempt of task `id`, in one of
    /// `states`, and so to be taken back from its node. A task cancelled
    /// meanwhile ends `cancelled` here instead (answers false).
    pub(super) fn take_back(
        &mut self,
        id: TaskId,
        attempt: Attempt,
        states: &[TaskState],
        now: Now,
    ) -> bool {
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
}

/// Attempts a task may be handed back unstarted (or requeued unsent) at
/// no cost, over its life; after them each hand-back counts as a node
/// loss against its `max_attempts`.
pub(crate) const MAX_FREE_REQUEUES: u32 = 16;

/// How many of `task`'s attempts ended at no cost: numbers it took that
/// neither a failure nor a node loss accounts for.
fn free_requeues(task: &super::task::LiveTask) -> u32 {
    task.attempt
        .saturating_sub(1)
        .saturating_sub(task.failures.saturating_add(task.node_losses))
}
