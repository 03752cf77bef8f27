//! Dispatch: matching ready tasks to nodes with credits, and saying why a
//! queued task is not matched yet (`pending_reason`).
//!
//! A node is matched on what a class shares: handler (call tasks) or
//! program (exec tasks, against the node's exec policy), labels, slots.
//!
//! Each assignment looks at one queue head per requirement class, never at
//! the whole queue; work spreads round-robin over nodes, free slots before
//! prefetch credits.

use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;

use weft_proto::{Attempt, ExecPolicy, TaskId, TaskKind, TaskState};

use super::live::LiveTasks;
use super::queue::{Class, LevelEntry, Queue, vtime_order};
use super::registry::{NodeEntry, SessionId};
use super::task::{LiveSpec, Placement};
use super::{Assignment, Now, Scheduler};

impl Scheduler {
    /// Round-robin over nodes with credits, one assignment per node per
    /// pass, so work spreads; each assignment looks at one head per class,
    /// never at the whole queue. Free slots first, then prefetch credits: a
    /// task waits queued on a busy node only when no node has a slot free.
    pub(super) fn dispatch(&mut self, now: Now) {
        self.queue.policy.rate_wakeup = None;
        self.queue.policy.last_dispatch = Some(now.instant);
        for prefetch in [false, true] {
            if !self.queue.any_ready() {
                return;
            }
            let mut active: Vec<SessionId> = self
                .nodes
                .iter()
                .filter(|(_, n)| !n.draining && n.room(prefetch) > 0)
                .map(|(s, _)| s)
                .collect();
            while !active.is_empty() {
                active.retain(|session| self.assign_one(*session, prefetch, now));
            }
        }
    }

    /// Assigns the oldest ready task this node can take (within its free
    /// slots, or its credits when `prefetch`). Returns whether the node may
    /// take more.
    fn assign_one(&mut self, session: SessionId, prefetch: bool, now: Now) -> bool {
        let Some(node) = self.nodes.get_mut(session) else {
            return false;
        };
        let room = node.room(prefetch);
        if node.draining || room == 0 {
            return false;
        }
        // Among heads of one priority: the fair key with the smallest
        // virtual time, then the oldest; across priorities: the highest
        // effective (aged) priority, then the oldest (see `policy.rs`).
        let now_ns = super::task::nanos(now.wall);
        let look = Look { room, now, now_ns };
        // Each priority's first class this node may take (in the policy's
        // order within the priority), then the best of those. Highest
        // priority first: a priority whose heads aging cannot lift to the
        // best found so far is not looked at (see `Queue::level_ready`).
        let mut best: Option<(Rank, usize)> = None;
        for level in (0..self.queue.levels.len()).rev() {
            if let Some((b, _)) = &best {
                let oldest = self.queue.level_oldest(level);
                let ceiling = self.queue.policy.effective(level as u8, oldest, now_ns);
                if ceiling < b.effective {
                    continue;
                }
            }
            let Some((rank, index)) = level_pick(&mut self.queue, &self.tasks, level, node, look)
            else {
                continue;
            };
            if best.as_ref().is_none_or(|(b, _)| rank.before(b)) {
                best = Some((rank, index));
            }
        }
        let Some((Rank { head: id, .. }, index)) = best else {
            return false;
        };
        self.queue.pop_ready(index);
        let class = &mut self.queue.classes[index];
        class.head = None;
        class.last_served = now_ns;
        let cp = class.policy;
        let slots = class.example.slots;
        let next = class.ready.front().copied();
        self.queue.policy.served(cp.fair, slots);
        match next {
            Some(next) => self.queue.index(index as u32, Some(next)),
            None => self.queue.deactivate_if_empty(index as u32),
        }
        if let Some((key, _)) = cp.conc {
            self.queue.policy.conc[key as usize].running += 1;
        }
        if cp.gated {
            let example = Arc::clone(&self.queue.classes[index].example);
            self.queue.policy.take_rates(&example);
        }
        let (Some(node), Some(task)) = (self.nodes.get_mut(session), self.tasks.get_mut(&id))
        else {
            return false;
        };
        if task.attempt == 0 {
            task.attempt = 1;
        }
        let attempt = Attempt(task.attempt);
        // From here on its records and the assignment share one whole spec:
        // the one its Submit's record holds when that is in this batch.
        let spec = match self.out.spec_written(id) {
            Some(spec) => spec,
            None => task.spec.to_spec(self.queue.example(task.class)),
        };
        task.spec = LiveSpec::Full(Arc::clone(&spec));
        node.credits -= spec.slots;
        node.used += spec.slots;
        node.hold_resources(&spec.resources);
        node.running.insert(id, attempt);
        task.last_outcome = None;
        task.place(Placement {
            session,
            node_id: node.id(),
            node_name: Arc::clone(&node.name),
        });
        let more = node.room(prefetch) > 0;
        let secret_env = match self.secrets.is_empty() {
            true => None,
            false => self.secrets.get(&id).cloned(),
        };
        tracing::debug!(task_id = %id, attempt = attempt.0, node_id = %node.id(), node_name = %node.name, "assigned");
        self.out
            .nodes
            .entry(session)
            .or_default()
            .assign
            .push(Assignment {
                task_id: id,
                attempt,
                spec,
                secret_env,
                parents: Vec::new(),
            });
        self.change_state(id, TaskState::Assigned, None, String::new(), now.wall);
        self.expect_start(id, attempt, session, now.instant);
        more
    }

