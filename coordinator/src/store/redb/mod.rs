//! The durable store: one redb file, `weft.redb`, in the data dir.
//!
//! Each [`Store::commit`] is one write transaction committed with
//! `Durability::Immediate` (fsync) and quick-repair on, so what a commit
//! returned for survives `kill -9` and power loss, and reopening after a
//! crash does not walk the whole file. The driver calls `commit` once per
//! inbox batch, so a sync is shared by every task of the batch.
//!
//! Tables (keys are big-endian tuples, so ranges are in id = time order):
//! - `tasks`: task id (u128) -> `StoredTask` (prost, see `codec.rs`).
//! - `events`: (task id, seq) -> `pb::TaskEvent` without the task id.
//! - `tasks_by_state`: (state, task id) -> () — `List` by state and `load`.
//! - `final_by_time`: (updated_at ms, task id) -> () for final tasks —
//!   retention sweeps and recently finished results.
//! - `state_counts`: state -> number of tasks, so `load` does not count.
//! - `meta`: schema version, the store's id (repeated by the data dir's
//!   `STORE_ID` marker).
//! - `tokens`: token id -> token record (the SHA-256 of its secret, never
//!   the secret), written synchronously by the token rpcs.
//! - `secrets`, `node_identities`: see the constants below.
//!
//! Every value of `tasks`, `events`, `secrets`, `tokens`,
//! `node_identities`, `schedules` and `limits` ends in a checksum of its
//! key and bytes (`seal.rs`), checked on every read: damage is
//! [`StoreError::Damaged`], never served.
//!
//! Layout: this file has the tables, writes and reads; `open` opening (the
//! marker, the schema and its upgrade, damaged files); `load` what a
//! restart reads, live tasks one at a time.
//!
//! Opening takes redb's exclusive file lock: a second coordinator on the same
//! data dir gets [`StoreError::Locked`]. All methods block; callers on the
//! async runtime use `spawn_blocking`.

mod load;
mod open;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

use weft_proto::{SecretEnv, TaskId, TaskSpec, TaskState};

use super::codec::{
    decode_event, decode_node_identity, decode_task, decode_task_head, decode_token, encode_event,
    encode_node_identity, encode_secrets, encode_task, encode_token,
};
use super::encode_schedule;
use super::engine::{ListPage, ListQuery, Store, StoreError, scan_page};
use super::record::{Loaded, NodeIdentityRecord, Record, TaskEvent, TaskRecord, next_chunk};
use super::seal::{SealKey, open as unseal, seal};
use crate::auth::TokenRecord;
use load::{each_live, read_secrets};

const TASKS: TableDefinition<u128, &[u8]> = TableDefinition::new("tasks");
const EVENTS: TableDefinition<(u128, u64), &[u8]> = TableDefinition::new("events");
const BY_STATE: TableDefinition<(u8, u128), ()> = TableDefinition::new("tasks_by_state");
const FINAL_BY_TIME: TableDefinition<(u64, u128), ()> = TableDefinition::new("final_by_time");
const COUNTS: TableDefinition<u8, u64> = TableDefinition::new("state_counts");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Secret environments by task id: apart from `tasks`, which every reader
/// decodes, and only while the task is not final.
const SECRETS: TableDefinition<u128, &[u8]> = TableDefinition::new("secrets");
/// Token records by id: hashes of secrets only.
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Named limits (`SetLimit`) by "kind/name": the `Limit` message, sealed
/// (since schema 4).
const LIMITS: TableDefinition<&str, &[u8]> = TableDefinition::new("limits");
/// Node identities (joined or revoked nodes) by node id.
const NODE_IDENTITIES: TableDefinition<u128, &[u8]> = TableDefinition::new("node_identities");
/// Cron schedules by name (sealed like `tokens`); written in the driver's
/// commits, so a fire's task and the schedule's `last_fire` land together.
/// A store made before schedules existed has no such table until the first
/// schedule is written: reading it then finds none.
const SCHEDULES: TableDefinition<&str, &[u8]> = TableDefinition::new("schedules");

