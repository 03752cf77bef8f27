//! The candidate stores, behind one small interface: a durable commit per
//! batch, a retention pass, and a compaction pass where the engine has one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};
use prost::Message;
use redb::ReadableTable;
use weft_coordinator::store::{Record, RedbStore, Store};

use crate::lean::{coalesce, event_bytes, head_bytes, millis, seal, spec_bytes};

/// Which store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Generates the records and drops them: the workload's own cost.
    None,
    /// (a) Today's `RedbStore`, through the `Store` trait.
    RedbToday,
    /// (b) redb with fewer, smaller writes (see `LeanRedb`).
    RedbLean,
    /// (c) fjall (LSM), one durable batch per commit (`PersistMode::SyncData`).
    Fjall,
    /// (d) An append-only log of batches, fdatasync per batch, compaction.
    Log,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::RedbToday => "redb-today",
            Kind::RedbLean => "redb-lean",
            Kind::Fjall => "fjall",
            Kind::Log => "log",
        }
    }
}

pub trait Candidate {
    /// Writes one batch durably.
    fn commit(&mut self, records: &[Record]) -> Result<()>;
    /// Deletes final tasks whose record last changed before `cut`.
    fn retain(&mut self, cut: SystemTime) -> Result<usize>;
    /// Gives back the space retention freed, if the engine can; false if not.
    fn compact(&mut self) -> Result<bool>;
    /// Bytes of the dir that are a write-ahead journal not yet evicted
    /// (part of the dir's bytes); 0 for engines without one.
    fn journal_bytes(&self) -> Result<u64> {
        Ok(0)
    }
}

pub fn open(kind: Kind, dir: &Path) -> Result<Box<dyn Candidate>> {
    std::fs::create_dir_all(dir)?;
    Ok(match kind {
        Kind::None => Box::new(Discard),
        Kind::RedbToday => Box::new(Today {
            store: Some(RedbStore::open(dir).context("opening RedbStore")?),
            dir: dir.to_owned(),
        }),
        Kind::RedbLean => Box::new(LeanRedb::open(dir)?),
        Kind::Fjall => Box::new(Fjall::open(dir)?),
        Kind::Log => Box::new(Log::open(dir)?),
    })
}

/// Reopens the store in `dir` after a run and hands every live task to
/// the caller as a restart would (decoded records); returns how many.
pub fn recover(kind: Kind, dir: &Path) -> Result<usize> {
    let mut live = 0usize;
    match kind {
        Kind::RedbToday => {
            let store = RedbStore::open(dir)?;
            store.load_each(SystemTime::now(), &mut |record, _| {
                live += 1;
                std::hint::black_box(record);
            })?;
        }
        Kind::Log => {
            Log::recover(dir, &mut |spec| {
                live += 1;
                std::hint::black_box(spec);
            })?;
        }
        other => anyhow::bail!(
            "recovery is measured for redb-today and log only, not {}",
            other.name()
        ),
    }
    Ok(live)
}

struct Discard;

impl Candidate for Discard {
    fn commit(&mut self, records: &[Record]) -> Result<()> {
        std::hint::black_box(records);
        Ok(())
    }
    fn retain(&mut self, _: SystemTime) -> Result<usize> {
        Ok(0)
    }
    fn compact(&mut self) -> Result<bool> {
        Ok(false)
    }
}

// ---------------------------------------------------------------- (a)

/// Today's store, unchanged: `RedbStore::commit` and `Store::expire`.
struct Today {
    store: Option<RedbStore>,
    dir: PathBuf,
}

impl Candidate for Today {
    fn commit(&mut self, records: &[Record]) -> Result<()> {
        let store = self.store.as_ref().context("store closed")?;
        Ok(store.commit(records)?)
    }

    fn retain(&mut self, cut: SystemTime) -> Result<usize> {
        let store = self.store.as_ref().context("store closed")?;
        let mut deleted = 0;
        loop {
            // The coordinator's sweep deletes in bounded transactions.
            let gone = store.expire(cut, 10_000)?.len();
            deleted += gone;
            if gone == 0 {
                return Ok(deleted);
            }
        }
    }

