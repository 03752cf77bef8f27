//! Lost nodes: their attempts go back to the queue as attempt + 1 and run
//! elsewhere; node losses count against max_attempts.

use weft_client::{Attempt, TaskSpec, TaskState};
use weft_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_process_killed_mid_task_leads_to_a_retry_on_another_node() {
    let cluster = TestCluster::builder().nodes(2).processes().start().await;
    let client = cluster.client().await;
    let spec = TaskSpec::exec(["sh", "-c", "sleep 1; echo done"]).max_attempts(3);
    let id = client.submit(spec).await.expect("submit");
    let first = cluster.wait_for_running(id).await;
    cluster.kill_node(&first).await; // SIGKILL of the weft-node process

    let task = cluster.wait_for_final(id).await;
    assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    assert_eq!(task.attempt, Attempt(2), "{task:?}");
    assert_eq!((task.node_losses, task.failures), (1, 0), "{task:?}");
    let second = task.node_name.clone().expect("node of attempt 2");
    assert_ne!(second, first, "attempt 2 ran on the surviving node");
    cluster.wait_for_nodes(1).await;
    let info = client.cluster_info().await.expect("cluster info");
    assert!(info.nodes_lost >= 1, "{info:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_node_requeues_its_attempts() {
    let cluster = TestCluster::builder().nodes(2).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("sleep", "500ms"))
        .await
        .expect("submit");
    let first = cluster.wait_for_running(id).await;
    cluster.kill_node(&first).await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.attempt),
        (TaskState::Succeeded, Attempt(2)),
        "{done:?}"
    );
    assert_ne!(done.node_name.as_deref(), Some(first.as_str()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_attempts_are_used_up_by_node_losses_fails() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("sleep", "30s").max_attempts(1))
        .await
        .expect("submit");
    let node = cluster.wait_for_running(id).await;
    cluster.kill_node(&node).await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Failed, "{done:?}");
    assert_eq!(
        (done.attempt, done.node_losses),
        (Attempt(1), 1),
        "{done:?}"
    );
    assert!(
        done.error.contains("lost"),
        "the error says the node was lost: {done:?}"
    );
    cluster.shutdown().await;
}
