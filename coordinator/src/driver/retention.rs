//! The retention sweep: deletes final tasks (with their events) whose
//! record last changed longer ago than the retention, a bounded number per
//! sweep, and tells the scheduler to stop counting them.
//!
//! The driver runs a sweep only between commits (none in flight), so a
//! sweep never races a write of the tasks it deletes.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::scheduler::Scheduler;
use crate::store::{Store, blocking};

/// Most final tasks one retention sweep deletes (one commit).
const SWEEP_LIMIT: usize = 2_000;

/// When sweeps run, and the retention they apply.
pub(super) struct Retention {
    retention: Duration,
    /// When the next sweep runs (`None`: retention is off).
    next: Option<Instant>,
}

/// How often retention sweeps run: a tenth of the retention, between
/// 10 ms and a minute.
fn sweep_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_millis(10), Duration::from_secs(60))
}

impl Retention {
    /// Sweeps for `retention` (zero: never), the first one at once.
    pub fn new(retention: Duration) -> Self {
        Retention {
            retention,
            next: (!retention.is_zero()).then(Instant::now),
        }
    }

    /// When the next sweep is due (`None`: never).
    pub fn next_sweep(&self) -> Option<Instant> {
        self.next
    }

    /// Deletes final tasks past the retention (at most [`SWEEP_LIMIT`]) and
    /// schedules the next sweep: soon when there was more to delete.
    pub async fn sweep(&mut self, store: &Arc<dyn Store>, scheduler: &mut Scheduler) {
        let retention = self.retention;
        let Some(cutoff) = SystemTime::now().checked_sub(retention) else {
            self.next = Some(Instant::now() + sweep_interval(retention));
            return;
        };
        // Parents a live child still needs are kept, whatever their age.
        let keep = scheduler.kept_parents();
        let removed = blocking(store, "expiring", move |store| {
            store.expire(cutoff, SWEEP_LIMIT, &keep)
        })
        .await;
        let next = match removed {
            Ok(removed) => {
                if !removed.is_empty() {
                    tracing::debug!(tasks = removed.len(), "expired finished tasks");
                }
                scheduler.forget_expired(&removed);
                if removed.len() >= SWEEP_LIMIT {
                    Duration::from_millis(10)
                } else {
                    sweep_interval(retention)
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "retention sweep failed; retrying later");
                sweep_interval(retention)
            }
        };
        self.next = Some(Instant::now() + next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_run_every_tenth_of_the_retention_within_bounds() {
        assert_eq!(
            sweep_interval(Duration::from_secs(600)),
            Duration::from_secs(60)
        );
        assert_eq!(
            sweep_interval(Duration::from_secs(3600)),
            Duration::from_secs(60)
        );
        assert_eq!(
            sweep_interval(Duration::from_millis(20)),
            Duration::from_millis(10)
        );
        assert_eq!(
            sweep_interval(Duration::from_secs(1)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn zero_retention_never_sweeps() {
        assert_eq!(Retention::new(Duration::ZERO).next_sweep(), None);
        assert!(
            Retention::new(Duration::from_secs(1))
                .next_sweep()
                .is_some()
        );
    }
}
