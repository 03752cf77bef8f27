//! A histogram of plain atomics: `observe` is a relaxed `fetch_add`, one
//! compare-and-swap (the sum) and a search of a short fixed bucket list, no
//! lock and no allocation (the
//! `prometheus-client` histogram takes a lock per observation, which the
//! driver's hot path must not).
//!
//! Values are kept as integers in a small unit (nanoseconds for durations,
//! bytes or records for sizes) and written out in the metric's base unit
//! (seconds) when scraped. A scrape reads the buckets one by one while
//! observations go on: the count it reports is the sum of the buckets it
//! read, so `_count` always equals the `+Inf` bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Bucket upper bounds for latencies from well under a millisecond (a
/// commit to the in-memory store, a submit answered from a warm queue) to
/// minutes (a task waiting behind a long backlog): 100 µs to 10 min,
/// roughly ×2.5 per step, in seconds.
pub const LATENCY_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Bucket upper bounds for task run times: 1 ms to 6 hours, in seconds
/// (handlers that answer at once up to long batch jobs).
pub const RUN_SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
    10800.0, 21600.0,
];

/// Bucket upper bounds for counts per batch (records per commit, tasks per
/// submit): 1 to 10 000, about ×2 per step.
pub const COUNTS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Bucket upper bounds for request sizes in bytes: 256 B to 64 MiB, ×4 per
/// step.
pub const BYTES: &[f64] = &[
    256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
];

/// One histogram. See the module docs.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in the metric's base unit, as scraped.
    bounds: &'static [f64],
    /// The same bounds in the unit values are observed in.
    limits: Box<[u64]>,
    /// One count per bound, and the last for `+Inf`.
    buckets: Box<[AtomicU64]>,
    /// Sum of the observed values, in the observed unit: the bits of an
    /// `f64`, which does not wrap (a `u64` of nanoseconds wraps after 584
    /// years of observed time, which millions of tasks that each waited an
    /// hour reach) and stays exact while it is under 2^53.
    sum: AtomicU64,
    /// Base units per observed unit (1e-9 for nanoseconds).
    scale: f64,
}

impl Histogram {
    /// A histogram of durations, observed in nanoseconds, scraped in
    /// seconds.
    pub fn seconds(bounds: &'static [f64]) -> Self {
        Self::new(bounds, 1e-9)
    }

    /// A histogram of whole numbers (bytes, records), scraped as they are.
    pub fn counts(bounds: &'static [f64]) -> Self {
        Self::new(bounds, 1.0)
    }

    fn new(bounds: &'static [f64], scale: f64) -> Self {
        Histogram {
            bounds,
            // The bounds are constants above: positive and far below
            // u64::MAX units, so the cast neither saturates nor truncates
            // more than a rounding.
            limits: bounds.iter().map(|b| (b / scale).round() as u64).collect(),
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0.0f64.to_bits()),
            scale,
        }
    }

    /// Counts one value, in the observed unit.
    pub fn observe(&self, value: u64) {
        let index = self.limits.partition_point(|limit| *limit < value);
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        // Mostly uncontended (the driver observes most): one try,
        // rarely more.
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value as f64).to_bits())
            });
    }

    /// Counts one duration (for histograms made with [`seconds`](Self::seconds)).
    pub fn observe_duration(&self, value: Duration) {
        self.observe(u64::try_from(value.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Observations so far (for tests and checks).
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Sum of the observations so far, in the base unit.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed)) * self.scale
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // The encoder takes per-bucket counts (it adds them up itself) with
        // `f64::MAX` standing for `+Inf`.
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<NoLabelSet>(self.sum(), count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_lands_in_the_first_bucket_whose_bound_is_not_below_it() {
        let h = Histogram::seconds(&[0.001, 0.01]);
        h.observe_duration(Duration::from_micros(1000)); // on the bound: le="0.001"
        h.observe_duration(Duration::from_micros(1001));
        h.observe_duration(Duration::from_secs(1)); // +Inf
        let counts: Vec<u64> = h
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts, [1, 1, 1]);
        assert_eq!(h.count(), 3);
        assert!((h.sum() - 1.002001).abs() < 1e-9);
    }

    #[test]
    fn the_sum_does_not_wrap() {
        let h = Histogram::seconds(LATENCY_SECONDS);
        for _ in 0..3 {
            h.observe(u64::MAX / 2);
        }
        // 3 × 9.2e9 s: past the 584 years a u64 of nanoseconds holds.
        assert!(h.sum() > 2.7e10, "{}", h.sum());
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn the_bucket_lists_rise() {
        for bounds in [LATENCY_SECONDS, RUN_SECONDS, COUNTS, BYTES] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
