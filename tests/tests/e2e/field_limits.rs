//! Field limits: a spec no node could run, or that would bloat the store,
//! is refused at Submit with INVALID_ARGUMENT naming the field and the
//! limit; what a node reports is stored within its cap.

use std::time::Duration;

use tonic::Code;

use weft_client::{Outcome, TaskSpec, TaskState};
use weft_proto::limits::{
    MAX_CWD_BYTES, MAX_HANDLER_BYTES, MAX_LABEL_KEY_BYTES, MAX_NODE_TEXT_BYTES,
    MAX_TASK_NAME_BYTES, TRUNCATED_MARKER,
};
use weft_proto::pb;
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_tests::fake_node::register;
use weft_tests::{TestCluster, default_timeout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_field_over_its_limit_is_invalid_argument_naming_the_field() {
    let cluster = TestCluster::builder()
        .nodes(0)
        .max_node_slots(16)
        .start()
        .await;
    let long = |n: usize| "a".repeat(n + 1);
    let cases: Vec<(&str, String, TaskSpec)> = vec![
        (
            "call.handler",
            MAX_HANDLER_BYTES.to_string(),
            TaskSpec::call(long(MAX_HANDLER_BYTES), ""),
        ),
        ("call.handler", "NUL".into(), TaskSpec::call("ec\0ho", "")),
        (
            "name",
            MAX_TASK_NAME_BYTES.to_string(),
            TaskSpec::call("echo", "").name(long(MAX_TASK_NAME_BYTES)),
        ),
        (
            "name",
            "NUL".into(),
            TaskSpec::call("echo", "").name("a\0b"),
        ),
        (
            "exec.cwd",
            MAX_CWD_BYTES.to_string(),
            TaskSpec::exec(["true"]).cwd(long(MAX_CWD_BYTES)),
        ),
        (
            "exec.cwd",
            "NUL".into(),
            TaskSpec::exec(["true"]).cwd("/tmp\0"),
        ),
        (
            "labels",
            MAX_LABEL_KEY_BYTES.to_string(),
            TaskSpec::call("echo", "").label(long(MAX_LABEL_KEY_BYTES), "v"),
        ),
        (
            "labels",
            "NUL".into(),
            TaskSpec::call("echo", "").label("zone", "a\0"),
        ),
        (
            "secret_env",
            "NUL".into(),
            TaskSpec::call("echo", "").secret_env("KEY", "v\0"),
        ),
        (
            "slots",
            "--max-node-slots".into(),
            TaskSpec::call("echo", "").slots(17),
        ),
    ];
    let mut raw = cluster.raw_tasks(Some(&cluster.admin_token())).await;
    for (field, limit, spec) in cases {
        let status = raw
            .submit(pb::SubmitRequest {
                tasks: vec![pb::TaskSpec::from(spec)],
            })
            .await
            .expect_err("over a limit");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        let message = status.message();
        assert!(
            message.contains(field) && message.contains(&limit),
            "{message} does not name {field} and {limit}"
        );
    }
    let client = cluster.client().await;
    assert!(
        client.list(None, 100).await.expect("list").is_empty(),
        "nothing refused was kept"
    );
    // At the limits, the same fields are taken.
    let fine = TaskSpec::call("a".repeat(MAX_HANDLER_BYTES), "")
        .name("a".repeat(MAX_TASK_NAME_BYTES))
        .slots(16);
    client.submit(fine).await.expect("at the limits");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_error_from_a_node_is_stored_cut_with_a_marker() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let mut fake = cluster.fake_node(register("talker", 1, &["echo"])).await;
    let _beats = fake.keep_alive(Duration::from_millis(100));
    let id = client
        .submit(TaskSpec::call("echo", "").max_attempts(1))
        .await
        .expect("submit");
    fake.grant(1).await;
    let assignment = fake.next_assignment(default_timeout()).await;
    assert_eq!(assignment.task_id, id.to_string());
    fake.started(id, assignment.attempt).await;
    let huge = "e".repeat(1024 * 1024);
    fake.report(
        id,
        assignment.attempt,
        EventBody::Progress(pb::Progress {
            fraction: 0.5,
            message: huge.clone(),
        }),
    )
    .await;
    fake.report(
        id,
        assignment.attempt,
        EventBody::Finished(pb::Finished {
            outcome: i32::from(Outcome::Failed),
            error: huge,
            ..Default::default()
        }),
    )
    .await;
    let done = client.wait(id).await.expect("wait");
    assert_eq!(done.state, TaskState::Failed, "{done:?}");
    // The node's text, cut; the coordinator's own short note (which
    // attempt of how many) follows it.
    let (text, note) = done
        .error
        .split_once(TRUNCATED_MARKER)
        .expect("cut with the marker");
    assert!(
        text.len() + TRUNCATED_MARKER.len() <= MAX_NODE_TEXT_BYTES,
        "{}",
        text.len()
    );
    assert!(note.len() < 64, "{note}");
    cluster.shutdown().await;
}
