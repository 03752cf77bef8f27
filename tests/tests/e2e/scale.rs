//! Many tasks through a small cluster: every task runs exactly once.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use weft_client::{Attempt, TaskSpec, TaskState};
use weft_tests::{TestCluster, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tasks_on_three_nodes_all_succeed_exactly_once() {
    const TASKS: usize = 1_000;
    let cluster = TestCluster::builder().nodes(3).slots(8).start().await;
    let client = cluster.client().await;
    let started = Instant::now();

    // max_attempts(1): a lost or repeated attempt could not hide behind a retry.
    let specs = (0..TASKS)
        .map(|i| TaskSpec::call("noop", format!("input-{i}")).max_attempts(1))
        .collect();
    let ids = client.submit_many(specs).await.expect("submit_many");
    assert_eq!(ids.len(), TASKS);
    let input_of: HashMap<_, _> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    assert_eq!(input_of.len(), TASKS, "ids are unique");

    let done = wait_until(Duration::from_secs(90), async || {
        client.cluster_info().await.is_ok_and(|info| {
            [
                TaskState::Succeeded,
                TaskState::Failed,
                TaskState::Cancelled,
                TaskState::TimedOut,
            ]
            .iter()
            .map(|s| info.count(*s))
            .sum::<u64>()
                >= TASKS as u64
        })
    })
    .await;
    let info = client.cluster_info().await.expect("cluster info");
    done.unwrap_or_else(|e| panic!("{e}: not all {TASKS} tasks finished: {:?}", info.tasks));
    eprintln!("{TASKS} tasks on 3 nodes in {:?}", started.elapsed());

    let tasks = client.list(None, 2 * TASKS as u32).await.expect("list");
    assert_eq!(
        tasks.len(),
        TASKS,
        "the coordinator lists exactly the submitted tasks"
    );
    let mut per_node: BTreeMap<String, u64> = BTreeMap::new();
    for task in &tasks {
        let i = input_of
            .get(&task.id)
            .unwrap_or_else(|| panic!("unknown task {}", task.id));
        assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
        assert_eq!(task.attempt, Attempt(1), "ran once: {task:?}");
        assert_eq!((task.failures, task.node_losses), (0, 0), "{task:?}");
        assert_eq!(
            task.output,
            format!("input-{i}").as_bytes(),
            "its own result: {task:?}"
        );
        let node = task
            .node_name
            .clone()
            .expect("a succeeded task names its node");
        *per_node.entry(node).or_default() += 1;
    }
    assert_eq!(info.count(TaskState::Succeeded), TASKS as u64);
    assert_eq!(per_node.values().sum::<u64>(), TASKS as u64);

    // The nodes' own counters agree: no attempt ran that was not recorded.
    let nodes = client.nodes().await.expect("nodes");
    let finished: BTreeMap<String, u64> =
        nodes.iter().map(|n| (n.name.clone(), n.finished)).collect();
    assert_eq!(
        finished, per_node,
        "attempts finished per node == tasks recorded per node"
    );
    assert_eq!(per_node.len(), 3, "every node took work: {per_node:?}");
    for node in &nodes {
        assert_eq!(node.slots_used, 0, "{node:?}");
        assert!(node.running.is_empty(), "{node:?}");
    }
    cluster.shutdown().await;
}
