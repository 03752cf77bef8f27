//! Scheduling policy on a real cluster: priorities, fair keys, concurrency
//! keys, rate limits, resources, limits that survive a crash, and the CLI.
//! Orders and concurrency are read from each task's recorded attempts
//! (assigned/started/ended times), never from sleeps.

use std::time::{Duration, SystemTime};

use serde_json::Value;
use weft_client::{Task, TaskId, TaskSpec, TaskState};
use weft_proto::policy::{Limit, LimitKind, OverLimit};
use weft_tests::TestCluster;

fn sleep(ms: u64) -> TaskSpec {
    TaskSpec::call("sleep", format!("{ms}ms"))
}

fn started(task: &Task) -> SystemTime {
    task.attempts
        .last()
        .and_then(|a| a.started_at)
        .unwrap_or_else(|| panic!("{} never started: {task:?}", task.id))
}

fn ended(task: &Task) -> SystemTime {
    task.attempts
        .last()
        .and_then(|a| a.ended_at)
        .unwrap_or_else(|| panic!("{} never ended: {task:?}", task.id))
}

async fn all_final(cluster: &TestCluster, ids: &[TaskId]) -> Vec<Task> {
    let mut tasks = Vec::new();
    for id in ids {
        tasks.push(cluster.wait_for_final(*id).await);
    }
    tasks
}

