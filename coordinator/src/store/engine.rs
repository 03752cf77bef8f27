//! The [`Store`] trait every storage engine implements, its error, and the
//! helper that runs store calls on the blocking pool. No engine lives here.

use std::sync::Arc;
use std::time::SystemTime;

use weft_proto::{SecretEnv, TaskId, TaskState};

use super::codec::task_wire_bytes;
use super::record::{Loaded, NodeIdentityRecord, Record, TaskEvent, TaskRecord};
use crate::auth::TokenRecord;

/// What `List` asks the store for. Time bounds come as id bounds (task
/// ids are ULIDs, ordered by the millisecond they were made); the state
/// has an index; labels, name and node are checked on each record read.
#[derive(Clone, Debug)]
pub struct ListQuery {
    /// Only tasks in this state.
    pub state: Option<TaskState>,
    /// Only tasks with ids below this one (a page token, or `until`).
    pub before: Option<TaskId>,
    /// Only tasks with ids at or above this one (`since`).
    pub from: Option<TaskId>,
    /// Only tasks with every one of these labels.
    pub labels: Vec<(String, String)>,
    /// Only tasks whose name contains this text (empty: any).
    pub name: String,
    /// Only tasks with an attempt on this node, by name or id (empty: any).
    pub node: String,
    /// At most this many tasks.
    pub limit: usize,
    /// At most this many records examined: past it, the page is answered
    /// as it is, with where to carry on.
    pub scan: usize,
    /// Oldest first (a job's tasks), instead of newest first; the page's
    /// `resume` is then the last id given, and the next page starts after it.
    pub ascending: bool,
    /// At most about this many bytes of records on the page, by their
    /// estimated wire size (`codec::task_wire_bytes`): the scan stops before a
    /// record that would go past it (but a page always holds one), so a
    /// page of large tasks never reads `limit` of them. `List` passes its
    /// `--max-message-size`.
    pub budget: usize,
}

impl Default for ListQuery {
    fn default() -> Self {
        ListQuery {
            state: None,
            before: None,
            from: None,
            labels: Vec::new(),
            name: String::new(),
            node: String::new(),
            limit: 100,
            scan: usize::MAX,
            ascending: false,
            budget: usize::MAX,
        }
    }
}

impl ListQuery {
    /// Whether `record` passes the filters checked per record (state,
    /// labels, name, node); id bounds are the engine's ranges. The state
    /// is the engine's range too, but checked again on the record read: an
    /// engine that reads records after letting its state index go (the
    /// log) may read one that has moved to another state since.
    pub fn matches(&self, record: &TaskRecord) -> bool {
        let labels = &record.spec.labels;
        let node_is =
            |id: &weft_proto::NodeId, name: &str| name == self.node || id.to_string() == self.node;
        self.state.is_none_or(|state| record.state == state)
            && self
                .labels
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
            && (self.name.is_empty() || record.spec.name.contains(&self.name))
            && (self.node.is_empty()
                || record
                    .node_id
                    .as_ref()
                    .is_some_and(|id| node_is(id, record.node_name.as_deref().unwrap_or("")))
                || record
                    .attempts
                    .iter()
                    .any(|a| node_is(&a.node_id, &a.node_name)))
    }

    /// True when some record may fail [`matches`](Self::matches).
    pub fn filters_records(&self) -> bool {
        !self.labels.is_empty() || !self.name.is_empty() || !self.node.is_empty()
    }
}

/// A page of [`Store::list_page`].
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    /// The tasks found, newest first.
    pub tasks: Vec<TaskRecord>,
    /// Where a next page carries on (pass as `before`, or past it as
    /// `from` when ascending): the last task examined and not left out,
    /// when the scan stopped at `limit`, `scan` or `budget` before the end
    /// of its range; `None` when nothing older is left to examine.
    pub resume: Option<TaskId>,
}

