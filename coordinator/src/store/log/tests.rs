//! What the log store adds to the `Store` contract (which `store/tests.rs`
//! checks for every engine): reopening reads back exactly what was
//! committed, a crash's unfinished commit is cut off, damage is refused,
//! compaction keeps exactly the current records, and a commit writes a
//! task changed several times once.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use weft_proto::{Attempt, NodeId, Outcome, OutputStream, TaskId, TaskSpec, TaskState};

use super::super::{EventBody, ListQuery, Record, Store, StoreError, TaskEvent, TaskRecord};
use super::frame::{self, FRAME_HEADER, Kind};
use super::recover::Reader;
use super::{DIR_NAME, LogStore};

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

fn ids(n: usize) -> Vec<TaskId> {
    let mut generator = ulid::Generator::new();
    (0..n)
        .map(|_| TaskId::from_ulid(generator.generate().expect("ulid")))
        .collect()
}

fn record(id: TaskId, state: TaskState, ms: u64) -> TaskRecord {
    TaskRecord {
        attempt: Attempt(u32::from(state != TaskState::Queued)),
        node_id: (state != TaskState::Queued).then(NodeId::new),
        node_name: (state != TaskState::Queued).then(|| Arc::from("n1")),
        last_outcome: state.is_final().then_some(Outcome::Succeeded),
        ..TaskRecord::for_test(id, Arc::new(TaskSpec::call("noop", "in")), state, at(ms))
    }
}

fn event(id: TaskId, seq: u64, text: &str) -> Record {
    Record::Event(TaskEvent {
        task_id: id,
        seq,
        attempt: Attempt(1),
        time: at(seq),
        body: EventBody::Output {
            stream: OutputStream::Stdout,
            data: Bytes::from(text.to_owned()),
            chunk: Some(seq),
        },
    })
}

/// Everything a store answers about its tasks, as text: every task
/// (oldest first) with every event, and the load summary.
fn view(store: &dyn Store) -> String {
    let page = store
        .list_page(&ListQuery {
            limit: usize::MAX,
            ascending: true,
            ..ListQuery::default()
        })
        .expect("list");
    let mut out = String::new();
    for task in page.tasks {
        out.push_str(&format!(
            "{} {} seq {} attempt {}\n",
            task.id, task.state, task.next_seq, task.attempt.0
        ));
        for event in store.events(task.id, 0, usize::MAX).expect("events") {
            out.push_str(&format!("  {} {:?}\n", event.seq, event.body));
        }
    }
    let loaded = store.load(UNIX_EPOCH).expect("load");
    out.push_str(&format!(
        "live {:?}\nfinal {:?}\nrecent {}\n",
        loaded.live.iter().map(|t| t.id).collect::<Vec<_>>(),
        loaded.final_counts,
        loaded.recently_final.len()
    ));
    out
}

/// Commits `n` tasks through queued, then running with output, then (for
/// every other one) succeeded; returns their ids.
fn fill(store: &dyn Store, n: usize) -> Vec<TaskId> {
    let ids = ids(n);
    for chunk in ids.chunks(16) {
        let mut records = Vec::new();
        for id in chunk {
            records.push(Record::Task(record(*id, TaskState::Queued, 1)));
        }
        store.commit(&records).expect("submit");
        let mut records = Vec::new();
        for id in chunk {
            records.push(Record::Task(record(*id, TaskState::Running, 2)));
            records.push(event(*id, 0, &format!("out of {id}")));
        }
        store.commit(&records).expect("run");
    }
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        let done = record(*id, TaskState::Succeeded, 10 + i as u64);
        store.commit(&[Record::Task(done)]).expect("finish");
    }
    ids
}

/// The data dir's log without the background compaction thread, so a
/// test's own `compact_step` calls are the only ones.
fn open_quiet(data_dir: &std::path::Path) -> LogStore {
    let log = data_dir.join(DIR_NAME);
    std::fs::create_dir_all(&log).expect("log dir");
    let dir = Arc::new(super::fs::RealDir::new(&log));
    LogStore::open_on(dir, &log, Some(1)).expect("log opens")
}

fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut all: Vec<_> = std::fs::read_dir(dir.join(DIR_NAME))
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    all.sort();
    all
}

