//! Stopping nodes: a drained or SIGTERMed node finishes its running
//! attempts within its grace, and no child process outlives it, not even
//! when the node is SIGKILLed.

use std::time::Duration;

use futures::StreamExt;

use weft_client::{Attempt, EventBody, TaskSpec, TaskState};
use weft_tests::{TestCluster, default_timeout, process_is_alive, read_pid_file, wait_until};

fn sleeper(pidfile: &std::path::Path) -> TaskSpec {
    TaskSpec::exec([
        "sh",
        "-c",
        r#"sleep 300 & echo $! > "$1"; wait"#,
        "sh",
        &pidfile.display().to_string(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_finishes_running_attempts() {
    let cluster = TestCluster::builder().nodes(1).slots(2).start().await;
    let client = cluster.client().await;
    let ids = client
        .submit_many(vec![
            TaskSpec::exec(["sh", "-c", "sleep 0.7; echo one"]),
            TaskSpec::call("sleep", "700ms"),
        ])
        .await
        .expect("submit");
    for id in &ids {
        cluster.wait_for_running(*id).await;
    }
    let stopped = cluster.stop_node("node-0").await;
    assert!(stopped.in_time, "the drain did not finish in time");
    for id in ids {
        let done = client.get(id).await.expect("get");
        assert_eq!(
            (done.state, done.attempt),
            (TaskState::Succeeded, Attempt(1)),
            "{done:?}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_node_process_finish_its_running_task() {
    let cluster = TestCluster::builder().nodes(1).processes().start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::exec(["sh", "-c", "sleep 0.7; echo done"]))
        .await
        .expect("submit");
    cluster.wait_for_running(id).await;
    let stopped = cluster.stop_node("node-0").await;
    assert!(
        stopped.in_time,
        "weft-node did not exit after SIGTERM: {stopped:?}"
    );
    assert!(stopped.status.is_some_and(|s| s.success()), "{stopped:?}");
    let done = client.get(id).await.expect("get");
    assert_eq!(
        (done.state, done.attempt),
        (TaskState::Succeeded, Attempt(1)),
        "{done:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_node_process_leaves_no_orphan_child_processes() {
    let cluster = TestCluster::builder()
        .nodes(1)
        .drain_grace(Duration::from_millis(300))
        .processes()
        .start()
        .await;
    let client = cluster.client().await;
    let pidfile = cluster.dir().join("orphan.pid");
    let id = client.submit(sleeper(&pidfile)).await.expect("submit");
    cluster.wait_for_running(id).await;
    let pid = read_pid_file(&pidfile, default_timeout())
        .await
        .expect("pid file");
    assert!(process_is_alive(pid));

    let stopped = cluster.stop_node("node-0").await;
    assert!(
        stopped.in_time,
        "weft-node did not exit after SIGTERM: {stopped:?}"
    );
    wait_until(Duration::from_secs(5), async || !process_is_alive(pid))
        .await
        .unwrap_or_else(|e| panic!("the task's grandchild {pid} outlived weft-node: {e}"));
    // Cancelled by the drain, not by a client: back in the queue, not final.
    let task = client.get(id).await.expect("get");
    assert!(!task.state.is_final(), "{task:?}");
    cluster.shutdown().await;
}

/// Kills node-0 abruptly with a task running and waits for the task's
/// grandchild to be gone.
async fn killing_the_node_kills_the_tasks_processes(cluster: TestCluster) {
    let client = cluster.client().await;
    let pidfile = cluster.dir().join("killed.pid");
    let id = client.submit(sleeper(&pidfile)).await.expect("submit");
    cluster.wait_for_running(id).await;
    let pid = read_pid_file(&pidfile, default_timeout())
        .await
        .expect("pid file");
    assert!(process_is_alive(pid));
    cluster.kill_node("node-0").await;
    wait_until(Duration::from_secs(5), async || !process_is_alive(pid))
        .await
        .unwrap_or_else(|e| panic!("the task's grandchild {pid} outlived its node: {e}"));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_node_process_takes_its_tasks_processes_with_it() {
    // SIGKILL: no drain, no cleanup in weft-node; its reaper sees it die.
    let cluster = TestCluster::builder().nodes(1).processes().start().await;
    killing_the_node_kills_the_tasks_processes(cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_in_process_node_kills_its_child_processes() {
    let cluster = TestCluster::builder().nodes(1).in_process().start().await;
    killing_the_node_kills_the_tasks_processes(cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_keeps_committed_tasks() {
    let cluster = TestCluster::builder()
        .nodes(1)
        .durable()
        .processes()
        .start()
        .await;
    let client = cluster.client().await;
    let done = client
        .submit(TaskSpec::call("sha256", "abc"))
        .await
        .expect("submit");
    cluster.wait_for_state(done, TaskState::Succeeded).await;
    let queued = client
        .submit(TaskSpec::call("noop", "later").label("gpu", "1"))
        .await
        .expect("submit");

    cluster.restart_coordinator().await;
    cluster.wait_for_nodes(1).await; // node-0 reconnected by itself

    let kept = client
        .get(done)
        .await
        .expect("the finished task survived the restart");
    assert_eq!(kept.state, TaskState::Succeeded, "{kept:?}");
    assert_eq!(
        &kept.output[..],
        b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let waiting = client
        .get(queued)
        .await
        .expect("the queued task survived the restart");
    assert_eq!(waiting.state, TaskState::Queued, "{waiting:?}");
    let gpu = cluster.add_node(1, [("gpu", "1")]).await;
    let ran = cluster.wait_for_final(queued).await;
    assert_eq!(
        (ran.state, ran.node_name.as_deref()),
        (TaskState::Succeeded, Some(gpu.as_str()))
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reconnect_to_a_restarted_coordinator() {
    let cluster = TestCluster::builder().nodes(2).processes().start().await;
    cluster.restart_coordinator().await;
    cluster.wait_for_nodes(2).await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("noop", "after"))
        .await
        .expect("submit");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_running_across_a_coordinator_restart_carries_on_as_the_same_attempt() {
    let cluster = TestCluster::builder()
        .nodes(1)
        .durable()
        .processes()
        .start()
        .await;
    let client = cluster.client().await;
    let marker = cluster.dir().join("runs");
    let script = r#"echo run >> "$1"; sleep 1.5; echo done"#;
    let id = client
        .submit(TaskSpec::exec([
            "sh",
            "-c",
            script,
            "sh",
            &marker.display().to_string(),
        ]))
        .await
        .expect("submit");
    cluster.wait_for_running(id).await;

    cluster.restart_coordinator().await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(
        (done.attempt, done.node_losses),
        (Attempt(1), 0),
        "ran on: {done:?}"
    );
    let runs = std::fs::read_to_string(&marker).expect("the task ran");
    assert_eq!(runs.lines().count(), 1, "the task ran more than once");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_watch_resumes_after_a_coordinator_crash_without_repeating_or_missing_output() {
    let cluster = TestCluster::builder()
        .nodes(1)
        .durable()
        .processes()
        .start()
        .await;
    let client = cluster.client().await;
    let script = "for i in $(seq 1 40); do echo line-$i; sleep 0.05; done";
    let id = client
        .submit(TaskSpec::exec(["sh", "-c", script]))
        .await
        .expect("submit");
    let id_text = id.to_string();
    let watch_args = ["watch", id_text.as_str()];
    let watch = cluster.weft(&watch_args);
    let crash = async {
        // Crash once the task is visibly streaming, so the watcher has
        // printed some lines and must resume after the rest.
        let mut events = client.watch(id, 0).await.expect("watch");
        while let Some(event) = events.next().await {
            if let EventBody::Output { data, .. } = event.expect("event").body
                && String::from_utf8_lossy(&data).contains("line-5\n")
            {
                break;
            }
        }
        drop(events);
        cluster.crash_and_restart_coordinator().await;
    };
    let (watched, ()) = tokio::join!(watch, crash);
    let expected: Vec<String> = (1..=40).map(|i| format!("line-{i}")).collect();
    assert_eq!(
        watched.stdout.lines().collect::<Vec<_>>(),
        expected,
        "weft watch printed lines repeated, missing or out of order; stderr: {}",
        watched.stderr
    );
    assert_eq!(watched.code, Some(0), "stderr: {}", watched.stderr);
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.attempt),
        (TaskState::Succeeded, Attempt(1))
    );
    cluster.shutdown().await;
}
