//! `weft get` shows a task's attempts: which node ran each, when it
//! started and ended, how long it took and how it ended; `-o json` has the
//! same as an `attempts` array. The history survives a coordinator restart.

use serde_json::Value;

use weft_client::{Attempt, TaskSpec, TaskState};
use weft_tests::TestCluster;

fn json(out: &weft_tests::cli::CliOutput) -> Value {
    assert_eq!(out.code, Some(0), "{out}");
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_get_shows_each_attempt_of_a_retried_task() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let marker = cluster.dir().join("failed-once");
    // Fails its first attempt, succeeds its second.
    let script = "if [ -e \"$1\" ]; then echo ok; else touch \"$1\"; exit 3; fi";
    let spec =
        TaskSpec::exec(["sh", "-c", script, "sh", &marker.to_string_lossy()]).max_attempts(2);
    let id = client.submit(spec).await.expect("submit");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.attempt),
        (TaskState::Succeeded, Attempt(2)),
        "{done:?}"
    );
    let node = done.node_name.clone().expect("a node");

    let task = json(&cluster.weft(&["-o", "json", "get", &id.to_string()]).await);
    let attempts = task["attempts"].as_array().expect("an attempts array");
    assert_eq!(attempts.len(), 2, "{task}");
    for (i, (attempt, outcome, exit_code)) in attempts
        .iter()
        .zip([("failed", 3), ("succeeded", 0)])
        .map(|(a, (o, c))| (a, o, c))
        .enumerate()
    {
        assert_eq!(attempt["number"], i + 1, "{attempt}");
        assert_eq!(attempt["node"], node.as_str(), "{attempt}");
        assert_eq!(attempt["outcome"], outcome, "{attempt}");
        assert_eq!(attempt["exit_code"], exit_code, "{attempt}");
        for time in ["assigned_at", "started_at", "ended_at"] {
            let at = attempt[time]
                .as_str()
                .unwrap_or_else(|| panic!("{time}: {attempt}"));
            humantime::parse_rfc3339(at).unwrap_or_else(|e| panic!("{time} {at}: {e}"));
        }
        assert!(attempt["duration_ms"].is_u64(), "{attempt}");
    }
    assert!(
        attempts[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("code 3")),
        "{task}"
    );
    assert_eq!(attempts[1]["reason"], "", "{task}");

    let out = cluster.weft(&["get", &id.to_string()]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let table = out
        .stdout
        .split_once("attempts:\n")
        .expect("an attempts table")
        .1;
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "a header and two attempts: {out}");
    for header in ["#", "NODE", "STARTED", "ENDED", "DURATION", "OUTCOME"] {
        assert!(rows[0].contains(header), "{header}: {out}");
    }
    assert!(
        rows[1].trim_start().starts_with('1') && rows[1].contains("failed"),
        "{out}"
    );
    assert!(
        rows[2].trim_start().starts_with('2') && rows[2].contains("succeeded"),
        "{out}"
    );
    assert!(rows[1].contains(&node) && rows[2].contains(&node), "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_lost_with_its_node_says_so_and_the_retry_runs_elsewhere() {
    let cluster = TestCluster::builder().nodes(2).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("sleep", "500ms").max_attempts(2))
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
    let attempts = &done.attempts;
    assert_eq!(attempts.len(), 2, "{done:?}");
    assert_eq!(attempts[0].node_name, first);
    assert_eq!(attempts[0].outcome, None, "no report from a lost node");
    assert!(attempts[0].ended_at.is_some());
    assert!(
        attempts[0].reason.contains("lost"),
        "{:?}",
        attempts[0].reason
    );
    assert_ne!(attempts[1].node_name, first);
    assert_eq!(attempts[1].outcome, Some(weft_client::Outcome::Succeeded));
    let out = cluster.weft(&["get", &id.to_string()]).await;
    assert!(
        out.stdout.contains("ended") && out.stdout.contains("lost"),
        "{out}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attempt_history_survives_a_coordinator_restart() {
    let cluster = TestCluster::builder().nodes(1).durable().start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("fail", "no").max_attempts(2))
        .await
        .expect("submit");
    let before = cluster.wait_for_final(id).await;
    assert_eq!(before.attempts.len(), 2, "{before:?}");
    cluster.restart_coordinator().await;
    let client = cluster.client().await;
    let after = client.get(id).await.expect("get");
    assert_eq!(after.attempts, before.attempts);
    cluster.shutdown().await;
}