/// The file format this code writes; a newer one is refused. 2: every
/// value of `tasks`, `events`, `secrets`, `tokens` and `node_identities`
/// ends in its checksum (`seal.rs`); a schema-1 store is upgraded to it
/// once, when opened. 3: `state_counts` is keyed by every state's number
/// (schema 2 folded states 8 to 10 onto 0 to 2); an older store's counts
/// are recounted from `tasks_by_state` once, when opened. 4: every value
/// of `limits` ends in its checksum too; an older store's limits are
/// sealed once, when opened.
const SCHEMA_VERSION: u64 = 4;
/// The meta key of the store's random id, which the data dir's marker
/// file repeats (`marker.rs`).
const STORE_ID: &str = "store_id";
/// The database file's name inside the data dir.
pub const FILE_NAME: &str = "weft.redb";
/// Bytes of redb's page cache (read cache plus write buffer) when not
/// configured. redb's own default is 1 GiB, and pages it wrote stay cached,
/// so with it a big queue would keep most of the file in the coordinator's
/// memory; the store reads little on the hot path (the scheduler has the
/// live state), so a modest cache is enough.
pub const DEFAULT_CACHE_SIZE: usize = 64 * 1024 * 1024;

/// Tasks and events in a redb file. See the module docs.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

fn backend(op: &'static str) -> impl FnOnce(redb::Error) -> StoreError {
    move |err| {
        let message = err.to_string();
        if is_disk_full(&err) {
            StoreError::DiskFull { op, message }
        } else {
            StoreError::Backend { op, message }
        }
    }
}

/// True for the I/O errors of a full disk or an exhausted quota.
fn is_disk_full(err: &redb::Error) -> bool {
    match err {
        redb::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::StorageFull
                || io.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32)
                || io.raw_os_error() == Some(nix::errno::Errno::EDQUOT as i32)
        }
        _ => false,
    }
}

/// Maps any redb error type through `redb::Error`.
trait OrBackend<T> {
    fn or_backend(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> OrBackend<T> for Result<T, E> {
    fn or_backend(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| backend(op)(e.into()))
    }
}

fn state_key(state: TaskState) -> u8 {
    u8::try_from(i32::from(state)).unwrap_or(u8::MAX)
}

fn millis(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

const LIVE_STATES: [TaskState; 4] = [
    TaskState::Pending,
    TaskState::Queued,
    TaskState::Assigned,
    TaskState::Running,
];

impl RedbStore {
    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_txn(&self) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().or_backend("starting a write")?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| StoreError::Backend {
                op: "setting durability",
                message: e.to_string(),
            })?;
        // Saves the allocator state with each commit, so reopening after a
        // crash is quick whatever the file's size.
        txn.set_quick_repair(true);
        Ok(txn)
    }

