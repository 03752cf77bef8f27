//! Opening a data dir's store ([`open_data_dir`]), and moving a data dir
//! written by an older coordinator from the redb store (`weft.redb`) to the
//! log (`log/`) the first time it is opened.
//!
//! The move copies through the [`Store`] trait alone ([`copy_store`]),
//! never holding all tasks at once: tasks are read a page at a time (oldest
//! first), their events a page at a time, and written in bounded batches,
//! each one commit of the target. Within the copy a task's record is
//! committed before (or with) its events, and events in seq order, so
//! every batch is one the target accepts on its own.
//!
//! A crash at any point of a move leaves either the redb store in use (the
//! copy is made in `log.migrating/`, renamed to `log/` only once complete
//! and synced) or the finished log; the next start redoes or finishes it.
//! `weft.redb` is kept, renamed `weft.redb.migrated`.
//!
//! A failed move leaves `weft.redb` as the coordinator that wrote it can
//! open it: a store of an older schema is upgraded in a copy of it
//! (`weft.redb.upgrading`), never in place. Before the log is put in place,
//! `weft.redb.copied` records `weft.redb`'s length and modification time;
//! a start that finds the log and `weft.redb` both finishes the move only
//! if they are unchanged, so what an older coordinator wrote to
//! `weft.redb` meanwhile is never thrown away unseen.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use weft_proto::{SecretEnv, TaskId, TaskKind};

use super::engine::{ListQuery, Store, StoreError};
use super::log::LogStore;
use super::marker;
use super::record::{EventBody, Record, TaskRecord};
use super::redb::{self, RedbStore};

/// The log's directory inside the data dir.
pub const LOG_DIR: &str = super::log::DIR_NAME;
/// Where a move from redb writes the log until it is complete.
pub const MIGRATING_DIR: &str = "log.migrating";
/// What `weft.redb` is renamed to once its store was moved to the log.
pub const MIGRATED_FILE: &str = "weft.redb.migrated";
/// The copy of an older schema's `weft.redb` that a move upgrades and
/// reads, removed once the move ends.
pub const UPGRADING_FILE: &str = "weft.redb.upgrading";
/// What `weft.redb` was (its length and modification time) when the log
/// was copied from it; written before the log is put in place.
pub const COPIED_FILE: &str = "weft.redb.copied";

/// Tasks read per list page.
const TASK_PAGE: usize = 512;
/// About the most bytes of task records read per list page: a page of
/// large tasks holds fewer than [`TASK_PAGE`].
const TASK_PAGE_BYTES: usize = 64 << 20;
/// Events read per page of one task's history.
const EVENT_PAGE: usize = 1024;
/// A batch is committed once it holds this many records...
const BATCH_RECORDS: usize = 4096;
/// ...or about this many bytes of output and payloads.
const BATCH_BYTES: usize = 8 << 20;
/// How often progress is logged while copying.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Opens the store of the data dir `dir` (made if missing): the log in
/// `<dir>/log/`. A data dir that holds only a redb store (`weft.redb`, by
/// an older coordinator) is first moved to the log, once; see the module
/// docs. Redb's page cache is [`redb::DEFAULT_CACHE_SIZE`] for that move.
pub fn open_data_dir(dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    open_data_dir_with_cache(dir, redb::DEFAULT_CACHE_SIZE)
}

/// [`open_data_dir`], with a redb page cache of at most `redb_cache` bytes
/// should the data dir be moved from redb (nothing else uses it).
pub fn open_data_dir_with_cache(
    dir: &Path,
    redb_cache: usize,
) -> Result<Arc<dyn Store>, StoreError> {
    let redb_file = dir.join(redb::FILE_NAME);
    let has_log = holds_segments(&dir.join(LOG_DIR))?;
    let has_redb = exists(&redb_file)?;
    match (has_log, has_redb) {
        // The log is the store; weft.redb beside it is left from a move.
        (true, true) => {
            if exists(&dir.join(MIGRATED_FILE))? {
                tracing::warn!(
                    path = %redb_file.display(),
                    "this redb store is not used: the data dir's store is the log"
                );
            } else {
                // A move stopped after the log was in place, before
                // weft.redb was renamed.
                check_unchanged(dir)?;
                tracing::info!(
                    data_dir = %dir.display(),
                    "finishing an earlier move of the store to the log"
                );
                retire_redb(dir)?;
            }
        }
        (false, true) => migrate(dir, redb_cache)?,
        (true, false) | (false, false) => {}
    }
    Ok(Arc::new(LogStore::open(dir)?))
}

