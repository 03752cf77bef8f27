//! A damaged or lost redb store file is refused, never served and never
//! replaced by an empty one: a changed byte in a value, a zeroed page, a
//! truncated, empty or missing `weft.redb` where a store existed (at start
//! too, where it would be moved to the log). And a store written before
//! checksums still opens (upgraded once).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use weft_proto::{Attempt, TaskId, TaskSpec, TaskState};

use super::codec::{encode_event, encode_task};
use super::redb::FILE_NAME as STORE_FILE;
use super::*;

const TASKS: TableDefinition<u128, &[u8]> = TableDefinition::new("tasks");
const EVENTS: TableDefinition<(u128, u64), &[u8]> = TableDefinition::new("events");
const BY_STATE: TableDefinition<(u8, u128), ()> = TableDefinition::new("tasks_by_state");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FINAL_BY_TIME: TableDefinition<(u64, u128), ()> = TableDefinition::new("final_by_time");

fn task(state: TaskState, input: &str) -> TaskRecord {
    let spec = Arc::new(TaskSpec::call("noop", input.to_owned()));
    let made = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    TaskRecord {
        attempt: Attempt(1),
        updated_at: SystemTime::now(),
        ..TaskRecord::for_test(TaskId::new(), spec, state, made)
    }
}

fn queued_event(id: TaskId, seq: u64) -> TaskEvent {
    TaskEvent {
        task_id: id,
        seq,
        attempt: Attempt(1),
        time: SystemTime::now(),
        body: EventBody::State {
            state: TaskState::Queued,
            node_id: None,
            node_name: None,
            reason: String::new(),
        },
    }
}

/// A store in `dir` holding one queued and one succeeded task.
fn store_with_two_tasks(dir: &Path) -> (TaskRecord, TaskRecord) {
    let queued = task(TaskState::Queued, "queued");
    let done = task(TaskState::Succeeded, "done");
    let store = RedbStore::open(dir).expect("store opens");
    store
        .commit(&[
            Record::Task(queued.clone()),
            Record::Event(queued_event(queued.id, 0)),
            Record::Task(done.clone()),
        ])
        .expect("commit");
    (queued, done)
}

/// Flips one byte in the middle of task `id`'s stored value, behind the
/// store's back.
fn flip_a_byte_of(dir: &Path, id: TaskId) {
    let db = Database::open(dir.join(STORE_FILE)).expect("redb opens");
    let txn = db.begin_write().expect("write");
    {
        let mut tasks = txn.open_table(TASKS).expect("tasks");
        let mut value = tasks
            .get(id.as_u128())
            .expect("read")
            .expect("stored")
            .value()
            .to_vec();
        let middle = value.len() / 2;
        value[middle] ^= 0x20;
        tasks.insert(id.as_u128(), value.as_slice()).expect("write");
    }
    txn.commit().expect("commit");
}

fn damaged_key(err: &StoreError) -> Option<(&'static str, &str)> {
    match err {
        StoreError::Damaged { table, key, .. } => Some((table, key.as_str())),
        _ => None,
    }
}

#[test]
fn a_changed_byte_in_a_live_task_fails_the_load_naming_table_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let (queued, _) = store_with_two_tasks(dir.path());
    flip_a_byte_of(dir.path(), queued.id);

    let store = RedbStore::open(dir.path()).expect("the file itself is sound");
    let err = store
        .load(UNIX_EPOCH)
        .expect_err("a damaged live task was loaded");
    let id = queued.id.to_string();
    assert_eq!(damaged_key(&err), Some(("tasks", id.as_str())), "{err}");
    assert!(err.is_damage());
    assert!(
        err.to_string()
            .contains(&format!("the store is damaged: table tasks, key {id}")),
        "{err}"
    );
    assert!(store.task(queued.id).is_err(), "a damaged task was served");
}

#[test]
fn a_changed_byte_in_a_final_task_fails_its_reads_but_not_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (queued, done) = store_with_two_tasks(dir.path());
    flip_a_byte_of(dir.path(), done.id);

    let store = RedbStore::open(dir.path()).unwrap();
    let err = store.task(done.id).expect_err("a damaged task was served");
    let id = done.id.to_string();
    assert_eq!(damaged_key(&err), Some(("tasks", id.as_str())), "{err}");
    assert!(store.list(None, None, 10).is_err(), "listed a damaged task");
    assert!(store.events(done.id, 0, 10).is_err());
    // The sound task still reads.
    let sound = store.task(queued.id).unwrap().map(|t| t.state);
    assert_eq!(sound, Some(TaskState::Queued));
    assert_eq!(store.events(queued.id, 0, 10).unwrap().len(), 1);
}

