//! The coordinator's write pattern for noop tasks, as the driver commits it.
//!
//! Each commit is one inbox batch: up to `batch` submits (task record +
//! `queued` event), `batch` assignments, `batch` starts and `batch`
//! finishes (record + final `state` event + `finished` event carrying the
//! record), each transition written as the scheduler writes it today
//! (`scheduler/transitions.rs`): a full task record and its events.
//!
//! Submits come in id order. The later stages follow an order that is
//! either the same (`in-order`) or, per window of `window` queued tasks,
//! highest priority first and FIFO within a priority, with each task's
//! priority drawn from 1..=9 (`shuffled`): what the scheduler does with a
//! deep queue of the bench's policy mix, and what spreads a batch's keys
//! across the id space. A stage starts on a window only after the whole
//! window was submitted, so about `window` tasks are live at any time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use weft_coordinator::store::{AttemptRecord, EventBody, Record, TaskEvent, TaskRecord};
use weft_proto::{Attempt, NodeId, Outcome, TaskId, TaskSpec, TaskState};

/// Which order the tasks leave the queue in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Order {
    /// In submission (id) order.
    InOrder,
    /// By priority (9 levels, drawn per task) within each window.
    Shuffled,
}

impl Order {
    pub fn name(self) -> &'static str {
        match self {
            Order::InOrder => "in-order",
            Order::Shuffled => "shuffled",
        }
    }
}

/// The workload's shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub tasks: usize,
    pub batch: usize,
    pub window: usize,
    pub order: Order,
    /// Only submits: every task stays queued (a restart's backlog).
    pub submit_only: bool,
}

/// A splitmix64 step: a fixed, seedable hash for priorities.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Task `i`'s priority, 1..=9.
pub fn priority(i: usize) -> u8 {
    1 + (mix(i as u64) % 9) as u8
}

/// Generates the commits of a run, one at a time.
pub struct Workload {
    shape: Shape,
    /// The order tasks go through assign/run/finish, as task indexes.
    progress: Vec<u32>,
    /// The spec of each live task (dropped when it finishes).
    specs: Vec<Option<Arc<TaskSpec>>>,
    base_ms: u64,
    lag: usize,
    commits: usize,
    next: usize,
    nodes: [(NodeId, Arc<str>); 2],
}

impl Workload {
    pub fn new(shape: Shape) -> Workload {
        let n = shape.tasks;
        let mut progress: Vec<u32> = (0..n as u32).collect();
        if shape.order == Order::Shuffled {
            for window in progress.chunks_mut(shape.window.max(1)) {
                window.sort_by_key(|&i| (std::cmp::Reverse(priority(i as usize)), i));
            }
        }
        let batches = n.div_ceil(shape.batch);
        let lag = shape.window.div_ceil(shape.batch).max(1);
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        Workload {
            shape,
            progress,
            specs: vec![None; n],
            base_ms,
            lag,
            commits: if shape.submit_only {
                batches
            } else {
                batches + lag + 2
            },
            next: 0,
            nodes: [
                (NodeId::from_u128(1 << 100), Arc::from("node-1")),
                (NodeId::from_u128(2 << 100), Arc::from("node-2")),
            ],
        }
    }

    /// How many commits the run has.
    pub fn commits(&self) -> usize {
        self.commits
    }

    /// Task `i`'s id: a ULID made `i / 1000` ms after the run's start.
    pub fn id(&self, i: usize) -> TaskId {
        let ms = self.base_ms + (i / 1000) as u64;
        TaskId::from_u128((u128::from(ms) << 80) | (i as u128))
    }

