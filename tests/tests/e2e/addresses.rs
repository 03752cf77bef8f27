//! Coordinator addresses are forgiving and checked: `HOST:PORT` without a
//! scheme works for `weft-node` and `weft` (and the client library), and
//! garbage is refused at once with the forms that work, never retried.

use weft_client::{Client, TaskSpec, TaskState};
use weft_tests::process::spawn;
use weft_tests::{TestCluster, default_timeout, weft_at};

const FORMS: &str = "expected HOST:PORT or http(s)://HOST:PORT";

/// `127.0.0.1:PORT`: the cluster's address without its scheme.
fn bare(cluster: &TestCluster) -> String {
    let url = cluster.url();
    url.strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("the harness's URL is {url}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weft_node_given_host_and_port_without_a_scheme_registers_and_runs_a_task() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    // The join token names the bare address too.
    let (token, _) = cluster
        .client()
        .await
        .create_join_token("bare", None, 1, &bare(&cluster))
        .await
        .expect("a join token");
    let state_dir = cluster.dir().join("bare-state").display().to_string();
    let args: Vec<String> = [
        "--coordinator",
        &bare(&cluster),
        "--join",
        &token,
        "--state-dir",
        &state_dir,
        "--name",
        "bare",
        "--slots",
        "1",
    ]
    .map(str::to_owned)
    .to_vec();
    let node = spawn("weft-node", &args, cluster.dir(), "bare");
    let nodes = cluster.wait_for_nodes(1).await;
    assert_eq!(nodes[0].name, "bare");
    let client = Client::connect_secure(
        &bare(&cluster),
        cluster.trust().as_ref(),
        Some(&cluster.admin_token()),
    )
    .await
    .expect("client");
    let id = client
        .submit(TaskSpec::exec(["echo", "hi"]))
        .await
        .expect("submit");
    let task = cluster.wait_for_final(id).await;
    assert_eq!(
        (task.state, task.node_name.as_deref()),
        (TaskState::Succeeded, Some("bare")),
        "{task:?}"
    );
    let (status, in_time) = node
        .terminate(default_timeout())
        .await
        .expect("stopping weft-node");
    assert!(in_time && status.success(), "{status}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weft_node_given_garbage_exits_at_once_naming_the_forms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args: Vec<String> = ["--coordinator", "localhost"].map(str::to_owned).to_vec();
    let mut node = spawn("weft-node", &args, dir.path(), "garbage");
    let status = tokio::time::timeout(default_timeout(), node.wait())
        .await
        .unwrap_or_else(|_| panic!("weft-node kept going:\n{}", node.log_text()))
        .expect("waiting for weft-node");
    let log = node.log_text();
    assert_eq!(status.code(), Some(2), "a usage error\n{log}");
    assert!(
        log.contains(&format!("invalid coordinator address 'localhost': {FORMS}")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_host_and_port_without_a_scheme_and_refuses_garbage_as_usage() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let url = cluster.url();
    let token = cluster.admin_token();
    let nodes = weft_at(
        &url,
        &["--coordinator", &bare(&cluster), "--token", &token, "nodes"],
    )
    .await;
    assert_eq!(nodes.code, Some(0), "{nodes}");
    assert!(nodes.stdout.contains("node-0"), "{nodes}");

    let garbage = weft_at(&url, &["--coordinator", "http://:7070", "nodes"]).await;
    assert_eq!(garbage.code, Some(2), "{garbage}");
    assert!(
        garbage.stderr.contains(&format!(
            "invalid coordinator address 'http://:7070': {FORMS}"
        )),
        "{garbage}"
    );
    cluster.shutdown().await;
}
