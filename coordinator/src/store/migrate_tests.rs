//! `copy_store`: a store with tasks in every state, events of every kind,
//! secrets, tokens, node identities, schedules and limits reads back the
//! same through the `Store` trait after the copy. `open_data_dir`: a redb
//! data dir is moved to the log once, and a crashed move is redone or
//! finished; a failed move leaves `weft.redb` as it was, and a `weft.redb`
//! written to after its copy is not retired.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use weft_proto::{
    Attempt, NodeId, Outcome, OutputStream, SecretEnv, TaskId, TaskSpec, TaskState, pb,
};

use super::log::LogStore;
use super::migrate::{
    COPIED_FILE, Copied, LOG_DIR, MIGRATED_FILE, MIGRATING_DIR, UPGRADING_FILE, copy_store,
    open_data_dir, record_copied,
};
use super::*;
use crate::auth::{Scope, Scopes, new_join_token, new_token};

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

fn ids(n: usize) -> Vec<TaskId> {
    let mut generator = ulid::Generator::new();
    (0..n)
        .map(|_| TaskId::from_ulid(generator.generate().expect("ulid")))
        .collect()
}

fn secret(value: &str) -> Arc<SecretEnv> {
    Arc::new(
        [("API_KEY".to_owned(), value.to_owned())]
            .into_iter()
            .collect(),
    )
}

fn event(id: TaskId, seq: u64, body: EventBody) -> Record {
    Record::Event(TaskEvent {
        task_id: id,
        seq,
        attempt: Attempt(1),
        time: at(seq),
        body,
    })
}

fn output(id: TaskId, seq: u64) -> Record {
    event(
        id,
        seq,
        EventBody::Output {
            stream: OutputStream::Stdout,
            data: Bytes::from(format!("chunk {seq}")),
            chunk: Some(seq),
        },
    )
}

/// What `fill` put in a store, to count the copy against.
struct Filled {
    tasks: u64,
    events: u64,
    secrets: u64,
}