    /// Applies `records` inside `txn`; an error leaves the caller to abort.
    fn write(txn: &WriteTransaction, records: &[Record]) -> Result<(), StoreError> {
        let op = "writing a commit";
        let mut tasks = txn.open_table(TASKS).or_backend(op)?;
        let mut events = txn.open_table(EVENTS).or_backend(op)?;
        let mut by_state = txn.open_table(BY_STATE).or_backend(op)?;
        let mut by_time = txn.open_table(FINAL_BY_TIME).or_backend(op)?;
        let mut deltas = [0i64; COUNT_SLOTS];
        // Next seq per task touched by this commit.
        let mut next_seq: HashMap<u128, u64> = HashMap::new();
        for record in records {
            match record {
                Record::Task(task) => {
                    let key = task.id.as_u128();
                    let old = match tasks.get(key).or_backend(op)? {
                        Some(v) => Some(decode_task_head(unseal(
                            "tasks",
                            SealKey::Id(key),
                            v.value(),
                        )?)?),
                        None => None,
                    };
                    match old {
                        Some((old_state, old_updated_at)) => {
                            // Its events in this commit need not look the
                            // task up again.
                            if let std::collections::hash_map::Entry::Vacant(entry) =
                                next_seq.entry(key)
                            {
                                entry.insert(last_seq(&events, key)?.map_or(0, |s| s + 1));
                            }
                            by_state
                                .remove((state_key(old_state), key))
                                .or_backend(op)?;
                            count(&mut deltas, old_state, -1);
                            if old_state.is_final() {
                                by_time
                                    .remove((millis(old_updated_at), key))
                                    .or_backend(op)?;
                            }
                        }
                        None => {
                            next_seq.entry(key).or_insert(0);
                        }
                    }
                    tasks
                        .insert(key, seal(SealKey::Id(key), encode_task(task)).as_slice())
                        .or_backend(op)?;
                    by_state
                        .insert((state_key(task.state), key), ())
                        .or_backend(op)?;
                    count(&mut deltas, task.state, 1);
                    if task.state.is_final() {
                        by_time
                            .insert((millis(task.updated_at), key), ())
                            .or_backend(op)?;
                    }
                }
                Record::Event(event) => {
                    let key = event.task_id.as_u128();
                    let next = match next_seq.get(&key) {
                        Some(next) => *next,
                        None => {
                            if tasks.get(key).or_backend(op)?.is_none() {
                                return Err(StoreError::Inconsistent(format!(
                                    "event for unknown task {}",
                                    event.task_id
                                )));
                            }
                            last_seq(&events, key)?.map_or(0, |s| s + 1)
                        }
                    };
                    if event.seq != next {
                        return Err(StoreError::Inconsistent(format!(
                            "task {} event seq {} where {} was next",
                            event.task_id, event.seq, next
                        )));
                    }
                    let value = seal(SealKey::Event(key, event.seq), encode_event(event));
                    events
                        .insert((key, event.seq), value.as_slice())
                        .or_backend(op)?;
                    next_seq.insert(key, next + 1);
                }
                // Rare (only tasks that carry secrets): the table is opened
                // for these records alone.
                Record::Secrets(id, env) => {
                    // Of a task stored or written earlier in this commit
                    // (which `next_seq` has), as an event's.
                    let key = id.as_u128();
                    if !next_seq.contains_key(&key) && tasks.get(key).or_backend(op)?.is_none() {
                        return Err(StoreError::Inconsistent(format!(
                            "secrets for unknown task {id}"
                        )));
                    }
                    let value = seal(SealKey::Id(key), encode_secrets(env));
                    txn.open_table(SECRETS)
                        .or_backend(op)?
                        .insert(id.as_u128(), value.as_slice())
                        .or_backend(op)?;
                }
                Record::ForgetSecrets(id) => {
                    txn.open_table(SECRETS)
                        .or_backend(op)?
                        .remove(id.as_u128())
                        .or_backend(op)?;
                }
                // Rare (schedule changes and fires): opened for these alone.
                Record::Schedule(schedule) => {
                    let name = schedule.name();
                    let value = seal(SealKey::Name(name), encode_schedule(schedule));
                    txn.open_table(SCHEDULES)
                        .or_backend(op)?
                        .insert(name, value.as_slice())
                        .or_backend(op)?;
                }
                Record::DeleteSchedule(name) => {
                    txn.open_table(SCHEDULES)
                        .or_backend(op)?
                        .remove(name.as_str())
                        .or_backend(op)?;
                }
                // Rare admin acts: the table is opened for these alone.
                Record::Limit(limit) => {
                    let key = format!("{}/{}", limit.kind.as_str(), limit.name);
                    let value = seal(
                        SealKey::Name(&key),
                        prost::Message::encode_to_vec(&weft_proto::pb::Limit::from(limit)),
                    );
                    txn.open_table(LIMITS)
                        .or_backend(op)?
                        .insert(key.as_str(), value.as_slice())
                        .or_backend(op)?;
                }
                Record::DeleteLimit { name, kind } => {
                    let key = format!("{kind}/{name}");
                    txn.open_table(LIMITS)
                        .or_backend(op)?
                        .remove(key.as_str())
                        .or_backend(op)?;
                }
            }
        }
        apply_counts(txn, &deltas)
    }