    /// `RedbStore` has no compaction; redb's own `compact` on the file,
    /// closed and reopened, is what an offline compaction would do.
    fn compact(&mut self) -> Result<bool> {
        drop(self.store.take());
        let mut db = redb::Database::open(self.dir.join("weft.redb"))?;
        Ok(db.compact()?)
    }
}

// ---------------------------------------------------------------- (b)

type Id = u128;
const SPECS: redb::TableDefinition<Id, &[u8]> = redb::TableDefinition::new("specs");
const HEADS: redb::TableDefinition<Id, &[u8]> = redb::TableDefinition::new("heads");
/// Every event of a commit, in one value, at the commit's sequence number:
/// appended at the right edge of the tree.
const LOG: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");
const LIVE: redb::TableDefinition<Id, ()> = redb::TableDefinition::new("live");
const FINAL_BY_TIME: redb::TableDefinition<(u64, Id), ()> =
    redb::TableDefinition::new("final_by_time");
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

/// redb with fewer, smaller writes: per task and commit one small head (the
/// spec once, at submit); the commit's events in one appended value; a live
/// set instead of a state index (the live tasks' states are in their heads
/// and in the scheduler); no read before a write.
struct LeanRedb {
    db: Option<redb::Database>,
    path: PathBuf,
    seq: u64,
    /// Commits holding each live task's events (kept in its head too).
    event_commits: HashMap<Id, Vec<u64>>,
}

impl LeanRedb {
    fn open(dir: &Path) -> Result<LeanRedb> {
        let path = dir.join("lean.redb");
        let db = redb::Database::builder()
            .set_cache_size(64 * 1024 * 1024)
            .create(&path)?;
        Ok(LeanRedb {
            db: Some(db),
            path,
            seq: 0,
            event_commits: HashMap::new(),
        })
    }

    fn db(&self) -> Result<&redb::Database> {
        self.db.as_ref().context("closed")
    }
}

impl Candidate for LeanRedb {
    fn commit(&mut self, records: &[Record]) -> Result<()> {
        let seq = self.seq;
        let mut txn = self.db()?.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        txn.set_quick_repair(true);
        let mut finished = 0u64;
        {
            let mut specs = txn.open_table(SPECS)?;
            let mut heads = txn.open_table(HEADS)?;
            let mut live = txn.open_table(LIVE)?;
            let mut by_time = txn.open_table(FINAL_BY_TIME)?;
            let mut log = Vec::with_capacity(records.len() * 40);
            for t in coalesce(records) {
                let key = t.id.to_be_bytes();
                if !t.events.is_empty() {
                    self.event_commits.entry(t.id).or_default().push(seq);
                    for e in &t.events {
                        let bytes = event_bytes(e);
                        log.extend_from_slice(&t.id.to_le_bytes());
                        log.extend_from_slice(&e.seq.to_le_bytes());
                        log.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                        log.extend_from_slice(&bytes);
                    }
                }
                let Some(record) = t.record else { continue };
                if t.new {
                    specs.insert(t.id, seal(&key, spec_bytes(record)).as_slice())?;
                    live.insert(t.id, ())?;
                }
                let commits = self.event_commits.get(&t.id).map_or(&[][..], Vec::as_slice);
                heads.insert(t.id, seal(&key, head_bytes(record, commits)).as_slice())?;
                if record.state.is_final() {
                    live.remove(t.id)?;
                    by_time.insert((millis(record.updated_at), t.id), ())?;
                    self.event_commits.remove(&t.id);
                    finished += 1;
                }
            }
            if !log.is_empty() {
                let log = seal(&seq.to_be_bytes(), log);
                txn.open_table(LOG)?.insert(seq, log.as_slice())?;
            }
            if finished > 0 {
                let mut meta = txn.open_table(META)?;
                let old = meta.get("finished")?.map_or(0, |v| v.value());
                meta.insert("finished", old + finished)?;
            }
        }
        txn.commit()?;
        self.seq += 1;
        Ok(())
    }

