//! The scheduler's side of the scheduling policy (`policy.rs` holds the
//! state): what a submit, an attempt's end and a restore do for
//! concurrency keys and infeasible requests, and the named limits an admin
//! sets (`SetLimit`, `ListLimits`, `DeleteLimit`), written as store records
//! in the batch that changes them.

use std::time::SystemTime;

use bytes::Bytes;

use weft_proto::policy::{Limit, LimitKind, OverLimit};
use weft_proto::{TaskId, TaskSpec, TaskState};

use super::Scheduler;
use super::queue::ClassId;
use crate::error::Error;
use crate::store::Record;

/// A limit and how it stands now (`ListLimits`).
#[derive(Clone, Debug, PartialEq)]
pub struct LimitStatus {
    /// The limit.
    pub limit: Limit,
    /// A rate limit's whole units in the bucket now.
    pub available: u64,
    /// A concurrency key's tasks assigned or running now.
    pub running: u32,
    /// Ready tasks waiting on it now.
    pub waiting: u64,
}

impl Scheduler {
    /// A task of a class with a policy was submitted and queued: its
    /// concurrency key counts it (a CANCEL_NEWEST key at its limit
    /// cancels it; a CANCEL_OLDEST one cancels its oldest instead), and
    /// with `fail_if_infeasible` a request no connected node could ever
    /// satisfy fails at once. Plain tasks never come here. Called when the
    /// task is queued ready (`submit`); a task held back first (PENDING)
    /// is to come here when it is queued.
    pub(crate) fn policy_submitted(
        &mut self,
        id: TaskId,
        class: ClassId,
        spec: &TaskSpec,
        wall: SystemTime,
    ) {
        let cp = self.queue.classes[class as usize].policy;
        if !spec.fair_key.is_empty() {
            let weight = spec.fair_weight.max(1);
            self.queue.policy.fair[cp.fair as usize].weight = weight;
        }
        if let (Some((key, on_limit)), Some(conc)) = (cp.conc, &spec.concurrency) {
            let key = key as usize;
            let entry = &mut self.queue.policy.conc[key];
            if conc.max_running > 0 {
                entry.max = Some(conc.max_running);
            }
            // Counted now, so that a cancel below (or any end) uncounts it
            // as it does every task that left PENDING.
            let at_limit = entry.max.filter(|max| entry.live >= *max as usize);
            entry.live += 1;
            if let Some(ids) = &mut entry.ids {
                ids.insert(id);
            }
            match (on_limit, at_limit) {
                (OverLimit::CancelNewest, Some(max)) => {
                    let reason = format!(
                        "concurrency key {} at its limit {max}: cancelled as the newest (cancel_newest)",
                        entry.name
                    );
                    self.finalize(id, TaskState::Cancelled, reason, Bytes::new(), wall);
                    return;
                }
                // At or under its limit nothing is in excess: the others
                // are looked at only when one of them may have to go.
                (OverLimit::CancelOldest, Some(max)) => {
                    let name = entry.name.clone();
                    let others: Vec<TaskId> = self
                        .conc_ids(key)
                        .iter()
                        .copied()
                        .filter(|t| *t != id)
                        .collect();
                    let mut standing: Vec<TaskId> = others
                        .into_iter()
                        .filter(|t| {
                            self.tasks
                                .get(t)
                                .is_some_and(|t| t.cancel_reason().is_none())
                        })
                        .collect();
                    let excess = (standing.len() + 1).saturating_sub(max as usize);
                    // The oldest on a node first, then the oldest queued.
                    standing.sort_by_key(|t| {
                        let queued = self.tasks.get(t).is_none_or(|t| {
                            !matches!(t.state, TaskState::Assigned | TaskState::Running)
                        });
                        (queued, *t)
                    });
                    standing.truncate(excess);
                    for old in standing {
                        let reason = format!(
                            "concurrency key {name} at its limit {max}: cancelled as the oldest for a newer task (cancel_oldest)"
                        );
                        self.cancel_at(old, &reason, wall);
                    }
                }
                _ => {}
            }
        }
        if spec.fail_if_infeasible
            && !self.nodes.is_empty()
            && let Some(reason) = self.infeasible_reason(spec)
        {
            self.finalize(
                id,
                TaskState::Failed,
                format!("infeasible: {reason}"),
                Bytes::new(),
                wall,
            );
        }
    }

