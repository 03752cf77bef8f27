//! What one node may declare: more slots than `--max-node-slots` is
//! refused at `Register` with a message naming the limit and the flag (a
//! real `weft-node` then exits non-zero instead of retrying), and a node's
//! prefetch is capped at the same bound, so it is never sent more than
//! `slots + max-node-slots` slots of work, however much it grants.

use std::time::Duration;

use weft_client::TaskSpec;
use weft_proto::pb;
use weft_proto::pb::coordinator_message::Body as FromCoordinator;
use weft_proto::pb::node_message::Body as ToCoordinator;
use weft_tests::fake_node::register;
use weft_tests::process::spawn;
use weft_tests::{FakeNode, TestCluster, default_timeout};

/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(500);

/// Assignments that arrive until the stream is quiet for [`QUIET`].
async fn drain_assignments(fake: &mut FakeNode) -> Vec<pb::Assignment> {
    let mut got = Vec::new();
    while let Some(msg) = fake.recv(QUIET).await {
        if let FromCoordinator::Assign(assign) = msg {
            got.extend(assign.tasks);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_declaring_more_slots_than_the_limit_is_refused_naming_the_flag() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let refused = cluster
        .open_raw("huge", ToCoordinator::Register(register("huge", 5000, &[])))
        .await
        .map(|_| ())
        .expect_err("5000 slots is over the default limit");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains(
            "node declares 5000 slots; this coordinator accepts at most 1024 (--max-node-slots)"
        ),
        "{refused:?}"
    );
    let nodes = cluster.client().await.nodes().await.expect("nodes");
    assert!(nodes.is_empty(), "a refused node is listed: {nodes:?}");
    // The limit itself is accepted.
    let _fine = cluster.fake_node(register("max", 1024, &[])).await;
    cluster.wait_for_nodes(1).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_sent_at_most_its_slots_plus_a_prefetch_capped_at_the_limit() {
    let cluster = TestCluster::builder()
        .nodes(0)
        .max_node_slots(4)
        .start()
        .await;
    let client = cluster.client().await;
    let greedy = pb::Register {
        prefetch: 1_000_000,
        ..register("greedy", 4, &[])
    };
    let mut fake = cluster.fake_node(greedy).await;
    let _beats = fake.keep_alive(Duration::from_millis(100));
    let specs = (0..20).map(|_| TaskSpec::exec(["true"])).collect();
    client.submit_many(specs).await.expect("submit");
    fake.grant(1_000_000).await;
    let got = drain_assignments(&mut fake).await;
    assert_eq!(got.len(), 8, "4 slots + prefetch capped at 4");
    fake.grant(1_000_000).await;
    let more = drain_assignments(&mut fake).await;
    assert!(
        more.is_empty(),
        "granting again went past the cap: {} more",
        more.len()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weft_node_with_more_slots_than_the_limit_exits_with_the_reason() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let token = cluster.join_token("huge").await;
    let state_dir = cluster.dir().join("huge-state").display().to_string();
    let args: Vec<String> = [
        "--join",
        &token,
        "--state-dir",
        &state_dir,
        "--name",
        "huge",
        "--slots",
        "5000",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut node = spawn("weft-node", &args, cluster.dir(), "huge");
    let status = tokio::time::timeout(default_timeout(), node.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "weft-node kept retrying a refused registration:\n{}",
                node.log_text()
            )
        })
        .expect("waiting for weft-node");
    let log = node.log_text();
    assert_eq!(status.code(), Some(1), "{status}\n{log}");
    assert!(
        log.contains("coordinator refused to register this node: node declares 5000 slots; this coordinator accepts at most 1024 (--max-node-slots)"),
        "{log}"
    );
    assert_eq!(
        log.matches("node declares 5000 slots").count(),
        1,
        "registered more than once:\n{log}"
    );
    cluster.shutdown().await;
}