#[test]
fn reopening_reads_back_exactly_what_was_committed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let before = {
        let store = LogStore::open(dir.path()).expect("opens");
        store.set_segment_bytes(8 * 1024);
        fill(&store, 200);
        assert!(segments(dir.path()).len() > 3, "small segments roll");
        view(&store)
    };
    let store = LogStore::open(dir.path()).expect("reopens");
    assert_eq!(view(&store), before);
}

#[test]
fn a_second_opener_of_the_same_data_dir_is_refused_as_locked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let _store = LogStore::open(dir.path()).expect("opens");
    match LogStore::open(dir.path()) {
        Err(StoreError::Locked(path)) => assert!(path.starts_with(dir.path())),
        other => panic!("not refused as locked: {other:?}"),
    }
}

#[test]
fn a_data_dir_whose_log_was_removed_is_refused_not_started_empty() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = LogStore::open(dir.path()).expect("opens");
        fill(&store, 3);
    }
    std::fs::remove_dir_all(dir.path().join(DIR_NAME)).expect("remove the log");
    match LogStore::open(dir.path()) {
        Err(err @ StoreError::Missing { .. }) => assert!(err.is_damage()),
        other => panic!("not refused: {other:?}"),
    }
}

/// Where each frame of a segment's bytes starts, then where the frames
/// end: the first offset at which no frame starts (zeros after it are the
/// unused rest of the segment).
fn frame_bounds(bytes: &[u8]) -> Vec<usize> {
    let mut bounds = vec![0];
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + FRAME_HEADER) {
        let (len, _, _) = frame::frame_header(header);
        if len == 0 || at + FRAME_HEADER + len > bytes.len() {
            break;
        }
        at += FRAME_HEADER + len;
        bounds.push(at);
    }
    bounds
}

/// Where the frames of a segment's bytes end (see [`frame_bounds`]).
pub(super) fn frames_end(bytes: &[u8]) -> usize {
    frame_bounds(bytes).last().copied().unwrap_or(0)
}

#[test]
fn an_unfinished_commit_at_the_end_is_cut_off_and_the_rest_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let before = {
        let store = LogStore::open(dir.path()).expect("opens");
        fill(&store, 20);
        view(&store)
    };
    let last = segments(dir.path()).pop().expect("a segment");
    let mut bytes = std::fs::read(&last).expect("read");
    let len = frames_end(&bytes);
    // Half a frame where the next commit goes: a header that promises more
    // than was written.
    let mut torn = Vec::new();
    torn.extend_from_slice(&4096u32.to_le_bytes());
    torn.extend_from_slice(&[0xab; 100]);
    bytes.resize(bytes.len().max(len + torn.len()), 0);
    bytes[len..len + torn.len()].copy_from_slice(&torn);
    std::fs::write(&last, &bytes).expect("write");
    let store = LogStore::open(dir.path()).expect("reopens past the torn tail");
    assert_eq!(view(&store), before);
    assert_eq!(
        std::fs::metadata(&last).expect("segment").len(),
        len as u64,
        "cut"
    );
    // And it appends where the torn frame was.
    let id = ids(1)[0];
    store
        .commit(&[Record::Task(record(id, TaskState::Queued, 5))])
        .expect("commit after the cut");
    drop(store);
    let store = LogStore::open(dir.path()).expect("reopens");
    assert!(store.task(id).expect("read").is_some());
}

