//! Holding the database: taking the coordinator lock when opening
//! (waiting as a standby while another coordinator holds it), and keeping
//! it (the lease checks and
//! the watchdog that runs them; the rule they keep is in `lease.rs`). No
//! other file takes or checks the lock.

use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::conn::{Conn, Connect};
use super::lease::{CHECK_EVERY, LEASE, Lease, SILENT_AFTER, Verdict};
use super::{COORDINATOR_LOCK, PgStore, Target, connect_failed};
use crate::store::StoreError;

/// How often a standby tries the coordinator lock: about the delay from
/// the active's session ending to a standby holding the database.
pub const STANDBY_POLL: Duration = Duration::from_millis(150);
/// How long a standby whose own connection was lost waits before it
/// connects again.
const STANDBY_RECONNECT: Duration = Duration::from_secs(1);

/// How often a standby looks at how long the active's session has been
/// silent (see [`end_a_silent_holder`]).
const SILENT_LOOK_EVERY: Duration = Duration::from_secs(1);

/// The session holding [`COORDINATOR_LOCK`] in this database, and for how
/// many seconds, by the server's clock, it has been waiting for its
/// coordinator (idle, or idle in a transaction); `NULL` while it runs a
/// query, or when this role may not see it.
const HOLDER: &str = "SELECT l.pid,
        CASE WHEN a.state LIKE 'idle%'
             THEN EXTRACT(EPOCH FROM clock_timestamp() - a.state_change)::float8 END
    FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND ((l.classid::bigint << 32) | l.objid::bigint) = $1";

/// Whether this session holds [`COORDINATOR_LOCK`] (a bigint advisory lock
/// shows in `pg_locks` as its high and low 32 bits, `objsubid` 1).
const HOLDS_LOCK: &str = "SELECT EXISTS (SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid() AND objsubid = 1
      AND ((classid::bigint << 32) | objid::bigint) = $1)";

impl PgStore {
    pub(super) fn lease(&self) -> MutexGuard<'_, Lease> {
        // A lease is whole whatever panicked.
        self.lease.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the lease holds at `now` (see `lease.rs`).
    pub fn lease_verdict(&self, now: Instant) -> Verdict {
        self.lease().verdict(now)
    }

    /// Checks, on the write connection, that this coordinator's session
    /// still holds the coordinator lock: renews the lease from the check's
    /// send time when it does, loses it when the lock or the session is
    /// gone. A check that gets no answer changes nothing: the lease runs
    /// out by itself. Blocks (the blocking pool), at most [`LEASE`] once it
    /// has the write connection.
    pub fn check_lease(&self) {
        let op = "checking the coordinator lock";
        let Ok(slot) = self.writer.lock() else {
            self.lease()
                .lost("the write connection's lock was poisoned".into());
            return;
        };
        let Some(conn) = slot.as_ref().filter(|conn| !conn.is_closed()) else {
            self.lease().lost(
                "the session holding the coordinator lock ended (the database closed it, or a write failed)"
                    .into(),
            );
            return;
        };
        let sent = Instant::now();
        let checked = self.run_unbounded(async {
            tokio::time::timeout(LEASE, conn.query_opt(op, HOLDS_LOCK, &[&COORDINATOR_LOCK])).await
        });
        match checked {
            Ok(Ok(Some(row))) if row.get::<_, bool>(0) => self.lease().renewed(sent),
            Ok(Ok(_)) => self
                .lease()
                .lost("this coordinator's session no longer holds the coordinator lock".into()),
            Ok(Err(_)) if conn.is_closed() => self.lease().lost(
                "the session holding the coordinator lock ended (the database closed it)".into(),
            ),
            Ok(Err(err)) => tracing::warn!(error = %err, "the lease check failed"),
            Err(_) => tracing::warn!("the lease check got no answer within {LEASE:?}"),
        }
    }

