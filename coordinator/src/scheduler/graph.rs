//! Dependencies and start times: tasks that are PENDING until the tasks
//! they run after (`TaskSpec::after`) meet their rule and their
//! `not_before` has come; what a child is given of its parents' results.
//!
//! Everything here sits in side tables keyed by task id, so a plain task
//! (no `after`, no `not_before`) pays nothing: [`LiveTask`](super::task)
//! does not grow, and the hooks in `submit`/`finalize`/`take_effects` test
//! one `is_empty` before doing anything.
//!
//! - `deps`: per live task that runs after others, its parents (in spec
//!   order) and counters of how they ended; kept until the task is final
//!   (its parents' results are given to every attempt).
//! - `children`: per live parent, the tasks waiting on it. Releasing the
//!   children of a task that just ended is O(children); nothing scans the
//!   pending tasks.
//! - `results`: a final parent's state, output and ref, kept while one of
//!   its children is live.
//! - `timers`: PENDING tasks by `not_before` (wall time), earliest first.
//!
//! A parent ending may end its children (UPSTREAM_FAILED, SKIPPED), which
//! may end theirs: the cascade runs from a work list, never by recursion,
//! so a 10,000-deep chain is as safe as a wide one.
//!
//! A child's assignment carries its parents' outputs, and an assignment
//! is sent in one message (`--max-message-size`): Submit holds each spec
//! within it, but only a release can add up a child's spec and its
//! parents' results. A child whose total does not fit ends FAILED when it
//! would be released (`release`; also a queued child restored under a
//! smaller limit), rather than be sent a message its node refuses (which
//! would end the session and requeue it, forever).
//!
//! Job ids: every task of one Submit shares the id's high 96 bits (the
//! ULID's time and most of its randomness); the low 32 number the task
//! within its Submit, the first being 0. So a task's job is its id with
//! the low bits cleared ([`job_of`]): nothing to look up or store per task,
//! and a job's tasks are one contiguous range of ids.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use weft_proto::limits::max_spec_bytes;
use weft_proto::wire::message_len;
use weft_proto::{ConversionError, Dependency, DependencyRule, TaskId, TaskSpec, TaskState};

use super::queue::ClassId;
use super::{Now, Scheduler};
use crate::error::Error;
use crate::store::EventBody;

/// Low bits of a task id that number it within its Submit.
const INDEX_BITS: u32 = 32;
const INDEX_MASK: u128 = (1 << INDEX_BITS) - 1;

/// The job of task `id`: the first task of its Submit.
pub fn job_of(id: TaskId) -> TaskId {
    TaskId::from_u128(id.as_u128() & !INDEX_MASK)
}

/// The last id a job could hold (for range scans).
pub fn job_end(job: TaskId) -> TaskId {
    TaskId::from_u128(job.as_u128() | INDEX_MASK)
}

/// Ids for a Submit of `n` tasks: one job, contiguous. `fresh` is a new
/// ULID (time and randomness); `last` the previous Submit's job id, which
/// the new one always follows (ids keep their order even within one ms).
pub fn submit_ids(fresh: u128, last: &mut u128, n: usize) -> Vec<TaskId> {
    let base = (fresh & !INDEX_MASK).max(last.saturating_add(1 << INDEX_BITS) & !INDEX_MASK);
    *last = base;
    (0..n as u128)
        .map(|i| TaskId::from_u128(base + i))
        .collect()
}

/// What a child is given of one parent (`Assignment::parents`).
#[derive(Clone, Debug, PartialEq)]
pub struct ParentResult {
    /// The parent.
    pub task_id: TaskId,
    /// Its ref in its Submit ("" when it had none).
    pub ref_name: String,
    /// Its state: final, unless the child's rule let it run before this
    /// parent ended (ANY_FAILED, ANY_SUCCEEDED).
    pub state: TaskState,
    /// Its output (empty unless final).
    pub output: Bytes,
}

impl ParentResult {
    /// What a child restored after a restart is given of `record`, its
    /// parent's stored record: `None` while the parent is not final.
    pub fn of_final(record: &crate::store::TaskRecord) -> Option<ParentResult> {
        record.state.is_final().then(|| ParentResult {
            task_id: record.id,
            ref_name: record.spec.ref_name.clone(),
            state: record.state,
            output: record.output.clone(),
        })
    }
}

/// Bytes one parent's result takes in an assignment (`Assignment.parents`,
/// tag and length included), its output `output` bytes long.
fn result_wire_len(ref_name: &str, output: usize) -> usize {
    let id = message_len(1, weft_proto::ids::ID_LEN);
    let ref_name = match ref_name.len() {
        0 => 0,
        n => message_len(2, n),
    };
    // The state: a tag and a one-byte value (every state is below 128).
    let state = 2;
    let output = match output {
        0 => 0,
        n => message_len(4, n),
    };
    message_len(5, id + ref_name + state + output)
}

/// What the Submit path read from the store about the existing tasks a
/// Submit names in `after` (those the scheduler may not hold): per id,
/// `Some` with its result when final, `None` when not final at the read.
/// An id missing here was not found.
pub type KnownParents = HashMap<TaskId, Option<ParentResult>>;

