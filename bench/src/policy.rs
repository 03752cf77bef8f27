//! The workflow and scheduling-policy figures (BENCHMARKS.md "Workflows and
//! scheduling policy"): the `policy-mix`, `dag` and `fairness` steps of
//! `weft bench`:
//! - [`interleaved_throughput`]: plain noop tasks beside noop tasks that use
//!   every policy field (priority, fair key, a concurrency key that never
//!   binds, a resource the nodes have plenty of), runs interleaved;
//! - [`dag_specs`] and [`dag_delays`]: a fan-out/join graph in one Submit,
//!   and the scheduling delay per level read from the tasks' attempt times;
//! - [`fairness`]: a late submitter's 100 tasks behind another's backlog,
//!   with and without fair keys, and the share of the cluster it got.
//!
//! The measuring is here, unit-tested on made-up records; the report
//! renders it.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};

use weft_client::{Client, Task, TaskId, TaskSpec, TaskState};
use weft_proto::OverLimit;

use crate::cluster::{Cluster, ClusterPlan};
use crate::report::{Dag, Fairness};
use crate::stats::median;
use crate::workload::{Meter, Metered, check_noop, noop, run_all};

/// The node resource every policy-mix task asks one unit of.
pub const RESOURCE: &str = "cpu";

/// What the bench's nodes declare of [`RESOURCE`]: far more than their
/// slots can ever hold, so the resource never binds.
pub const NODE_RESOURCE_AMOUNT: u64 = 1_000;

/// The `weft-node` flags that give a node [`RESOURCE`].
pub fn node_resource_args() -> Vec<String> {
    vec![
        "--resource".to_owned(),
        format!("{RESOURCE}={NODE_RESOURCE_AMOUNT}"),
    ]
}

/// Fair keys of the policy mix and their weights.
pub const FAIR_KEYS: [(&str, u32); 4] =
    [("team-a", 1), ("team-b", 2), ("team-c", 3), ("team-d", 4)];

/// Concurrency keys of the policy mix.
const CONCURRENCY_KEYS: [&str; 8] = [
    "bench-k0", "bench-k1", "bench-k2", "bench-k3", "bench-k4", "bench-k5", "bench-k6", "bench-k7",
];

/// The limit of every policy-mix concurrency key: above any run's size,
/// so the key is counted but never holds a task back.
pub const CONCURRENCY_MAX: u32 = 1_000_000;

/// A policy field the policy mix sets (`weft bench --mix`), so what each
/// one costs can be measured alone.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MixField {
    /// Priority 1 to 9 in turn.
    Priority,
    /// One of four fair keys (weights 1 to 4).
    FairKey,
    /// One of eight concurrency keys, each with a limit of 1,000,000 (it
    /// never binds).
    Concurrency,
    /// One unit of resource `cpu` (the bench's nodes declare 1,000).
    Resource,
    /// A fair key of its own per task (not in the default mix): a queue
    /// class per task, so the runs show what many classes cost, and the
    /// plain runs after them what the classes left behind cost.
    OwnFairKey,
}

impl MixField {
    /// Every field: the policy mix's default.
    pub const ALL: [MixField; 4] = [
        MixField::Priority,
        MixField::FairKey,
        MixField::Concurrency,
        MixField::Resource,
    ];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            MixField::Priority => "priority",
            MixField::FairKey => "fair key",
            MixField::Concurrency => "concurrency key",
            MixField::Resource => "resource",
            MixField::OwnFairKey => "a fair key per task",
        }
    }
}

/// How many [`MixField::OwnFairKey`] keys were made: the next one's number.
static OWN_KEYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The noop task carrying `x`, with the policy `fields` set: priority 1 to
/// 9 in turn, one of four fair keys (weights 1 to 4), one of eight
/// concurrency keys (limit [`CONCURRENCY_MAX`]), one unit of [`RESOURCE`];
/// or, with [`MixField::OwnFairKey`], a fair key no other task has.
pub fn mixed(x: usize, fields: &[MixField]) -> TaskSpec {
    let mut spec = noop(x);
    for field in fields {
        spec = match field {
            MixField::Priority => spec.priority(1 + (x % 9) as u8),
            MixField::FairKey => {
                let (key, weight) = FAIR_KEYS[x % FAIR_KEYS.len()];
                spec.fair_key(key, weight)
            }
            MixField::Concurrency => spec.concurrency(
                CONCURRENCY_KEYS[x % CONCURRENCY_KEYS.len()],
                CONCURRENCY_MAX,
                OverLimit::Queue,
            ),
            MixField::Resource => spec.resource(RESOURCE, 1),
            MixField::OwnFairKey => {
                let n = OWN_KEYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                spec.fair_key(format!("own-{n}"), 1)
            }
        };
    }
    spec
}

