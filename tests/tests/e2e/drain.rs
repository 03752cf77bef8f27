//! Draining a node through `AdminService.DrainNode`: running work
//! finishes, no new work is taken, and the node leaves.

use std::time::Duration;

use weft_client::{Attempt, Error, NodeState, TaskSpec, TaskState};
use weft_tests::TestCluster;

const NO_LABELS: [(&str, &str); 0] = [];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_finishes_running_work_and_takes_no_new_work() {
    let cluster = TestCluster::builder().nodes(1).slots(2).start().await;
    let client = cluster.client().await;
    let running = client
        .submit(TaskSpec::exec(["sh", "-c", "sleep 1; echo a"]))
        .await
        .expect("submit");
    assert_eq!(cluster.wait_for_running(running).await, "node-0");

    let node = client
        .drain("node-0", Some(Duration::from_secs(10)))
        .await
        .expect("drain");
    assert_eq!(node.state, NodeState::Draining, "{node:?}");
    let later = client
        .submit(TaskSpec::call("noop", "later"))
        .await
        .expect("submit");

    let done = cluster.wait_for_final(running).await;
    assert_eq!(
        (done.state, done.attempt),
        (TaskState::Succeeded, Attempt(1)),
        "{done:?}"
    );
    assert_eq!(done.node_name.as_deref(), Some("node-0"));
    let waiting = client.get(later).await.expect("get");
    assert_eq!(
        waiting.state,
        TaskState::Queued,
        "the draining node took new work: {waiting:?}"
    );

    // Its work done, the node leaves by itself.
    assert!(
        cluster.wait_node_stopped("node-0").await,
        "node-0 did not stop after draining"
    );
    cluster.wait_for_nodes(0).await;

    let fresh = cluster.add_node(1, NO_LABELS).await;
    let later = cluster.wait_for_final(later).await;
    assert_eq!(later.state, TaskState::Succeeded, "{later:?}");
    assert_eq!(later.node_name.as_deref(), Some(fresh.as_str()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_past_its_grace_requeues_the_running_attempt() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("sleep", "1500ms").max_attempts(3))
        .await
        .expect("submit");
    assert_eq!(cluster.wait_for_running(id).await, "node-0");
    let other = cluster.add_node(1, NO_LABELS).await;

    client
        .drain("node-0", Some(Duration::from_millis(200)))
        .await
        .expect("drain");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        done.state,
        TaskState::Succeeded,
        "not CANCELLED: no client asked: {done:?}"
    );
    assert_eq!(done.attempt, Attempt(2), "{done:?}");
    assert_eq!(done.node_name.as_deref(), Some(other.as_str()));
    assert!(cluster.wait_node_stopped("node-0").await);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_an_unknown_node_is_not_found() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let err = client
        .drain("no-such-node", None)
        .await
        .expect_err("unknown node");
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    cluster.shutdown().await;
}
