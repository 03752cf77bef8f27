//! Matching tasks to nodes: labels and slots, and the reason a task that
//! no node can take gives for waiting.

use weft_client::{TaskSpec, TaskState};
use weft_tests::TestCluster;

const NO_LABELS: [(&str, &str); 0] = [];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_needing_a_label_no_node_has_waits_with_a_reason_until_one_joins() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("noop", "x").label("gpu", "1"))
        .await
        .expect("submit");
    let waiting = cluster
        .wait_for_task(id, |t| {
            t.state == TaskState::Queued && !t.pending_reason.is_empty()
        })
        .await;
    assert!(
        waiting.pending_reason.contains("gpu=1"),
        "{}",
        waiting.pending_reason
    );

    let gpu = cluster.add_node(1, [("gpu", "1")]).await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(done.node_name.as_deref(), Some(gpu.as_str()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_needing_more_slots_than_any_node_has_waits_with_a_reason() {
    let cluster = TestCluster::builder().nodes(1).slots(2).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("noop", "x").slots(4))
        .await
        .expect("submit");
    let waiting = cluster
        .wait_for_task(id, |t| {
            t.state == TaskState::Queued && !t.pending_reason.is_empty()
        })
        .await;
    let reason = &waiting.pending_reason;
    assert!(
        reason.contains('4') && reason.contains('2') && reason.contains("slots"),
        "{reason}"
    );

    let big = cluster.add_node(4, NO_LABELS).await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.node_name.as_deref()),
        (TaskState::Succeeded, Some(big.as_str()))
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_node_connected_a_task_waits_and_runs_when_one_joins() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("noop", "x"))
        .await
        .expect("submit");
    let waiting = cluster
        .wait_for_task(id, |t| {
            t.state == TaskState::Queued && !t.pending_reason.is_empty()
        })
        .await;
    assert!(
        waiting.pending_reason.contains("no nodes"),
        "{}",
        waiting.pending_reason
    );
    cluster.add_node(1, NO_LABELS).await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_tasks_run_only_on_matching_nodes() {
    let cluster = TestCluster::builder()
        .nodes(3)
        .node_labels(1, [("zone", "b")])
        .start()
        .await;
    let client = cluster.client().await;
    let specs = (0..12)
        .map(|i| TaskSpec::call("noop", format!("{i}")).label("zone", "b"))
        .collect();
    let ids = client.submit_many(specs).await.expect("submit");
    for id in ids {
        let done = cluster.wait_for_final(id).await;
        assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
        assert_eq!(done.node_name.as_deref(), Some("node-1"), "{done:?}");
    }
    let nodes = client.nodes().await.expect("nodes");
    let labelled = nodes
        .iter()
        .find(|n| n.name == "node-1")
        .expect("node-1 listed");
    assert_eq!(labelled.labels.get("zone").map(String::as_str), Some("b"));
    cluster.shutdown().await;
}
