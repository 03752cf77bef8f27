//! The coordinator's Prometheus metrics: one `prometheus-client`
//! [`Registry`] and every metric in it, written out as OpenMetrics text by
//! [`Metrics::encode`] (the HTTP listener serves that at `/metrics`).
//!
//! Three kinds of source, so that nothing is counted twice and the hot path
//! pays no lock and no allocation per task:
//! - what the scheduler already counts (tasks per state, nodes, slots,
//!   node losses, stale events) is copied by the driver into plain atomics
//!   ONCE PER BATCH ([`Metrics::set_gauges`]) and read at scrape time;
//! - what is per task by nature (submit→start, run time, how tasks end,
//!   retries) the scheduler observes as it happens into [`TaskMetrics`]
//!   (relaxed atomic adds);
//! - what happens at an edge (a store commit, a submit request, a watch
//!   stream opened or closed) is observed there, once per commit, request
//!   or stream.
//!
//! Labels come only from small fixed sets (state, kind, reason, rpc, node
//! state): never task ids or node names. Every metric is listed with its
//! meaning in the README's "Metrics" section; keep the two in step.
//!
//! This module decides nothing and does no I/O.

mod histogram;
mod policy;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use weft_proto::{TASK_STATES, TaskKind, TaskState};

use crate::scheduler::Gauges;
pub use histogram::Histogram;
pub use policy::{PRIORITIES, PolicyGauges};

/// Task kinds, as the `kind` label says them; indexes of per-kind arrays.
const KINDS: [&str; 2] = ["exec", "call"];

fn kind_index(kind: &TaskKind) -> usize {
    match kind {
        TaskKind::Exec(_) => 0,
        TaskKind::Call(_) => 1,
    }
}

fn state_index(state: TaskState) -> usize {
    TaskState::ALL.iter().position(|s| *s == state).unwrap_or(0)
}

/// Why a task was requeued as its next attempt (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Its attempt failed; retried after the backoff.
    Failed,
    /// Its attempt was lost with its node, handed back unstarted, or
    /// cancelled by a draining node; retried at once.
    Node,
}

const RETRY_REASONS: [&str; 2] = ["failed", "node"];

/// Which stream an open watcher is (the `rpc` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchRpc {
    /// `Watch`.
    Watch,
    /// `Run` (submit, then watch).
    Run,
    /// `WaitMany` and `WaitManyBatches`.
    WaitMany,
}

const STREAMS: [&str; 3] = ["watch", "run", "wait_many"];

/// What the scheduler observes per task as it happens: relaxed atomics,
/// no lock, no allocation.
#[derive(Debug)]
pub struct TaskMetrics {
    /// From submit to the task's first start (of whichever attempt).
    pub submit_to_start: Histogram,
    /// From an attempt's start to its end, as its node reported it.
    pub run: Histogram,
    /// Tasks that reached a final state, by kind and state.
    finished: [[AtomicU64; TASK_STATES]; 2],
    /// Tasks requeued as a next attempt, by [`Retry`].
    retries: [AtomicU64; 2],
}

impl Default for TaskMetrics {
    fn default() -> Self {
        TaskMetrics {
            submit_to_start: Histogram::seconds(histogram::LATENCY_SECONDS),
            run: Histogram::seconds(histogram::RUN_SECONDS),
            finished: Default::default(),
            retries: Default::default(),
        }
    }
}

impl TaskMetrics {
    /// A task of `kind` ended in final `state`.
    pub fn finished(&self, kind: &TaskKind, state: TaskState) {
        self.finished[kind_index(kind)][state_index(state)].fetch_add(1, Ordering::Relaxed);
    }

