//! The built-in handlers, and what a call to a handler nobody serves does:
//! it waits for a node serving it, up to the schedule timeout.

use futures::StreamExt;

use weft_client::{Attempt, EventBody, Outcome, OutputStream, TaskSpec, TaskState};
use weft_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha256_handler_returns_the_hex_digest() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("sha256", "abc"))
        .await
        .expect("submit");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(
        &done.output[..],
        b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_handler_streams_its_input_and_returns_it() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let mut events = client
        .run(TaskSpec::call("echo", "hello"))
        .await
        .expect("run");
    let mut stdout = Vec::new();
    let mut last = None;
    while let Some(event) = events.next().await {
        let event = event.expect("event");
        match event.body {
            EventBody::Output {
                stream: OutputStream::Stdout,
                data,
            } => stdout.extend_from_slice(&data),
            EventBody::Finished(task) => last = Some(task),
            _ => {}
        }
    }
    let task = last.expect("a finished event");
    assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    assert_eq!(&task.output[..], b"hello");
    assert_eq!(stdout, b"hello");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_handler_fails_with_its_input_as_the_error_after_its_attempts() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("fail", "boom").max_attempts(2))
        .await
        .expect("submit");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Failed, "{done:?}");
    assert_eq!((done.attempt, done.failures), (Attempt(2), 2), "{done:?}");
    assert!(done.error.contains("boom"), "{done:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_handler_fails_after_the_schedule_timeout_with_a_clear_reason() {
    let cluster = TestCluster::builder()
        .nodes(1)
        .schedule_timeout(std::time::Duration::from_secs(1))
        .start()
        .await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("nope", "").max_attempts(3))
        .await
        .expect("submit");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Failed, "{done:?}");
    assert!(
        done.error.contains("unknown handler 'nope'"),
        "{}",
        done.error
    );
    assert!(
        done.error
            .contains("no connected node served it within 1s (schedule timeout"),
        "{}",
        done.error
    );
    assert!(
        done.error.contains("sha256"),
        "the reason lists known handlers: {}",
        done.error
    );
    assert!(done.attempt <= Attempt(1), "not retried: {done:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_binary_fails_to_start_without_retries() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::exec(["/nonexistent/weft-test-binary"]).max_attempts(3))
        .await
        .expect("submit");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Failed, "{done:?}");
    assert_eq!(
        done.attempt,
        Attempt(1),
        "start failures are not retried: {done:?}"
    );
    assert!(!done.error.is_empty(), "{done:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_the_kernel_cannot_execute_fail_to_start_without_retries() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    // A script whose interpreter is missing, and a file that is not a
    // program at all: both exist and are executable, and exec refuses them.
    let dir = cluster.dir();
    let no_interpreter = dir.join("no-interpreter.sh");
    std::fs::write(
        &no_interpreter,
        "#!/nonexistent/weft-interpreter\necho hi\n",
    )
    .unwrap();
    let not_a_program = dir.join("not-a-program");
    std::fs::write(&not_a_program, [0x7f, b'E', b'L', b'F', 0, 0, 0, 0]).unwrap();
    for path in [&no_interpreter, &not_a_program] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for path in [no_interpreter, not_a_program] {
        let spec = TaskSpec::exec([path.display().to_string()]).max_attempts(3);
        let id = client.submit(spec).await.expect("submit");
        let done = cluster.wait_for_final(id).await;
        assert_eq!(
            (done.state, done.attempt, done.last_outcome),
            (TaskState::Failed, Attempt(1), Some(Outcome::StartFailed)),
            "{done:?}"
        );
        assert!(done.error.contains("cannot start"), "{done:?}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_while_its_worker_restarts_waits_for_it_and_runs() {
    use weft_tests::fake_node::register;

    // A node is connected, but none serves `late` (its worker restarts).
    let cluster = TestCluster::builder().nodes(1).start().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("late", "input"))
        .await
        .expect("submit");
    let waiting = cluster.wait_for_state(id, TaskState::Queued).await;
    assert!(
        waiting
            .pending_reason
            .contains("no connected node serves handler 'late'"),
        "{waiting:?}"
    );
    // The worker is back: the call runs there.
    let mut worker = cluster.fake_node(register("worker", 1, &["late"])).await;
    let _beats = worker.keep_alive(std::time::Duration::from_millis(100));
    worker.grant(1).await;
    let assignment = worker.next_assignment(weft_tests::default_timeout()).await;
    assert_eq!(assignment.task_id, id.to_string());
    worker.started(id, 1).await;
    worker
        .finished(id, 1, weft_proto::Outcome::Succeeded, None, b"done")
        .await;
    let done = client.wait(id).await.expect("wait");
    assert_eq!(
        (done.state, done.output.as_ref()),
        (TaskState::Succeeded, &b"done"[..])
    );
    cluster.shutdown().await;
}
