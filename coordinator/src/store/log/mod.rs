//! The durable store: an append-only log of records in segment files,
//! `<data dir>/log/00000001.seg`, ..., with an in-memory index of where
//! the latest record of everything is.
//!
//! A queue's task is written once, changes state a few times within
//! milliseconds, streams some output and is deleted after retention. A
//! log fits that: each [`Store::commit`] appends one frame (`frame.rs`)
//! and syncs it once, whatever the order of the tasks it touches; a task
//! changed several times in one commit is written once (its latest
//! record), and its spec, which never changes, only with its first record;
//! events and output chunks are records of their own, appended,
//! never rewritten with the task. Nothing is updated in place.
//!
//! - Reads go through the index (`index.rs`) to one positional read per
//!   record, its checksum checked: damage is [`StoreError::Damaged`].
//! - The active segment is kept written with zeros ahead of its end
//!   ([`ZERO_AHEAD`]), so that a commit overwrites blocks the file already
//!   has and its sync flushes data only: syncing an append must also
//!   commit the file's new size and blocks (a journal commit on most file
//!   systems), which takes longer. Databases do the same with their
//!   write-ahead logs.
//! - Opening reads every segment once, in order, and rebuilds the index
//!   (`recover.rs`); zeros after the last frame of the last segment are
//!   its unused rest (a segment is cut to its frames, and synced, before
//!   the next one is made); an unfinished commit at the end of the log
//!   (a crash before its sync returned) is cut off, damage anywhere else
//!   refuses the start.
//! - Retention appends an expiry record per task; the bytes go when
//!   compaction (`compact.rs`) copies the oldest segment's still-current
//!   records to the head and removes the file. A background thread does
//!   it when more than half of the sealed segments' bytes are dead.
//!
//! Files go through the [`LogDir`] trait (`fs.rs`), so the power-cut
//! tests put the store on a simulated disk.

mod compact;
mod frame;
pub(crate) mod fs;
mod index;
#[cfg(test)]
mod power_cut_tests;
mod recover;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime};

use weft_proto::{SecretEnv, TaskId, TaskSpec, TaskState};

use super::codec::{
    decode_event, decode_node_identity, decode_secrets, decode_spec, decode_task_with_spec,
    decode_token, encode_event_into, encode_node_identity, encode_secrets, encode_spec,
    encode_task_without_spec_into, encode_token,
};
use super::engine::{ListPage, ListQuery, Store, StoreError, scan_page};
use super::record::{
    FinalAttempt, Loaded, MAX_RECENTLY_FINAL, NodeIdentityRecord, Record, TaskEvent, TaskRecord,
    next_chunk,
};
use super::{ScheduleRecord, decode_schedule, encode_schedule};
use crate::auth::TokenRecord;
use frame::{FRAME_HEADER, Key, Kind, TASK_HEAD, TaskHead};
pub(crate) use fs::LogDir;
use fs::{LogFile, RealDir};
use index::{Index, Loc, Segment};

/// The log's directory inside the data dir.
pub const DIR_NAME: &str = "log";
/// The lock file inside the log's directory.
pub(crate) const LOCK_FILE: &str = "LOCK";
/// Bytes at which the active segment is sealed and a new one started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// A segment file's name.
fn segment_name(no: u32) -> String {
    format!("{no:08}.seg")
}

/// Tasks, events and the rest in an append-only log. See the module docs.
pub struct LogStore {
    inner: Arc<Inner>,
    compactor: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    /// The log's directory, as errors name it.
    path: PathBuf,
    dir: Arc<dyn LogDir>,
    store_id: u64,
    index: RwLock<Index>,
    writer: Mutex<Writer>,
    segment_bytes: AtomicU64,
    /// Held by the compaction step under way: one at a time.
    compacting: Mutex<()>,
    /// Wakes the compaction thread; `true` asks it to stop.
    wake: (Mutex<bool>, Condvar),
    /// The log dir's lock, held while the store is open.
    _lock: Option<std::fs::File>,
}

/// The most tasks the writer's per-commit table keeps room for between
/// commits.
const MAX_KEPT_PENDING: usize = 1 << 16;

/// Room for this many tasks the per-commit table always keeps (a table
/// that size fits in a core's cache); above it, the table keeps only room
/// the last commit used at least an eighth of.
const KEPT_PENDING_FLOOR: usize = 1 << 10;

/// The appending end: one at a time.
struct Writer {
    active: u32,
    file: Arc<dyn LogFile>,
    len: u64,
    /// The file's length: zeros from `len` to here (see [`ZERO_AHEAD`]).
    end: u64,
    /// The number of the last frame written.
    seq: u64,
    buf: Vec<u8>,
    /// The tasks of the commit being written (see `encode`), kept between
    /// commits with its capacity.
    pending: crate::IdMap<u128, Pending>,
    /// Set when a write's outcome on disk is unknown (a failed sync, a
    /// failed cut of a partial write): every later write is refused until
    /// a restart reads the log again.
    broken: Option<String>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// An I/O error as a store error: a full disk is [`StoreError::DiskFull`].
fn io_error(op: &'static str, err: &std::io::Error) -> StoreError {
    let full = err.kind() == std::io::ErrorKind::StorageFull
        || err.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32)
        || err.raw_os_error() == Some(nix::errno::Errno::EDQUOT as i32);
    let message = err.to_string();
    if full {
        StoreError::DiskFull { op, message }
    } else {
        StoreError::Backend { op, message }
    }
}