/// Fills `store` with a task in every state (events: a state change, two
/// output chunks, progress, and `finished` for final ones; secrets for live
/// ones), a task with more events than one read page, more tasks than one
/// list page, tokens (one revoked), a joined node and a revoked one, two
/// schedules and two limits.
fn fill(store: &dyn Store) -> Filled {
    let mut filled = Filled {
        tasks: 0,
        events: 0,
        secrets: 0,
    };
    let all = ids(TaskState::ALL.len() + 1 + 1300);
    let node = NodeId::new();
    for (i, (state, id)) in TaskState::ALL.iter().zip(&all).enumerate() {
        let spec = Arc::new(TaskSpec::call("noop", format!("input {i}")));
        let record = TaskRecord {
            attempt: Attempt(1),
            node_id: Some(node),
            node_name: Some(Arc::from("n1")),
            output: Bytes::from(format!("out {i}")),
            error: if state.is_final() {
                "why".into()
            } else {
                String::new()
            },
            last_outcome: state.is_final().then_some(Outcome::Succeeded),
            updated_at: at(1_000 + i as u64),
            ..TaskRecord::for_test(*id, spec, *state, at(0))
        };
        let mut records = vec![
            Record::Task(record.clone()),
            event(
                *id,
                0,
                EventBody::State {
                    state: TaskState::Running,
                    node_id: Some(node),
                    node_name: Some(Arc::from("n1")),
                    reason: "started".into(),
                },
            ),
            output(*id, 1),
            output(*id, 2),
            event(
                *id,
                3,
                EventBody::Progress {
                    fraction: 0.5,
                    message: "half".into(),
                },
            ),
        ];
        if state.is_final() {
            records.push(event(
                *id,
                4,
                EventBody::Finished(Arc::new(TaskRecord {
                    next_seq: 5,
                    ..record
                })),
            ));
        } else {
            records.push(Record::Secrets(*id, secret(&format!("key {i}"))));
            filled.secrets += 1;
        }
        filled.events += records
            .iter()
            .filter(|r| matches!(r, Record::Event(_)))
            .count() as u64;
        store.commit(&records).expect("commit");
        filled.tasks += 1;
    }
    // One long history: more events than one page of reads.
    let long = all[TaskState::ALL.len()];
    let spec = Arc::new(TaskSpec::call("noop", "long"));
    let record = TaskRecord::for_test(long, spec, TaskState::Running, at(0));
    let mut records = vec![Record::Task(record)];
    records.extend((0..2500).map(|seq| output(long, seq)));
    store.commit(&records).expect("commit");
    filled.tasks += 1;
    filled.events += 2500;
    // More tasks than one list page.
    let many: Vec<Record> = all[TaskState::ALL.len() + 1..]
        .iter()
        .map(|id| {
            let spec = Arc::new(TaskSpec::call("noop", ""));
            Record::Task(TaskRecord::for_test(*id, spec, TaskState::Queued, at(5)))
        })
        .collect();
    filled.tasks += many.len() as u64;
    store.commit(&many).expect("commit");

    let (ci, _) = new_token("ci", Scopes::of([Scope::Read]), None, at(1)).expect("token");
    let (mut gone, _) = new_token("gone", Scopes::ADMIN, None, at(2)).expect("token");
    gone.revoked = Some(at(3));
    let (join, _) = new_join_token("rack", None, 3, at(4)).expect("join token");
    store.put_token(&ci).expect("token");
    store.put_token(&gone).expect("token");
    store.put_token(&join).expect("token");
    let joined = NodeIdentityRecord {
        id: NodeId::new(),
        name: "gpu-1".into(),
        created: at(5),
        token_id: join.id.clone(),
        revoked: None,
    };
    let used = crate::auth::TokenRecord {
        used: 1,
        ..join.clone()
    };
    store
        .put_node_identity(&joined, Some(&used))
        .expect("identity");
    let revoked = NodeIdentityRecord {
        id: NodeId::new(),
        name: "gpu-2".into(),
        revoked: Some(at(7)),
        ..joined.clone()
    };
    store.put_node_identity(&revoked, None).expect("identity");

    use weft_proto::policy::{Limit, LimitKind};
    let schedule = |name: &str, paused| {
        Record::Schedule(Arc::new(ScheduleRecord {
            spec: pb::ScheduleSpec {
                name: name.into(),
                cron: "*/5 * * * *".into(),
                ..pb::ScheduleSpec::default()
            },
            paused,
            created_at: at(10),
            since: at(10),
            last_fire: Some(at(20)),
            last_task: Some(all[0]),
            fired: 3,
            skipped: 1,
        }))
    };
    store
        .commit(&[
            schedule("nightly", false),
            schedule("hourly", true),
            Record::Limit(Limit {
                name: "api".into(),
                kind: LimitKind::Rate("10/s".parse().expect("rate")),
            }),
            Record::Limit(Limit {
                name: "db".into(),
                kind: LimitKind::MaxRunning(2),
            }),
        ])
        .expect("commit");
    filled
}

/// Every task, oldest first, read a page at a time.
fn every_task(store: &dyn Store) -> Vec<TaskRecord> {
    let mut query = ListQuery {
        limit: 100,
        ascending: true,
        ..ListQuery::default()
    };
    let mut all = Vec::new();
    loop {
        let page = store.list_page(&query).expect("list");
        all.extend(page.tasks);
        match page.resume {
            Some(last) => query.from = Some(TaskId::from_u128(last.as_u128() + 1)),
            None => return all,
        }
    }
}

