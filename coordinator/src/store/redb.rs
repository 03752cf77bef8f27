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
    Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, WriteTransaction,
};

use weft_proto::{SecretEnv, TaskId, TaskSpec, TaskState};

use super::codec::{
    decode_event, decode_node_identity, decode_secrets, decode_task, decode_task_head,
    decode_token, encode_event, encode_node_identity, encode_secrets, encode_task, encode_token,
};
use super::engine::{Store, StoreError};
use super::marker;
use super::record::{
    FinalAttempt, Loaded, MAX_RECENTLY_FINAL, NodeIdentityRecord, Record, TaskEvent, TaskRecord,
};
use super::seal::{SealKey, migrate, migrate_tokens, open as unseal, seal};
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

/// The file format this code writes; a newer one is refused. 2: every
/// value of `tasks`, `events`, `secrets`, `tokens` and `node_identities`
/// ends in its checksum (`seal.rs`); a schema-1 store is upgraded to it
/// once, when opened.
const SCHEMA_VERSION: u64 = 2;
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
        let marker_path = dir.join(marker::FILE_NAME);
        let expected = marker::read(&marker_path)?;
        if expected.is_some() {
            // Never start empty over a store that existed.
            let missing = |what: &str| StoreError::Missing {
                path: path.clone(),
                marker: marker_path.clone(),
                what: what.to_owned(),
            };
            match std::fs::metadata(&path) {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    return Err(missing("is missing"));
                }
                Err(err) => return Err(open_err(err.to_string())),
                Ok(meta) if meta.len() == 0 => return Err(missing("is empty")),
                Ok(_) => {}
            }
        }
        let db = match Database::builder().set_cache_size(cache_size).create(&path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::Locked(dir.into())),
            Err(err) if is_damage(&err) => {
                return Err(StoreError::Unreadable {
                    path,
                    message: err.to_string(),
                });
            }
            Err(err) => return Err(open_err(err.to_string())),
        };
        let store = RedbStore { db, path };
        let id = store.init(expected, &marker_path)?;
        if expected.is_none() {
            // After the store's first commit, so a crash in between only
            // leaves a store whose marker is written at the next start.
            marker::write(&marker_path, id).map_err(|e| open_err(e.to_string()))?;
        }
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates every table (so readers never meet a missing one), checks
    /// the schema version (upgrading a schema-1 store to checksums) and the
    /// store's id against the data dir's marker (`expected`); returns the
    /// id, given now to a store that had none. Writes nothing to a store
    /// that is refused.
    fn init(&self, expected: Option<u64>, marker_path: &Path) -> Result<u64, StoreError> {
        let txn = self.write_txn()?;
        let id = self.check_id(&txn, expected, marker_path);
        let id = match id {
            Ok(id) => id,
            Err(err) => {
                let _ = txn.abort();
                return Err(err);
            }
        };
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
                Some(SCHEMA_VERSION) => {}
                Some(old) => {
                    drop(meta);
                    add_checksums(&txn, old, &self.path)?;
                    txn.open_table(META)
                        .or_backend("writing schema")?
                        .insert("schema", SCHEMA_VERSION)
                        .or_backend("writing schema")?;
                }
                None => {
                    meta.insert("schema", SCHEMA_VERSION)
                        .or_backend("writing schema")?;
                }
            }
        }
        txn.commit().or_backend("creating tables")?;
        Ok(id)
    }

    /// The store's id, checked against the marker's: a store without one
    /// where the marker names one is not this data dir's store (a new
    /// file, or another store's); one without a marker gets an id now.
    fn check_id(
        &self,
        txn: &WriteTransaction,
        expected: Option<u64>,
        marker_path: &Path,
    ) -> Result<u64, StoreError> {
        let mut meta = txn.open_table(META).or_backend("reading the store id")?;
        let found = meta
            .get(STORE_ID)
            .or_backend("reading the store id")?
            .map(|v| v.value());
        let missing = |what: String| StoreError::Missing {
            path: self.path.clone(),
            marker: marker_path.to_owned(),
            what,
        };
        match (found, expected) {
            (Some(found), Some(expected)) if found == expected => Ok(found),
            (Some(found), Some(expected)) => Err(missing(format!(
                "is another store (id {found:016x}; this data dir's is {expected:016x})"
            ))),
            (None, Some(_)) => Err(missing("holds no store (a new, empty file)".into())),
            (Some(found), None) => Ok(found),
            (None, None) => {
                let mut bytes = [0u8; 8];
                getrandom::fill(&mut bytes).map_err(|e| StoreError::Open {
                    path: self.path.clone(),
                    message: format!("making a store id: {e}"),
                })?;
                let id = u64::from_le_bytes(bytes);
                meta.insert(STORE_ID, id)
                    .or_backend("writing the store id")?;
                Ok(id)
            }
        }
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
                        .insert(key, seal(SealKey::Id(key), encode_task(task)).as_slice())
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
                    let value = seal(SealKey::Event(key, event.seq), encode_event(event));
                    events
                        .insert((key, event.seq), value.as_slice())
                        .or_backend(op)?;
                    next_seq.insert(key, next + 1);
                }
                // Rare (only tasks that carry secrets): the table is opened
                // for these records alone.
                Record::Secrets(id, env) => {
                    let value = seal(SealKey::Id(id.as_u128()), encode_secrets(env));
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

/// True for the open errors of a file that is not (or no longer) a
/// readable store, as opposed to one that cannot be reached.
fn is_damage(err: &DatabaseError) -> bool {
    match err {
        DatabaseError::Storage(redb::StorageError::Corrupted(_))
        | DatabaseError::UpgradeRequired(_)
        | DatabaseError::RepairAborted => true,
        DatabaseError::Storage(redb::StorageError::Io(io)) => matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// The one-time upgrade of a store written before checksums (schema
/// `from`): every value rewritten with its checksum, in the transaction
/// that then records the new schema.
fn add_checksums(txn: &WriteTransaction, from: u64, path: &Path) -> Result<(), StoreError> {
    let tasks = migrate(txn, TASKS, SealKey::Id)?;
    let events = migrate(txn, EVENTS, |(id, seq)| SealKey::Event(id, seq))?;
    let secrets = migrate(txn, SECRETS, SealKey::Id)?;
    let identities = migrate(txn, NODE_IDENTITIES, SealKey::Id)?;
    let tokens = migrate_tokens(txn, TOKENS)?;
    tracing::info!(
        path = %path.display(),
        from,
        to = SCHEMA_VERSION,
        tasks,
        events,
        secrets,
        identities,
        tokens,
        "upgraded the store: every record now carries a checksum"
    );
    Ok(())
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

impl RedbStore {
    /// What a restart reads besides live tasks and secrets: final counts
    /// and recent results.
    fn load_summary(
        &self,
        txn: &ReadTransaction,
        final_since: SystemTime,
    ) -> Result<Loaded, StoreError> {
        let op = "loading";
        let tasks = txn.open_table(TASKS).or_backend(op)?;
        let mut loaded = Loaded::default();
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
                let key = SealKey::Id(id.as_u128());
                let record = decode_task(id, unseal("tasks", key, bytes.value())?)?;
                loaded.recently_final.push(FinalAttempt {
                    task_id: id,
                    attempt: record.attempt,
                    outcome: record.last_outcome,
                });
            }
        }
        tracing::debug!(
            path = %self.path.display(),
            tasks = tasks.len().unwrap_or(0),
            "store summary loaded"
        );
        Ok(loaded)
    }
}

/// Every secret environment the store holds.
fn read_secrets(txn: &ReadTransaction) -> Result<Vec<(TaskId, Arc<SecretEnv>)>, StoreError> {
    let op = "loading";
    let secrets = txn.open_table(SECRETS).or_backend(op)?;
    let mut all = Vec::new();
    for entry in secrets.iter().or_backend(op)? {
        let (key, value) = entry.or_backend(op)?;
        let seal_key = SealKey::Id(key.value());
        let env = decode_secrets(unseal("secrets", seal_key, value.value())?)?;
        all.push((TaskId::from_u128(key.value()), Arc::new(env)));
    }
    Ok(all)
}

/// Hands every live task (queued, assigned, running) to `each` in id
/// order, one record at a time: the three state ranges of
/// `tasks_by_state` merged by id, so nothing holds them all.
fn each_live(txn: &ReadTransaction, each: &mut dyn FnMut(TaskRecord)) -> Result<(), StoreError> {
    let op = "loading";
    let tasks = txn.open_table(TASKS).or_backend(op)?;
    let events = txn.open_table(EVENTS).or_backend(op)?;
    let by_state = txn.open_table(BY_STATE).or_backend(op)?;
    let mut ranges = Vec::with_capacity(LIVE_STATES.len());
    for state in LIVE_STATES {
        let s = state_key(state);
        ranges.push(by_state.range((s, 0)..=(s, u128::MAX)).or_backend(op)?);
    }
    let mut heads: Vec<Option<u128>> = Vec::with_capacity(ranges.len());
    for range in &mut ranges {
        heads.push(next_id(range)?);
    }
    loop {
        let next = heads
            .iter()
            .enumerate()
            .filter_map(|(i, head)| head.map(|id| (id, i)))
            .min();
        let Some((id, from)) = next else {
            return Ok(());
        };
        heads[from] = next_id(&mut ranges[from])?;
        if let Some(record) = RedbStore::read_task(&tasks, &events, TaskId::from_u128(id))? {
            each(record);
        }
    }
}

/// The next task id of a `tasks_by_state` range.
fn next_id(range: &mut redb::Range<'static, (u8, u128), ()>) -> Result<Option<u128>, StoreError> {
    match range.next() {
        Some(entry) => Ok(Some(entry.or_backend("loading")?.0.value().1)),
        None => Ok(None),
    }
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
        each_live(&txn, &mut |record| live.push(record))?;
        loaded.live = live;
        Ok(loaded)
    }

    fn load_each(
        &self,
        final_since: SystemTime,
        live: &mut dyn FnMut(TaskRecord, Option<Arc<SecretEnv>>),
    ) -> Result<Loaded, StoreError> {
        let op = "loading";
        let txn = self.db.begin_read().or_backend(op)?;
        let loaded = self.load_summary(&txn, final_since)?;
        // Only tasks that carry secrets have one: few.
        let mut secrets: HashMap<TaskId, Arc<SecretEnv>> =
            read_secrets(&txn)?.into_iter().collect();
        each_live(&txn, &mut |record| {
            let secret = secrets.remove(&record.id);
            live(record, secret);
        })?;
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
                let old = match tasks.remove(key).or_backend(op)? {
                    Some(v) => {
                        let bytes = unseal("tasks", SealKey::Id(key), v.value())?;
                        Some(decode_task(TaskId::from_u128(key), bytes)?)
                    }
                    None => None,
                };
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
