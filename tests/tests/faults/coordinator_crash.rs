//! SIGKILL the coordinator five times during a 5,000-task run, restarting
//! it on the same durable store each time: no acknowledged task is lost,
//! and no attempt runs twice because of a restart.
//!
//! Tasks are submitted in batches while the coordinator is being killed.
//! A batch whose `Submit` failed is not retried (its tasks may or may not
//! have been committed): its keys are abandoned and a new batch gets new
//! keys, so every marker key is submitted at most once and a key with two
//! runs is an attempt that ran twice.

use std::time::Duration;

use weft_client::Client;
use weft_proto::{TaskId, TaskState};
use weft_tests::wait::wait_for;

use crate::hosts::{LabCluster, LabSettings, PATIENCE, marker_task, ms, run_counts};
use crate::lab::{run_scenario, say};

/// Acknowledged tasks in the run.
const TASKS: usize = 5_000;
/// Coordinator crashes during the run.
const CRASHES: usize = 5;
/// Tasks per `Submit` call.
const BATCH: usize = 250;
/// Pause between batches, so submission overlaps the first crashes.
const BATCH_PAUSE: Duration = Duration::from_millis(150);
/// Tasks that must succeed between two crashes (the cluster did recover).
const PROGRESS_BETWEEN_CRASHES: u64 = 300;

#[test]
fn coordinator_killed_five_times_loses_and_reruns_no_acknowledged_task() {
    run_scenario(
        "coordinator_killed_five_times_loses_and_reruns_no_acknowledged_task",
        scenario,
    );
}

/// What the submitter achieved.
struct Submitted {
    /// Tasks whose `Submit` answered their ids.
    acked: Vec<TaskId>,
    /// `Submit` calls that failed (their batches abandoned).
    failed_batches: usize,
}

/// Submits batches until `TASKS` are acknowledged, through crashes.
async fn submit_through_crashes(client: Client, runs: std::path::PathBuf) -> Submitted {
    let mut acked = Vec::with_capacity(TASKS);
    let mut failed_batches = 0;
    let mut next_key = 0usize;
    while acked.len() < TASKS {
        let n = BATCH.min(TASKS - acked.len());
        let specs = (next_key..next_key + n)
            .map(|i| marker_task(&runs, &format!("t{i:06}"), Some("0.01")))
            .collect();
        next_key += n;
        match client.submit_many(specs).await {
            Ok(ids) => acked.extend(ids),
            Err(_) => failed_batches += 1,
        }
        tokio::time::sleep(BATCH_PAUSE).await;
    }
    Submitted {
        acked,
        failed_batches,
    }
}

async fn scenario() {
    let mut cluster = LabCluster::start(LabSettings {
        slots: 8,
        durable: true,
    })
    .await;
    let runs = cluster.runs();
    let submitter = tokio::spawn(submit_through_crashes(cluster.client.clone(), runs.clone()));

    let mut downtimes = Vec::new();
    let mut crashed_at_succeeded = Vec::new();
    let mut since = 0;
    for crash in 1..=CRASHES {
        // Crash only once the cluster is whole again and making progress.
        let succeeded = wait_for(PATIENCE, || async {
            let info = cluster.client.cluster_info().await.ok()?;
            let succeeded = info.count(TaskState::Succeeded);
            (info.nodes == 3 && succeeded >= since + PROGRESS_BETWEEN_CRASHES).then_some(succeeded)
        })
        .await
        .unwrap_or_else(|e| panic!("no progress before crash {crash}: {e}"));
        crashed_at_succeeded.push(succeeded);
        downtimes.push(cluster.crash_and_restart_coordinator().await);
        since = cluster.info().await.count(TaskState::Succeeded);
    }
    let submitted = submitter.await.expect("the submitter panicked");
    cluster.wait_for_nodes(3).await;
    cluster
        .wait_until_all_final(submitted.acked.len() as u64)
        .await;

    let tasks = cluster.all_tasks().await;
    let lost: Vec<&TaskId> = submitted
        .acked
        .iter()
        .filter(|id| tasks.get(id).map(|t| t.state) != Some(TaskState::Succeeded))
        .collect();
    let requeued = submitted
        .acked
        .iter()
        .filter_map(|id| tasks.get(id))
        .filter(|t| t.attempt.0 > 1)
        .count();
    // No node was lost: a requeue caused by a restart (an assignment that
    // never arrived) must not be charged to the task as a node loss.
    let charged = submitted
        .acked
        .iter()
        .filter_map(|id| tasks.get(id))
        .filter(|t| t.node_losses > 0)
        .count();
    let counts = run_counts(&runs);
    let ran_twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let max_down = downtimes.iter().max().copied().unwrap_or_default();
    let info = cluster.info().await;

    say(&format!(
        "fault-figures: coordinator-crash tasks={} crashes={CRASHES} lost={} ran_twice={} \
         requeued={} charged_node_losses={charged} unacked_batches={} tasks_held={} max_restart_ms={} restarts_ms={:?} \
         crashed_at_succeeded={crashed_at_succeeded:?} stale_refused={}",
        submitted.acked.len(),
        lost.len(),
        ran_twice.len(),
        requeued,
        submitted.failed_batches,
        tasks.len(),
        ms(max_down),
        downtimes.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        info.stale_events_refused,
    ));
    assert_eq!(submitted.acked.len(), TASKS);
    assert!(lost.is_empty(), "acknowledged tasks lost: {lost:?}");
    assert!(
        ran_twice.is_empty(),
        "attempts run twice across coordinator restarts (key, runs): {ran_twice:?}"
    );
    assert_eq!(charged, 0, "tasks charged a node loss with no node lost");
}