impl LogStore {
    /// The data dir's store: `<data_dir>/log/`, with the data dir's
    /// `STORE_ID` marker checked (a marker with no log is refused: the log
    /// was lost) or written, and the log locked. Starts compaction.
    pub fn open(data_dir: &Path) -> Result<LogStore, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: data_dir.to_owned(),
            message,
        };
        private_dir(data_dir).map_err(|e| open_err(format!("creating it: {e}")))?;
        let marker_path = data_dir.join(super::marker::FILE_NAME);
        let marker = super::marker::read(&marker_path)?;
        let log_dir = data_dir.join(DIR_NAME);
        let create = match marker {
            Some(_) => None,
            None => Some(new_store_id(data_dir)?),
        };
        let store = LogStore::open_dir(&log_dir, create).map_err(|err| match err {
            StoreError::Locked(_) => StoreError::Locked(data_dir.to_owned()),
            StoreError::Missing { path, what, .. } => StoreError::Missing {
                path,
                marker: marker_path.clone(),
                what,
            },
            other => other,
        })?;
        match marker {
            Some(id) if id != store.store_id() => {
                return Err(StoreError::Missing {
                    path: log_dir,
                    marker: marker_path,
                    what: format!(
                        "holds another store ({:016x}, the marker names {id:016x})",
                        store.store_id()
                    ),
                });
            }
            Some(_) => {}
            None => super::marker::write(&marker_path, store.store_id())
                .map_err(|e| open_err(format!("writing the store marker: {e}")))?,
        }
        Ok(store)
    }

    /// A log in `log_dir` (made if missing), locked (a second opener gets
    /// [`StoreError::Locked`]), no marker: `create: Some(id)` makes a new
    /// log with that store id when the dir holds no segment; `None`
    /// refuses an empty dir ([`StoreError::Missing`]). Starts compaction.
    pub fn open_dir(log_dir: &Path, create: Option<u64>) -> Result<LogStore, StoreError> {
        private_dir(log_dir).map_err(|e| StoreError::Open {
            path: log_dir.to_owned(),
            message: format!("creating it: {e}"),
        })?;
        let lock = lock_dir(log_dir)?;
        let mut store = LogStore::open_on(Arc::new(RealDir::new(log_dir)), log_dir, create)?;
        if let Some(inner) = Arc::get_mut(&mut store.inner) {
            inner._lock = Some(lock);
        }
        let inner = Arc::clone(&store.inner);
        store.compactor = Some(
            std::thread::Builder::new()
                .name("weft-log-compact".into())
                .spawn(move || inner.compact_loop())
                .map_err(|e| StoreError::Open {
                    path: log_dir.to_owned(),
                    message: format!("starting the compaction thread: {e}"),
                })?,
        );
        Ok(store)
    }

    /// A log on any [`LogDir`] (tests: a simulated disk): no lock, no
    /// marker, no background compaction. See [`open_dir`](Self::open_dir).
    pub(crate) fn open_on(
        dir: Arc<dyn LogDir>,
        label: &Path,
        create: Option<u64>,
    ) -> Result<LogStore, StoreError> {
        let (index, writer, store_id) = recover::recover(&*dir, label, create)?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                path: label.to_owned(),
                dir,
                store_id,
                index: RwLock::new(index),
                writer: Mutex::new(writer),
                segment_bytes: AtomicU64::new(DEFAULT_SEGMENT_BYTES),
                compacting: Mutex::new(()),
                wake: (Mutex::new(false), Condvar::new()),
                _lock: None,
            }),
            compactor: None,
        })
    }

    /// The store id its segment headers carry (the data dir's marker
    /// repeats it).
    pub fn store_id(&self) -> u64 {
        self.inner.store_id
    }

    /// The log's directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// One compaction step: the oldest sealed segment's current records
    /// copied to the head, then its file removed; `false` when nothing was
    /// worth doing. The background thread calls it; tests call it directly.
    pub fn compact_step(&self) -> Result<bool, StoreError> {
        self.inner.compact_step()
    }

    /// The size past which the active segment is sealed (tests use small
    /// ones to get many segments).
    pub fn set_segment_bytes(&self, bytes: u64) {
        self.inner
            .segment_bytes
            .store(bytes.max(1), Ordering::Relaxed);
    }

    /// Bytes of the log's segment files, and how many of them are the
    /// latest record of something.
    pub fn sizes(&self) -> Result<(u64, u64), StoreError> {
        let index = self.inner.read_index()?;
        Ok(index
            .segments
            .values()
            .fold((0, 0), |(len, live), s| (len + s.len, live + s.live)))
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        if let Some(handle) = self.compactor.take() {
            if let Ok(mut stop) = self.inner.wake.0.lock() {
                *stop = true;
            }
            self.inner.wake.1.notify_all();
            let _ = handle.join();
        }
    }
}

/// Creates `path` (and its parents) private to its owner, if missing.
fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Takes the log dir's exclusive lock, held for as long as the file is.
fn lock_dir(log_dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = log_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::Open {
            path: path.clone(),
            message: format!("opening the lock file: {e}"),
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked(log_dir.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Open {
            path,
            message: format!("locking: {e}"),
        }),
    }
}

/// A new random store id.
fn new_store_id(data_dir: &Path) -> Result<u64, StoreError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Open {
        path: data_dir.to_owned(),
        message: format!("making a store id: {e}"),
    })?;
    Ok(u64::from_le_bytes(bytes))
}