/// One interleaved pair of runs: tasks/s of plain noops, then of mixed
/// ones, each with what its meter saw (CPU of the client and the cluster).
#[derive(Debug, Clone, Copy)]
pub struct PairedRun {
    /// Plain noop tasks per second.
    pub plain_tps: f64,
    /// Policy-mix noop tasks per second.
    pub mixed_tps: f64,
    /// The plain run's meter.
    pub plain: Metered,
    /// The mixed run's meter.
    pub mixed: Metered,
}

/// `runs` × (submit `n` plain noops and wait; submit `n` mixed noops and
/// wait), alternating which goes first so neither always runs on a warmer
/// cluster; every result checked. `cluster_cpu` reads the cluster's CPU
/// seconds (`None` on an external cluster).
pub async fn interleaved_throughput(
    client: &Client,
    n: usize,
    runs: usize,
    concurrency: usize,
    fields: &[MixField],
    cluster_cpu: &dyn Fn() -> Option<f64>,
) -> anyhow::Result<Vec<PairedRun>> {
    let mut out = Vec::with_capacity(runs);
    for run in 0..runs {
        let mut plain = (0.0, Metered::default());
        let mut mix = (0.0, Metered::default());
        for first_mixed in [run % 2 == 1, run % 2 == 0] {
            let specs: Vec<TaskSpec> = (0..n)
                .map(|x| {
                    if first_mixed {
                        mixed(x, fields)
                    } else {
                        noop(x)
                    }
                })
                .collect();
            let meter = Meter::start(cluster_cpu());
            let tasks = run_all(client, specs, concurrency).await?;
            let metered = meter.stop(cluster_cpu());
            let tps = n as f64 / metered.wall.as_secs_f64();
            check_noop(&tasks, 0..n)?;
            if first_mixed {
                mix = (tps, metered);
            } else {
                plain = (tps, metered);
            }
        }
        out.push(PairedRun {
            plain_tps: plain.0,
            mixed_tps: mix.0,
            plain: plain.1,
            mixed: mix.1,
        });
    }
    Ok(out)
}

/// The ref of task `i` of level `level` (`l3-17`) and of a level's join (`j3`).
fn task_ref(level: usize, i: usize) -> String {
    format!("l{level}-{i}")
}

fn join_ref(level: usize) -> String {
    format!("j{level}")
}

/// A fan-out/join graph, in submission order: for each level, `width`
/// tasks (after the previous level's join, none for level 0) then the
/// level's join (after those `width`). Every task is `handler(input)`.
/// `levels × (width + 1)` tasks.
pub fn dag_specs(levels: usize, width: usize, handler: &str, input: &str) -> Vec<TaskSpec> {
    let mut specs = Vec::with_capacity(levels * (width + 1));
    for level in 0..levels {
        for i in 0..width {
            let mut spec = TaskSpec::call(handler, input.to_owned()).ref_name(task_ref(level, i));
            if level > 0 {
                spec = spec.after_ref(join_ref(level - 1));
            }
            specs.push(spec);
        }
        let mut join = TaskSpec::call(handler, input.to_owned()).ref_name(join_ref(level));
        for i in 0..width {
            join = join.after_ref(task_ref(level, i));
        }
        specs.push(join);
    }
    specs
}

/// The scheduling delays of one level of the graph.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelDelay {
    /// From the end of the previous join to the first start in this level
    /// (`None` for level 0, which waits on nothing).
    pub start_delay: Option<Duration>,
    /// From the last end in this level to the start of its join.
    pub join_delay: Duration,
    /// From the level's first start to its last end: the tasks' own work.
    pub level_run: Duration,
}

/// When a task's last attempt started and ended.
fn span(task: &Task) -> anyhow::Result<(SystemTime, SystemTime)> {
    let attempt = task
        .attempts
        .last()
        .with_context(|| format!("task {} has no attempt", task.id))?;
    let started = attempt
        .started_at
        .or(attempt.assigned_at)
        .with_context(|| format!("task {} never started", task.id))?;
    let ended = attempt
        .ended_at
        .with_context(|| format!("task {} has not ended", task.id))?;
    Ok((started, ended))
}