#[test]
fn the_active_segment_is_kept_zeroed_ahead_so_commits_overwrite_and_a_reopen_keeps_the_zeros() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LogStore::open(dir.path()).expect("opens");
    fill(&store, 20);
    let last = segments(dir.path()).pop().expect("a segment");
    let bytes = std::fs::read(&last).expect("read");
    let end = frames_end(&bytes);
    // The first commit that reached the end of the file wrote zeros that
    // far past itself; later ones went into them.
    assert!(
        bytes.len() > end && bytes.len() as u64 >= super::ZERO_AHEAD,
        "{} bytes of file for {end} of frames: not zeroed ahead",
        bytes.len()
    );
    assert!(bytes[end..].iter().all(|b| *b == 0), "the rest is zeros");
    // A small commit goes into the zeros: the file does not grow.
    let id = ids(1)[0];
    store
        .commit(&[Record::Task(record(id, TaskState::Queued, 5))])
        .expect("commit");
    let grown = std::fs::metadata(&last).expect("segment").len();
    assert_eq!(grown, bytes.len() as u64, "a commit inside the zeros");
    let before = view(&store);
    drop(store);
    // Reopening reads the zeros as the unused rest: nothing cut, nothing
    // lost, and the next commit still goes after the last frame.
    let store = LogStore::open(dir.path()).expect("reopens");
    assert_eq!(view(&store), before);
    assert_eq!(std::fs::metadata(&last).expect("segment").len(), grown);
    let next = ids(1)[0];
    store
        .commit(&[Record::Task(record(next, TaskState::Queued, 6))])
        .expect("commit after reopening");
    drop(store);
    let store = LogStore::open(dir.path()).expect("reopens again");
    assert!(store.task(id).expect("read").is_some());
    assert!(store.task(next).expect("read").is_some());
}

#[test]
fn zeros_after_the_frames_of_a_sealed_segment_refuse_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = LogStore::open(dir.path()).expect("opens");
        store.set_segment_bytes(4 << 10);
        fill(&store, 40);
    }
    let all = segments(dir.path());
    assert!(all.len() > 2, "{} segments", all.len());
    // A roll cuts the segment to its frames before the next one is made.
    let sealed = &all[all.len() - 2];
    let mut bytes = std::fs::read(sealed).expect("read");
    let end = frames_end(&bytes);
    assert_eq!(end, bytes.len(), "a sealed segment is cut to its frames");
    // Zeros after them (lost writes, a copy padded) are not an unused
    // rest there, however clean they look.
    bytes.resize(end + 8192, 0);
    std::fs::write(sealed, &bytes).expect("write");
    match LogStore::open(dir.path()) {
        Err(err @ StoreError::Damaged { .. }) => assert!(err.is_damage()),
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn zeroed_acknowledged_frames_at_the_end_of_a_sealed_segment_refuse_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tasks = ids(200);
    {
        let store = LogStore::open(dir.path()).expect("opens");
        store.set_segment_bytes(4 << 10);
        let queued: Vec<Record> = tasks
            .iter()
            .map(|id| Record::Task(record(*id, TaskState::Queued, 1)))
            .collect();
        store.commit(&queued).expect("submit");
        // One commit per task: each frame of the later segments holds one
        // task's only change since its submit.
        for id in &tasks {
            store
                .commit(&[Record::Task(record(*id, TaskState::Running, 2))])
                .expect("run");
        }
    }
    let all = segments(dir.path());
    assert!(all.len() > 3, "{} segments", all.len());
    let sealed = &all[all.len() - 2];
    let mut bytes = std::fs::read(sealed).expect("read");
    assert_eq!(frames_end(&bytes), bytes.len(), "sealed, cut to its frames");
    // The start of the segment's last frame (after the header frame).
    let bounds = frame_bounds(&bytes);
    let last = bounds.len().checked_sub(2).map_or(0, |i| bounds[i]);
    assert!(last > 0, "a sealed segment with a frame after its header");
    bytes[last..].fill(0);
    std::fs::write(sealed, &bytes).expect("write");
    match LogStore::open(dir.path()) {
        Err(err @ StoreError::Damaged { .. }) => assert!(err.is_damage()),
        Ok(store) => {
            let stale: Vec<String> = tasks
                .iter()
                .filter_map(|id| {
                    let task = store.task(*id).expect("read").expect("task");
                    (task.state != TaskState::Running).then(|| format!("{id} {}", task.state))
                })
                .collect();
            panic!(
                "a sealed segment's acknowledged last frame zeroed, and the log opened; \
                 acknowledged RUNNING, served as: {stale:?}"
            );
        }
        Err(other) => panic!("not refused as damage: {other:?}"),
    }
}

/// A directory on a disk that holds files of at most `cap` bytes: a write
/// crossing it writes what fits, then fails as a full disk does.
#[derive(Debug)]
struct CappedDir {
    inner: Arc<dyn super::fs::LogDir>,
    cap: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Debug)]
struct CappedFile {
    inner: Arc<dyn super::fs::LogFile>,
    cap: Arc<std::sync::atomic::AtomicU64>,
}