    /// Why no connected node could ever run `spec` for its resources, if
    /// none could (`None` with no nodes connected, or when one could).
    pub(crate) fn infeasible_reason(&self, spec: &TaskSpec) -> Option<String> {
        if self.nodes.is_empty() || self.nodes.values().any(|n| n.can_run(spec)) {
            return None;
        }
        let able: Vec<_> = self
            .nodes
            .values()
            .filter(|n| n.serves(spec) && spec.matches_labels(&n.labels))
            .collect();
        for (name, amount) in &spec.resources {
            let largest = able.iter().filter_map(|n| n.resources.get(name)).max();
            match largest {
                None => {
                    return Some(format!(
                        "needs {name}={amount}; no connected node has resource {name}"
                    ));
                }
                Some(largest) if largest < amount => {
                    return Some(format!(
                        "needs {name}={amount}; the largest connected node has {name}={largest}"
                    ));
                }
                Some(_) => {}
            }
        }
        match spec.resources.is_empty() {
            true => None,
            false => Some("no connected node has all of its resources at once".into()),
        }
    }

    /// The live (counted) tasks of concurrency key `key`, from the set
    /// it keeps once built; the first call builds it from the live tasks.
    fn conc_ids(&mut self, key: usize) -> &crate::IdSet<TaskId> {
        if self.queue.policy.conc[key].ids.is_none() {
            let classes = &self.queue.classes;
            let ids: crate::IdSet<TaskId> = self
                .tasks
                .iter()
                .filter(|(_, task)| {
                    task.state != TaskState::Pending
                        && classes[task.class as usize]
                            .policy
                            .conc
                            .is_some_and(|(k, _)| k as usize == key)
                })
                .map(|(id, _)| id)
                .collect();
            self.queue.policy.conc[key].ids = Some(ids);
        }
        self.queue.policy.conc[key].ids.get_or_insert_default()
    }

    /// A task leaves ASSIGNED or RUNNING (an attempt ended however it
    /// did): its concurrency key's slot frees.
    pub(crate) fn policy_attempt_ended(&mut self, class: ClassId) {
        if let Some((key, _)) = self.queue.classes[class as usize].policy.conc {
            let entry = &mut self.queue.policy.conc[key as usize];
            entry.running = entry.running.saturating_sub(1);
        }
    }

    /// A task became final: its concurrency key forgets it (`counted`: it
    /// had left PENDING, so the key counted it).
    pub(crate) fn policy_finalized(
        &mut self,
        id: TaskId,
        class: ClassId,
        counted: bool,
        was_out: bool,
    ) {
        if let Some((key, _)) = self.queue.classes[class as usize].policy.conc {
            let entry = &mut self.queue.policy.conc[key as usize];
            if counted {
                entry.live = entry.live.saturating_sub(1);
                if let Some(ids) = &mut entry.ids {
                    ids.remove(&id);
                }
            }
            if was_out {
                entry.running = entry.running.saturating_sub(1);
            }
        }
    }

    /// A live task restored from the store: its concurrency key counts it
    /// unless it is PENDING (`counted`), and, when it is on a node, its slot.
    pub(crate) fn policy_restored(
        &mut self,
        id: TaskId,
        class: ClassId,
        spec: &TaskSpec,
        counted: bool,
        on_node: bool,
    ) {
        let cp = self.queue.classes[class as usize].policy;
        if let (Some((key, _)), Some(conc)) = (cp.conc, &spec.concurrency) {
            let entry = &mut self.queue.policy.conc[key as usize];
            if conc.max_running > 0 {
                entry.max = Some(conc.max_running);
            }
            // A PENDING task is counted when it is queued (`policy_submitted`).
            if counted {
                entry.live += 1;
                if let Some(ids) = &mut entry.ids {
                    ids.insert(id);
                }
            }
            if on_node {
                entry.running += 1;
            }
        }
    }

