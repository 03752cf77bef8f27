//! The ready queues and the timer heap of retries waiting out their
//! backoff (the delay itself is `retry.rs`'s).
//!
//! Queued tasks are grouped by requirement class (handler or exec program,
//! labels, slots, and the scheduling policy: priority, fair key,
//! concurrency key, rate-limit uses, resources; see `policy.rs`):
//! every task of a class can run on exactly the same nodes, so dispatch
//! looks at one queue head per class instead of scanning tasks. A queue
//! entry is just a 16-byte [`TaskId`]; a task cancelled while queued leaves
//! its entry behind and dispatch skips it (lazy deletion), so cancel is O(1).
//!
//! Only the classes with ready entries are *active* ([`Queue::active`]):
//! dispatch and the gauges look at those alone, so tasks that each came
//! with a key of their own (a fair or concurrency key per user or per job,
//! say) leave no cost once they have run. A class lives while it has live
//! tasks ([`Class::members`]); then it is retired and its number reused
//! ([`Queue::retire_unused`]), so the classes kept are those of the work
//! in the system, not of every key ever seen. A fair key no class uses
//! is let go with its last class (see `Policy::class_retired`); a
//! concurrency key's entry is kept, since its limit is the latest one a
//! task gave.
//!
//! Dispatch does not look at every active class either: each priority
//! keeps its active classes ordered by (their fair key's virtual time, their
//! head's id) ([`Queue::levels`]), the order the policy serves them in, so
//! an assignment walks each priority from its front to the first class the
//! node may take. It walks the priorities from the highest, and skips one
//! whose oldest ready task aging could not lift to the best head found so
//! far ([`Queue::level_ready`]): with nothing old waiting, it looks at one
//! priority, not at all of them. An entry is corrected when dispatch finds
//! it out of date (its key was served since, or its head left the queue):
//! virtual times only grow, so such an entry is only ever too early, never
//! missed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use weft_proto::exec_policy::loader_variable;
use weft_proto::{SecretEnv, TaskId, TaskKind, TaskSpec};

use super::policy::{ClassPolicy, Policy};

/// Index of a requirement class.
pub(crate) type ClassId = u32;

/// Tasks that need the same kind of node.
#[derive(Debug)]
pub(crate) struct Class {
    /// The first spec seen of this class, without its input (or stdin).
    /// Matching reads only its handler (or exec program: `argv[0]`, which
    /// nodes' exec policies match), labels and slots, which every
    /// member shares; members that also share its timeout, attempts and
    /// name keep only their input (see `task::LiveSpec`).
    pub example: Arc<TaskSpec>,
    /// Ready task ids, oldest first (may hold stale entries).
    pub ready: VecDeque<TaskId>,
    /// Its scheduling policy, resolved once (see `policy.rs`).
    pub policy: ClassPolicy,
    /// When it was last served (Unix nanos; 0: never): priority aging
    /// counts the time its head waited since then, so a class served all
    /// along gains nothing.
    pub last_served: u64,
    /// The front entry as dispatch last checked it, with its submission
    /// time (Unix nanos): while it is still the front, it is known queued
    /// and not delayed, so the next assignment skips the task lookup.
    /// Every way a task leaves QUEUED forgets it ([`Queue::forget_head`]).
    pub head: Option<(TaskId, u64)>,
    /// Its entry in [`Queue::levels`] (its priority's): there while it
    /// has ready entries.
    pub indexed: Option<LevelEntry>,
    /// Its live tasks (pending, queued, assigned or running). Once it has
    /// none, the class is retired and its number reused
    /// ([`Queue::retire_unused`]).
    pub members: u32,
    /// Retired: no live task, no example, its number free for another class.
    pub retired: bool,
}

/// An active class in its priority's order: its fair key's virtual time
/// (as [`vtime_order`]), its head's id, the class.
pub(crate) type LevelEntry = (u64, TaskId, ClassId);

/// A virtual time (never negative) as a number that sorts the same way.
pub(crate) fn vtime_order(vtime: f64) -> u64 {
    vtime.max(0.0).to_bits()
}