/// Moves the redb store of `dir` to the log (see the module docs).
fn migrate(dir: &Path, redb_cache: usize) -> Result<(), StoreError> {
    let started = Instant::now();
    let migrating = dir.join(MIGRATING_DIR);
    tracing::info!(
        data_dir = %dir.display(),
        "moving the store from weft.redb to the log (once; the coordinator starts when it is done)"
    );
    // Opened first: its lock keeps a second coordinator out of the whole
    // move, so none removes the other's log.migrating/ under it.
    let upgrading = dir.join(UPGRADING_FILE);
    let opened = RedbStore::open_to_move(dir, redb_cache, &upgrading);
    let (from, held) = match opened {
        Ok(opened) => opened,
        Err(err) => {
            remove_file_if_present(&upgrading);
            return Err(err);
        }
    };
    if held.is_some() {
        tracing::info!(
            path = %upgrading.display(),
            "weft.redb is of an older schema: reading an upgraded copy of it, weft.redb left as it is"
        );
    }
    let copied = copy_to_log(dir, &from, &migrating);
    let from = match held {
        Some(held) => {
            drop(from);
            remove_file_if_present(&upgrading);
            held
        }
        None => from,
    };
    let copied = match copied {
        Ok(copied) => copied,
        Err(err) => {
            // Its space back now (a full disk is the likely cause); the
            // next start would remove it anyway.
            if let Err(rm) = std::fs::remove_dir_all(&migrating) {
                tracing::warn!(path = %migrating.display(), error = %rm, "removing the unfinished copy");
            }
            return Err(err);
        }
    };
    let io = |what: &'static str| {
        move |err: std::io::Error| StoreError::Open {
            path: dir.to_owned(),
            message: format!("{what}: {err}"),
        }
    };
    let log_dir = dir.join(LOG_DIR);
    remove_empty_log(&log_dir)?;
    std::fs::rename(&migrating, &log_dir).map_err(io("renaming log.migrating to log"))?;
    let retired = sync_dir(dir)
        .map_err(io("syncing the data dir"))
        .and_then(|()| retire_redb(dir));
    if let Err(err) = retired {
        // Closing weft.redb writes to it: recorded again, so the next start
        // does not take that for an older coordinator's writes.
        drop(from);
        if let Err(again) = record_copied(dir) {
            tracing::warn!(error = %again, "recording weft.redb after a failed move");
        }
        return Err(err);
    }
    drop(from);
    tracing::info!(
        data_dir = %dir.display(),
        tasks = copied.tasks,
        events = copied.events,
        secrets = copied.secrets,
        tokens = copied.tokens,
        node_identities = copied.node_identities,
        schedules = copied.schedules,
        limits = copied.limits,
        damaged = copied.damaged,
        seconds = started.elapsed().as_secs_f64(),
        "moved the store to the log"
    );
    Ok(())
}

/// Copies `from` into a new log in `migrating` (an earlier try's thrown
/// away first), then records `weft.redb` as copied.
fn copy_to_log(dir: &Path, from: &RedbStore, migrating: &Path) -> Result<Copied, StoreError> {
    remove_dir_all_if_present(migrating)?;
    let id = match marker::read(&dir.join(marker::FILE_NAME))? {
        Some(id) => id,
        None => random_id(dir)?,
    };
    // The log's lock is dropped (with `to`) before its dir is renamed;
    // redb's is held until weft.redb is renamed too.
    let to = LogStore::open_dir(migrating, Some(id))?;
    let copied = copy_store(from, &to)?;
    record_copied(dir)?;
    Ok(copied)
}

