//! The retry rule, written once: an attempt that ended without success
//! counts against its task, as a failure or as a node loss; while
//! failures + node losses stay below the spec's `max_attempts` the task is
//! requeued as its next attempt (after a backoff for failures, at once for
//! node losses), otherwise it ends FAILED.
//!
//! Plain functions of the task's counters: the callers say why the
//! attempt ended (by the method they call) and word the reason; what
//! happens to the task (requeue, finalize) is theirs. The types say what a
//! requeue waits for, so a failure cannot be retried without its backoff.
//! Not covered here: a client's cancel, a failure to
//! start and a timeout end the task whatever its counters say, and the
//! poison rule (`--max-node-losses`) may fail a task the rule would retry.

use std::time::Duration;

use super::task::LiveTask;

/// What becomes of the task after a setback.
///
/// `D` is what its retry waits for: the backoff (a `Duration`) after a
/// failure, nothing (`()`) after a node loss, which is retried at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict<D> {
    /// Requeue it as the next attempt, after the wait.
    Requeue(D),
    /// No attempts left: it ends FAILED.
    Fail,
}

/// The rule with its configured backoff.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RetryRule {
    /// First retry delay.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl RetryRule {
    /// Counts a failure of `task`'s current attempt and decides: requeue
    /// after the backoff while attempts remain, else fail.
    pub fn after_failure(&self, task: &mut LiveTask, max_attempts: u32) -> Verdict<Duration> {
        task.failures += 1;
        if out_of_attempts(task, max_attempts) {
            return Verdict::Fail;
        }
        Verdict::Requeue(backoff(self.backoff_base, self.backoff_max, task.attempt))
    }

    /// Counts a node loss of `task`'s current attempt (it went down with
    /// its node, or the node cancelled it while draining: not the task's
    /// fault) and decides: requeue at once while attempts remain, else fail.
    pub fn after_node_loss(&self, task: &mut LiveTask, max_attempts: u32) -> Verdict<()> {
        task.node_losses += 1;
        if out_of_attempts(task, max_attempts) {
            return Verdict::Fail;
        }
        Verdict::Requeue(())
    }
}

/// The rule itself: failures and node losses together have used up the
/// spec's `max_attempts`.
fn out_of_attempts(task: &LiveTask, max_attempts: u32) -> bool {
    task.failures.saturating_add(task.node_losses) >= max_attempts
}

/// The delay before retrying after attempt `attempt` failed: `base`
/// doubled per earlier attempt, at most `max`.
pub(crate) fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let shift = attempt.saturating_sub(1).min(31);
    base.saturating_mul(1u32 << shift).min(max)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::super::task::{INLINE_INPUT, LiveSpec};
    use super::*;

    const RULE: RetryRule = RetryRule {
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
    };

    fn task(attempt: u32, failures: u32, node_losses: u32) -> LiveTask {
        let spec = LiveSpec::Inline {
            len: 0,
            data: [0; INLINE_INPUT],
        };
        let mut task = LiveTask::new(spec, 0, SystemTime::UNIX_EPOCH);
        task.attempt = attempt;
        task.failures = failures;
        task.node_losses = node_losses;
        task
    }

    #[test]
    fn backoff_doubles_per_attempt_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let delays: Vec<u128> = (1..=6).map(|a| backoff(base, max, a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff(base, max, 500), max);
    }

    #[test]
    fn a_failure_is_retried_after_the_backoff_while_attempts_remain() {
        let mut t = task(2, 1, 0);
        let verdict = RULE.after_failure(&mut t, 3);
        let delay = Duration::from_millis(200);
        assert_eq!(verdict, Verdict::Requeue(delay));
        assert_eq!((t.failures, t.node_losses), (2, 0));
    }

    #[test]
    fn a_node_loss_is_retried_at_once_and_counted_apart() {
        let mut t = task(1, 0, 0);
        let verdict = RULE.after_node_loss(&mut t, 3);
        assert_eq!(verdict, Verdict::Requeue(()));
        assert_eq!((t.failures, t.node_losses), (0, 1));
    }

    #[test]
    fn failures_and_node_losses_together_use_up_the_attempts() {
        // One failure and one node loss before: the third setback, of
        // either kind, is the last of three attempts.
        let mut t = task(3, 1, 1);
        assert_eq!(RULE.after_failure(&mut t, 3), Verdict::Fail, "Failed");
        assert_eq!(t.failures + t.node_losses, 3);
        let mut t = task(3, 1, 1);
        assert_eq!(RULE.after_node_loss(&mut t, 3), Verdict::Fail, "NodeLost");
        assert_eq!(t.failures + t.node_losses, 3);
        let mut once = task(1, 0, 0);
        assert_eq!(RULE.after_failure(&mut once, 1), Verdict::Fail);
    }
}