    fn read_task(
        tasks: &impl ReadableTable<u128, &'static [u8]>,
        events: &impl ReadableTable<(u128, u64), &'static [u8]>,
        id: TaskId,
    ) -> Result<Option<TaskRecord>, StoreError> {
        let Some(bytes) = tasks.get(id.as_u128()).or_backend("reading a task")? else {
            return Ok(None);
        };
        let key = SealKey::Id(id.as_u128());
        let mut record = decode_task(id, unseal("tasks", key, bytes.value())?)?;
        record.next_seq = last_seq(events, id.as_u128())?.map_or(0, |s| s + 1);
        Ok(Some(record))
    }
}

/// The next output chunk seq expected from the current attempt of a task
/// on a node (see [`next_chunk`]), reading its events newest first.
pub(super) fn stored_next_chunk(
    events: &impl ReadableTable<(u128, u64), &'static [u8]>,
    record: &TaskRecord,
) -> Result<u64, StoreError> {
    let op = "reading events";
    let key = record.id.as_u128();
    let mut failed = None;
    let newest_first = events
        .range((key, 0)..=(key, u64::MAX))
        .or_backend(op)?
        .rev()
        .map_while(|entry| {
            let event = entry.or_backend(op).and_then(|(k, value)| {
                let seal_key = SealKey::Event(key, k.value().1);
                decode_event(
                    record.id,
                    unseal("events", seal_key, value.value())?,
                    &record.spec,
                )
            });
            event.map_err(|err| failed = Some(err)).ok()
        });
    let next = next_chunk(record.attempt, newest_first);
    failed.map_or(Ok(next), Err)
}

/// The seq of a task's last stored event.
fn last_seq(
    events: &impl ReadableTable<(u128, u64), &'static [u8]>,
    key: u128,
) -> Result<Option<u64>, StoreError> {
    let mut range = events
        .range((key, 0)..=(key, u64::MAX))
        .or_backend("reading events")?;
    match range.next_back() {
        Some(entry) => {
            let (k, _) = entry.or_backend("reading events")?;
            Ok(Some(k.value().1))
        }
        None => Ok(None),
    }
}

/// Per-state count deltas, indexed by the state's number (1 to
/// `TASK_STATES`; 0 is unused).
const COUNT_SLOTS: usize = weft_proto::TASK_STATES + 1;

/// Adds `delta` to `state`'s count in `deltas` (indexed by the state's
/// number, as `state_counts` is keyed).
fn count(deltas: &mut [i64; COUNT_SLOTS], state: TaskState, delta: i64) {
    if let Some(d) = deltas.get_mut(usize::from(state_key(state))) {
        *d += delta;
    }
}

fn apply_counts(txn: &WriteTransaction, deltas: &[i64; COUNT_SLOTS]) -> Result<(), StoreError> {
    if deltas.iter().all(|d| *d == 0) {
        return Ok(());
    }
    let mut counts = txn.open_table(COUNTS).or_backend("counting")?;
    for (state, delta) in deltas.iter().enumerate() {
        if *delta == 0 {
            continue;
        }
        let key = u8::try_from(state).unwrap_or(u8::MAX);
        let old = counts
            .get(key)
            .or_backend("counting")?
            .map_or(0, |v| v.value());
        let new = old.saturating_add_signed(*delta);
        counts.insert(key, new).or_backend("counting")?;
    }
    Ok(())
}

