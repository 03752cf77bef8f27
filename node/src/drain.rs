//! Drain supervision: the node's graceful stop (SIGTERM,
//! `RunningNode::drain`, or the coordinator's `Drain`), in the design's
//! order. Stop granting credits and taking work (queued attempts are handed
//! back at once), tell the coordinator (the session sends `Draining` when
//! [`Drain::started`] fires), let running attempts finish within the grace
//! period, cancel the rest and give them a moment to report, then fire
//! [`Drain::done`]: the session flushes what is queued, closes the stream,
//! and the node stops.
//!
//! This module only sequences; the executor stops attempts and the session
//! sends. A kill (crash-style stop) cuts the supervision short.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::attempt::StopReason;
use crate::executor::Executor;

/// After a drain's grace, how long cancelled attempts may take to report.
const DRAIN_REPORT_WAIT: Duration = Duration::from_secs(5);

/// The node's drain: requested once, supervised to its end.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    requested: AtomicBool,
    /// Cancelled when a drain starts (SIGTERM, `drain()`, or `Drain`).
    started: CancellationToken,
    /// Cancelled when the drain is done: flush, close the stream, stop.
    done: CancellationToken,
}

impl Drain {
    /// Starts draining (once; later calls are ignored): no more credits,
    /// `Draining` to the coordinator, running attempts get `grace` to
    /// finish, the rest are cancelled and reported, then the node stops.
    /// The supervision runs on `tasks` and ends early if `kill` fires.
    pub(crate) fn request(
        &self,
        grace: Duration,
        executor: &Executor,
        tasks: &TaskTracker,
        kill: &CancellationToken,
    ) {
        if self.requested.swap(true, Ordering::SeqCst) {
            return;
        }
        info!(?grace, running = executor.running(), "draining");
        executor.set_draining();
        self.started.cancel();
        tasks.spawn(supervise(
            executor.clone(),
            kill.clone(),
            self.done.clone(),
            grace,
        ));
    }

    /// Fires when a drain starts.
    pub(crate) fn started(&self) -> &CancellationToken {
        &self.started
    }

    /// Fires when the drain is done (or the node is told to stop).
    pub(crate) fn done(&self) -> &CancellationToken {
        &self.done
    }
}

/// Waits for the running attempts (at most `grace`), cancels the rest and
/// waits a little for their reports, then fires `done`.
async fn supervise(
    executor: Executor,
    kill: CancellationToken,
    done: CancellationToken,
    grace: Duration,
) {
    tokio::select! {
        () = kill.cancelled() => return,
        () = executor.wait_idle() => {}
        () = tokio::time::sleep(grace) => {
            let cancelled = executor.stop_all(&StopReason::Drained(grace));
            info!(cancelled, "drain grace passed; cancelled the remaining attempts");
            tokio::select! {
                () = kill.cancelled() => return,
                _ = tokio::time::timeout(DRAIN_REPORT_WAIT, executor.wait_idle()) => {}
            }
        }
    }
    info!("drained");
    done.cancel();
}