impl Inner {
    fn read_index(&self) -> Result<RwLockReadGuard<'_, Index>, StoreError> {
        self.index.read().map_err(|_| StoreError::Poisoned)
    }

    fn lock_writer(&self) -> Result<MutexGuard<'_, Writer>, StoreError> {
        let writer = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        if let Some(why) = &writer.broken {
            return Err(StoreError::Backend {
                op: "writing",
                message: format!(
                    "an earlier write failed and its outcome on disk is unknown ({why}); restart the coordinator to read the log again"
                ),
            });
        }
        Ok(writer)
    }

    /// Appends the frame `buf` holds (its header reserved) and syncs it,
    /// then applies it to the index. Seals the active segment first when
    /// the frame would take it past the segment size.
    /// `hint` says where the index keeps a task's entry, when known (see
    /// `Index::apply_frame`).
    fn append(
        &self,
        writer: &mut Writer,
        mut buf: Vec<u8>,
        hint: &dyn Fn(u128) -> Option<u32>,
    ) -> Result<(), StoreError> {
        let len = buf.len() as u64;
        let limit = self.segment_bytes.load(Ordering::Relaxed);
        if (writer.len + len > limit || writer.len + len > u64::from(u32::MAX))
            && writer.len > HEADER_FRAME_LEN
        {
            self.roll(writer)?;
        }
        let seq = writer.seq + 1;
        frame::seal_frame(&mut buf, self.store_id, seq);
        if writer.len + len > u64::from(u32::MAX) {
            return Err(StoreError::Backend {
                op: "writing a commit",
                message: format!("a commit of {len} bytes is more than a segment can hold"),
            });
        }
        let at = writer.len;
        if let Err(err) = writer.file.write_all_at(&buf, at) {
            // A partial frame must not stay where the next one goes.
            if let Err(cut) = writer.file.set_len(at) {
                writer.broken = Some(format!("cutting a partial write: {cut}"));
            }
            writer.end = at;
            return Err(io_error("writing a commit", &err));
        }
        writer.end = writer.end.max(at + len);
        // The zeros only make later syncs cheaper: failing to write them
        // (a full disk) does not fail the commit, and zeros left half
        // written are zeros. The file may now reach anywhere up to `to`,
        // so `end` says `to` either way: a segment is cut back to its
        // frames when it is sealed, and only the last may end in zeros.
        if let Some((from, to)) = zeros_ahead(at + len, writer.end, limit) {
            if let Err(err) = write_zeros(&*writer.file, from, to) {
                tracing::debug!(error = %err, "could not write zeros ahead of the log");
            }
            writer.end = to;
        }
        if let Err(err) = writer.file.sync_data() {
            writer.broken = Some(format!("syncing: {err}"));
            return Err(io_error("syncing a commit", &err));
        }
        writer.len += len;
        writer.seq = seq;
        let applied = {
            let mut index = self.index.write().map_err(|_| StoreError::Poisoned)?;
            if let Some(segment) = index.segments.get_mut(&writer.active) {
                segment.len = writer.len;
            }
            index.apply_frame(
                writer.active,
                at + FRAME_HEADER as u64,
                &buf[FRAME_HEADER..],
                hint,
            )
        };
        writer.buf = buf;
        if let Err(reason) = applied {
            writer.broken = Some(reason.into());
            return Err(StoreError::Inconsistent(format!(
                "a commit the index cannot apply: {reason}"
            )));
        }
        Ok(())
    }

    /// Seals the active segment and starts the next one (its header
    /// synced and its name made durable before anything goes in it).
    fn roll(&self, writer: &mut Writer) -> Result<(), StoreError> {
        let no = writer.active + 1;
        // The segment is cut to its frames, durably, before the next one
        // exists: only the last segment may end in zeros, so zeros after
        // the frames of any other (acknowledged frames lost to zeros) are
        // damage, as any bad frame there is. The file's own length is
        // asked too, so nothing the writer did not count stays behind.
        let longer = writer
            .file
            .len()
            .map_or(true, |on_disk| on_disk > writer.len);
        if writer.end > writer.len || longer {
            writer
                .file
                .set_len(writer.len)
                .map_err(|e| io_error("sealing a segment", &e))?;
            if let Err(err) = writer.file.sync_data() {
                writer.broken = Some(format!("syncing a sealed segment: {err}"));
                return Err(io_error("sealing a segment", &err));
            }
            writer.end = writer.len;
        }
        let (file, len) = create_segment(&*self.dir, no, self.store_id, writer.seq + 1)?;
        let mut index = self.index.write().map_err(|_| StoreError::Poisoned)?;
        index
            .segments
            .insert(no, Segment::new(Arc::clone(&file), len));
        writer.active = no;
        writer.seq += 1;
        writer.file = file;
        writer.len = len;
        writer.end = len;
        drop(index);
        self.wake.1.notify_all();
        Ok(())
    }

    /// The file of segment `seg`.
    fn file(index: &Index, seg: u32) -> Result<Arc<dyn LogFile>, StoreError> {
        index
            .segments
            .get(&seg)
            .map(|s| Arc::clone(&s.file))
            .ok_or_else(|| StoreError::Inconsistent(format!("no segment {seg}")))
    }

    /// The body of the record at `loc`, which must be of `kind` with `key`.
    fn read_body(
        &self,
        file: &dyn LogFile,
        loc: Loc,
        kind: Kind,
        key: Key<'_>,
    ) -> Result<Vec<u8>, StoreError> {
        let mut bytes = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut bytes, u64::from(loc.off))
            .map_err(|e| io_error("reading a record", &e))?;
        body_of(bytes, loc, kind, key)
    }

    /// A task's record, with `next_seq`.
    fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.task_through(id, None)
    }

    /// A task's record, with `next_seq`; read through `window` when given
    /// (a restart reading every live task in file order).
    fn task_through(
        &self,
        id: TaskId,
        window: Option<&mut Window>,
    ) -> Result<Option<TaskRecord>, StoreError> {
        let key = id.as_u128();
        let (loc, spec, next_seq) = {
            let index = self.read_index()?;
            let Some(entry) = index.tasks.get(&key) else {
                return Ok(None);
            };
            let place = |loc: Loc| -> Result<(Loc, Arc<dyn LogFile>, u64), StoreError> {
                let len = index.segments.get(&loc.seg).map_or(0, |s| s.len);
                Ok((loc, Self::file(&index, loc.seg)?, len))
            };
            (
                place(entry.record)?,
                place(entry.spec)?,
                entry.events.len() as u64,
            )
        };
        let (spec_bytes, record_bytes) = match window {
            Some(window) => (window.read(&spec)?, window.read(&loc)?),
            // A task not changed since its submit has its spec right
            // before its record: one read for both.
            None if spec.0.seg == loc.0.seg
                && u64::from(spec.0.off) + u64::from(spec.0.len) == u64::from(loc.0.off) =>
            {
                let mut bytes = vec![0u8; (spec.0.len + loc.0.len) as usize];
                spec.1
                    .read_exact_at(&mut bytes, u64::from(spec.0.off))
                    .map_err(|e| io_error("reading a record", &e))?;
                let record = bytes.split_off(spec.0.len as usize);
                (bytes, record)
            }
            None => {
                let read = |(loc, file, _): &(Loc, Arc<dyn LogFile>, u64)| {
                    let mut bytes = vec![0u8; loc.len as usize];
                    file.read_exact_at(&mut bytes, u64::from(loc.off))
                        .map_err(|e| io_error("reading a record", &e))
                        .map(|()| bytes)
                };
                (read(&spec)?, read(&loc)?)
            }
        };
        let spec = decode_spec(&body_of(spec_bytes, spec.0, Kind::Spec, Key::Id(key))?)?;
        let body = body_of(record_bytes, loc.0, Kind::Task, Key::Id(key))?;
        let mut record = decode_task_with_spec(id, &body[TASK_HEAD.min(body.len())..], spec)?;
        record.next_seq = next_seq;
        Ok(Some(record))
    }

    /// [`Store::task_outcomes`]: each task's record without its spec
    /// (which is neither read nor decoded), read in file order, with one
    /// read for records close together: tasks that just finished sit
    /// near each other at the end of the log.
    fn task_outcomes(&self, ids: &[TaskId]) -> Result<Vec<Option<TaskRecord>>, StoreError> {
        // (position in `ids`, where its record is, its segment's file, next seq)
        let mut found: Vec<(usize, Loc, Arc<dyn LogFile>, u64)> = Vec::with_capacity(ids.len());
        {
            let index = self.read_index()?;
            for (n, id) in ids.iter().enumerate() {
                let Some(entry) = index.tasks.get(&id.as_u128()) else {
                    continue;
                };
                if entry.record.is_none() {
                    continue;
                }
                let file = Self::file(&index, entry.record.seg)?;
                found.push((n, entry.record, file, entry.events.len() as u64));
            }
        }
        found.sort_by_key(|(_, loc, _, _)| (loc.seg, loc.off));
        let no_spec = Arc::new(TaskSpec::call("", bytes::Bytes::new()));
        let mut out: Vec<Option<TaskRecord>> = (0..ids.len()).map(|_| None).collect();
        let mut i = 0;
        while i < found.len() {
            let (_, first, file, _) = &found[i];
            let start = u64::from(first.off);
            let mut stop = start + u64::from(first.len);
            let mut end = i + 1;
            while let Some((_, loc, _, _)) = found.get(end) {
                let (off, len) = (u64::from(loc.off), u64::from(loc.len));
                if loc.seg != first.seg
                    || off > stop + OUTCOME_GAP
                    || off + len - start > OUTCOME_SPAN
                {
                    break;
                }
                stop = stop.max(off + len);
                end += 1;
            }
            let mut bytes = vec![0u8; (stop - start) as usize];
            file.read_exact_at(&mut bytes, start)
                .map_err(|e| io_error("reading records", &e))?;
            for (n, loc, _, next_seq) in &found[i..end] {
                let at = (u64::from(loc.off) - start) as usize;
                let id = ids[*n];
                let record = bytes[at..at + loc.len as usize].to_vec();
                let body = body_of(record, *loc, Kind::Task, Key::Id(id.as_u128()))?;
                let body = &body[TASK_HEAD.min(body.len())..];
                let mut task = decode_task_with_spec(id, body, Arc::clone(&no_spec))?;
                task.next_seq = *next_seq;
                out[*n] = Some(task);
            }
            i = end;
        }
        Ok(out)
    }

    /// A task's spec, from its record at `loc`.
    fn read_spec(
        &self,
        key: u128,
        (loc, file): (Loc, Arc<dyn LogFile>),
    ) -> Result<Arc<TaskSpec>, StoreError> {
        decode_spec(&self.read_body(&*file, loc, Kind::Spec, Key::Id(key))?)
    }

    /// Reads the records at `locs` (of `kind`, keys from `key`), one read
    /// for each run of records next to each other in a segment.
    fn read_many<'k>(
        &self,
        locs: &[(Loc, Arc<dyn LogFile>)],
        kind: Kind,
        key: impl Fn(usize) -> Key<'k>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::with_capacity(locs.len());
        let mut i = 0;
        while i < locs.len() {
            let (first, file) = &locs[i];
            let mut end = i + 1;
            let mut span = u64::from(first.len);
            while end < locs.len()
                && locs[end].0.seg == first.seg
                && u64::from(locs[end].0.off) == u64::from(first.off) + span
                && span < 1 << 20
            {
                span += u64::from(locs[end].0.len);
                end += 1;
            }
            let mut bytes = vec![0u8; span as usize];
            file.read_exact_at(&mut bytes, u64::from(first.off))
                .map_err(|e| io_error("reading records", &e))?;
            let mut at = 0usize;
            for (n, (loc, _)) in locs.iter().enumerate().take(end).skip(i) {
                let record = bytes[at..at + loc.len as usize].to_vec();
                at += loc.len as usize;
                out.push(body_of(record, *loc, kind, key(n))?);
            }
            i = end;
        }
        Ok(out)
    }

    fn events(
        &self,
        id: TaskId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<TaskEvent>, StoreError> {
        let key = id.as_u128();
        let (spec, locs) = {
            let index = self.read_index()?;
            let Some(entry) = index.tasks.get(&key) else {
                return Ok(Vec::new());
            };
            let from = usize::try_from(from_seq).unwrap_or(usize::MAX);
            let mut locs = Vec::new();
            for loc in entry.events.iter().skip(from).take(limit) {
                locs.push((*loc, Self::file(&index, loc.seg)?));
            }
            ((entry.spec, Self::file(&index, entry.spec.seg)?), locs)
        };
        if locs.is_empty() {
            return Ok(Vec::new());
        }
        // The spec goes back into a `finished` event's record.
        let spec = self.read_spec(key, spec)?;
        let bodies =
            self.read_many(&locs, Kind::Event, |n| Key::Event(key, from_seq + n as u64))?;
        bodies
            .iter()
            .map(|body| decode_event(id, body, &spec))
            .collect()
    }

    /// A commit's frame, checked against the index: events follow their
    /// task with no gap in seqs; a task changed several times is written
    /// once, as it ends up.
    /// Fills `tasks` (emptied first) with what each task of the commit
    /// looked up (its entry's slot, for applying the commit without probing
    /// the index again).
    fn encode(
        index: &Index,
        records: &[Record],
        buf: &mut Vec<u8>,
        tasks: &mut crate::IdMap<u128, Pending>,
    ) -> Result<(), StoreError> {
        // Per task in this commit: its last record's position, and (one
        // index lookup per task) the seq of its next event, whether its
        // spec is written, and where its entry is.
        //
        // Every task's entry is looked up first, in a loop that does
        // little else: a queue served out of order finds its entries far
        // apart (each lookup a cache miss), and lookups of different tasks
        // side by side wait for memory together, where lookups between
        // encodings would wait one after the other.
        tasks.clear();
        for (i, record) in records.iter().enumerate() {
            let (key, task) = match record {
                Record::Task(task) => (task.id.as_u128(), true),
                Record::Event(event) => (event.task_id.as_u128(), false),
                Record::Secrets(id, _) => (id.as_u128(), false),
                _ => continue,
            };
            let pending = tasks.entry(key).or_insert_with(|| {
                let slot = index.tasks.slot_of(&key);
                let found = slot
                    .and_then(|slot| index.tasks.at(slot, &key))
                    .filter(|e| !e.record.is_none())
                    .map(|e| (e.events.len() as u64, !e.spec.is_none()));
                Pending {
                    last_record: None,
                    found,
                    known: None,
                    slot,
                }
            });
            if task {
                pending.last_record = Some(i);
            }
        }
        for (i, record) in records.iter().enumerate() {
            match record {
                Record::Task(task) => {
                    let key = task.id.as_u128();
                    let pending = tasks.entry(key).or_default();
                    let (_, spec_written) = match pending.known {
                        Some(known) => known,
                        None => *pending.known.insert(pending.found.unwrap_or((0, false))),
                    };
                    if pending.last_record == Some(i) {
                        // A task's spec never changes: written once, with
                        // its first record.
                        if !spec_written {
                            frame::put(buf, Kind::Spec, Key::Id(key), &[&encode_spec(&task.spec)]);
                            pending.known = pending.known.map(|(next, _)| (next, true));
                        }
                        let head = TaskHead::of(task).bytes();
                        frame::put_with(buf, Kind::Task, Key::Id(key), |buf| {
                            buf.extend_from_slice(&head);
                            encode_task_without_spec_into(task, buf);
                        });
                    }
                }
                Record::Event(event) => {
                    let key = event.task_id.as_u128();
                    let pending = tasks.entry(key).or_default();
                    let next = match pending.known {
                        Some((next, _)) => next,
                        None => match pending.found {
                            Some(found) => {
                                pending.known = Some(found);
                                found.0
                            }
                            None => {
                                return Err(StoreError::Inconsistent(format!(
                                    "event for unknown task {}",
                                    event.task_id
                                )));
                            }
                        },
                    };
                    if event.seq != next {
                        return Err(StoreError::Inconsistent(format!(
                            "task {} event seq {} where {} was next",
                            event.task_id, event.seq, next
                        )));
                    }
                    frame::put_with(buf, Kind::Event, Key::Event(key, event.seq), |buf| {
                        encode_event_into(event, buf);
                    });
                    pending.known = pending.known.map(|(_, spec)| (next + 1, spec));
                }
                Record::Secrets(id, env) => {
                    // Of a task stored, or written earlier in this commit
                    // (`known`): secrets without their task's record would
                    // be an entry the index cannot read, and refused as
                    // damage when the log is next opened.
                    let pending = tasks.entry(id.as_u128()).or_default();
                    if pending.known.is_none() && pending.found.is_none() {
                        return Err(StoreError::Inconsistent(format!(
                            "secrets for unknown task {id}"
                        )));
                    }
                    frame::put(
                        buf,
                        Kind::Secrets,
                        Key::Id(id.as_u128()),
                        &[&encode_secrets(env)],
                    );
                }
                Record::ForgetSecrets(id) => {
                    frame::put(buf, Kind::ForgetSecrets, Key::Id(id.as_u128()), &[]);
                }
                Record::Schedule(schedule) => {
                    frame::put(
                        buf,
                        Kind::Schedule,
                        Key::Name(schedule.name()),
                        &[&encode_schedule(schedule)],
                    );
                }
                Record::DeleteSchedule(name) => {
                    frame::put(buf, Kind::DeleteSchedule, Key::Name(name), &[]);
                }
                Record::Limit(limit) => {
                    let name = format!("{}/{}", limit.kind.as_str(), limit.name);
                    let body = prost::Message::encode_to_vec(&weft_proto::pb::Limit::from(limit));
                    frame::put(buf, Kind::Limit, Key::Name(&name), &[&body]);
                }
                Record::DeleteLimit { name, kind } => {
                    let name = format!("{kind}/{name}");
                    frame::put(buf, Kind::DeleteLimit, Key::Name(&name), &[]);
                }
            }
        }
        Ok(())
    }

    /// Writes `records` as one synced frame.
    fn commit(&self, records: &[Record]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut writer = self.lock_writer()?;
        let mut buf = std::mem::take(&mut writer.buf);
        buf.clear();
        buf.resize(FRAME_HEADER, 0);
        let mut pending = std::mem::take(&mut writer.pending);
        if let Err(err) = Self::encode(&*self.read_index()?, records, &mut buf, &mut pending) {
            writer.buf = buf;
            writer.pending = pending;
            return Err(err);
        }
        // The writer's lock, held from the encoding to the applying, keeps
        // every slot looked up where it was: only `append` changes entries.
        let appended = self.append(&mut writer, buf, &|id| {
            pending.get(&id).and_then(|p| p.slot)
        });
        // Kept for the next commit, so its table is not grown again from
        // empty; one much larger than a usual commit's is let go. So is
        // one much larger than this commit needed: a commit's tasks are
        // looked up in it three times each, and spread over the room a
        // burst once needed, each lookup would be a cache miss.
        if let Some(room) = room_to_keep(pending.capacity(), pending.len()) {
            pending = crate::IdMap::with_capacity_and_hasher(room, Default::default());
        }
        writer.pending = pending;
        appended?;
        drop(writer);
        self.nudge_compaction();
        Ok(())
    }

    /// Appends one frame of records `fill` writes into it.
    fn commit_with(&self, fill: impl FnOnce(&mut Vec<u8>)) -> Result<(), StoreError> {
        let mut writer = self.lock_writer()?;
        let mut buf = std::mem::take(&mut writer.buf);
        buf.clear();
        buf.resize(FRAME_HEADER, 0);
        fill(&mut buf);
        self.append(&mut writer, buf, &|_| None)
    }

    /// Wakes the compaction thread when enough of the sealed segments'
    /// bytes are dead.
    fn nudge_compaction(&self) {
        if self.compaction_due() {
            self.wake.1.notify_all();
        }
    }

    /// Every item of a small keyed table (`tokens`, `schedules`...), read.
    fn read_table(
        &self,
        pick: impl Fn(&Index) -> Vec<(String, Loc)>,
        kind: Kind,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let items = {
            let index = self.read_index()?;
            let mut items = Vec::new();
            for (name, loc) in pick(&index) {
                items.push((name, loc, Self::file(&index, loc.seg)?));
            }
            items
        };
        items
            .iter()
            .map(|(name, loc, file)| self.read_body(&**file, *loc, kind, Key::Name(name)))
            .collect()
    }
}

