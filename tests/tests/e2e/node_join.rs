//! Nodes join with a token and are their certificate: a real `weft-node`
//! joins with `--join TOKEN` alone (the token gives the address and the CA
//! pin), keeps its identity in `--state-dir` and comes back from it without
//! a token under the same node id; a used-up token is refused with a
//! message that says how to get one; certificates of a few seconds are
//! renewed over the live session through a run of 40 tasks with nothing
//! lost or run twice; a revoked node stops its tasks and exits non-zero
//! within seconds while its tasks finish on another node.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;

use weft_client::{
    Attempt, Client, EventBody, NodeState, OutputStream, TaskId, TaskSpec, TaskState,
};
use weft_tests::process::{ChildProcess, spawn};
use weft_tests::{TestCluster, default_timeout, wait_until};

/// What a finished task wrote to stdout (its events, from the start).
async fn stdout(client: &Client, id: TaskId) -> String {
    let mut events = client.watch(id, 0).await.expect("watch");
    let mut out = String::new();
    while let Some(event) = events.next().await {
        if let EventBody::Output {
            stream: OutputStream::Stdout,
            data,
        } = event.expect("a healthy event stream").body
        {
            out.push_str(&String::from_utf8_lossy(&data));
        }
    }
    out
}

/// A `weft-node` process joining with `token` (no --coordinator, no CA:
/// the token gives both), its identity in `<cluster dir>/<name>-state`.
fn joined_node(cluster: &TestCluster, name: &str, token: Option<&str>, slots: u32) -> ChildProcess {
    let mut args = vec![
        "--name".to_owned(),
        name.to_owned(),
        "--state-dir".to_owned(),
        state_dir(cluster, name).display().to_string(),
        "--slots".to_owned(),
        slots.to_string(),
        "--drain-grace".to_owned(),
        "2s".to_owned(),
    ];
    if let Some(token) = token {
        args.extend(["--join".to_owned(), token.to_owned()]);
    }
    spawn("weft-node", &args, cluster.dir(), name)
}

