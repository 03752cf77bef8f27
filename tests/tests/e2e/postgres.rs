//! The coordinator with its store in PostgreSQL (`--database-url`): a task
//! submitted and run before a restart is read back after it, through the
//! API and from the database itself.

use weft_client::{TaskSpec, TaskState};
use weft_coordinator::store::{PgStore, Store};
use weft_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_run_on_postgres_is_read_back_after_a_coordinator_restart() {
    let url = tokio::task::spawn_blocking(weft_coordinator::store::pg::testdb::database)
        .await
        .expect("a database on the tests' PostgreSQL");
    let cluster = TestCluster::builder()
        .nodes(1)
        .postgres(url.clone())
        .start()
        .await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("echo", "kept in postgres"))
        .await
        .expect("submit");
    let before = cluster.wait_for_final(id).await;
    assert_eq!(before.state, TaskState::Succeeded, "{before:?}");
    assert_eq!(&before.output[..], b"kept in postgres");

    cluster.restart_coordinator().await;
    let client = cluster.client().await;
    let after = client.get(id).await.expect("get after the restart");
    assert_eq!(
        (after.state, &after.output, &after.attempts),
        (before.state, &before.output, &before.attempts)
    );

    // And the database holds it, read with a store of its own once the
    // coordinator is gone (one coordinator per database: it holds the
    // database while it runs): the record and its history, ending with
    // the finished event.
    cluster.shutdown().await;
    let (stored, events) = tokio::task::spawn_blocking(move || {
        let store = PgStore::open(&url).expect("opening the database again");
        let task = store.task(id).expect("reading the task");
        let events = store.events(id, 0, 100).expect("reading its events");
        (task, events)
    })
    .await
    .expect("reading the database");
    let stored = stored.expect("the task is in the database");
    assert_eq!(stored.state, TaskState::Succeeded);
    assert_eq!(&stored.output[..], b"kept in postgres");
    assert_eq!(stored.next_seq, events.len() as u64);
    assert!(
        events.last().is_some_and(|e| e.body.is_finished()),
        "{events:?}"
    );
}