/// The room the per-commit table is to be made again with, when its room
/// for `capacity` tasks after a commit of `used` is too much to keep: the
/// commit's size, or none past the cap. `None`: keep it as it is.
fn room_to_keep(capacity: usize, used: usize) -> Option<usize> {
    if capacity <= MAX_KEPT_PENDING && capacity <= 8 * used.max(KEPT_PENDING_FLOOR) {
        return None;
    }
    Some(if used > MAX_KEPT_PENDING { 0 } else { used })
}

/// A task's place in one commit being encoded (`LogStore::encode`).
#[derive(Default)]
struct Pending {
    /// Where its last task record is in the commit (the one written).
    last_record: Option<usize>,
    /// Its next event's seq and whether its spec is written, as the index
    /// had them before this commit (`None`: the index has no record of
    /// it).
    found: Option<(u64, bool)>,
    /// The same as this commit's records so far go (from its first
    /// record on).
    known: Option<(u64, bool)>,
    /// Where the index keeps its entry (when it has one), once looked up.
    slot: Option<u32>,
}

/// Reads records forward through a window of a segment, so a restart
/// reads a million live tasks (in id order, which for a queue is file
/// order) with a few hundred reads instead of one or two each.
#[derive(Default)]
struct Window {
    seg: u32,
    start: u64,
    buf: Vec<u8>,
}

