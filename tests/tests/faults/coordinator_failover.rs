//! Several coordinators on one PostgreSQL ([`HaCluster`]): the active one
//! is killed (three times during a 5,000-task run) or cut off from the
//! database, and a standby takes over. No acknowledged task is lost, no
//! result is recorded twice, no attempt of a node that stayed alive runs
//! again, and the nodes are back at work within 2 × the heartbeat timeout
//! of a kill. A cron schedule fires each second exactly once across
//! takeovers.

use std::collections::{BTreeMap, BTreeSet};
use std::time::UNIX_EPOCH;

use weft_client::{Client, ListFilter, Task, TaskSpec};
use weft_proto::pb;
use weft_proto::{TaskId, TaskState};
use weft_tests::wait::wait_for;

use crate::ha::{Dialer, HEARTBEAT_TIMEOUT, HaCluster, cut_from_database, reconnect_to_database};
use crate::hosts::{PATIENCE, histories, marker_task, ms, run_counts};
use crate::lab::{run_scenario, say};

/// Acknowledged tasks in the kill run.
const TASKS: usize = 5_000;
/// Kills of the active coordinator during it.
const KILLS: usize = 3;
/// Tasks per `Submit` call.
const BATCH: usize = 250;
/// Tasks that must succeed between two kills (the cluster did recover).
const PROGRESS_BETWEEN_KILLS: u64 = 300;
/// Slots of each node.
const SLOTS: u32 = 8;

#[test]
fn the_active_coordinator_killed_three_times_loses_and_reruns_nothing() {
    run_scenario(
        "the_active_coordinator_killed_three_times_loses_and_reruns_nothing",
        kills,
    );
}

#[test]
fn a_coordinator_cut_off_from_the_database_stops_and_a_standby_takes_over() {
    run_scenario(
        "a_coordinator_cut_off_from_the_database_stops_and_a_standby_takes_over",
        cut,
    );
}

#[test]
fn a_cron_schedule_fires_each_second_once_across_takeovers() {
    run_scenario(
        "a_cron_schedule_fires_each_second_once_across_takeovers",
        cron,
    );
}

/// What the submitter achieved.
struct Submitted {
    /// Tasks whose `Submit` answered their ids.
    acked: Vec<TaskId>,
    /// `Submit` calls that failed (their batches abandoned, never retried,
    /// so a marker key runs at most once unless an attempt ran twice).
    failed_batches: usize,
}

/// Submits `total` marker tasks in batches, dialing the next live
/// coordinator whenever a call fails.
async fn submit_through_failovers(
    dialer: Dialer,
    runs: std::path::PathBuf,
    total: usize,
) -> Submitted {
    let mut client = dialer.client().await;
    let mut acked = Vec::with_capacity(total);
    let mut failed_batches = 0;
    let mut next_key = 0usize;
    while acked.len() < total {
        let n = BATCH.min(total - acked.len());
        let specs = (next_key..next_key + n)
            .map(|i| marker_task(&runs, &format!("t{i:06}"), Some("0.01")))
            .collect();
        next_key += n;
        match client.submit_many(specs).await {
            Ok(ids) => acked.extend(ids),
            Err(_) => {
                failed_batches += 1;
                client = dialer.client().await;
            }
        }
    }
    Submitted {
        acked,
        failed_batches,
    }
}

/// Every task the active coordinator holds, by id.
async fn all_tasks(client: &Client) -> BTreeMap<TaskId, Task> {
    let tasks = client
        .list(None, 1_000_000)
        .await
        .unwrap_or_else(|e| panic!("listing tasks: {e}"));
    tasks.into_iter().map(|t| (t.id, t)).collect()
}

/// Waits until none of `ids` is open, through whichever coordinator
/// answers.
async fn wait_all_final(dialer: &Dialer, ids: &[TaskId]) -> BTreeMap<TaskId, Task> {
    wait_for(PATIENCE, || async {
        let client = dialer.client().await;
        let tasks = all_tasks(&client).await;
        ids.iter()
            .all(|id| tasks.get(id).is_some_and(|t| t.state.is_final()))
            .then_some(tasks)
    })
    .await
    .unwrap_or_else(|e| panic!("the tasks did not all finish: {e}"))
}

/// What every check of a run says, asserted by the caller.
struct Outcome {
    /// Acknowledged tasks that did not succeed.
    lost: Vec<TaskId>,
    /// Marker keys that ran more than once.
    ran_twice: Vec<(String, usize)>,
    /// Tasks whose history holds more than one result, or a stale one.
    double_results: Vec<TaskId>,
    /// Tasks charged a node loss (no node was lost).
    charged: usize,
}

