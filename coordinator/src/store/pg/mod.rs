//! The PostgreSQL store: what one coordinator keeps, in a database instead
//! of the data dir's log (`--database-url`). Same records, same contract
//! (`store/tests.rs` runs on it): bodies are the prost bytes `codec.rs`
//! writes for every engine, columns only what SQL filters or orders on.
//!
//! The [`Store`] trait is synchronous and is called from the blocking
//! pool, while tokio-postgres is async. So a `PgStore` owns a small
//! runtime of its own (`weft-pg`: one worker thread) that drives its two
//! connections, and every trait method `block_on`s its query there from
//! the calling thread. That works whatever runtime the caller is on, as
//! long as the caller is not itself an async task (the contract for every
//! store call already); dropping the store hands the runtime back without
//! blocking, so it may be dropped anywhere.
//!
//! One active coordinator per database, any number of standbys: the write
//! connection holds a session-level advisory lock ([`COORDINATOR_LOCK`])
//! for as long as it is open. Opening takes it first, before the schema
//! is touched; while another coordinator holds it, opening waits as a
//! standby ([`PgStore::open_until`]: polling every [`STANDBY_POLL`], until
//! told to stop) and returns holding it once PostgreSQL has ended the
//! other's session. The write connection is never opened again: once its
//! session ended, another coordinator may hold the database, so every
//! later write fails with [`StoreError::LostDatabase`], the lease is lost,
//! and this coordinator stops (to come back as a standby). Nothing it does
//! after losing the lock is recorded.
//!
//! The active one keeps a lease on the database (`lease.rs`: the timings
//! and the rule that makes split brain impossible):
//! [`PgStore::watch_lease`] checks on the write connection that its
//! session still holds the lock, and answers why once the lease is lost,
//! before PostgreSQL may end that session and let a standby in.
//!
//! Connections: one for writes (commits, tokens, retention, a restart's
//! load; one transaction at a time, behind a mutex), one for reads (shared:
//! tokio-postgres pipelines concurrent queries on it). A lost connection
//! for reads is opened again by the next call (`conn.rs`), and a read
//! that met the loss is tried once more on the new one; a write never is:
//! a failed commit (its outcome may be unknown) loses the database as a
//! lost write session does. While the server is down, reads fail with
//! [`StoreError::Unreachable`] (clients are told to retry later).
//!
//! Layout: `hold.rs` (taking the lock, as a standby if need be; the
//! lease checks and watchdog), `lease.rs` (the lease and its timings),
//! `ca.rs` (the cluster CA's row), `conn.rs`
//! (connections, their session settings and prepared statements),
//! `migrate.rs` (the versioned schema, `sql/`), `commit.rs` (one
//! commit = one transaction, checked as the log checks it), `types.rs`
//! (ids as uuid), `testdb.rs` (tests, and the `test-postgres` feature for
//! the end-to-end tests: a private PostgreSQL server).

mod ca;
mod commit;
mod conn;
mod hold;
pub mod lease;
mod migrate;
#[cfg(any(test, feature = "test-postgres"))]
pub mod testdb;
#[cfg(test)]
mod tests;
mod tls;
mod types;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::Config;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use weft_proto::{Attempt, Outcome, SecretEnv, TaskId, TaskState};

use super::codec::{
    decode_event, decode_node_identity, decode_secrets, decode_spec, decode_task_with_spec,
    decode_token, encode_node_identity, encode_token, task_wire_bytes,
};
use super::engine::{ListPage, ListQuery, Store, StoreError, scan_page};
use super::record::{
    FinalAttempt, Loaded, MAX_RECENTLY_FINAL, NodeIdentityRecord, TaskEvent, TaskRecord, next_chunk,
};
use super::{Record, decode_schedule};
use crate::auth::TokenRecord;
pub use ca::StoredCa;
use conn::{Conn, Connect};
pub use hold::STANDBY_POLL;
use hold::take_database;
use lease::{KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, Lease};
use types::Uuid;

/// How long opening waits for the server when the URL sets no
/// `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest any one call but a restart's load may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The session-level advisory lock the write connection holds: one
/// active coordinator per database ("weftcrd" in ASCII; the migrations
/// take another).
const COORDINATOR_LOCK: i64 = 0x0077_6566_7463_7264;

