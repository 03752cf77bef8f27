//! What only the PostgreSQL store has: a database that outlives the
//! store, a schema opened twice, and a server that is not there. The
//! `Store` contract itself runs on it in `store/tests.rs`.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use weft_proto::{Attempt, TaskId, TaskSpec, TaskState};

use super::testdb;
use super::*;
use crate::store::{EventBody, Record};

fn record(id: TaskId, state: TaskState) -> TaskRecord {
    let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    TaskRecord::for_test(id, Arc::new(TaskSpec::call("noop", "in")), state, at)
}

fn progress(id: TaskId, seq: u64) -> Record {
    Record::Event(TaskEvent {
        task_id: id,
        seq,
        attempt: Attempt(0),
        time: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        body: EventBody::Progress {
            fraction: 0.5,
            message: "half".into(),
        },
    })
}

#[test]
fn reopening_keeps_what_was_committed() {
    let url = testdb::database();
    let id = TaskId::new();
    let queued = record(id, TaskState::Queued);
    {
        let store = PgStore::open(&url).unwrap();
        store
            .commit(&[
                Record::Task(queued.clone()),
                progress(id, 0),
                progress(id, 1),
            ])
            .unwrap();
    }
    let store = PgStore::open(&url).unwrap();
    let loaded = store.load(UNIX_EPOCH).unwrap();
    assert_eq!(
        loaded.live,
        [TaskRecord {
            next_seq: 2,
            ..queued
        }]
    );
    assert_eq!(store.events(id, 0, 10).unwrap().len(), 2);
    // And the log goes on where it was.
    store.commit(&[progress(id, 2)]).unwrap();
    assert_eq!(store.task(id).unwrap().unwrap().next_seq, 3);
}

#[test]
fn migrations_are_applied_once_however_many_open_at_once() {
    let url = testdb::database();
    // Two stores opening together on a new database, then a third.
    let opened: Vec<Result<PgStore, StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2).map(|_| s.spawn(|| PgStore::open(&url))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Both migrated (once, below); one coordinator holds the database.
    let held = opened.iter().filter(|o| o.is_ok()).count();
    assert_eq!(held, 1, "{opened:?}");
    drop(opened);
    let store = PgStore::open(&url).unwrap();
    let versions = store
        .run("test", async {
            let rows = store
                .reader()?
                .client
                .query("SELECT version FROM weft_migrations ORDER BY version", &[])
                .await
                .map_err(|e| backend("test", &e))?;
            Ok(rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>())
        })
        .unwrap();
    let all: Vec<i32> = migrate::MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(versions, all);
}

/// One coordinator per database: a second is refused while the first
/// holds it, and gets it once the first is gone; a coordinator whose
/// write connection was lost does not write again if another took over.
#[test]
fn a_second_coordinator_on_the_same_database_is_refused_until_the_first_is_gone() {
    let url = testdb::database();
    let first = PgStore::open(&url).unwrap();
    let err = PgStore::open(&url).unwrap_err();
    assert!(
        err.to_string().contains("in use by another coordinator"),
        "{err}"
    );
    drop(first);
    let second = PgStore::open(&url).unwrap();
    let id = TaskId::new();
    second
        .commit(&[Record::Task(record(id, TaskState::Queued))])
        .unwrap();
    // Its write connection is cut (as by a network loss) and a third
    // coordinator takes the database meanwhile: the second's next write
    // is refused, not recorded.
    *second.writer.lock().unwrap() = None;
    let third = PgStore::open(&url).unwrap();
    let refused = second.commit(&[progress(id, 0)]).unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("in use by another coordinator"),
        "{refused}"
    );
    assert_eq!(third.task(id).unwrap().unwrap().next_seq, 0);
}

#[test]
fn a_schema_newer_than_the_coordinator_is_refused() {
    let url = testdb::database();
    let store = PgStore::open(&url).unwrap();
    store
        .run("test", async {
            store
                .reader()?
                .client
                .execute(
                    "INSERT INTO weft_migrations (version, name, checksum) VALUES (999, 'future', '')",
                    &[],
                )
                .await
                .map_err(|e| backend("test", &e))
        })
        .unwrap();
    let err = PgStore::open(&url).unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err}");
    assert!(
        err.to_string().contains("newer than this coordinator"),
        "{err}"
    );
}