/// Ready queues per class plus the retry timer heap.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    pub classes: Vec<Class>,
    /// The classes whose ready queue is not empty (it may hold only stale
    /// entries until dispatch looks), per priority (the index), in the
    /// order the policy serves them; see the module docs.
    pub levels: Vec<std::collections::BTreeSet<LevelEntry>>,
    /// Per priority: how many entries its classes' ready queues hold
    /// (stale ones too), and a lower bound on the submission time (Unix
    /// nanos) of every task among them (`u64::MAX` when none): the oldest
    /// pushed since they last held none. Aging can lift a priority's
    /// heads by at most what that bound says, so an assignment skips a
    /// priority that cannot beat the head it has already found
    /// (`dispatch.rs`).
    pub level_ready: Vec<(usize, u64)>,
    /// Class entries dispatch has looked at (tests: what an assignment
    /// costs).
    #[cfg(test)]
    pub looked: u64,
    /// Examples a submitted spec was compared with to find its class
    /// (tests: what a class lookup costs).
    #[cfg(test)]
    pub compared: u64,
    /// Classes by [`class_hash`] (already a hash: no hashing again).
    index: HashMap<u64, Vec<ClassId>, std::hash::BuildHasherDefault<PassThrough>>,
    delayed: BinaryHeap<Reverse<(Instant, TaskId, u32)>>,
    last: Option<ClassId>,
    /// Numbers of retired classes, for new classes to take.
    free: Vec<ClassId>,
    /// Classes whose last live task ended since [`Queue::retire_unused`]
    /// last ran (they may have gained one since).
    unused: Vec<ClassId>,
    /// Class numbers given to a new class since the scheduler last took
    /// them ([`Queue::take_reused`]): what it remembers per class number
    /// (which nodes can run it) was about the old class.
    reused: Vec<ClassId>,
    /// The example a retired class keeps: an empty spec, shared.
    retired_example: Option<Arc<TaskSpec>>,
    /// Key tables and buckets of the scheduling policy.
    pub policy: Policy,
}

/// A hash of what [`same_class`] compares, so tasks of different classes
/// rarely share a bucket: tasks that differ only by their concurrency key
/// or rate limits (a key per user, say) each find their class in one
/// comparison, not one per key.
fn class_hash(spec: &TaskSpec) -> u64 {
    let mut hasher = foldhash::fast::FixedState::default().build_hasher();
    match &spec.kind {
        TaskKind::Exec(exec) => {
            0u8.hash(&mut hasher);
            exec.argv.first().hash(&mut hasher);
        }
        TaskKind::Call(call) => {
            1u8.hash(&mut hasher);
            call.handler.hash(&mut hasher);
        }
    }
    spec.labels.hash(&mut hasher);
    spec.slots.hash(&mut hasher);
    spec.priority.hash(&mut hasher);
    spec.fair_key.hash(&mut hasher);
    spec.fair_weight.hash(&mut hasher);
    if let Some(conc) = &spec.concurrency {
        conc.key.hash(&mut hasher);
        conc.max_running.hash(&mut hasher);
        conc.on_limit.hash(&mut hasher);
    }
    for used in &spec.rate_limits {
        used.name.hash(&mut hasher);
        used.units.hash(&mut hasher);
    }
    spec.resources.hash(&mut hasher);
    spec.fail_if_infeasible.hash(&mut hasher);
    hasher.finish()
}

/// The hasher of [`Queue`]'s class index: its keys are hashes already.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

fn same_class(a: &TaskSpec, b: &TaskSpec) -> bool {
    /// What a node must offer: a handler, or (for exec) leave to run the
    /// program (`None` for an empty argv).
    fn needs(s: &TaskSpec) -> (bool, Option<&str>) {
        match &s.kind {
            TaskKind::Exec(exec) => (false, exec.argv.first().map(String::as_str)),
            TaskKind::Call(call) => (true, Some(call.handler.as_str())),
        }
    }
    needs(a) == needs(b)
        && a.slots == b.slots
        && a.labels == b.labels
        && sets_loader_env(a) == sets_loader_env(b)
        && same_policy(a, b)
}