/// Asserts that `to` reads back what `from` does, through every read of
/// the trait.
fn assert_same(from: &dyn Store, to: &dyn Store) {
    let tasks = every_task(from);
    assert_eq!(every_task(to), tasks, "tasks (list_page, oldest first)");
    for task in &tasks {
        assert_eq!(to.task(task.id).expect("task"), Some(task.clone()));
        assert_eq!(
            to.events(task.id, 0, usize::MAX).expect("events"),
            from.events(task.id, 0, usize::MAX).expect("events"),
            "events of {}",
            task.id
        );
    }
    assert_eq!(
        to.list(None, None, 10).expect("list"),
        from.list(None, None, 10).expect("list"),
        "newest first"
    );
    for state in TaskState::ALL {
        assert_eq!(
            to.list(Some(*state), None, 10).expect("list"),
            from.list(Some(*state), None, 10).expect("list"),
            "{state} tasks"
        );
    }

    let (a, b) = (
        from.load(UNIX_EPOCH).expect("load"),
        to.load(UNIX_EPOCH).expect("load"),
    );
    let sorted = |mut v: Vec<TaskRecord>| {
        v.sort_by_key(|t| t.id);
        v
    };
    assert_eq!(sorted(b.live), sorted(a.live), "live tasks");
    let counts = |mut v: Vec<(TaskState, u64)>| {
        v.sort_by_key(|(s, _)| i32::from(*s));
        v
    };
    assert_eq!(counts(b.final_counts), counts(a.final_counts));
    let secrets = |v: Vec<(TaskId, Arc<SecretEnv>)>| {
        let mut v: Vec<(TaskId, Vec<(String, String)>)> = v
            .into_iter()
            .map(|(id, env)| {
                let pairs = env
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                (id, pairs)
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(secrets(b.secrets), secrets(a.secrets), "secrets");
    let recent = |mut v: Vec<FinalAttempt>| {
        v.sort_by_key(|f| f.task_id);
        v
    };
    assert_eq!(recent(b.recently_final), recent(a.recently_final));
    let chunks = |mut v: Vec<(TaskId, u64)>| {
        v.sort();
        v
    };
    assert_eq!(chunks(b.next_chunks), chunks(a.next_chunks), "next chunks");
    let schedules = |mut v: Vec<ScheduleRecord>| {
        v.sort_by(|x, y| x.name().cmp(y.name()));
        v
    };
    assert_eq!(schedules(b.schedules), schedules(a.schedules));
    let limits = |mut v: Vec<weft_proto::policy::Limit>| {
        v.sort_by_key(|l| (l.kind.as_str(), l.name.clone()));
        v
    };
    assert_eq!(limits(b.limits), limits(a.limits));

    let tokens = |mut v: Vec<crate::auth::TokenRecord>| {
        v.sort_by(|x, y| x.id.cmp(&y.id));
        v
    };
    assert_eq!(
        tokens(to.tokens().expect("tokens")),
        tokens(from.tokens().expect("tokens"))
    );
    let identities = |mut v: Vec<NodeIdentityRecord>| {
        v.sort_by_key(|n| n.id);
        v
    };
    assert_eq!(
        identities(to.node_identities().expect("identities")),
        identities(from.node_identities().expect("identities"))
    );
}

fn check_copy(from: &dyn Store, to: &dyn Store) {
    let filled = fill(from);
    let copied = copy_store(from, to).expect("copy");
    assert_eq!(
        copied,
        Copied {
            tasks: filled.tasks,
            events: filled.events,
            secrets: filled.secrets,
            tokens: 3,
            node_identities: 2,
            schedules: 2,
            limits: 2,
            damaged: 0,
        }
    );
    assert_same(from, to);
}

#[test]
fn a_memory_store_copied_into_a_redb_store_reads_back_the_same() {
    let dir = tempfile::tempdir().expect("temp dir");
    let to = RedbStore::open(dir.path()).expect("store opens");
    check_copy(&MemoryStore::new(), &to);
}

#[test]
fn a_redb_store_copied_into_a_memory_store_reads_back_the_same() {
    let dir = tempfile::tempdir().expect("temp dir");
    let from = RedbStore::open(dir.path()).expect("store opens");
    check_copy(&from, &MemoryStore::new());
}

/// A log whose segments are small, so a copy spans many of them.
fn small_log(dir: &Path) -> LogStore {
    let log = LogStore::open_dir(dir, Some(7)).expect("log opens");
    log.set_segment_bytes(64 << 10);
    log
}

#[test]
fn a_memory_store_copied_into_the_log_reads_back_the_same() {
    let dir = tempfile::tempdir().expect("temp dir");
    let to = small_log(dir.path());
    let from = MemoryStore::new();
    check_copy(&from, &to);
    drop(to);
    let segments = std::fs::read_dir(dir.path())
        .expect("list")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        })
        .count();
    assert!(segments > 1, "the copy fits in one segment");
    // What the copy wrote is on disk: read back from the segments.
    let reopened = LogStore::open_dir(dir.path(), None).expect("log reopens");
    assert_same(&from, &reopened);
}

#[test]
fn a_redb_store_copied_into_the_log_reads_back_the_same() {
    let redb_dir = tempfile::tempdir().expect("temp dir");
    let log_dir = tempfile::tempdir().expect("temp dir");
    let from = RedbStore::open(redb_dir.path()).expect("store opens");
    check_copy(&from, &small_log(log_dir.path()));
}

#[test]
fn an_empty_store_copies_as_nothing() {
    let copied = copy_store(&MemoryStore::new(), &MemoryStore::new()).expect("copy");
    assert_eq!(copied, Copied::default());
}

/// A redb data dir filled by `fill`, and a memory copy of it to compare
/// against once `weft.redb` was moved away.
fn redb_data_dir(dir: &Path) -> MemoryStore {
    let redb = RedbStore::open(dir).expect("store opens");
    fill(&redb);
    let expected = MemoryStore::new();
    copy_store(&redb, &expected).expect("copy");
    expected
}

fn store_id(dir: &Path) -> u64 {
    marker::read(&dir.join(marker::FILE_NAME))
        .expect("marker")
        .expect("a marker")
}

/// Asserts `dir` holds the moved store: the log with the redb store's id,
/// `weft.redb` renamed, no copy in progress nor any file of one.
fn assert_moved(dir: &Path, id: u64) {
    assert!(!dir.join(redb::FILE_NAME).exists(), "weft.redb still there");
    assert!(
        dir.join(MIGRATED_FILE).exists(),
        "weft.redb.migrated missing"
    );
    assert!(!dir.join(MIGRATING_DIR).exists(), "log.migrating left");
    assert!(
        !dir.join(UPGRADING_FILE).exists(),
        "weft.redb.upgrading left"
    );
    assert!(!dir.join(COPIED_FILE).exists(), "weft.redb.copied left");
    assert_eq!(store_id(dir), id, "the marker changed");
    let log = LogStore::open_dir(&dir.join(LOG_DIR), None).expect("the log opens");
    assert_eq!(log.store_id(), id, "the log has another id");
}

#[test]
fn a_redb_data_dir_is_moved_to_the_log_once_keeping_weft_redb() {
    let dir = tempfile::tempdir().expect("temp dir");
    let expected = redb_data_dir(dir.path());
    let id = store_id(dir.path());

    let store = open_data_dir(dir.path()).expect("opens, moving the store");
    assert_same(&expected, &*store);
    // Written after the move: a second open that moved again (from
    // anything) would lose it.
    let later = ids(1)[0];
    let spec = Arc::new(TaskSpec::call("noop", "after"));
    let record = TaskRecord::for_test(later, spec, TaskState::Queued, at(9));
    store
        .commit(&[Record::Task(record.clone())])
        .expect("commit");
    expected.commit(&[Record::Task(record)]).expect("commit");
    drop(store);
    assert_moved(dir.path(), id);
    let kept = std::fs::read(dir.path().join(MIGRATED_FILE)).expect("kept");

    let store = open_data_dir(dir.path()).expect("reopens");
    assert_same(&expected, &*store);
    drop(store);
    assert_moved(dir.path(), id);
    assert_eq!(
        std::fs::read(dir.path().join(MIGRATED_FILE)).expect("kept"),
        kept,
        "weft.redb.migrated changed"
    );
}

#[test]
fn a_copy_left_by_a_crashed_move_is_thrown_away_and_the_move_redone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let expected = redb_data_dir(dir.path());
    let id = store_id(dir.path());
    // An earlier try's partial copy, holding a task the redb store does
    // not (so a copy that kept it would show), and a stray file.
    let migrating = dir.path().join(MIGRATING_DIR);
    {
        let partial = LogStore::open_dir(&migrating, Some(id)).expect("log opens");
        let spec = Arc::new(TaskSpec::call("noop", "stray"));
        let stray = TaskRecord::for_test(ids(1)[0], spec, TaskState::Queued, at(3));
        partial.commit(&[Record::Task(stray)]).expect("commit");
    }
    std::fs::write(migrating.join("junk"), b"junk").expect("write");
    // And an upgraded copy that try could not remove.
    std::fs::write(dir.path().join(UPGRADING_FILE), b"left").expect("write");

    let store = open_data_dir(dir.path()).expect("opens, moving the store again");
    assert_same(&expected, &*store);
    drop(store);
    assert_moved(dir.path(), id);
}