#[test]
fn an_unreachable_server_or_a_bad_url_is_a_clear_error() {
    // A port nothing listens on: taken from the kernel, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err =
        PgStore::open(&format!("postgresql://weft:secret@127.0.0.1:{port}/weft")).unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}/weft")), "{text}");
    assert!(!text.contains("secret"), "no password in errors: {text}");
    assert!(!err.is_damage());
    let err = PgStore::open("postgresql://weft:secret@[nonsense").unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err}");
    assert!(!err.to_string().contains("secret"), "{err}");
    // TLS is refused by name, not attempted in plaintext.
    let err =
        PgStore::open("postgresql://weft:secret@127.0.0.1:5432/weft?sslmode=require").unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err}");
    assert!(err.to_string().contains("sslmode=require"), "{err}");
    assert!(!err.to_string().contains("secret"), "{err}");
    // A server that is there, but no such database.
    let url = testdb::database();
    let missing = format!("{}_missing", url);
    let err = PgStore::open(&missing).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn a_store_can_be_dropped_inside_async_code() {
    let store = testdb::store();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store: Arc<dyn Store> = Arc::new(store);
        let id = TaskId::new();
        let read = crate::store::blocking(&store, "test", move |s| {
            s.commit(&[Record::Task(record(id, TaskState::Queued))])?;
            s.task(id)
        })
        .await
        .unwrap();
        assert!(read.is_some());
        drop(store);
    });
}

#[test]
fn a_restarted_server_is_reconnected_to_by_the_next_call() {
    let server = testdb::Server::private();
    let store = PgStore::open(&server.url()).unwrap();
    let id = TaskId::new();
    store
        .commit(&[Record::Task(record(id, TaskState::Queued)), progress(id, 0)])
        .unwrap();
    assert!(store.task(id).unwrap().is_some());

    // Restarted between two commits: both connections were closed.
    server.restart();
    store.commit(&[progress(id, 1)]).unwrap();
    assert_eq!(store.task(id).unwrap().unwrap().next_seq, 2);
    assert_eq!(store.events(id, 0, 10).unwrap().len(), 2);

    // Down: every call fails, as a database that cannot be reached, and
    // nothing panics.
    server.stop();
    let err = store.task(id).unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err}");
    let err = store.commit(&[progress(id, 2)]).unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err}");
    assert!(matches!(
        store.tokens().unwrap_err(),
        StoreError::Database { .. }
    ));

    // Up again: the next calls reconnect.
    server.start();
    store.commit(&[progress(id, 2)]).unwrap();
    assert_eq!(store.task(id).unwrap().unwrap().next_seq, 3);
    assert_eq!(store.events(id, 0, 10).unwrap().len(), 3);
    assert_eq!(store.load(UNIX_EPOCH).unwrap().live.len(), 1);
}

#[test]
fn statements_are_prepared_once_per_connection() {
    let store = testdb::store();
    let id = TaskId::new();
    store
        .commit(&[Record::Task(record(id, TaskState::Queued))])
        .unwrap();
    for seq in 0..3 {
        store.commit(&[progress(id, seq)]).unwrap();
        store.task(id).unwrap();
        store.events(id, 0, 10).unwrap();
    }
    let reader = store.reader().unwrap();
    // Reading a task, its events and its spec.
    assert_eq!(reader.statements.len(), 3);
    let writer = store.writer().unwrap();
    // The lock, task rows, specs, next_seq, events.
    assert_eq!(writer.statements.len(), 5);
    let prepared: i64 = store
        .run("test", async {
            writer
                .client
                .query_one(
                    "SELECT count(*) FROM pg_prepared_statements
                     WHERE statement NOT LIKE '%pg_prepared_statements%'",
                    &[],
                )
                .await
                .map_err(|e| backend("test", &e))
        })
        .unwrap()
        .get(0);
    assert_eq!(
        prepared, 5,
        "the server holds the writer's (but this count), no more"
    );
}
