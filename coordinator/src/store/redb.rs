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
//! - `meta`: schema version.
//! - `tokens`: token id -> token record (the SHA-256 of its secret, never
//!   the secret), written synchronously by the token rpcs.
//!
//! Opening takes redb's exclusive file lock: a second coordinator on the same
//! data dir gets [`StoreError::Locked`]. All methods block; callers on the
//! async runtime use `spawn_blocking`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};

use weft_proto::{TaskId, TaskSpec, TaskState};

use super::codec::{
    decode_event, decode_node_identity, decode_secrets, decode_task, decode_task_head,
    decode_token, encode_event, encode_node_identity, encode_secrets, encode_task, encode_token,
};
use super::engine::{Store, StoreError};
use super::record::{
    FinalAttempt, Loaded, MAX_RECENTLY_FINAL, NodeIdentityRecord, Record, TaskEvent, TaskRecord,
    next_chunk,
};
use crate::auth::TokenRecord;

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
/// Node identities (joined or revoked nodes) by node id.
const NODE_IDENTITIES: TableDefinition<u128, &[u8]> = TableDefinition::new("node_identities");

/// The file format this code writes; a newer one is refused.
const SCHEMA_VERSION: u64 = 1;
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
    move |err| StoreError::Backend {
        op,
        message: err.to_string(),
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

const LIVE_STATES: [TaskState; 3] = [TaskState::Queued, TaskState::Assigned, TaskState::Running];

/// Makes `dir` private (0700: it holds the secrets table and maybe the
/// admin token): created 0700 when missing; an existing one that group or
/// others can reach is tightened to 0700, with a warning.
fn private_data_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(dir)?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                data_dir = %dir.display(),
                mode = format!("{:o}", mode & 0o777),
                "the data dir was open to group or others; made it 0700"
            );
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`, creating the directory, with
    /// a [`DEFAULT_CACHE_SIZE`] page cache.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_SIZE)
    }

    /// Like [`open`](Self::open), with a page cache of at most `cache_size`
    /// bytes.
    pub fn open_with_cache(dir: &Path, cache_size: usize) -> Result<RedbStore, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: dir.to_owned(),
            message,
        };
        private_data_dir(dir).map_err(|e| open_err(e.to_string()))?;
        let path = dir.join(FILE_NAME);
        let db = match Database::builder().set_cache_size(cache_size).create(&path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::Locked(dir.into())),
            Err(err) => return Err(open_err(err.to_string())),
        };
        let store = RedbStore { db, path };
        store.init()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates every table (so readers never meet a missing one) and checks
    /// the schema version.
    fn init(&self) -> Result<(), StoreError> {
        let txn = self.write_txn()?;
        {
            txn.open_table(TASKS).or_backend("creating tables")?;
            txn.open_table(EVENTS).or_backend("creating tables")?;
            txn.open_table(BY_STATE).or_backend("creating tables")?;
            txn.open_table(FINAL_BY_TIME)
                .or_backend("creating tables")?;
            txn.open_table(COUNTS).or_backend("creating tables")?;
            txn.open_table(SECRETS).or_backend("creating tables")?;
            txn.open_table(TOKENS).or_backend("creating tables")?;
            txn.open_table(NODE_IDENTITIES)
                .or_backend("creating tables")?;
            let mut meta = txn.open_table(META).or_backend("creating tables")?;
            let found = meta
                .get("schema")
                .or_backend("reading schema")?
                .map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::Open {
                        path: self.path.clone(),
                        message: format!(
                            "written by a newer coordinator (schema {v}; this one reads {SCHEMA_VERSION})"
                        ),
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert("schema", SCHEMA_VERSION)
                        .or_backend("writing schema")?;
                }
            }
        }
        txn.commit().or_backend("creating tables")
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
        let mut deltas = [0i64; 8];
        // Next seq per task touched by this commit.
        let mut next_seq: HashMap<u128, u64> = HashMap::new();
        for record in records {
            match record {
                Record::Task(task) => {
                    let key = task.id.as_u128();
                    let old = tasks
                        .get(key)
                        .or_backend(op)?
                        .map(|v| decode_task_head(v.value()))
                        .transpose()?;
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
                            deltas[usize::from(state_key(old_state)) & 7] -= 1;
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
                        .insert(key, encode_task(task).as_slice())
                        .or_backend(op)?;
                    by_state
                        .insert((state_key(task.state), key), ())
                        .or_backend(op)?;
                    deltas[usize::from(state_key(task.state)) & 7] += 1;
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
                    events
                        .insert((key, event.seq), encode_event(event).as_slice())
                        .or_backend(op)?;
                    next_seq.insert(key, next + 1);
                }
                // Rare (only tasks that carry secrets): the table is opened
                // for these records alone.
                Record::Secrets(id, env) => {
                    txn.open_table(SECRETS)
                        .or_backend(op)?
                        .insert(id.as_u128(), encode_secrets(env).as_slice())
                        .or_backend(op)?;
                }
                Record::ForgetSecrets(id) => {
                    txn.open_table(SECRETS)
                        .or_backend(op)?
                        .remove(id.as_u128())
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
        let mut record = decode_task(id, bytes.value())?;
        record.next_seq = last_seq(events, id.as_u128())?.map_or(0, |s| s + 1);
        Ok(Some(record))
    }
}

/// The next output chunk seq expected from the current attempt of a task
/// on a node (see [`next_chunk`]), reading its events newest first.
fn stored_next_chunk(
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
            let event = entry
                .or_backend(op)
                .and_then(|(_, value)| decode_event(record.id, value.value(), &record.spec));
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

fn apply_counts(txn: &WriteTransaction, deltas: &[i64; 8]) -> Result<(), StoreError> {
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
            let (_, value) = entry.or_backend(op)?;
            all.push(decode_token(value.value())?);
        }
        Ok(all)
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let op = "writing a token";
        let txn = self.write_txn()?;
        {
            let mut table = txn.open_table(TOKENS).or_backend(op)?;
            table
                .insert(token.id.as_str(), encode_token(token).as_slice())
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
            let (_, value) = entry.or_backend(op)?;
            all.push(decode_node_identity(value.value())?);
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
            table
                .insert(
                    identity.id.as_u128(),
                    encode_node_identity(identity).as_slice(),
                )
                .or_backend(op)?;
            if let Some(token) = token {
                let mut tokens = txn.open_table(TOKENS).or_backend(op)?;
                tokens
                    .insert(token.id.as_str(), encode_token(token).as_slice())
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

    fn list(
        &self,
        state: Option<TaskState>,
        before: Option<TaskId>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let op = "listing tasks";
        let txn = self.db.begin_read().or_backend(op)?;
        let tasks = txn.open_table(TASKS).or_backend(op)?;
        let events = txn.open_table(EVENTS).or_backend(op)?;
        let before = before.map_or(u128::MAX, TaskId::as_u128);
        let ids: Vec<u128> = match state {
            None => tasks
                .range(..before)
                .or_backend(op)?
                .rev()
                .take(limit)
                .map(|entry| entry.map(|(k, _)| k.value()).or_backend(op))
                .collect::<Result<_, _>>()?,
            Some(state) => {
                let by_state = txn.open_table(BY_STATE).or_backend(op)?;
                let s = state_key(state);
                by_state
                    .range((s, 0)..(s, before))
                    .or_backend(op)?
                    .rev()
                    .take(limit)
                    .map(|entry| entry.map(|(k, _)| k.value().1).or_backend(op))
                    .collect::<Result<_, _>>()?
            }
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(record) = Self::read_task(&tasks, &events, TaskId::from_u128(id))? {
                out.push(record);
            }
        }
        Ok(out)
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
            Some(bytes) => decode_task(id, bytes.value())?.spec,
            None => return Ok(Vec::new()),
        };
        events
            .range((key, from_seq)..=(key, u64::MAX))
            .or_backend(op)?
            .take(limit)
            .map(|entry| {
                let (_, value) = entry.or_backend(op)?;
                decode_event(id, value.value(), &spec)
            })
            .collect()
    }

    fn load(&self, final_since: SystemTime) -> Result<Loaded, StoreError> {
        let op = "loading";
        let txn = self.db.begin_read().or_backend(op)?;
        let tasks = txn.open_table(TASKS).or_backend(op)?;
        let events = txn.open_table(EVENTS).or_backend(op)?;
        let by_state = txn.open_table(BY_STATE).or_backend(op)?;
        let mut loaded = Loaded::default();
        for state in LIVE_STATES {
            let s = state_key(state);
            for entry in by_state.range((s, 0)..=(s, u128::MAX)).or_backend(op)? {
                let (key, _) = entry.or_backend(op)?;
                let id = TaskId::from_u128(key.value().1);
                if let Some(record) = Self::read_task(&tasks, &events, id)? {
                    if state != TaskState::Queued {
                        let next = stored_next_chunk(&events, &record)?;
                        if next > 0 {
                            loaded.next_chunks.push((id, next));
                        }
                    }
                    loaded.live.push(record);
                }
            }
        }
        loaded.live.sort_by_key(|r| r.id);
        let secrets = txn.open_table(SECRETS).or_backend(op)?;
        for entry in secrets.iter().or_backend(op)? {
            let (key, value) = entry.or_backend(op)?;
            let env = decode_secrets(value.value())?;
            loaded
                .secrets
                .push((TaskId::from_u128(key.value()), Arc::new(env)));
        }
        let counts = txn.open_table(COUNTS).or_backend(op)?;
        for state in TaskState::ALL.iter().filter(|s| s.is_final()) {
            let count = counts
                .get(state_key(*state))
                .or_backend(op)?
                .map_or(0, |v| v.value());
            if count > 0 {
                loaded.final_counts.push((*state, count));
            }
        }
        let by_time = txn.open_table(FINAL_BY_TIME).or_backend(op)?;
        for entry in by_time
            .range((millis(final_since), 0)..)
            .or_backend(op)?
            .rev()
            .take(MAX_RECENTLY_FINAL)
        {
            let (key, _) = entry.or_backend(op)?;
            let id = TaskId::from_u128(key.value().1);
            if let Some(bytes) = tasks.get(id.as_u128()).or_backend(op)? {
                let record = decode_task(id, bytes.value())?;
                loaded.recently_final.push(FinalAttempt {
                    task_id: id,
                    attempt: record.attempt,
                    outcome: record.last_outcome,
                });
            }
        }
        tracing::debug!(
            path = %self.path.display(),
            live = loaded.live.len(),
            tasks = tasks.len().unwrap_or(0),
            "store loaded"
        );
        Ok(loaded)
    }

    fn expire(
        &self,
        finished_before: SystemTime,
        limit: usize,
    ) -> Result<Vec<TaskState>, StoreError> {
        let op = "expiring tasks";
        let txn = self.write_txn()?;
        let result = (|| {
            let mut by_time = txn.open_table(FINAL_BY_TIME).or_backend(op)?;
            let due: Vec<(u64, u128)> = by_time
                .range(..(millis(finished_before), 0))
                .or_backend(op)?
                .take(limit)
                .map(|entry| entry.map(|(k, _)| k.value()).or_backend(op))
                .collect::<Result<_, _>>()?;
            if due.is_empty() {
                return Ok(Vec::new());
            }
            let mut tasks = txn.open_table(TASKS).or_backend(op)?;
            let mut events = txn.open_table(EVENTS).or_backend(op)?;
            let mut by_state = txn.open_table(BY_STATE).or_backend(op)?;
            let mut secrets = txn.open_table(SECRETS).or_backend(op)?;
            let mut deltas = [0i64; 8];
            let mut removed = Vec::with_capacity(due.len());
            for (at, key) in due {
                by_time.remove((at, key)).or_backend(op)?;
                let old = tasks
                    .remove(key)
                    .or_backend(op)?
                    .map(|v| decode_task(TaskId::from_u128(key), v.value()))
                    .transpose()?;
                if let Some(old) = old {
                    by_state
                        .remove((state_key(old.state), key))
                        .or_backend(op)?;
                    deltas[usize::from(state_key(old.state)) & 7] -= 1;
                    removed.push(old.state);
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