/// Walks ids in the query's order, reading each with `read` (which
/// answers the record only if it matches), until `query.limit` tasks are
/// found, `query.scan` ids were examined, or the next record would take
/// the page past `query.budget`. The one loop every engine's list shares.
///
/// The record found past the budget was read, but is left for the next
/// page (`resume` is the id before it): a page reads at most its budget
/// plus one record.
pub(crate) fn scan_page(
    ids: impl Iterator<Item = Result<TaskId, StoreError>>,
    query: &ListQuery,
    mut read: impl FnMut(TaskId) -> Result<Option<TaskRecord>, StoreError>,
) -> Result<ListPage, StoreError> {
    let mut page = ListPage::default();
    let mut last = None;
    let mut bytes = 0usize;
    for (examined, id) in ids.enumerate() {
        if page.tasks.len() >= query.limit || examined >= query.scan || bytes >= query.budget {
            page.resume = last;
            return Ok(page);
        }
        let id = id?;
        if let Some(record) = read(id)? {
            let size = task_wire_bytes(&record);
            if !page.tasks.is_empty() && bytes.saturating_add(size) > query.budget {
                page.resume = last;
                return Ok(page);
            }
            bytes = bytes.saturating_add(size);
            page.tasks.push(record);
        }
        last = Some(id);
    }
    Ok(page)
}

/// Why the store failed. `Clone` because one failed group commit fails
/// every reply of its batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A thread panicked while holding the store's lock.
    #[error("store lock poisoned")]
    Poisoned,
    /// A commit broke an invariant of the event log (gap in seqs, event
    /// without its task): a bug in the writer, refused rather than stored.
    #[error("inconsistent commit: {0}")]
    Inconsistent(String),
    /// Another process (or another coordinator in this one) has the data
    /// dir's store open.
    #[error(
        "data dir {} is in use by another coordinator (its store is locked); stop that one or pass another --data-dir",
        .0.display()
    )]
    Locked(std::path::PathBuf),
    /// The data dir could not be created or opened.
    #[error("opening data dir {}: {message}", path.display())]
    Open {
        /// The data dir.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The database (`--database-url`) refused the login or the URL, or
    /// holds a schema this coordinator cannot use: refused at start.
    /// `target` never holds a password.
    #[error("database {target}: {message}")]
    Database {
        /// Where it is: hosts, ports, database and user.
        target: String,
        /// What went wrong.
        message: String,
    },
    /// The database (`--database-url`) cannot be reached: the connection
    /// was refused, timed out or broke (the server is down or restarting,
    /// a network blip). Safe to retry later: the next call connects again.
    /// `target` never holds a password.
    #[error("database {target} cannot be reached: {message}")]
    Unreachable {
        /// Where it is: hosts, ports, database and user.
        target: String,
        /// What went wrong.
        message: String,
    },
    /// This coordinator no longer holds the database (`--database-url`):
    /// the session that held its lock ended, or a commit on it failed. It
    /// never writes again (another coordinator may hold the database by
    /// now); it stops, and comes back as a standby.
    #[error("lost the database {target}: {message}")]
    LostDatabase {
        /// Where it is: hosts, ports, database and user.
        target: String,
        /// What ended the session.
        message: String,
    },
    /// The disk is full (or the file system refused to grow the file).
    /// Nothing of the write that met it was committed.
    #[error("{op}: the disk is full ({message})")]
    DiskFull {
        /// What the store was doing.
        op: &'static str,
        /// The engine's error.
        message: String,
    },
    /// The store's files or engine failed (an I/O error, ...).
    #[error("{op}: {message}")]
    Backend {
        /// What the store was doing.
        op: &'static str,
        /// The engine's error.
        message: String,
    },
    /// A stored value's checksum does not match (a changed byte on disk, or
    /// a value under the wrong key): the store is damaged. Never served.
    #[error("the store is damaged: table {table}, key {key}: {reason}")]
    Damaged {
        /// What holds it: a kind of record (`tasks`, `events`...) or `log`.
        table: &'static str,
        /// The value's key (a task id as a ULID, a token id).
        key: String,
        /// What did not match.
        reason: &'static str,
    },
    /// The store file cannot be opened as a store (a zeroed or truncated
    /// page, garbage): refused at start.
    #[error(
        "the store file {} is damaged and cannot be opened: {message}",
        path.display()
    )]
    Unreadable {
        /// The store's file or directory.
        path: std::path::PathBuf,
        /// What the engine said (or where it panicked).
        message: String,
    },
    /// The data dir held a store (its marker file says so) but the store
    /// file is missing, empty or another store: refused at start rather
    /// than starting an empty cluster over it.
    #[error("{} {what}, but this data dir held a store (see {})", path.display(), marker.display())]
    Missing {
        /// The store's file or directory.
        path: std::path::PathBuf,
        /// The marker file that says a store existed.
        marker: std::path::PathBuf,
        /// What is wrong with the file ("is missing", "is empty", ...).
        what: String,
    },
    /// The store library panicked (it does on some damaged pages); caught
    /// and reported as damage.
    #[error("{op}: the store library panicked (a damaged page?): {message}")]
    Panicked {
        /// What the store was doing.
        op: &'static str,
        /// The panic's message.
        message: String,
    },
    /// A stored record could not be decoded.
    #[error("corrupt record ({what}): {message}")]
    Corrupt {
        /// Which kind of record.
        what: &'static str,
        /// Why.
        message: String,
    },
}

