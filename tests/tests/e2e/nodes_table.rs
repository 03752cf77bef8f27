//! `weft nodes`: each node's handlers, so a user sees where a call can run.

use weft_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_nodes_shows_the_handlers_each_node_serves() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let out = cluster.weft(&["nodes"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let mut lines = out.stdout.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(header.last(), Some(&"HANDLERS"), "{out}");
    let row: Vec<&str> = lines.next().expect("one node").split_whitespace().collect();
    let handlers: Vec<&str> = row.last().expect("a handlers cell").split(',').collect();
    for builtin in ["echo", "fail", "noop", "sha256", "sleep"] {
        assert!(
            handlers.contains(&builtin),
            "{builtin} in {handlers:?}: {out}"
        );
    }
    let mut sorted = handlers.clone();
    sorted.sort_unstable();
    assert_eq!(handlers, sorted, "sorted: {out}");
    cluster.shutdown().await;
}