    fn retain(&mut self, cut: SystemTime) -> Result<usize> {
        let cut = millis(cut);
        let mut deleted = 0;
        loop {
            let mut txn = self.db()?.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            txn.set_quick_repair(true);
            let gone;
            {
                let mut by_time = txn.open_table(FINAL_BY_TIME)?;
                let mut specs = txn.open_table(SPECS)?;
                let mut heads = txn.open_table(HEADS)?;
                let old: Vec<(u64, Id)> = by_time
                    .range((0, 0)..(cut, 0))?
                    .take(10_000)
                    .map(|e| e.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()?;
                for (ms, id) in &old {
                    by_time.remove((*ms, *id))?;
                    specs.remove(*id)?;
                    heads.remove(*id)?;
                }
                gone = old.len();
                // Log entries older than every kept task's first commit
                // hold no kept event. Kept tasks are the ids left in
                // `heads`; the oldest has the oldest first commit.
                let first_kept = match heads.first()? {
                    Some((_, head)) => first_commit(head.value()),
                    None => self.seq,
                };
                let mut log = txn.open_table(LOG)?;
                log.retain_in(..first_kept, |_, _| false)?;
            }
            txn.commit()?;
            deleted += gone;
            if gone == 0 {
                return Ok(deleted);
            }
        }
    }

    fn compact(&mut self) -> Result<bool> {
        let mut db = self.db.take().context("closed")?;
        let done = db.compact()?;
        drop(db);
        self.db = Some(redb::Database::open(&self.path)?);
        Ok(done)
    }
}

/// The first commit listed in a head (its submit).
fn first_commit(head: &[u8]) -> u64 {
    // state(1) attempt(4) updated(8) next_seq(8) node flag(1) [node(16)]
    let mut at = 1 + 4 + 8 + 8;
    let has_node = head.get(at).copied() == Some(1);
    at += 1 + if has_node { 16 } else { 0 };
    for _ in 0..3 {
        let len = head.get(at..at + 4).map_or(0, |b| {
            u32::from_le_bytes(b.try_into().unwrap_or([0; 4])) as usize
        });
        at += 4 + len;
    }
    let count = head.get(at).copied().unwrap_or(0);
    if count == 0 {
        return 0;
    }
    head.get(at + 1..at + 9)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
}

// ---------------------------------------------------------------- (c)

/// fjall: keyspaces for specs, heads, events (task, seq), the live set and
/// final tasks by time; each commit one `WriteBatch` persisted with
/// `PersistMode::SyncData` (fdatasync of the journal) before it returns.
struct Fjall {
    db: fjall::Database,
    specs: fjall::Keyspace,
    heads: fjall::Keyspace,
    events: fjall::Keyspace,
    live: fjall::Keyspace,
    by_time: fjall::Keyspace,
}

impl Fjall {
    fn open(dir: &Path) -> Result<Fjall> {
        let db = fjall::Database::builder(dir.join("fjall"))
            .cache_size(64 * 1024 * 1024)
            .open()?;
        let ks = |name: &str| db.keyspace(name, fjall::KeyspaceCreateOptions::default);
        Ok(Fjall {
            specs: ks("specs")?,
            heads: ks("heads")?,
            events: ks("events")?,
            live: ks("live")?,
            by_time: ks("final_by_time")?,
            db,
        })
    }
}

fn event_key(id: Id, seq: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&id.to_be_bytes());
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn time_key(ms: u64, id: Id) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&ms.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

impl Candidate for Fjall {
    fn commit(&mut self, records: &[Record]) -> Result<()> {
        let mut batch = self
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncData));
        for t in coalesce(records) {
            let key = t.id.to_be_bytes();
            for e in &t.events {
                let k = event_key(t.id, e.seq);
                batch.insert(&self.events, k.to_vec(), seal(&k, event_bytes(e)));
            }
            let Some(record) = t.record else { continue };
            if t.new {
                batch.insert(&self.specs, key.to_vec(), seal(&key, spec_bytes(record)));
                batch.insert(&self.live, key.to_vec(), Vec::new());
            }
            batch.insert(
                &self.heads,
                key.to_vec(),
                seal(&key, head_bytes(record, &[])),
            );
            if record.state.is_final() {
                batch.remove(&self.live, key.to_vec());
                batch.insert(
                    &self.by_time,
                    time_key(millis(record.updated_at), t.id).to_vec(),
                    Vec::new(),
                );
            }
        }
        batch.commit()?;
        Ok(())
    }

    fn retain(&mut self, cut: SystemTime) -> Result<usize> {
        let end = time_key(millis(cut), 0);
        let mut deleted = 0;
        // Each round starts past the last key it deleted: a scan from the
        // start would walk every tombstone written so far again.
        let mut from: Vec<u8> = Vec::new();
        loop {
            let old: Vec<fjall::UserKey> = self
                .by_time
                .range(from.as_slice()..end.as_slice())
                .take(10_000)
                .map(|g| g.key())
                .collect::<Result<_, _>>()?;
            if old.is_empty() {
                return Ok(deleted);
            }
            let mut batch = self
                .db
                .batch()
                .durability(Some(fjall::PersistMode::SyncData));
            for k in &old {
                let id = Id::from_be_bytes(k[8..24].try_into()?);
                let key = id.to_be_bytes();
                batch.remove(&self.by_time, k.clone());
                batch.remove(&self.specs, key.to_vec());
                batch.remove(&self.heads, key.to_vec());
                // A noop task has 5 events; a real store reads next_seq
                // from the head.
                for seq in 0..5 {
                    batch.remove(&self.events, event_key(id, seq).to_vec());
                }
            }
            batch.commit()?;
            deleted += old.len();
            if let Some(last) = old.last() {
                from = last.to_vec();
                from.push(0);
            }
        }
    }

    fn journal_bytes(&self) -> Result<u64> {
        Ok(self.db.journal_disk_space()?)
    }

    fn compact(&mut self) -> Result<bool> {
        for ks in [
            &self.specs,
            &self.heads,
            &self.events,
            &self.live,
            &self.by_time,
        ] {
            ks.rotate_memtable_and_wait()?;
            ks.major_compact()?;
        }
        Ok(true)
    }
}

