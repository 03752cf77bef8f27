//! A node never runs more than its slots' worth of attempts at once, and never
//! idles while work waits because a credit it granted went missing.
//!
//! Each probe task registers itself with a marker file in a shared folder,
//! counts the markers, logs the count, holds its slot for a moment and
//! removes its marker. Of any set of attempts that overlap in time, the
//! last to start sees all of them, so the largest logged count is the
//! largest concurrency, and would exceed the slots if the limit broke.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use weft_client::{TaskSpec, TaskState};
use weft_tests::TestCluster;

const PROBE: &str = r#"d="$1"; touch "$d/run.$$"; n=$(ls "$d" | grep -c '^run\.'); echo "$n" >> "$d/counts"; sleep 0.3; rm -f "$d/run.$$""#;

fn probe(dir: &Path) -> TaskSpec {
    TaskSpec::exec(["sh", "-c", PROBE, "sh", &dir.display().to_string()])
}

fn max_count(dir: &Path) -> u32 {
    let text = std::fs::read_to_string(dir.join("counts")).expect("probes wrote counts");
    let counts: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    counts.into_iter().max().expect("at least one count")
}

async fn run_probes(cluster: &TestCluster, dir: &Path, n: usize, slots_each: u32) {
    std::fs::create_dir_all(dir).expect("probe dir");
    let client = cluster.client().await;
    let specs = (0..n).map(|_| probe(dir).slots(slots_each)).collect();
    let ids = client.submit_many(specs).await.expect("submit");
    for id in ids {
        let task = cluster.wait_for_final(id).await;
        assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_never_runs_more_attempts_than_its_slots() {
    let cluster = TestCluster::builder().nodes(1).slots(3).start().await;
    let client = cluster.client().await;
    let dir = cluster.dir().join("probe");

    // The coordinator's own view, sampled while the probes run.
    let max_used = Arc::new(AtomicU32::new(0));
    let sampler = {
        let (client, max_used) = (client.clone(), max_used.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(nodes) = client.nodes().await {
                    for node in nodes {
                        max_used.fetch_max(node.slots_used, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
    };
    run_probes(&cluster, &dir, 9, 1).await;
    sampler.abort();

    let max = max_count(&dir);
    assert!(max <= 3, "{max} attempts ran at once on a 3-slot node");
    assert_eq!(
        max, 3,
        "9 queued probes should fill all 3 slots at some point"
    );
    let used = max_used.load(Ordering::SeqCst);
    assert!(used <= 3, "AdminService reported {used} slots used of 3");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_needing_two_slots_takes_two_of_its_nodes_slots() {
    let cluster = TestCluster::builder().nodes(1).slots(3).start().await;
    let dir = cluster.dir().join("probe");
    run_probes(&cluster, &dir, 4, 2).await;
    let max = max_count(&dir);
    assert_eq!(max, 1, "two 2-slot tasks ran at once on a 3-slot node");
    cluster.shutdown().await;
}

/// A node with more prefetch than the coordinator allows (the default 256
/// per slot past `--max-node-slots`) grants credits the coordinator cannot
/// use at once. They are kept, not dropped: after a burst of short tasks
/// (which makes the node prefetch all it may) then slower ones (which make
/// it hold back its grants), every task still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_granting_past_its_capped_prefetch_keeps_getting_work() {
    let cluster = TestCluster::builder()
        .nodes(1)
        .slots(8)
        .max_node_slots(8)
        .start()
        .await;
    let client = cluster.client().await;
    for specs in [
        (0..200)
            .map(|i| TaskSpec::call("noop", i.to_string()))
            .collect::<Vec<_>>(),
        (0..200).map(|_| TaskSpec::call("sleep", "5ms")).collect(),
    ] {
        let ids = client.submit_many(specs).await.expect("submit");
        for id in ids {
            let task = cluster.wait_for_final(id).await;
            assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
        }
    }
    cluster.shutdown().await;
}
