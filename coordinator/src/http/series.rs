//! The overview's charts: queue depth and throughput over the last
//! minutes, sampled every [`INTERVAL`] into a ring of [`SAMPLES`] whether
//! or not anyone watches.
//!
//! Each sample is one `ClusterInfo` read of counts the scheduler already
//! keeps (tasks queued, tasks finished since start): nothing per task,
//! nothing on the hot path. Throughput is the growth of
//! `ClusterStats::tasks_finished` between two samples over the time that
//! really passed between them: that count only grows (a retention sweep
//! lowers the tasks per state, never it), and a late tick is no burst.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use weft_proto::TaskState;

use crate::driver::{Command, Handle};
use crate::scheduler::ClusterStats;

/// How often a sample is taken.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes' worth.
pub(crate) const SAMPLES: usize = 180;

/// One sample.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    queue_depth: u64,
    /// Tasks made final since the coordinator started (monotonic).
    finished: u64,
    /// When it was taken.
    at: Instant,
}

impl Sample {
    /// The sample of `stats`, read at `at`.
    fn of(stats: &ClusterStats, at: Instant) -> Sample {
        Sample {
            queue_depth: stats
                .tasks
                .iter()
                .filter(|(state, _)| *state == TaskState::Queued)
                .map(|(_, n)| *n)
                .sum(),
            finished: stats.tasks_finished,
            at,
        }
    }
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
        let throughput = samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(a, b)| {
                let secs = b.at.saturating_duration_since(a.at).as_secs_f64();
                if secs > 0.0 {
                    b.finished.saturating_sub(a.finished) as f64 / secs
                } else {
                    0.0
                }
            })
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
            self.push(Sample::of(&stats, Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_samples_and_throughput_is_per_second() {
        let series = Series::default();
        let t0 = Instant::now();
        for i in 0..(SAMPLES as u64 + 10) {
            series.push(Sample {
                queue_depth: i,
                finished: i * 10,
                at: t0 + INTERVAL * i as u32,
            });
        }
        let (depth, throughput) = series.read();
        assert_eq!(depth.len(), SAMPLES);
        assert_eq!(depth[0], 10, "the oldest went");
        assert_eq!(throughput.len(), SAMPLES - 1);
        assert!(throughput.iter().all(|t| (*t - 2.0).abs() < 1e-9));
    }

    #[test]
    fn throughput_ignores_retention_sweeps() {
        let config = crate::config::CoordinatorConfig::default();
        let mut stats = crate::scheduler::Scheduler::new((&config).into()).stats();
        let set = |stats: &mut ClusterStats, state: TaskState, n: u64| {
            for (s, count) in &mut stats.tasks {
                if *s == state {
                    *count = n;
                }
            }
        };
        let series = Series::default();
        let t0 = Instant::now();
        set(&mut stats, TaskState::Succeeded, 100);
        stats.tasks_finished = 100;
        series.push(Sample::of(&stats, t0));
        // 50 more finished, and a sweep took 120 of the succeeded away;
        // the tick came late: 10 s after the last, not 5.
        set(&mut stats, TaskState::Succeeded, 30);
        stats.tasks_finished = 150;
        series.push(Sample::of(&stats, t0 + Duration::from_secs(10)));
        assert_eq!(series.read().1, vec![5.0]);
    }
}