    /// A task was requeued as its next attempt.
    pub fn retried(&self, why: Retry) {
        self.retries[why as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The scheduler's own counts, as of the driver's last batch.
#[derive(Debug, Default)]
struct SchedulerGauges {
    tasks: [AtomicU64; TASK_STATES],
    /// Submit time of the oldest ready task, ns since the Unix epoch (0:
    /// none waits).
    oldest_ready: AtomicU64,
    nodes: [AtomicU64; 3],
    slots: AtomicU64,
    slots_used: AtomicU64,
    slots_free: AtomicU64,
    node_losses: AtomicU64,
    stale_events_refused: AtomicU64,
    attempts_not_started: AtomicU64,
    reclaimed_attempts: AtomicU64,
    recovered_attempts: AtomicU64,
    revoked_node_refusals: AtomicU64,
    output_chunks_missed: AtomicU64,
    schedule_fires: AtomicU64,
    schedule_skips: AtomicU64,
}

/// What the edges observe: commits, submits, watch streams.
#[derive(Debug)]
struct EdgeMetrics {
    commit_seconds: Histogram,
    commit_records: Histogram,
    submit_requests: AtomicU64,
    submitted_tasks: AtomicU64,
    submit_bytes: Histogram,
    submit_tasks: Histogram,
    streams: [AtomicI64; 3],
}

/// Everything the collector writes out at scrape time.
#[derive(Debug)]
struct Shared {
    started: Instant,
    gauges: SchedulerGauges,
    tasks: Arc<TaskMetrics>,
    edge: EdgeMetrics,
    policy: policy::PolicyMetrics,
}

/// The coordinator's metrics. See the module docs.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    shared: Arc<Shared>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(Arc::new(TaskMetrics::default()))
    }
}

impl Metrics {
    /// The registry, with `tasks` (what the scheduler observes into).
    pub fn new(tasks: Arc<TaskMetrics>) -> Self {
        let shared = Arc::new(Shared {
            started: Instant::now(),
            gauges: SchedulerGauges::default(),
            tasks,
            policy: policy::PolicyMetrics::default(),
            edge: EdgeMetrics {
                commit_seconds: Histogram::seconds(histogram::LATENCY_SECONDS),
                commit_records: Histogram::counts(histogram::COUNTS),
                submit_requests: AtomicU64::new(0),
                submitted_tasks: AtomicU64::new(0),
                submit_bytes: Histogram::counts(histogram::BYTES),
                submit_tasks: Histogram::counts(histogram::COUNTS),
                streams: Default::default(),
            },
        });
        let mut registry = Registry::default();
        registry.register(
            "weft_build",
            "The coordinator's version (always 1)",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(Collect(Arc::clone(&shared))));
        Metrics { registry, shared }
    }