/// Renames `weft.redb` to `weft.redb.migrated` (the log holds the store
/// now) and syncs the data dir.
fn retire_redb(dir: &Path) -> Result<(), StoreError> {
    let kept = dir.join(MIGRATED_FILE);
    let fail = |err: std::io::Error| StoreError::Open {
        path: dir.to_owned(),
        message: format!("renaming {} to {MIGRATED_FILE}: {err}", redb::FILE_NAME),
    };
    std::fs::rename(dir.join(redb::FILE_NAME), &kept).map_err(fail)?;
    sync_dir(dir).map_err(fail)?;
    remove_file_if_present(&dir.join(COPIED_FILE));
    remove_file_if_present(&dir.join(UPGRADING_FILE));
    tracing::info!(
        path = %kept.display(),
        "the old redb store is kept; it may be deleted once the cluster is checked"
    );
    Ok(())
}

/// `weft.redb`'s length and modification time (in ns since the epoch):
/// what any commit to it changes.
fn fingerprint(dir: &Path) -> Result<String, StoreError> {
    let path = dir.join(redb::FILE_NAME);
    let meta = std::fs::metadata(&path).map_err(|err| open_error(&path, err))?;
    let modified = meta
        .modified()
        .map_err(|err| open_error(&path, err))?
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    Ok(format!("length {} modified {modified}\n", meta.len()))
}

/// Writes (and syncs) [`COPIED_FILE`]: `weft.redb` as the log was copied
/// from it. `weft.redb` is synced first, so the length and modification
/// time recorded are the ones a start after a power cut finds, not ones
/// still in the page cache.
pub(crate) fn record_copied(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(COPIED_FILE);
    let redb_file = dir.join(redb::FILE_NAME);
    std::fs::File::open(&redb_file)
        .and_then(|file| file.sync_all())
        .map_err(|err| open_error(&redb_file, err))?;
    let write = || -> std::io::Result<()> {
        let fingerprint = fingerprint(dir).map_err(std::io::Error::other)?;
        let mut file = std::fs::File::create(&path)?;
        std::io::Write::write_all(&mut file, fingerprint.as_bytes())?;
        file.sync_all()?;
        sync_dir(dir)
    };
    write().map_err(|err| open_error(&path, err))
}

/// Refuses to retire a `weft.redb` changed since the log beside it was
/// copied from it (an older coordinator started in between wrote to it).
/// A log without the record is taken as copied from what is there.
fn check_unchanged(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(COPIED_FILE);
    let recorded = match std::fs::read_to_string(&path) {
        Ok(recorded) => recorded,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(open_error(&path, err)),
    };
    if recorded == fingerprint(dir)? {
        return Ok(());
    }
    // Left only by a move that could not remove it; a move again
    // overwrites it, keeping the log leaves it for good.
    let upgrading = if exists(&dir.join(UPGRADING_FILE))? {
        format!(" and {UPGRADING_FILE}")
    } else {
        String::new()
    };
    Err(StoreError::Open {
        path: dir.to_owned(),
        message: format!(
            "{redb} changed after it was copied to {LOG_DIR}/ (an older coordinator ran on this data dir \
             during the move?), so the log may lack what was written to it. To move {redb} again, \
             remove {LOG_DIR}/ and {COPIED_FILE}; to keep the log as it is, rename {redb} to {MIGRATED_FILE} \
             and remove {COPIED_FILE}{upgrading}",
            redb = redb::FILE_NAME,
        ),
    })
}

/// Removes `path` if it is there; a failure is only logged (it is left
/// for the next move to overwrite).
fn remove_file_if_present(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "removing a file left by the move")
        }
    }
}

/// Removes `log_dir`, which holds no segment, if it is there: a start
/// refused while `weft.redb` was missing leaves it with only its lock file.
/// Anything else in it is not the log's, and refuses the move.
fn remove_empty_log(log_dir: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(log_dir.join(super::log::LOCK_FILE)) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(open_error(log_dir, err)),
    }
    match std::fs::remove_dir(log_dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(StoreError::Open {
            path: log_dir.to_owned(),
            message: format!(
                "it holds no log but is not empty ({err}); move it away to move weft.redb to the log"
            ),
        }),
    }
}