/// What a move that stopped after the log was in place leaves: the log,
/// `weft.redb` and the record of it as copied.
fn stop_with_the_log_in_place(dir: &Path, id: u64) {
    {
        let redb = RedbStore::open(dir).expect("store opens");
        let log = LogStore::open_dir(&dir.join(LOG_DIR), Some(id)).expect("log opens");
        copy_store(&redb, &log).expect("copy");
    }
    record_copied(dir).expect("recorded");
}

#[test]
fn a_move_that_stopped_after_the_log_was_in_place_opens_the_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let expected = redb_data_dir(dir.path());
    let id = store_id(dir.path());
    // The log renamed into place, weft.redb not yet renamed.
    stop_with_the_log_in_place(dir.path(), id);

    let store = open_data_dir(dir.path()).expect("opens the log");
    assert_same(&expected, &*store);
    drop(store);
    assert_moved(dir.path(), id);
}

#[test]
fn a_new_data_dir_gets_a_log_and_no_redb_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let store = open_data_dir(&data).expect("opens");
    let id = ids(1)[0];
    let spec = Arc::new(TaskSpec::call("noop", ""));
    store
        .commit(&[Record::Task(TaskRecord::for_test(
            id,
            spec,
            TaskState::Queued,
            at(0),
        ))])
        .expect("commit");
    drop(store);
    assert!(!data.join(redb::FILE_NAME).exists());
    assert!(!data.join(MIGRATED_FILE).exists());
    let store = open_data_dir(&data).expect("reopens");
    assert!(store.task(id).expect("task").is_some());
}