    /// The metrics as OpenMetrics text, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail, and every metric's encoding is
        // ours: an error here is a bug, shown in the text rather than hidden.
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            text.push_str(&format!("# encoding failed: {err}\n# EOF\n"));
        }
        text
    }

    /// What the scheduler observes per task.
    pub fn tasks(&self) -> &Arc<TaskMetrics> {
        &self.shared.tasks
    }

    /// The scheduler's counts as of the batch just applied (the driver
    /// calls this once per batch).
    pub(crate) fn set_gauges(&self, now: &Gauges) {
        let g = &self.shared.gauges;
        for (slot, value) in g.tasks.iter().zip(now.tasks) {
            slot.store(value, Ordering::Relaxed);
        }
        let oldest = now.oldest_ready.map_or(0, |at| {
            let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX).max(1)
        });
        g.oldest_ready.store(oldest, Ordering::Relaxed);
        let nodes = [now.nodes_ready, now.nodes_draining, now.nodes_disconnected];
        for (slot, value) in g.nodes.iter().zip(nodes) {
            slot.store(u64::from(value), Ordering::Relaxed);
        }
        let set = |slot: &AtomicU64, value: u64| slot.store(value, Ordering::Relaxed);
        set(&g.slots, u64::from(now.slots));
        set(&g.slots_used, u64::from(now.slots_used));
        set(&g.slots_free, u64::from(now.slots_free));
        set(&g.node_losses, now.node_losses);
        set(&g.stale_events_refused, now.stale_events_refused);
        set(&g.attempts_not_started, now.attempts_not_started);
        set(&g.reclaimed_attempts, now.reclaimed_attempts);
        set(&g.recovered_attempts, now.recovered_attempts);
        set(&g.revoked_node_refusals, now.revoked_node_refusals);
        set(&g.output_chunks_missed, now.output_chunks_missed);
        set(&g.schedule_fires, now.schedule_fires);
        set(&g.schedule_skips, now.schedule_skips);
        self.shared.policy.set(&now.policy);
    }

    /// The whole tokens in every rate limit's bucket now, as `(name,
    /// tokens)` (the driver calls this once per batch; no allocation while
    /// the set of limits stays the same).
    pub fn set_rate_tokens<'a>(&self, limits: impl Iterator<Item = (&'a str, u64)>) {
        self.shared.policy.set_rate_tokens(limits);
    }

    /// One store commit of `records` records took `took`.
    pub(crate) fn observe_commit(&self, records: usize, took: Duration) {
        let edge = &self.shared.edge;
        edge.commit_seconds.observe_duration(took);
        edge.commit_records
            .observe(u64::try_from(records).unwrap_or(u64::MAX));
    }

    /// A `Submit` (or `Run`) request of `bytes` bytes carrying `tasks`
    /// specs arrived.
    pub(crate) fn observe_submit(&self, tasks: usize, bytes: usize) {
        let edge = &self.shared.edge;
        let tasks = u64::try_from(tasks).unwrap_or(u64::MAX);
        edge.submit_requests.fetch_add(1, Ordering::Relaxed);
        edge.submitted_tasks.fetch_add(tasks, Ordering::Relaxed);
        edge.submit_tasks.observe(tasks);
        edge.submit_bytes
            .observe(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    /// Counts an open watch stream until the guard is dropped.
    pub(crate) fn open_stream(self: &Arc<Self>, rpc: WatchRpc) -> OpenStream {
        self.shared.edge.streams[rpc as usize].fetch_add(1, Ordering::Relaxed);
        OpenStream {
            shared: Arc::clone(&self.shared),
            rpc,
        }
    }
}

/// One open watch stream, counted in `weft_watch_streams` while it lives.
#[derive(Debug)]
pub(crate) struct OpenStream {
    shared: Arc<Shared>,
    rpc: WatchRpc,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.shared.edge.streams[self.rpc as usize].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Writes [`Shared`] out at each scrape.
#[derive(Debug)]
struct Collect(Arc<Shared>);

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: impl prometheus_client::encoding::EncodeGaugeValue,
) -> std::fmt::Result {
    encoder
        .encode_descriptor(name, help, unit, MetricType::Gauge)?
        .encode_gauge(&value)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: &Histogram,
) -> std::fmt::Result {
    value.encode(encoder.encode_descriptor(name, help, unit, MetricType::Histogram)?)
}

fn load(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

impl Collector for Collect {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let Shared {
            started,
            gauges: g,
            tasks,
            edge,
            policy,
        } = &*self.0;
        let seconds = Some(&Unit::Seconds);
        let bytes = Some(&Unit::Bytes);

        gauge(
            &mut e,
            "weft_uptime",
            "Time since the coordinator started",
            seconds,
            started.elapsed().as_secs_f64(),
        )?;

        // Tasks and the queue.
        {
            let mut family = e.encode_descriptor(
                "weft_tasks",
                "Tasks in each state: queued, assigned and running are live; final states count the tasks the store keeps (within retention)",
                None,
                MetricType::Gauge
            )?;
            for (state, count) in TaskState::ALL.iter().zip(&g.tasks) {
                family
                    .encode_family(&[("state", state.as_str())])?
                    .encode_gauge(&load(count))?;
            }
        }
        let oldest = load(&g.oldest_ready);
        let age = match oldest {
            0 => 0.0,
            at => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos();
                (now.saturating_sub(u128::from(at)) as f64) / 1e9
            }
        };
        gauge(
            &mut e,
            "weft_queue_oldest_age",
            "Age (since submit) of the oldest task waiting in a ready queue; 0 when none waits. Retries waiting out their backoff are not counted",
            seconds,
            age,
        )?;
        histogram(
            &mut e,
            "weft_task_submit_to_start",
            "Time from a task's submit to the start of its first attempt on a node",
            seconds,
            &tasks.submit_to_start,
        )?;
        histogram(
            &mut e,
            "weft_attempt_run",
            "Run time of attempts, from their start to the end their node reported",
            seconds,
            &tasks.run,
        )?;
        {
            let mut family = e.encode_descriptor(
                "weft_tasks_finished",
                "Tasks that reached a final state, by kind (exec, call) and state",
                None,
                MetricType::Counter,
            )?;
            for (kind, states) in KINDS.iter().zip(&tasks.finished) {
                for (state, count) in TaskState::ALL.iter().zip(states) {
                    if !state.is_final() {
                        continue;
                    }
                    family
                        .encode_family(&[("kind", *kind), ("state", state.as_str())])?
                        .encode_counter::<NoLabelSet, _, u64>(&load(count), None)?;
                }
            }
        }
        {
            let mut family = e.encode_descriptor(
                "weft_task_retries",
                "Tasks requeued as a next attempt: after a failure (reason=failed, after the backoff) or a node's doing (reason=node: lost with its node, handed back unstarted, cancelled by a draining node)",
                None,
                MetricType::Counter
            )?;
            for (reason, count) in RETRY_REASONS.iter().zip(&tasks.retries) {
                family
                    .encode_family(&[("reason", *reason)])?
                    .encode_counter::<NoLabelSet, _, u64>(&load(count), None)?;
            }
        }

        // Workflows and scheduling policy.
        policy.encode(&mut e)?;

        // Nodes and slots.
        {
            let mut family = e.encode_descriptor(
                "weft_nodes",
                "Nodes by state: ready (connected), draining (connected), disconnected (stream ended; within the reconnect grace, holding attempts)",
                None,
                MetricType::Gauge
            )?;
            for (state, count) in ["ready", "draining", "disconnected"].iter().zip(&g.nodes) {
                family
                    .encode_family(&[("state", *state)])?
                    .encode_gauge(&load(count))?;
            }
        }
        gauge(
            &mut e,
            "weft_slots",
            "Slots the connected nodes declared",
            None,
            load(&g.slots),
        )?;
        gauge(
            &mut e,
            "weft_slots_used",
            "Slots taken by attempts assigned or running (per node at most its slots; prefetched work not counted beyond them)",
            None,
            load(&g.slots_used),
        )?;
        gauge(
            &mut e,
            "weft_slots_free",
            "Free slots: per node, its granted credits up to its slots not in use (what `weft info` shows)",
            None,
            load(&g.slots_free),
        )?;
        counter(
            &mut e,
            "weft_node_losses",
            "Nodes declared lost (silent past the heartbeat timeout, stuck, or not back within the reconnect grace)",
            load(&g.node_losses),
        )?;
        counter(
            &mut e,
            "weft_stale_events_refused",
            "Node events refused by fencing (an attempt that is not the task's current one on that node)",
            load(&g.stale_events_refused),
        )?;
        counter(
            &mut e,
            "weft_attempts_not_started",
            "Attempts taken back because their node had not started them within the start timeout",
            load(&g.attempts_not_started),
        )?;
        counter(
            &mut e,
            "weft_attempts_reclaimed",
            "Attempts a node came back and claimed after its stream ended (they carried on instead of running again)",
            load(&g.reclaimed_attempts),
        )?;
        counter(
            &mut e,
            "weft_attempts_recovered",
            "Attempts restored from the store at start that their node came back and claimed",
            load(&g.recovered_attempts),
        )?;
        counter(
            &mut e,
            "weft_revoked_node_refusals",
            "Registers and events from revoked nodes refused",
            load(&g.revoked_node_refusals),
        )?;
        counter(
            &mut e,
            "weft_output_chunks_missed",
            "Output chunks that never arrived (a later chunk of the same attempt did)",
            load(&g.output_chunks_missed),
        )?;
        counter(
            &mut e,
            "weft_schedule_fires",
            "Cron schedule fires that submitted a task, since the coordinator started",
            load(&g.schedule_fires),
        )?;
        counter(
            &mut e,
            "weft_schedule_skips",
            "Cron schedule fires skipped (overlap SKIP, or a full queue), since the coordinator started",
            load(&g.schedule_skips),
        )?;

        // The store and the API.
        histogram(
            &mut e,
            "weft_store_commit",
            "Time of one group commit (one per driver batch with something to write; an fsync with the durable store)",
            seconds,
            &edge.commit_seconds,
        )?;
        histogram(
            &mut e,
            "weft_store_commit_records",
            "Records (task records and events) written per group commit",
            None,
            &edge.commit_records,
        )?;
        counter(
            &mut e,
            "weft_submit_requests",
            "Submit and Run requests that reached the driver (valid specs)",
            load(&edge.submit_requests),
        )?;
        counter(
            &mut e,
            "weft_submitted_tasks",
            "Task specs in those requests",
            load(&edge.submitted_tasks),
        )?;
        histogram(
            &mut e,
            "weft_submit_request_size",
            "Size of each Submit or Run request, as encoded on the wire",
            bytes,
            &edge.submit_bytes,
        )?;
        histogram(
            &mut e,
            "weft_submit_request_tasks",
            "Task specs per Submit or Run request",
            None,
            &edge.submit_tasks,
        )?;
        {
            let mut family = e.encode_descriptor(
                "weft_watch_streams",
                "Open Watch, Run and WaitMany (and WaitManyBatches) streams, by rpc",
                None,
                MetricType::Gauge,
            )?;
            for (rpc, count) in STREAMS.iter().zip(&edge.streams) {
                family
                    .encode_family(&[("rpc", *rpc)])?
                    .encode_gauge(&count.load(Ordering::Relaxed))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