// ---------------------------------------------------------------- (d)

/// An append-only log: each commit one frame (`len u32 | crc32c u32 |
/// payload`) appended to the active segment and fdatasync'ed; the payload
/// is the commit's coalesced writes (spec at submit, head, events). An
/// in-memory index keeps, per task still in the log, where its latest head
/// is and when it became final. Compaction copies the records of the tasks
/// still indexed (live, or final after the cut) into a new segment and
/// deletes the old ones.
struct Log {
    dir: PathBuf,
    active: std::fs::File,
    active_no: u32,
    active_len: u64,
    index: HashMap<Id, Entry>,
    /// Final tasks by (time, id), for retention.
    finals: std::collections::BTreeSet<(u64, Id)>,
    buf: Vec<u8>,
}

#[derive(Clone, Copy)]
struct Entry {
    segment: u32,
    /// Offset of the frame holding the task's latest head.
    head_at: u64,
}

const SEGMENT_BYTES: u64 = 64 << 20;
const SPEC: u8 = 1;
const HEAD: u8 = 2;
const EVENT: u8 = 3;

impl Log {
    /// Reopens a log: reads every segment once, in order, checking each
    /// frame; a short or damaged frame at the end of the last segment was
    /// never acknowledged (its sync had not returned) and is cut off;
    /// anywhere else it is damage, refused. Rebuilds the index, then hands
    /// each live task's decoded spec to `live`.
    fn recover(dir: &Path, live: &mut dyn FnMut(weft_proto::TaskSpec)) -> Result<Log> {
        use std::io::Read;
        let dir = dir.join("log");
        let mut segments: Vec<u32> = std::fs::read_dir(&dir)?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            .collect();
        segments.sort_unstable();
        let last = *segments.last().context("no segment")?;
        let mut index = HashMap::new();
        let mut finals = std::collections::BTreeSet::new();
        // Where the specs of tasks not final (yet) are: (segment, file
        // offset, length), read back and decoded at the end.
        let mut specs: HashMap<Id, (u32, u64, u32)> = HashMap::new();
        let mut active_len = 0;
        let mut payload = Vec::new();
        for &no in &segments {
            let path = Self::segment_path(&dir, no);
            let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?);
            let mut offset = 0u64;
            let torn = loop {
                let mut header = [0u8; 8];
                if let Err(e) = file.read_exact(&mut header) {
                    anyhow::ensure!(e.kind() == std::io::ErrorKind::UnexpectedEof, e);
                    // A clean end, or a header cut short.
                    break file.get_ref().metadata()?.len() != offset;
                }
                let len = u32::from_le_bytes(header[..4].try_into()?) as usize;
                let crc = u32::from_le_bytes(header[4..].try_into()?);
                payload.resize(len, 0);
                if file.read_exact(&mut payload).is_err() || crc32c::crc32c(&payload) != crc {
                    break true;
                }
                for (kind, id, _, bytes) in records_of(&payload) {
                    match kind {
                        SPEC => {
                            let at = bytes.as_ptr() as usize - payload.as_ptr() as usize;
                            specs.insert(id, (no, offset + 8 + at as u64, bytes.len() as u32));
                        }
                        HEAD => {
                            index.insert(
                                id,
                                Entry {
                                    segment: no,
                                    head_at: offset,
                                },
                            );
                            let state = weft_proto::TaskState::try_from(i32::from(bytes[0]));
                            if state.is_ok_and(|s| s.is_final()) {
                                let ms = u64::from_le_bytes(bytes[5..13].try_into()?);
                                finals.insert((ms, id));
                                specs.remove(&id);
                            }
                        }
                        _ => {}
                    }
                }
                offset += 8 + len as u64;
            };
            if torn {
                anyhow::ensure!(no == last, "segment {no} is damaged at {offset}");
                let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                file.set_len(offset)?;
                file.sync_all()?;
            }
            if no == last {
                active_len = offset;
            }
        }
        // In file order, so the reads go forward through each segment.
        let mut at: Vec<(u32, u64, u32)> = specs.into_values().collect();
        at.sort_unstable();
        let mut open: Option<(u32, std::fs::File)> = None;
        let mut bytes = Vec::new();
        for (no, offset, len) in at {
            use std::os::unix::fs::FileExt;
            if open.as_ref().is_none_or(|(n, _)| *n != no) {
                open = Some((no, std::fs::File::open(Self::segment_path(&dir, no))?));
            }
            let (_, file) = open.as_ref().context("segment")?;
            bytes.resize(len as usize, 0);
            file.read_exact_at(&mut bytes, offset)?;
            // created_at (8 bytes), then the spec. The frame's checksum
            // was checked in the pass above.
            let pb = weft_proto::pb::TaskSpec::decode(bytes.get(8..).context("short spec")?)?;
            live(weft_proto::TaskSpec::try_from(pb).map_err(|e| anyhow::anyhow!("{e}"))?);
        }
        let active = std::fs::OpenOptions::new()
            .append(true)
            .open(Self::segment_path(&dir, last))?;
        Ok(Log {
            dir,
            active,
            active_no: last,
            active_len,
            index,
            finals,
            buf: Vec::new(),
        })
    }

    fn open(dir: &Path) -> Result<Log> {
        let dir = dir.join("log");
        std::fs::create_dir_all(&dir)?;
        let active = Self::create_segment(&dir, 0)?;
        Ok(Log {
            dir,
            active,
            active_no: 0,
            active_len: 0,
            index: HashMap::new(),
            finals: Default::default(),
            buf: Vec::new(),
        })
    }

    fn segment_path(dir: &Path, no: u32) -> PathBuf {
        dir.join(format!("{no:08}.seg"))
    }

    fn create_segment(dir: &Path, no: u32) -> Result<std::fs::File> {
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(Self::segment_path(dir, no))?;
        // The new file's name must survive a power cut too.
        std::fs::File::open(dir)?.sync_all()?;
        Ok(file)
    }

    /// Appends `payload` as one frame, synced; returns the frame's offset.
    fn append(&mut self, payload_from: usize) -> Result<u64> {
        use std::io::Write;
        let payload = &self.buf[payload_from..];
        let len = payload.len() as u32;
        let crc = crc32c::crc32c(payload);
        let mut frame = Vec::with_capacity(8 + payload.len());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&crc.to_le_bytes());
        frame.extend_from_slice(payload);
        let at = self.active_len;
        self.active.write_all(&frame)?;
        self.active.sync_data()?;
        self.active_len += frame.len() as u64;
        Ok(at)
    }

    fn roll_if_full(&mut self) -> Result<()> {
        if self.active_len >= SEGMENT_BYTES {
            self.active_no += 1;
            self.active = Self::create_segment(&self.dir, self.active_no)?;
            self.active_len = 0;
        }
        Ok(())
    }
}