/// Live tasks a restart's load fetches at a time.
const LOAD_BATCH: i32 = 1000;
/// Task ids (with their sizes) a list page reads at a time.
const LIST_BATCH: i64 = 256;

/// Tasks, events and the rest in PostgreSQL. See the module docs.
pub struct PgStore {
    /// `Some` until dropped.
    rt: Option<tokio::runtime::Runtime>,
    /// How to connect again.
    connect: Connect,
    /// `None` once lost: the next write reconnects.
    writer: Mutex<Option<Conn>>,
    /// `None` once lost: the next read reconnects.
    reader: Mutex<Option<Arc<Conn>>>,
    target: Target,
    /// Renewed by each successful lease check and commit.
    lease: Mutex<Lease>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target.0)
            .finish()
    }
}

/// Where the database is, as errors and logs name it: hosts, ports,
/// database and user, never the password.
#[derive(Clone, Debug)]
pub(super) struct Target(String);

impl Target {
    fn of(config: &Config) -> Target {
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|host| match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
        Target(format!(
            "postgresql://{}@{}:{}/{}",
            config.get_user().unwrap_or(""),
            hosts.join(","),
            ports.join(","),
            config.get_dbname().unwrap_or("")
        ))
    }

    /// The database at this target cannot be used: its schema, or a URL
    /// asking for what the store cannot do (TLS).
    fn refused(&self, message: String) -> StoreError {
        StoreError::Database {
            target: self.0.clone(),
            message,
        }
    }
}

/// A driver error in words: the server's message, or the driver's with
/// its causes ("error connecting to server: Connection refused").
fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!("{} ({}): {}", db.severity(), db.code().code(), db.message());
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A connection that could not be opened or set up, as a store error:
/// [`StoreError::Unreachable`] when the server could not be reached or
/// would not take connections for now (see [`is_unreachable`]), worth
/// trying again later; [`StoreError::Database`] when it refused this
/// coordinator (the login, the database, TLS), which a retry does not mend.
pub(super) fn connect_failed(target: &Target, err: &tokio_postgres::Error) -> StoreError {
    let (target, message) = (target.0.clone(), describe(err));
    if is_unreachable(err) {
        StoreError::Unreachable { target, message }
    } else {
        StoreError::Database { target, message }
    }
}

/// Whether `err` says the server is not there for now: the connection
/// closed, or the socket failed (refused, reset, timed out: the driver's
/// own error kinds are private, so its cause is looked at), or the server
/// answered that it takes no connections now (starting up, shutting down,
/// too many connections, a connection exception).
fn is_unreachable(err: &tokio_postgres::Error) -> bool {
    use std::io::ErrorKind;
    use tokio_postgres::error::SqlState;

    if err.is_closed() {
        return true;
    }
    if let Some(code) = err.code() {
        return code.code().starts_with("08")
            || [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::TOO_MANY_CONNECTIONS,
            ]
            .contains(code);
    }
    std::error::Error::source(err)
        .and_then(|cause| cause.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::NotConnected
                    | ErrorKind::BrokenPipe
                    | ErrorKind::TimedOut
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::NetworkDown
                    | ErrorKind::AddrNotAvailable
            )
        })
}

/// A driver error as a store error: a full disk on the server is
/// [`StoreError::DiskFull`], anything else [`StoreError::Backend`].
pub(super) fn backend(op: &'static str, err: &tokio_postgres::Error) -> StoreError {
    let message = describe(err);
    let full = err.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL);
    if full {
        StoreError::DiskFull { op, message }
    } else {
        StoreError::Backend { op, message }
    }
}

impl PgStore {
    /// Connects to the database at `url` (a `postgresql://` URL or
    /// `key=value` pairs, as libpq takes them), takes it (waiting as a
    /// standby, however long, while another coordinator holds it) and
    /// brings its schema up to date. An unreachable server is
    /// [`StoreError::Unreachable`]; a refused login or a schema from a
    /// newer coordinator is [`StoreError::Database`].
    pub fn open(url: &str) -> Result<PgStore, StoreError> {
        let never = CancellationToken::new();
        Ok(Self::open_until(url, &never)?.expect("only a cancelled open answers None"))
    }