/// Same scheduling needs (see `policy.rs`): such tasks share a class.
fn same_policy(a: &TaskSpec, b: &TaskSpec) -> bool {
    a.priority == b.priority
        && a.fair_key == b.fair_key
        && a.fair_weight == b.fair_weight
        && a.concurrency == b.concurrency
        && a.rate_limits == b.rate_limits
        && a.resources == b.resources
        && a.fail_if_infeasible == b.fail_if_infeasible
}

/// True when an exec task sets a variable an allow-list refuses (in `env`
/// or `secret_env`; see `weft_proto::exec_policy::loader_variable`): such
/// tasks get a class of their own, so matching its example matches them.
fn sets_loader_env(spec: &TaskSpec) -> bool {
    let TaskKind::Exec(exec) = &spec.kind else {
        return false;
    };
    let program = exec.argv.first().map_or("", String::as_str);
    exec.env
        .keys()
        .map(String::as_str)
        .chain(spec.secret_env.names())
        .any(|name| loader_variable(program, name))
}

impl Queue {
    /// An empty queue whose policy ages priorities by `aging` (zero: not).
    pub fn with_aging(aging: std::time::Duration) -> Self {
        let mut queue = Queue::default();
        queue.policy.aging = aging;
        queue
    }

    /// The class of `spec` (with its `secret_env`, whose names may set it
    /// apart: see `sets_loader_env`), made on first sight. Submits of many alike
    /// tasks hit the one-entry cache and allocate nothing.
    pub fn class_for(&mut self, spec: &TaskSpec) -> ClassId {
        #[cfg(test)]
        {
            self.compared += u64::from(self.last.is_some());
        }
        if let Some(last) = self.last
            && same_class(&self.classes[last as usize].example, spec)
        {
            return last;
        }
        let hash = class_hash(spec);
        let candidates = self.index.entry(hash).or_default();
        #[cfg(test)]
        let compared = &mut self.compared;
        let found = candidates.iter().copied().find(|c| {
            #[cfg(test)]
            {
                *compared += 1;
            }
            same_class(&self.classes[*c as usize].example, spec)
        });
        let class = match found {
            Some(class) => class,
            None => {
                let class = u32::try_from(self.classes.len()).unwrap_or(u32::MAX);
                let mut example = spec.clone();
                // The secrets' values never go in the example; the names an
                // allow-list refuses stay, so nodes are matched against them.
                example.secret_env = match &spec.kind {
                    TaskKind::Exec(exec) => {
                        let program = exec.argv.first().map_or("", String::as_str);
                        spec.secret_env
                            .names()
                            .filter(|name| loader_variable(program, name))
                            .map(|name| (name.to_string(), String::new()))
                            .collect()
                    }
                    TaskKind::Call(_) => SecretEnv::new(),
                };
                match &mut example.kind {
                    TaskKind::Call(call) => call.input = Bytes::new(),
                    TaskKind::Exec(exec) => exec.stdin = Bytes::new(),
                }
                let policy = self.policy.class_policy(&example);
                let made = Class {
                    example: Arc::new(example),
                    ready: VecDeque::new(),
                    policy,
                    last_served: 0,
                    head: None,
                    indexed: None,
                    members: 0,
                    retired: false,
                };
                let class = match self.free.pop() {
                    Some(reuse) => {
                        self.classes[reuse as usize] = made;
                        self.reused.push(reuse);
                        reuse
                    }
                    None => {
                        self.classes.push(made);
                        class
                    }
                };
                self.index.entry(hash).or_default().push(class);
                class
            }
        };
        self.last = Some(class);
        class
    }

    /// A live task of `class` was added.
    pub fn joined(&mut self, class: ClassId) {
        if let Some(c) = self.classes.get_mut(class as usize) {
            c.members += 1;
        }
    }

    /// A live task of `class` ended (or was replaced): once none is left,
    /// the class is retired at the next [`retire_unused`](Self::retire_unused).
    pub fn parted(&mut self, class: ClassId) {
        if let Some(c) = self.classes.get_mut(class as usize) {
            c.members = c.members.saturating_sub(1);
            if c.members == 0 {
                self.unused.push(class);
            }
        }
    }

