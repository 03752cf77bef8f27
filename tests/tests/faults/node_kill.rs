//! SIGKILL one of three nodes while 2,000 short tasks are in flight: no
//! accepted task is lost, none has two accepted results, and the killed
//! node's attempts are taken back within 2 × the heartbeat timeout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use weft_client::Task;
use weft_proto::{Attempt, TaskId, TaskState};
use weft_tests::wait::wait_for;

use crate::hosts::{
    HEARTBEAT_TIMEOUT, LabCluster, LabSettings, PATIENCE, histories, marker_task, ms, node_name,
    run_counts,
};
use crate::lab::{run_scenario, say};

/// Tasks in the run.
const TASKS: usize = 2_000;
/// The host whose node is killed.
const VICTIM: u8 = 3;

#[test]
fn killing_one_of_three_nodes_loses_and_duplicates_no_accepted_task() {
    run_scenario(
        "killing_one_of_three_nodes_loses_and_duplicates_no_accepted_task",
        scenario,
    );
}

async fn scenario() {
    let mut cluster = LabCluster::start(LabSettings {
        slots: 8,
        durable: false,
    })
    .await;
    let runs = cluster.runs();
    let specs = (0..TASKS)
        .map(|i| marker_task(&runs, &format!("t{i:05}"), Some("0.05")))
        .collect();
    let ids = cluster.submit(specs).await;
    assert_eq!(ids.len(), TASKS);

    // Kill once a quarter is done, while the victim runs attempts.
    let in_flight: Vec<(TaskId, Attempt)> = wait_for(PATIENCE, || async {
        let info = cluster.client.cluster_info().await.ok()?;
        if info.count(TaskState::Succeeded) < (TASKS / 4) as u64 {
            return None;
        }
        let victim = cluster.node_info(VICTIM).await?;
        (!victim.running.is_empty()).then_some(victim.running)
    })
    .await
    .expect("the victim never ran attempts once a quarter of the tasks were done");
    // Keeps the victim from starting or finishing anything between the
    // snapshot above and the kill: only then is `in_flight` exactly what
    // it held when it died.
    cluster.signal_node(VICTIM, Signal::SIGSTOP);
    let in_flight = match cluster.node_info(VICTIM).await {
        Some(victim) if !victim.running.is_empty() => victim.running,
        _ => in_flight,
    };
    let killed_at = cluster.kill_node(VICTIM).await;

    // Reassignment: every attempt the victim held is taken back (requeued
    // as the next attempt), then runs on another node.
    let limit = 2 * HEARTBEAT_TIMEOUT;
    let mut requeued_after = None;
    let mut rerun_after = None;
    let deadline = Instant::now() + PATIENCE;
    while rerun_after.is_none() {
        assert!(
            Instant::now() < deadline,
            "the victim's attempts were not reassigned within {PATIENCE:?}"
        );
        let mut all_requeued = true;
        let mut all_elsewhere = true;
        for (id, attempt) in &in_flight {
            let Ok(task) = cluster.client.get(*id).await else {
                all_requeued = false;
                all_elsewhere = false;
                break;
            };
            let moved = task.attempt > *attempt;
            let elsewhere = moved
                && task.state != TaskState::Queued
                && task.node_name.as_deref() != Some(node_name(VICTIM).as_str());
            // The victim's result for this attempt may have been on the
            // wire when it was stopped: then it is recorded, and the
            // attempt was not one the node held when it died.
            let finished_before_death = finished_by_victim(&task, *attempt);
            all_requeued &= moved || finished_before_death;
            all_elsewhere &= elsewhere || finished_before_death;
        }
        if all_requeued && requeued_after.is_none() {
            requeued_after = Some(killed_at.elapsed());
        }
        if all_elsewhere {
            rerun_after = Some(killed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let requeued_after = requeued_after.expect("requeued before rerun");
    let rerun_after = rerun_after.expect("loop ends once rerun");

    cluster.wait_until_all_final(TASKS as u64).await;
    let tasks = cluster.all_tasks().await;
    let lost: Vec<&TaskId> = ids
        .iter()
        .filter(|id| tasks.get(id).map(|t| t.state) != Some(TaskState::Succeeded))
        .collect();
    let histories = histories(&cluster.client, &ids).await;
    let duplicates: BTreeMap<&TaskId, _> = histories
        .iter()
        .filter(|(_, h)| !h.single_result())
        .collect();
    let finished_before_death = in_flight
        .iter()
        .filter(|(id, attempt)| {
            tasks
                .get(id)
                .is_some_and(|t| finished_by_victim(t, *attempt))
        })
        .count();
    let counts = run_counts(&runs);
    let executed_twice = counts.values().filter(|n| **n > 1).count();
    let info = cluster.info().await;

    say(&format!(
        "fault-figures: node-kill tasks={TASKS} lost={} duplicate_results={} reassign_ms={} \
         rerun_elsewhere_ms={} limit_ms={} victim_in_flight={} finished_before_death={} \
         executed_twice={} nodes_lost={} stale_refused={}",
        lost.len(),
        duplicates.len(),
        ms(requeued_after),
        ms(rerun_after),
        ms(limit),
        in_flight.len(),
        finished_before_death,
        executed_twice,
        info.nodes_lost,
        info.stale_events_refused,
    ));
    assert!(lost.is_empty(), "accepted tasks lost: {lost:?}");
    assert!(
        duplicates.is_empty(),
        "tasks with more than one accepted result: {duplicates:?}"
    );
    // A lost attempt goes to the front of its ready queue, so it runs on
    // another node as soon as a slot frees, ahead of the backlog.
    assert!(
        requeued_after <= limit,
        "the killed node's attempts were reassigned after {requeued_after:?} (limit {limit:?})"
    );
    assert!(
        rerun_after <= limit,
        "the killed node's attempts ran again elsewhere only after {rerun_after:?} (limit {limit:?})"
    );
    assert_eq!(info.nodes_lost, 1, "exactly the killed node was lost");
    // Only attempts that were running when the node died may have run twice.
    assert!(
        executed_twice <= in_flight.len(),
        "{executed_twice} tasks ran twice, but the victim held only {}",
        in_flight.len()
    );
}

/// True when the victim's own result for `attempt` was recorded: it was
/// sent before the node was stopped and arrived after the snapshot.
fn finished_by_victim(task: &Task, attempt: Attempt) -> bool {
    task.attempt == attempt
        && task.state.is_final()
        && task.node_name.as_deref() == Some(node_name(VICTIM).as_str())
}