/// Most of `tasks` whose recorded runs overlap at one moment.
fn max_overlap(tasks: &[&Task]) -> usize {
    let mut edges: Vec<(SystemTime, i32)> = Vec::new();
    for task in tasks {
        edges.push((started(task), 1));
        edges.push((ended(task), -1));
    }
    // Ends before starts at the same instant.
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, delta) in edges {
        now += delta;
        max = max.max(now);
    }
    usize::try_from(max).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_runs_first_on_a_one_slot_node() {
    let cluster = TestCluster::builder().nodes(1).slots(1).start().await;
    let client = cluster.client().await;
    let blocker = client.submit(sleep(400)).await.expect("submit");
    cluster.wait_for_running(blocker).await;
    let ids = client
        .submit_many(vec![
            sleep(10).priority(1),
            sleep(10),
            sleep(10).priority(9),
            sleep(10).priority(7),
        ])
        .await
        .expect("submit");
    let tasks = all_final(&cluster, &ids).await;
    let mut order: Vec<(SystemTime, u8)> = tasks
        .iter()
        .map(|t| (started(t), t.spec.as_ref().map_or(0, |s| s.priority)))
        .collect();
    order.sort();
    let priorities: Vec<u8> = order.into_iter().map(|(_, p)| p).collect();
    assert_eq!(priorities, [9, 7, 5, 1]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_fair_key_gets_about_half_the_cluster_while_both_have_work() {
    let cluster = TestCluster::builder().nodes(1).slots(2).start().await;
    let client = cluster.client().await;
    let big: Vec<TaskSpec> = (0..200).map(|_| sleep(20).fair_key("big", 1)).collect();
    let big = client.submit_many(big).await.expect("submit");
    // The big key's backlog has begun (its first task started; at 20 ms
    // it may be done already when looked at).
    cluster
        .wait_for_task(big[0], |t| {
            t.attempts.last().is_some_and(|a| a.started_at.is_some())
        })
        .await;
    let small: Vec<TaskSpec> = (0..20).map(|_| sleep(20).fair_key("small", 1)).collect();
    let small = client.submit_many(small).await.expect("submit");
    let small_tasks = all_final(&cluster, &small).await;
    let first = small_tasks.iter().map(started).min().unwrap();
    let last = small_tasks.iter().map(ended).max().unwrap();
    // Of the big key's tasks, how many started while the small key's ran.
    let mut big_during = 0;
    for id in &big {
        let task = client.get(*id).await.expect("get");
        if let Some(at) = task.attempts.last().and_then(|a| a.started_at)
            && at >= first
            && at <= last
        {
            big_during += 1;
        }
    }
    let share = 20.0 / f64::from(20 + big_during);
    eprintln!(
        "fair share: the late key's 20 tasks ran in {:?} beside {big_during} of the big key's (share {share:.2})",
        last.duration_since(first).unwrap_or_default()
    );
    assert!(
        (0.35..=0.7).contains(&share),
        "the late key got {share:.2} of the slots (big ran {big_during} meanwhile)"
    );
    cluster.shutdown().await;
}

fn keyed(ms: u64, key: &str, max: u32, on_limit: OverLimit) -> TaskSpec {
    sleep(ms).concurrency(key, max, on_limit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_key_queues_cancels_newest_or_cancels_oldest() {
    let cluster = TestCluster::builder().nodes(1).slots(8).start().await;
    let client = cluster.client().await;
    // QUEUE: never more than 2 at once, all succeed.
    let ids = client
        .submit_many(
            (0..6)
                .map(|_| keyed(150, "user-42", 2, OverLimit::Queue))
                .collect(),
        )
        .await
        .expect("submit");
    let waiting = cluster
        .wait_for_task(ids[5], |t| t.pending_reason.contains("concurrency key"))
        .await;
    assert_eq!(
        waiting.pending_reason,
        "concurrency key user-42 at its limit 2"
    );
    let tasks = all_final(&cluster, &ids).await;
    assert!(tasks.iter().all(|t| t.state == TaskState::Succeeded));
    let refs: Vec<&Task> = tasks.iter().collect();
    assert_eq!(max_overlap(&refs), 2);

    // CANCEL_NEWEST: the third is cancelled at once.
    let ids = client
        .submit_many(
            (0..3)
                .map(|_| keyed(100, "k-new", 2, OverLimit::CancelNewest))
                .collect(),
        )
        .await
        .expect("submit");
    let tasks = all_final(&cluster, &ids).await;
    let states: Vec<TaskState> = tasks.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [
            TaskState::Succeeded,
            TaskState::Succeeded,
            TaskState::Cancelled
        ]
    );
    assert!(
        tasks[2].error.contains("cancel_newest"),
        "{}",
        tasks[2].error
    );

    // CANCEL_OLDEST: the running one is cancelled, the new one runs.
    let old = client
        .submit(keyed(30_000, "k-old", 1, OverLimit::CancelOldest))
        .await
        .expect("submit");
    cluster.wait_for_running(old).await;
    let new = client
        .submit(keyed(10, "k-old", 1, OverLimit::CancelOldest))
        .await
        .expect("submit");
    let old = cluster.wait_for_final(old).await;
    assert_eq!(old.state, TaskState::Cancelled, "{old:?}");
    assert!(old.error.contains("cancel_oldest"), "{}", old.error);
    let new = cluster.wait_for_final(new).await;
    assert_eq!(new.state, TaskState::Succeeded);
    assert!(
        started(&new) >= ended(&old),
        "the new one waited for the slot"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_paces_tasks_across_the_cluster() {
    let cluster = TestCluster::builder().nodes(2).slots(4).start().await;
    let client = cluster.client().await;
    client
        .set_limit(&Limit {
            name: "api".into(),
            kind: LimitKind::Rate(
                weft_proto::policy::RateLimit::new(5, Duration::from_secs(1), 1).unwrap(),
            ),
        })
        .await
        .expect("set limit");
    let ids = client
        .submit_many(
            (0..6)
                .map(|_| TaskSpec::call("noop", "").rate_limit("api", 1))
                .collect(),
        )
        .await
        .expect("submit");
    let tasks = all_final(&cluster, &ids).await;
    let mut assigned: Vec<SystemTime> = tasks
        .iter()
        .map(|t| {
            t.attempts
                .last()
                .and_then(|a| a.assigned_at)
                .expect("assigned")
        })
        .collect();
    assigned.sort();
    for pair in assigned.windows(2) {
        let gap = pair[1].duration_since(pair[0]).unwrap_or_default();
        // 5/s with a burst of 1: one every 200 ms (ms-rounded wakeups).
        assert!(
            gap >= Duration::from_millis(190),
            "gap {gap:?} in {assigned:?}"
        );
    }
    let limits = client.limits().await.expect("limits");
    assert_eq!(limits[0].limit.name, "api");
    cluster.shutdown().await;
}

const PROBE: &str = r#"d="$1"; touch "$d/run.$$"; n=$(ls "$d" | grep -c '^run\.'); echo "$n" >> "$d/counts"; sleep 0.2; rm -f "$d/run.$$""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_are_never_over_committed_on_any_node() {
    let cluster = TestCluster::builder()
        .nodes(2)
        .slots(4)
        .node_resources(0, &[("gpu", 1)])
        .node_resources(1, &[("gpu", 2)])
        .start()
        .await;
    let client = cluster.client().await;
    let nodes = cluster.wait_for_nodes(2).await;
    // One marker folder for all: at most 3 gpu tasks at once cluster-wide;
    // per node, from the recorded runs.
    let shared = cluster.dir().join("probe-all");
    std::fs::create_dir_all(&shared).expect("dir");
    let specs = (0..9)
        .map(|_| {
            TaskSpec::exec(["sh", "-c", PROBE, "sh", &shared.display().to_string()])
                .resource("gpu", 1)
        })
        .collect();
    let ids = client.submit_many(specs).await.expect("submit");
    let tasks = all_final(&cluster, &ids).await;
    assert!(tasks.iter().all(|t| t.state == TaskState::Succeeded));
    let counts = std::fs::read_to_string(shared.join("counts")).expect("counts");
    let max: u32 = counts
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .unwrap();
    assert!(max <= 3, "{max} gpu tasks ran at once on 3 gpus");
    for node in &nodes {
        let on: Vec<&Task> = tasks
            .iter()
            .filter(|t| t.node_name.as_deref() == Some(node.name.as_str()))
            .collect();
        let gpus = node.resources["gpu"] as usize;
        assert!(max_overlap(&on) <= gpus, "{} over-committed", node.name);
    }
    let nodes = client.nodes().await.expect("nodes");
    assert!(
        nodes.iter().all(|n| n.resources_free == n.resources),
        "{nodes:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infeasible_request_is_said_at_once_and_fails_with_the_flag() {
    let cluster = TestCluster::builder()
        .nodes(1)
        .node_resources(0, &[("gpu", 2)])
        .start()
        .await;
    let client = cluster.client().await;
    let waits = client
        .submit(TaskSpec::call("noop", "").resource("gpu", 4))
        .await
        .expect("submit");
    let task = client.get(waits).await.expect("get");
    assert_eq!(task.state, TaskState::Queued);
    assert_eq!(
        task.pending_reason,
        "needs gpu=4; the largest connected node has gpu=2"
    );
    let fails = client
        .submit(
            TaskSpec::call("noop", "")
                .resource("gpu", 4)
                .fail_if_infeasible(),
        )
        .await
        .expect("submit");
    let task = cluster.wait_for_final(fails).await;
    assert_eq!(task.state, TaskState::Failed);
    assert!(
        task.error.starts_with("infeasible: needs gpu=4"),
        "{}",
        task.error
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_survive_a_coordinator_crash() {
    let cluster = TestCluster::builder()
        .nodes(1)
        .durable()
        .processes()
        .start()
        .await;
    let out = cluster
        .weft(&["limit", "set", "api", "100/s", "--burst", "5"])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let out = cluster
        .weft(&["limit", "set", "user-42", "--max-concurrent", "2"])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    cluster.crash_and_restart_coordinator().await;
    let out = cluster.weft(&["limit", "list", "-o", "json"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let limits: Value = serde_json::from_str(&out.stdout).expect("json");
    let names: Vec<(&str, &str, &str)> = limits
        .as_array()
        .expect("array")
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap(),
                l["name"].as_str().unwrap(),
                l["setting"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("rate", "api", "100/s burst 5"),
            ("concurrency", "user-42", "max 2 running")
        ]
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_policy_flags_and_manages_limits() {
    let cluster = TestCluster::builder()
        .nodes(1)
        .node_resources(0, &[("gpu", 2), ("mem", 8 << 30)])
        .start()
        .await;
    let out = cluster.weft(&["limit", "set", "api", "50/s"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    // The result on stdout, like every command's.
    assert_eq!(out.stdout.trim(), "limit api set: 50/s", "{out}");
    assert!(!out.stderr.contains("api"), "{out}");
    let out = cluster
        .weft(&["limit", "set", "api", "50/s", "--burst", "0"])
        .await;
    assert_eq!(out.code, Some(2), "--burst 0 is refused: {out}");
    let out = cluster
        .weft(&[
            "run",
            "--priority",
            "8",
            "--fair-key",
            "team-a:3",
            "--concurrency-key",
            "user-42",
            "--max-concurrent",
            "2",
            "--rate-limit",
            "api:2",
            "--resource",
            "gpu=1",
            "--resource",
            "mem=1GiB",
            "--",
            "true",
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let out = cluster.weft(&["limit", "list"]).await;
    assert!(
        out.stdout.contains("api") && out.stdout.contains("50/s"),
        "{out}"
    );
    let out = cluster.weft(&["nodes"]).await;
    assert!(out.stdout.contains("RESOURCES"), "{out}");
    assert!(out.stdout.contains("gpu 2/2"), "{out}");
    let out = cluster
        .weft(&["run", "--priority", "10", "--", "true"])
        .await;
    assert_eq!(out.code, Some(2), "{out}");
    let out = cluster.weft(&["limit", "delete", "api"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout.trim(), "limit api deleted", "{out}");
    assert!(!out.stderr.contains("api"), "{out}");
    let out = cluster.weft(&["limit", "delete", "api"]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("not found"), "{out}");
    cluster.shutdown().await;
}