    /// The wall time of commit `c` (one commit per millisecond).
    pub fn wall(&self, c: usize) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.base_ms + c as u64)
    }

    /// The commit in which the task at `pos` of the progress order finishes.
    pub fn finish_commit(&self, pos: usize) -> usize {
        pos / self.shape.batch + self.lag + 2
    }

    fn record(
        &self,
        i: usize,
        state: TaskState,
        wall: SystemTime,
        submitted: SystemTime,
    ) -> TaskRecord {
        let spec = self.specs[i]
            .clone()
            .unwrap_or_else(|| Arc::new(spec_of(i, self.shape.order)));
        let on_node = state != TaskState::Queued;
        let (node_id, node_name) = self.nodes[i % 2].clone();
        let attempts = if on_node {
            vec![AttemptRecord {
                number: Attempt(1),
                node_id,
                node_name: node_name.clone(),
                assigned_at: wall,
                started_at: (state != TaskState::Assigned).then_some(wall),
                ended_at: state.is_final().then_some(wall),
                outcome: state.is_final().then_some(Outcome::Succeeded),
                exit_code: None,
                reason: String::new(),
            }]
        } else {
            Vec::new()
        };
        let (next_seq, output) = match state {
            TaskState::Queued => (1, Bytes::new()),
            TaskState::Assigned => (2, Bytes::new()),
            TaskState::Running => (3, Bytes::new()),
            _ => (5, Bytes::from(i.to_string())),
        };
        TaskRecord {
            id: self.id(i),
            spec,
            state,
            attempt: Attempt(u32::from(on_node)),
            node_id: on_node.then_some(node_id),
            node_name: on_node.then_some(node_name),
            exit_code: None,
            output,
            error: String::new(),
            pending_reason: String::new(),
            waiting_for: Vec::new(),
            job_id: None,
            failures: 0,
            node_losses: 0,
            created_at: submitted,
            updated_at: wall,
            next_seq,
            last_outcome: state.is_final().then_some(Outcome::Succeeded),
            lost_nodes: Vec::new(),
            cancel_requested: None,
            attempts,
        }
    }

    fn state_event(&self, i: usize, seq: u64, state: TaskState, wall: SystemTime) -> Record {
        let on_node = state != TaskState::Queued;
        let (node_id, node_name) = self.nodes[i % 2].clone();
        Record::Event(TaskEvent {
            task_id: self.id(i),
            seq,
            attempt: Attempt(u32::from(on_node)),
            time: wall,
            body: EventBody::State {
                state,
                node_id: on_node.then_some(node_id),
                node_name: on_node.then_some(node_name),
                reason: String::new(),
            },
        })
    }

    /// The next commit's records, or `None` after the last.
    pub fn next_commit(&mut self, out: &mut Vec<Record>) -> Option<usize> {
        let c = self.next;
        if c >= self.commits {
            return None;
        }
        self.next += 1;
        out.clear();
        let b = self.shape.batch;
        let n = self.shape.tasks;
        let wall = self.wall(c);
        // Submits, in id order.
        for i in (c * b).min(n)..((c + 1) * b).min(n) {
            self.specs[i] = Some(Arc::new(spec_of(i, self.shape.order)));
            out.push(Record::Task(self.record(i, TaskState::Queued, wall, wall)));
            out.push(self.state_event(i, 0, TaskState::Queued, wall));
        }
        if self.shape.submit_only {
            return Some(c);
        }
        // Assign, run and finish, in the progress order, each stage one
        // batch behind the one before it.
        for (stage, state) in [
            TaskState::Assigned,
            TaskState::Running,
            TaskState::Succeeded,
        ]
        .into_iter()
        .enumerate()
        {
            let Some(k) = c.checked_sub(self.lag + stage) else {
                continue;
            };
            for pos in (k * b).min(n)..((k + 1) * b).min(n) {
                let i = self.progress[pos] as usize;
                let submitted = self.wall(i / b);
                let record = self.record(i, state, wall, submitted);
                match state {
                    TaskState::Succeeded => {
                        out.push(Record::Task(record.clone()));
                        out.push(self.state_event(i, 3, state, wall));
                        out.push(Record::Event(TaskEvent {
                            task_id: record.id,
                            seq: 4,
                            attempt: Attempt(1),
                            time: wall,
                            body: EventBody::Finished(Arc::new(record)),
                        }));
                        self.specs[i] = None;
                    }
                    _ => {
                        out.push(Record::Task(record));
                        out.push(self.state_event(i, 1 + stage as u64, state, wall));
                    }
                }
            }
        }
        Some(c)
    }
}

/// A noop call's spec, with a priority in the shuffled order (the policy
/// mix sets one; in order it is left at the default).
fn spec_of(i: usize, order: Order) -> TaskSpec {
    let spec = TaskSpec::call("noop", i.to_string());
    match order {
        Order::InOrder => spec,
        Order::Shuffled => spec.priority(priority(i)),
    }
}
