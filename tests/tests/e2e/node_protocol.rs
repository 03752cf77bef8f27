//! The node protocol as any worker sees it, played by a fake node built
//! from the generated stubs: credits bound what it is sent, call tasks go
//! only to nodes serving the handler, and its events reach watchers once.

use std::time::Duration;

use futures::StreamExt;

use weft_client::{Attempt, EventBody, OutputStream, TaskEvent, TaskSpec, TaskState};
use weft_proto::pb::coordinator_message::Body as FromCoordinator;
use weft_proto::pb::node_task_event::Body as NodeEvent;
use weft_proto::{Outcome, TaskId, pb};
use weft_tests::fake_node::register;
use weft_tests::{FakeNode, TestCluster, default_timeout};

/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(500);

/// Task ids of every assignment that arrives until the stream is quiet for [`QUIET`].
async fn drain_assignments(fake: &mut FakeNode) -> Vec<pb::Assignment> {
    let mut got = Vec::new();
    while let Some(msg) = fake.recv(QUIET).await {
        if let FromCoordinator::Assign(assign) = msg {
            got.extend(assign.tasks);
        }
    }
    got
}

async fn history(client: &weft_client::Client, id: TaskId) -> Vec<TaskEvent> {
    let mut events = client.watch(id, 0).await.expect("watch");
    let mut all = Vec::new();
    while let Some(event) = tokio::time::timeout(default_timeout(), events.next())
        .await
        .expect("events in time")
    {
        all.push(event.expect("event"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_never_sent_more_work_than_the_credits_it_granted() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let mut fake = cluster.fake_node(register("fake", 8, &[])).await;
    let _beats = fake.keep_alive(Duration::from_millis(100));
    let specs = (0..6).map(|_| TaskSpec::exec(["true"])).collect();
    client.submit_many(specs).await.expect("submit");

    // No credits yet: nothing.
    assert!(
        drain_assignments(&mut fake).await.is_empty(),
        "assigned without credits"
    );
    fake.grant(2).await;
    let first = drain_assignments(&mut fake).await;
    assert_eq!(first.len(), 2, "2 credits, {} tasks sent", first.len());

    // One attempt ends and its slot comes back: exactly one more.
    let done = &first[0];
    let id: TaskId = done.task_id.parse().expect("task id");
    fake.started(id, done.attempt).await;
    fake.finished(id, done.attempt, Outcome::Succeeded, Some(0), b"")
        .await;
    fake.grant(1).await;
    let second = drain_assignments(&mut fake).await;
    assert_eq!(
        second.len(),
        1,
        "1 credit back, {} tasks sent",
        second.len()
    );
    let task = cluster.wait_for_final(id).await;
    assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_needing_two_slots_uses_two_credits() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let mut fake = cluster.fake_node(register("fake", 4, &[])).await;
    let _beats = fake.keep_alive(Duration::from_millis(100));
    let specs = (0..3).map(|_| TaskSpec::exec(["true"]).slots(2)).collect();
    client.submit_many(specs).await.expect("submit");
    fake.grant(3).await;
    let got = drain_assignments(&mut fake).await;
    assert_eq!(
        got.len(),
        1,
        "3 credits hold one 2-slot task, {} sent",
        got.len()
    );
    fake.grant(1).await;
    let got = drain_assignments(&mut fake).await;
    assert_eq!(
        got.len(),
        1,
        "now 2 credits are free: one more, {} sent",
        got.len()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_goes_only_to_a_node_serving_its_handler() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let mut fake = cluster.fake_node(register("custom", 1, &["shout"])).await;
    let _beats = fake.keep_alive(Duration::from_millis(100));
    fake.grant(1).await;

    let id = client
        .submit(TaskSpec::call("shout", "hi"))
        .await
        .expect("submit");
    let assignment = fake.next_assignment(default_timeout()).await;
    assert_eq!(assignment.task_id, id.to_string());
    let spec = assignment.spec.expect("the assignment carries the spec");
    assert!(
        matches!(&spec.kind, Some(pb::task_spec::Kind::Call(call)) if call.handler == "shout" && &call.input[..] == b"hi"),
        "{spec:?}"
    );
    fake.started(id, assignment.attempt).await;
    fake.finished(id, assignment.attempt, Outcome::Succeeded, None, b"HI")
        .await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(
        (&done.output[..], done.node_name.as_deref()),
        (&b"HI"[..], Some("custom"))
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_output_and_progress_reach_watchers_once_each() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let mut fake = cluster.fake_node(register("fake", 1, &[])).await;
    let _beats = fake.keep_alive(Duration::from_millis(100));
    fake.grant(1).await;
    let id = client
        .submit(TaskSpec::exec(["true"]))
        .await
        .expect("submit");
    let a = fake.next_assignment(default_timeout()).await;
    let chunk = |seq: u64, data: &str| {
        NodeEvent::Output(pb::OutputChunk {
            stream: i32::from(OutputStream::Stdout),
            data: data.as_bytes().to_vec().into(),
            seq,
        })
    };
    fake.started(id, a.attempt).await;
    fake.report(id, a.attempt, chunk(0, "one\n")).await;
    // A chunk sent twice (a resend after a reconnect) is recorded once.
    fake.report(id, a.attempt, chunk(0, "one\n")).await;
    fake.report(
        id,
        a.attempt,
        NodeEvent::Progress(pb::Progress {
            fraction: 0.5,
            message: "half".into(),
        }),
    )
    .await;
    fake.report(id, a.attempt, chunk(1, "two\n")).await;
    fake.finished(id, a.attempt, Outcome::Succeeded, Some(0), b"")
        .await;
    // A second Finished for the same attempt changes nothing.
    fake.finished(id, a.attempt, Outcome::Failed, Some(1), b"")
        .await;

    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.exit_code),
        (TaskState::Succeeded, Some(0)),
        "{done:?}"
    );
    let events = history(&client, id).await;
    let outputs: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Output { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(outputs, ["one\n", "two\n"], "{events:#?}");
    let progress: Vec<(f64, String)> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Progress { fraction, message } => Some((*fraction, message.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(progress, [(0.5, "half".to_owned())]);
    assert_eq!(events.iter().filter(|e| e.finished().is_some()).count(), 1);
    assert!(events.iter().all(|e| e.attempt <= Attempt(1)));
    let after = client.get(id).await.expect("get");
    assert_eq!(
        (after.state, after.exit_code),
        (TaskState::Succeeded, Some(0))
    );
    cluster.shutdown().await;
}

/// A fake node named `name` (joined, heartbeating, one slot) running
/// attempt 1 of a new exec task: its identity, the node, its heartbeats
/// and the task.
async fn started_on_a_fake(
    cluster: &TestCluster,
    client: &weft_client::Client,
    name: &str,
) -> (
    Option<weft_tests::fake_node::Joined>,
    FakeNode,
    tokio::task::JoinHandle<()>,
    TaskId,
) {
    let joined = cluster.join_fake(name).await;
    let mut fake = cluster
        .connect_fake(joined.as_ref(), register(name, 1, &[]))
        .await;
    let beats = fake.keep_alive(Duration::from_millis(100));
    fake.grant(1).await;
    let id = client
        .submit(TaskSpec::exec(["true"]).max_attempts(1))
        .await
        .expect("submit");
    let assignment = fake.next_assignment(default_timeout()).await;
    assert_eq!(assignment.task_id, id.to_string());
    fake.started(id, 1).await;
    (joined, fake, beats, id)
}

/// Closes `fake`'s stream and connects it again as the same node, listing
/// attempt 1 of `id` as still its own (as a node does after a break).
async fn dial_again(
    cluster: &TestCluster,
    joined: Option<&weft_tests::fake_node::Joined>,
    fake: FakeNode,
    name: &str,
    id: TaskId,
) -> FakeNode {
    let previous_node_id = fake.node_id.clone();
    drop(fake);
    let again = pb::Register {
        running: vec![pb::AttemptRef {
            task_id: id.to_string(),
            attempt: 1,
        }],
        previous_node_id,
        ..register(name, 1, &[])
    };
    cluster.connect_fake(joined, again).await
}

/// Reports output chunk `seq` (`c{seq}\n`) of attempt 1 of `id`.
async fn chunk(fake: &FakeNode, id: TaskId, seq: u64) -> bool {
    let chunk = pb::OutputChunk {
        stream: pb::OutputStream::Stdout as i32,
        data: format!("c{seq}\n").into_bytes().into(),
        seq,
    };
    fake.report(id, 1, NodeEvent::Output(chunk)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_sent_again_after_a_coordinator_crash_is_recorded_once() {
    let cluster = TestCluster::builder()
        .processes()
        .durable()
        .nodes(0)
        .start()
        .await;
    let client = cluster.client().await;
    let (joined, fake, beats, id) = started_on_a_fake(&cluster, &client, "resender").await;
    for seq in 0..3 {
        assert!(chunk(&fake, id, seq).await);
    }
    // Recorded (a watcher sees all three), then the coordinator is killed.
    let mut events = client.watch(id, 0).await.expect("watch");
    let mut seen = 0;
    while seen < 3 {
        let event = tokio::time::timeout(default_timeout(), events.next())
            .await
            .expect("output in time")
            .expect("the stream goes on")
            .expect("an event");
        if matches!(event.body, EventBody::Output { .. }) {
            seen += 1;
        }
    }
    drop(events);
    cluster.crash_and_restart_coordinator().await;
    beats.abort();
    // The node comes back with its attempt, sends what it sent before
    // again (the coordinator could have died before recording it), then
    // what is new, then the result.
    let back = dial_again(&cluster, joined.as_ref(), fake, "resender", id).await;
    let _beats = back.keep_alive(Duration::from_millis(100));
    for seq in 0..4 {
        assert!(chunk(&back, id, seq).await);
    }
    back.finished(id, 1, Outcome::Succeeded, Some(0), b"").await;
    let done = client.wait(id).await.expect("wait");
    assert_eq!(
        (done.state, done.attempt),
        (TaskState::Succeeded, Attempt(1))
    );
    let output: String = history(&client, id)
        .await
        .iter()
        .filter_map(|event| match &event.body {
            EventBody::Output { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(output, "c0\nc1\nc2\nc3\n", "each chunk once, in order");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_stream_breaks_for_a_moment_carries_on_its_attempt() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let (joined, fake, beats, id) = started_on_a_fake(&cluster, &client, "flaky").await;
    cluster.wait_for_state(id, TaskState::Running).await;
    // A node with room, which would get the task if it were requeued.
    let spare = cluster.add_node(1, Vec::<(String, String)>::new()).await;

    // The stream breaks; the node dials again at once, listing its attempt.
    beats.abort();
    let back = dial_again(&cluster, joined.as_ref(), fake, "flaky", id).await;
    let _beats = back.keep_alive(Duration::from_millis(100));
    back.finished(id, 1, Outcome::Succeeded, Some(0), b"").await;
    let done = client.wait(id).await.expect("wait");
    assert_eq!(
        (done.state, done.attempt, done.node_losses),
        (TaskState::Succeeded, Attempt(1), 0),
        "{done:?}"
    );
    assert_eq!(
        done.node_name.as_deref(),
        Some("flaky"),
        "not run on {spare}"
    );
    let info = client.cluster_info().await.expect("info");
    assert_eq!(
        (info.reclaimed_attempts, info.nodes_lost),
        (1, 0),
        "{info:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_not_back_within_the_reconnect_grace_has_its_attempt_run_elsewhere() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let mut fake = cluster.fake_node(register("gone", 1, &[])).await;
    let beats = fake.keep_alive(Duration::from_millis(100));
    fake.grant(1).await;
    let id = client
        .submit(TaskSpec::exec(["true"]).max_attempts(3))
        .await
        .expect("submit");
    fake.next_assignment(default_timeout()).await;
    fake.started(id, 1).await;
    cluster.wait_for_state(id, TaskState::Running).await;
    let spare = cluster.add_node(1, Vec::<(String, String)>::new()).await;
    beats.abort();
    drop(fake);
    let done = client.wait(id).await.expect("wait");
    assert_eq!(
        (done.state, done.attempt, done.node_losses),
        (TaskState::Succeeded, Attempt(2), 1),
        "{done:?}"
    );
    assert_eq!(done.node_name.as_deref(), Some(spare.as_str()));
    let info = client.cluster_info().await.expect("info");
    assert_eq!(info.nodes_lost, 1, "{info:?}");
    cluster.shutdown().await;
}