#[test]
fn an_empty_log_dir_left_by_a_refused_start_does_not_stop_the_move() {
    let dir = tempfile::tempdir().expect("temp dir");
    let expected = redb_data_dir(dir.path());
    let id = store_id(dir.path());
    // A start while weft.redb was missing made log/ and its lock file,
    // then refused; weft.redb is back now.
    let log_dir = dir.path().join(LOG_DIR);
    std::fs::create_dir(&log_dir).expect("mkdir");
    std::fs::write(log_dir.join("LOCK"), b"").expect("write");

    let store = open_data_dir(dir.path()).expect("opens, moving the store");
    assert_same(&expected, &*store);
    drop(store);
    assert_moved(dir.path(), id);
}

const META: ::redb::TableDefinition<&str, u64> = ::redb::TableDefinition::new("meta");
const TASKS: ::redb::TableDefinition<u128, &[u8]> = ::redb::TableDefinition::new("tasks");

fn redb_schema(file: &Path) -> Option<u64> {
    use ::redb::ReadableDatabase;
    let db = ::redb::Database::open(file).expect("redb opens");
    let txn = db.begin_read().expect("read");
    let meta = txn.open_table(META).expect("meta");
    meta.get("schema").expect("get").map(|v| v.value())
}

#[test]
fn a_failed_move_leaves_weft_redb_of_an_older_schema_as_it_was() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(redb::FILE_NAME);
    let id = ids(1)[0];
    {
        let store = RedbStore::open(dir.path()).expect("store opens");
        let spec = Arc::new(TaskSpec::call("noop", "old"));
        let record = TaskRecord::for_test(id, spec, TaskState::Queued, at(1));
        store.commit(&[Record::Task(record)]).expect("commit");
    }
    {
        // What a schema-3 coordinator left (no limits to seal).
        let db = ::redb::Database::open(&file).expect("redb opens");
        let txn = db.begin_write().expect("write");
        txn.open_table(META)
            .expect("meta")
            .insert("schema", 3)
            .expect("insert");
        txn.commit().expect("commit");
    }
    // The move fails: its copy cannot be made where a file is in the way.
    let migrating = dir.path().join(MIGRATING_DIR);
    std::fs::write(&migrating, b"in the way").expect("write");
    assert!(open_data_dir(dir.path()).is_err(), "the move succeeded");
    assert_eq!(redb_schema(&file), Some(3), "weft.redb was upgraded");
    assert!(!dir.path().join(UPGRADING_FILE).exists(), "the copy left");
    assert!(!dir.path().join(LOG_DIR).exists(), "a log left");

    std::fs::remove_file(&migrating).expect("remove");
    let store = open_data_dir(dir.path()).expect("opens, moving the store");
    assert!(
        store.task(id).expect("task").is_some(),
        "the task not moved"
    );
    drop(store);
    assert!(!dir.path().join(UPGRADING_FILE).exists(), "the copy left");
    assert_eq!(redb_schema(&dir.path().join(MIGRATED_FILE)), Some(3));
}

