//! The coordinator with its store in PostgreSQL (`--database-url`): a task
//! submitted and run before a restart is read back after it, through the
//! API and from the database itself; and two coordinators on one
//! database, one active and one standby that takes over when the active
//! is killed, stops because its database session ended, or is frozen.

use std::time::{Duration, Instant};

use weft_client::{Client, TaskSpec, TaskState};
use weft_coordinator::store::{PgStore, Store};
use weft_proto::TaskId;
use weft_tests::{StandbyCoordinator, TestCluster, default_timeout, wait_for};

/// A cluster of processes, with one node, on a new database of the tests'
/// PostgreSQL; and the database's URL.
async fn processes_on_a_database() -> (TestCluster, String) {
    let url = tokio::task::spawn_blocking(weft_coordinator::store::pg::testdb::database)
        .await
        .expect("a database on the tests' PostgreSQL");
    let cluster = TestCluster::builder()
        .nodes(1)
        .processes()
        .postgres(url.clone())
        .start()
        .await;
    (cluster, url)
}

/// A cluster of processes on a database of its own with one node, which
/// ran a task echoing `input`, and a standby waiting beside its
/// coordinator: the cluster, the standby, the database's URL, the task.
async fn active_with_standby(input: &str) -> (TestCluster, StandbyCoordinator, String, TaskId) {
    let (cluster, url) = processes_on_a_database().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("echo", input.to_owned()))
        .await
        .expect("submit");
    assert_eq!(cluster.wait_for_final(id).await.state, TaskState::Succeeded);
    let standby = cluster.start_standby().await;
    standby.wait_standby().await;
    (cluster, standby, url, id)
}