/// A live task that runs after others.
#[derive(Debug)]
struct Deps {
    parents: Box<[TaskId]>,
    rule: DependencyRule,
    succeeded: u32,
    failed: u32,
    /// The first parent that ended other than SUCCEEDED.
    first_failed: Option<TaskId>,
    /// Its rule was met (it is queued, or waits only for its start time).
    met: bool,
    /// Released before all its parents ended (ANY_FAILED, ANY_SUCCEEDED):
    /// per parent, in order, the state it had at the release when it was
    /// live then (`None`: it had ended). Such a parent's output, once it
    /// ends, was not checked at the release: it is given only while it
    /// fits, else the parent is given as it was then (see
    /// [`Scheduler::attach_parents`]). After a restart the release is not
    /// known: a parent final at the restore is `Some(QUEUED)` (its output
    /// given only while it fits), a live one has its state then.
    at_release: Option<Box<[Option<TaskState>]>>,
}

impl Deps {
    fn remaining(&self) -> u32 {
        (self.parents.len() as u32).saturating_sub(self.succeeded + self.failed)
    }

    /// `Some(true)`: the rule is met; `Some(false)`: it never can be;
    /// `None`: undecided yet.
    fn decide(&self) -> Option<bool> {
        let done = self.remaining() == 0;
        match self.rule {
            DependencyRule::AllSucceeded if self.failed > 0 => Some(false),
            DependencyRule::AllSucceeded | DependencyRule::AllFinished => done.then_some(true),
            DependencyRule::AnyFailed if self.failed > 0 => Some(true),
            DependencyRule::AnySucceeded if self.succeeded > 0 => Some(true),
            DependencyRule::AnyFailed | DependencyRule::AnySucceeded => done.then_some(false),
        }
    }
}

/// A final parent's result and how many live children still need it.
#[derive(Debug)]
struct Kept {
    result: Arc<ParentResult>,
    children: u32,
}

/// The side tables. See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Graph {
    deps: HashMap<TaskId, Deps>,
    children: HashMap<TaskId, Vec<TaskId>>,
    results: HashMap<TaskId, Kept>,
    timers: BinaryHeap<Reverse<(SystemTime, TaskId)>>,
    /// PENDING tasks that ended (cancelled, upstream failed) since
    /// `timers` was last rid of theirs ([`Scheduler::pending_ended`]).
    ended_pending: usize,
    /// Parents that ended and whose children are still to be told.
    work: Vec<(TaskId, TaskState, Vec<TaskId>)>,
    cascading: bool,
    /// The latest time seen, to turn wall-clock start times into a wakeup.
    clock: Option<(Instant, SystemTime)>,
    /// Live tasks with `after` restored from the store, to link once all
    /// are back (their parents may come later in id order).
    restored: Vec<TaskId>,
    /// Calls released to the queue that no connected node serves, with
    /// their schedule timeout: their deadline is set at the batch's end
    /// (`take_effects` has the instant), as for a call queued at submit.
    pub(crate) unserved: Vec<(TaskId, Duration)>,
    /// While a Submit with PENDING tasks is applied: the results of tasks
    /// that ended during it (a queued task's policy hook may end it, or
    /// an older task, at once), for its PENDING tasks, linked after, to
    /// find their parents' real state and ref.
    ended_in_submit: Option<HashMap<TaskId, Arc<ParentResult>>>,
}

impl Graph {
    /// True when no task uses dependencies or start times (a live parent
    /// whose children all ended still has its list of them until it ends).
    pub fn is_empty(&self) -> bool {
        self.deps.is_empty()
            && self.timers.is_empty()
            && self.results.is_empty()
            && self.children.is_empty()
            // A Submit with PENDING tasks is being applied: a task that
            // ends now may be one of their parents.
            && self.ended_in_submit.is_none()
    }

    /// `ids` ordered so that a task comes after every one of `ids` that
    /// waits for it (children before their parents, however they were
    /// written in their Submit), else in the order given.
    pub fn children_first(&self, ids: &[TaskId]) -> Vec<TaskId> {
        let wanted: HashSet<TaskId> = ids.iter().copied().collect();
        let mut placed: HashSet<TaskId> = HashSet::with_capacity(ids.len());
        let mut order = Vec::with_capacity(ids.len());
        for &root in ids {
            if placed.contains(&root) {
                continue;
            }
            // Depth first, each task placed after its children in `ids`.
            let mut stack: Vec<(TaskId, usize)> = vec![(root, 0)];
            placed.insert(root);
            while let Some(&(id, next)) = stack.last() {
                let children = self.children.get(&id).map_or(&[][..], Vec::as_slice);
                match children.get(next) {
                    Some(&child) => {
                        if let Some(top) = stack.last_mut() {
                            top.1 += 1;
                        }
                        if wanted.contains(&child) && placed.insert(child) {
                            stack.push((child, 0));
                        }
                    }
                    None => {
                        order.push(id);
                        stack.pop();
                    }
                }
            }
        }
        order
    }