    /// The active coordinator's lease watchdog: checks the lease every
    /// [`CHECK_EVERY`] (on the blocking pool, one check at a time) and
    /// answers why once it is lost or no check succeeded within [`LEASE`];
    /// `None` once `cancel` is cancelled. Runs on the caller's runtime.
    pub async fn watch_lease(self: Arc<Self>, cancel: CancellationToken) -> Option<String> {
        // A first check before the first verdict: a long load since the
        // lock was taken is not a lost lease.
        let store = Arc::clone(&self);
        let mut check = Some(tokio::task::spawn_blocking(move || store.check_lease()));
        if let Some(first) = check.take() {
            let _ = first.await;
        }
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The next tick, or the lease's end if that comes first: it
            // stops when the lease runs out, not at the tick after.
            let deadline = self.lease().deadline();
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tick.tick() => {}
                _ = sleep_until_some(deadline) => {}
            }
            match self.lease_verdict(Instant::now()) {
                Verdict::Held => {}
                Verdict::Expired { since } => {
                    return Some(format!(
                        "no check that this coordinator holds the database succeeded for {since:?} (its lease is {LEASE:?})"
                    ));
                }
                Verdict::Lost(why) => return Some(why),
            }
            if check.as_ref().is_none_or(|check| check.is_finished()) {
                let store = Arc::clone(&self);
                check = Some(tokio::task::spawn_blocking(move || store.check_lease()));
            }
        }
    }
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Whether `conn`'s session got [`COORDINATOR_LOCK`] (it may hold it
/// already: then it holds it twice, which changes nothing).
async fn try_lock(conn: &Conn, target: &Target) -> Result<bool, StoreError> {
    let row = conn
        .client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&COORDINATOR_LOCK])
        .await
        .map_err(|err| connect_failed(target, &err))?;
    Ok(row.get::<_, bool>(0))
}

/// Opens the write connection and takes [`COORDINATOR_LOCK`] on it: at
/// once when it is free, else as a standby, trying every
/// [`STANDBY_POLL`] (and connecting again, every [`STANDBY_RECONNECT`],
/// when its own connection is lost) until it gets it or `cancel` is
/// cancelled (`None`). Answers the connection and when the query that
/// got the lock was sent, where the lease starts. The first connection
/// failing is an error: the database cannot be reached at all.
pub(super) async fn take_database(
    connect: &Connect,
    target: &Target,
    cancel: &CancellationToken,
) -> Result<Option<(Conn, Instant)>, StoreError> {
    let mut conn = Conn::open(connect, target).await?;
    let mut standby = false;
    let mut looked = Instant::now();
    let mut look_failed = false;
    loop {
        let sent = Instant::now();
        let pause = match try_lock(&conn, target).await {
            Ok(true) => {
                if standby {
                    tracing::info!(database = %target.0, "the database is free: this coordinator takes over");
                }
                return Ok(Some((conn, sent)));
            }
            Ok(false) => {
                if !standby {
                    standby = true;
                    tracing::info!(
                        database = %target.0,
                        "standby: another coordinator holds the database; this one takes over once it lets go, and until then does not listen"
                    );
                }
                if looked.elapsed() >= SILENT_LOOK_EVERY {
                    looked = Instant::now();
                    match end_a_silent_holder(&conn).await {
                        Ok(_) => look_failed = false,
                        // Once per run of failures: a role that may not
                        // end the active's session fails every second.
                        Err(err) if !look_failed => {
                            look_failed = true;
                            tracing::warn!(error = %err, "standby: cannot look at or end the active coordinator's session; waiting for it to let go");
                        }
                        Err(_) => {}
                    }
                }
                STANDBY_POLL
            }
            Err(err) if standby => {
                tracing::warn!(error = %err, "standby: the database connection failed; connecting again");
                STANDBY_RECONNECT
            }
            Err(err) => return Err(err),
        };
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(pause) => {}
        }
        if conn.is_closed() {
            match Conn::open(connect, target).await {
                Ok(open) => conn = open,
                Err(err) => tracing::warn!(error = %err, "standby: cannot reach the database"),
            }
        }
    }
}

/// Ends the session holding [`COORDINATOR_LOCK`] when it has waited for
/// its coordinator for [`SILENT_AFTER`]: that coordinator is frozen
/// (SIGSTOP, a paused VM) while its kernel still answers, so the server
/// would keep the session, and the lock, for as long as that lasts. The
/// active checks its lease every [`CHECK_EVERY`] on that session, and a
/// live one stops once no check succeeded for [`LEASE`] (`lease.rs`), so
/// a session silent that long has no coordinator acting on it; ending it
/// is what the server does to a session cut off from its coordinator. A
/// session running a query (a long load at start) is never ended.
/// Answers whether it ended one.
async fn end_a_silent_holder(conn: &Conn) -> Result<bool, tokio_postgres::Error> {
    let Some(row) = conn.client.query_opt(HOLDER, &[&COORDINATOR_LOCK]).await? else {
        return Ok(false);
    };
    let pid: i32 = row.get(0);
    let Some(silent) = row.get::<_, Option<f64>>(1) else {
        return Ok(false);
    };
    if silent < SILENT_AFTER.as_secs_f64() {
        return Ok(false);
    }
    let ended = conn
        .client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await?
        .get::<_, bool>(0);
    if ended {
        tracing::warn!(
            pid,
            silent_s = silent,
            "standby: the active coordinator's database session has been silent for {silent:.1}s (a frozen or paused coordinator); ended it to take over"
        );
    }
    Ok(ended)
}