/// The gap from `a` to `b` (zero when `b` is not after `a`: both are
/// coordinator times of node reports, which come in batches).
fn gap(a: SystemTime, b: SystemTime) -> Duration {
    b.duration_since(a).unwrap_or_default()
}

/// The delays per level of a graph made by [`dag_specs`], from its final
/// tasks in submission order. Every task must have succeeded.
pub fn dag_delays(tasks: &[Task], levels: usize, width: usize) -> anyhow::Result<Vec<LevelDelay>> {
    ensure!(
        tasks.len() == levels * (width + 1),
        "{} tasks for a graph of {levels} × ({width} + 1)",
        tasks.len()
    );
    if let Some(bad) = tasks.iter().find(|t| t.state != TaskState::Succeeded) {
        bail!("task {} ended {} ({})", bad.id, bad.state, bad.error);
    }
    let mut out = Vec::with_capacity(levels);
    let mut previous_join_end: Option<SystemTime> = None;
    for level in tasks.chunks(width + 1) {
        let (members, join) = level.split_at(width);
        let spans = members
            .iter()
            .map(span)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let first_start = spans.iter().map(|s| s.0).min().context("an empty level")?;
        let last_end = spans.iter().map(|s| s.1).max().context("an empty level")?;
        let (join_start, join_end) = span(&join[0])?;
        out.push(LevelDelay {
            start_delay: previous_join_end.map(|end| gap(end, first_start)),
            join_delay: gap(last_end, join_start),
            level_run: gap(first_start, last_end),
        });
        previous_join_end = Some(join_end);
    }
    Ok(out)
}

/// Median and max of some durations, in milliseconds.
pub fn median_max_ms(values: impl Iterator<Item = Duration>) -> Option<(f64, f64)> {
    let ms: Vec<f64> = values.map(|d| d.as_secs_f64() * 1e3).collect();
    let max = ms
        .iter()
        .copied()
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))?;
    Some((median(&ms)?, max))
}

/// The result of one fairness run.
#[derive(Debug, Clone, Copy)]
pub struct FairShare {
    /// Seconds to submit the backlog.
    pub backlog_submit_s: f64,
    /// Seconds from the late submitter's Submit to its last task's end.
    pub late_finish_s: f64,
    /// The late submitter's tasks among all tasks the coordinator assigned
    /// while it had work queued (from its tasks' queueing, on the
    /// coordinator's clock, to its last task's assignment).
    pub late_share: f64,
    /// Backlog tasks assigned in that window.
    pub backlog_in_window: usize,
    /// Seconds the whole backlog took to drain.
    pub backlog_drain_s: f64,
}

/// How many of the backlog's tasks the coordinator assigned while the late
/// submitter had work queued: from its tasks' queueing (their `created_at`,
/// the coordinator's time of the Submit's commit) to its last assignment.
/// The window starts on the coordinator's clock, not at the Submit's
/// answer: the coordinator goes on assigning (the late tasks too) while
/// the answer travels, and on a busy host the late tasks can all be
/// assigned before it arrives, which would leave the window empty.
fn backlog_in_window(backlog: &[Task], late: &[Task]) -> anyhow::Result<usize> {
    let assigned = |t: &Task| t.attempts.last().and_then(|a| a.assigned_at);
    let queued = late
        .iter()
        .filter_map(|t| t.created_at)
        .min()
        .context("no late task has a submission time")?;
    let last = late
        .iter()
        .filter_map(assigned)
        .max()
        .context("no late task was assigned")?;
    // What the scheduler chose once both had work queued: assignments
    // (a node's prefetched work started later is not a choice made then).
    Ok(backlog
        .iter()
        .filter_map(assigned)
        .filter(|at| *at >= queued && *at <= last)
        .count())
}

