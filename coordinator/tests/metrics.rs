//! The coordinator's metrics as an operator reads them (`Metrics::encode`,
//! what `/metrics` serves), while a fake node runs real tasks over a
//! loopback socket: every scrape must parse as OpenMetrics, and the
//! numbers must follow what happened.

mod common;
// The e2e harness's OpenMetrics parser, one copy for both crates (its
// plaintext HTTP helper is for the node's listener, unused here).
#[path = "../../tests/src/openmetrics.rs"]
#[allow(dead_code)]
mod openmetrics;

use std::time::{Duration, Instant};

use tonic::transport::Channel;

use common::{DEADLINE, channel, connect};
use openmetrics::Scrape;
use weft_coordinator::{CoordinatorConfig, RunningCoordinator};
use weft_proto::pb::node_message::Body as In;
use weft_proto::pb::task_service_client::TaskServiceClient;
use weft_proto::{TaskSpec, pb};

/// Client tokens off: the metrics are what is tested here.
async fn coordinator() -> RunningCoordinator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = CoordinatorConfig {
        auth: false,
        ..CoordinatorConfig::default()
    };
    weft_coordinator::start(config, listener).await.unwrap()
}

fn scrape(c: &RunningCoordinator) -> Scrape {
    Scrape::parse(&c.metrics().encode())
}