/// Bytes between two records that [`Inner::task_outcomes`] reads through
/// rather than reading each record on its own.
const OUTCOME_GAP: u64 = 16 << 10;

/// Most bytes one read of [`Inner::task_outcomes`] takes.
const OUTCOME_SPAN: u64 = 1 << 20;

/// Bytes a [`Window`] reads at once.
const LOAD_WINDOW: u64 = 4 << 20;

impl Window {
    /// The bytes of the record at `loc` (in a segment `seg_len` long).
    fn read(
        &mut self,
        (loc, file, seg_len): &(Loc, Arc<dyn LogFile>, u64),
    ) -> Result<Vec<u8>, StoreError> {
        let (off, len) = (u64::from(loc.off), u64::from(loc.len));
        let inside = self.seg == loc.seg
            && off >= self.start
            && off + len <= self.start + self.buf.len() as u64;
        if !inside {
            let size = LOAD_WINDOW.min(seg_len.saturating_sub(off)).max(len);
            self.buf.resize(size as usize, 0);
            file.read_exact_at(&mut self.buf, off)
                .map_err(|e| io_error("loading", &e))?;
            self.seg = loc.seg;
            self.start = off;
        }
        let from = (off - self.start) as usize;
        Ok(self.buf[from..from + len as usize].to_vec())
    }
}

