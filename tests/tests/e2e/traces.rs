//! Traces: with `--otlp-endpoint` a coordinator exports one trace per task
//! (spans `task`, `submit`, `commit`, `queued`, `attempt N`, `result`) to
//! an OTLP receiver; the attempt's span is the parent in its Assign, so a
//! worker's own spans (and an exec task's `$TRACEPARENT`) join the trace;
//! a client's trace context makes the task part of the client's trace.

use futures::StreamExt;
use tonic::Code;

use weft_client::{EventBody, TaskSpec, TaskState};
use weft_proto::{Outcome, TraceContext, pb};
use weft_tests::otlp::{OtlpReceiver, ReceivedSpan};
use weft_tests::{TestCluster, default_timeout, fake_node};

/// A client's context: trace `4bf9…4736`, parent span `00f0…02b7`.
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn client_context() -> TraceContext {
    TraceContext::parse(
        &format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
        "vendor=value",
    )
    .expect("a valid context")
}

/// The one span named `name`; panics listing them all otherwise.
fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name:?} span in {spans:#?}");
    found[0]
}

/// What an exec task printed on stdout, run to its end.
async fn stdout_of(client: &weft_client::Client, spec: TaskSpec) -> (String, weft_client::Task) {
    let mut events = client.run(spec).await.expect("run");
    let mut out = Vec::new();
    while let Some(event) = events.next().await {
        match event.expect("event").body {
            EventBody::Output { data, .. } => out.extend_from_slice(&data),
            EventBody::Finished(task) => {
                return (String::from_utf8_lossy(&out).into_owned(), task);
            }
            _ => {}
        }
    }
    panic!("the run ended without its final event")
}