fn state_dir(cluster: &TestCluster, name: &str) -> PathBuf {
    cluster.dir().join(format!("{name}-state"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("exists")
        .permissions()
        .mode()
        & 0o777
}

/// A join token for `uses` joins, valid an hour.
async fn join_token(cluster: &TestCluster, uses: u32) -> String {
    let (token, _) = cluster
        .client()
        .await
        .create_join_token("e2e", Some(Duration::from_secs(3600)), uses, "")
        .await
        .expect("create a join token");
    assert!(token.starts_with("weftjoin_"), "{token}");
    token
}

/// Waits until `node` exits; answers its exit code.
async fn exit_code(node: &mut ChildProcess, within: Duration) -> Option<i32> {
    let status = tokio::time::timeout(within, node.wait())
        .await
        .unwrap_or_else(|_| panic!("the node still runs:\n{}", node.log_text()))
        .expect("waiting for the node");
    status.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_a_token_and_restarts_from_its_state_dir_without_one() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let token = join_token(&cluster, 1).await;
    let node = joined_node(&cluster, "joiner", Some(&token), 2);
    let nodes = cluster.wait_for_nodes(1).await;
    assert_eq!(nodes[0].name, "joiner");
    let node_id = nodes[0].id;
    let id = client
        .submit(TaskSpec::exec(["echo", "joined"]))
        .await
        .expect("submit");
    let task = cluster.wait_for_final(id).await;
    assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
    assert_eq!(stdout(&client, id).await, "joined\n");
    let state = state_dir(&cluster, "joiner");
    assert_eq!(mode(&state), 0o700);
    for file in ["node.key", "node.pem", "ca.pem", "node.conf"] {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }
    let conf = std::fs::read_to_string(state.join("node.conf")).expect("node.conf");
    assert!(conf.contains(&format!("node_id={node_id}\n")), "{conf}");
    assert!(
        !node.log_text().contains(&token),
        "the token is never logged"
    );
    let (status, clean) = node.terminate(default_timeout()).await.expect("stop");
    assert!(clean && status.success(), "{status:?}");

    // Restarted without a token: the same node id, work runs.
    let node = joined_node(&cluster, "joiner", None, 2);
    wait_until(default_timeout(), async || {
        client.nodes().await.is_ok_and(|nodes| {
            nodes
                .iter()
                .any(|n| n.id == node_id && n.state == NodeState::Ready)
        })
    })
    .await
    .unwrap_or_else(|_| panic!("did not come back:\n{}", node.log_text()));
    let id = client
        .submit(TaskSpec::exec(["echo", "again"]))
        .await
        .expect("submit");
    assert_eq!(cluster.wait_for_final(id).await.state, TaskState::Succeeded);

    // The token was for one join: a second node is refused, saying why.
    let mut second = joined_node(&cluster, "second", Some(&token), 1);
    assert_eq!(exit_code(&mut second, default_timeout()).await, Some(1));
    let log = second.log_text();
    assert!(
        log.contains("wrong, expired, revoked or used up")
            && log.contains("weft token create --role node"),
        "{log}"
    );
    assert!(!state_dir(&cluster, "second").join("node.conf").exists());
    let _ = node.terminate(default_timeout()).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_seconds_are_renewed_through_a_run_with_nothing_lost_or_run_twice() {
    let cluster = TestCluster::builder()
        .nodes(0)
        .node_cert_lifetime(Duration::from_secs(3))
        .start()
        .await;
    let client = cluster.client().await;
    let token = join_token(&cluster, 1).await;
    let node = joined_node(&cluster, "renewer", Some(&token), 4);
    let node_id = cluster.wait_for_nodes(1).await[0].id;
    let renewals = || {
        node.log_text()
            .matches("renewed the node's certificate")
            .count()
    };
    // Four waves of ten tasks; after each of the first three, the next
    // waits for the node to renew its certificate while the wave runs, so
    // the run spans several certificates.
    let mut ids = Vec::new();
    for wave in 0..4 {
        let seen = renewals();
        for i in wave * 10..(wave + 1) * 10 {
            let spec = TaskSpec::exec(["sh", "-c", &format!("sleep 0.4; echo t{i}")]);
            ids.push(client.submit(spec).await.expect("submit"));
        }
        if wave < 3 {
            wait_until(default_timeout(), async || renewals() > seen)
                .await
                .unwrap_or_else(|e| {
                    panic!("no renewal during wave {wave}: {e}\n{}", node.log_text())
                });
        }
    }
    for (i, id) in ids.into_iter().enumerate() {
        let task = cluster.wait_for_final(id).await;
        assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
        assert_eq!(task.attempt, Attempt(1), "run once: {task:?}");
        assert_eq!(task.node_id, Some(node_id), "{task:?}");
        assert_eq!(stdout(&client, id).await, format!("t{i}\n"));
    }
    let renewed = renewals();
    assert!(renewed >= 3, "{renewed} renewals:\n{}", node.log_text());
    // One session all along, still the same node.
    let nodes = client.nodes().await.expect("nodes");
    assert_eq!((nodes.len(), nodes[0].id), (1, node_id));
    let _ = node.terminate(default_timeout()).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_exits_non_zero_within_seconds_and_its_tasks_finish_elsewhere() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let client = cluster.client().await;
    let token = join_token(&cluster, 1).await;
    let mut victim = joined_node(&cluster, "victim", Some(&token), 2);
    cluster.wait_for_nodes(1).await;
    let ids = [
        client
            .submit(TaskSpec::exec(["sh", "-c", "sleep 2; echo a"]))
            .await
            .expect("submit"),
        client
            .submit(TaskSpec::exec(["sh", "-c", "sleep 2; echo b"]))
            .await
            .expect("submit"),
    ];
    for id in ids {
        assert_eq!(cluster.wait_for_running(id).await, "victim");
    }
    cluster.add_node(2, [("spare", "1")]).await;

    let revoked = Instant::now();
    client.revoke_node("victim").await.expect("revoke");
    assert_eq!(
        exit_code(&mut victim, Duration::from_secs(5)).await,
        Some(1)
    );
    assert!(
        revoked.elapsed() < Duration::from_secs(5),
        "{:?}",
        revoked.elapsed()
    );
    let log = victim.log_text();
    assert!(log.contains("this node was revoked by an admin"), "{log}");
    for id in ids {
        let task = cluster.wait_for_final(id).await;
        assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
        assert_eq!(task.attempt, Attempt(2), "{task:?}");
        assert_ne!(task.node_name.as_deref(), Some("victim"), "{task:?}");
    }
    cluster.shutdown().await;
}