impl CappedDir {
    fn wrap(&self, inner: Arc<dyn super::fs::LogFile>) -> Arc<dyn super::fs::LogFile> {
        Arc::new(CappedFile {
            inner,
            cap: Arc::clone(&self.cap),
        })
    }
}

impl super::fs::LogDir for CappedDir {
    fn list(&self) -> std::io::Result<Vec<String>> {
        self.inner.list()
    }
    fn create(&self, name: &str) -> std::io::Result<Arc<dyn super::fs::LogFile>> {
        Ok(self.wrap(self.inner.create(name)?))
    }
    fn open(&self, name: &str) -> std::io::Result<Arc<dyn super::fs::LogFile>> {
        Ok(self.wrap(self.inner.open(name)?))
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.inner.remove(name)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
}

impl super::fs::LogFile for CappedFile {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let cap = self.cap.load(std::sync::atomic::Ordering::SeqCst);
        let fits = usize::try_from(cap.saturating_sub(offset)).unwrap_or(usize::MAX);
        if fits >= buf.len() {
            return self.inner.write_all_at(buf, offset);
        }
        self.inner.write_all_at(&buf[..fits], offset)?;
        Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC))
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
}

#[test]
fn zeros_cut_short_by_a_full_disk_are_cut_off_when_the_segment_is_sealed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join(DIR_NAME);
    std::fs::create_dir_all(&log).expect("log dir");
    let cap = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let capped = Arc::new(CappedDir {
        inner: Arc::new(super::fs::RealDir::new(&log)),
        cap: Arc::clone(&cap),
    });
    let mut committed = Vec::new();
    {
        let store = LogStore::open_on(capped, &log, Some(1)).expect("opens");
        store.set_segment_bytes(256 << 10);
        // The disk fills up: the first commit's zeros stop at 250 KiB, and
        // the commits go on into the zeros that were written.
        cap.store(250 << 10, std::sync::atomic::Ordering::SeqCst);
        while store.sizes().expect("sizes").0 < 240 << 10 {
            let tasks = ids(8);
            let queued: Vec<Record> = tasks
                .iter()
                .map(|id| Record::Task(record(*id, TaskState::Queued, 1)))
                .collect();
            store.commit(&queued).expect("a commit into the zeros");
            committed.extend(tasks);
        }
        // Space comes back; a commit too big for the segment's rest seals it.
        cap.store(u64::MAX, std::sync::atomic::Ordering::SeqCst);
        let tasks = ids(200);
        let queued: Vec<Record> = tasks
            .iter()
            .map(|id| Record::Task(record(*id, TaskState::Queued, 2)))
            .collect();
        store.commit(&queued).expect("a commit after the seal");
        committed.extend(tasks);
    }
    let all = segments(dir.path());
    assert!(all.len() >= 2, "no segment was sealed: {all:?}");
    let sealed = std::fs::read(&all[all.len() - 2]).expect("read");
    assert_eq!(
        frames_end(&sealed),
        sealed.len(),
        "the sealed segment keeps zeros after its frames"
    );
    let store = LogStore::open(dir.path()).expect("every commit acknowledged, and the log opens");
    for id in &committed {
        assert!(store.task(*id).expect("read").is_some(), "{id} lost");
    }
}

/// The offset of the first byte of `needle` in the segment at `path`.
fn find(path: &std::path::Path, needle: &[u8]) -> usize {
    let bytes = std::fs::read(path).expect("read");
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("bytes in the segment")
}

fn flip(path: &std::path::Path, offset: usize) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes[offset] ^= 0x20;
    std::fs::write(path, &bytes).expect("write");
}

#[test]
fn a_changed_byte_in_an_acknowledged_commit_refuses_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ids = {
        let store = LogStore::open(dir.path()).expect("opens");
        fill(&store, 20)
    };
    let segment = segments(dir.path()).pop().expect("a segment");
    // An output chunk of the first task: later commits follow it.
    let offset = find(&segment, format!("out of {}", ids[0]).as_bytes());
    flip(&segment, offset);
    match LogStore::open(dir.path()) {
        Err(err @ StoreError::Damaged { .. }) => {
            assert!(err.is_damage());
            assert!(err.to_string().contains(".seg"), "{err}");
        }
        other => panic!("damage not refused: {other:?}"),
    }
}

