//! Nodes joining and leaving, as the scheduler sees them: registration
//! (taking back its attempts after a reconnect or a coordinator restart),
//! credits, heartbeats, draining, and losing a node (its attempts go to
//! `attempts.rs`). No I/O: the driver turns what is decided here into
//! messages.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use weft_proto::{Attempt, NodeId, NodeInfo, TaskId, TaskState};

use super::registry::{NodeEntry, NodeRegistration, SessionId};
use super::{Now, Scheduler};
use crate::error::Error;

impl Scheduler {
    /// Whether a node may register as it declared itself, before anything
    /// is sent to it: more than `max_node_slots` slots is refused; its
    /// prefetch is capped at `max_node_slots`. So a node is never assigned
    /// more than `slots + min(prefetch, max_node_slots)` at once, at most
    /// twice the limit, however much it declares or grants (the node is
    /// not told: the credits it granted past the cap are kept and used as
    /// its work ends, see `NodeEntry::grant`). Answers the
    /// registration to pass to [`register_node`](Self::register_node).
    ///
    /// A revoked node id is refused (`NodeRevoked`, counted in
    /// `revoked_node_refusals`). A name held by another connected node
    /// (a different node id) is refused (`NodeNameTaken`): two nodes never
    /// share a name, so `weft drain NAME` means one node. The same node id
    /// reconnecting keeps its name (its old session is replaced).
    pub fn admit_node(&mut self, mut reg: NodeRegistration) -> Result<NodeRegistration, Error> {
        if self.revoked.contains(&reg.node_id) {
            self.revoked_node_refusals += 1;
            return Err(Error::NodeRevoked(reg.node_id));
        }
        if let Some(holder) = self
            .nodes
            .values()
            .find(|n| *n.name == *reg.name && n.id() != reg.node_id)
        {
            return Err(Error::NodeNameTaken {
                name: reg.name,
                holder: holder.id(),
            });
        }
        let max = self.config.max_node_slots;
        if reg.slots > max {
            return Err(Error::TooManySlots {
                slots: reg.slots,
                max,
            });
        }
        if reg.prefetch > max {
            tracing::info!(node_name = %reg.name, prefetch = reg.prefetch, max, "capping the node's prefetch at --max-node-slots");
            reg.prefetch = max;
        }
        Ok(reg)
    }

