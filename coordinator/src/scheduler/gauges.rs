//! What the scheduler counts, read in one go for the metrics: the driver
//! copies it into the metrics' atomics once per batch, so a scrape never
//! reaches into the scheduler and nothing is counted a second time.
//!
//! A plain read: no allocation, a walk over the connected nodes and over
//! the head of each class's ready queue (the same heads dispatch looks at).

use std::time::{Instant, SystemTime};

use weft_proto::TaskState;

use super::Scheduler;
use super::policy::Bucket;
use super::task::state_index;

/// How far into a class's ready queue [`Scheduler::gauges`] looks past
/// entries left behind by cancelled tasks (dispatch drops them later).
const STALE_HEADS: usize = 8;

/// The scheduler's counts at one moment. See the module docs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gauges {
    /// Tasks per state, in `TaskState::ALL` order.
    pub tasks: [u64; weft_proto::TASK_STATES],
    /// Submit time of the oldest task in a ready queue.
    pub oldest_ready: Option<SystemTime>,
    /// Connected nodes not draining.
    pub nodes_ready: u32,
    /// Connected nodes draining.
    pub nodes_draining: u32,
    /// Nodes whose stream ended, within their reconnect grace.
    pub nodes_disconnected: u32,
    /// Slots the connected nodes declared.
    pub slots: u32,
    /// Slots taken by assigned or running attempts (per node at most its
    /// slots).
    pub slots_used: u32,
    /// Free slots, as `ClusterInfo` counts them.
    pub slots_free: u32,
    /// See `ClusterStats`.
    pub node_losses: u64,
    /// See `ClusterStats`.
    pub stale_events_refused: u64,
    /// See `ClusterStats`.
    pub attempts_not_started: u64,
    /// See `ClusterStats`.
    pub reclaimed_attempts: u64,
    /// See `ClusterStats`.
    pub recovered_attempts: u64,
    /// See `ClusterStats`.
    pub revoked_node_refusals: u64,
    /// See `ClusterStats`.
    pub output_chunks_missed: u64,
    /// Cron schedule fires that submitted a task, since start.
    pub schedule_fires: u64,
    /// Cron schedule fires skipped (overlap SKIP, a full queue), since start.
    pub schedule_skips: u64,
    /// Ready tasks by priority and what holds ready tasks back
    /// (`metrics/policy.rs`).
    pub policy: crate::metrics::PolicyGauges,
}

impl Scheduler {
    /// The counts the metrics show. See the module docs.
    pub fn gauges(&self, now: Instant) -> Gauges {
        let mut gauges = Gauges {
            tasks: self.counts,
            node_losses: self.nodes_lost,
            stale_events_refused: self.stale_events_refused,
            attempts_not_started: self.attempts_not_started,
            reclaimed_attempts: self.reclaimed_attempts,
            recovered_attempts: self.recovered_attempts,
            revoked_node_refusals: self.revoked_node_refusals,
            output_chunks_missed: self.output_chunks_missed,
            schedule_fires: self.schedules.fires,
            schedule_skips: self.schedules.skips,
            nodes_disconnected: u32::try_from(self.disconnected.len()).unwrap_or(u32::MAX),
            ..Gauges::default()
        };
        for node in self.nodes.values() {
            match node.draining {
                true => gauges.nodes_draining += 1,
                false => gauges.nodes_ready += 1,
            }
            gauges.slots = gauges.slots.saturating_add(node.slots);
            gauges.slots_used = gauges.slots_used.saturating_add(node.used.min(node.slots));
            gauges.slots_free = gauges.slots_free.saturating_add(node.free_slots());
        }
        if self.counts[state_index(TaskState::Queued)] > 0 {
            self.policy_gauges(now, &mut gauges.policy);
        }
        if self.counts[state_index(TaskState::Queued)] > 0 {
            gauges.oldest_ready = self
                .queue
                .active()
                .map(|c| &self.queue.classes[c as usize])
                .filter_map(|class| {
                    class
                        .ready
                        .iter()
                        .take(STALE_HEADS)
                        .filter_map(|id| self.tasks.get(id))
                        .find(|t| t.state == TaskState::Queued && !t.delayed)
                        .map(|t| t.created_at())
                })
                .min();
        }
        gauges
    }

    /// Ready tasks per priority and what holds them back, per class (its
    /// ready queue's length: a cancelled task's entry counts until
    /// dispatch drops it): no allocation, one pass over the active classes, and
    /// over the connected nodes only for a class that asks for resources
    /// and only until one node has them free.
    fn policy_gauges(&self, now: Instant, out: &mut crate::metrics::PolicyGauges) {
        let policy = &self.queue.policy;
        for c in self.queue.active() {
            let class = &self.queue.classes[c as usize];
            let ready = class.ready.len() as u64;
            if ready == 0 {
                continue;
            }
            let cp = class.policy;
            out.count_ready(cp.priority, ready);
            if cp.plain {
                continue;
            }
            if let Some((key, _)) = cp.conc
                && policy.conc.get(key as usize).is_some_and(|k| !k.has_room())
            {
                out.waiting_concurrency += ready;
            }
            let spec = &class.example;
            if spec.rate_limits.iter().any(|used| {
                policy
                    .rates
                    .get(&used.name)
                    .is_none_or(|bucket| tokens_at(bucket, now) < f64::from(used.units.max(1)))
            }) {
                out.waiting_rate_limit += ready;
            }
            if !spec.resources.is_empty()
                && !self.nodes.values().any(|node| node.resources_fit(spec))
            {
                out.waiting_resources += ready;
            }
        }
    }

    /// Whole tokens in every rate limit's bucket at `now`, by name (for the
    /// metrics; no allocation).
    pub fn rate_tokens(&self, now: Instant) -> impl Iterator<Item = (&str, u64)> {
        self.queue.policy.rates.iter().map(move |(name, bucket)| {
            (
                name.as_str(),
                tokens_at(bucket, now).max(0.0).floor() as u64,
            )
        })
    }
}

/// The tokens in `bucket` at `now`, as `limits` reads them: a bucket is
/// refilled only when dispatch asks it for tokens, so its stored count is
/// as of that refill and a drained bucket no task asks again would read
/// empty for ever.
fn tokens_at(bucket: &Bucket, now: Instant) -> f64 {
    let mut bucket = bucket.clone();
    bucket.refill(now);
    bucket.tokens
}