impl StoreError {
    /// True when the store on disk is damaged or gone (not a full disk, not
    /// a lock): restarting will not help; restore a backup or move the data
    /// dir away.
    pub fn is_damage(&self) -> bool {
        match self {
            StoreError::Damaged { .. }
            | StoreError::Unreadable { .. }
            | StoreError::Missing { .. }
            | StoreError::Panicked { .. }
            | StoreError::Corrupt { .. } => true,
            StoreError::Poisoned
            | StoreError::Inconsistent(_)
            | StoreError::Locked(_)
            | StoreError::Open { .. }
            | StoreError::Database { .. }
            | StoreError::Unreachable { .. }
            | StoreError::LostDatabase { .. }
            | StoreError::Backend { .. }
            | StoreError::DiskFull { .. } => false,
        }
    }
}

/// Runs a store call on the blocking pool, for async callers (the driver's
/// commits and sweeps, the services' reads). A panic in it is a store error.
pub(crate) async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    op: &'static str,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .unwrap_or_else(|err| Err(StoreError::from_join(op, err)))
}

impl StoreError {
    /// A store call's task that did not return: a panic (damage, see
    /// [`StoreError::Panicked`]) or a cancelled task.
    pub(crate) fn from_join(op: &'static str, err: tokio::task::JoinError) -> StoreError {
        match err.try_into_panic() {
            Ok(panic) => StoreError::Panicked {
                op,
                message: panic_message(&*panic),
            },
            Err(err) => StoreError::Backend {
                op,
                message: err.to_string(),
            },
        }
    }
}