    /// A node registered on `session`. Attempts it reports running carry on
    /// when they are still current and were on this node id (also those
    /// restored from the store after a coordinator restart); it is told to
    /// cancel the others, except attempts whose result is already recorded
    /// (it is about to redeliver those). Attempts restored on this node id
    /// that it does not report are requeued at once: it does not run them.
    /// If the node id was already connected on another session, that
    /// session is replaced: of its attempts the node does not report, those
    /// it had started are lost with it (charged as a node loss), those it
    /// never started are requeued at no cost (their `Assign` never reached
    /// the node), as when the old stream ends before the node comes back.
    /// A node draining on the old session still drains on the new one, and
    /// is sent `Drain` again (with its own default grace).
    pub fn register_node(&mut self, session: SessionId, reg: NodeRegistration, now: Now) {
        let reported: HashSet<(TaskId, Attempt)> = reg.running.iter().copied().collect();
        let mut drained = false;
        if let Some(old) = self.nodes.session_of(reg.node_id)
            && old != session
            && let Some(entry) = self.nodes.remove(old)
        {
            tracing::info!(node_id = %entry.id(), node_name = %entry.name, "node reconnected; replacing its old session");
            self.out.disconnect.push(old);
            drained = entry.draining;
            let mut unreported: Vec<(TaskId, Attempt)> = entry
                .running
                .iter()
                .map(|(t, a)| (*t, *a))
                .filter(|r| !reported.contains(r))
                .collect();
            unreported.sort();
            let mut ran = false;
            for (id, attempt) in unreported {
                let started = self
                    .tasks
                    .get(&id)
                    .is_some_and(|t| t.state == TaskState::Running && t.attempt == attempt.0);
                if started {
                    ran = true;
                    self.lose_attempt(id, attempt, &entry.name, entry.id(), now);
                } else {
                    self.requeue_undelivered(id, attempt, &entry.name, entry.id(), now);
                }
            }
            if ran {
                self.nodes_lost += 1;
            }
        }
        let node_id = reg.node_id;
        self.disconnected.remove(&node_id);
        // Each attempt once, however often a node lists it: it holds one
        // slot and one share of resources.
        let mut running = reg.running.clone();
        running.sort_unstable();
        running.dedup();
        let mut entry = NodeEntry::new(reg, now.instant);
        let name = std::sync::Arc::clone(&entry.name);
        let mut refused = Vec::new();
        let mut unstarted = Vec::new();
        let mut cancelled = Vec::new();
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
                        } else if p.session == SessionId::DISCONNECTED {
                            self.reclaimed_attempts += 1;
                            tracing::info!(task_id = %id, attempt = attempt.0, node_id = %node_id, node_name = %name, "attempt claimed by its node back within the reconnect grace");
                        }
                        p.session = session;
                        p.node_name = std::sync::Arc::clone(&name);
                    }
                    let example = self.queue.example(task.class);
                    entry.used = entry.used.saturating_add(example.slots);
                    entry.hold_resources(&example.resources);
                    entry.running.insert(id, attempt);
                    if task.state == TaskState::Assigned {
                        unstarted.push((id, attempt));
                    }
                    // Cancelled while its node was away: the order went
                    // nowhere, so it goes now.
                    if let Some(reason) = task.cancel_reason() {
                        cancelled.push((id, attempt, reason.to_owned()));
                    }
                }
                _ if self.recent.contains(id, attempt, now.instant) => {}
                _ => refused.push((id, attempt)),
            }
        }
        if drained {
            // An operator's drain is about the node, not one stream of it.
            entry.draining = true;
            self.out.nodes.entry(session).or_default().drain = Some(None);
            tracing::info!(node_id = %node_id, node_name = %entry.name, "node reconnected while draining; it drains on");
        }
        tracing::info!(node_id = %node_id, node_name = %entry.name, slots = entry.slots, adopted = entry.running.len(), "node registered");
        self.nodes.insert(session, entry);
        // Claimed but not started (held queued): they must start in time
        // from now, as if just sent.
        for (id, attempt) in unstarted {
            self.expect_start(id, attempt, session, now.instant);
        }
        for (id, attempt) in refused {
            self.order_cancel(session, id, attempt, "attempt is no longer current".into());
        }
        for (id, attempt, reason) in cancelled {
            self.order_cancel(session, id, attempt, reason);
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
                Some(p) if p.session.is_placeholder() => {
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
            "the assignment to node {node_name} never arrived (lost with a coordinator restart or a broken stream); retrying as attempt {}",
            attempt.0 + 1
        );
        let node = Some((node_id, std::sync::Arc::clone(node_name)));
        self.requeue(id, None, node, reason, now);
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

    /// The node's stream ended. A broken stream is not a lost node: a
    /// node that holds attempts (and is not draining) keeps them for the
    /// reconnect grace, as after a coordinator restart. Back within it, it
    /// lists them in `Register` and they carry on (`register_node` adopts
    /// them; those it does not list are requeued then). Not back, they are
    /// requeued as node losses when the grace ends (`tick`), and the node
    /// counts as lost. The node keeps running them for its lease (the
    /// heartbeat timeout by default) after it last heard from the
    /// coordinator, which the grace does not outlast by default. An
    /// attempt a client cancelled meanwhile ends `cancelled` at once. A
    /// node holding nothing leaves quietly: nothing to requeue, nothing
    /// lost (`nodes_lost` does not count it). A draining node holding
    /// attempts is lost at once.
    pub fn node_gone(&mut self, session: SessionId, now: Now) {
        // Nothing more comes from a session whose stream ended.
        self.revoked_sessions.remove(&session);
        let Some(node) = self.nodes.get(session) else {
            return;
        };
        if node.running.is_empty() {
            self.node_left(session);
            return;
        }
        if node.draining {
            self.lose_node(session, "stream ended", now);
            return;
        }
        let Some(entry) = self.nodes.remove(session) else {
            return;
        };
        self.out.disconnect.push(session);
        let grace = self.config.reconnect_grace;
        let deadline = now.instant + grace;
        tracing::warn!(node_id = %entry.id(), node_name = %entry.name, attempts = entry.running.len(), ?grace, "node's stream ended; its attempts wait for it to reconnect");
        let mut held: Vec<(TaskId, Attempt)> =
            entry.running.iter().map(|(t, a)| (*t, *a)).collect();
        held.sort();
        for (id, attempt) in held {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            if task.attempt != attempt.0
                || !matches!(task.state, TaskState::Assigned | TaskState::Running)
            {
                continue;
            }
            if task.cancel_reason().is_some() {
                self.lose_attempt(id, attempt, &entry.name, entry.id(), now);
                continue;
            }
            if let Some(p) = task.placement_mut()
                && p.session == session
            {
                p.session = SessionId::DISCONNECTED;
                self.orphans.push((id, deadline));
            }
        }
        self.disconnected
            .insert(entry.id(), (std::sync::Arc::clone(&entry.name), deadline));
        if self.nodes.is_empty() {
            self.next_liveness_check = None;
        }
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

    /// The node with this id or name, if connected: its id and name.
    pub fn find_node(&self, selector: &str) -> Option<(NodeId, String)> {
        let session = self.nodes.find(selector)?;
        let node = self.nodes.get(session)?;
        Some((node.id(), node.name.to_string()))
    }

    /// An admin revoked node `node_id`: from now on it may not register
    /// (`admit_node`), and if it is connected its session is closed at once
    /// and its attempts go back to the queue as the next attempt (the
    /// node-lost path); events its session still sends are refused and
    /// counted in `revoked_node_refusals`. Answers whether it was
    /// connected and how many of its attempts were requeued.
    pub fn revoke_node(&mut self, node_id: NodeId, now: Now) -> (bool, u32) {
        self.revoked.insert(node_id);
        // A node away (its stream ended within the reconnect grace, or
        // restored after a restart) may still be running its attempts
        // until its lease runs out: they go back to the queue when its
        // grace ends, as for any node that does not come back (a revoked
        // one cannot), never while it may still run them.
        let Some(session) = self.nodes.session_of(node_id) else {
            return (false, 0);
        };
        let running: Vec<TaskId> = self
            .nodes
            .get(session)
            .map(|n| n.running.keys().copied().collect())
            .unwrap_or_default();
        self.revoked_sessions.insert(session);
        self.lose_node(session, "revoked by an admin", now);
        let requeued = running
            .iter()
            .filter(|id| {
                self.tasks
                    .get(id)
                    .is_some_and(|t| t.state == TaskState::Queued)
            })
            .count();
        (true, u32::try_from(requeued).unwrap_or(u32::MAX))
    }

    /// Whether `session` is a revoked node's (closed by `revoke_node`,
    /// its stream not yet ended).
    pub fn is_revoked_session(&self, session: SessionId) -> bool {
        self.revoked_sessions.contains(&session)
    }

    /// Node ids revoked before this start (from the store): they may not
    /// register.
    pub fn restore_revoked(&mut self, ids: impl IntoIterator<Item = NodeId>) {
        self.revoked.extend(ids);
    }

    /// The node on `session` left holding nothing (its stream ended): it
    /// is forgotten, not lost.
    fn node_left(&mut self, session: SessionId) {
        let Some(entry) = self.nodes.remove(session) else {
            return;
        };
        self.out.disconnect.push(session);
        if entry.draining {
            tracing::info!(node_id = %entry.id(), node_name = %entry.name, "drained node left");
        } else {
            tracing::info!(node_id = %entry.id(), node_name = %entry.name, "node's stream ended; it held nothing");
        }
        if self.nodes.is_empty() {
            self.next_liveness_check = None;
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
}