#[test]
fn a_damaged_final_task_past_its_retention_is_deleted_and_sweeps_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (queued, done) = store_with_two_tasks(dir.path());
    flip_a_byte_of(dir.path(), done.id);
    let later = done.updated_at + Duration::from_secs(60);
    let newer = TaskRecord {
        updated_at: done.updated_at + Duration::from_secs(3600),
        ..task(TaskState::Failed, "newer")
    };
    let store = RedbStore::open(dir.path()).unwrap();
    store.commit(&[Record::Task(newer.clone())]).unwrap();

    // The damaged record goes (its state read from the index), the sweep
    // commits, and the next one deletes what comes after it.
    assert_eq!(
        store.expire(later, 10, &[]).unwrap(),
        [TaskState::Succeeded]
    );
    assert!(store.task(done.id).unwrap().is_none());
    let much_later = newer.updated_at + Duration::from_secs(60);
    assert_eq!(
        store.expire(much_later, 10, &[]).unwrap(),
        [TaskState::Failed]
    );
    // The index no longer names it either, and listing works again.
    assert!(
        store
            .list(Some(TaskState::Succeeded), None, 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.list(None, None, 10).unwrap().len(), 1);
    assert_eq!(
        store.task(queued.id).unwrap().map(|t| t.state),
        Some(TaskState::Queued)
    );
}

/// The retention index has no checksum of its own: an entry naming a live
/// task (a changed byte), or a finished task at another time, is dropped
/// and the task kept; retention deletes only what the sealed record says
/// is due.
#[test]
fn a_retention_entry_that_does_not_match_its_task_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (queued, done) = store_with_two_tasks(dir.path());
    let ended = |t: &TaskRecord| {
        u64::try_from(t.updated_at.duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
    };
    {
        let db = Database::open(dir.path().join(STORE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut by_time = txn.open_table(FINAL_BY_TIME).unwrap();
            by_time.insert((1, queued.id.as_u128()), ()).unwrap();
            by_time
                .insert((ended(&done) - 5, done.id.as_u128()), ())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    // Due: both wrong entries, not the finished task's own.
    let before_done = done.updated_at - Duration::from_millis(1);
    assert_eq!(store.expire(before_done, 10, &[]).unwrap(), []);
    assert_eq!(
        store.task(queued.id).unwrap().map(|t| t.state),
        Some(TaskState::Queued)
    );
    assert!(store.task(done.id).unwrap().is_some(), "not due yet");
    let loaded = store.load(UNIX_EPOCH).unwrap();
    assert_eq!(
        loaded.live.iter().map(|t| t.id).collect::<Vec<_>>(),
        [queued.id]
    );
    // Its own entry still retires it when it is due.
    let later = done.updated_at + Duration::from_secs(60);
    assert_eq!(
        store.expire(later, 10, &[]).unwrap(),
        [TaskState::Succeeded]
    );
    assert!(store.task(done.id).unwrap().is_none());
}

fn start_config(dir: &Path) -> crate::CoordinatorConfig {
    crate::CoordinatorConfig {
        data_dir: Some(dir.to_owned()),
        tls: None,
        insecure: true,
        auth: false,
        ..crate::CoordinatorConfig::default()
    }
}

/// Starts a coordinator on `dir`: the start's error, or `None` when it
/// started (it is shut down at once).
async fn start_error(dir: &Path) -> Option<crate::Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    match crate::start(start_config(dir), listener).await {
        Ok(running) => {
            let _ = running.shutdown(Duration::from_secs(5)).await;
            None
        }
        Err(err) => Some(err),
    }
}

/// The start's store error, which must be damage naming `named`.
async fn refused(dir: &Path, named: &Path) -> StoreError {
    match start_error(dir).await {
        Some(crate::Error::Store(err)) => {
            assert!(err.is_damage(), "not reported as damage: {err}");
            assert!(
                err.to_string().contains(&named.display().to_string()),
                "does not name {}: {err}",
                named.display()
            );
            err
        }
        Some(other) => panic!("refused, but not as damage: {other}"),
        None => panic!("started on a damaged store"),
    }
}

#[tokio::test]
async fn a_zeroed_page_is_refused_at_start_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RedbStore::open(dir.path()).unwrap();
        let records: Vec<Record> = (0..400)
            .map(|i| Record::Task(task(TaskState::Queued, &format!("zero-me-{i:04}"))))
            .collect();
        store.commit(&records).unwrap();
    }
    let file = dir.path().join(STORE_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes
        .windows(12)
        .position(|w| w == b"zero-me-0200")
        .expect("the value is in the file");
    let page = at / 4096 * 4096;
    bytes[page..page + 4096].fill(0);
    std::fs::write(&file, &bytes).unwrap();

    refused(dir.path(), &file).await;
}

#[tokio::test]
async fn an_empty_truncated_or_missing_store_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    store_with_two_tasks(dir.path());
    let file = dir.path().join(STORE_FILE);
    assert!(
        dir.path().join(marker::FILE_NAME).exists(),
        "no marker written"
    );
    let whole = std::fs::read(&file).unwrap();

    std::fs::write(&file, &whole[..whole.len() / 2]).unwrap();
    refused(dir.path(), &file).await;

    std::fs::write(&file, b"").unwrap();
    let err = refused(dir.path(), &file).await;
    assert!(err.to_string().contains("is empty"), "{err}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0, "written over");

    // With neither weft.redb nor a log, the store the start looks for is
    // the log.
    std::fs::remove_file(&file).unwrap();
    let log = dir.path().join(migrate::LOG_DIR);
    let err = refused(dir.path(), &log).await;
    assert!(err.to_string().contains("holds no log"), "{err}");
    assert!(!file.exists(), "a new store was created");

    // Another (new) store put in its place is not this data dir's store.
    let other = tempfile::tempdir().unwrap();
    drop(RedbStore::open(other.path()).unwrap());
    std::fs::copy(other.path().join(STORE_FILE), &file).unwrap();
    let err = refused(dir.path(), &file).await;
    assert!(err.to_string().contains("another store"), "{err}");

    // The original file back: it starts (moved to the log), with its tasks.
    std::fs::write(&file, &whole).unwrap();
    assert!(start_error(dir.path()).await.is_none());
    let store = migrate::open_data_dir(dir.path()).unwrap();
    assert_eq!(store.list(None, None, 10).unwrap().len(), 2);
}

#[tokio::test]
async fn a_fresh_data_dir_starts_and_keeps_its_marker() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("weft-data");
    assert!(start_error(&data).await.is_none());
    let marker = std::fs::read_to_string(data.join(marker::FILE_NAME)).unwrap();
    assert!(marker.starts_with("weft store "), "{marker}");
    assert!(start_error(&data).await.is_none(), "a restart was refused");
    assert_eq!(
        std::fs::read_to_string(data.join(marker::FILE_NAME)).unwrap(),
        marker,
        "the marker changed"
    );
}