#[test]
fn a_byte_changed_under_a_running_store_is_reported_when_read_never_served() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LogStore::open(dir.path()).expect("opens");
    let ids = fill(&store, 4);
    let segment = segments(dir.path()).pop().expect("a segment");
    flip(
        &segment,
        find(&segment, format!("out of {}", ids[1]).as_bytes()),
    );
    match store.events(ids[1], 0, 10) {
        Err(StoreError::Damaged { table, key, .. }) => {
            assert_eq!(table, "events");
            assert!(key.contains(&ids[1].to_string()), "{key}");
        }
        other => panic!("damage served: {other:?}"),
    }
    // Other tasks read as before.
    assert_eq!(store.events(ids[0], 0, 10).expect("events").len(), 1);
}

#[test]
fn a_changed_byte_in_a_task_record_fails_its_outcome_read_never_served() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LogStore::open(dir.path()).expect("opens");
    let ids = fill(&store, 6);
    let [sound, rotten] = [ids[0], ids[2]];
    for id in [sound, rotten] {
        let done = TaskRecord {
            error: format!("outcome of {id}"),
            ..record(id, TaskState::Failed, 40)
        };
        store.commit(&[Record::Task(done)]).expect("finish");
    }
    let read = store.task_outcomes(&[sound, rotten]).expect("sound reads");
    assert_eq!(read[1].as_ref().map(|t| t.state), Some(TaskState::Failed));
    let segment = segments(dir.path()).pop().expect("a segment");
    flip(
        &segment,
        find(&segment, format!("outcome of {rotten}").as_bytes()),
    );
    match store.task_outcomes(&[sound, rotten]) {
        Err(err @ StoreError::Damaged { .. }) => {
            assert!(err.to_string().contains(&rotten.to_string()), "{err}");
        }
        other => panic!("damage served: {other:?}"),
    }
    let alone = store.task_outcomes(&[sound]).expect("the sound one reads");
    assert_eq!(
        alone[0].as_ref().map(|t| t.error.as_str()),
        Some(format!("outcome of {sound}").as_str())
    );
}

#[test]
fn compaction_keeps_exactly_the_current_records_and_frees_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open_quiet(dir.path());
    store.set_segment_bytes(16 * 1024);
    let ids = fill(&store, 400);
    // Half of the finished ones go at retention.
    let expired = store.expire(at(10 + 200), usize::MAX, &[]).expect("expire");
    assert_eq!(expired.len(), 100);
    let before = view(&store);
    let (bytes_before, live) = store.sizes().expect("sizes");
    let mut steps = 0;
    while store.compact_step().expect("compact") {
        steps += 1;
        assert!(steps < 10_000, "compaction does not end");
        assert_eq!(view(&store), before, "after {steps} steps");
    }
    assert!(steps > 0);
    let (bytes_after, _) = store.sizes().expect("sizes");
    assert!(
        bytes_after < bytes_before && bytes_after <= live * 2,
        "compaction left {bytes_after} bytes of {bytes_before} ({live} live)"
    );
    for id in &ids[..200] {
        let kept = store.task(*id).expect("read");
        assert_eq!(
            kept.is_some(),
            ids.iter().position(|i| i == id).unwrap() % 2 == 1
        );
    }
    drop(store);
    let store = open_quiet(dir.path());
    assert_eq!(view(&store), before, "after reopening");
}

#[test]
fn expired_tasks_stay_gone_after_compaction_and_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gone = {
        let store = open_quiet(dir.path());
        store.set_segment_bytes(4 * 1024);
        let ids = fill(&store, 100);
        store.expire(at(1_000), usize::MAX, &[]).expect("expire");
        // Compact only some: the expiries' segments stay behind older ones.
        for _ in 0..3 {
            store.compact_step().expect("compact");
        }
        ids.into_iter().step_by(2).collect::<Vec<_>>()
    };
    let store = open_quiet(dir.path());
    for id in gone {
        assert!(store.task(id).expect("read").is_none(), "{id} came back");
    }
}