#[test]
fn a_finished_task_that_cannot_be_decoded_is_left_out_of_the_copy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let all = ids(3);
    {
        let store = RedbStore::open(dir.path()).expect("store opens");
        let records: Vec<Record> = all
            .iter()
            .map(|id| {
                let spec = Arc::new(TaskSpec::call("noop", "x"));
                Record::Task(TaskRecord::for_test(*id, spec, TaskState::Succeeded, at(1)))
            })
            .collect();
        store.commit(&records).expect("commit");
    }
    {
        // Its checksum matches: written so, not damaged on disk.
        let db = ::redb::Database::open(dir.path().join(redb::FILE_NAME)).expect("redb opens");
        let txn = db.begin_write().expect("write");
        let key = all[1].as_u128();
        let value = seal::seal(seal::SealKey::Id(key), b"\xff\xfe garbage".to_vec());
        txn.open_table(TASKS)
            .expect("tasks")
            .insert(key, value.as_slice())
            .expect("insert");
        txn.commit().expect("commit");
    }
    let from = RedbStore::open(dir.path()).expect("store opens");
    let to = MemoryStore::new();
    let copied = copy_store(&from, &to).expect("the copy goes on past the task");
    assert_eq!((copied.tasks, copied.damaged), (2, 1));
    assert!(to.task(all[0]).expect("task").is_some());
    assert!(to.task(all[1]).expect("task").is_none());
    assert!(to.task(all[2]).expect("task").is_some());
}

#[test]
fn a_weft_redb_written_to_after_its_copy_is_not_retired() {
    let dir = tempfile::tempdir().expect("temp dir");
    redb_data_dir(dir.path());
    let id = store_id(dir.path());
    stop_with_the_log_in_place(dir.path(), id);
    // An older coordinator started next, and wrote to weft.redb.
    std::thread::sleep(Duration::from_millis(20));
    let later = ids(1)[0];
    {
        let store = RedbStore::open(dir.path()).expect("store opens");
        let spec = Arc::new(TaskSpec::call("noop", "later"));
        let record = TaskRecord::for_test(later, spec, TaskState::Queued, at(9));
        store.commit(&[Record::Task(record)]).expect("commit");
    }
    let err = open_data_dir(dir.path())
        .err()
        .expect("a changed weft.redb retired");
    assert!(err.to_string().contains("changed after"), "{err}");
    // Keeping the log: what to rename and what to remove.
    let keep = format!("rename weft.redb to {MIGRATED_FILE} and remove {COPIED_FILE}");
    assert!(err.to_string().contains(&keep), "{err}");
    assert!(!err.to_string().contains(UPGRADING_FILE), "{err}");
    assert!(
        dir.path().join(redb::FILE_NAME).exists(),
        "weft.redb retired"
    );
    assert!(dir.path().join(COPIED_FILE).exists());

    // An upgraded copy a move could not remove is named too.
    std::fs::write(dir.path().join(UPGRADING_FILE), b"left").expect("write");
    let err = open_data_dir(dir.path())
        .err()
        .expect("a changed weft.redb retired");
    let keep = format!("remove {COPIED_FILE} and {UPGRADING_FILE}");
    assert!(err.to_string().contains(&keep), "{err}");
}

#[test]
fn a_move_that_crashed_after_recording_weft_redb_while_open_finishes_at_the_next_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let expected = redb_data_dir(dir.path());
    let id = store_id(dir.path());
    // As the move does: recorded while weft.redb is still open, then the
    // process dies (no close writes to weft.redb).
    let redb = RedbStore::open(dir.path()).expect("store opens");
    {
        let log = LogStore::open_dir(&dir.path().join(LOG_DIR), Some(id)).expect("log opens");
        copy_store(&redb, &log).expect("copy");
    }
    record_copied(dir.path()).expect("recorded");
    std::mem::forget(redb);

    let store = open_data_dir(dir.path()).expect("finishes the move, no refusal");
    assert_same(&expected, &*store);
    drop(store);
    assert_moved(dir.path(), id);
}

#[test]
fn a_redb_store_of_a_newer_schema_is_refused_as_newer() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        // A newer coordinator's tables need not be of today's types.
        let db = ::redb::Database::create(dir.path().join(redb::FILE_NAME)).expect("redb");
        let txn = db.begin_write().expect("write");
        let newer: ::redb::TableDefinition<u64, u64> = ::redb::TableDefinition::new("tasks");
        txn.open_table(newer)
            .expect("tasks")
            .insert(1, 1)
            .expect("insert");
        txn.open_table(META)
            .expect("meta")
            .insert("schema", 99)
            .expect("insert");
        txn.commit().expect("commit");
    }
    let err = open_data_dir(dir.path())
        .err()
        .expect("a newer store opened");
    assert!(err.to_string().contains("newer coordinator"), "{err}");
    assert_eq!(redb_schema(&dir.path().join(redb::FILE_NAME)), Some(99));
}