/// The cluster's node, started again dialing the new active at `url`
/// (`other` is a client of it) with the identity it joined the first
/// with, registers there and runs a new task echoing `input`.
async fn moved_node_runs_work(cluster: &TestCluster, other: &Client, url: &str, input: &str) {
    let node = cluster.node_names().remove(0);
    cluster.restart_node_at(&node, url).await;
    let nodes = wait_for(default_timeout(), || async {
        other
            .nodes()
            .await
            .ok()
            .filter(|nodes| nodes.iter().any(|n| n.name == node))
    })
    .await;
    assert!(nodes.is_ok(), "{node} never registered with the new active");
    let next = other
        .submit(TaskSpec::call("echo", input.to_owned()))
        .await
        .expect("submit on the new active");
    let done = wait_for(default_timeout(), || async {
        other
            .get(next)
            .await
            .ok()
            .filter(|task| task.state.is_final())
    })
    .await
    .expect("the new task finishes");
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(&done.output[..], input.as_bytes());
    assert_eq!(done.node_name.as_deref(), Some(node.as_str()));
}

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
    // coordinator is gone (one active coordinator per database: a store
    // opened while it runs would wait as a standby): the record and its
    // history, ending with the finished event.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_coordinator_takes_over_when_the_active_is_killed() {
    let (cluster, _) = processes_on_a_database().await;
    // A standby told to stop while it waits exits 0 at once.
    let idle = cluster.start_standby().await;
    idle.wait_standby().await;
    assert!(
        idle.stop(Duration::from_secs(3)).await,
        "a waiting standby did not exit 0 on SIGTERM"
    );
    let mut standby = cluster.start_standby().await;
    standby.wait_standby().await;
    // A standby does not listen: nodes and clients dialing it are
    // refused at once and try the next address.
    let refused = tokio::net::TcpStream::connect(standby.addr()).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the standby's port answered"
    );

    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("echo", "before the failover"))
        .await
        .expect("submit on the active");
    let before = cluster.wait_for_final(id).await;
    assert_eq!(before.state, TaskState::Succeeded, "{before:?}");

    let killed = Instant::now();
    cluster.kill_coordinator().await;
    let addr = standby.wait_serving().await;
    let serving = killed.elapsed();
    assert_eq!(addr, standby.addr());
    // Its serving certificate is from the database's CA: the cluster's
    // ca.pem (written by the first coordinator) is trusted for it.
    let other = cluster.client_at(&standby.url()).await;
    let after = other.get(id).await.expect("get on the new active");
    let answered = killed.elapsed();
    eprintln!(
        "failover: the standby served {serving:?} after the active's kill -9, and answered {answered:?} after it"
    );
    assert_eq!(
        (after.state, &after.output, &after.attempts),
        (before.state, &before.output, &before.attempts)
    );

    // The node, started again dialing the new active with the identity it
    // joined the first with, runs new work there.
    moved_node_runs_work(&cluster, &other, &standby.url(), "after the failover").await;
    // Nothing ran twice: the first task kept its one attempt.
    let first = other.get(id).await.expect("get");
    assert_eq!(first.attempts, before.attempts);

    assert!(
        standby.stop(Duration::from_secs(10)).await,
        "the new active did not stop cleanly on SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_whose_database_session_ends_stops_and_a_standby_takes_over() {
    use weft_coordinator::store::pg::{lease, testdb};
    let (cluster, mut standby, url, id) = active_with_standby("kept").await;

    // The database ends the active's session, as it does for one cut off
    // (`pg_terminate_backend` here): the active stops within its lease,
    // saying why, with exit status 75, and the standby takes over.
    let ended = tokio::task::spawn_blocking(move || testdb::end_the_active_session(&url))
        .await
        .expect("ending the session");
    assert_eq!(ended, 1);
    let at = Instant::now();
    let (status, log) = cluster
        .wait_coordinator_exit(lease::LEASE + lease::CHECK_EVERY)
        .await;
    eprintln!(
        "the active stopped {:?} after its session ended",
        at.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(weft_coordinator::EXIT_LOST_DATABASE),
        "{log}"
    );
    assert!(
        log.contains("lost the database") && log.contains("a standby may take over"),
        "{log}"
    );
    standby.wait_serving().await;
    let other = cluster.client_at(&standby.url()).await;
    let task = other.get(id).await.expect("get on the new active");
    assert_eq!(&task.output[..], b"kept");
    assert!(standby.stop(Duration::from_secs(10)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_ends_the_session_of_a_frozen_active_and_takes_over() {
    use nix::sys::signal::Signal;
    use weft_coordinator::store::pg::lease;
    let (cluster, mut standby, _, id) = active_with_standby("before the freeze").await;

    // Frozen, as a paused VM is: its kernel keeps the database session
    // open, so only the standby can end it, and only once it has been
    // silent for SILENT_AFTER (a live active checks every second).
    cluster.signal_coordinator(Signal::SIGSTOP);
    let frozen = Instant::now();
    standby.wait_serving().await;
    let took = frozen.elapsed();
    eprintln!("a standby served {took:?} after the active froze");
    assert!(
        took >= lease::SILENT_AFTER,
        "the standby took over {took:?} after the freeze, before the active's session was silent for {:?}",
        lease::SILENT_AFTER
    );
    assert!(
        standby.log_text().contains("silent for"),
        "{}",
        standby.log_text()
    );
    let other = cluster.client_at(&standby.url()).await;
    let task = other.get(id).await.expect("get on the new active");
    assert_eq!(&task.output[..], b"before the freeze");

    // Let go, the frozen one finds its lease long run out and its session
    // gone: it stops, exit 75, and serves nothing more.
    cluster.signal_coordinator(Signal::SIGCONT);
    let (status, log) = cluster
        .wait_coordinator_exit(lease::CHECK_EVERY + lease::STOP_MARGIN)
        .await;
    assert_eq!(
        status.code(),
        Some(weft_coordinator::EXIT_LOST_DATABASE),
        "{log}"
    );
    moved_node_runs_work(&cluster, &other, &standby.url(), "after the freeze").await;
    assert!(standby.stop(Duration::from_secs(10)).await);
}
