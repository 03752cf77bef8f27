//! The overview's charts: queue depth and throughput over the last
//! minutes, sampled every [`INTERVAL`] into a ring of [`SAMPLES`] whether
//! or not anyone watches.
//!
//! Each sample is one `ClusterInfo` read of counts the scheduler already
//! keeps (tasks per state): nothing per task, nothing on the hot path.
//! Throughput is the growth of the finished count between two samples
//! (a retention sweep can shrink that count; a sample then says 0).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use weft_proto::TaskState;

use crate::driver::{Command, Handle};

/// How often a sample is taken.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes' worth.
pub(crate) const SAMPLES: usize = 180;

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    queue_depth: u64,
    /// Tasks in a final state, in all.
    finished: u64,
}

/// The ring of samples, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Series {
    samples: Mutex<VecDeque<Sample>>,
}

impl Series {
    fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() >= SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Queue depth per sample, and tasks finished per second between
    /// samples (one fewer), oldest first.
    pub(crate) fn read(&self) -> (Vec<u64>, Vec<f64>) {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let depth = samples.iter().map(|s| s.queue_depth).collect();
        let secs = INTERVAL.as_secs_f64();
        let throughput = samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(a, b)| b.finished.saturating_sub(a.finished) as f64 / secs)
            .collect();
        (depth, throughput)
    }

    /// Samples every [`INTERVAL`] until `cancel` (the first at once).
    pub(crate) async fn sample_until(
        self: std::sync::Arc<Self>,
        handle: Handle,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Ok((stats, _uptime)) = handle.call(|reply| Command::ClusterInfo { reply }).await
            else {
                return;
            };
            let count = |wanted: fn(TaskState) -> bool| {
                stats
                    .tasks
                    .iter()
                    .filter(|(state, _)| wanted(*state))
                    .map(|(_, n)| *n)
                    .sum::<u64>()
            };
            self.push(Sample {
                queue_depth: count(|s| s == TaskState::Queued),
                finished: count(TaskState::is_final),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_samples_and_throughput_is_per_second() {
        let series = Series::default();
        for i in 0..(SAMPLES as u64 + 10) {
            series.push(Sample {
                queue_depth: i,
                finished: i * 10,
            });
        }
        let (depth, throughput) = series.read();
        assert_eq!(depth.len(), SAMPLES);
        assert_eq!(depth[0], 10, "the oldest went");
        assert_eq!(throughput.len(), SAMPLES - 1);
        assert!(throughput.iter().all(|t| (*t - 2.0).abs() < 1e-9));
        // A sweep shrinking the count is no negative throughput.
        series.push(Sample {
            queue_depth: 0,
            finished: 0,
        });
        assert_eq!(series.read().1.last(), Some(&0.0));
    }
}