    /// Sets (creates or replaces) a limit; durable in this batch.
    pub fn set_limit(&mut self, limit: Limit) {
        self.queue.policy.set_limit(&limit);
        tracing::info!(name = %limit.name, kind = limit.kind.as_str(), "limit set");
        self.out.records.push(Record::Limit(limit));
    }

    /// Deletes a limit (`kind`: "rate" or "concurrency"; empty: whichever
    /// there is, rate first). NOT_FOUND when there is none.
    pub fn delete_limit(&mut self, name: &str, kind: &str) -> Result<(), Error> {
        let rate = match kind.trim() {
            "rate" => true,
            "concurrency" => false,
            "" => self.queue.policy.rates.contains_key(name),
            other => {
                return Err(Error::InvalidArgument(
                    weft_proto::ConversionError::Invalid {
                        field: "kind",
                        reason: format!(
                            "{} is not rate or concurrency",
                            crate::error::quoted(other)
                        ),
                    },
                ));
            }
        };
        if !self.queue.policy.delete_limit(name, rate) {
            return Err(Error::LimitNotFound(name.to_owned()));
        }
        let kind = if rate { "rate" } else { "concurrency" };
        tracing::info!(name, kind, "limit deleted");
        self.out.records.push(Record::DeleteLimit {
            name: name.to_owned(),
            kind: kind.to_owned(),
        });
        Ok(())
    }

    /// Limits restored from the store (after the tasks: a concurrency
    /// key whose restored tasks named a max keeps that max).
    pub fn restore_limits(&mut self, limits: Vec<Limit>) {
        for limit in limits {
            let kept = match limit.kind {
                LimitKind::MaxRunning(_) => {
                    self.queue.policy.find_conc(&limit.name).and_then(|k| k.max)
                }
                LimitKind::Rate(_) => None,
            };
            self.queue.policy.set_limit(&limit);
            if let Some(max) = kept {
                let index = self.queue.policy.conc_key(&limit.name);
                self.queue.policy.conc[index as usize].max = Some(max);
            }
        }
    }

    /// Every limit with how it stands at `now`.
    pub fn limits(&self, now: std::time::Instant) -> Vec<LimitStatus> {
        let policy = &self.queue.policy;
        policy
            .limits()
            .into_iter()
            .map(|limit| {
                let (mut available, mut running) = (0, 0);
                match &limit.kind {
                    LimitKind::Rate(_) => {
                        if let Some(bucket) = policy.rates.get(&limit.name) {
                            let mut bucket = bucket.clone();
                            bucket.refill(now);
                            available = bucket.tokens.floor() as u64;
                        }
                    }
                    LimitKind::MaxRunning(_) => {
                        running = policy.find_conc(&limit.name).map_or(0, |k| k.running);
                    }
                }
                let waiting = self.waiting_on(&limit);
                LimitStatus {
                    limit,
                    available,
                    running,
                    waiting,
                }
            })
            .collect()
    }

    /// Ready tasks of classes that use `limit` (an estimate: queue entries).
    fn waiting_on(&self, limit: &Limit) -> u64 {
        let rate = matches!(limit.kind, LimitKind::Rate(_));
        self.queue
            .active()
            .map(|c| &self.queue.classes[c as usize])
            .filter(|c| match rate {
                true => c.example.rate_limits.iter().any(|u| u.name == limit.name),
                false => c
                    .example
                    .concurrency
                    .as_ref()
                    .is_some_and(|k| k.key == limit.name),
            })
            .map(|c| {
                c.ready
                    .iter()
                    .filter(|id| {
                        self.tasks
                            .get(id)
                            .is_some_and(|t| t.state == TaskState::Queued)
                    })
                    .count() as u64
            })
            .sum()
    }
}
