//! The node's lease: how long running attempts may go on without word from
//! the coordinator.
//!
//! The coordinator declares a node lost after `heartbeat_timeout` of silence
//! and gives its attempts to other nodes. A node that hears nothing from the
//! coordinator must assume the same happened and stop those attempts itself,
//! or one task runs twice. The lease counts from the last message heard
//! (any message, heartbeats included) on the monotonic clock, so a process
//! that was stopped (SIGSTOP) and resumed later finds its lease expired.
//!
//! Plain state with `now` passed in: no timers and no I/O here. The session
//! asks before acting on a message, the watchdog (`lease_watchdog.rs`)
//! checks on a timer, and the executor asks before starting an assignment.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::error::Error;

/// How often to check while no lease runs (before the first registration,
/// and after an expiry until the next one).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The lease of the current (or last) session.
#[derive(Debug)]
pub(crate) struct Lease {
    /// `NodeConfig.lease`; `None` uses the coordinator's heartbeat timeout.
    /// A configured one must be at least twice the coordinator's heartbeat
    /// interval ([`Lease::fits`]).
    configured: Option<Duration>,
    term: Mutex<Option<Term>>,
    /// `true` once the current term has expired: ends the session.
    expired: watch::Sender<bool>,
    /// Wakes the watchdog when a term begins, so it checks on the new
    /// term's schedule rather than the idle one.
    begun: Notify,
}

/// One lease, from a `Registered` until it expires or the next `Registered`.
#[derive(Clone, Copy, Debug)]
struct Term {
    length: Duration,
    /// The periodic check (the heartbeat interval), besides the exact one at
    /// the deadline.
    check_every: Duration,
    last_heard: Instant,
    expired: bool,
}

impl Term {
    fn silence(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard)
    }

    fn due(&self, now: Instant) -> bool {
        self.expired || self.silence(now) >= self.length
    }
}

impl Lease {
    pub(crate) fn new(configured: Option<Duration>) -> Self {
        Lease {
            // Zero means unset (a program embedding the node may say so).
            configured: configured.filter(|lease| !lease.is_zero()),
            term: Mutex::new(None),
            expired: watch::Sender::new(false),
            begun: Notify::new(),
        }
    }

    fn term(&self) -> MutexGuard<'_, Option<Term>> {
        // No code panics while holding this lock; recover anyway.
        self.term
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the configured lease can be renewed by a coordinator that
    /// sends a heartbeat every `heartbeat_interval`: it must last at least
    /// two intervals (one heartbeat may come late or be lost), or it would
    /// run out between heartbeats and stop every attempt as if the
    /// coordinator were unreachable. Asked at each registration, before
    /// [`Lease::begin`]; the error is fatal (registering again meets the
    /// same heartbeats). The coordinator's own heartbeat timeout (no
    /// `--lease`) is its business: it checks that one at its start.
    pub(crate) fn fits(&self, heartbeat_interval: Duration) -> Result<(), Error> {
        match self.configured {
            Some(lease) if lease < heartbeat_interval.saturating_mul(2) => {
                Err(Error::LeaseTooShort {
                    lease,
                    interval: heartbeat_interval,
                })
            }
            _ => Ok(()),
        }
    }

    /// A session registered at `now`: a fresh lease of the configured
    /// length, or of the coordinator's `heartbeat_timeout`.
    pub(crate) fn begin(
        &self,
        heartbeat_timeout: Duration,
        heartbeat_interval: Duration,
        now: Instant,
    ) {
        let length = self.configured.unwrap_or(heartbeat_timeout);
        *self.term() = Some(Term {
            length,
            check_every: heartbeat_interval.max(Duration::from_millis(1)),
            last_heard: now,
            expired: false,
        });
        self.expired.send_replace(false);
        self.begun.notify_one();
    }

    /// Resolves when a term begins (at once if one began since the last
    /// call).
    pub(crate) async fn begun(&self) {
        self.begun.notified().await;
    }

