//! What the scheduler counts, read in one go for the metrics: the driver
//! copies it into the metrics' atomics once per batch, so a scrape never
//! reaches into the scheduler and nothing is counted a second time.
//!
//! A plain read: no allocation, a walk over the connected nodes and over
//! the head of each class's ready queue (the same heads dispatch looks at).

use std::time::SystemTime;

use weft_proto::TaskState;

use super::Scheduler;
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
    /// Ready tasks by priority and what holds ready tasks back
    /// (`metrics/policy.rs`).
    pub policy: crate::metrics::PolicyGauges,
}

impl Scheduler {
    /// The counts the metrics show. See the module docs.
    pub fn gauges(&self) -> Gauges {
        let mut gauges = Gauges {
            tasks: self.counts,
            node_losses: self.nodes_lost,
            stale_events_refused: self.stale_events_refused,
            attempts_not_started: self.attempts_not_started,
            reclaimed_attempts: self.reclaimed_attempts,
            recovered_attempts: self.recovered_attempts,
            revoked_node_refusals: self.revoked_node_refusals,
            output_chunks_missed: self.output_chunks_missed,
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
        // Ready tasks by priority: every queued task has the default
        // priority until the queue keeps priorities.
        gauges
            .policy
            .count_ready(5, self.counts[state_index(TaskState::Queued)]);
        if self.counts[state_index(TaskState::Queued)] > 0 {
            gauges.oldest_ready = self
                .queue
                .classes
                .iter()
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
}