    /// Why a queued task waits; `None` when it is not queued here.
    pub fn pending_reason(&self, id: TaskId) -> Option<String> {
        let task = self.tasks.get(&id)?;
        if task.state != TaskState::Queued {
            return None;
        }
        if task.delayed {
            return Some(format!(
                "waiting out the retry backoff before attempt {}",
                task.attempt
            ));
        }
        let spec = task.spec.template(self.queue.example(task.class));
        let nodes: Vec<&NodeEntry> = self.nodes.values().collect();
        if nodes.is_empty() {
            return Some("no nodes connected".into());
        }
        if let TaskKind::Call(call) = &spec.kind
            && !nodes.iter().any(|n| n.serves(spec))
        {
            return Some(format!(
                "no connected node serves handler '{}'",
                call.handler
            ));
        }
        if let TaskKind::Exec(exec) = &spec.kind {
            // Its secrets' names count too: an allow-list refuses loader
            // variables from either map (the class's example carries them).
            let secrets = self.secrets.get(&id);
            let names = || secrets.into_iter().flat_map(|s| s.names());
            if !nodes
                .iter()
                .any(|n| n.exec.refusal(exec, names()).is_none())
            {
                let program = exec.argv.first();
                let listing = program.and_then(|p| nodes.iter().find(|n| n.exec.allows_program(p)));
                return Some(match (program, listing) {
                    (Some(_), Some(node)) => format!(
                        "no connected node runs it: {}",
                        node.exec.refusal(exec, names()).unwrap_or_default()
                    ),
                    (Some(program), None) if nodes.iter().any(|n| n.exec != ExecPolicy::Deny) => {
                        format!("no connected node allows program '{program}'")
                    }
                    _ => "no connected node accepts exec tasks".into(),
                });
            }
        }
        for (key, value) in &spec.labels {
            if !nodes.iter().any(|n| n.labels.get(key) == Some(value)) {
                return Some(format!("no connected node has label {key}={value}"));
            }
        }
        let matching: Vec<&&NodeEntry> = nodes
            .iter()
            .filter(|n| n.serves(spec) && spec.matches_labels(&n.labels))
            .collect();
        if matching.is_empty() {
            let labels: Vec<String> = spec
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            return Some(format!(
                "no connected node has all of the labels {}",
                labels.join(", ")
            ));
        }
        let largest = matching.iter().map(|n| n.slots).max().unwrap_or(0);
        if largest < spec.slots {
            return Some(format!(
                "needs {} slots; largest node has {largest}",
                spec.slots
            ));
        }
        if let Some(reason) = self.infeasible_reason(spec) {
            return Some(reason);
        }
        if matching
            .iter()
            .filter(|n| n.can_run(spec))
            .all(|n| n.draining)
        {
            return Some("every node that could run it is draining".into());
        }
        let policy = self.queue.classes[task.class as usize].policy;
        if let Some(reason) = self.queue.policy.limit_reason(spec, policy) {
            return Some(reason);
        }
        if !spec.resources.is_empty()
            && !matching
                .iter()
                .any(|n| n.can_run(spec) && n.resources_fit(spec))
        {
            let wanted: Vec<String> = spec
                .resources
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            return Some(format!(
                "waiting for free resources ({})",
                wanted.join(", ")
            ));
        }
        Some("waiting for a free slot".into())
    }
}