    /// The lease's length, once a session registered.
    pub(crate) fn length(&self) -> Option<Duration> {
        self.term().map(|term| term.length)
    }

    /// The lease as the node logs it: its length and where it comes from
    /// (`5s (--lease)`, `30s (the coordinator's heartbeat timeout)`);
    /// `none` before a session registered.
    pub(crate) fn describe(&self) -> String {
        match (self.length(), self.configured) {
            (None, _) => "none".to_owned(),
            (Some(length), Some(_)) => format!("{length:?} (--lease)"),
            (Some(length), None) => format!("{length:?} (the coordinator's heartbeat timeout)"),
        }
    }

    /// When the coordinator was last heard from, once a session registered.
    pub(crate) fn last_heard(&self) -> Option<Instant> {
        self.term().map(|term| term.last_heard)
    }

    /// A message from the coordinator arrived at `now`: renews the lease,
    /// unless it had already run out (`Err` with the silence), in which case
    /// the message must not be acted on: it was sent before the coordinator
    /// gave up on this node.
    pub(crate) fn heard(&self, now: Instant) -> Result<(), Duration> {
        match self.term().as_mut() {
            None => Ok(()),
            Some(term) if term.due(now) => Err(term.silence(now)),
            Some(term) => {
                term.last_heard = term.last_heard.max(now);
                Ok(())
            }
        }
    }

    /// Expires the lease if it has run out at `now`: answers the silence
    /// the first time only, so the caller stops the attempts once.
    pub(crate) fn check(&self, now: Instant) -> Option<Duration> {
        let silence = {
            let mut term = self.term();
            let term = term.as_mut()?;
            if term.expired || term.silence(now) < term.length {
                return None;
            }
            term.expired = true;
            term.silence(now)
        };
        self.expired.send_replace(true);
        Some(silence)
    }

    /// The silence so far if the lease has run out at `now` (whether or not
    /// [`Lease::check`] noticed yet); `None` while it holds or before the
    /// first registration.
    pub(crate) fn overdue(&self, now: Instant) -> Option<Duration> {
        self.term()
            .filter(|term| term.due(now))
            .map(|term| term.silence(now))
    }

    /// When to check next: at the deadline, and at least every heartbeat
    /// interval (so a resumed process checks promptly whatever its timers
    /// do).
    pub(crate) fn next_check(&self, now: Instant) -> Instant {
        match *self.term() {
            // Checked: a lease too long to add to the clock (`--lease`)
            // is checked every interval only.
            Some(term) if !term.expired => {
                let periodic = now
                    .checked_add(term.check_every)
                    .unwrap_or(now + IDLE_CHECK);
                match term.last_heard.checked_add(term.length) {
                    Some(deadline) => deadline.min(periodic),
                    None => periodic,
                }
            }
            _ => now + IDLE_CHECK,
        }
    }

    /// Changes to `true` when the current lease expires.
    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.expired.subscribe()
    }
}

