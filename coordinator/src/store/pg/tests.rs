//! What only the PostgreSQL store has: a database that outlives the
//! store, a schema opened twice, a standby waiting for the database, the
//! lease, and a server that is not there. The `Store` contract itself
//! runs on it in `store/tests.rs`.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use weft_proto::{Attempt, TaskId, TaskSpec, TaskState};

use super::lease::{CHECK_EVERY, LEASE, SILENT_AFTER, Verdict};
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

/// Opens the database at `url` on a thread of its own, as a standby
/// would: the store, and when it was had, come through the channel.
fn open_in_background(url: &str) -> mpsc::Receiver<(PgStore, Instant)> {
    let (tx, rx) = mpsc::channel();
    let url = url.to_owned();
    std::thread::spawn(move || {
        let store = PgStore::open(&url).expect("opening as a standby");
        let _ = tx.send((store, Instant::now()));
    });
    rx
}

/// How long a test lets a standby show that it waits.
const STILL_WAITING: Duration = Duration::from_millis(600);

#[test]
fn migrations_are_applied_once_however_many_open_at_once() {
    let url = testdb::database();
    // Two stores opening together on a new database: one holds it, the
    // other waits as a standby until the first is gone.
    let (a, b) = (open_in_background(&url), open_in_background(&url));
    let (first, second) = loop {
        if let Ok(first) = a.recv_timeout(Duration::from_millis(50)) {
            break (first, b);
        }
        if let Ok(first) = b.recv_timeout(Duration::from_millis(50)) {
            break (first, a);
        }
    };
    assert!(second.recv_timeout(STILL_WAITING).is_err());
    drop(first);
    drop(
        second
            .recv_timeout(Duration::from_secs(10))
            .expect("the standby takes over"),
    );
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

/// One active coordinator per database: a second waits as a standby while
/// the first holds it, and holds it soon after the first is gone; a
/// coordinator whose write connection was lost does not write again if
/// another took over.
#[test]
fn a_second_coordinator_waits_as_a_standby_and_takes_over_once_the_first_is_gone() {
    let url = testdb::database();
    let first = PgStore::open(&url).unwrap();
    let standby = open_in_background(&url);
    assert!(
        standby.recv_timeout(STILL_WAITING).is_err(),
        "the standby opened while the first held the database"
    );
    let gone = Instant::now();
    drop(first);
    let (second, took) = standby
        .recv_timeout(Duration::from_secs(10))
        .expect("the standby takes over");
    let delay = took - gone;
    eprintln!("the standby held the database {delay:?} after the active let go");
    assert!(delay < Duration::from_secs(2), "{delay:?}");
    let id = TaskId::new();
    second
        .commit(&[Record::Task(record(id, TaskState::Queued))])
        .unwrap();
    // Its write connection is cut (as by a network loss) and a third
    // coordinator, waiting as a standby, takes the database meanwhile:
    // the second's next write is refused, not recorded, and its lease is
    // lost with its session, at once.
    let third = open_in_background(&url);
    *second.writer.lock().unwrap() = None;
    let (third, _) = third
        .recv_timeout(Duration::from_secs(10))
        .expect("the third takes over");
    let refused = second.commit(&[progress(id, 0)]).unwrap_err();
    assert!(
        matches!(refused, StoreError::LostDatabase { .. }),
        "{refused}"
    );
    assert_eq!(third.task(id).unwrap().unwrap().next_seq, 0);
    assert!(matches!(
        second.lease_verdict(Instant::now()),
        Verdict::Lost(_)
    ));
    // The third's writes go on.
    third.commit(&[progress(id, 0)]).unwrap();
}

#[test]
fn a_terminated_session_stops_the_active_within_its_lease_and_a_standby_takes_over() {
    let url = testdb::database();
    let active = Arc::new(PgStore::open(&url).unwrap());
    let standby = open_in_background(&url);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // While its session lives, the watchdog renews the lease past its
    // length and says nothing.
    let cancel = CancellationToken::new();
    let watch = Arc::clone(&active).watch_lease(cancel.clone());
    let quiet = rt.block_on(async { tokio::time::timeout(LEASE + 2 * CHECK_EVERY, watch).await });
    assert!(quiet.is_err(), "the lease was lost: {quiet:?}");
    assert!(standby.try_recv().is_err());

    assert_eq!(testdb::end_the_active_session(&url), 1);
    let ended = Instant::now();
    let watch = Arc::clone(&active).watch_lease(cancel);
    let why = rt
        .block_on(async { tokio::time::timeout(LEASE, watch).await })
        .expect("the watchdog stops the active within its lease")
        .expect("and says why");
    let stopped = ended.elapsed();
    eprintln!("the active's watchdog stopped it {stopped:?} after its session ended: {why}");
    assert!(why.contains("session"), "{why}");
    let (standby, took) = standby
        .recv_timeout(Duration::from_secs(10))
        .expect("the standby takes over");
    eprintln!(
        "the standby held the database {:?} after the active's session ended",
        took - ended
    );
    // The active, if it tried to write now, would be refused.
    let id = TaskId::new();
    assert!(
        active
            .commit(&[Record::Task(record(id, TaskState::Queued))])
            .is_err()
    );
    assert!(standby.task(id).unwrap().is_none());
}

/// A frozen active (SIGSTOP, a paused VM) keeps its session: a standby
/// ends it once it has waited idle for SILENT_AFTER, never while it runs
/// a query however long (a load at start), and never sooner.
#[test]
fn a_standby_ends_the_active_session_once_idle_for_its_bound_never_while_it_runs_a_query() {
    let url = testdb::database();
    let active = PgStore::open(&url).unwrap();
    let busy = SILENT_AFTER + Duration::from_millis(1500);
    // No lease watchdog runs here: the session is busy with one long
    // query, then silent, as a frozen coordinator's would be.
    let standby = std::thread::scope(|scope| {
        let sleeping = scope.spawn(|| {
            let writer = active.writer.lock().unwrap();
            let conn = writer.as_ref().expect("the write connection");
            active
                .run("sleeping", async {
                    conn.client
                        .query("SELECT pg_sleep($1)", &[&busy.as_secs_f64()])
                        .await
                        .map_err(|e| backend("sleeping", &e))
                })
                .expect("the long query runs to its end");
        });
        let standby = open_in_background(&url);
        assert!(
            standby.recv_timeout(busy).is_err(),
            "a standby took over from an active running a query"
        );
        sleeping.join().expect("the long query's thread");
        standby
    });
    let idle = Instant::now();
    let (next, took) = standby
        .recv_timeout(SILENT_AFTER + Duration::from_secs(5))
        .expect("the standby ends the silent session and takes over");
    let after = took - idle;
    eprintln!("the standby took over {after:?} after the active went idle");
    assert!(after >= SILENT_AFTER, "{after:?}");
    // The old active's session is gone: nothing it writes is recorded.
    let id = TaskId::new();
    let refused = active
        .commit(&[Record::Task(record(id, TaskState::Queued))])
        .unwrap_err();
    assert!(
        matches!(refused, StoreError::LostDatabase { .. }),
        "{refused}"
    );
    assert!(next.task(id).unwrap().is_none());
}

#[test]
fn a_standby_stops_waiting_when_told_to() {
    let url = testdb::database();
    let _active = PgStore::open(&url).unwrap();
    let cancel = CancellationToken::new();
    let waiting = {
        let (url, cancel) = (url.clone(), cancel.clone());
        std::thread::spawn(move || PgStore::open_until(&url, &cancel))
    };
    // Waiting as a standby (its session beside the active's two), not
    // told yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    while testdb::coordinator_sessions(&url) < 3 {
        assert!(Instant::now() < deadline, "the standby never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!waiting.is_finished());
    let told = Instant::now();
    cancel.cancel();
    let opened = waiting.join().unwrap().unwrap();
    assert!(opened.is_none());
    assert!(told.elapsed() < Duration::from_secs(2));
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
    // Opened again once it is gone (a store opened beside it would wait).
    drop(store);
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
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
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
    // Refused by a server that answered: no retry mends it.
    assert!(matches!(err, StoreError::Database { .. }), "{err}");
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
fn a_restarted_server_loses_the_active_its_database_and_reads_reconnect() {
    let server = testdb::Server::private();
    let store = PgStore::open(&server.url()).unwrap();
    let id = TaskId::new();
    store
        .commit(&[Record::Task(record(id, TaskState::Queued)), progress(id, 0)])
        .unwrap();
    assert!(store.task(id).unwrap().is_some());

    // Restarted between two commits: both connections were closed. The
    // session that held the coordinator lock is gone, so the store writes
    // nothing more (a standby may hold the database by now) and its lease
    // is lost; reads reconnect.
    server.restart();
    let err = store.commit(&[progress(id, 1)]).unwrap_err();
    assert!(matches!(err, StoreError::LostDatabase { .. }), "{err}");
    assert!(matches!(
        store.lease_verdict(Instant::now()),
        Verdict::Lost(_)
    ));
    assert_eq!(store.task(id).unwrap().unwrap().next_seq, 1);
    assert_eq!(store.events(id, 0, 10).unwrap().len(), 1);

    // Down: every call fails, as a database that cannot be reached, and
    // nothing panics.
    server.stop();
    let err = store.task(id).unwrap_err();
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
    // A client is told to retry later, not that the coordinator broke.
    let status = tonic::Status::from(crate::Error::Store(err));
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let err = store.commit(&[progress(id, 1)]).unwrap_err();
    assert!(matches!(err, StoreError::LostDatabase { .. }), "{err}");
    assert!(matches!(
        store.tokens().unwrap_err(),
        StoreError::Unreachable { .. }
    ));

    // Up again: reads reconnect, and a coordinator started again (a new
    // store) writes.
    server.start();
    assert_eq!(store.task(id).unwrap().unwrap().next_seq, 1);
    drop(store);
    let store = PgStore::open(&server.url()).unwrap();
    store.commit(&[progress(id, 1)]).unwrap();
    assert_eq!(store.task(id).unwrap().unwrap().next_seq, 2);
    assert_eq!(store.events(id, 0, 10).unwrap().len(), 2);
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
    // Reading a task, and its events with its spec.
    assert_eq!(reader.statements.len(), 2);
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

#[test]
fn every_session_asks_the_server_to_end_it_once_silent() {
    let store = testdb::store();
    let settings: Vec<String> = store
        .run("test", async {
            let writer = store.writer()?;
            let mut values = Vec::new();
            for name in [
                "tcp_keepalives_idle",
                "tcp_keepalives_interval",
                "tcp_keepalives_count",
                "tcp_user_timeout",
            ] {
                let row = writer
                    .client
                    .query_one(&format!("SHOW {name}"), &[])
                    .await
                    .map_err(|e| backend("test", &e))?;
                values.push(row.get(0));
            }
            Ok(values)
        })
        .unwrap();
    // Over TCP (the tests' server listens on loopback) the server reports
    // what it set on the socket.
    assert_eq!(settings, ["4", "1", "4", "8000"]);
}

/// `sslmode=verify-full` with `sslrootcert`: both connections are
/// encrypted, and a server whose certificate the given CA did not sign is
/// refused at open.
#[test]
fn verify_full_encrypts_every_connection_and_refuses_a_server_of_another_ca() {
    let server = testdb::Server::private_tls();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        server.url(),
        server.ca_file().display()
    );
    let store = PgStore::open(&url).unwrap();
    let id = TaskId::new();
    store
        .commit(&[Record::Task(record(id, TaskState::Queued))])
        .unwrap();
    assert!(store.task(id).unwrap().is_some());
    const SSL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let reader = store.reader().unwrap();
    let read_ssl: bool = store
        .run("test", async { reader.query_opt("test", SSL, &[]).await })
        .unwrap()
        .expect("a row for this session")
        .get(0);
    let writer = store.writer().unwrap();
    let write_ssl: bool = store
        .run("test", async { writer.query_opt("test", SSL, &[]).await })
        .unwrap()
        .expect("a row for this session")
        .get(0);
    assert!(read_ssl && write_ssl, "read {read_ssl}, write {write_ssl}");
    drop(writer);
    drop(reader);
    drop(store);

    // A CA that did not sign the server's certificate.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other, params.self_signed(&key).unwrap().pem()).unwrap();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        server.url(),
        other.display()
    );
    let Err(err) = PgStore::open(&url) else {
        panic!("a server of another CA was trusted");
    };
    assert!(matches!(err, StoreError::Database { .. }), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

#[test]
fn commits_wait_for_the_servers_disk_even_where_synchronous_commit_is_off() {
    let url = testdb::database();
    testdb::execute(
        &url,
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET synchronous_commit = off', \
         current_database()); END $$",
    );
    assert_eq!(
        testdb::show(&url, "synchronous_commit"),
        "off",
        "a new session reads off"
    );
    let store = PgStore::open(&url).expect("opens");
    let setting = |conn: &Conn| {
        store.run("showing a setting", async {
            let row = conn
                .client
                .query_one("SHOW synchronous_commit", &[])
                .await
                .map_err(|e| backend("showing a setting", &e))?;
            Ok(row.get::<_, String>(0))
        })
    };
    let writer = store.writer().expect("the write session");
    assert_eq!(setting(&writer).expect("shown"), "on", "the write session");
    drop(writer);
    let reader = store.reader().expect("the read session");
    assert_eq!(setting(&reader).expect("shown"), "on", "the read session");
    // A stronger setting is the operator's to keep.
    testdb::execute(
        &url,
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET synchronous_commit = remote_apply', \
         current_database()); END $$",
    );
    drop(store);
    let store = PgStore::open(&url).expect("opens again");
    let writer = store.writer().expect("the write session");
    let shown = store
        .run("showing a setting", async {
            let row = writer
                .client
                .query_one("SHOW synchronous_commit", &[])
                .await
                .map_err(|e| backend("showing a setting", &e))?;
            Ok(row.get::<_, String>(0))
        })
        .expect("shown");
    assert_eq!(shown, "remote_apply");
}

#[test]
fn events_read_while_retention_deletes_the_task_are_all_there_or_none() {
    let url = testdb::database();
    let store = PgStore::open(&url).unwrap();
    let id = TaskId::new();
    store
        .commit(&[
            Record::Task(record(id, TaskState::Succeeded)),
            progress(id, 0),
            progress(id, 1),
        ])
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut side, connection) = rt
        .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
        .unwrap();
    rt.spawn(connection);
    // Another session holds the specs table: a read of the task's events
    // waits for it wherever it needs the spec.
    let tx = rt.block_on(side.transaction()).unwrap();
    rt.block_on(tx.batch_execute("LOCK TABLE task_specs IN ACCESS EXCLUSIVE MODE"))
        .unwrap();
    std::thread::scope(|scope| {
        let read = scope.spawn(|| store.events(id, 0, 10));
        // Polled, not slept for: the read waits for the lock.
        let waiting = "SELECT count(*) FROM pg_locks
            WHERE NOT granted AND relation = 'task_specs'::regclass";
        while rt
            .block_on(tx.query_one(waiting, &[]))
            .unwrap()
            .get::<_, i64>(0)
            == 0
        {
            assert!(!read.is_finished(), "the read did not wait for the lock");
            std::thread::yield_now();
        }
        // Retention deletes the task meanwhile, as `expire` does.
        for delete in [
            "DELETE FROM events WHERE task_id = $1",
            "DELETE FROM task_specs WHERE id = $1",
            "DELETE FROM tasks WHERE id = $1",
        ] {
            rt.block_on(tx.execute(delete, &[&Uuid::from(id)])).unwrap();
        }
        rt.block_on(tx.commit()).unwrap();
        let events = read.join().unwrap().expect("a consistent read");
        assert!(
            events.is_empty() || events.len() == 2,
            "events of one snapshot: {events:?}"
        );
    });
}

#[test]
fn a_list_fetches_rows_only_as_far_as_the_budget_has_room() {
    let ids: Vec<TaskId> = (0..5).map(|_| TaskId::new()).collect();
    let sized = || -> VecDeque<(TaskId, usize)> {
        ids.iter().copied().zip([100, 100, 100, 500, 100]).collect()
    };
    let mut left = sized();
    assert_eq!(take_fitting(&mut left, 250), ids[..2]);
    assert_eq!(
        take_fitting(&mut left, 250),
        ids[2..3],
        "the 500 does not fit"
    );
    assert_eq!(take_fitting(&mut left, 0), ids[3..4], "always one");
    assert_eq!(take_fitting(&mut left, usize::MAX), ids[4..]);
    assert!(take_fitting(&mut left, usize::MAX).is_empty());
    assert_eq!(take_fitting(&mut sized(), usize::MAX), ids);
}