/// A caught panic's message.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Where tasks and their events live. Implementations must make a
/// [`commit`](Store::commit) all-or-nothing.
pub trait Store: Send + Sync + 'static {
    /// Writes `records` in order, atomically.
    fn commit(&self, records: &[Record]) -> Result<(), StoreError>;

    /// One task, with `next_seq` filled in.
    fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError>;

    /// Tasks `ids` (each `None` when unknown), in that order, for a
    /// reader of their outcomes only (`TASK_VIEW_RESULT`): a record's
    /// `spec` may be left out (an empty one in its place), so a store
    /// can skip reading and decoding it. What `WaitMany` reads for tasks
    /// that finished before it registered.
    fn task_outcomes(&self, ids: &[TaskId]) -> Result<Vec<Option<TaskRecord>>, StoreError> {
        ids.iter().map(|id| self.task(*id)).collect()
    }

    /// Whether the store has a record of each of `ids`, in that order:
    /// [`task`](Store::task) is `Some`. A store with an index answers
    /// from it without reading the records.
    fn has_tasks(&self, ids: &[TaskId]) -> Result<Vec<bool>, StoreError> {
        Ok(self
            .task_outcomes(ids)?
            .iter()
            .map(Option::is_some)
            .collect())
    }

    /// Up to `limit` tasks, newest first, older than `before` if given,
    /// in `state` if given: [`list_page`](Store::list_page) with no other
    /// filter and no scan bound.
    fn list(
        &self,
        state: Option<TaskState>,
        before: Option<TaskId>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let query = ListQuery {
            state,
            before,
            limit,
            ..ListQuery::default()
        };
        Ok(self.list_page(&query)?.tasks)
    }

    /// A page of the tasks `query` asks for, newest first: up to
    /// `query.limit` of them, examining at most `query.scan` records and
    /// reading about `query.budget` bytes of them (see
    /// [`ListPage::resume`]).
    fn list_page(&self, query: &ListQuery) -> Result<ListPage, StoreError>;

    /// Up to `limit` events of a task from `from_seq` on.
    fn events(&self, id: TaskId, from_seq: u64, limit: usize)
    -> Result<Vec<TaskEvent>, StoreError>;

    /// Everything the scheduler needs after a restart; tasks final since
    /// `final_since` are listed in [`Loaded::recently_final`]. By default,
    /// [`Store::load_each`] with its live tasks gathered.
    fn load(&self, final_since: SystemTime) -> Result<Loaded, StoreError> {
        let mut live = Vec::new();
        let mut secrets = Vec::new();
        let mut loaded = self.load_each(final_since, &mut |record, secret| {
            if let Some(secret) = secret {
                secrets.push((record.id, secret));
            }
            live.push(record);
        })?;
        loaded.live = live;
        loaded.secrets = secrets;
        Ok(loaded)
    }

    /// What [`load`](Store::load) reads, but each live task is handed to
    /// `live` as it is read, in id order, with its secret environment if it
    /// has one, instead of collected: a restart with millions of queued
    /// tasks never holds all their full records at once. The returned
    /// [`Loaded`] has no `live` and no `secrets`.
    fn load_each(
        &self,
        final_since: SystemTime,
        live: &mut dyn FnMut(TaskRecord, Option<Arc<SecretEnv>>),
    ) -> Result<Loaded, StoreError> {
        let mut loaded = self.load(final_since)?;
        let mut secrets: std::collections::HashMap<TaskId, Arc<SecretEnv>> =
            std::mem::take(&mut loaded.secrets).into_iter().collect();
        for record in std::mem::take(&mut loaded.live) {
            let secret = secrets.remove(&record.id);
            live(record, secret);
        }
        Ok(loaded)
    }

    /// Deletes up to `limit` final tasks whose record last changed before
    /// `finished_before`, with their events (and secrets, should any be
    /// left), atomically, but none of `keep` (finished parents whose
    /// results a pending child still needs, whatever their age). Returns
    /// the states of the deleted tasks (so counters can follow).
    fn expire(
        &self,
        finished_before: SystemTime,
        limit: usize,
        keep: &[TaskId],
    ) -> Result<Vec<TaskState>, StoreError>;

    /// Every token record (client tokens, later node join tokens): the
    /// index the server's edge checks is built from it at start.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Writes one token record (new, or revoked) in a transaction of its
    /// own, durable when it returns: token writes are rare and are not
    /// part of the driver's group commit. Never stores a secret.
    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;

    /// Every node identity (joined nodes, revoked ones included): the
    /// index `Connect` and `Join` check is built from it at start.
    fn node_identities(&self) -> Result<Vec<NodeIdentityRecord>, StoreError>;

    /// Writes one node identity record (new, or revoked) and, for a join,
    /// the join token's record with its use counted, in ONE transaction of
    /// its own, durable when it returns: a crash never leaves a use
    /// counted without its node, or a node without its use.
    fn put_node_identity(
        &self,
        identity: &NodeIdentityRecord,
        token: Option<&TokenRecord>,
    ) -> Result<(), StoreError>;
}