/// What one assignment's look at the classes shares.
#[derive(Clone, Copy)]
struct Look {
    /// The node's room (free slots, or credits when prefetching).
    room: u32,
    now: Now,
    now_ns: u64,
}

/// The first class of priority `level`, in the policy's order within it
/// (its fair key's virtual time, then its head's id), that may go to
/// `node` now, with its head's rank; `None` when none may.
///
/// Entries found out of date are corrected on the way: a class whose
/// queue held only stale entries (cancelled while queued) leaves the
/// order, one whose key was served since moves back to where it now
/// belongs (and is looked at again when the walk gets there), one whose
/// head is now older than its entry said is looked at at once (everything
/// before it was looked at and could not go).
fn level_pick(
    queue: &mut Queue,
    tasks: &LiveTasks,
    level: usize,
    node: &mut NodeEntry,
    look: Look,
) -> Option<(Rank, usize)> {
    let mut after: Option<LevelEntry> = None;
    loop {
        let set = &queue.levels[level];
        let entry = match after {
            None => set.first().copied(),
            Some(after) => set.range((Excluded(after), Unbounded)).next().copied(),
        }?;
        after = Some(entry);
        #[cfg(test)]
        {
            queue.looked += 1;
        }
        let class_id = entry.2;
        let index = class_id as usize;
        let (head, dropped) = ready_head(&mut queue.classes[index], tasks);
        if dropped > 0 {
            queue.left(level, dropped);
        }
        let Some((head, created)) = head else {
            queue.deactivate_if_empty(class_id);
            continue;
        };
        let class = &queue.classes[index];
        let cp = class.policy;
        let vtime = queue.policy.fair[cp.fair as usize].vtime;
        let actual = (vtime_order(vtime), head, class_id);
        if actual != entry {
            queue.index(class_id, Some(head));
            if actual > entry {
                continue;
            }
        }
        let class = &queue.classes[index];
        if class.example.slots > look.room || !node.runs_class(class_id, &class.example) {
            continue;
        }
        let policy = &mut queue.policy;
        if let Some((key, _)) = cp.conc
            && !policy.conc[key as usize].has_room()
        {
            continue;
        }
        if cp.gated
            && (!node.resources_fit(&class.example)
                || !policy.rates_allow(&class.example, look.now.instant))
        {
            continue;
        }
        let created = created.max(class.last_served);
        let rank = Rank {
            effective: policy.effective(cp.priority, created, look.now_ns),
            head,
        };
        return Some((rank, index));
    }
}

/// The head of `class`'s ready queue and its submission time (Unix nanos),
/// dropping stale entries (cancelled while queued) in front of it; `None`
/// when none is left. The head known good (see `Class::head`) needs no
/// lookup. Also answers how many stale entries it dropped.
fn ready_head(class: &mut Class, tasks: &LiveTasks) -> (Option<(TaskId, u64)>, usize) {
    if let (Some((known, created)), Some(front)) = (class.head, class.ready.front())
        && known == *front
    {
        return (Some((known, created)), 0);
    }
    class.head = None;
    let mut dropped = 0;
    while let Some(head) = class.ready.front() {
        let ready = tasks
            .get(head)
            .filter(|t| t.state == TaskState::Queued && !t.delayed);
        if let Some(task) = ready {
            class.head = Some((*head, task.created_nanos()));
            return (class.head, dropped);
        }
        class.ready.pop_front();
        dropped += 1;
    }
    (None, dropped)
}

/// How the head a priority offers ranks against the other priorities'
/// for one assignment (within a priority, the fair order of
/// `Queue::levels` already chose it).
struct Rank {
    /// Its priority, with aging (see `Policy::effective`).
    effective: u64,
    head: TaskId,
}

impl Rank {
    /// Goes before `other`: the higher effective (aged) priority, then the
    /// older head. Aging never reorders one priority's keys, so it cannot
    /// undo fairness.
    fn before(&self, other: &Rank) -> bool {
        match self.effective.cmp(&other.effective) {
            std::cmp::Ordering::Equal => self.head < other.head,
            order => order == std::cmp::Ordering::Greater,
        }
    }
}
