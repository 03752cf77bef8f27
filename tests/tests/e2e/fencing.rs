//! Fencing and the node protocol's rules, played by a fake node: a result
//! for an attempt that is no longer current is refused and never recorded.

use std::time::Duration;

use futures::StreamExt;
use tonic::Code;

use weft_client::{Attempt, EventBody, TaskSpec, TaskState};
use weft_proto::pb::node_message::Body as ToCoordinator;
use weft_proto::{Outcome, pb};
use weft_tests::fake_node::register;
use weft_tests::{TestCluster, default_timeout, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_attempts_result_is_refused() {
    let cluster = TestCluster::builder()
        .nodes(0)
        .heartbeat(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_secs(1))
        .start()
        .await;
    let client = cluster.client().await;

    // The fake node takes attempt 1 and reports it started.
    let joined = cluster.join_fake("fake").await;
    let mut fake = cluster
        .connect_fake(joined.as_ref(), register("fake", 1, &[]))
        .await;
    let beats = fake.keep_alive(Duration::from_millis(100));
    fake.grant(1).await;
    let spec = TaskSpec::exec(["sh", "-c", "sleep 1; echo real"]).max_attempts(3);
    let id = client.submit(spec).await.expect("submit");
    let assignment = fake.next_assignment(default_timeout()).await;
    assert_eq!(
        (assignment.task_id.clone(), assignment.attempt),
        (id.to_string(), 1)
    );
    fake.started(id, 1).await;
    let running = cluster.wait_for_state(id, TaskState::Running).await;
    assert_eq!(running.node_name.as_deref(), Some("fake"));

    // A real node joins; the fake goes silent and is declared lost, so the
    // task runs again on the real node as attempt 2.
    let real = cluster.add_node(1, Vec::<(String, String)>::new()).await;
    beats.abort();
    let retried = cluster
        .wait_for_task(id, |t| {
            t.attempt == Attempt(2) && t.state == TaskState::Running
        })
        .await;
    assert_eq!(
        retried.node_name.as_deref(),
        Some(real.as_str()),
        "{retried:?}"
    );

    // The fake comes back (as a partitioned node would) and reports that
    // attempt 1 finished: refused, counted, and answered with Cancel.
    // Lost by its silence: its stream is still open.
    let info = client.cluster_info().await.expect("cluster info");
    assert!(info.nodes_lost >= 1, "{info:?}");
    let old_id = fake.node_id.clone();
    drop(fake);
    let mut again = register("fake", 1, &[]);
    again.previous_node_id = old_id;
    again.running = vec![pb::AttemptRef {
        task_id: id.to_string(),
        attempt: 1,
    }];
    let mut fake = cluster.connect_fake(joined.as_ref(), again).await;
    let _beats = fake.keep_alive(Duration::from_millis(100));
    fake.finished(id, 1, Outcome::Succeeded, Some(42), b"fake")
        .await;
    wait_until(default_timeout(), async || {
        client
            .cluster_info()
            .await
            .is_ok_and(|info| info.stale_events_refused > 0)
    })
    .await
    .expect("the stale Finished is counted as refused");
    let cancel = fake
        .next_cancel(default_timeout())
        .await
        .expect("the fake node is told to cancel its stale attempt");
    assert_eq!(
        (cancel.task_id.as_str(), cancel.attempt),
        (id.to_string().as_str(), 1)
    );

    let now = client.get(id).await.expect("get");
    assert_eq!(now.attempt, Attempt(2), "{now:?}");
    assert_ne!(
        now.exit_code,
        Some(42),
        "the stale result was recorded: {now:?}"
    );

    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(
        (done.attempt, done.exit_code),
        (Attempt(2), Some(0)),
        "{done:?}"
    );
    assert_eq!(done.node_name.as_deref(), Some(real.as_str()));
    assert_eq!(done.node_losses, 1, "{done:?}");
    assert!(
        done.output.is_empty(),
        "exec tasks have no handler output: {done:?}"
    );
    // Nothing of attempt 1's report is in the history.
    let mut history = client.watch(id, 0).await.expect("watch");
    let mut finished = 0;
    while let Some(event) = history.next().await {
        let event = event.expect("event");
        if let EventBody::Finished(task) = &event.body {
            finished += 1;
            assert_eq!(task.attempt, Attempt(2));
        }
        if event.attempt == Attempt(1) {
            assert!(
                matches!(event.body, EventBody::State { .. }),
                "only state changes of attempt 1 are recorded: {event:?}"
            );
        }
    }
    assert_eq!(finished, 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reporting_an_attempt_it_was_never_given_is_refused() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    // Connected and alive, but grants no credits: it never gets work.
    let mut fake = cluster.fake_node(register("intruder", 1, &[])).await;
    let _beats = fake.keep_alive(Duration::from_millis(100));

    let id = client
        .submit(TaskSpec::exec(["sh", "-c", "sleep 0.5"]))
        .await
        .expect("submit");
    cluster.wait_for_running(id).await;
    fake.finished(id, 1, Outcome::Failed, Some(9), b"").await;
    wait_until(default_timeout(), async || {
        client
            .cluster_info()
            .await
            .is_ok_and(|info| info.stale_events_refused > 0)
    })
    .await
    .expect("the intruder's event is refused");
    assert!(
        fake.next_cancel(default_timeout()).await.is_some(),
        "the intruder gets Cancel"
    );
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.attempt, done.exit_code),
        (TaskState::Succeeded, Attempt(1), Some(0))
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_message_other_than_register_is_invalid_argument() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let refused = cluster
        .open_raw("early", ToCoordinator::Heartbeat(pb::Heartbeat {}))
        .await;
    let Err(status) = refused else {
        panic!("a Heartbeat first is refused")
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_with_zero_slots_is_invalid_argument() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let refused = cluster
        .open_raw("empty", ToCoordinator::Register(register("empty", 0, &[])))
        .await;
    let Err(status) = refused else {
        panic!("slots 0 is refused")
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("slots"), "{status:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_with_an_unknown_protocol_version_is_failed_precondition() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let mut reg = register("future", 1, &[]);
    reg.protocol_version = 7;
    let refused = cluster
        .open_raw("future", ToCoordinator::Register(reg))
        .await;
    let Err(status) = refused else {
        panic!("version 7 is refused")
    };
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    cluster.shutdown().await;
}