    /// Retires the classes left without live tasks, so a coordinator that
    /// sees a new fair or concurrency key per job keeps classes for the
    /// keys in use, not for every key it ever saw. A retired class leaves
    /// its priority's order (dropping the entries of tasks cancelled while
    /// queued) and the class index, keeps no example, and gives its number
    /// to the next new class. Called between operations, never while a
    /// caller holds a class number it has not given a task yet.
    pub fn retire_unused(&mut self) {
        for class in std::mem::take(&mut self.unused) {
            let Some(c) = self.classes.get_mut(class as usize) else {
                continue;
            };
            if c.members > 0 || c.retired {
                continue;
            }
            let stale = c.ready.len();
            let level = usize::from(c.policy.priority);
            c.ready = VecDeque::new();
            c.head = None;
            let hash = class_hash(&c.example);
            if stale > 0 {
                self.left(level, stale);
            }
            self.index(class, None);
            if let Some(bucket) = self.index.get_mut(&hash) {
                bucket.retain(|c| *c != class);
                if bucket.is_empty() {
                    self.index.remove(&hash);
                }
            }
            if self.last == Some(class) {
                self.last = None;
            }
            let empty = self
                .retired_example
                .get_or_insert_with(|| Arc::new(TaskSpec::call("", Bytes::new())));
            let c = &mut self.classes[class as usize];
            c.example = Arc::clone(empty);
            c.last_served = 0;
            c.retired = true;
            let policy = c.policy;
            self.policy.class_retired(policy);
            self.free.push(class);
        }
    }

    /// Class numbers given to new classes since the last call (see
    /// [`Queue::reused`]).
    pub fn take_reused(&mut self) -> Vec<ClassId> {
        std::mem::take(&mut self.reused)
    }