/// Scrapes until `check` holds (gauges follow the driver's batches).
async fn scrape_until(
    c: &RunningCoordinator,
    what: &str,
    check: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = scrape(c);
        if check(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what}:\n{}",
            c.metrics().encode()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn register(name: &str, slots: u32) -> pb::Register {
    pb::Register {
        name: name.into(),
        slots,
        handlers: vec!["noop".into()],
        protocol_version: pb::ProtocolVersion::ProtocolVersion1 as i32,
        ..Default::default()
    }
}

fn started() -> pb::node_task_event::Body {
    pb::node_task_event::Body::Started(pb::Started { pid: 0 })
}

fn failed() -> pb::node_task_event::Body {
    pb::node_task_event::Body::Finished(pb::Finished {
        outcome: pb::Outcome::Failed as i32,
        error: "boom".into(),
        ..Default::default()
    })
}

async fn submit(tasks: &mut TaskServiceClient<Channel>, specs: Vec<TaskSpec>) -> Vec<String> {
    tasks
        .submit(pb::SubmitRequest {
            tasks: specs.into_iter().map(pb::TaskSpec::from).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .task_ids
}

const QUEUED: &[(&str, &str)] = &[("state", "queued")];
const RUNNING: &[(&str, &str)] = &[("state", "running")];

#[tokio::test]
async fn a_fresh_coordinator_exposes_every_family_at_zero() {
    let c = coordinator().await;
    let s = scrape(&c);
    assert_eq!(
        s.get("weft_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
    assert!(s.get("weft_uptime_seconds", &[]) >= 0.0);
    for state in [
        "queued",
        "assigned",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "timed_out",
    ] {
        assert_eq!(s.get("weft_tasks", &[("state", state)]), 0.0, "{state}");
    }
    assert_eq!(s.get("weft_queue_oldest_age_seconds", &[]), 0.0);
    assert_eq!(s.get("weft_nodes", &[("state", "ready")]), 0.0);
    assert_eq!(s.get("weft_task_submit_to_start_seconds_count", &[]), 0.0);
    assert_eq!(s.types["weft_store_commit_seconds"], "histogram");
    assert_eq!(s.types["weft_tasks_finished"], "counter");
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn metrics_follow_submits_nodes_attempts_results_and_commits() {
    let c = coordinator().await;
    let mut node = connect(c.url(), In::Register(register("n1", 2)))
        .await
        .unwrap();
    scrape_until(&c, "one ready node with 2 slots", |s| {
        s.get("weft_nodes", &[("state", "ready")]) == 1.0 && s.get("weft_slots", &[]) == 2.0
    })
    .await;
    let mut tasks = TaskServiceClient::new(channel(c.url()).await);

    // No credits yet: three tasks wait, and the submit is counted.
    let specs = vec![
        TaskSpec::call("noop", "a"),
        TaskSpec::call("noop", "b").max_attempts(2),
        TaskSpec::call("noop", "c"),
    ];
    let ids = submit(&mut tasks, specs).await;
    let s = scrape(&c);
    assert_eq!(
        s.get("weft_tasks", QUEUED),
        3.0,
        "counted by the time the submit is answered"
    );
    assert!(s.get("weft_queue_oldest_age_seconds", &[]) > 0.0);
    assert_eq!(s.get("weft_submit_requests_total", &[]), 1.0);
    assert_eq!(s.get("weft_submitted_tasks_total", &[]), 3.0);
    assert_eq!(s.get("weft_submit_request_size_bytes_count", &[]), 1.0);
    assert!(s.get("weft_submit_request_size_bytes_sum", &[]) > 0.0);
    assert_eq!(s.get("weft_submit_request_tasks_sum", &[]), 3.0);
    assert!(
        s.get("weft_store_commit_seconds_count", &[]) >= 1.0,
        "the submit was committed"
    );
    assert!(
        s.get("weft_store_commit_records_sum", &[]) >= 6.0,
        "at least a record and an event per task"
    );
    assert!(s.get("weft_store_commit_seconds_sum", &[]) > 0.0);

    // Two credits: two attempts assigned, two slots used.
    node.credits(2).await;
    let assigned = node.assigned_ids().await;
    assert_eq!(assigned.len(), 2);
    let s = scrape_until(&c, "two assigned", |s| {
        s.get("weft_tasks", &[("state", "assigned")]) == 2.0
    })
    .await;
    assert_eq!(s.get("weft_tasks", QUEUED), 1.0);
    assert_eq!(s.get("weft_slots_used", &[]), 2.0);
    assert_eq!(s.get("weft_slots_free", &[]), 0.0);

    // Both start; `a` succeeds, `b` fails and is retried after its backoff.
    node.event(&ids[0], 1, started()).await;
    node.event(&ids[1], 1, started()).await;
    scrape_until(&c, "two running", |s| s.get("weft_tasks", RUNNING) == 2.0).await;
    node.finished(&ids[0], 1).await;
    node.event(&ids[1], 1, failed()).await;
    let s = scrape_until(&c, "a result", |s| {
        s.get(
            "weft_tasks_finished_total",
            &[("kind", "call"), ("state", "succeeded")],
        ) == 1.0
    })
    .await;
    assert_eq!(s.get("weft_tasks", &[("state", "succeeded")]), 1.0);
    assert_eq!(
        s.get("weft_task_retries_total", &[("reason", "failed")]),
        1.0
    );
    assert_eq!(s.get("weft_task_retries_total", &[("reason", "node")]), 0.0);
    assert_eq!(s.get("weft_task_submit_to_start_seconds_count", &[]), 2.0);
    assert!(s.get("weft_task_submit_to_start_seconds_sum", &[]) > 0.0);
    assert_eq!(s.get("weft_attempt_run_seconds_count", &[]), 2.0);
    assert_eq!(
        s.get(
            "weft_tasks_finished_total",
            &[("kind", "exec"), ("state", "succeeded")]
        ),
        0.0
    );

    // An event for an attempt that is not the task's current one.
    node.event(&ids[0], 7, started()).await;
    scrape_until(&c, "a refused stale event", |s| {
        s.get("weft_stale_events_refused_total", &[]) == 1.0
    })
    .await;
    c.shutdown(DEADLINE).await.unwrap();
}

#[tokio::test]
async fn watch_streams_are_counted_while_open() {
    let c = coordinator().await;
    let mut tasks = TaskServiceClient::new(channel(c.url()).await);
    let ids = submit(&mut tasks, vec![TaskSpec::call("noop", "a")]).await;
    let watch = tasks
        .watch(pb::WatchRequest {
            task_id: ids[0].clone(),
            from_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let wait = tasks
        .wait_many(pb::WaitManyRequest {
            task_ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    scrape_until(&c, "a watch and a wait", |s| {
        s.get("weft_watch_streams", &[("rpc", "watch")]) == 1.0
            && s.get("weft_watch_streams", &[("rpc", "wait_many")]) == 1.0
    })
    .await;
    drop(watch);
    scrape_until(&c, "the watch closed", |s| {
        s.get("weft_watch_streams", &[("rpc", "watch")]) == 0.0
    })
    .await;
    drop(wait);
    scrape_until(&c, "the wait closed", |s| {
        s.get("weft_watch_streams", &[("rpc", "wait_many")]) == 0.0
    })
    .await;
    c.shutdown(DEADLINE).await.unwrap();
}
