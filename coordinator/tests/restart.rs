//! Durability over a real socket: a coordinator on a data dir is stopped
//! and started again on the same dir, and a fake node (the generated node
//! client) reconnects the way `weft-node` does.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{DEADLINE, FakeNode, channel, connect};
use weft_coordinator::{CoordinatorConfig, RunningCoordinator};
use weft_proto::pb::admin_service_client::AdminServiceClient;
use weft_proto::pb::node_message::Body as In;
use weft_proto::pb::task_service_client::TaskServiceClient;
use weft_proto::{TaskSpec, TaskState, pb};

fn config(dir: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_millis(500),
        data_dir: Some(dir.to_owned()),
        // Restart behaviour, not tokens (tested end to end in weft-tests).
        auth: false,
        ..CoordinatorConfig::default()
    }
}

/// Starts a coordinator on a fresh port. The previous one on the same dir
/// may still be closing its file for a moment after `shutdown`: retry while
/// the dir is locked, up to the deadline.
async fn coordinator(config: CoordinatorConfig) -> RunningCoordinator {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        match weft_coordinator::start(config.clone(), listener).await {
            Ok(c) => return c,
            Err(err) if err.to_string().contains("in use") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("coordinator did not start: {err}"),
        }
    }
}

fn register(previous_node_id: &str, running: &[(&str, u32)]) -> pb::Register {
    pb::Register {
        name: "n1".into(),
        slots: 1,
        handlers: vec!["noop".into()],
        protocol_version: pb::ProtocolVersion::ProtocolVersion1 as i32,
        running: running
            .iter()
            .map(|(task_id, attempt)| pb::AttemptRef {
                task_id: (*task_id).into(),
                attempt: *attempt,
            })
            .collect(),
        previous_node_id: previous_node_id.into(),
        ..Default::default()
    }
}

