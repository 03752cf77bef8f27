//! A node's own metrics listener as an operator uses it: `weft-node
//! --http-listen 127.0.0.1:0 --http-addr-file FILE` serves `/healthz` and
//! `/metrics`; the text parses as OpenMetrics and counts the tasks the
//! node ran. A non-loopback address without `--http-listen-any` is refused
//! at start.
//!
//! The node is the real binary in both modes (the flag is the binary's);
//! the coordinator is the harness's, in-process or a process.
//!
//! The coordinator's `/metrics` on its HTTPS listener: a `read` token gets
//! OpenMetrics text that counts what was submitted; no token, or one
//! without `read`, gets nothing. (What each coordinator metric follows is
//! tested through `Metrics::encode` in `coordinator/tests/metrics.rs`.)

use std::net::SocketAddr;
use std::time::Duration;

use weft_client::{TaskSpec, TaskState};
use weft_tests::http::HttpClient;
use weft_tests::openmetrics::{Scrape, get};
use weft_tests::process::spawn;
use weft_tests::{TestCluster, default_timeout};

/// How often the address file is read while the node starts.
const POLL: Duration = Duration::from_millis(20);

async fn scrape(addr: SocketAddr) -> Scrape {
    let response = get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(response.status, 200, "{response:?}");
    let kind = response.header("content-type").unwrap_or_default();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    Scrape::parse(&response.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_metrics_that_count_the_tasks_it_ran() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let token = cluster.join_token("metered").await;
    let state_dir = cluster.dir().join("metered-state").display().to_string();
    let addr_file = cluster.dir().join("metered.http");
    let args: Vec<String> = [
        "--join",
        &token,
        "--state-dir",
        &state_dir,
        "--name",
        "metered",
        "--slots",
        "2",
        "--http-listen",
        "127.0.0.1:0",
        "--http-addr-file",
        &addr_file.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut node = spawn("weft-node", &args, cluster.dir(), "metered");
    let addr = weft_cluster::wait_for_addr_file(&mut node, &addr_file, default_timeout(), POLL)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log_text()));
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    cluster.wait_for_nodes(1).await;

    let health = get(addr, "/healthz").await.expect("GET /healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let missing = get(addr, "/tasks").await.expect("GET /tasks");
    assert_eq!(missing.status, 404, "only /metrics and /healthz");

    let before = scrape(addr).await;
    assert_eq!(before.get("weft_node_slots", &[]), 2.0);
    assert_eq!(before.get("weft_node_attempts_started_total", &[]), 0.0);
    assert_eq!(
        before.get(
            "weft_node_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // Registered once the coordinator lists it (the gauge is read per scrape).
    weft_tests::wait_until(default_timeout(), async || {
        scrape(addr).await.get("weft_node_connected", &[]) == 1.0
    })
    .await
    .expect("weft_node_connected 1");

    let client = cluster.client().await;
    let ok = [
        client
            .submit(TaskSpec::call("echo", "a"))
            .await
            .expect("submit"),
        client
            .submit(TaskSpec::exec(["true"]))
            .await
            .expect("submit"),
    ];
    let failed = client
        .submit(TaskSpec::call("fail", "boom").max_attempts(1))
        .await
        .expect("submit");
    for id in ok {
        assert_eq!(cluster.wait_for_final(id).await.state, TaskState::Succeeded);
    }
    assert_eq!(
        cluster.wait_for_final(failed).await.state,
        TaskState::Failed
    );

    // Counted before each result left the node.
    let after = scrape(addr).await;
    assert_eq!(after.get("weft_node_attempts_started_total", &[]), 3.0);
    let finished =
        |outcome| after.get("weft_node_attempts_finished_total", &[("outcome", outcome)]);
    assert_eq!((finished("succeeded"), finished("failed")), (2.0, 1.0));
    assert_eq!(finished("timed_out"), 0.0);
    assert_eq!(after.get("weft_node_attempt_run_seconds_count", &[]), 3.0);
    assert_eq!(after.types["weft_node_attempt_run_seconds"], "histogram");
    assert_eq!(after.get("weft_node_session_losses_total", &[]), 0.0);
    assert_eq!(after.get("weft_node_draining", &[]), 0.0);

    let (status, in_time) = node
        .terminate(default_timeout())
        .await
        .expect("stopping weft-node");
    assert!(in_time && status.success(), "{status}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_a_metrics_address_that_is_not_loopback_unless_told() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args: Vec<String> = ["--coordinator", "127.0.0.1:1", "--http-listen", "0.0.0.0:0"]
        .map(str::to_owned)
        .to_vec();
    let mut node = spawn("weft-node", &args, dir.path(), "wide");
    let status = tokio::time::timeout(default_timeout(), node.wait())
        .await
        .unwrap_or_else(|_| panic!("weft-node kept going:\n{}", node.log_text()))
        .expect("waiting for weft-node");
    let log = node.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("--http-listen 0.0.0.0:0 is not a loopback address")
            && log.contains("--http-listen-any"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_serves_metrics_to_a_read_token_over_its_https_listener() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let http = HttpClient::new(&cluster.http_url(), cluster.ca_file());
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("echo", "counted"))
        .await
        .expect("submit");
    assert_eq!(cluster.wait_for_final(id).await.state, TaskState::Succeeded);

    let reader = cluster.scoped_token(&["read"]).await;
    let response = http.get("/metrics", &reader).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert!(
        response
            .header("content-type")
            .starts_with("application/openmetrics-text"),
        "{response:?}"
    );
    let scrape = Scrape::parse(&String::from_utf8_lossy(&response.body));
    assert!(scrape.get("weft_submitted_tasks_total", &[]) >= 1.0);
    assert!(
        scrape.get(
            "weft_tasks_finished_total",
            &[("kind", "call"), ("state", "succeeded")]
        ) >= 1.0
    );
    assert_eq!(scrape.get("weft_nodes", &[("state", "ready")]), 1.0);
    assert!(scrape.get("weft_store_commit_seconds_count", &[]) >= 1.0);

    let anonymous = http.request("GET", "/metrics", &[], None).await;
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    let submitter = cluster.scoped_token(&["submit"]).await;
    assert_eq!(http.get("/metrics", &submitter).await.status, 403);
    cluster.shutdown().await;
}