fn put_record(buf: &mut Vec<u8>, kind: u8, id: Id, seq: u64, bytes: &[u8]) {
    buf.push(kind);
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    buf.extend_from_slice(bytes);
}

/// The records of a frame's payload: (kind, id, seq, bytes).
fn records_of(mut payload: &[u8]) -> impl Iterator<Item = (u8, Id, u64, &[u8])> {
    std::iter::from_fn(move || {
        if payload.len() < 29 {
            return None;
        }
        let kind = payload[0];
        let id = Id::from_le_bytes(payload[1..17].try_into().ok()?);
        let seq = u64::from_le_bytes(payload[17..25].try_into().ok()?);
        let len = u32::from_le_bytes(payload[25..29].try_into().ok()?) as usize;
        let bytes = payload.get(29..29 + len)?;
        payload = &payload[29 + len..];
        Some((kind, id, seq, bytes))
    })
}

impl Candidate for Log {
    fn commit(&mut self, records: &[Record]) -> Result<()> {
        self.roll_if_full()?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut heads = Vec::new();
        for t in coalesce(records) {
            for e in &t.events {
                put_record(&mut buf, EVENT, t.id, e.seq, &event_bytes(e));
            }
            let Some(record) = t.record else { continue };
            if t.new {
                put_record(&mut buf, SPEC, t.id, 0, &spec_bytes(record));
            }
            put_record(&mut buf, HEAD, t.id, 0, &head_bytes(record, &[]));
            heads.push((
                t.id,
                record.state.is_final().then(|| millis(record.updated_at)),
            ));
        }
        self.buf = buf;
        let at = self.append(0)?;
        for (id, final_ms) in heads {
            self.index.insert(
                id,
                Entry {
                    segment: self.active_no,
                    head_at: at,
                },
            );
            if let Some(ms) = final_ms {
                self.finals.insert((ms, id));
            }
        }
        Ok(())
    }

