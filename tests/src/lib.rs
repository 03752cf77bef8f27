//! End-to-end test harness for Weft: a real coordinator and real nodes on
//! loopback, driven through the public client API.
//!
//! ```ignore
//! let cluster = TestCluster::builder().nodes(2).heartbeat(Duration::from_millis(100)).start().await;
//! let client = cluster.client().await;
//! let id = client.submit(TaskSpec::call("sleep", "300ms")).await?;
//! let first = cluster.wait_for_running(id).await;
//! cluster.kill_node(first).await;
//! ```
//!
//! Layout:
//! - [`browser`]: headless Chromium through chromedriver, for the
//!   dashboard's tests (skipped without them unless `WEFT_REQUIRE_BROWSER=1`).
//! - [`cluster`]: `TestCluster` and its builder: in-process or real
//!   processes, node kill/stop/add, waits on task and node state.
//! - [`process`]: `weft_cluster`'s finding and spawning of the binaries,
//!   its errors turned into test failures.
//! - [`fake_node`]: a raw `NodeService` session for playing a misbehaving node.
//! - [`cli`]: running the `weft` binary and capturing its output.
//! - [`openmetrics`]: a strict reader of OpenMetrics text, and a plain
//!   HTTP GET, for the metrics listeners.
//! - [`otlp`]: an in-process OTLP trace receiver, for the traces tests.
//! - [`wait`]: `wait_until` and friends; process liveness checks.
//! - [`http`]: an HTTP client of the coordinator's HTTP listener (the
//!   dashboard's API), trusting the cluster CA.
//! - [`trust`]: which CA each running test cluster's URL is trusted by,
//!   so raw channels ([`fake_node::channel`]) dial its TLS like clients.
//!
//! The scenarios live in `tests/e2e/`, one file per concern.

pub mod browser;
pub mod cli;
pub mod cluster;
pub mod fake_node;
pub mod http;
pub mod openmetrics;
pub mod otlp;
pub mod process;
pub mod trust;
pub mod wait;

pub use cli::CliOutput;
pub use cluster::{
    RawAdmin, RawTasks, StandbyCoordinator, Stopped, TestCluster, TestClusterBuilder, spare_addr,
    weft_at,
};
pub use fake_node::FakeNode;
pub use wait::{default_timeout, process_is_alive, read_pid_file, wait_for, wait_until};

/// Installs a test-friendly tracing subscriber once per test binary:
/// output is captured per test and shown only when it fails. `RUST_LOG`
/// overrides the default filter.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,weft_coordinator=info,weft_node=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