/// True when `log_dir` holds at least one segment file.
fn holds_segments(log_dir: &Path) -> Result<bool, StoreError> {
    let entries = match std::fs::read_dir(log_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(open_error(log_dir, err)),
    };
    for entry in entries {
        let entry = entry.map_err(|err| open_error(log_dir, err))?;
        if entry.file_name().to_string_lossy().ends_with(".seg") {
            return Ok(true);
        }
    }
    Ok(false)
}

fn exists(path: &Path) -> Result<bool, StoreError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(open_error(path, err)),
    }
}

fn remove_dir_all_if_present(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {
            tracing::info!(
                path = %path.display(),
                "removed the unfinished copy of an earlier try; moving again"
            );
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(open_error(path, err)),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn open_error(path: &Path, err: std::io::Error) -> StoreError {
    StoreError::Open {
        path: path.to_owned(),
        message: err.to_string(),
    }
}

/// A new store id, for a redb data dir without a marker.
fn random_id(dir: &Path) -> Result<u64, StoreError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Open {
        path: dir.to_owned(),
        message: format!("making a store id: {e}"),
    })?;
    Ok(u64::from_le_bytes(bytes))
}

/// What [`copy_store`] copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Task records (final ones too).
    pub tasks: u64,
    /// Events of those tasks.
    pub events: u64,
    /// Secret environments (of live tasks).
    pub secrets: u64,
    /// Token records (revoked ones too).
    pub tokens: u64,
    /// Node identities (revoked ones too).
    pub node_identities: u64,
    /// Cron schedules.
    pub schedules: u64,
    /// Named limits.
    pub limits: u64,
    /// Damaged task records left out, and task histories cut short at a
    /// damaged event (each logged).
    pub damaged: u64,
}

/// Copies everything `from` holds into `to` (which should be empty):
/// tokens, node identities, limits, schedules, every task with all its
/// events and, for live tasks, its secrets. Commits in bounded batches;
/// a failed read or commit stops the copy with its error, leaving `to`
/// partly written (the caller throws it away). Progress is logged at info.
pub fn copy_store(from: &dyn Store, to: &dyn Store) -> Result<Copied, StoreError> {
    let started = Instant::now();
    let mut copied = Copied::default();
    for token in from.tokens()? {
        to.put_token(&token)?;
        copied.tokens += 1;
    }
    for identity in from.node_identities()? {
        to.put_node_identity(&identity, None)?;
        copied.node_identities += 1;
    }

    // Secrets are handed out with live tasks only; they are few (only the
    // tasks that carry one) and are written right after their task's
    // record. The live records themselves are dropped here: the task pass
    // below reads every task again, a page at a time.
    let mut secrets: HashMap<TaskId, Arc<SecretEnv>> = HashMap::new();
    let loaded = from.load_each(SystemTime::now(), &mut |record, secret| {
        if let Some(secret) = secret {
            secrets.insert(record.id, secret);
        }
    })?;
    let mut batch = Batch::new(to);
    for limit in loaded.limits {
        batch.push(Record::Limit(limit))?;
        copied.limits += 1;
    }
    for schedule in loaded.schedules {
        batch.push(Record::Schedule(Arc::new(schedule)))?;
        copied.schedules += 1;
    }

    let mut last_log = Instant::now();
    let mut query = ListQuery {
        limit: TASK_PAGE,
        ascending: true,
        budget: TASK_PAGE_BYTES,
        ..ListQuery::default()
    };
    // A damaged task record met while listing: the tasks before it are
    // listed (`query.before`), then the list carries on after it.
    let mut skipping: Option<TaskId> = None;
    loop {
        let page = match from.list_page(&query) {
            Ok(page) => page,
            Err(err) => match damaged_task(&err) {
                Some(bad) if skipping.is_none() && query.from.is_none_or(|f| f <= bad) => {
                    skipping = Some(bad);
                    query.before = Some(bad);
                    continue;
                }
                _ => return Err(err),
            },
        };
        for task in page.tasks {
            let id = task.id;
            let final_ = task.state.is_final();
            batch.push(Record::Task(task))?;
            copied.tasks += 1;
            if let Some(secret) = secrets.remove(&id)
                && !final_
            {
                batch.push(Record::Secrets(id, secret))?;
                copied.secrets += 1;
            }
            copy_events(from, id, &mut batch, &mut copied)?;
        }
        if last_log.elapsed() >= PROGRESS_EVERY {
            last_log = Instant::now();
            tracing::info!(
                tasks = copied.tasks,
                events = copied.events,
                seconds = started.elapsed().as_secs(),
                "copying the store"
            );
        }
        // The next page starts after the last task of this one, or after
        // the damaged task that ended the range.
        let last = match (page.resume, skipping.take()) {
            (Some(last), skip) => {
                skipping = skip;
                last
            }
            (None, Some(bad)) => {
                tracing::warn!(
                    task_id = %bad,
                    "not copied: the task's record is damaged (reads of it failed before the move too)"
                );
                copied.damaged += 1;
                query.before = None;
                bad
            }
            (None, None) => break,
        };
        match last.as_u128().checked_add(1) {
            Some(next) => query.from = Some(TaskId::from_u128(next)),
            None => break,
        }
    }
    batch.flush()?;
    if !secrets.is_empty() {
        // load_each named a live task that the list did not: nothing to
        // attach these to.
        tracing::warn!(
            secrets = secrets.len(),
            "secret environments of tasks not found while copying were not copied"
        );
    }
    Ok(copied)
}