    /// Forgets final tasks older than `cut` (the index is the truth; their
    /// bytes go at the next compaction).
    fn retain(&mut self, cut: SystemTime) -> Result<usize> {
        let cut = millis(cut);
        let keep = self.finals.split_off(&(cut, 0));
        let old = std::mem::replace(&mut self.finals, keep);
        for (_, id) in &old {
            self.index.remove(id);
        }
        Ok(old.len())
    }

    /// Copies every record of the tasks still indexed (all their events,
    /// their spec, their latest head) out of the sealed segments into one
    /// new segment, syncs it, and deletes the old segments.
    fn compact(&mut self) -> Result<bool> {
        use std::io::Read;
        // Seal the active segment: compaction rewrites everything before
        // the new one.
        let old: Vec<u32> = (0..=self.active_no).collect();
        self.active_no += 1;
        let target = self.active_no;
        self.active = Self::create_segment(&self.dir, target)?;
        self.active_len = 0;
        let mut moved: HashMap<Id, u64> = HashMap::new();
        let mut out = Vec::with_capacity(1 << 20);
        let mut payload = Vec::new();
        for no in &old {
            let path = Self::segment_path(&self.dir, *no);
            let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?);
            let mut offset = 0u64;
            loop {
                let mut header = [0u8; 8];
                match file.read_exact(&mut header) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e.into()),
                }
                let len = u32::from_le_bytes(header[..4].try_into()?) as usize;
                let crc = u32::from_le_bytes(header[4..].try_into()?);
                payload.resize(len, 0);
                file.read_exact(&mut payload)?;
                anyhow::ensure!(
                    crc32c::crc32c(&payload) == crc,
                    "segment {no} frame at {offset}: checksum mismatch"
                );
                for (kind, id, seq, bytes) in records_of(&payload) {
                    let Some(entry) = self.index.get(&id) else {
                        continue;
                    };
                    // Only a task's latest head is copied.
                    if kind == HEAD && (entry.segment, entry.head_at) != (*no, offset) {
                        continue;
                    }
                    put_record(&mut out, kind, id, seq, bytes);
                    if kind == HEAD {
                        moved.insert(id, 0);
                    }
                }
                offset += 8 + len as u64;
                if out.len() >= 1 << 20 {
                    self.flush_compacted(&mut out, &mut moved)?;
                }
            }
        }
        self.flush_compacted(&mut out, &mut moved)?;
        for no in old {
            std::fs::remove_file(Self::segment_path(&self.dir, no))?;
        }
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(true)
    }
}

