//! Opening the redb store: the private data dir, the `STORE_ID` marker
//! (a store that existed is never replaced by an empty one), the schema
//! check and the one-time upgrade to checksums, and which open errors mean
//! a damaged file. Nothing here reads or writes tasks.

use std::path::Path;

use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, WriteTransaction};

use super::super::engine::StoreError;
use super::super::marker;
use super::super::seal::{SealKey, migrate, migrate_named};
use super::{
    BY_STATE, COUNTS, DEFAULT_CACHE_SIZE, EVENTS, FILE_NAME, FINAL_BY_TIME, LIMITS, META,
    NODE_IDENTITIES, OrBackend, RedbStore, SCHEMA_VERSION, SECRETS, STORE_ID, TASKS, TOKENS,
};

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
        let (store, expected, marker_path) = Self::open_file(dir, cache_size)?;
        store.init_and_mark(dir, expected, &marker_path)?;
        Ok(store)
    }

    /// Opens the store of `dir` to be moved to the log, leaving
    /// `weft.redb` as the coordinator that wrote it can still open it,
    /// should the move fail. A store of this code's schema opens as with
    /// [`open_with_cache`](Self::open_with_cache). An older one is copied to
    /// `scratch`, and that copy upgraded and returned first, with
    /// `weft.redb` open second: its lock held, never written.
    pub fn open_to_move(
        dir: &Path,
        cache_size: usize,
        scratch: &Path,
    ) -> Result<(RedbStore, Option<RedbStore>), StoreError> {
        let (store, expected, marker_path) = Self::open_file(dir, cache_size)?;
        match store.schema()? {
            Some(v) if v >= SCHEMA_VERSION => {
                // Current, or newer (refused by `init` unwritten).
                store.init_and_mark(dir, expected, &marker_path)?;
                return Ok((store, None));
            }
            Some(_) | None => {}
        }
        let open_err = |message: String| StoreError::Open {
            path: scratch.to_owned(),
            message,
        };
        std::fs::copy(&store.path, scratch)
            .map_err(|e| open_err(format!("copying {FILE_NAME} to upgrade it: {e}")))?;
        let db = match Database::builder()
            .set_cache_size(cache_size)
            .create(scratch)
        {
            Ok(db) => db,
            Err(err) => return Err(open_err(err.to_string())),
        };
        let copy = RedbStore {
            db,
            path: scratch.to_owned(),
        };
        // No marker is written: the copy's id is weft.redb's, or made up
        // for the copy alone when weft.redb has none.
        copy.init(expected, &marker_path)?;
        Ok((copy, Some(store)))
    }

    /// Opens `weft.redb` in `dir` (taking its lock), refusing a missing or
    /// empty one where the marker says a store existed; also answers the
    /// marker's id and path. Writes nothing to the store.
    fn open_file(
        dir: &Path,
        cache_size: usize,
    ) -> Result<(RedbStore, Option<u64>, std::path::PathBuf), StoreError> {
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
        Ok((RedbStore { db, path }, expected, marker_path))
    }

    /// [`init`](Self::init), then the marker written when there was none.
    fn init_and_mark(
        &self,
        dir: &Path,
        expected: Option<u64>,
        marker_path: &Path,
    ) -> Result<(), StoreError> {
        let id = self.init(expected, marker_path)?;
        if expected.is_none() {
            // After the store's first commit, so a crash in between only
            // leaves a store whose marker is written at the next start.
            marker::write(marker_path, id).map_err(|e| StoreError::Open {
                path: dir.to_owned(),
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// The schema version the store records; none in a file never set up.
    fn schema(&self) -> Result<Option<u64>, StoreError> {
        let op = "reading schema";
        let txn = self.db.begin_read().or_backend(op)?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(err) => return Err(err).or_backend(op),
        };
        Ok(meta.get("schema").or_backend(op)?.map(|v| v.value()))
    }

    /// Opens (or creates) a store on `backend` instead of a file in a data
    /// dir (no marker, no lock): the power-cut tests' simulated disk.
    /// `label` names it in errors.
    #[cfg(test)]
    pub(crate) fn open_with_backend(
        backend: impl redb::StorageBackend,
        label: &Path,
    ) -> Result<RedbStore, StoreError> {
        let path = label.to_owned();
        let db = match Database::builder()
            .set_cache_size(DEFAULT_CACHE_SIZE)
            .create_with_backend(backend)
        {
            Ok(db) => db,
            Err(err) if is_damage(&err) => {
                return Err(StoreError::Unreadable {
                    path,
                    message: err.to_string(),
                });
            }
            Err(err) => {
                return Err(StoreError::Open {
                    path,
                    message: err.to_string(),
                });
            }
        };
        let store = RedbStore { db, path };
        store.init(None, label)?;
        Ok(store)
    }

    /// Creates every table (so readers never meet a missing one), checks
    /// the schema version (upgrading a schema-1 store to checksums) and the
    /// store's id against the data dir's marker (`expected`); returns the
    /// id, given now to a store that had none. Writes nothing to a store
    /// that is refused.
    fn init(&self, expected: Option<u64>, marker_path: &Path) -> Result<u64, StoreError> {
        let txn = self.write_txn()?;
        // The schema first: a newer store's tables may not be of the types
        // opened below.
        let found = match self.check_schema(&txn) {
            Ok(found) => found,
            Err(err) => {
                let _ = txn.abort();
                return Err(err);
            }
        };
        let id = match self.check_id(&txn, expected, marker_path) {
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
            match found {
                Some(SCHEMA_VERSION) => {}
                Some(old) => {
                    if old < 2 {
                        add_checksums(&txn, old, &self.path)?;
                    }
                    if old < 3 {
                        recount(&txn, old, &self.path)?;
                    }
                    if old < 4 {
                        seal_limits(&txn, old, &self.path)?;
                    }
                    txn.open_table(META)
                        .or_backend("writing schema")?
                        .insert("schema", SCHEMA_VERSION)
                        .or_backend("writing schema")?;
                }
                None => {
                    txn.open_table(META)
                        .or_backend("writing schema")?
                        .insert("schema", SCHEMA_VERSION)
                        .or_backend("writing schema")?;
                }
            }
        }
        txn.commit().or_backend("creating tables")?;
        Ok(id)
    }

    /// The schema version the store records (none in a new store); a
    /// newer one than this code's is refused.
    fn check_schema(&self, txn: &WriteTransaction) -> Result<Option<u64>, StoreError> {
        let meta = txn.open_table(META).or_backend("reading schema")?;
        let found = meta
            .get("schema")
            .or_backend("reading schema")?
            .map(|v| v.value());
        match found {
            Some(v) if v > SCHEMA_VERSION => Err(StoreError::Open {
                path: self.path.clone(),
                message: format!(
                    "written by a newer coordinator (schema {v}; this one reads {SCHEMA_VERSION})"
                ),
            }),
            found => Ok(found),
        }
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

/// The one-time upgrade of a store's `state_counts` (schema `from`, before
/// 3): counted again from `tasks_by_state`, every state under its own
/// number.
fn recount(txn: &WriteTransaction, from: u64, path: &Path) -> Result<(), StoreError> {
    let op = "recounting states";
    let mut counts = std::collections::BTreeMap::<u8, u64>::new();
    let by_state = txn.open_table(BY_STATE).or_backend(op)?;
    for entry in by_state.iter().or_backend(op)? {
        let (key, _) = entry.or_backend(op)?;
        *counts.entry(key.value().0).or_default() += 1;
    }
    drop(by_state);
    let mut table = txn.open_table(COUNTS).or_backend(op)?;
    table.retain(|_, _| false).or_backend(op)?;
    for (state, count) in &counts {
        table.insert(*state, *count).or_backend(op)?;
    }
    tracing::info!(
        path = %path.display(),
        from,
        to = SCHEMA_VERSION,
        tasks = counts.values().sum::<u64>(),
        "upgraded the store: task counts per state recounted"
    );
    Ok(())
}

/// The one-time upgrade of a store whose limits have no checksums
/// (schema `from`, before 4): each rewritten with its checksum, in the
/// transaction that then records the new schema. A store made before
/// limits were kept gets an empty table.
fn seal_limits(txn: &WriteTransaction, from: u64, path: &Path) -> Result<(), StoreError> {
    let limits = migrate_named(txn, LIMITS)?;
    tracing::info!(
        path = %path.display(),
        from,
        to = SCHEMA_VERSION,
        limits,
        "upgraded the store: every limit now carries a checksum"
    );
    Ok(())
}

/// The one-time upgrade of a store written before checksums (schema
/// `from`): every value rewritten with its checksum, in the transaction
/// that then records the new schema.
fn add_checksums(txn: &WriteTransaction, from: u64, path: &Path) -> Result<(), StoreError> {
    let tasks = migrate(txn, TASKS, SealKey::Id)?;
    let events = migrate(txn, EVENTS, |(id, seq)| SealKey::Event(id, seq))?;
    let secrets = migrate(txn, SECRETS, SealKey::Id)?;
    let identities = migrate(txn, NODE_IDENTITIES, SealKey::Id)?;
    let tokens = migrate_named(txn, TOKENS)?;
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
