//! The metrics of scheduling policy: ready tasks per priority, ready tasks
//! held back by a concurrency key, a rate limit or resources, and tokens
//! left in each rate limit. (Schedule fires and skips are the scheduler's
//! schedule counts, in `SchedulerGauges` with the other copied counts.)
//!
//! Labels stay low-cardinality: `priority` has 9 values; the waits are
//! counts with no key label (concurrency keys are per user, say, and
//! unbounded); a rate limit's `limit` label is its name, which only an
//! operator sets (`weft limit set`), so there are few of them.
//!
//! Same discipline as the rest of the metrics: the scheduler's counts come
//! in once per batch ([`PolicyGauges`], a plain copy in [`Gauges`]); nothing here
//! decides or does I/O.
//!
//! [`Gauges`]: crate::scheduler::Gauges

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

/// Priorities, 1 (lowest) to 9 (highest): the `priority` label's values.
pub const PRIORITIES: usize = 9;

const PRIORITY_NAMES: [&str; PRIORITIES] = ["1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// The scheduler's policy counts at one moment (part of its `Gauges`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyGauges {
    /// Ready (QUEUED) tasks by priority, index 0 = priority 1.
    pub ready_by_priority: [u64; PRIORITIES],
    /// Ready tasks held back because their concurrency key is at its limit.
    pub waiting_concurrency: u64,
    /// Ready tasks held back because a rate limit they use has too few tokens.
    pub waiting_rate_limit: u64,
    /// Ready tasks no connected node has the free resources for now.
    pub waiting_resources: u64,
}

impl PolicyGauges {
    /// Counts one ready task of `priority` (1 to 9; anything else is
    /// counted as the default, 5).
    pub fn count_ready(&mut self, priority: u8, tasks: u64) {
        let index = match priority {
            1..=9 => usize::from(priority) - 1,
            _ => 4,
        };
        self.ready_by_priority[index] += tasks;
    }
}

/// What the collector writes of the policy: the last batch's gauges, the
/// tokens per rate limit, the schedule counters.
#[derive(Debug, Default)]
pub(super) struct PolicyMetrics {
    ready_by_priority: [AtomicU64; PRIORITIES],
    waiting_concurrency: AtomicU64,
    waiting_rate_limit: AtomicU64,
    waiting_resources: AtomicU64,
    /// Whole tokens per rate limit name, in name order. A lock taken once
    /// per batch by the driver and once per scrape: never contended on the
    /// hot path, and no allocation while the set of limits stays the same.
    rate_tokens: Mutex<Vec<(String, u64)>>,
}

fn load(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

impl PolicyMetrics {
    /// The batch's counts.
    pub(super) fn set(&self, now: &PolicyGauges) {
        for (slot, value) in self.ready_by_priority.iter().zip(now.ready_by_priority) {
            slot.store(value, Ordering::Relaxed);
        }
        self.waiting_concurrency
            .store(now.waiting_concurrency, Ordering::Relaxed);
        self.waiting_rate_limit
            .store(now.waiting_rate_limit, Ordering::Relaxed);
        self.waiting_resources
            .store(now.waiting_resources, Ordering::Relaxed);
    }

    /// The tokens of every rate limit now, as `(name, whole tokens)`.
    pub(super) fn set_rate_tokens<'a>(&self, limits: impl Iterator<Item = (&'a str, u64)>) {
        let Ok(mut table) = self.rate_tokens.lock() else {
            return;
        };
        let mut at = 0;
        for (name, tokens) in limits {
            match table.get_mut(at) {
                Some(entry) if entry.0 == name => entry.1 = tokens,
                Some(entry) => *entry = (name.to_owned(), tokens),
                None => table.push((name.to_owned(), tokens)),
            }
            at += 1;
        }
        table.truncate(at);
        table.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    }

    /// Writes the policy families.
    pub(super) fn encode(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        {
            let mut family = e.encode_descriptor(
                "weft_ready_tasks",
                "Ready (queued) tasks waiting for a node, by priority (1 lowest to 9 highest)",
                None,
                MetricType::Gauge,
            )?;
            for (priority, count) in PRIORITY_NAMES.iter().zip(&self.ready_by_priority) {
                family
                    .encode_family(&[("priority", *priority)])?
                    .encode_gauge(&load(count))?;
            }
        }
        for (name, help, value) in [
            (
                "weft_tasks_waiting_concurrency",
                "Ready tasks held back because their concurrency key is at its limit",
                &self.waiting_concurrency,
            ),
            (
                "weft_tasks_waiting_rate_limit",
                "Ready tasks held back because a rate limit they use has too few tokens",
                &self.waiting_rate_limit,
            ),
            (
                "weft_tasks_waiting_resources",
                "Ready tasks that no connected node has the free resources for now",
                &self.waiting_resources,
            ),
        ] {
            e.encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&load(value))?;
        }
        {
            let mut family = e.encode_descriptor(
                "weft_rate_limit_tokens",
                "Whole tokens in each rate limit's bucket now, by limit name (set by an operator: few)",
                None,
                MetricType::Gauge,
            )?;
            if let Ok(table) = self.rate_tokens.lock() {
                for (name, tokens) in table.iter() {
                    family
                        .encode_family(&[("limit", name.as_str())])?
                        .encode_gauge(tokens)?;
                }
            }
        }
        Ok(())
    }
}