/// How far past its last frame the active segment is kept written with
/// zeros: a commit that ends past the zeros writes this much more of them,
/// in the same sync. So one commit in about a MiB of log pays for growing
/// the file, and the others overwrite. Never past the segment's size.
pub(crate) const ZERO_AHEAD: u64 = 1 << 20;

/// The zeros to write after a commit that ends at `end` of a file
/// `file_len` long (zeros after the last frame): once the commit reached
/// the end of the file, from there to [`ZERO_AHEAD`] past it, at most to
/// `limit` (the segment size); `None` while zeros are left after it.
fn zeros_ahead(end: u64, file_len: u64, limit: u64) -> Option<(u64, u64)> {
    let to = (end + ZERO_AHEAD).min(limit);
    (end >= file_len && to > end).then_some((end, to))
}

/// Writes zeros from `from` to `to`.
fn write_zeros(file: &dyn LogFile, from: u64, to: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The bytes of a segment's header frame.
const HEADER_FRAME_LEN: u64 = (FRAME_HEADER + frame::RECORD_HEADER + 24) as u64;

/// Creates segment `no`, writes its header frame (frame number `seq`) and
/// syncs it and the directory. Returns the file and its length.
fn create_segment(
    dir: &dyn LogDir,
    no: u32,
    store_id: u64,
    seq: u64,
) -> Result<(Arc<dyn LogFile>, u64), StoreError> {
    let name = segment_name(no);
    let file = dir
        .create(&name)
        .map_err(|e| io_error("creating a segment", &e))?;
    let mut buf = vec![0u8; FRAME_HEADER];
    frame::put(
        &mut buf,
        Kind::Header,
        Key::None,
        &[&frame::header_body(store_id, no)],
    );
    frame::seal_frame(&mut buf, 0, seq);
    let written = file
        .write_all_at(&buf, 0)
        .and_then(|()| file.sync_data())
        .and_then(|()| dir.sync());
    if let Err(err) = written {
        let _ = dir.remove(&name);
        return Err(io_error("creating a segment", &err));
    }
    Ok((file, buf.len() as u64))
}

/// The body of a record read from `loc`: its checksum, kind and key
/// checked.
fn body_of(mut bytes: Vec<u8>, loc: Loc, kind: Kind, key: Key<'_>) -> Result<Vec<u8>, StoreError> {
    let damaged = |reason: &'static str| {
        tracing::error!(table = kind.name(), key = %key.describe(), segment = loc.seg, offset = loc.off, reason, "the store is damaged");
        StoreError::Damaged {
            table: kind.name(),
            key: key.describe(),
            reason,
        }
    };
    let start = {
        let (raw, _) = frame::record(&bytes, true).map_err(damaged)?;
        if raw.kind != kind || raw.key != key {
            return Err(damaged("a record under another key"));
        }
        raw.body.as_ptr() as usize - bytes.as_ptr() as usize
    };
    bytes.drain(..start);
    Ok(bytes)
}

