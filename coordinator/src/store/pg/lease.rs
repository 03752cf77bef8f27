//! The active coordinator's lease on the database, and the timings that
//! make split brain impossible: a plain struct fed the send time of each
//! successful check, and asked with `now` whether the lease still holds.
//! No I/O here; the checks themselves run in `mod.rs`
//! ([`PgStore::check_lease`](super::PgStore::check_lease)) and the loop
//! that runs them in [`PgStore::watch_lease`](super::PgStore::watch_lease).
//!
//! The rule: the write connection's session holds the coordinator lock,
//! so a standby can take over only once PostgreSQL has ended that session.
//! A session cut off from its coordinator ends when the server's TCP
//! keepalives or its `tcp_user_timeout` give up on it, no sooner than
//! [`SESSION_DEADLINE`] after the server last heard from the coordinator.
//! The coordinator stops once no check has succeeded for [`LEASE`],
//! counted from the time it *sent* its last successful check (the server
//! heard from it later than that). The watchdog wakes at the lease's
//! end, so it stops [`LEASE`] after the server last heard from it, plus
//! the time to wake; the const assertion below allows a whole
//! [`CHECK_EVERY`] for that, and keeps a margin of [`STOP_MARGIN`] before
//! a standby can take over. A killed coordinator's socket is closed by its kernel: the
//! session ends, and a standby takes over, at once. A frozen coordinator
//! (SIGSTOP, a paused VM) keeps its socket open; a standby ends its
//! session once it has waited idle for [`SILENT_AFTER`], the same bound
//! (`hold.rs`).

use std::time::{Duration, Instant};

/// How long the active coordinator carries on without a successful check.
pub const LEASE: Duration = Duration::from_secs(4);
/// How often the active checks (and the watchdog looks at the lease).
pub const CHECK_EVERY: Duration = Duration::from_millis(LEASE.as_millis() as u64 / 4);
/// The server's keepalives on each session: first probe after this much
/// silence (`tcp_keepalives_idle`)...
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(4);
/// ...then one every this often (`tcp_keepalives_interval`)...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// ...and the session is ended after this many unanswered
/// (`tcp_keepalives_count`).
pub const KEEPALIVE_COUNT: u32 = 4;
/// How long after the server last heard from a coordinator it ends the
/// session at the earliest: keepalives on an idle session, and
/// `tcp_user_timeout` (set to the same) for data sent and not
/// acknowledged.
pub const SESSION_DEADLINE: Duration = Duration::from_secs(
    KEEPALIVE_IDLE.as_secs() + KEEPALIVE_INTERVAL.as_secs() * KEEPALIVE_COUNT as u64,
);
/// What a coordinator whose lease ran out has, at least, to stop its node
/// sessions before a standby may take over.
pub const STOP_MARGIN: Duration = Duration::from_secs(3);
/// How long the active's session may wait for its coordinator (idle, not
/// running a query) before a standby ends it: a frozen coordinator
/// (SIGSTOP, a paused VM) keeps its socket, and so its session, alive,
/// while a live one sends a lease check every [`CHECK_EVERY`] and stops
/// once none succeeded for [`LEASE`]. The same bound as a cut-off
/// session's.
pub const SILENT_AFTER: Duration = SESSION_DEADLINE;

// The rule of the module docs, checked when the crate compiles.
const _: () = assert!(
    LEASE.as_millis() + CHECK_EVERY.as_millis() + STOP_MARGIN.as_millis()
        <= SESSION_DEADLINE.as_millis(),
    "a coordinator must stop before the server can end its session"
);
const _: () = assert!(
    LEASE.as_millis() + CHECK_EVERY.as_millis() + STOP_MARGIN.as_millis()
        <= SILENT_AFTER.as_millis(),
    "a coordinator must stop before a standby may end its silent session"
);

/// What the watchdog makes of the lease at some instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A check succeeded within [`LEASE`]: carry on.
    Held,
    /// No check succeeded within [`LEASE`]: stop.
    Expired {
        /// How long since the last successful check was sent.
        since: Duration,
    },
    /// A check found the lock gone, or taken by another coordinator.
    Lost(String),
}

/// The lease: when the last successful check was sent, or why it was lost.
#[derive(Debug)]
pub struct Lease {
    state: State,
}

#[derive(Debug)]
enum State {
    /// The send time of the last successful check.
    Held(Instant),
    Lost(String),
}

impl Lease {
    /// A lease whose lock was taken by a query sent at `sent`.
    pub fn taken(sent: Instant) -> Lease {
        Lease {
            state: State::Held(sent),
        }
    }

    /// A check sent at `sent` succeeded: the session held the lock when
    /// the server answered it. An older send time changes nothing (checks
    /// and commits may finish out of order).
    pub fn renewed(&mut self, sent: Instant) {
        if let State::Held(last) = &mut self.state {
            *last = (*last).max(sent);
        }
    }

    /// A check found the lock not held: lost for good.
    pub fn lost(&mut self, why: String) {
        if let State::Held(_) = self.state {
            self.state = State::Lost(why);
        }
    }

    /// When the lease runs out unless a check renews it first: the
    /// watchdog wakes then too, so that it stops at the lease's end, not
    /// up to a [`CHECK_EVERY`] later. `None` once lost.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Held(sent) => Some(sent + LEASE),
            State::Lost(_) => None,
        }
    }

    /// Whether the lease holds at `now`.
    pub fn verdict(&self, now: Instant) -> Verdict {
        match &self.state {
            State::Lost(why) => Verdict::Lost(why.clone()),
            State::Held(sent) => {
                let since = now.saturating_duration_since(*sent);
                if since >= LEASE {
                    Verdict::Expired { since }
                } else {
                    Verdict::Held
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_counts_from_the_send_time_of_the_last_successful_check() {
        let start = Instant::now();
        let mut lease = Lease::taken(start);
        assert_eq!(lease.verdict(start + LEASE / 2), Verdict::Held);
        // Sent at 1s, answered much later: the lease runs from 1s.
        lease.renewed(start + Duration::from_secs(1));
        assert_eq!(
            lease.verdict(start + Duration::from_secs(1) + LEASE - Duration::from_millis(1)),
            Verdict::Held
        );
        assert_eq!(
            lease.verdict(start + Duration::from_secs(1) + LEASE),
            Verdict::Expired { since: LEASE }
        );
        assert_eq!(
            lease.deadline(),
            Some(start + Duration::from_secs(1) + LEASE)
        );
        // A slower, older check answered last moves nothing back.
        lease.renewed(start);
        assert!(matches!(
            lease.verdict(start + Duration::from_secs(1) + LEASE),
            Verdict::Expired { .. }
        ));
    }

    #[test]
    fn a_lost_lock_is_lost_for_good() {
        let start = Instant::now();
        let mut lease = Lease::taken(start);
        lease.lost("taken by another".into());
        lease.renewed(start + Duration::from_secs(1));
        assert_eq!(lease.deadline(), None);
        assert_eq!(
            lease.verdict(start + Duration::from_secs(1)),
            Verdict::Lost("taken by another".into())
        );
    }

    #[test]
    fn the_coordinator_stops_before_the_server_may_end_its_session() {
        // The const assertion, said as a test too: checked every
        // CHECK_EVERY, expired after LEASE, stopped within STOP_MARGIN.
        assert!(LEASE + CHECK_EVERY + STOP_MARGIN <= SESSION_DEADLINE);
        assert_eq!(SESSION_DEADLINE, Duration::from_secs(8));
    }
}