    /// [`open`](Self::open), but a standby stops waiting once `cancel` is
    /// cancelled, answering `None`. Logs once at info when it waits.
    pub fn open_until(
        url: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<PgStore>, StoreError> {
        let tls::Parsed { mut config, tls } = tls::parse(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("weft-coordinator");
        }
        // This side's keepalives, as the server's (`conn.rs`): a
        // coordinator notices a database gone silent too.
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_COUNT)
            .tcp_user_timeout(lease::SESSION_DEADLINE);
        let target = Target::of(&config);
        let connect = Connect { config, tls };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weft-pg")
            .enable_all()
            .build()
            .map_err(|err| StoreError::Database {
                target: target.0.clone(),
                message: format!("starting its runtime: {err}"),
            })?;
        let taken = rt.block_on(take_database(&connect, &target, cancel));
        let Some((mut writer, sent)) = taken? else {
            rt.shutdown_background();
            return Ok(None);
        };
        // The schema only once the database is this coordinator's: a
        // standby never changes it under the active one.
        rt.block_on(migrate::migrate(&mut writer.client, &target))?;
        let reader = rt.block_on(Conn::open(&connect, &target))?;
        Ok(Some(PgStore {
            rt: Some(rt),
            connect,
            writer: Mutex::new(Some(writer)),
            reader: Mutex::new(Some(Arc::new(reader))),
            target,
            lease: Mutex::new(Lease::taken(sent)),
        }))
    }

    /// Where the database is (no password), as logs name it.
    pub fn target(&self) -> &str {
        &self.target.0
    }

    /// The read connection, opened again if it was lost.
    fn reader(&self) -> Result<Arc<Conn>, StoreError> {
        let mut slot = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        if let Some(conn) = slot.as_ref().filter(|conn| !conn.is_closed()) {
            return Ok(Arc::clone(conn));
        }
        *slot = None;
        let conn = Arc::new(self.run_unbounded(Conn::open(&self.connect, &self.target))?);
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    /// Runs a read on the read connection; if it failed because that
    /// connection was lost, once more on a new one (a read changes
    /// nothing, so trying again is safe).
    fn read<T, F, Fut>(&self, op: &'static str, read: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let conn = self.reader()?;
        match self.run(op, read(Arc::clone(&conn))) {
            Err(_) if conn.is_closed() => self.run(op, read(self.reader()?)),
            result => result,
        }
    }

    /// The write connection, held until the guard drops. Never opened
    /// again once lost: its session held the coordinator lock, and from
    /// the moment it ended another coordinator may have taken the database
    /// over, so this one has lost it (the lease too) and writes nothing
    /// more; it stops and comes back as a standby.
    fn writer(&self) -> Result<Writer<'_>, StoreError> {
        let slot = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        if slot.as_ref().is_none_or(Conn::is_closed) {
            return Err(self.lost("the session holding the coordinator lock ended".into()));
        }
        Ok(Writer(slot))
    }

    /// Marks the lease lost for `why` and answers the error every write
    /// gets from then on.
    fn lost(&self, why: String) -> StoreError {
        self.lease().lost(why.clone());
        StoreError::LostDatabase {
            target: self.target.0.clone(),
            message: why,
        }
    }