/// Two submitters at equal priority: A queues `backlog` noops, then B
/// submits `late` noops; with `fair`, A and B use fair keys `a` and `b`
/// (equal weights), else neither has one (first in, first out). Waits for
/// all, and measures B's time to finish and B's share of the tasks
/// started while B had work.
pub async fn fairness(
    client: &Client,
    backlog: usize,
    late: usize,
    fair: bool,
    concurrency: usize,
) -> anyhow::Result<FairShare> {
    let key = |spec: TaskSpec, key: &str| if fair { spec.fair_key(key, 1) } else { spec };
    let a_specs: Vec<TaskSpec> = (0..backlog).map(|x| key(noop(x), "a")).collect();
    let b_specs: Vec<TaskSpec> = (0..late).map(|x| key(noop(x), "b")).collect();
    let t0 = Instant::now();
    let a_ids = client
        .submit_many(a_specs)
        .await
        .context("submitting the backlog")?;
    let backlog_submit_s = t0.elapsed().as_secs_f64();
    let b_submitted = SystemTime::now();
    let b_ids = client
        .submit_many(b_specs)
        .await
        .context("submitting the late tasks")?;
    let b_tasks = wait_all(client, b_ids, concurrency).await?;
    let a_tasks = wait_all(client, a_ids, concurrency).await?;
    let b_spans = b_tasks
        .iter()
        .map(span)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let b_end = b_spans.iter().map(|s| s.1).max().context("no late task")?;
    let a_spans = a_tasks
        .iter()
        .map(span)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let in_window = backlog_in_window(&a_tasks, &b_tasks)?;
    let a_first = a_spans
        .iter()
        .map(|s| s.0)
        .min()
        .context("no backlog task")?;
    let a_last = a_spans
        .iter()
        .map(|s| s.1)
        .max()
        .context("no backlog task")?;
    Ok(FairShare {
        backlog_submit_s,
        late_finish_s: gap(b_submitted, b_end).as_secs_f64(),
        late_share: late as f64 / (late + in_window) as f64,
        backlog_in_window: in_window,
        backlog_drain_s: gap(a_first, a_last).as_secs_f64(),
    })
}

/// Nodes and slots per node of the dag step's cluster: 16 slots, so a
/// level's 100 tasks run about 7 deep.
const DAG_NODES: usize = 2;
const DAG_SLOTS: u32 = 8;

/// What every task of the dag step runs.
const DAG_HANDLER: &str = "sleep";
const DAG_INPUT: &str = "5ms";

/// The dag step: a fresh cluster of [`DAG_NODES`] × [`DAG_SLOTS`], a warm-up,
/// then the graph of [`dag_specs`] (`sleep 5ms` tasks) in one Submit.
pub async fn dag(base: &ClusterPlan, levels: usize, width: usize) -> anyhow::Result<Dag> {
    let plan = ClusterPlan {
        nodes: DAG_NODES,
        slots: DAG_SLOTS,
        ..base.clone()
    };
    let cluster = Cluster::start(&plan).await?;
    let result = async {
        let client = cluster.client().await?;
        weft_cluster::wait_nodes_ready(&client, DAG_NODES, crate::own_processes::READY_TIMEOUT)
            .await?;
        let warm = (0..200).map(noop).collect();
        run_all(&client, warm, 64).await?;
        let specs = dag_specs(levels, width, DAG_HANDLER, DAG_INPUT);
        let t0 = Instant::now();
        let ids = client
            .submit_graph(specs)
            .await
            .context("submitting the graph")?
            .task_ids;
        let submit_s = t0.elapsed().as_secs_f64();
        let tasks = crate::workload::wait_ids(&client, ids, 64).await?;
        let wall_s = t0.elapsed().as_secs_f64();
        anyhow::Ok(Dag {
            levels,
            width,
            task: format!("{DAG_HANDLER} {DAG_INPUT}"),
            slots: DAG_NODES as u32 * DAG_SLOTS,
            submit_s,
            wall_s,
            delays: dag_delays(&tasks, levels, width)?,
        })
    }
    .await;
    cluster.stop().await;
    result
}

/// The fairness step: [`fairness`] with fair keys, then without, each on a
/// fresh cluster of the protocol's shape (two one-slot nodes).
pub async fn fairness_step(
    base: &ClusterPlan,
    backlog: usize,
    late: usize,
) -> anyhow::Result<Fairness> {
    let mut runs = Vec::with_capacity(2);
    for fair in [true, false] {
        let plan = ClusterPlan {
            nodes: 2,
            slots: 1,
            ..base.clone()
        };
        let cluster = Cluster::start(&plan).await?;
        let result = async {
            let client = cluster.client().await?;
            weft_cluster::wait_nodes_ready(&client, 2, crate::own_processes::READY_TIMEOUT).await?;
            fairness(&client, backlog, late, fair, 256).await
        }
        .await;
        cluster.stop().await;
        runs.push(result?);
    }
    Ok(Fairness {
        backlog,
        late,
        fair: runs[0],
        fifo: runs[1],
    })
}

/// Waits for `ids` through `run_all`'s waiting (`WaitMany` per chunk).
async fn wait_all(
    client: &Client,
    ids: Vec<TaskId>,
    concurrency: usize,
) -> anyhow::Result<Vec<Task>> {
    crate::workload::wait_ids(client, ids, concurrency).await
}