impl Log {
    /// A task's latest head, read by id through the index (the frame's
    /// checksum checked): what `Get` would read. Only the tests read here.
    #[cfg(test)]
    fn head(&self, id: Id) -> Result<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let Some(entry) = self.index.get(&id) else {
            return Ok(None);
        };
        let file = std::fs::File::open(Self::segment_path(&self.dir, entry.segment))?;
        let mut header = [0u8; 8];
        file.read_exact_at(&mut header, entry.head_at)?;
        let len = u32::from_le_bytes(header[..4].try_into()?) as usize;
        let mut payload = vec![0u8; len];
        file.read_exact_at(&mut payload, entry.head_at + 8)?;
        anyhow::ensure!(
            crc32c::crc32c(&payload) == u32::from_le_bytes(header[4..].try_into()?),
            "segment {} frame at {}: checksum mismatch",
            entry.segment,
            entry.head_at
        );
        Ok(records_of(&payload)
            .find(|(kind, rid, _, _)| *kind == HEAD && *rid == id)
            .map(|(_, _, _, bytes)| bytes.to_vec()))
    }

    /// Appends the compacted records gathered in `out` as one frame and
    /// points the index of the heads in it there.
    fn flush_compacted(&mut self, out: &mut Vec<u8>, moved: &mut HashMap<Id, u64>) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        self.buf.clear();
        self.buf.extend_from_slice(out);
        let at = self.append(0)?;
        for (id, _) in moved.drain() {
            if let Some(entry) = self.index.get_mut(&id) {
                *entry = Entry {
                    segment: self.active_no,
                    head_at: at,
                };
            }
        }
        out.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Order, Shape, Workload};
    use weft_proto::TaskState;

    fn shape(order: Order) -> Shape {
        Shape {
            tasks: 3_000,
            batch: 100,
            window: 1_000,
            order,
            submit_only: false,
        }
    }

    /// Runs the whole workload into `store`; the workload for reads.
    fn fill(store: &mut dyn Candidate, order: Order) -> Workload {
        let mut workload = Workload::new(shape(order));
        let mut records = Vec::new();
        while workload.next_commit(&mut records).is_some() {
            store.commit(&records).unwrap();
        }
        workload
    }

    #[test]
    fn todays_store_accepts_the_workload_and_ends_with_every_task_succeeded() {
        // RedbStore refuses events out of seq order or without their task:
        // the workload writes what the driver writes.
        for order in [Order::InOrder, Order::Shuffled] {
            let dir = tempfile::tempdir().unwrap();
            let store = RedbStore::open(dir.path()).unwrap();
            let mut workload = Workload::new(shape(order));
            let mut records = Vec::new();
            while workload.next_commit(&mut records).is_some() {
                store.commit(&records).unwrap();
            }
            for i in [0, 1, 1_234, 2_999] {
                let task = store.task(workload.id(i)).unwrap().unwrap();
                assert_eq!(task.state, TaskState::Succeeded, "{order:?} task {i}");
                assert_eq!(task.next_seq, 5);
                assert_eq!(task.output, i.to_string());
            }
            let loaded = store.load(SystemTime::UNIX_EPOCH).unwrap();
            assert!(loaded.live.is_empty());
            assert_eq!(loaded.final_counts, vec![(TaskState::Succeeded, 3_000)]);
        }
    }

    #[test]
    fn log_compaction_keeps_exactly_the_retained_tasks_readable() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        let workload = fill(&mut log, Order::Shuffled);
        let cut = workload.wall(workload.finish_commit(1_500));
        let deleted = log.retain(cut).unwrap();
        assert!((1_000..2_000).contains(&deleted), "{deleted}");
        log.compact().unwrap();
        let segments = std::fs::read_dir(dir.path().join("log")).unwrap().count();
        assert_eq!(segments, 1, "old segments deleted");
        let mut kept = 0;
        for i in 0..3_000 {
            let id = workload.id(i).as_u128();
            if let Some(head) = log.head(id).unwrap() {
                // The head of a finished task: state byte first.
                assert_eq!(head[0], i32::from(TaskState::Succeeded) as u8);
                kept += 1;
            }
        }
        assert_eq!(kept, 3_000 - deleted);
    }

    #[test]
    fn every_candidate_retention_deletes_the_same_tasks_as_todays_store() {
        let mut counts = Vec::new();
        for kind in [Kind::RedbToday, Kind::RedbLean, Kind::Fjall, Kind::Log] {
            let dir = tempfile::tempdir().unwrap();
            let mut store = open(kind, dir.path()).unwrap();
            let workload = fill(&mut *store, Order::Shuffled);
            let cut = workload.wall(workload.finish_commit(1_500));
            counts.push((kind, store.retain(cut).unwrap()));
            store.compact().unwrap();
        }
        let first = counts[0].1;
        assert!(first > 0);
        for (kind, deleted) in &counts {
            assert_eq!(*deleted, first, "{kind:?}: {counts:?}");
        }
    }

    #[test]
    fn log_recovery_cuts_a_torn_tail_and_finds_every_acknowledged_task() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        let mut workload = Workload::new(shape(Order::Shuffled));
        let mut records = Vec::new();
        // Stop halfway: some tasks final, the rest live.
        for _ in 0..workload.commits() / 2 {
            workload.next_commit(&mut records).unwrap();
            log.commit(&records).unwrap();
        }
        let (indexed, finals) = (log.index.len(), log.finals.len());
        assert!(finals > 0 && indexed > finals);
        let segment = Log::segment_path(&dir.path().join("log"), log.active_no);
        let synced = std::fs::metadata(&segment).unwrap().len();
        drop(log);
        // A frame whose sync never returned: its header and half its bytes.
        {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&segment)
                .unwrap();
            file.write_all(&1000u32.to_le_bytes()).unwrap();
            file.write_all(&[7u8; 500]).unwrap();
        }
        let mut live = 0;
        let log = Log::recover(dir.path(), &mut |spec| {
            assert!(matches!(&spec.kind, weft_proto::TaskKind::Call(c) if c.handler == "noop"));
            live += 1;
        });
        let log = log.unwrap();
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            synced,
            "torn tail cut"
        );
        assert_eq!((log.index.len(), log.finals.len()), (indexed, finals));
        assert_eq!(live, indexed - finals);
        let any = log.index.keys().next().copied().unwrap();
        assert!(log.head(any).unwrap().is_some());
    }

    #[test]
    fn a_damaged_frame_before_the_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path()).unwrap();
        fill(&mut log, Order::InOrder);
        let segment = Log::segment_path(&dir.path().join("log"), log.active_no);
        drop(log);
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[100] ^= 1;
        // A second segment after it makes the damaged one not the last.
        std::fs::write(&segment, &bytes).unwrap();
        std::fs::write(Log::segment_path(&dir.path().join("log"), 99), b"").unwrap();
        let err = Log::recover(dir.path(), &mut |_| {}).err().unwrap();
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    #[test]
    fn shuffled_order_is_a_permutation_by_priority_within_each_window() {
        let mut workload = Workload::new(shape(Order::Shuffled));
        let mut records = Vec::new();
        let mut finished = Vec::new();
        while workload.next_commit(&mut records).is_some() {
            for r in &records {
                if let Record::Task(t) = r
                    && t.state == TaskState::Succeeded
                {
                    finished.push(t.id.as_u128() & 0xFFFF_FFFF);
                }
            }
        }
        let mut sorted = finished.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..3_000).collect::<Vec<u128>>());
        // Within the first window, priorities never rise.
        let priorities: Vec<u8> = finished[..1_000]
            .iter()
            .map(|i| crate::workload::priority(*i as usize))
            .collect();
        assert!(priorities.windows(2).all(|w| w[0] >= w[1]));
        assert_ne!(finished, sorted, "not in id order");
    }
}
