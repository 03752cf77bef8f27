//! The shared shape of the partition and pause scenarios: one node is cut
//! off (network partition, or SIGSTOP) for 3 × the lease while it runs
//! attempts, then restored. Its attempts must finish on other nodes while
//! it is away, the results it sends late must be refused by fencing, and
//! no task may end with a second accepted result.

use std::time::Instant;

use nix::sys::signal::Signal;

use weft_proto::{Attempt, TaskId, TaskState};
use weft_tests::wait::wait_for;

use crate::hosts::{
    LEASE, LabCluster, LabSettings, PATIENCE, histories, marker_task, ms, node_name, run_counts,
};
use crate::lab::{heal, partition, say};

/// Slots per node; the run fills every slot once.
const SLOTS: u32 = 4;
/// How long each task runs: shorter than the lease, so the isolated node
/// finishes some before its lease ends and holds those results.
const TASK_SECS: &str = "0.5";

/// How the node is cut off.
#[derive(Clone, Copy, Debug)]
pub enum Isolation {
    /// `netns-lab.sh partition` its host, then `heal`.
    Partition,
    /// SIGSTOP the node process, then SIGCONT (its children keep running).
    Stop,
}

impl Isolation {
    fn name(self) -> &'static str {
        match self {
            Isolation::Partition => "partition",
            Isolation::Stop => "sigstop",
        }
    }

    fn begin(self, cluster: &LabCluster, host: u8) {
        match self {
            Isolation::Partition => partition(host),
            Isolation::Stop => cluster.signal_node(host, Signal::SIGSTOP),
        }
    }

    fn end(self, cluster: &LabCluster, host: u8) {
        match self {
            Isolation::Partition => heal(host),
            Isolation::Stop => cluster.signal_node(host, Signal::SIGCONT),
        }
    }
}

/// Runs the scenario with the node on `victim` isolated by `how`.
pub async fn isolate_one_node(how: Isolation, victim: u8) {
    let cluster = LabCluster::start(LabSettings {
        slots: SLOTS,
        durable: false,
    })
    .await;
    let runs = cluster.runs();
    let total = 3 * SLOTS as usize;
    let specs = (0..total)
        .map(|i| marker_task(&runs, &format!("t{i:03}"), Some(TASK_SECS)))
        .collect();
    let ids = cluster.submit(specs).await;

    let held: Vec<(TaskId, Attempt)> = wait_for(PATIENCE, || async {
        let node = cluster.node_info(victim).await?;
        (node.running.len() == SLOTS as usize).then_some(node.running)
    })
    .await
    .expect("the victim never ran a full set of attempts");
    let before = cluster.info().await;
    let hold = 3 * LEASE;
    let isolated_at = Instant::now();
    how.begin(&cluster, victim);

    // While it is away, its attempts must finish elsewhere.
    let victim_name = node_name(victim);
    let finished_elsewhere = wait_for(hold.saturating_sub(isolated_at.elapsed()), || async {
        for (id, attempt) in &held {
            let task = cluster.client.get(*id).await.ok()?;
            let done_elsewhere = task.state == TaskState::Succeeded
                && task.attempt > *attempt
                && task.node_name.as_deref() != Some(victim_name.as_str());
            if !done_elsewhere {
                return None;
            }
        }
        Some(isolated_at.elapsed())
    })
    .await;
    // The hold itself is the scenario: the node stays away for 3 × lease.
    tokio::time::sleep(hold.saturating_sub(isolated_at.elapsed())).await;
    how.end(&cluster, victim);
    let restored_at = Instant::now();

    // Back: it reconnects and its late results are refused.
    let refused = wait_for(PATIENCE, || async {
        let info = cluster.client.cluster_info().await.ok()?;
        let refused = info
            .stale_events_refused
            .saturating_sub(before.stale_events_refused);
        (refused > 0 && info.nodes == 3).then_some(refused)
    })
    .await
    .unwrap_or_else(|e| panic!("the victim's late results were never refused: {e}"));
    let refused_after = restored_at.elapsed();
    cluster.wait_until_all_final(total as u64).await;
    let nodes_lost = cluster.info().await.nodes_lost;

    let tasks = cluster.all_tasks().await;
    let lost: Vec<&TaskId> = ids
        .iter()
        .filter(|id| tasks.get(id).map(|t| t.state) != Some(TaskState::Succeeded))
        .collect();
    let histories = histories(&cluster.client, &ids).await;
    let duplicates: Vec<_> = histories
        .iter()
        .filter(|(_, h)| !h.single_result())
        .collect();
    let on_victim: Vec<&TaskId> = held
        .iter()
        .map(|(id, _)| id)
        .filter(|id| tasks.get(id).and_then(|t| t.node_name.as_deref()) == Some(&victim_name))
        .collect();
    let counts = run_counts(&runs);
    let executed_twice = counts.values().filter(|n| **n > 1).count();
    let refused_total = cluster
        .info()
        .await
        .stale_events_refused
        .saturating_sub(before.stale_events_refused);

    say(&format!(
        "fault-figures: {} tasks={total} victim_attempts={} hold_ms={} \
         finished_elsewhere_ms={} late_results_refused={refused_total} refused_after_ms={} \
         duplicate_results={} lost={} results_from_victim={} executed_twice={executed_twice} \
         nodes_lost={nodes_lost}",
        how.name(),
        held.len(),
        ms(hold),
        finished_elsewhere
            .map(|d| ms(d).to_string())
            .unwrap_or_else(|_| "none".to_owned()),
        ms(refused_after),
        duplicates.len(),
        lost.len(),
        on_victim.len(),
    ));
    let finished_elsewhere = finished_elsewhere.unwrap_or_else(|_| {
        panic!("the victim's attempts did not finish elsewhere within {hold:?}")
    });
    assert!(finished_elsewhere <= hold);
    assert!(refused > 0);
    assert!(lost.is_empty(), "tasks lost: {lost:?}");
    assert!(
        duplicates.is_empty(),
        "tasks with a second accepted result or a stale event: {duplicates:?}"
    );
    assert!(
        on_victim.is_empty(),
        "results of the isolated node were accepted for {on_victim:?}"
    );
}