#[test]
fn a_store_written_before_checksums_opens_and_is_upgraded_once() {
    let dir = tempfile::tempdir().unwrap();
    let queued = task(TaskState::Queued, "from schema 1");
    let many: Vec<TaskEvent> = (0..10).map(|seq| queued_event(queued.id, seq)).collect();
    {
        // What the schema-1 coordinator wrote: values without checksums,
        // no store id, no marker.
        let db = Database::create(dir.path().join(STORE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let key = queued.id.as_u128();
            let mut tasks = txn.open_table(TASKS).unwrap();
            tasks.insert(key, encode_task(&queued).as_slice()).unwrap();
            let mut events = txn.open_table(EVENTS).unwrap();
            for event in &many {
                events
                    .insert((key, event.seq), encode_event(event).as_slice())
                    .unwrap();
            }
            let mut by_state = txn.open_table(BY_STATE).unwrap();
            let state = u8::try_from(i32::from(TaskState::Queued)).unwrap();
            by_state.insert((state, key), ()).unwrap();
            txn.open_table(META).unwrap().insert("schema", 1).unwrap();
        }
        txn.commit().unwrap();
    }

    for _ in 0..2 {
        let store = RedbStore::open(dir.path()).expect("an old store opens");
        let loaded = store.load(UNIX_EPOCH).unwrap();
        assert_eq!(loaded.live.len(), 1);
        assert_eq!(loaded.live[0].id, queued.id);
        assert_eq!(loaded.live[0].next_seq, 10);
        let events = store.events(queued.id, 0, 100).unwrap();
        assert_eq!(events, many);
    }
    assert!(dir.path().join(marker::FILE_NAME).exists());
    let db = Database::open(dir.path().join(STORE_FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    let schema = txn.open_table(META).unwrap().get("schema").unwrap();
    assert_eq!(schema.map(|v| v.value()), Some(4));
}

const LIMITS: TableDefinition<&str, &[u8]> = TableDefinition::new("limits");

fn rate_limit() -> weft_proto::policy::Limit {
    weft_proto::policy::Limit {
        name: "api".into(),
        kind: weft_proto::policy::LimitKind::Rate("10/s".parse().unwrap()),
    }
}

#[test]
fn a_damaged_limit_is_reported_as_damage() {
    let dir = tempfile::tempdir().unwrap();
    RedbStore::open(dir.path())
        .unwrap()
        .commit(&[Record::Limit(rate_limit())])
        .unwrap();
    {
        let db = Database::open(dir.path().join(STORE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(LIMITS)
            .unwrap()
            .insert("rate/api", &b"\xff\xfe garbage"[..])
            .unwrap();
        txn.commit().unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    let err = store.load(UNIX_EPOCH).unwrap_err();
    assert!(err.is_damage(), "{err}");
    assert!(err.to_string().contains("limits"), "{err}");
}

#[test]
fn limits_written_before_they_had_checksums_still_load() {
    let dir = tempfile::tempdir().unwrap();
    drop(RedbStore::open(dir.path()).unwrap());
    {
        // What a schema-3 coordinator wrote: a limit without checksum.
        let db = Database::open(dir.path().join(STORE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        let body = prost::Message::encode_to_vec(&weft_proto::pb::Limit::from(&rate_limit()));
        txn.open_table(LIMITS)
            .unwrap()
            .insert("rate/api", body.as_slice())
            .unwrap();
        txn.open_table(META).unwrap().insert("schema", 3).unwrap();
        txn.commit().unwrap();
    }
    for _ in 0..2 {
        let store = RedbStore::open(dir.path()).expect("a schema-3 store opens");
        assert_eq!(store.load(UNIX_EPOCH).unwrap().limits, [rate_limit()]);
    }
}

/// Flips one byte in the middle of event `seq` of task `id`.
fn flip_a_byte_of_event(dir: &Path, id: TaskId, seq: u64) {
    let db = Database::open(dir.join(STORE_FILE)).expect("redb opens");
    let txn = db.begin_write().expect("write");
    {
        let mut events = txn.open_table(EVENTS).expect("events");
        let key = (id.as_u128(), seq);
        let mut value = events
            .get(key)
            .expect("read")
            .expect("stored")
            .value()
            .to_vec();
        let middle = value.len() / 2;
        value[middle] ^= 0x20;
        events.insert(key, value.as_slice()).expect("write");
    }
    txn.commit().expect("commit");
}

#[test]
fn a_damaged_finished_task_or_event_is_left_out_of_the_move_to_the_log_and_the_rest_moved() {
    let dir = tempfile::tempdir().unwrap();
    let (queued, done) = store_with_two_tasks(dir.path());
    let later = task(TaskState::Succeeded, "later");
    RedbStore::open(dir.path())
        .unwrap()
        .commit(&[
            Record::Task(later.clone()),
            Record::Event(queued_event(later.id, 0)),
            Record::Event(queued_event(later.id, 1)),
        ])
        .unwrap();
    flip_a_byte_of(dir.path(), done.id);
    flip_a_byte_of_event(dir.path(), later.id, 1);

    let store = migrate::open_data_dir(dir.path()).expect("moved, leaving the damage out");
    assert!(
        store.task(done.id).unwrap().is_none(),
        "a damaged task was moved"
    );
    assert_eq!(store.task(queued.id).unwrap().unwrap().next_seq, 1);
    let later = store.task(later.id).unwrap().expect("moved");
    assert_eq!(later.next_seq, 1, "the history up to the damaged event");
    assert!(dir.path().join(migrate::MIGRATED_FILE).exists());
}

#[test]
fn a_redb_store_with_a_damaged_live_task_is_refused_and_not_moved() {
    let dir = tempfile::tempdir().unwrap();
    let (queued, _) = store_with_two_tasks(dir.path());
    flip_a_byte_of(dir.path(), queued.id);

    let err = match migrate::open_data_dir(dir.path()) {
        Ok(_) => panic!("moved a store with a damaged live task"),
        Err(err) => err,
    };
    assert!(err.is_damage(), "{err}");
    assert!(dir.path().join(STORE_FILE).exists(), "weft.redb moved away");
    assert!(!dir.path().join(migrate::MIGRATING_DIR).exists());
    assert!(!dir.path().join(migrate::LOG_DIR).exists());
}