/// The error an attempt stopped by an expired lease reports.
pub(crate) fn expired_message(silence: Duration) -> String {
    format!(
        "lease expired: coordinator unreachable for {:.1}s; the coordinator has reassigned this attempt",
        silence.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_lease_is_described_as_a_duration_and_its_source() {
        let t0 = Instant::now();
        let default = Lease::new(None);
        assert_eq!(default.describe(), "none");
        default.begin(5 * SECOND, SECOND, t0);
        assert_eq!(
            default.describe(),
            "5s (the coordinator's heartbeat timeout)"
        );
        let configured = Lease::new(Some(Duration::from_millis(1500)));
        configured.begin(5 * SECOND, SECOND, t0);
        assert_eq!(configured.describe(), "1.5s (--lease)");
    }

    #[test]
    fn a_lease_holds_while_the_coordinator_is_heard_and_expires_once_after_silence() {
        let lease = Lease::new(None);
        let t0 = Instant::now();
        assert_eq!(
            lease.check(t0 + 100 * SECOND),
            None,
            "no lease before registering"
        );
        lease.begin(5 * SECOND, SECOND, t0);
        assert_eq!(lease.length(), Some(5 * SECOND));
        assert_eq!(lease.heard(t0 + 4 * SECOND), Ok(()));
        assert_eq!(lease.check(t0 + 8 * SECOND), None, "renewed at 4 s");
        assert_eq!(lease.overdue(t0 + 8 * SECOND), None);
        assert_eq!(lease.check(t0 + 9 * SECOND), Some(5 * SECOND));
        assert_eq!(lease.check(t0 + 10 * SECOND), None, "stops attempts once");
        assert_eq!(lease.overdue(t0 + 10 * SECOND), Some(6 * SECOND));
        assert!(*lease.subscribe().borrow());
        lease.begin(5 * SECOND, SECOND, t0 + 11 * SECOND);
        assert!(
            !*lease.subscribe().borrow(),
            "a new registration starts a new lease"
        );
        assert_eq!(lease.heard(t0 + 12 * SECOND), Ok(()));
    }

    #[test]
    fn a_message_read_after_the_lease_ran_out_does_not_renew_it() {
        let lease = Lease::new(None);
        let t0 = Instant::now();
        lease.begin(5 * SECOND, SECOND, t0);
        // The process was stopped for 60 s; a buffered heartbeat is read first.
        assert_eq!(lease.heard(t0 + 60 * SECOND), Err(60 * SECOND));
        assert_eq!(lease.last_heard(), Some(t0));
        assert_eq!(lease.check(t0 + 60 * SECOND), Some(60 * SECOND));
        assert_eq!(lease.heard(t0 + 61 * SECOND), Err(61 * SECOND));
    }

    #[test]
    fn a_configured_lease_overrides_the_heartbeat_timeout() {
        let lease = Lease::new(Some(2 * SECOND));
        let t0 = Instant::now();
        lease.begin(5 * SECOND, SECOND, t0);
        assert_eq!(lease.length(), Some(2 * SECOND));
        assert_eq!(lease.check(t0 + 2 * SECOND), Some(2 * SECOND));
    }

    #[test]
    fn a_configured_lease_must_outlast_two_heartbeat_intervals() {
        let ms = Duration::from_millis;
        assert!(
            Lease::new(None).fits(10 * SECOND).is_ok(),
            "the coordinator's timeout"
        );
        assert!(Lease::new(Some(2 * SECOND)).fits(SECOND).is_ok());
        assert!(
            Lease::new(Some(Duration::ZERO)).fits(SECOND).is_ok(),
            "zero means unset: the coordinator's timeout"
        );
        assert!(Lease::new(Some(ms(300))).fits(ms(50)).is_ok());
        for (lease, interval) in [(SECOND, SECOND), (ms(1999), SECOND), (ms(300), SECOND)] {
            let err = Lease::new(Some(lease)).fits(interval).unwrap_err();
            assert!(err.is_fatal(), "{err}");
            assert!(
                err.to_string()
                    .contains(&format!("use --lease {:?} or more", interval * 2)),
                "{err}"
            );
        }
    }

    #[test]
    fn checks_come_at_the_deadline_and_every_heartbeat_interval() {
        let lease = Lease::new(None);
        let t0 = Instant::now();
        assert_eq!(lease.next_check(t0), t0 + IDLE_CHECK);
        lease.begin(5 * SECOND, SECOND, t0);
        assert_eq!(lease.next_check(t0), t0 + SECOND);
        assert_eq!(
            lease.next_check(t0 + 4500 * Duration::from_millis(1)),
            t0 + 5 * SECOND
        );
    }

    #[test]
    fn the_expiry_message_says_what_happened() {
        assert_eq!(
            expired_message(Duration::from_millis(5240)),
            "lease expired: coordinator unreachable for 5.2s; the coordinator has reassigned this attempt"
        );
    }
}