#[test]
fn a_task_changed_several_times_in_one_commit_is_written_once_and_its_spec_only_ever_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LogStore::open(dir.path()).expect("opens");
    let id = ids(1)[0];
    store
        .commit(&[
            Record::Task(record(id, TaskState::Queued, 1)),
            Record::Task(record(id, TaskState::Assigned, 2)),
            Record::Task(record(id, TaskState::Running, 3)),
            event(id, 0, "hello"),
        ])
        .expect("commit");
    assert_eq!(
        store.task(id).expect("read").expect("task").state,
        TaskState::Running
    );
    // A later change writes the record again, never the spec.
    store
        .commit(&[Record::Task(record(id, TaskState::Succeeded, 4))])
        .expect("commit");
    let task = store.task(id).expect("read").expect("task");
    assert_eq!(task.state, TaskState::Succeeded);
    assert_eq!(task.spec.name, record(id, TaskState::Queued, 1).spec.name);
    let segment = segments(dir.path()).pop().expect("a segment");
    let file = super::fs::RealDir::new(&dir.path().join(DIR_NAME));
    let name = segment.file_name().and_then(|n| n.to_str()).expect("name");
    let file = super::fs::LogDir::open(&file, name).expect("open");
    let len = super::fs::LogFile::len(&*file).expect("len");
    let mut reader = Reader::new(&*file, len);
    let (mut tasks, mut specs, mut events, mut offset) = (0, 0, 0, 0u64);
    let mut salt = 0;
    while let Some((_, payload)) = reader.frame(offset, salt).expect("read") {
        salt = store.store_id();
        for entry in frame::records(&payload) {
            match entry.expect("record").1.kind {
                Kind::Task => tasks += 1,
                Kind::Spec => specs += 1,
                Kind::Event => events += 1,
                _ => {}
            }
        }
        offset += (FRAME_HEADER + payload.len()) as u64;
    }
    assert_eq!((tasks, specs, events), (2, 1, 1));
}

/// What the index holds, as text: every task's places, the ids per state,
/// the final tasks, and each segment's live bytes.
fn index_view(store: &LogStore) -> String {
    let index = store.inner.read_index().expect("index");
    let mut entries: Vec<_> = index.tasks.iter().collect();
    entries.sort_by_key(|(id, _)| *id);
    let tasks: Vec<String> = entries
        .into_iter()
        .map(|(id, e)| {
            format!(
                "{id} {:?} {:?} {:?} {:?}",
                e.record, e.spec, e.events, e.head
            )
        })
        .collect();
    let live: Vec<(u32, u64, u64)> = index
        .segments
        .iter()
        .map(|(no, s)| (*no, s.len, s.live))
        .collect();
    format!(
        "{}\n{:?}\n{:?}\n{live:?}",
        tasks.join("\n"),
        index.by_state,
        index.finals
    )
}

#[test]
fn records_of_several_tasks_interleaved_in_one_commit_index_as_a_restart_reads_them() {
    // A commit's records of one task are applied together when they
    // follow each other; interleaved ones must land the same, and the
    // live bytes must count each place once.
    let dir = tempfile::tempdir().expect("temp dir");
    let [a, b, c] = ids(3)[..] else {
        unreachable!("three ids")
    };
    let running = {
        let store = open_quiet(dir.path());
        store
            .commit(&[
                Record::Task(record(a, TaskState::Queued, 1)),
                Record::Task(record(b, TaskState::Queued, 1)),
                event(a, 0, "a0"),
                event(b, 0, "b0"),
                Record::Task(record(c, TaskState::Queued, 1)),
            ])
            .expect("commit");
        store
            .commit(&[
                event(a, 1, "a1"),
                Record::Task(record(b, TaskState::Running, 2)),
                event(a, 2, "a2"),
                event(b, 1, "b1"),
                event(b, 2, "b2"),
                Record::Task(record(a, TaskState::Succeeded, 3)),
                event(c, 0, "c0"),
                Record::Task(record(b, TaskState::Succeeded, 4)),
            ])
            .expect("commit");
        let running = index_view(&store);
        let view_before = view(&store);
        drop(store);
        let store = open_quiet(dir.path());
        assert_eq!(view(&store), view_before, "what a reader sees");
        running
    };
    let store = open_quiet(dir.path());
    assert_eq!(index_view(&store), running, "the index a restart rebuilds");
    let index = store.inner.read_index().expect("index");
    assert_eq!(
        index.tasks.get(&a.as_u128()).map(|e| e.events.len()),
        Some(3)
    );
    assert_eq!(
        index.tasks.get(&b.as_u128()).map(|e| e.events.len()),
        Some(3)
    );
    assert_eq!(
        index.tasks.get(&c.as_u128()).map(|e| e.events.len()),
        Some(1)
    );
    assert_eq!(index.finals.len(), 2, "a and b final, once each");
    let in_state = |state| {
        index
            .in_state(frame::state_number(state))
            .map(|set| set.iter().copied().collect::<Vec<u128>>())
            .unwrap_or_default()
    };
    assert_eq!(
        in_state(TaskState::Succeeded),
        vec![a.as_u128(), b.as_u128()]
    );
    assert_eq!(in_state(TaskState::Queued), vec![c.as_u128()]);
    assert!(in_state(TaskState::Running).is_empty(), "b left RUNNING");
    // Live bytes are exactly the current records' (the replaced task
    // records of a and b are dead).
    let current: u64 = index
        .tasks
        .iter()
        .flat_map(|(_, e)| {
            [e.record, e.spec]
                .into_iter()
                .chain(e.events.iter().copied())
        })
        .map(|loc| u64::from(loc.len))
        .sum();
    let live: u64 = index.segments.values().map(|s| s.live).sum();
    assert_eq!(live, current);
}