#[cfg(test)]
mod tests {
    use super::*;

    use weft_client::TaskAttempt;
    use weft_proto::Attempt;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn done(start: u64, end: u64) -> Task {
        Task {
            id: TaskId::new(),
            spec: None,
            state: TaskState::Succeeded,
            attempt: Attempt(1),
            node_id: None,
            node_name: None,
            exit_code: None,
            output: Default::default(),
            error: String::new(),
            pending_reason: String::new(),
            job_id: None,
            waiting_for: Vec::new(),
            failures: 0,
            node_losses: 0,
            created_at: None,
            updated_at: None,
            next_seq: 0,
            last_outcome: None,
            attempts: vec![TaskAttempt {
                number: Attempt(1),
                node_id: None,
                node_name: String::new(),
                assigned_at: Some(at(start)),
                started_at: Some(at(start)),
                ended_at: Some(at(end)),
                outcome: None,
                exit_code: None,
                reason: String::new(),
            }],
        }
    }

    fn queued_at(mut task: Task, ms: u64) -> Task {
        task.created_at = Some(at(ms));
        task
    }

    #[test]
    fn the_fairness_window_opens_when_the_late_tasks_are_queued() {
        // B queued at 100 and assigned at 100..=103; A assigned at 99
        // (before), 100, 102 (inside) and 104 (after). The Submit's answer
        // reaching the client at 105 must not empty the window.
        let late: Vec<Task> = (100..=103)
            .map(|ms| queued_at(done(ms, ms + 1), 100))
            .collect();
        let backlog: Vec<Task> = [99, 100, 102, 104]
            .into_iter()
            .map(|ms| done(ms, ms + 1))
            .collect();
        assert_eq!(backlog_in_window(&backlog, &late).unwrap(), 2);
        assert!(backlog_in_window(&backlog, &[done(1, 2)]).is_err());
    }

    #[test]
    fn a_graph_is_levels_of_tasks_each_closed_by_a_join() {
        let specs = dag_specs(3, 4, "noop", "");
        assert_eq!(specs.len(), 15);
        assert!(specs[0].after.is_empty());
        assert_eq!(specs[4].ref_name, "j0");
        assert_eq!(specs[4].after.len(), 4);
        assert_eq!(
            specs[5].after,
            vec![weft_proto::Dependency::Ref("j0".into())]
        );
    }

    #[test]
    fn level_delays_are_the_gaps_around_each_join() {
        // Level 0: tasks 0-10 and 2-12, join 15-16; level 1: 19-25, 20-30, join 31-32.
        let tasks = vec![
            done(0, 10),
            done(2, 12),
            done(15, 16),
            done(19, 25),
            done(20, 30),
            done(31, 32),
        ];
        let delays = dag_delays(&tasks, 2, 2).unwrap();
        assert_eq!(delays[0].start_delay, None);
        assert_eq!(delays[0].join_delay, Duration::from_millis(3));
        assert_eq!(delays[0].level_run, Duration::from_millis(12));
        assert_eq!(delays[1].start_delay, Some(Duration::from_millis(3)));
        assert_eq!(delays[1].join_delay, Duration::from_millis(1));
        let (median, max) = median_max_ms(delays.iter().map(|d| d.join_delay)).unwrap();
        assert!(max >= median && (max - 3.0).abs() < 1e-9);
    }

    #[test]
    fn a_failed_task_spoils_the_graph_figure() {
        let mut tasks = vec![done(0, 1), done(1, 2)];
        tasks[0].state = TaskState::Failed;
        assert!(dag_delays(&tasks, 1, 1).is_err());
    }

    #[test]
    fn the_mix_uses_every_policy_field_and_every_priority() {
        let priorities: std::collections::BTreeSet<u8> =
            (0..9).map(|x| mixed(x, &MixField::ALL).priority).collect();
        assert_eq!(priorities.len(), 9);
        let spec = mixed(5, &MixField::ALL);
        assert!(!spec.fair_key.is_empty());
        assert_eq!(
            spec.concurrency.as_ref().map(|c| c.max_running),
            Some(CONCURRENCY_MAX)
        );
        assert_eq!(spec.resources.get(RESOURCE), Some(&1));
    }

    #[test]
    fn own_fair_keys_differ_for_every_task() {
        let keys: std::collections::BTreeSet<String> = (0..100)
            .map(|x| mixed(x % 3, &[MixField::OwnFairKey]).fair_key)
            .collect();
        assert_eq!(keys.len(), 100);
    }
}