    /// Runs `fut` on the store's runtime, bounded by [`CALL_TIMEOUT`].
    fn run<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.run_unbounded(async {
            tokio::time::timeout(CALL_TIMEOUT, fut)
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Backend {
                        op,
                        message: format!("no answer from the database within {CALL_TIMEOUT:?}"),
                    })
                })
        })
    }

    /// Runs `fut` on the store's runtime, however long it takes.
    fn run_unbounded<T>(&self, fut: impl Future<Output = T>) -> T {
        self.rt
            .as_ref()
            .expect("the runtime is taken only by Drop")
            .block_on(fut)
    }

    /// Up to [`LIST_BATCH`] ids of `query`'s state in `[from, before)`,
    /// in the query's order, past `cursor` (the last id of the batch
    /// before), each with its stored size (record and spec): read without
    /// the rows themselves, which [`list_rows`](Self::list_rows) fetches
    /// as many at a time as the page's budget has room for.
    fn list_sizes(
        &self,
        query: &ListQuery,
        (from, before): (u128, u128),
        cursor: Option<u128>,
    ) -> Result<Vec<(TaskId, usize)>, StoreError> {
        let op = "listing tasks";
        let (after, lo, hi, order) = match (query.ascending, cursor) {
            (true, Some(c)) => (">", c, before, "ASC"),
            (true, None) => (">=", from, before, "ASC"),
            (false, Some(c)) => (">=", from, c, "DESC"),
            (false, None) => (">=", from, before, "DESC"),
        };
        let state = query.state.map(state_number);
        // `octet_length` of a bytea reads its size, not its (TOASTed) bytes.
        let sql = format!(
            "SELECT t.id, octet_length(t.record)::int8 + octet_length(s.spec)
             FROM tasks t JOIN task_specs s ON s.id = t.id
             WHERE t.id {after} $1 AND t.id < $2 {} ORDER BY t.id {order} LIMIT $3",
            if state.is_some() {
                "AND t.state = $4"
            } else {
                ""
            }
        );
        let (lo, hi) = (Uuid(lo), Uuid(hi));
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&lo, &hi, &LIST_BATCH];
        if let Some(state) = &state {
            params.push(state);
        }
        let (sql, params) = (&sql, &params);
        self.read(op, |reader| async move {
            let rows = reader.query(op, sql, params).await?;
            Ok(rows
                .iter()
                .map(|row| {
                    let size = row.get::<_, i64>(1);
                    (
                        row.get::<_, Uuid>(0).task(),
                        usize::try_from(size).unwrap_or(0),
                    )
                })
                .collect())
        })
    }

    /// The tasks `ids` (those still there), in no order.
    fn list_rows(&self, ids: &[TaskId]) -> Result<Vec<TaskRecord>, StoreError> {
        let op = "listing tasks";
        let keys: Vec<Uuid> = ids.iter().map(|id| Uuid::from(*id)).collect();
        let keys = &keys;
        self.read(op, |reader| async move {
            let rows = reader
                .query(
                    op,
                    "SELECT t.id, t.record, t.next_seq, s.spec
                     FROM tasks t JOIN task_specs s ON s.id = t.id WHERE t.id = ANY($1)",
                    &[keys],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    task_of(
                        row.get::<_, Uuid>(0).task(),
                        row.get(1),
                        row.get(2),
                        row.get(3),
                    )
                })
                .collect()
        })
    }
}

/// Takes from the front of `sized` the ids whose sizes add up to at most
/// `room` bytes, and always one (a page holds at least one task).
fn take_fitting(sized: &mut VecDeque<(TaskId, usize)>, room: usize) -> Vec<TaskId> {
    let mut taken = Vec::new();
    let mut bytes = 0usize;
    while let Some(&(id, size)) = sized.front() {
        bytes = bytes.saturating_add(size);
        if !taken.is_empty() && bytes > room {
            break;
        }
        taken.push(id);
        sized.pop_front();
    }
    taken
}

/// The write connection, held: there is one while the guard lives.
struct Writer<'s>(MutexGuard<'s, Option<Conn>>);

impl Writer<'_> {
    /// Drops the connection after a failure that may have left it
    /// mid-transaction: the next write starts on a new one.
    fn discard(mut self) {
        *self.0 = None;
    }
}

impl Deref for Writer<'_> {
    type Target = Conn;

    fn deref(&self) -> &Conn {
        self.0
            .as_ref()
            .expect("a Writer is made only with a connection in its slot")
    }
}

impl DerefMut for Writer<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.0
            .as_mut()
            .expect("a Writer is made only with a connection in its slot")
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Not `Runtime::drop`, which blocks and panics inside async code.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A task's record from its row: `record`, `next_seq`, `spec`.
fn task_of(
    id: TaskId,
    record: &[u8],
    next_seq: i64,
    spec: &[u8],
) -> Result<TaskRecord, StoreError> {
    let mut task = decode_task_with_spec(id, record, decode_spec(spec)?)?;
    task.next_seq = u64::try_from(next_seq).unwrap_or(0);
    Ok(task)
}

fn state_of(number: i16) -> Result<TaskState, StoreError> {
    TaskState::try_from(i32::from(number)).map_err(|e| StoreError::Corrupt {
        what: "task state",
        message: e.to_string(),
    })
}

