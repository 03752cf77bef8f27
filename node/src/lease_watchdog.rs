//! The lease watchdog: stops every running attempt once the lease
//! (`lease.rs`) has run out, because by then the coordinator has given
//! them to other nodes. Their `Finished` waits for the next session, where
//! the coordinator fences it.
//!
//! [`watch`] runs beside the sessions for the node's whole life, whatever
//! they are doing (dialing, waiting to redial, blocked on a full stream);
//! the session also calls [`check`] before it acts on a message and before
//! it registers. The lease itself is plain state; this is the part that
//! waits and acts. It sends nothing.

use tokio::time::Instant;
use tracing::warn;

use crate::attempt::StopReason;
use crate::executor::Executor;
use crate::lease::Lease;

/// If the lease ran out at `now`, stops every running attempt (once per
/// lease): the coordinator has given them to other nodes.
pub(crate) fn check(lease: &Lease, executor: &Executor, now: Instant) {
    if let Some(silence) = lease.check(now) {
        let stopped = executor.stop_all(&StopReason::LeaseExpired(silence));
        warn!(
            ?silence,
            stopped, "lease expired: coordinator unreachable; stopping running attempts"
        );
    }
}

/// Checks the lease at its deadline and at least every heartbeat interval,
/// forever.
pub(crate) async fn watch(lease: &Lease, executor: &Executor) {
    loop {
        let next = lease.next_check(Instant::now());
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = lease.begun() => {}
        }
        check(lease, executor, Instant::now());
    }
}