impl Store for RedbStore {
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let op = "reading tokens";
        let txn = self.db.begin_read().or_backend(op)?;
        let table = txn.open_table(TOKENS).or_backend(op)?;
        let mut all = Vec::new();
        for entry in table.iter().or_backend(op)? {
            let (key, value) = entry.or_backend(op)?;
            let key = SealKey::Name(key.value());
            all.push(decode_token(unseal("tokens", key, value.value())?)?);
        }
        Ok(all)
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let op = "writing a token";
        let txn = self.write_txn()?;
        {
            let mut table = txn.open_table(TOKENS).or_backend(op)?;
            let value = seal(SealKey::Name(&token.id), encode_token(token));
            table
                .insert(token.id.as_str(), value.as_slice())
                .or_backend(op)?;
        }
        txn.commit().or_backend(op)
    }

    fn node_identities(&self) -> Result<Vec<NodeIdentityRecord>, StoreError> {
        let op = "reading node identities";
        let txn = self.db.begin_read().or_backend(op)?;
        // `init` made the table, also in a data dir from before node
        // identities.
        let table = txn.open_table(NODE_IDENTITIES).or_backend(op)?;
        let mut all = Vec::new();
        for entry in table.iter().or_backend(op)? {
            let (key, value) = entry.or_backend(op)?;
            let key = SealKey::Id(key.value());
            all.push(decode_node_identity(unseal(
                "node_identities",
                key,
                value.value(),
            )?)?);
        }
        Ok(all)
    }

    fn put_node_identity(
        &self,
        identity: &NodeIdentityRecord,
        token: Option<&TokenRecord>,
    ) -> Result<(), StoreError> {
        let op = "writing a node identity";
        let txn = self.write_txn()?;
        {
            let mut table = txn.open_table(NODE_IDENTITIES).or_backend(op)?;
            let key = identity.id.as_u128();
            let value = seal(SealKey::Id(key), encode_node_identity(identity));
            table.insert(key, value.as_slice()).or_backend(op)?;
            if let Some(token) = token {
                let mut tokens = txn.open_table(TOKENS).or_backend(op)?;
                let value = seal(SealKey::Name(&token.id), encode_token(token));
                tokens
                    .insert(token.id.as_str(), value.as_slice())
                    .or_backend(op)?;
            }
        }
        txn.commit().or_backend(op)
    }

    fn commit(&self, records: &[Record]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let txn = self.write_txn()?;
        match Self::write(&txn, records) {
            Ok(()) => txn.commit().or_backend("committing"),
            Err(err) => {
                // Nothing of a refused commit is kept.
                let _ = txn.abort();
                Err(err)
            }
        }
    }

    fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let op = "reading a task";
        let txn = self.db.begin_read().or_backend(op)?;
        let tasks = txn.open_table(TASKS).or_backend(op)?;
        let events = txn.open_table(EVENTS).or_backend(op)?;
        Self::read_task(&tasks, &events, id)
    }

    fn list_page(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let op = "listing tasks";
        let txn = self.db.begin_read().or_backend(op)?;
        let tasks = txn.open_table(TASKS).or_backend(op)?;
        let events = txn.open_table(EVENTS).or_backend(op)?;
        let before = query.before.map_or(u128::MAX, TaskId::as_u128);
        let from = query.from.map_or(0, TaskId::as_u128);
        if from >= before {
            return Ok(ListPage::default());
        }
        // Only tasks that pass the per-record filters have their event log
        // looked at (for `next_seq`).
        let read = |id: TaskId| -> Result<Option<TaskRecord>, StoreError> {
            let Some(bytes) = tasks.get(id.as_u128()).or_backend(op)? else {
                return Ok(None);
            };
            let key = SealKey::Id(id.as_u128());
            // A record that passes its checksum but cannot be decoded is
            // named, like one that fails it, so a reader can pass over it.
            let mut record =
                decode_task(id, unseal("tasks", key, bytes.value())?).map_err(|err| match err {
                    StoreError::Corrupt { .. } => StoreError::Damaged {
                        table: "tasks",
                        key: id.to_string(),
                        reason: "the record cannot be decoded",
                    },
                    err => err,
                })?;
            if !query.matches(&record) {
                return Ok(None);
            }
            record.next_seq = last_seq(&events, id.as_u128())?.map_or(0, |s| s + 1);
            Ok(Some(record))
        };
        match query.state {
            None => {
                let range = tasks.range(from..before).or_backend(op)?;
                let id = |entry: Result<_, _>| {
                    entry
                        .map(|(k, _): (redb::AccessGuard<'_, u128>, _)| {
                            TaskId::from_u128(k.value())
                        })
                        .or_backend(op)
                };
                let ids: Box<dyn Iterator<Item = Result<TaskId, StoreError>>> =
                    match query.ascending {
                        true => Box::new(range.map(id)),
                        false => Box::new(range.rev().map(id)),
                    };
                scan_page(ids, query, read)
            }
            Some(state) => {
                let by_state = txn.open_table(BY_STATE).or_backend(op)?;
                let s = state_key(state);
                let range = by_state.range((s, from)..(s, before)).or_backend(op)?;
                let id = |entry: Result<_, _>| {
                    entry
                        .map(|(k, _): (redb::AccessGuard<'_, (u8, u128)>, _)| {
                            TaskId::from_u128(k.value().1)
                        })
                        .or_backend(op)
                };
                let ids: Box<dyn Iterator<Item = Result<TaskId, StoreError>>> =
                    match query.ascending {
                        true => Box::new(range.map(id)),
                        false => Box::new(range.rev().map(id)),
                    };
                scan_page(ids, query, read)
            }
        }
    }

    fn events(
        &self,
        id: TaskId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<TaskEvent>, StoreError> {
        let op = "reading events";
        let txn = self.db.begin_read().or_backend(op)?;
        let tasks = txn.open_table(TASKS).or_backend(op)?;
        let events = txn.open_table(EVENTS).or_backend(op)?;
        let key = id.as_u128();
        // The spec goes back into a `finished` event's record.
        let spec: Arc<TaskSpec> = match tasks.get(key).or_backend(op)? {
            Some(bytes) => decode_task(id, unseal("tasks", SealKey::Id(key), bytes.value())?)?.spec,
            None => return Ok(Vec::new()),
        };
        events
            .range((key, from_seq)..=(key, u64::MAX))
            .or_backend(op)?
            .take(limit)
            .map(|entry| {
                let (k, value) = entry.or_backend(op)?;
                let seal_key = SealKey::Event(key, k.value().1);
                decode_event(id, unseal("events", seal_key, value.value())?, &spec)
            })
            .collect()
    }

    fn load(&self, final_since: SystemTime) -> Result<Loaded, StoreError> {
        let op = "loading";
        let txn = self.db.begin_read().or_backend(op)?;
        let mut loaded = self.load_summary(&txn, final_since)?;
        loaded.secrets = read_secrets(&txn)?;
        let mut live = Vec::new();
        let mut next_chunks = Vec::new();
        each_live(&txn, &mut |record| live.push(record), &mut next_chunks)?;
        loaded.live = live;
        loaded.next_chunks = next_chunks;
        Ok(loaded)
    }

    fn load_each(
        &self,
        final_since: SystemTime,
        live: &mut dyn FnMut(TaskRecord, Option<Arc<SecretEnv>>),
    ) -> Result<Loaded, StoreError> {
        let op = "loading";
        let txn = self.db.begin_read().or_backend(op)?;
        let mut loaded = self.load_summary(&txn, final_since)?;
        // Only tasks that carry secrets have one: few.
        let mut secrets: HashMap<TaskId, Arc<SecretEnv>> =
            read_secrets(&txn)?.into_iter().collect();
        let mut next_chunks = Vec::new();
        each_live(
            &txn,
            &mut |record| {
                let secret = secrets.remove(&record.id);
                live(record, secret);
            },
            &mut next_chunks,
        )?;
        loaded.next_chunks = next_chunks;
        Ok(loaded)
    }

    fn expire(
        &self,
        finished_before: SystemTime,
        limit: usize,
        keep: &[TaskId],
    ) -> Result<Vec<TaskState>, StoreError> {
        let op = "expiring tasks";
        let keep = super::KeepSet::new(keep);
        let txn = self.write_txn()?;
        let result = (|| {
            let mut by_time = txn.open_table(FINAL_BY_TIME).or_backend(op)?;
            let due: Vec<(u64, u128)> = by_time
                .range(..(millis(finished_before), 0))
                .or_backend(op)?
                .map(|entry| entry.map(|(k, _)| k.value()).or_backend(op))
                .filter(|entry| {
                    entry
                        .as_ref()
                        .map_or(true, |(_, id)| !keep.holds(TaskId::from_u128(*id)))
                })
                .take(limit)
                .collect::<Result<_, _>>()?;
            if due.is_empty() {
                return Ok(Vec::new());
            }
            let mut tasks = txn.open_table(TASKS).or_backend(op)?;
            let mut events = txn.open_table(EVENTS).or_backend(op)?;
            let mut by_state = txn.open_table(BY_STATE).or_backend(op)?;
            let mut secrets = txn.open_table(SECRETS).or_backend(op)?;
            let mut deltas = [0i64; COUNT_SLOTS];
            let mut removed = Vec::with_capacity(due.len());
            for (at, key) in due {
                by_time.remove((at, key)).or_backend(op)?;
                let old = tasks.get(key).or_backend(op)?.map(|v| {
                    unseal("tasks", SealKey::Id(key), v.value())
                        .and_then(|bytes| decode_task(TaskId::from_u128(key), bytes))
                        .map(|task| (task.state, millis(task.updated_at)))
                });
                let state = match old {
                    // The index has no checksum of its own: an entry that
                    // does not match its (sealed) record, say a changed
                    // byte naming a live task, is dropped and the task
                    // kept. Retention never deletes what it does not name.
                    Some(Ok((state, ended))) if !state.is_final() || ended != at => {
                        tracing::warn!(task_id = %TaskId::from_u128(key), %state, "a retention index entry does not match its task (a damaged index); the entry is dropped, the task kept");
                        continue;
                    }
                    Some(Ok((state, _))) => Some(state),
                    // A damaged record past its retention is deleted all
                    // the same (it was due to go, and would otherwise stop
                    // every later sweep); its state comes from the index.
                    Some(Err(err)) => {
                        tracing::warn!(task_id = %TaskId::from_u128(key), error = %err, "deleting a damaged finished task past its retention");
                        let mut found = None;
                        for state in TaskState::ALL.iter().copied() {
                            if by_state
                                .get((state_key(state), key))
                                .or_backend(op)?
                                .is_some()
                            {
                                found = Some(state);
                                break;
                            }
                        }
                        found
                    }
                    None => None,
                };
                tasks.remove(key).or_backend(op)?;
                if let Some(state) = state {
                    by_state.remove((state_key(state), key)).or_backend(op)?;
                    count(&mut deltas, state, -1);
                    removed.push(state);
                }
                events
                    .retain_in((key, 0)..=(key, u64::MAX), |_, _| false)
                    .or_backend(op)?;
                // Gone when the task became final; never outlives it.
                secrets.remove(key).or_backend(op)?;
            }
            apply_counts(&txn, &deltas)?;
            Ok(removed)
        })();
        match result {
            Ok(removed) if removed.is_empty() => {
                let _ = txn.abort();
                Ok(removed)
            }
            Ok(removed) => {
                txn.commit().or_backend("committing expiry")?;
                Ok(removed)
            }
            Err(err) => {
                let _ = txn.abort();
                Err(err)
            }
        }
    }
}