/// A state's `weft.v1` number, as the `state` column holds it.
pub(super) fn state_number(state: TaskState) -> i16 {
    i16::try_from(i32::from(state)).unwrap_or(i16::MAX)
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Store for PgStore {
    fn commit(&self, records: &[Record]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut writer = self.writer()?;
        let sent = Instant::now();
        let result = self.run("committing", commit::commit(&mut writer, records));
        match result {
            // Committed on the session that holds the lock: as good as a
            // lease check sent when the commit was.
            Ok(()) => {
                self.lease().renewed(sent);
                Ok(())
            }
            // Its outcome is unknown, and the session may be gone: this
            // coordinator writes nothing more.
            Err(StoreError::Backend { message, .. }) => {
                writer.discard();
                Err(self.lost(format!("a commit failed: {message}")))
            }
            Err(err) => Err(err),
        }
    }

    fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let op = "reading a task";
        self.read(op, |reader| async move {
            let row = reader.query_opt(op, READ_TASK, &[&Uuid::from(id)]).await?;
            row.map(|row| task_of(id, row.get(0), row.get(1), row.get(2)))
                .transpose()
        })
    }

    fn list_page(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let from = query.from.map_or(0, TaskId::as_u128);
        let before = query.before.map_or(u128::MAX, TaskId::as_u128);
        if from >= before {
            return Ok(ListPage::default());
        }
        // Ids are read a batch at a time, in the page's order, with their
        // rows' sizes; the rows then a chunk at a time, as many as what is
        // left of the page's budget has room for (at least one), so a page
        // of large tasks never fetches a batch of them. `scan_page` decides
        // how far to go and takes each record read.
        let read: RefCell<HashMap<TaskId, TaskRecord>> = RefCell::new(HashMap::new());
        let spent = Cell::new(0usize);
        let mut sized: VecDeque<(TaskId, usize)> = VecDeque::new();
        let mut fetched: VecDeque<TaskId> = VecDeque::new();
        let mut cursor = None;
        let mut done = false;
        let ids = std::iter::from_fn(|| {
            if fetched.is_empty() {
                if sized.is_empty() && !done {
                    match self.list_sizes(query, (from, before), cursor) {
                        Ok(batch) => {
                            done = batch.len() < LIST_BATCH as usize;
                            cursor = batch.last().map(|(id, _)| id.as_u128()).or(cursor);
                            sized.extend(batch);
                        }
                        Err(err) => {
                            done = true;
                            return Some(Err(err));
                        }
                    }
                }
                let room = query.budget.saturating_sub(spent.get());
                let chunk = take_fitting(&mut sized, room);
                if !chunk.is_empty() {
                    match self.list_rows(&chunk) {
                        Ok(tasks) => {
                            let mut read = read.borrow_mut();
                            read.extend(tasks.into_iter().map(|task| (task.id, task)));
                            // An id whose row went meanwhile reads as no match.
                            fetched.extend(chunk);
                        }
                        Err(err) => {
                            (done, sized) = (true, VecDeque::new());
                            return Some(Err(err));
                        }
                    }
                }
            }
            fetched.pop_front().map(Ok)
        });
        scan_page(ids, query, |id| {
            let task = read.borrow_mut().remove(&id);
            let task = task.filter(|task| query.matches(task));
            if let Some(task) = &task {
                spent.set(spent.get().saturating_add(task_wire_bytes(task)));
            }
            Ok(task)
        })
    }

    fn events(
        &self,
        id: TaskId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<TaskEvent>, StoreError> {
        let op = "reading events";
        self.read(op, |reader| async move {
            let key = Uuid::from(id);
            let params: [&(dyn ToSql + Sync); 3] = [&key, &clamp(from_seq), &clamp(limit as u64)];
            let Some(row) = reader.query_opt(op, READ_EVENTS, &params).await? else {
                return Ok(Vec::new());
            };
            let bodies: Vec<&[u8]> = row.get(1);
            if bodies.is_empty() {
                return Ok(Vec::new());
            }
            // The spec goes back into a `finished` event's record.
            let spec = row.get::<_, Option<&[u8]>>(0).ok_or_else(|| {
                StoreError::Inconsistent(format!("events of {id} without its spec"))
            })?;
            let spec = decode_spec(spec)?;
            bodies
                .iter()
                .map(|body| decode_event(id, body, &spec))
                .collect()
        })
    }

    fn load_each(
        &self,
        final_since: SystemTime,
        live: &mut dyn FnMut(TaskRecord, Option<Arc<SecretEnv>>),
    ) -> Result<Loaded, StoreError> {
        let mut writer = self.writer()?;
        self.run_unbounded(load_each(&mut writer, final_since, live))
    }

    fn expire(
        &self,
        finished_before: SystemTime,
        limit: usize,
        keep: &[TaskId],
    ) -> Result<Vec<TaskState>, StoreError> {
        let op = "expiring tasks";
        let keep: Vec<Uuid> = keep.iter().map(|id| Uuid::from(*id)).collect();
        let writer = self.writer()?;
        self.run(op, async {
            let rows = writer
                .query(
                    op,
                    "WITH gone AS (
                        DELETE FROM tasks WHERE id IN (
                            SELECT id FROM tasks WHERE finished_at < $1
                                AND NOT (id = ANY($3))
                            ORDER BY finished_at, id LIMIT $2)
                        RETURNING id, state, finished_at),
                     events AS (DELETE FROM events e USING gone WHERE e.task_id = gone.id),
                     specs AS (DELETE FROM task_specs s USING gone WHERE s.id = gone.id),
                     secrets AS (DELETE FROM task_secrets x USING gone WHERE x.id = gone.id)
                     SELECT state FROM gone ORDER BY finished_at, id",
                    &[&finished_before, &clamp(limit as u64), &keep],
                )
                .await?;
            rows.iter().map(|row| state_of(row.get(0))).collect()
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let op = "reading tokens";
        self.read(op, |reader| async move {
            let rows = reader
                .query(op, "SELECT record FROM tokens ORDER BY id", &[])
                .await?;
            rows.iter().map(|row| decode_token(row.get(0))).collect()
        })
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let op = "writing a token";
        let writer = self.writer()?;
        self.run(op, async {
            writer
                .execute(op, PUT_TOKEN, &[&token.id, &encode_token(token)])
                .await?;
            Ok(())
        })
    }

    fn node_identities(&self) -> Result<Vec<NodeIdentityRecord>, StoreError> {
        let op = "reading node identities";
        self.read(op, |reader| async move {
            let rows = reader
                .query(op, "SELECT record FROM node_identities ORDER BY id", &[])
                .await?;
            rows.iter()
                .map(|row| decode_node_identity(row.get(0)))
                .collect()
        })
    }

    fn put_node_identity(
        &self,
        identity: &NodeIdentityRecord,
        token: Option<&TokenRecord>,
    ) -> Result<(), StoreError> {
        let op = "writing a node identity";
        let mut writer = self.writer()?;
        self.run(op, async {
            let Conn { client, statements } = &mut *writer;
            let tx = client.transaction().await.map_err(|e| backend(op, &e))?;
            let put_identity = statements
                .get(
                    &tx,
                    "INSERT INTO node_identities (id, record) VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                )
                .await
                .map_err(|e| backend(op, &e))?;
            tx.execute(
                &put_identity,
                &[&Uuid::from(identity.id), &encode_node_identity(identity)],
            )
            .await
            .map_err(|e| backend(op, &e))?;
            if let Some(token) = token {
                let put_token = statements
                    .get(&tx, PUT_TOKEN)
                    .await
                    .map_err(|e| backend(op, &e))?;
                tx.execute(&put_token, &[&token.id, &encode_token(token)])
                    .await
                    .map_err(|e| backend(op, &e))?;
            }
            tx.commit().await.map_err(|e| backend(op, &e))
        })
    }
}

const READ_TASK: &str = "SELECT t.record, t.next_seq, s.spec
    FROM tasks t JOIN task_specs s ON s.id = t.id WHERE t.id = $1";

/// A task's spec and events, in one statement so that both come from one
/// snapshot: read apart, retention could delete the task between them.
const READ_EVENTS: &str = "SELECT (SELECT spec FROM task_specs WHERE id = $1),
    ARRAY(SELECT body FROM events WHERE task_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3)";

const PUT_TOKEN: &str = "INSERT INTO tokens (id, record) VALUES ($1, $2)
    ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record";

/// What [`Store::load_each`] reads, in one snapshot (a repeatable-read
/// transaction): live tasks come through a portal, [`LOAD_BATCH`] at a
/// time, so a restart never holds them all.
async fn load_each(
    conn: &mut Conn,
    final_since: SystemTime,
    live: &mut dyn FnMut(TaskRecord, Option<Arc<SecretEnv>>),
) -> Result<Loaded, StoreError> {
    let op = "loading";
    let err = |e: tokio_postgres::Error| backend(op, &e);
    let Conn { client, statements } = conn;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(err)?;
    let mut loaded = Loaded::default();
    let counts = tx
        .query(
            "SELECT state, count(*) FROM tasks WHERE finished_at IS NOT NULL GROUP BY state",
            &[],
        )
        .await
        .map_err(err)?;
    let mut counts: Vec<(TaskState, u64)> = counts
        .iter()
        .map(|row| {
            Ok((
                state_of(row.get(0))?,
                u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
            ))
        })
        .collect::<Result<_, StoreError>>()?;
    counts.sort_by_key(|(state, _)| TaskState::ALL.iter().position(|s| s == state));
    loaded.final_counts = counts;
    let recent = tx
        .query(
            "SELECT id, attempt, outcome FROM tasks WHERE finished_at >= $1
             ORDER BY finished_at DESC, id DESC LIMIT $2",
            &[&final_since, &(MAX_RECENTLY_FINAL as i64)],
        )
        .await
        .map_err(err)?;
    for row in &recent {
        let id: Uuid = row.get(0);
        let attempt: i64 = row.get(1);
        let outcome: Option<i16> = row.get(2);
        loaded.recently_final.push(FinalAttempt {
            task_id: id.task(),
            attempt: Attempt(u32::try_from(attempt).unwrap_or(0)),
            outcome: outcome.and_then(|n| Outcome::try_from(i32::from(n)).ok()),
        });
    }
    let schedules = tx
        .query("SELECT record FROM schedules ORDER BY name", &[])
        .await
        .map_err(err)?;
    loaded.schedules = schedules
        .iter()
        .map(|row| decode_schedule(row.get(0)))
        .collect::<Result<_, _>>()?;
    let limits = tx
        .query("SELECT record FROM limits ORDER BY kind, name", &[])
        .await
        .map_err(err)?;
    loaded.limits = limits
        .iter()
        .map(|row| commit::decode_limit(row.get(0)))
        .collect::<Result<_, _>>()?;
    let portal = tx
        .bind(
            "SELECT t.id, t.record, t.next_seq, s.spec, x.env, t.state, t.attempt
             FROM tasks t JOIN task_specs s ON s.id = t.id LEFT JOIN task_secrets x ON x.id = t.id
             WHERE t.finished_at IS NULL ORDER BY t.id",
            &[],
        )
        .await
        .map_err(err)?;
    loop {
        let rows = tx.query_portal(&portal, LOAD_BATCH).await.map_err(err)?;
        for row in &rows {
            let id: Uuid = row.get(0);
            let task = task_of(id.task(), row.get(1), row.get(2), row.get(3))?;
            let secret = row
                .get::<_, Option<&[u8]>>(4)
                .map(decode_secrets)
                .transpose()?
                .map(Arc::new);
            let state = state_of(row.get(5))?;
            if matches!(state, TaskState::Assigned | TaskState::Running) {
                // The attempt's own events, newest first: where its output
                // chunks carry on.
                let statement = statements
                    .get(
                        &tx,
                        "SELECT body FROM events WHERE task_id = $1 AND attempt = $2 ORDER BY seq DESC",
                    )
                    .await
                    .map_err(err)?;
                let events = tx
                    .query(&statement, &[&id, &row.get::<_, i64>(6)])
                    .await
                    .map_err(err)?;
                let events = events
                    .iter()
                    .map(|e| decode_event(task.id, e.get(0), &task.spec))
                    .collect::<Result<Vec<_>, _>>()?;
                let next = next_chunk(task.attempt, events);
                if next > 0 {
                    loaded.next_chunks.push((task.id, next));
                }
            }
            live(task, secret);
        }
        if rows.len() < LOAD_BATCH as usize {
            break;
        }
    }
    tx.commit().await.map_err(err)?;
    Ok(loaded)
}