fn echo_traceparent() -> TaskSpec {
    TaskSpec::exec(["sh", "-c", "printf %s \"$TRACEPARENT\""]).max_attempts(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_exports_its_spans_in_one_trace_and_its_process_joins_it() {
    let receiver = OtlpReceiver::start().await;
    let cluster = TestCluster::builder()
        .nodes(1)
        .otlp_endpoint(receiver.url())
        .start()
        .await;
    let client = cluster.client().await;
    let (stdout, task) = stdout_of(&client, echo_traceparent()).await;
    assert_eq!(task.state, TaskState::Succeeded);
    let id = task.id.to_string();
    let spans = receiver.wait_for_task(&id).await;

    let root = one(&spans, "task");
    assert_eq!(
        root.parent_span_id, "",
        "a task without a client context is a root"
    );
    assert_eq!(root.attr("weft.task.state"), Some("succeeded"));
    assert_eq!(root.service_name, "weft-coordinator");
    for name in ["submit", "queued", "attempt 1", "result"] {
        let span = one(&spans, name);
        assert_eq!(
            span.parent_span_id, root.span_id,
            "{name} is the task's child"
        );
        assert!(span.start <= span.end, "{span:?}");
        assert!(
            span.end <= root.end,
            "{name} ends within the task: {spans:#?}"
        );
    }
    let commit = one(&spans, "commit");
    assert_eq!(commit.parent_span_id, one(&spans, "submit").span_id);
    assert!(commit.attr("weft.commit.records").is_some(), "{commit:?}");
    let attempt = one(&spans, "attempt 1");
    assert_eq!(attempt.attr("weft.node.name"), Some("node-0"));
    assert_eq!(attempt.attr("weft.outcome"), Some("succeeded"));
    assert_eq!(attempt.attr("process.exit.code"), Some("0"));
    // The process ran under its attempt's span, in the task's trace.
    assert_eq!(
        stdout,
        format!("00-{}-{}-01", root.trace_id, attempt.span_id)
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_task_has_a_span_per_attempt() {
    let receiver = OtlpReceiver::start().await;
    let cluster = TestCluster::builder()
        .nodes(1)
        .otlp_endpoint(receiver.url())
        .start()
        .await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::exec(["sh", "-c", "exit 3"]).max_attempts(2))
        .await
        .expect("submit");
    let done = client.wait(id).await.expect("wait");
    assert_eq!((done.state, done.attempt.0), (TaskState::Failed, 2));
    let spans = receiver.wait_for_task(&id.to_string()).await;
    let root = one(&spans, "task");
    let queued: Vec<_> = spans.iter().filter(|s| s.name == "queued").collect();
    assert_eq!(queued.len(), 2, "{spans:#?}");
    for n in [1, 2] {
        let attempt = one(&spans, &format!("attempt {n}"));
        assert_eq!(attempt.parent_span_id, root.span_id);
        assert_eq!(attempt.attr("weft.outcome"), Some("failed"));
    }
    let first = one(&spans, "attempt 1")
        .attr("weft.requeued")
        .unwrap_or_default();
    assert!(first.contains("exited with code 3"), "{first}");
    assert_eq!(
        one(&spans, "attempt 2").attr("process.exit.code"),
        Some("3")
    );
    assert_ne!(
        one(&spans, "attempt 1").span_id,
        one(&spans, "attempt 2").span_id
    );
    assert_eq!(root.attr("weft.task.state"), Some("failed"));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assign_names_the_attempt_span_in_the_clients_trace() {
    let receiver = OtlpReceiver::start().await;
    let cluster = TestCluster::builder()
        .nodes(0)
        .otlp_endpoint(receiver.url())
        .start()
        .await;
    let mut runner = cluster
        .fake_node(fake_node::register("runner", 1, &["noop"]))
        .await;
    runner.grant(1).await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("noop", "in").trace(client_context()))
        .await
        .expect("submit");
    let assignment = runner.next_assignment(default_timeout()).await;
    let trace = assignment
        .trace
        .clone()
        .expect("the Assign carries a trace");
    let sent = TraceContext::try_from(&trace).expect("a valid traceparent");
    assert_eq!(sent.trace_id_hex(), CLIENT_TRACE);
    assert_eq!(sent.state, "vendor=value", "tracestate travels on");
    runner.started(id, assignment.attempt).await;
    runner
        .finished(id, assignment.attempt, Outcome::Succeeded, None, b"out")
        .await;
    client.wait(id).await.expect("wait");

    let spans = receiver.wait_for_task(&id.to_string()).await;
    let root = one(&spans, "task");
    assert_eq!(root.trace_id, CLIENT_TRACE);
    assert_eq!(
        root.parent_span_id, CLIENT_SPAN,
        "the task is the client's child"
    );
    let attempt = one(&spans, "attempt 1");
    assert_eq!(
        trace.traceparent,
        format!("00-{CLIENT_TRACE}-{}-01", attempt.span_id),
        "the worker's spans are children of the attempt's"
    );
    assert_eq!(attempt.attr("weft.node.name"), Some("runner"));
    // The spec keeps the client's own context (what Get shows).
    let got = client.get(id).await.expect("get");
    assert_eq!(got.spec.and_then(|s| s.trace), Some(client_context()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_export_the_clients_context_reaches_the_node_unchanged() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let mut runner = cluster
        .fake_node(fake_node::register("runner", 2, &["noop"]))
        .await;
    runner.grant(2).await;
    let client = cluster.client().await;
    client
        .submit(TaskSpec::call("noop", "in").trace(client_context()))
        .await
        .expect("submit");
    let traced = runner.next_assignment(default_timeout()).await;
    assert_eq!(traced.trace, Some(client_context().to_pb()));
    client
        .submit(TaskSpec::call("noop", "in"))
        .await
        .expect("submit");
    let untraced = runner.next_assignment(default_timeout()).await;
    assert_eq!(untraced.trace, None, "no trace is made up without export");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_trace_context_is_invalid_argument() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let mut raw = cluster.raw_tasks(Some(&cluster.admin_token())).await;
    let spec = |traceparent: &str, tracestate: String| {
        let mut spec = pb::TaskSpec::from(TaskSpec::call("noop", ""));
        spec.trace = Some(pb::TraceContext {
            traceparent: traceparent.to_owned(),
            tracestate,
        });
        spec
    };
    let good = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    for (bad, field) in [
        (spec("00-abc-def-01", String::new()), "trace.traceparent"),
        (
            spec(
                &format!("00-{}-{CLIENT_SPAN}-01", "0".repeat(32)),
                String::new(),
            ),
            "trace.traceparent",
        ),
        (
            spec(&good, format!("k={}", "v".repeat(600))),
            "trace.tracestate",
        ),
    ] {
        let status = raw
            .submit(pb::SubmitRequest { tasks: vec![bad] })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{status:?}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_keeps_the_tasks_trace() {
    let receiver = OtlpReceiver::start().await;
    let cluster = TestCluster::builder()
        .nodes(1)
        .durable()
        .otlp_endpoint(receiver.url())
        .start()
        .await;
    let client = cluster.client().await;
    // Waits for a node that does not exist yet.
    let id = client
        .submit(echo_traceparent().label("zone", "later"))
        .await
        .expect("submit");
    let task_id = id.to_string();
    let before = receiver
        .wait_for_span(|s| s.name == "submit" && s.attr("weft.task.id") == Some(&task_id))
        .await;
    cluster.restart_coordinator().await;
    cluster.wait_for_nodes(1).await;
    cluster.add_node(1, [("zone", "later")]).await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded);
    let spans = receiver.wait_for_task(&task_id).await;
    let root = one(&spans, "task");
    assert_eq!(
        root.trace_id, before.trace_id,
        "the same trace after the restart"
    );
    assert_eq!(
        before.parent_span_id, root.span_id,
        "under the same root span"
    );
    let attempt = one(&spans, "attempt 1");
    assert_eq!(attempt.parent_span_id, root.span_id);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_continues_the_trace_in_traceparent() {
    let receiver = OtlpReceiver::start().await;
    let cluster = TestCluster::builder()
        .nodes(1)
        .otlp_endpoint(receiver.url())
        .start()
        .await;
    let token = cluster.admin_token();
    let env = [
        ("TRACEPARENT", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")),
        ("TRACESTATE", "vendor=value".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = cluster
        .weft_as(
            Some(&token),
            &env,
            &[
                "run",
                "--",
                "sh",
                "-c",
                "printf '%s %s' \"$TRACEPARENT\" \"$TRACESTATE\"",
            ],
        )
        .await;
    assert_eq!(run.code, Some(0), "{run}");
    let (traceparent, tracestate) = run.stdout.split_once(' ').expect("two words");
    let ctx = TraceContext::parse(traceparent, tracestate).expect("a valid context");
    assert_eq!(ctx.trace_id_hex(), CLIENT_TRACE, "{run}");
    assert_eq!(ctx.state, "vendor=value");

    let submit = cluster
        .weft_as(Some(&token), &env, &["submit", "--", "true"])
        .await;
    assert_eq!(submit.code, Some(0), "{submit}");
    let id = submit.stdout.trim().to_owned();
    let spans = receiver.wait_for_task(&id).await;
    let root = one(&spans, "task");
    assert_eq!(
        (root.trace_id.as_str(), root.parent_span_id.as_str()),
        (CLIENT_TRACE, CLIENT_SPAN)
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_submit_exports_a_submit_span_over_each_tasks_commit() {
    let receiver = OtlpReceiver::start().await;
    let cluster = TestCluster::builder()
        .nodes(1)
        .otlp_endpoint(receiver.url())
        .start()
        .await;
    let client = cluster.client().await;
    // The child is submitted PENDING: its first event is not QUEUED.
    let submitted = client
        .submit_graph(vec![
            TaskSpec::exec(["true"]).ref_name("parent"),
            TaskSpec::exec(["true"]).after_ref("parent"),
        ])
        .await
        .expect("submit");
    for id in submitted.task_ids {
        assert_eq!(cluster.wait_for_final(id).await.state, TaskState::Succeeded);
        let spans = receiver.wait_for_task(&id.to_string()).await;
        let submit = one(&spans, "submit");
        assert_eq!(submit.parent_span_id, one(&spans, "task").span_id);
        assert_eq!(one(&spans, "commit").parent_span_id, submit.span_id);
        one(&spans, "queued");
    }
    cluster.shutdown().await;
}
