//! Summary statistics for `weft bench`: nearest-rank percentiles, medians,
//! and the latency summary the peers kit reports. Pure functions, no I/O.

use std::time::Duration;

use serde_json::{Value, json};

/// Nearest-rank percentile of `sorted` (ascending) at `q` in `0.0..=1.0`:
/// the smallest value with at least `q` of the samples at or below it
/// (`ceil(q * n)`-th, 1-based, at least the first). Same rule as the peers
/// kit's `pct`. `None` for no samples.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

/// Median of `values` (mean of the middle two for an even count); `None`
/// for no values. Matches Python's `statistics.median`.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

/// A latency distribution in microseconds, as the peers kit reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Median (nearest rank).
    pub p50_us: f64,
    /// 90th percentile (nearest rank).
    pub p90_us: f64,
    /// 99th percentile (nearest rank).
    pub p99_us: f64,
    /// Arithmetic mean.
    pub mean_us: f64,
    /// Fastest sample.
    pub min_us: f64,
    /// Slowest sample.
    pub max_us: f64,
    /// Number of samples.
    pub n: usize,
}

impl Latency {
    /// Summarizes round-trip samples; `None` for no samples.
    pub fn from_samples(samples: &[Duration]) -> Option<Latency> {
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        Some(Latency {
            p50_us: percentile(&us, 0.50)?,
            p90_us: percentile(&us, 0.90)?,
            p99_us: percentile(&us, 0.99)?,
            mean_us: us.iter().sum::<f64>() / us.len() as f64,
            min_us: *us.first()?,
            max_us: *us.last()?,
            n: us.len(),
        })
    }

    /// The fields of the peers kit's `latency_us` record, rounded to 0.1 µs.
    pub fn json(&self) -> Value {
        json!({
            "p50_us": round(self.p50_us, 1),
            "p90_us": round(self.p90_us, 1),
            "p99_us": round(self.p99_us, 1),
            "mean_us": round(self.mean_us, 1),
            "min_us": round(self.min_us, 1),
            "max_us": round(self.max_us, 1),
            "n": self.n,
        })
    }
}

/// `value` rounded to `digits` decimals (for JSON output).
pub fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// Median of the runs' values (for the report).
pub fn median_of(values: impl Iterator<Item = f64>) -> Option<f64> {
    median(&values.collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentile_matches_the_peers_kit() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.50), Some(50));
        assert_eq!(percentile(&values, 0.99), Some(99));
        assert_eq!(percentile(&values, 1.0), Some(100));
        assert_eq!(percentile(&values, 0.0), Some(1));
        // ceil(0.5 * 3) = 2nd of three; ceil(0.99 * 3) = 3rd.
        assert_eq!(percentile(&[10, 20, 30], 0.5), Some(20));
        assert_eq!(percentile(&[10, 20, 30], 0.99), Some(30));
        assert_eq!(percentile(&[7], 0.5), Some(7));
        assert_eq!(percentile::<u32>(&[], 0.5), None);
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn latency_summary_reports_microseconds() {
        let samples: Vec<Duration> = (1..=2000).map(Duration::from_micros).collect();
        let lat = Latency::from_samples(&samples).unwrap();
        assert_eq!(
            (lat.p50_us, lat.p90_us, lat.p99_us),
            (1000.0, 1800.0, 1980.0)
        );
        assert_eq!((lat.min_us, lat.max_us, lat.n), (1.0, 2000.0, 2000));
        assert!((lat.mean_us - 1000.5).abs() < 1e-9);
        assert_eq!(lat.json()["p99_us"], 1980.0);
        assert!(Latency::from_samples(&[]).is_none());
    }
}