/// Copies the events of task `id` into `batch`, a page at a time. An
/// event that is damaged ends the copy of that task's history (the events
/// before it are copied, so the target's history has no gap), with a
/// warning.
fn copy_events(
    from: &dyn Store,
    id: TaskId,
    batch: &mut Batch<'_>,
    copied: &mut Copied,
) -> Result<(), StoreError> {
    let mut seq = 0;
    let mut page = EVENT_PAGE;
    loop {
        let events = match from.events(id, seq, page) {
            Ok(events) => events,
            // Read one at a time up to the damaged one.
            Err(err) if err.is_damage() && page > 1 => {
                page = 1;
                continue;
            }
            Err(err) if err.is_damage() => {
                tracing::warn!(task_id = %id, seq, error = %err, "not copied: this event of the task and the ones after it (damaged)");
                copied.damaged += 1;
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        let done = events.len() < page;
        for event in events {
            seq = event.seq + 1;
            batch.push(Record::Event(event))?;
            copied.events += 1;
        }
        if done {
            return Ok(());
        }
    }
}

/// The task whose record `err` says is damaged, if it says so.
fn damaged_task(err: &StoreError) -> Option<TaskId> {
    match err {
        StoreError::Damaged {
            table: "tasks",
            key,
            ..
        } => key.parse().ok(),
        _ => None,
    }
}

/// Records waiting to be committed to the target together.
struct Batch<'a> {
    to: &'a dyn Store,
    records: Vec<Record>,
    bytes: usize,
}

impl<'a> Batch<'a> {
    fn new(to: &'a dyn Store) -> Batch<'a> {
        Batch {
            to,
            records: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds `record`, committing the batch when it is full.
    fn push(&mut self, record: Record) -> Result<(), StoreError> {
        self.bytes += weight(&record);
        self.records.push(record);
        if self.records.len() >= BATCH_RECORDS || self.bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Commits what is waiting.
    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.records.is_empty() {
            self.to.commit(&self.records)?;
            self.records.clear();
            self.bytes = 0;
        }
        Ok(())
    }
}

/// A rough size of `record` once stored: a fixed part plus the payloads
/// that can be big (inputs, outputs, output chunks).
fn weight(record: &Record) -> usize {
    const FIXED: usize = 256;
    let task = |t: &TaskRecord| {
        let input = match &t.spec.kind {
            TaskKind::Exec(exec) => exec.stdin.len(),
            TaskKind::Call(call) => call.input.len(),
        };
        FIXED + t.output.len() + input
    };
    match record {
        Record::Task(t) => task(t),
        Record::Event(e) => match &e.body {
            EventBody::Output { data, .. } => FIXED + data.len(),
            EventBody::Finished(t) => task(t),
            EventBody::State { .. } | EventBody::Progress { .. } => FIXED,
        },
        Record::Secrets(..)
        | Record::ForgetSecrets(_)
        | Record::Schedule(_)
        | Record::DeleteSchedule(_)
        | Record::Limit(_)
        | Record::DeleteLimit { .. } => FIXED,
    }
}