async fn outcome(cluster: &HaCluster, acked: &[TaskId]) -> Outcome {
    let dialer = cluster.dialer();
    let tasks = wait_all_final(&dialer, acked).await;
    let lost = acked
        .iter()
        .filter(|id| tasks.get(id).map(|t| t.state) != Some(TaskState::Succeeded))
        .copied()
        .collect();
    let charged = acked
        .iter()
        .filter_map(|id| tasks.get(id))
        .filter(|t| t.node_losses > 0)
        .count();
    let ran_twice = run_counts(&cluster.runs())
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    let client = dialer.client().await;
    let double_results = histories(&client, acked)
        .await
        .into_iter()
        .filter(|(_, h)| !h.single_result())
        .map(|(id, _)| id)
        .collect();
    Outcome {
        lost,
        ran_twice,
        double_results,
        charged,
    }
}

fn assert_clean(outcome: &Outcome) {
    assert!(
        outcome.lost.is_empty(),
        "acknowledged tasks lost: {:?}",
        outcome.lost
    );
    assert!(
        outcome.ran_twice.is_empty(),
        "attempts run twice across failovers (key, runs): {:?}",
        outcome.ran_twice
    );
    assert!(
        outcome.double_results.is_empty(),
        "tasks with more than one recorded result: {:?}",
        outcome.double_results
    );
    assert_eq!(
        outcome.charged, 0,
        "tasks charged a node loss with no node lost"
    );
}

async fn kills() {
    let mut cluster = HaCluster::start(SLOTS).await;
    let submitter = tokio::spawn(submit_through_failovers(
        cluster.dialer(),
        cluster.runs(),
        TASKS,
    ));
    let mut back = Vec::new();
    let mut since = 0;
    for kill in 1..=KILLS {
        // Kill only once the cluster is whole again and making progress.
        let active = wait_for(PATIENCE, || async {
            let host = cluster.active().await?;
            let info = cluster.client().await.cluster_info().await.ok()?;
            let progress = info.count(TaskState::Succeeded) >= since + PROGRESS_BETWEEN_KILLS;
            (info.nodes == 3 && progress).then_some(host)
        })
        .await
        .unwrap_or_else(|e| panic!("no progress before kill {kill}: {e}"));
        let killed = cluster.kill_coordinator(active).await;
        let (next, took) = cluster.back_to_work(active, killed).await;
        say(&format!(
            "kill {kill}: h{active} killed, h{next} active, nodes at work after {} ms",
            ms(took)
        ));
        back.push(took);
        // The killed one comes back as a standby.
        cluster.start_coordinator(active);
        since = cluster.info().await.count(TaskState::Succeeded);
    }
    let submitted = submitter.await.expect("the submitter panicked");
    let outcome = outcome(&cluster, &submitted.acked).await;
    let slowest = back.iter().max().copied().unwrap_or_default();
    say(&format!(
        "fault-figures: coordinator-failover tasks={} kills={KILLS} lost={} ran_twice={} double_results={} \
         charged_node_losses={} unacked_batches={} back_to_work_ms={:?} heartbeat_timeout_ms={}",
        submitted.acked.len(),
        outcome.lost.len(),
        outcome.ran_twice.len(),
        outcome.double_results.len(),
        outcome.charged,
        submitted.failed_batches,
        back.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        ms(HEARTBEAT_TIMEOUT),
    ));
    assert_eq!(submitted.acked.len(), TASKS);
    assert_clean(&outcome);
    assert!(
        slowest <= 2 * HEARTBEAT_TIMEOUT,
        "the nodes were back at work only {} ms after a kill (limit: 2 × the heartbeat timeout, {} ms)",
        ms(slowest),
        ms(2 * HEARTBEAT_TIMEOUT)
    );
}

async fn cut() {
    let mut cluster = HaCluster::start(SLOTS).await;
    let runs = cluster.runs();
    let client = cluster.client().await;
    let specs = (0..1_000)
        .map(|i| marker_task(&runs, &format!("c{i:05}"), Some("0.05")))
        .collect();
    let acked = client.submit_many(specs).await.expect("submitting");
    let active = wait_for(PATIENCE, || async {
        let host = cluster.active().await?;
        let info = cluster.client().await.cluster_info().await.ok()?;
        (info.count(TaskState::Succeeded) >= 100).then_some(host)
    })
    .await
    .unwrap_or_else(|e| panic!("no progress before the cut: {e}"));

    let cut_at = std::time::Instant::now();
    let cut_wall = std::time::SystemTime::now();
    cut_from_database(active);
    let log = cluster.wait_for_exit(active, PATIENCE).await;
    let exited = cut_at.elapsed();
    // When it stopped serving: the time of its "lost the database" line.
    let lost_line = log
        .lines()
        .find(|line| line.contains("lost the database"))
        .unwrap_or_else(|| panic!("h{active} stopped for another reason:\n{log}"));
    let logged = lost_line
        .split_whitespace()
        .next()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .unwrap_or_else(|| panic!("no time on {lost_line:?}"));
    let stopped = logged.duration_since(cut_wall).unwrap_or_default();
    let (next, took) = cluster.back_to_work(active, cut_at).await;
    reconnect_to_database(active);
    cluster.start_coordinator(active);
    let outcome = outcome(&cluster, &acked).await;
    say(&format!(
        "fault-figures: coordinator-cut tasks={} lost={} rerun_after_lease={} double_results={} \
         stopped_after_ms={} exited_after_ms={} back_to_work_ms={} new_active=h{next}",
        acked.len(),
        outcome.lost.len(),
        outcome.ran_twice.len(),
        outcome.double_results.len(),
        ms(stopped),
        ms(exited),
        ms(took),
    ));
    // A standby can take over only once PostgreSQL has ended the cut-off
    // coordinator's session, which is longer than the nodes' lease: their
    // running attempts stop meanwhile and run again, as after any loss of
    // the coordinator longer than the lease. Nothing is lost or recorded
    // twice.
    assert!(
        outcome.lost.is_empty(),
        "acknowledged tasks lost: {:?}",
        outcome.lost
    );
    assert!(
        outcome.double_results.is_empty(),
        "tasks with more than one recorded result: {:?}",
        outcome.double_results
    );
    // It gave up within its lease, counted from the last good check (sent
    // before the cut): the watchdog wakes at the lease's end, and one
    // CHECK_EVERY is allowed for waking on a loaded machine. Its process
    // was gone before a standby served.
    use weft_coordinator::store::pg::lease::{CHECK_EVERY, LEASE};
    assert!(
        stopped <= LEASE + CHECK_EVERY,
        "h{active} stopped {} ms after the cut, past its lease and one check ({} ms + {} ms)",
        ms(stopped),
        ms(LEASE),
        ms(CHECK_EVERY)
    );
    assert!(
        exited < took,
        "a standby served ({} ms) before h{active} had exited ({} ms)",
        ms(took),
        ms(exited)
    );
}