async fn submit(url: String, specs: Vec<TaskSpec>) -> Vec<String> {
    TaskServiceClient::new(channel(url).await)
        .submit(pb::SubmitRequest {
            tasks: specs.into_iter().map(pb::TaskSpec::from).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .task_ids
}

async fn get(url: &str, id: &str) -> Result<pb::Task, tonic::Status> {
    let mut tasks = TaskServiceClient::new(channel(url.to_owned()).await);
    let response = tasks.get(pb::GetRequest { task_id: id.into() }).await?;
    Ok(response.into_inner().task.expect("a task"))
}

/// Polls the task until `check` holds or the deadline passes.
async fn wait_for(url: &str, id: &str, check: impl Fn(&pb::Task) -> bool) -> pb::Task {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let task = get(url, id).await.unwrap();
        if check(&task) {
            return task;
        }
        assert!(Instant::now() < deadline, "task never got there: {task:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn state(task: &pb::Task) -> TaskState {
    TaskState::try_from(task.state).unwrap()
}

/// Node n1 runs the first of three submitted tasks (it reported Started).
async fn one_running_two_queued(c: &RunningCoordinator) -> (FakeNode, Vec<String>) {
    let mut node = connect(c.url(), In::Register(register("", &[])))
        .await
        .unwrap();
    node.credits(1).await;
    let ids = submit(c.url(), vec![TaskSpec::call("noop", "x"); 3]).await;
    assert_eq!(node.assigned_ids().await, [(ids[0].clone(), 1)]);
    node.event(
        &ids[0],
        1,
        pb::node_task_event::Body::Started(pb::Started { pid: 0 }),
    )
    .await;
    wait_for(&c.url(), &ids[0], |t| state(t) == TaskState::Running).await;
    (node, ids)
}

#[tokio::test]
async fn after_a_restart_a_running_attempt_finishes_once_and_queued_tasks_remain() {
    let dir = tempfile::tempdir().unwrap();
    let c1 = coordinator(config(dir.path())).await;
    let (node, ids) = one_running_two_queued(&c1).await;
    let node_id = node.node_id.clone();
    c1.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(node);

    let c2 = coordinator(config(dir.path())).await;
    let url = c2.url();
    let running = get(&url, &ids[0]).await.unwrap();
    assert_eq!((state(&running), running.attempt), (TaskState::Running, 1));
    for id in &ids[1..] {
        assert_eq!(state(&get(&url, id).await.unwrap()), TaskState::Queued);
    }

    // The node reconnects under its id, still running attempt 1, and
    // reports the result it had when the coordinator went away.
    let mut node = connect(
        url.clone(),
        In::Register(register(&node_id, &[(&ids[0], 1)])),
    )
    .await
    .unwrap();
    assert_eq!(node.node_id, node_id);
    node.finished(&ids[0], 1).await;
    let done = wait_for(&url, &ids[0], |t| state(t).is_final()).await;
    assert_eq!(
        (
            state(&done),
            done.attempt,
            done.node_losses,
            done.last_outcome
        ),
        (TaskState::Succeeded, 1, 0, pb::Outcome::Succeeded as i32)
    );
    assert_eq!(&done.output[..], b"done");

    // Redelivered once more (as a node does after re-registering): ignored
    // quietly, so the next message is the next assignment, not a Cancel.
    node.finished(&ids[0], 1).await;
    node.credits(1).await;
    assert_eq!(node.assigned_ids().await, [(ids[1].clone(), 1)]);
    let mut admin = AdminServiceClient::new(channel(url.clone()).await);
    let info = admin
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.stale_events_refused, info.recovered_attempts), (0, 1));

    // The history from before the restart is there, seqs without gaps.
    let mut tasks = TaskServiceClient::new(channel(url.clone()).await);
    let mut events = tasks
        .watch(pb::WatchRequest {
            task_id: ids[0].clone(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(event) = tokio::time::timeout(DEADLINE, events.message())
        .await
        .unwrap()
        .unwrap()
    {
        seqs.push(event.seq);
    }
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        seqs.len(),
        5,
        "queued, assigned, running, succeeded, finished"
    );
    c2.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn after_a_restart_an_absent_nodes_attempt_is_requeued_only_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_millis(800);
    let config = CoordinatorConfig {
        restart_grace: Some(grace),
        ..config(dir.path())
    };
    let c1 = coordinator(config.clone()).await;
    let (node, ids) = one_running_two_queued(&c1).await;
    c1.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(node);

    let started = Instant::now();
    let c2 = coordinator(config).await;
    let requeued = wait_for(&c2.url(), &ids[0], |t| t.attempt == 2).await;
    assert!(
        started.elapsed() >= grace,
        "requeued after {:?}, before the grace",
        started.elapsed()
    );
    assert_eq!(
        (state(&requeued), requeued.node_losses),
        (TaskState::Queued, 1)
    );
    c2.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_node_back_without_its_attempts_gets_them_requeued_at_once_and_only_a_started_one_counts_as_lost()
 {
    let dir = tempfile::tempdir().unwrap();
    // A long grace: what follows must not wait for it.
    let config = CoordinatorConfig {
        restart_grace: Some(Duration::from_secs(600)),
        ..config(dir.path())
    };
    let c1 = coordinator(config.clone()).await;
    let two_slots = |previous: &str| pb::Register {
        slots: 2,
        ..register(previous, &[])
    };
    let mut node = connect(c1.url(), In::Register(two_slots("")))
        .await
        .unwrap();
    node.credits(2).await;
    let ids = submit(c1.url(), vec![TaskSpec::call("noop", "x"); 2]).await;
    let mut assigned = node.assigned_ids().await;
    if assigned.len() < 2 {
        assigned.extend(node.assigned_ids().await);
    }
    assert_eq!(assigned, [(ids[0].clone(), 1), (ids[1].clone(), 1)]);
    // The first one started; the second one's Assign is as good as lost.
    node.event(
        &ids[0],
        1,
        pb::node_task_event::Body::Started(pb::Started { pid: 0 }),
    )
    .await;
    wait_for(&c1.url(), &ids[0], |t| state(t) == TaskState::Running).await;
    let node_id = node.node_id.clone();
    c1.shutdown(Duration::from_secs(5)).await.unwrap();
    drop(node);

    // Back under its id, running neither.
    let c2 = coordinator(config).await;
    let url = c2.url();
    let _node = connect(url.clone(), In::Register(two_slots(&node_id)))
        .await
        .unwrap();
    let started = wait_for(&url, &ids[0], |t| t.attempt == 2).await;
    let never_arrived = wait_for(&url, &ids[1], |t| t.attempt == 2).await;
    assert_eq!(
        (state(&started), started.node_losses, started.failures),
        (TaskState::Queued, 1, 0),
        "it ran on that node and is gone: a node loss"
    );
    assert_eq!(
        (
            state(&never_arrived),
            never_arrived.node_losses,
            never_arrived.failures
        ),
        (TaskState::Queued, 0, 0),
        "it never reached the node: it costs the task nothing"
    );
    c2.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn every_acknowledged_submit_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c1 = coordinator(config(dir.path())).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.extend(submit(c1.url(), vec![TaskSpec::call("noop", ""); 200]).await);
    }
    // Not a graceful stop: dropped, as close to a crash as in-process gets.
    drop(c1);
    let c2 = coordinator(config(dir.path())).await;
    let mut tasks = TaskServiceClient::new(channel(c2.url()).await);
    let mut listed = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = tasks
            .list(pb::ListRequest {
                state: pb::TaskState::Queued as i32,
                limit: 300,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.tasks.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    listed.reverse();
    assert_eq!(listed, ids);
    c2.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_second_coordinator_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c1 = coordinator(config(dir.path())).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = weft_coordinator::start(config(dir.path()), listener)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("in use by another coordinator"),
        "{err}"
    );
    c1.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn no_auth_is_refused_on_an_address_other_hosts_reach() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let config = CoordinatorConfig {
        insecure: true,
        ..config(dir.path())
    };
    let err = weft_coordinator::start(config, listener)
        .await
        .expect_err("--no-auth on 0.0.0.0 is refused");
    assert!(err.to_string().contains("refusing --no-auth"), "{err}");
}

#[tokio::test]
async fn finished_tasks_expire_after_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        retention: Duration::from_millis(300),
        ..config(dir.path())
    };
    let c = coordinator(config).await;
    let mut node = connect(c.url(), In::Register(register("", &[])))
        .await
        .unwrap();
    node.credits(1).await;
    let id = submit(c.url(), vec![TaskSpec::call("noop", "")])
        .await
        .remove(0);
    node.assigned_ids().await;
    node.finished(&id, 1).await;
    wait_for(&c.url(), &id, |t| state(t).is_final()).await;
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        match get(&c.url(), &id).await {
            Err(status) => break status,
            Ok(_) => {
                assert!(Instant::now() < deadline, "never expired");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(
        status.message(),
        format!("task {id} expired: finished tasks are removed after 300ms (--retention)")
    );
    let unknown = weft_proto::TaskId::new().to_string();
    let status = get(&c.url(), &unknown).await.unwrap_err();
    assert_eq!(status.message(), format!("task {unknown} not found"));
    c.shutdown(Duration::from_secs(5)).await.unwrap();
}