    /// Parents kept with their lists of children (tests).
    #[cfg(test)]
    pub fn parents_with_children(&self) -> usize {
        self.children.len()
    }
}

fn invalid(index: usize, spec: &TaskSpec, reason: String) -> Error {
    let reason = match spec.ref_name.as_str() {
        "" => reason,
        name => format!("{reason} (task ref '{name}')"),
    };
    Error::InvalidSpec {
        index,
        source: ConversionError::Invalid {
            field: "after",
            reason,
        },
    }
}

/// Resolves refs to the ids of the same Submit and refuses a repeated
/// ref, an unknown ref, a task after itself, a repeated entry and a cycle.
/// O(tasks + dependencies).
pub(crate) fn resolve(batch: &mut [(TaskId, TaskSpec)]) -> Result<(), Error> {
    if batch
        .iter()
        .all(|(_, s)| s.after.is_empty() && s.ref_name.is_empty())
    {
        return Ok(());
    }
    let mut refs: HashMap<String, usize> = HashMap::new();
    for (index, (_, spec)) in batch.iter().enumerate() {
        if !spec.ref_name.is_empty() && refs.insert(spec.ref_name.clone(), index).is_some() {
            return Err(Error::InvalidSpec {
                index,
                source: ConversionError::Invalid {
                    field: "ref",
                    reason: format!("'{}' is used by another task of this Submit", spec.ref_name),
                },
            });
        }
    }
    let order: Vec<TaskId> = batch.iter().map(|(id, _)| *id).collect();
    let ids: HashMap<TaskId, usize> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    // In-batch edges parent -> child, for the cycle check.
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); batch.len()];
    let mut indegree = vec![0u32; batch.len()];
    for index in 0..batch.len() {
        let (id, spec) = &mut batch[index];
        let id = *id;
        let mut seen: HashSet<TaskId> = HashSet::with_capacity(spec.after.len());
        for dep in spec.after.iter_mut() {
            let parent = match dep {
                Dependency::Task(parent) => *parent,
                Dependency::Ref(name) => match refs.get(name.as_str()) {
                    Some(i) => order[*i],
                    None => {
                        let reason = format!("unknown ref '{name}': no task of this Submit has it");
                        return Err(invalid(index, spec, reason));
                    }
                },
            };
            if parent == id {
                return Err(invalid(
                    index,
                    spec,
                    "a task cannot run after itself".into(),
                ));
            }
            if !seen.insert(parent) {
                let reason = format!("{} is named twice", describe(dep));
                return Err(invalid(index, spec, reason));
            }
            *dep = Dependency::Task(parent);
            if let Some(p) = ids.get(&parent) {
                edges[*p].push(index);
                indegree[index] += 1;
            }
        }
    }
    // Kahn: whatever never reaches in-degree 0 is on (or after) a cycle.
    let mut ready: Vec<usize> = (0..batch.len()).filter(|i| indegree[*i] == 0).collect();
    let mut ordered = 0;
    while let Some(i) = ready.pop() {
        ordered += 1;
        for &child in &edges[i] {
            indegree[child] -= 1;
            if indegree[child] == 0 {
                ready.push(child);
            }
        }
    }
    if ordered < batch.len() {
        let index = (0..batch.len()).find(|i| indegree[*i] > 0).unwrap_or(0);
        let spec = &batch[index].1;
        return Err(invalid(
            index,
            spec,
            "the tasks' dependencies form a cycle".into(),
        ));
    }
    Ok(())
}

fn describe(dep: &Dependency) -> String {
    match dep {
        Dependency::Task(id) => format!("task {id}"),
        Dependency::Ref(name) => format!("ref '{name}'"),
    }
}