/// Timing aid, not a check (`cargo test --release -p weft-coordinator --lib
/// million -- --ignored --nocapture`): opening and loading a log of a
/// million queued tasks. `weft bench --only recovery` measures the whole
/// coordinator.
#[test]
#[ignore = "timing aid; run by hand"]
fn opening_a_million_queued_tasks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let n = 1_000_000;
    {
        let store = LogStore::open(dir.path()).expect("opens");
        let ids = ids(n);
        for chunk in ids.chunks(2_000) {
            let records: Vec<Record> = chunk
                .iter()
                .map(|id| Record::Task(record(*id, TaskState::Queued, 1)))
                .collect();
            store.commit(&records).expect("commit");
        }
    }
    let started = std::time::Instant::now();
    let store = LogStore::open(dir.path()).expect("reopens");
    let opened = started.elapsed();
    let mut live = 0;
    store
        .load_each(UNIX_EPOCH, &mut |_, _| live += 1)
        .expect("load");
    println!(
        "open {:.3} s, load {:.3} s, {live} live",
        opened.as_secs_f64(),
        (started.elapsed() - opened).as_secs_f64()
    );
    assert_eq!(live, n);
}

/// The writer's per-commit table keeps its room between commits, unless
/// that room is far more than the last commit used: a small table always,
/// a burst's only while commits still fill an eighth of it, and never
/// past its cap. One not kept is made again at the last commit's size, or
/// empty when that is past the cap.
#[test]
fn the_per_commit_table_keeps_the_room_commits_use_and_lets_a_bursts_go() {
    use super::{KEPT_PENDING_FLOOR, MAX_KEPT_PENDING, room_to_keep};
    assert_eq!(room_to_keep(8 * KEPT_PENDING_FLOOR, 0), None);
    assert_eq!(room_to_keep(1 << 15, (1 << 15) / 8), None);
    assert_eq!(
        room_to_keep(1 << 15, (1 << 15) / 8 - 1),
        Some((1 << 15) / 8 - 1)
    );
    assert_eq!(room_to_keep(8 * KEPT_PENDING_FLOOR + 1, 10), Some(10));
    assert_eq!(
        room_to_keep(2 * MAX_KEPT_PENDING, 2 * MAX_KEPT_PENDING),
        Some(0)
    );
    assert_eq!(
        room_to_keep(2 * MAX_KEPT_PENDING, MAX_KEPT_PENDING),
        Some(MAX_KEPT_PENDING)
    );
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "over 64 KiB")]
fn a_name_over_64_kib_is_refused_not_cut() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LogStore::open(dir.path()).expect("opens");
    let name = "a".repeat(usize::from(u16::MAX) + 1);
    let _ = store.commit(&[Record::DeleteSchedule(name)]);
}
