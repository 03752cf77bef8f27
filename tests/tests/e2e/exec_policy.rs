//! Exec policies: a node runs only the exec tasks its owner allows
//! (`weft-node --exec deny`, `--exec-allow PROGRAM`), the coordinator
//! assigns exec tasks only to nodes that allow them, and a task no node
//! accepts waits saying why.

use weft_client::{TaskSpec, TaskState};
use weft_proto::ExecPolicy;
use weft_tests::TestCluster;

/// Waits until `id` is queued with a pending reason, and returns it.
async fn waiting_reason(cluster: &TestCluster, id: weft_proto::TaskId) -> String {
    cluster
        .wait_for_task(id, |t| {
            t.state == TaskState::Queued && !t.pending_reason.is_empty()
        })
        .await
        .pending_reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_tasks_run_only_on_the_node_that_allows_them() {
    let cluster = TestCluster::builder()
        .nodes(2)
        .node_exec(0, ExecPolicy::Deny)
        .start()
        .await;
    let client = cluster.client().await;
    let ids = client
        .submit_many(
            (0..8)
                .map(|i| TaskSpec::exec(["sh".to_owned(), "-c".to_owned(), format!("echo {i}")]))
                .collect(),
        )
        .await
        .expect("submit");
    for id in ids {
        let done = cluster.wait_for_final(id).await;
        assert_eq!(
            (done.state, done.node_name.as_deref()),
            (TaskState::Succeeded, Some("node-1")),
            "{done:?}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_deny_nodes_an_exec_task_waits_saying_so_until_an_allowing_node_joins() {
    let cluster = TestCluster::builder()
        .nodes(2)
        .node_exec(0, ExecPolicy::Deny)
        .node_exec(1, ExecPolicy::Deny)
        .start()
        .await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::exec(["sh", "-c", "echo hi"]))
        .await
        .expect("submit");
    assert_eq!(
        waiting_reason(&cluster, id).await,
        "no connected node accepts exec tasks"
    );
    // A call task still runs on a deny node meanwhile.
    let call = client
        .submit(TaskSpec::call("noop", "x"))
        .await
        .expect("submit");
    let done = cluster.wait_for_final(call).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(
        client.get(id).await.expect("get").state,
        TaskState::Queued,
        "no deny node took the exec task"
    );

    let allowing = cluster.add_node_with_exec(1, ExecPolicy::Allow).await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.node_name.as_deref()),
        (TaskState::Succeeded, Some(allowing.as_str())),
        "{done:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_off_the_allow_list_never_runs_on_that_node() {
    let listed = ExecPolicy::programs(["echo"]).expect("valid list");
    let cluster = TestCluster::builder()
        .nodes(1)
        .node_exec(0, listed)
        .start()
        .await;
    let client = cluster.client().await;
    let marker = cluster.dir().join("ran-on-the-listed-node");
    let marker_arg = marker.display().to_string();
    let echo = client
        .submit(TaskSpec::exec(["echo", "allowed"]))
        .await
        .expect("submit");
    let done = cluster.wait_for_final(echo).await;
    assert_eq!(
        (done.state, done.node_name.as_deref()),
        (TaskState::Succeeded, Some("node-0")),
        "{done:?}"
    );
    let touch = client
        .submit(TaskSpec::exec(["touch", marker_arg.as_str()]))
        .await
        .expect("submit");
    assert_eq!(
        waiting_reason(&cluster, touch).await,
        "no connected node allows program 'touch'"
    );
    assert!(!marker.exists(), "touch ran on the allow-list node");

    let allowing = cluster.add_node_with_exec(1, ExecPolicy::Allow).await;
    let done = cluster.wait_for_final(touch).await;
    assert_eq!(
        (done.state, done.node_name.as_deref()),
        (TaskState::Succeeded, Some(allowing.as_str())),
        "{done:?}"
    );
    assert!(marker.exists(), "it ran on the allowing node");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_node_is_not_given_tasks_that_set_path_or_ld_preload_in_secret_env() {
    // `secret_env` is applied after `env`: a secret PATH would choose which
    // `echo` runs (here a planted one that leaves a marker).
    use std::os::unix::fs::PermissionsExt;
    let listed = ExecPolicy::programs(["echo", "/bin/echo"]).expect("valid list");
    let cluster = TestCluster::builder()
        .nodes(1)
        .node_exec(0, listed)
        .start()
        .await;
    let client = cluster.client().await;
    let marker = cluster.dir().join("planted-echo-ran");
    let planted = cluster.dir().join("planted-bin");
    std::fs::create_dir_all(&planted).expect("mkdir");
    let echo = planted.join("echo");
    std::fs::write(&echo, format!("#!/bin/sh\ntouch {}\n", marker.display())).expect("write");
    std::fs::set_permissions(&echo, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = planted.display().to_string();

    let by_path = client
        .submit(TaskSpec::exec(["echo", "hi"]).secret_env("PATH", path.as_str()))
        .await
        .expect("submit");
    let why = waiting_reason(&cluster, by_path).await;
    assert!(why.contains("PATH") && why.contains("secret_env"), "{why}");
    let by_preload = client
        .submit(TaskSpec::exec(["/bin/echo", "hi"]).secret_env("LD_PRELOAD", "/nonexistent.so"))
        .await
        .expect("submit");
    let why = waiting_reason(&cluster, by_preload).await;
    assert!(
        why.contains("LD_PRELOAD") && why.contains("secret_env"),
        "{why}"
    );

    // The same program without them runs there.
    let plain = client
        .submit(TaskSpec::exec(["echo", "hi"]).secret_env("API_KEY", "k"))
        .await
        .expect("submit");
    let done = cluster.wait_for_final(plain).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    for id in [by_path, by_preload] {
        assert_eq!(client.get(id).await.expect("get").state, TaskState::Queued);
    }
    assert!(
        !marker.exists(),
        "the planted echo ran on the allow-list node"
    );
    cluster.shutdown().await;
}