    /// Classes that are not retired (tests: what the queue keeps).
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.classes.iter().filter(|c| !c.retired).count()
    }

    /// The example spec of `class` (see [`Class::example`]).
    pub fn example(&self, class: ClassId) -> &TaskSpec {
        &self.classes[class as usize].example
    }

    /// Puts a task, submitted at `created` (Unix nanos), at the back of
    /// its class's ready queue.
    pub fn push_ready(&mut self, class: ClassId, id: TaskId, created: u64) {
        if let Some(c) = self.classes.get_mut(class as usize) {
            if c.ready.is_empty() {
                self.policy.reactivate(c.policy.fair);
            }
            let was_empty = c.ready.is_empty();
            c.ready.push_back(id);
            let level = usize::from(c.policy.priority);
            self.entered(level, created);
            if was_empty {
                self.index(class, Some(id));
            }
        }
    }

    /// Puts a task at the front of its class's ready queue: for attempts
    /// that were already running (node lost) or waited out a retry backoff,
    /// so they are not sent behind the whole backlog again.
    pub fn push_front_ready(&mut self, class: ClassId, id: TaskId, created: u64) {
        if let Some(c) = self.classes.get_mut(class as usize) {
            if c.ready.is_empty() {
                self.policy.reactivate(c.policy.fair);
            }
            c.ready.push_front(id);
            let level = usize::from(c.policy.priority);
            self.entered(level, created);
            self.index(class, Some(id));
        }
    }

    /// Takes the front entry of class `index`'s ready queue (the task
    /// being assigned).
    pub fn pop_ready(&mut self, index: usize) {
        if let Some(c) = self.classes.get_mut(index)
            && c.ready.pop_front().is_some()
        {
            let level = usize::from(c.policy.priority);
            self.left(level, 1);
        }
    }

    /// A ready entry submitted at `created` joined priority `level`.
    fn entered(&mut self, level: usize, created: u64) {
        if self.level_ready.len() <= level {
            self.level_ready.resize(level + 1, (0, u64::MAX));
        }
        let (entries, oldest) = &mut self.level_ready[level];
        *entries += 1;
        *oldest = (*oldest).min(created);
    }

    /// `count` ready entries of priority `level` left (assigned, or stale
    /// ones dropped); once it holds none, its bound starts afresh.
    pub fn left(&mut self, level: usize, count: usize) {
        if let Some((entries, oldest)) = self.level_ready.get_mut(level) {
            *entries = entries.saturating_sub(count);
            if *entries == 0 {
                *oldest = u64::MAX;
            }
        }
    }

    /// The oldest submission time (Unix nanos) a ready task of priority
    /// `level` may have; `u64::MAX` when it has none.
    pub fn level_oldest(&self, level: usize) -> u64 {
        self.level_ready.get(level).map_or(u64::MAX, |l| l.1)
    }

    /// Puts `class` in its priority's order with `head` as its head (or
    /// takes it out, for `None`), at its fair key's virtual time now.
    pub fn index(&mut self, class: ClassId, head: Option<TaskId>) {
        let Some(c) = self.classes.get_mut(class as usize) else {
            return;
        };
        let level = usize::from(c.policy.priority);
        if self.levels.len() <= level {
            self.levels.resize_with(level + 1, Default::default);
        }
        if let Some(old) = c.indexed.take() {
            self.levels[level].remove(&old);
        }
        if let Some(head) = head {
            let vtime = self
                .policy
                .fair
                .get(c.policy.fair as usize)
                .map_or(0.0, |k| k.vtime);
            let entry = (vtime_order(vtime), head, class);
            self.levels[level].insert(entry);
            c.indexed = Some(entry);
        }
    }

    /// Takes `class` out of its priority's order if its ready queue is
    /// empty (its entries were stale, or its last task was assigned).
    pub fn deactivate_if_empty(&mut self, class: ClassId) {
        if self
            .classes
            .get(class as usize)
            .is_some_and(|c| c.ready.is_empty())
        {
            self.index(class, None);
        }
    }

    /// The active classes (see the module docs), priority by priority.
    pub fn active(&self) -> impl Iterator<Item = ClassId> + '_ {
        self.levels.iter().flatten().map(|entry| entry.2)
    }

    /// Task `id` of `class` leaves QUEUED (assigned, finalized): if
    /// dispatch knew it as its class's good head, it no longer is. O(1).
    #[inline]
    pub fn forget_head(&mut self, class: ClassId, id: TaskId) {
        if let Some(c) = self.classes.get_mut(class as usize)
            && c.head.is_some_and(|(known, _)| known == id)
        {
            c.head = None;
        }
    }

    /// True when some class may have a ready task.
    pub fn any_ready(&self) -> bool {
        self.levels.iter().any(|level| !level.is_empty())
    }

    /// Schedules attempt `attempt` of `id` to become ready at `at`.
    pub fn delay(&mut self, at: Instant, id: TaskId, attempt: u32) {
        self.delayed.push(Reverse((at, id, attempt)));
    }

    /// The next delayed entry due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(TaskId, u32)> {
        match self.delayed.peek() {
            Some(Reverse((at, _, _))) if *at <= now => self
                .delayed
                .pop()
                .map(|Reverse((_, id, attempt))| (id, attempt)),
            _ => None,
        }
    }

    /// When the earliest delayed entry is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.delayed.peek().map(|Reverse((at, _, _))| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alike_specs_share_a_class_and_different_labels_do_not() {
        let mut queue = Queue::default();
        let a = queue.class_for(&TaskSpec::call("noop", "x"));
        let b = queue.class_for(&TaskSpec::call("noop", "y"));
        let c = queue.class_for(&TaskSpec::call("noop", "").label("gpu", "1"));
        let d = queue.class_for(&TaskSpec::call("noop", "z"));
        let e = queue.class_for(&TaskSpec::exec(["true"]));
        let f = queue.class_for(&TaskSpec::exec(["true", "x"]));
        let g = queue.class_for(&TaskSpec::exec(["false"]));
        let h = queue.class_for(&TaskSpec::exec(["noop"]));
        assert_eq!(a, b);
        assert_eq!(a, d);
        assert_ne!(a, c);
        assert_ne!(a, e);
        // Exec policies match the program, so it is part of the class.
        assert_eq!(e, f);
        assert_ne!(e, g);
        assert_ne!(a, h);
    }
}
