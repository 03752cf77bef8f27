//! Cancel and timeout stop the whole process group: no child process
//! outlives its attempt.

use std::path::Path;
use std::time::Duration;

use weft_client::{Attempt, Error, TaskSpec, TaskState};
use weft_tests::{TestCluster, default_timeout, process_is_alive, read_pid_file, wait_until};

/// A shell that starts a long `sleep` in the background (a grandchild of
/// the node), writes its pid to `pidfile`, and waits for it.
fn sleeper(pidfile: &Path) -> TaskSpec {
    TaskSpec::exec([
        "sh",
        "-c",
        r#"sleep 300 & echo $! > "$1"; wait"#,
        "sh",
        &pidfile.display().to_string(),
    ])
}

async fn assert_gone(pid: i32) {
    wait_until(Duration::from_secs(5), async || !process_is_alive(pid))
        .await
        .unwrap_or_else(|e| panic!("grandchild {pid} still alive: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_task_leaves_no_child_process_behind() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let pidfile = cluster.dir().join("cancel.pid");
    let id = client.submit(sleeper(&pidfile)).await.expect("submit");
    cluster.wait_for_running(id).await;
    let pid = read_pid_file(&pidfile, default_timeout())
        .await
        .expect("pid file");
    assert!(process_is_alive(pid));

    client.cancel(id).await.expect("cancel");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.attempt),
        (TaskState::Cancelled, Attempt(1)),
        "{done:?}"
    );
    assert_gone(pid).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_its_timeout_is_killed_with_its_children_and_not_retried() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let pidfile = cluster.dir().join("timeout.pid");
    let spec = sleeper(&pidfile)
        .timeout(Duration::from_millis(700))
        .max_attempts(3);
    let id = client.submit(spec).await.expect("submit");
    let pid = read_pid_file(&pidfile, default_timeout())
        .await
        .expect("pid file");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.attempt),
        (TaskState::TimedOut, Attempt(1)),
        "{done:?}"
    );
    assert!(
        !done.error.is_empty(),
        "a timed-out task says why: {done:?}"
    );
    assert_gone(pid).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_handler_past_its_timeout_is_stopped_and_frees_its_slot() {
    let cluster = TestCluster::builder().nodes(1).slots(1).start().await;
    let client = cluster.client().await;
    let spin = TaskSpec::call("spin", "60s").timeout(Duration::from_millis(300));
    let id = client.submit(spin).await.expect("submit");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::TimedOut, "{done:?}");
    // The only slot is free again: the next task runs.
    let next = client
        .submit(TaskSpec::call("noop", "x"))
        .await
        .expect("submit");
    let next = cluster.wait_for_final(next).await;
    assert_eq!(next.state, TaskState::Succeeded, "{next:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_queued_task_ends_it_at_once() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("noop", "").label("gpu", "1"))
        .await
        .expect("submit");
    let answered = client.cancel(id).await.expect("cancel");
    assert_eq!(answered.state, TaskState::Cancelled, "{answered:?}");
    assert_eq!(
        client.get(id).await.expect("get").state,
        TaskState::Cancelled
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_finished_task_is_failed_precondition() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("noop", ""))
        .await
        .expect("submit");
    cluster.wait_for_state(id, TaskState::Succeeded).await;
    let err = client.cancel(id).await.expect_err("already finished");
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    cluster.shutdown().await;
}