async fn cron() {
    let mut cluster = HaCluster::start(SLOTS).await;
    let client = cluster.client().await;
    let schedule = pb::ScheduleSpec {
        name: SCHEDULE.to_owned(),
        cron: "* * * * * *".to_owned(),
        task: Some(TaskSpec::exec(["true"]).into()),
        overlap: pb::OverlapPolicy::Queue.into(),
        catch_up: pb::CatchUp::All.into(),
        ..pb::ScheduleSpec::default()
    };
    client
        .create_schedule(schedule)
        .await
        .expect("creating the schedule");
    for kill in 1..=2 {
        let active = cluster.active().await.expect("an active coordinator");
        // Let it fire a few times on this coordinator first.
        let seen = fired(&cluster.client().await).await.len();
        wait_for(PATIENCE, || async {
            (fired(&cluster.client().await).await.len() >= seen + 3).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("the schedule did not fire before kill {kill}: {e}"));
        let killed = cluster.kill_coordinator(active).await;
        cluster.back_to_work(active, killed).await;
        cluster.start_coordinator(active);
    }
    let client = cluster.client().await;
    let seen = fired(&client).await.len();
    wait_for(PATIENCE, || async {
        (fired(&cluster.client().await).await.len() >= seen + 3).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("the schedule did not fire after the takeovers: {e}"));
    client
        .pause_schedule(SCHEDULE, true)
        .await
        .expect("pausing the schedule");
    let client = cluster.client().await;
    let times = fired(&client).await;
    let seconds: Vec<u64> = times
        .iter()
        .map(|t| {
            humantime::parse_rfc3339(t)
                .expect("RFC 3339")
                .duration_since(UNIX_EPOCH)
                .expect("after 1970")
                .as_secs()
        })
        .collect();
    let distinct: BTreeSet<u64> = seconds.iter().copied().collect();
    let gaps: Vec<(u64, u64)> = seconds
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect();
    say(&format!(
        "fault-figures: cron-failover fires={} distinct={} gaps={gaps:?}",
        seconds.len(),
        distinct.len()
    ));
    assert_eq!(
        distinct.len(),
        seconds.len(),
        "a second fired twice: {times:?}"
    );
    assert!(
        gaps.is_empty(),
        "seconds missed or out of order (catch-up all): {gaps:?}"
    );
    // The stored counter agrees with the tasks: nothing fired and lost.
    let listed = client.list_schedules().await.expect("listing schedules");
    let stored = listed
        .iter()
        .find(|s| s.spec.as_ref().is_some_and(|spec| spec.name == SCHEDULE))
        .expect("the schedule is listed");
    assert_eq!(stored.fired as usize, times.len(), "{stored:?} {times:?}");
}

/// The schedule of the cron scenario.
const SCHEDULE: &str = "failover";

/// The fire times of the schedule's tasks (`NAME@FIRE_TIME`), oldest
/// first.
async fn fired(client: &Client) -> Vec<String> {
    let filter = ListFilter {
        name: format!("{SCHEDULE}@"),
        ..ListFilter::default()
    };
    let mut tasks = client
        .list_filtered(&filter, 100_000)
        .await
        .unwrap_or_else(|e| panic!("listing fired tasks: {e}"));
    tasks.sort_by_key(|t| t.id);
    tasks
        .iter()
        .filter_map(|t| t.spec.as_ref()?.name.split_once('@'))
        .filter(|(name, _)| *name == SCHEDULE)
        .map(|(_, at)| at.to_owned())
        .collect()
}