impl Store for LogStore {
    fn commit(&self, records: &[Record]) -> Result<(), StoreError> {
        self.inner.commit(records)
    }

    fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.inner.task(id)
    }

    fn task_outcomes(&self, ids: &[TaskId]) -> Result<Vec<Option<TaskRecord>>, StoreError> {
        self.inner.task_outcomes(ids)
    }

    fn has_tasks(&self, ids: &[TaskId]) -> Result<Vec<bool>, StoreError> {
        let index = self.inner.read_index()?;
        Ok(ids
            .iter()
            .map(|id| {
                index
                    .tasks
                    .get(&id.as_u128())
                    .is_some_and(|entry| !entry.record.is_none())
            })
            .collect())
    }

    fn list_page(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let before = query.before.map_or(u128::MAX, TaskId::as_u128);
        let from = query.from.map_or(0, TaskId::as_u128);
        if from >= before {
            return Ok(ListPage::default());
        }
        let state = query.state.map(frame::state_number);
        // Ids are taken from the index a chunk at a time, so a long scan
        // never holds the index while it reads records.
        let mut chunk: std::collections::VecDeque<u128> = std::collections::VecDeque::new();
        let mut cursor: Option<u128> = None;
        let mut done = false;
        let inner = &self.inner;
        let ids = std::iter::from_fn(move || {
            if chunk.is_empty() && !done {
                let index = match inner.read_index() {
                    Ok(index) => index,
                    Err(err) => {
                        done = true;
                        return Some(Err(err));
                    }
                };
                let (lo, hi) = match (query.ascending, cursor) {
                    (true, Some(c)) => (c.saturating_add(1), before),
                    (true, None) => (from, before),
                    (false, Some(c)) => (from, c),
                    (false, None) => (from, before),
                };
                if lo < hi {
                    let range = lo..hi;
                    let taken: Vec<u128> = match state {
                        Some(s) => {
                            let set = index.in_state(s);
                            match (set, query.ascending) {
                                (None, _) => Vec::new(),
                                (Some(set), true) => set.range(range).take(256).copied().collect(),
                                (Some(set), false) => {
                                    set.range(range).rev().take(256).copied().collect()
                                }
                            }
                        }
                        None => index.ids_in(range, query.ascending, 256),
                    };
                    if taken.len() < 256 {
                        done = true;
                    }
                    cursor = taken.last().copied();
                    chunk.extend(taken);
                } else {
                    done = true;
                }
            }
            chunk.pop_front().map(|id| Ok(TaskId::from_u128(id)))
        });
        // Read after the index was let go: the record may have left the
        // query's state meanwhile, which `matches` checks.
        scan_page(ids, query, |id| {
            Ok(self.inner.task(id)?.filter(|record| query.matches(record)))
        })
    }

    fn events(
        &self,
        id: TaskId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<TaskEvent>, StoreError> {
        self.inner.events(id, from_seq, limit)
    }

    fn load_each(
        &self,
        final_since: SystemTime,
        live: &mut dyn FnMut(TaskRecord, Option<Arc<SecretEnv>>),
    ) -> Result<Loaded, StoreError> {
        let inner = &self.inner;
        let mut loaded = Loaded::default();
        let live_ids: Vec<u128> = {
            let index = inner.read_index()?;
            for state in TaskState::ALL.iter().filter(|s| s.is_final()) {
                let count = index
                    .in_state(frame::state_number(*state))
                    .map_or(0, |s| s.len() as u64);
                if count > 0 {
                    loaded.final_counts.push((*state, count));
                }
            }
            let since = frame::millis(final_since);
            for (_, id) in index
                .finals
                .range((since, 0)..)
                .rev()
                .take(MAX_RECENTLY_FINAL)
            {
                if let Some(entry) = index.tasks.get(id) {
                    loaded.recently_final.push(FinalAttempt {
                        task_id: TaskId::from_u128(*id),
                        attempt: entry.head.attempt(),
                        outcome: entry.head.last_outcome(),
                    });
                }
            }
            let mut ids: Vec<u128> = LIVE_STATES
                .iter()
                .filter_map(|s| index.in_state(frame::state_number(*s)))
                .flat_map(|set| set.iter().copied())
                .collect();
            ids.sort_unstable();
            ids
        };
        loaded.schedules = inner
            .read_table(|i| clone_table(&i.schedules), Kind::Schedule)?
            .iter()
            .map(|body| decode_schedule(body))
            .collect::<Result<Vec<ScheduleRecord>, _>>()?;
        loaded.limits = inner
            .read_table(|i| clone_table(&i.limits), Kind::Limit)?
            .iter()
            .map(|body| {
                <weft_proto::pb::Limit as prost::Message>::decode(body.as_slice())
                    .ok()
                    .and_then(|pb| weft_proto::policy::Limit::try_from(pb).ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        what: "limit",
                        message: "cannot be read".into(),
                    })
            })
            .collect::<Result<_, _>>()?;
        let mut window = Window::default();
        for id in live_ids {
            let task_id = TaskId::from_u128(id);
            let Some(record) = inner.task_through(task_id, Some(&mut window))? else {
                continue;
            };
            let (secrets, events) = {
                let index = inner.read_index()?;
                let Some(entry) = index.tasks.get(&id) else {
                    continue;
                };
                let secrets = match entry.secrets {
                    Some(loc) => Some((loc, Inner::file(&index, loc.seg)?)),
                    None => None,
                };
                let on_node = matches!(record.state, TaskState::Assigned | TaskState::Running);
                let mut events = Vec::new();
                if on_node {
                    for (seq, loc) in entry.events.iter().enumerate().rev() {
                        events.push((seq as u64, *loc, Inner::file(&index, loc.seg)?));
                    }
                }
                (secrets, events)
            };
            let secret = match secrets {
                Some((loc, file)) => {
                    let body = inner.read_body(&*file, loc, Kind::Secrets, Key::Id(id))?;
                    Some(Arc::new(decode_secrets(&body)?))
                }
                None => None,
            };
            if !events.is_empty() {
                let mut failed = None;
                let newest_first = events.iter().map_while(|(seq, loc, file)| {
                    inner
                        .read_body(&**file, *loc, Kind::Event, Key::Event(id, *seq))
                        .and_then(|body| decode_event(task_id, &body, &record.spec))
                        .map_err(|err| failed = Some(err))
                        .ok()
                });
                let next = next_chunk(record.attempt, newest_first);
                if let Some(err) = failed {
                    return Err(err);
                }
                if next > 0 {
                    loaded.next_chunks.push((task_id, next));
                }
            }
            live(record, secret);
        }
        Ok(loaded)
    }

    fn expire(
        &self,
        finished_before: SystemTime,
        limit: usize,
        keep: &[TaskId],
    ) -> Result<Vec<TaskState>, StoreError> {
        let keep = super::KeepSet::new(keep);
        let inner = &self.inner;
        let mut writer = inner.lock_writer()?;
        let due: Vec<(u128, TaskState)> = {
            let index = inner.read_index()?;
            index
                .finals
                .range(..(frame::millis(finished_before), 0))
                .filter(|(_, id)| !keep.holds(TaskId::from_u128(*id)))
                .take(limit)
                .filter_map(|(_, id)| {
                    let state = index.tasks.get(id)?.head.task_state()?;
                    Some((*id, state))
                })
                .collect()
        };
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut buf = std::mem::take(&mut writer.buf);
        buf.clear();
        buf.resize(FRAME_HEADER, 0);
        for (id, _) in &due {
            frame::put(&mut buf, Kind::Expired, Key::Id(*id), &[]);
        }
        inner.append(&mut writer, buf, &|_| None)?;
        drop(writer);
        inner.nudge_compaction();
        Ok(due.into_iter().map(|(_, state)| state).collect())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.inner
            .read_table(|i| clone_table(&i.tokens), Kind::Token)?
            .iter()
            .map(|body| decode_token(body))
            .collect()
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.inner.commit_with(|buf| {
            frame::put(
                buf,
                Kind::Token,
                Key::Name(&token.id),
                &[&encode_token(token)],
            );
        })
    }

    fn node_identities(&self) -> Result<Vec<NodeIdentityRecord>, StoreError> {
        let inner = &self.inner;
        let items = {
            let index = inner.read_index()?;
            let mut items = Vec::new();
            for (id, loc) in &index.nodes {
                items.push((*id, *loc, Inner::file(&index, loc.seg)?));
            }
            items
        };
        items
            .iter()
            .map(|(id, loc, file)| {
                let body = inner.read_body(&**file, *loc, Kind::Node, Key::Id(*id))?;
                decode_node_identity(&body)
            })
            .collect()
    }

    fn put_node_identity(
        &self,
        identity: &NodeIdentityRecord,
        token: Option<&TokenRecord>,
    ) -> Result<(), StoreError> {
        self.inner.commit_with(|buf| {
            frame::put(
                buf,
                Kind::Node,
                Key::Id(identity.id.as_u128()),
                &[&encode_node_identity(identity)],
            );
            if let Some(token) = token {
                frame::put(
                    buf,
                    Kind::Token,
                    Key::Name(&token.id),
                    &[&encode_token(token)],
                );
            }
        })
    }
}

/// A keyed table's entries, copied out of the index.
fn clone_table(table: &std::collections::BTreeMap<String, Loc>) -> Vec<(String, Loc)> {
    table.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

const LIVE_STATES: [TaskState; 4] = [
    TaskState::Pending,
    TaskState::Queued,
    TaskState::Assigned,
    TaskState::Running,
];

/// How long the compaction thread sleeps when nothing wakes it.
const COMPACT_POLL: Duration = Duration::from_secs(5);