/// The ids a Submit names in `after` that are not its own: what the Submit
/// path reads from the store ([`KnownParents`]).
pub(crate) fn external_parents(specs: &[TaskSpec]) -> Vec<TaskId> {
    let mut out: Vec<TaskId> = specs
        .iter()
        .flat_map(|s| s.after.iter())
        .filter_map(|d| match d {
            Dependency::Task(id) => Some(*id),
            Dependency::Ref(_) => None,
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn is_pending_spec(spec: &TaskSpec, wall: SystemTime) -> bool {
    !spec.after.is_empty() || spec.not_before.is_some_and(|at| at > wall)
}

impl Scheduler {
    /// Whether a new task starts PENDING (dependencies or a start time).
    pub(crate) fn starts_pending(spec: &TaskSpec, wall: SystemTime) -> bool {
        is_pending_spec(spec, wall)
    }

    /// Checks that every existing task named in `after` is live here or
    /// known final; `Err(None)`-like cases become errors. Called before
    /// anything of the Submit is applied.
    pub(crate) fn check_parents(
        &self,
        batch: &[(TaskId, TaskSpec)],
        known: &KnownParents,
    ) -> Result<(), Error> {
        // The Submit's own ids, gathered only once a task names a task
        // by id: a batch without dependencies pays nothing per task.
        let mut own: Option<HashSet<TaskId>> = None;
        for (index, (_, spec)) in batch.iter().enumerate() {
            for dep in &spec.after {
                let Dependency::Task(parent) = dep else {
                    continue;
                };
                let own = own.get_or_insert_with(|| batch.iter().map(|(id, _)| *id).collect());
                if own.contains(parent) || self.tasks.contains_key(parent) {
                    continue;
                }
                match known.get(parent) {
                    Some(Some(_)) => {}
                    // Live when the store was read, gone from here since:
                    // it ended in a batch whose commit may still be in
                    // flight. The Submit path reads again.
                    Some(None) => return Err(Error::ParentsMoved),
                    None => {
                        let reason = format!("unknown task {parent}");
                        return Err(invalid(index, spec, reason));
                    }
                }
            }
        }
        Ok(())
    }

    /// After the Submit's tasks are in the table, its PENDING ones among
    /// them: links those to their parents. Runs before anything of the
    /// Submit may end (its queued tasks' policy hooks), so a parent that
    /// ends at once finds its children and keeps its result for them.
    pub(crate) fn link_pending(&mut self, pending: &[TaskId], known: &KnownParents, now: Now) {
        if pending.is_empty() {
            self.graph.ended_in_submit = None;
            return;
        }
        self.graph.clock = Some((now.instant, now.wall));
        for id in pending {
            self.link(*id, known);
        }
        self.graph.ended_in_submit = None;
    }

    /// A Submit with PENDING tasks begins: the results of tasks that end
    /// before [`link_pending`](Self::link_pending) are kept for it.
    pub(crate) fn keep_results_ended_in_submit(&mut self) {
        self.graph.ended_in_submit = Some(HashMap::new());
    }

    /// After [`link_pending`](Self::link_pending) and the policy hooks:
    /// releases (or ends) the Submit's PENDING tasks whose rule is decided.
    pub(crate) fn settle_pending(&mut self, pending: Vec<TaskId>, now: Now) {
        for id in pending {
            self.settle(id, now.wall);
        }
    }

    /// Registers `id`'s dependencies: counters from parents already final,
    /// a place among the children of live ones.
    fn link(&mut self, id: TaskId, known: &KnownParents) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let spec = task.spec.template(self.queue.example(task.class));
        if spec.after.is_empty() {
            return;
        }
        let parents: Box<[TaskId]> = spec
            .after
            .iter()
            .filter_map(|d| match d {
                Dependency::Task(id) => Some(*id),
                Dependency::Ref(_) => None,
            })
            .collect();
        let mut deps = Deps {
            parents,
            rule: spec.after_rule,
            succeeded: 0,
            failed: 0,
            first_failed: None,
            met: task.state != TaskState::Pending,
            at_release: None,
        };
        let restored_early = deps.met && is_early(deps.rule);
        for i in 0..deps.parents.len() {
            let parent = deps.parents[i];
            if self.tasks.contains_key(&parent) {
                self.graph.children.entry(parent).or_default().push(id);
                continue;
            }
            let result = match self.graph.results.get_mut(&parent) {
                Some(kept) => {
                    kept.children += 1;
                    Arc::clone(&kept.result)
                }
                None => {
                    let ended = self.graph.ended_in_submit.as_ref();
                    let result = match (ended.and_then(|e| e.get(&parent)), known.get(&parent)) {
                        (Some(result), _) => ParentResult::clone(result),
                        (None, Some(Some(result))) => result.clone(),
                        // Gone from the store (retention), or never seen:
                        // it cannot be waited for, so it counts as failed.
                        _ => ParentResult {
                            task_id: parent,
                            ref_name: String::new(),
                            state: TaskState::Failed,
                            output: Bytes::new(),
                        },
                    };
                    let result = Arc::new(result);
                    self.graph.results.insert(
                        parent,
                        Kept {
                            result: Arc::clone(&result),
                            children: 1,
                        },
                    );
                    result
                }
            };
            count(&mut deps, parent, result.state);
        }
        if restored_early {
            deps.at_release = Some(
                deps.parents
                    .iter()
                    .map(|p| Some(self.tasks.get(p).map_or(TaskState::Queued, |t| t.state)))
                    .collect(),
            );
        }
        self.graph.deps.insert(id, deps);
        if restored_early {
            self.restore_release(id);
        }
    }

    /// A restored early child (`any_succeeded`, `any_failed`, released
    /// before the restart): when it was released is not stored, so its
    /// parents already final count as ended before it (their outputs
    /// given) while they fit one message with its spec, those that meet
    /// its rule first; the rest are given as not ended yet. When not one
    /// parent that meets its rule fits, all count as ended before it, and
    /// the size check fails the child saying so rather than run it
    /// seeing none.
    fn restore_release(&mut self, id: TaskId) {
        let Some((total, _, limit)) = self.assignment_bytes(id) else {
            return;
        };
        let Some(deps) = self.graph.deps.get_mut(&id) else {
            return;
        };
        let rule = deps.rule;
        let Some(at_release) = deps.at_release.as_mut() else {
            return;
        };
        let meets = |state: TaskState| match rule {
            DependencyRule::AnySucceeded => state == TaskState::Succeeded,
            _ => state != TaskState::Succeeded,
        };
        let mut room = limit.saturating_sub(total);
        let mut met = false;
        let mut any_meets = false;
        for first in [true, false] {
            for (i, parent) in deps.parents.iter().enumerate() {
                let Some(kept) = self.graph.results.get(parent) else {
                    continue; // live: not ended, whatever fits
                };
                let result = &kept.result;
                if meets(result.state) != first {
                    continue;
                }
                any_meets |= first;
                let extra = result_wire_len(&result.ref_name, result.output.len())
                    - result_wire_len(&result.ref_name, 0);
                if extra <= room {
                    room -= extra;
                    at_release[i] = None;
                    met |= first;
                }
            }
        }
        if any_meets && !met {
            for (i, parent) in deps.parents.iter().enumerate() {
                if self.graph.results.contains_key(parent) {
                    at_release[i] = None;
                }
            }
        }
    }

    /// Moves a PENDING task on if it can: QUEUED when its rule is met and
    /// its start time has come; UPSTREAM_FAILED or SKIPPED when its rule
    /// can never be met.
    fn settle(&mut self, id: TaskId, wall: SystemTime) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        if task.state != TaskState::Pending {
            return;
        }
        let not_before = task
            .spec
            .template(self.queue.example(task.class))
            .not_before;
        if let Some(deps) = self.graph.deps.get_mut(&id) {
            match deps.decide() {
                None => return,
                Some(false) => {
                    let (state, reason) = match (deps.rule, deps.first_failed) {
                        (DependencyRule::AnyFailed, _) => (
                            TaskState::Skipped,
                            "skipped: every task it runs after succeeded (rule any_failed)"
                                .to_owned(),
                        ),
                        (DependencyRule::AnySucceeded, _) => (
                            TaskState::UpstreamFailed,
                            "upstream failed: none of the tasks it runs after succeeded (rule any_succeeded)"
                                .to_owned(),
                        ),
                        (_, parent) => {
                            let parent = parent
                                .and_then(|p| self.graph.results.get(&p).map(|k| &k.result));
                            let what = match parent {
                                Some(p) if p.ref_name.is_empty() => {
                                    format!("task {} ended {}", p.task_id, p.state)
                                }
                                Some(p) => format!(
                                    "task {} (ref '{}') ended {}",
                                    p.task_id, p.ref_name, p.state
                                ),
                                None => "a task it runs after did not succeed".to_owned(),
                            };
                            (TaskState::UpstreamFailed, format!("upstream failed: {what}"))
                        }
                    };
                    self.finalize(id, state, reason, Bytes::new(), wall);
                    return;
                }
                Some(true) => deps.met = true,
            }
        }
        match not_before {
            Some(at) if at > wall => {
                self.graph.timers.push(Reverse((at, id)));
            }
            _ => {
                let class = task.class;
                let reason = match self.graph.deps.contains_key(&id) {
                    true => "the tasks it runs after met its rule",
                    false => "its start time came",
                };
                self.release(id, class, reason.into(), wall);
            }
        }
    }

    /// Hook from `finalize`: a task ended. Lets go of what it held as a
    /// child and tells its children (the cascade, see the module docs).
    pub(crate) fn graph_finished(
        &mut self,
        id: TaskId,
        state: TaskState,
        output: &Bytes,
        ref_name: &str,
        wall: SystemTime,
    ) {
        if let Some(ended) = &mut self.graph.ended_in_submit {
            let result = ParentResult {
                task_id: id,
                ref_name: ref_name.to_owned(),
                state,
                output: output.clone(),
            };
            ended.insert(id, Arc::new(result));
        }
        if let Some(deps) = self.graph.deps.remove(&id) {
            for parent in deps.parents.iter() {
                if let Some(kept) = self.graph.results.get_mut(parent) {
                    kept.children = kept.children.saturating_sub(1);
                    if kept.children == 0 {
                        self.graph.results.remove(parent);
                    }
                }
            }
        }
        if let Some(children) = self.graph.children.remove(&id) {
            let live = children
                .iter()
                .filter(|c| self.graph.deps.contains_key(c))
                .count() as u32;
            if live > 0 {
                let result = Arc::new(ParentResult {
                    task_id: id,
                    ref_name: ref_name.to_owned(),
                    state,
                    output: output.clone(),
                });
                self.graph.results.insert(
                    id,
                    Kept {
                        result,
                        children: live,
                    },
                );
                self.graph.work.push((id, state, children));
            }
        }
        if self.graph.cascading {
            return;
        }
        self.graph.cascading = true;
        while let Some((parent, state, children)) = self.graph.work.pop() {
            for child in children {
                let Some(deps) = self.graph.deps.get_mut(&child) else {
                    continue;
                };
                count(deps, parent, state);
                if !deps.met {
                    self.settle(child, wall);
                }
            }
        }
        self.graph.cascading = false;
    }

    /// Counts a PENDING task that ended without being released. Once as
    /// many ended as half the timers, the timers of tasks no longer
    /// pending are dropped (a cost shared by the tasks that ended): a
    /// start time far ahead, cancelled, is not kept until it comes, nor
    /// does it keep the graph's work on for every task meanwhile.
    pub(crate) fn pending_ended(&mut self) {
        self.graph.ended_pending += 1;
        if self.graph.ended_pending * 2 < self.graph.timers.len() {
            return;
        }
        let tasks = &self.tasks;
        self.graph.timers.retain(|Reverse((_, id))| {
            tasks.get(id).is_some_and(|t| t.state == TaskState::Pending)
        });
        self.graph.ended_pending = 0;
    }

    /// Releases PENDING tasks whose start time came.
    pub(crate) fn graph_tick(&mut self, now: Now) {
        self.graph.clock = Some((now.instant, now.wall));
        while let Some(Reverse((at, id))) = self.graph.timers.peek().copied() {
            if at > now.wall {
                return;
            }
            self.graph.timers.pop();
            let Some(task) = self.tasks.get(&id) else {
                continue;
            };
            if task.state != TaskState::Pending {
                continue;
            }
            let class = task.class;
            if self.graph.deps.get(&id).is_some_and(|d| !d.met) {
                continue;
            }
            let reason = "its start time came".to_owned();
            self.release(id, class, reason, now.wall);
        }
    }

    /// A PENDING task is queued: ready for dispatch, and counted by its
    /// policy (concurrency key, infeasible check) as a task queued at
    /// submit is.
    /// A call no connected node serves says so, and fails after its
    /// schedule timeout, as at submit.
    /// A child whose spec and parents' results pass what one message to a
    /// node holds ends FAILED instead (see the module docs).
    fn release(&mut self, id: TaskId, class: ClassId, reason: String, wall: SystemTime) {
        if let Some(error) = self.oversized(id) {
            self.finalize(id, TaskState::Failed, error, Bytes::new(), wall);
            return;
        }
        self.note_live_parents(id);
        let unserved = self.tasks.get(&id).and_then(|task| {
            let spec = task.spec.template(self.queue.example(class));
            (!self.is_served(spec))
                .then(|| (self.unserved_reason(spec), self.schedule_timeout(spec)))
        });
        let reason = match &unserved {
            Some((why, _)) => format!("{reason}; {why}"),
            None => reason,
        };
        self.change_state(id, TaskState::Queued, None, reason, wall);
        if let Some((_, wait)) = unserved
            && !wait.is_zero()
        {
            self.graph.unserved.push((id, wait));
        }
        // Submitted at (0, the oldest, only if it were gone: then it is
        // skipped as stale, and the bound is merely loose).
        let created = self.tasks.get(&id).map_or(0, |t| t.created_nanos());
        self.queue.push_ready(class, id, created);
        if !self.queue.classes[class as usize].policy.plain
            && let Some(task) = self.tasks.get(&id)
        {
            let spec = task.spec.to_spec(self.queue.example(class));
            self.policy_submitted(id, class, &spec, wall);
        }
    }

    /// Early release (ANY_FAILED, ANY_SUCCEEDED) with parents still live:
    /// notes each one's state now ([`Deps::at_release`]).
    fn note_live_parents(&mut self, id: TaskId) {
        let Some(deps) = self.graph.deps.get(&id) else {
            return;
        };
        if !is_early(deps.rule) || deps.parents.iter().all(|p| !self.tasks.contains_key(p)) {
            return;
        }
        let states: Box<[Option<TaskState>]> = deps
            .parents
            .iter()
            .map(|p| self.tasks.get(p).map(|t| t.state))
            .collect();
        if let Some(deps) = self.graph.deps.get_mut(&id) {
            deps.at_release = Some(states);
        }
    }

    /// The ref of live task `id` ("" when it has none or is not live).
    fn live_ref(&self, id: TaskId) -> &str {
        self.tasks.get(&id).map_or("", |t| {
            t.spec
                .template(self.queue.example(t.class))
                .ref_name
                .as_str()
        })
    }

    /// Why child `id` cannot be sent its spec and its parents' results in
    /// one message to a node, or `None` when they fit (or it has no
    /// parents). Each parent counts with its id, ref and state; its output
    /// too when it must be given: a parent still live has none yet, and
    /// one that ended after an early release is given its output only
    /// while it fits ([`Deps::at_release`]). What is counted here is what
    /// every assignment of the child takes at least. Encodes the spec
    /// once: paid only by a child being released or requeued.
    pub(super) fn oversized(&self, id: TaskId) -> Option<String> {
        let (total, outputs, limit) = self.assignment_bytes(id)?;
        (total > limit).then(|| {
            format!(
                "its parents' outputs total {outputs} bytes; at most {limit} reach a task in one \
                 message, its spec and its parents' ids and refs included ({total} here; \
                 --max-message-size {})",
                self.config.max_message_size
            )
        })
    }

    /// What [`oversized`](Self::oversized) counts: the least bytes any
    /// assignment of child `id` takes, the parents' outputs among them,
    /// and the most one message to a node holds for a task.
    fn assignment_bytes(&self, id: TaskId) -> Option<(usize, usize, usize)> {
        let deps = self.graph.deps.get(&id)?;
        let task = self.tasks.get(&id)?;
        let mut outputs = 0usize;
        let mut results = 0usize;
        for (i, parent) in deps.parents.iter().enumerate() {
            let late = deps.at_release.as_ref().is_some_and(|s| s[i].is_some());
            results += match self.graph.results.get(parent) {
                Some(kept) if !late => {
                    outputs += kept.result.output.len();
                    result_wire_len(&kept.result.ref_name, kept.result.output.len())
                }
                Some(kept) => result_wire_len(&kept.result.ref_name, 0),
                None => result_wire_len(self.live_ref(*parent), 0),
            };
        }
        let spec = task.spec.to_spec(self.queue.example(task.class));
        let mut bytes = Vec::new();
        let secrets = self.secrets.get(&id).map(Arc::as_ref);
        spec.encode_fields(weft_proto::SpecFields::Assigned(secrets), &mut bytes);
        let total = bytes.len().saturating_add(results);
        let limit = max_spec_bytes(self.config.max_message_size);
        Some((total, outputs, limit))
    }

    /// Hook from `requeue`: a child about to be queued again whose spec
    /// and parents' results no longer fit one message (restored after a
    /// restart under a smaller --max-message-size, its node gone) ends
    /// FAILED instead. Answers whether it did.
    pub(super) fn fail_if_oversized(&mut self, id: TaskId, wall: SystemTime) -> bool {
        if self.graph.deps.is_empty() {
            return false;
        }
        let Some(error) = self.oversized(id) else {
            return false;
        };
        self.finalize(id, TaskState::Failed, error, Bytes::new(), wall);
        true
    }

    /// Finished tasks whose results live children will be given (they are
    /// read back from the store at a restart): retention must keep them
    /// however old they are.
    pub(crate) fn kept_parents(&self) -> Vec<TaskId> {
        self.graph.results.keys().copied().collect()
    }

    /// Start times held (tests).
    #[cfg(test)]
    pub(crate) fn graph_timers(&self) -> usize {
        self.graph.timers.len()
    }

    /// When the earliest start time comes, as an instant.
    pub(crate) fn graph_wakeup(&self) -> Option<Instant> {
        let Reverse((at, _)) = self.graph.timers.peek()?;
        let (instant, wall) = self.graph.clock?;
        Some(instant + at.duration_since(wall).unwrap_or(Duration::ZERO))
    }

    /// Fills in the parents of this batch's assignments.
    ///
    /// A child released before all its parents ended (ANY_FAILED,
    /// ANY_SUCCEEDED) was checked against the message limit with the
    /// outputs known then. A parent that ended since is given final with
    /// its output while that fits, in order; else as it was at the
    /// release (its state then, no output): never final with its output
    /// left out, which would read as an empty output. What is left was
    /// counted by the check at the release (or at a requeue, or at a
    /// restore), so no assignment passes the limit.
    pub(crate) fn attach_parents(&mut self) {
        if self.graph.deps.is_empty() {
            return;
        }
        let limit = max_spec_bytes(self.config.max_message_size);
        for out in self.out.nodes.values_mut() {
            for a in &mut out.assign {
                let Some(deps) = self.graph.deps.get(&a.task_id) else {
                    continue;
                };
                a.parents = deps
                    .parents
                    .iter()
                    .map(|p| match self.graph.results.get(p) {
                        Some(kept) => ParentResult::clone(&kept.result),
                        // Still live (a rule that let the child go early):
                        // its ref and state so far, no output yet.
                        None => {
                            let live = self.tasks.get(p);
                            ParentResult {
                                task_id: *p,
                                ref_name: live
                                    .map(|t| {
                                        t.spec
                                            .template(self.queue.example(t.class))
                                            .ref_name
                                            .clone()
                                    })
                                    .unwrap_or_default(),
                                state: live.map_or(TaskState::Queued, |t| t.state),
                                output: Bytes::new(),
                            }
                        }
                    })
                    .collect();
                if let Some(at_release) = &deps.at_release {
                    let mut spec = Vec::new();
                    a.spec.encode_fields(
                        weft_proto::SpecFields::Assigned(a.secret_env.as_deref()),
                        &mut spec,
                    );
                    let room = limit.saturating_sub(spec.len());
                    fit_outputs(a.task_id, &mut a.parents, at_release, room);
                }
            }
        }
    }

    /// For a PENDING task: what it waits for (`Task.waiting_for`) and why,
    /// in words (`Task.pending_reason`). `None` when it is not PENDING.
    pub fn waiting(&self, id: TaskId) -> Option<(Vec<TaskId>, String)> {
        let task = self.tasks.get(&id)?;
        if task.state != TaskState::Pending {
            return None;
        }
        if let Some(deps) = self.graph.deps.get(&id).filter(|d| !d.met) {
            let waiting: Vec<TaskId> = deps
                .parents
                .iter()
                .copied()
                .filter(|p| self.tasks.contains_key(p))
                .collect();
            let reason = format!(
                "waiting for {} of {} tasks (rule {})",
                waiting.len(),
                deps.parents.len(),
                deps.rule
            );
            return Some((waiting, reason));
        }
        let spec = task.spec.template(self.queue.example(task.class));
        let at = spec
            .not_before
            .map(|t| weft_proto::convert::rfc3339(t, false));
        Some((Vec::new(), format!("not before {}", at.unwrap_or_default())))
    }

    /// The first event's reason of a new PENDING task.
    pub(crate) fn pending_first_reason(spec: &TaskSpec) -> String {
        match (spec.after.len(), spec.not_before) {
            (0, Some(at)) => format!(
                "pending: not before {}",
                weft_proto::convert::rfc3339(at, false)
            ),
            (n, _) => format!("pending: waiting for {n} tasks (rule {})", spec.after_rule),
        }
    }

    /// Restore: a live task that runs after others or has a start time,
    /// linked in [`finish_restore`](Self::finish_restore).
    pub(crate) fn graph_restored(&mut self, id: TaskId, spec: &TaskSpec) {
        if !spec.after.is_empty() || spec.not_before.is_some() {
            self.graph.restored.push(id);
        }
    }

    /// After every live task is restored: links dependencies (reading
    /// the results of parents that ended before the restart through
    /// `lookup`), re-arms start times, and settles what was decided (a
    /// parent that ended just before the crash releases its children).
    ///
    /// `lookup` answers `None` for a parent the store no longer has (it
    /// counts as failed). A parent it could not read is an error, and
    /// nothing is settled: a read that failed is not a parent that failed.
    pub fn finish_restore<E>(
        &mut self,
        lookup: &mut dyn FnMut(TaskId) -> Result<Option<ParentResult>, E>,
        now: Now,
    ) -> Result<(), E> {
        let mut known = KnownParents::new();
        for id in &self.graph.restored {
            let Some(task) = self.tasks.get(id) else {
                continue;
            };
            let spec = task.spec.template(self.queue.example(task.class));
            for dep in &spec.after {
                if let Dependency::Task(parent) = dep
                    && !self.tasks.contains_key(parent)
                    && !known.contains_key(parent)
                {
                    known.insert(*parent, lookup(*parent)?);
                }
            }
        }
        self.graph.clock = Some((now.instant, now.wall));
        let restored = std::mem::take(&mut self.graph.restored);
        for id in &restored {
            self.link(*id, &known);
        }
        for id in restored {
            // Released before the restart: checked then, but perhaps
            // under a larger --max-message-size. (One assigned then is
            // checked if its node does not come back: `requeue`.)
            if self.tasks.get(&id).map(|t| t.state) == Some(TaskState::Queued)
                && let Some(error) = self.oversized(id)
            {
                self.finalize(id, TaskState::Failed, error, Bytes::new(), now.wall);
                continue;
            }
            self.settle(id, now.wall);
        }
        Ok(())
    }
}

/// Whether a child of `rule` may be released before all its parents end.
fn is_early(rule: DependencyRule) -> bool {
    matches!(
        rule,
        DependencyRule::AnyFailed | DependencyRule::AnySucceeded
    )
}

/// Of the parents that ended after the child's release (`at_release`
/// holds their state then), gives each final one's output while it fits
/// in `room` bytes, in order, and turns the others back into what they
/// were at the release: not final, no output. Outputs of parents that
/// had ended at the release are always given (the release counted them).
fn fit_outputs(
    child: TaskId,
    parents: &mut [ParentResult],
    at_release: &[Option<TaskState>],
    room: usize,
) {
    let late = |i: usize, p: &ParentResult| {
        p.state.is_final() && at_release.get(i).copied().flatten().is_some()
    };
    let mut used: usize = parents
        .iter()
        .enumerate()
        .map(|(i, p)| match late(i, p) {
            true => result_wire_len(&p.ref_name, 0),
            false => result_wire_len(&p.ref_name, p.output.len()),
        })
        .sum();
    if used > room {
        // Not reached: every release, requeue and restore checks this.
        tracing::error!(task_id = %child, bytes = used, room, "an assignment passes --max-message-size even without its parents' later outputs");
    }
    for (i, p) in parents.iter_mut().enumerate() {
        let Some(then) = at_release.get(i).copied().flatten() else {
            continue;
        };
        if !p.state.is_final() {
            continue;
        }
        let more = result_wire_len(&p.ref_name, p.output.len()) - result_wire_len(&p.ref_name, 0);
        if used.saturating_add(more) > room {
            tracing::warn!(task_id = %child, parent = %p.task_id, bytes = p.output.len(), "a parent that ended after its child's release is given as it was then: its output would pass --max-message-size");
            p.state = then;
            p.output = Bytes::new();
        } else {
            used += more;
        }
    }
}

fn count(deps: &mut Deps, parent: TaskId, state: TaskState) {
    if state == TaskState::Succeeded {
        deps.succeeded += 1;
    } else {
        deps.failed += 1;
        deps.first_failed.get_or_insert(parent);
    }
}

/// Reason of the first `State` event of a task submitted PENDING.
pub(crate) fn pending_event(spec: &TaskSpec) -> EventBody {
    EventBody::State {
        state: TaskState::Pending,
        node_id: None,
        node_name: None,
        reason: Scheduler::pending_first_reason(spec),
    }
}
