//! The `weft` CLI binary against a cluster of real processes: output,
//! exit codes, JSON, and failing fast when the coordinator is unreachable.

use std::time::Duration;

use serde_json::Value;

use weft_client::{TaskSpec, TaskState};
use weft_tests::{TestCluster, weft_at};

async fn cli_cluster() -> TestCluster {
    TestCluster::builder()
        .nodes(2)
        .slots(4)
        .processes()
        // A call no node serves waits this long before it fails.
        .schedule_timeout(std::time::Duration::from_secs(2))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_run_passes_output_through_and_exits_with_the_tasks_code() {
    let cluster = cli_cluster().await;
    let out = cluster
        .weft(&["run", "--", "sh", "-c", "echo out; echo err >&2; exit 7"])
        .await;
    assert_eq!(out.code, Some(7), "{out}");
    // A failing command is not run again behind the user's back: one
    // attempt, its output once (as if it had run locally).
    assert_eq!(out.stdout, "out\n", "{out}");
    assert!(out.stderr.contains("err"), "{out}");

    let out = cluster.weft(&["run", "--", "sh", "-c", "echo fine"]).await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "fine\n"),
        "{out}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_run_with_one_attempt_prints_each_stream_once() {
    let cluster = cli_cluster().await;
    let out = cluster
        .weft(&[
            "run",
            "--max-attempts",
            "1",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ])
        .await;
    assert_eq!(out.code, Some(7), "{out}");
    assert_eq!(out.stdout, "out\n", "{out}");
    assert_eq!(out.stderr.matches("err\n").count(), 1, "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_exit_codes_follow_the_documented_table() {
    let cluster = cli_cluster().await;
    // A call no node serves: said at once on stderr, failed after the
    // schedule timeout.
    let out = cluster.weft(&["call", "nope"]).await;
    assert_eq!(out.code, Some(127), "unknown handler: {out}");
    assert!(
        out.stderr
            .contains("waiting: no connected node serves handler 'nope'"),
        "{out}"
    );
    assert!(out.stderr.contains("unknown handler"), "{out}");
    assert!(
        out.elapsed >= std::time::Duration::from_secs(2),
        "failed before the schedule timeout: {out}"
    );
    // A call's own schedule timeout wins over the coordinator's.
    let out = cluster
        .weft(&["call", "--schedule-timeout", "300ms", "nope"])
        .await;
    assert_eq!(out.code, Some(127), "{out}");
    assert!(
        out.stderr
            .contains("no connected node served it within 300ms"),
        "{out}"
    );

    let out = cluster
        .weft(&["run", "--timeout", "300ms", "--", "sleep", "30"])
        .await;
    assert_eq!(out.code, Some(124), "timed out: {out}");

    let out = cluster
        .weft(&["call", "--max-attempts", "1", "fail", "boom"])
        .await;
    assert_eq!(out.code, Some(1), "handler error: {out}");
    assert!(out.stderr.contains("boom"), "{out}");

    let out = cluster
        .weft(&["run", "--", "/nonexistent/weft-test-binary"])
        .await;
    assert_eq!(out.code, Some(127), "missing binary: {out}");

    let out = cluster.weft(&["get", "not-an-id"]).await;
    assert_eq!(out.code, Some(2), "usage error: {out}");

    let out = cluster.weft(&["call", "sha256", "abc"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        "{out}"
    );

    // `echo` streams its input and returns it: printed once.
    let out = cluster.weft(&["call", "echo", "hello"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout, "hello", "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_map_keep_order_prints_outputs_in_input_order() {
    let cluster = cli_cluster().await;
    // Later lines finish first, so completion order is the reverse of input order.
    let script = r#"sleep "0.$1"; echo "line $1""#;
    let out = cluster
        .weft_with_stdin(
            &[
                "map",
                "--keep-order",
                "-j",
                "5",
                "--",
                "sh",
                "-c",
                script,
                "sh",
            ],
            b"5\n4\n3\n2\n1\n",
        )
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(
        out.stdout, "line 5\nline 4\nline 3\nline 2\nline 1\n",
        "{out}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_map_call_calls_a_handler_per_line_and_prints_each_result() {
    let cluster = cli_cluster().await;
    let out = cluster
        .weft_with_stdin(&["map", "--keep-order", "--call", "sha256"], b"a\nb\n\nc\n")
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let hex = |text: &str| {
        use sha2::Digest;
        format!("{:x}\n", sha2::Sha256::digest(text.as_bytes()))
    };
    assert_eq!(
        out.stdout,
        [hex("a"), hex("b"), hex("c")].concat(),
        "one call per non-blank line, results in input order: {out}"
    );
    // A handler that fails: exit 1, each failure named with its line.
    let failed = cluster
        .weft_with_stdin(&["map", "--call", "fail"], b"boom\n")
        .await;
    assert_eq!(failed.code, Some(1), "{failed}");
    assert!(
        failed.stderr.contains("1 of 1 tasks failed") && failed.stderr.contains("\"boom\""),
        "{failed}"
    );
    // A call takes no command.
    let both = cluster
        .weft_with_stdin(&["map", "--call", "echo", "--", "ls"], b"x\n")
        .await;
    assert_eq!(both.code, Some(2), "{both}");
    assert!(both.stderr.contains("--call"), "{both}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_get_with_json_output_has_the_documented_fields() {
    let cluster = cli_cluster().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::exec(["sh", "-c", "exit 3"]).max_attempts(1))
        .await
        .expect("submit");
    let task = cluster.wait_for_final(id).await;
    assert_eq!(task.state, TaskState::Failed);

    let out = cluster
        .weft(&["get", &id.to_string(), "--output", "json"])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let json: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(json["id"], id.to_string());
    assert_eq!(json["state"], "failed");
    assert_eq!(json["attempt"], 1);
    assert_eq!(json["exit_code"], 3);
    assert_eq!(json["kind"], "exec");
    assert_eq!(json["command"], serde_json::json!(["sh", "-c", "exit 3"]));
    assert_eq!(
        json["node"],
        task.node_name.clone().expect("a node ran it").as_str()
    );
    assert_eq!(
        (json["failures"].clone(), json["node_losses"].clone()),
        (1.into(), 0.into())
    );
    for field in [
        "name",
        "handler",
        "max_attempts",
        "node_id",
        "error",
        "pending_reason",
        "output",
        "output_base64",
        "created_at",
        "updated_at",
    ] {
        assert!(json.get(field).is_some(), "field {field} missing: {json}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_weft_watch_still_prints_the_whole_output() {
    let cluster = cli_cluster().await;
    let client = cluster.client().await;
    let script = "for i in 1 2 3 4 5; do echo line$i; done; echo oops >&2";
    let id = client
        .submit(TaskSpec::exec(["sh", "-c", script]))
        .await
        .expect("submit");
    cluster.wait_for_state(id, TaskState::Succeeded).await;

    let out = cluster.weft(&["watch", &id.to_string()]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout, "line1\nline2\nline3\nline4\nline5\n", "{out}");
    assert!(out.stderr.contains("oops"), "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_submit_prints_the_id_and_weft_wait_exits_with_the_tasks_code() {
    let cluster = cli_cluster().await;
    let out = cluster.weft(&["submit", "--", "sh", "-c", "exit 5"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let id = out.stdout.trim().to_owned();
    assert!(
        id.parse::<weft_client::TaskId>().is_ok(),
        "not an id: {out}"
    );
    let out = cluster.weft(&["wait", &id]).await;
    assert_eq!(out.code, Some(5), "{out}");

    let out = cluster.weft(&["nodes"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout.contains("node-0") && out.stdout.contains("node-1"),
        "{out}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_coordinator_gives_a_one_line_error_and_exit_69_quickly() {
    // A port that was free a moment ago: nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}");
    for args in [&["list"][..], &["run", "--", "true"][..]] {
        let out = weft_at(&url, args).await;
        assert_eq!(out.code, Some(69), "{out}");
        assert!(
            out.elapsed < Duration::from_secs(6),
            "took {:?}: {out}",
            out.elapsed
        );
        assert_eq!(out.stderr.trim_end().lines().count(), 1, "one line: {out}");
        assert!(
            out.stderr.contains(&url) || out.stderr.contains("reach"),
            "{out}"
        );
        assert!(out.stdout.is_empty(), "{out}");
    }
}

/// `weft -o json info`'s free slots.
async fn free_slots(cluster: &TestCluster) -> (Value, Value) {
    let out = cluster.weft(&["-o", "json", "info"]).await;
    assert_eq!(out.code, Some(0), "{out}");
    let json: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    (json["slots"].clone(), json["slots_free"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_info_free_slots_are_slots_minus_slots_used_not_prefetch() {
    // The nodes grant their slots plus a prefetch (weft-node's default):
    // none of that counts as a free slot.
    let cluster = cli_cluster().await;
    cluster.wait_for_nodes(2).await;
    let client = cluster.client().await;
    let idle = weft_tests::wait_for(weft_tests::default_timeout(), || {
        let cluster = &cluster;
        async move {
            let (slots, free) = free_slots(cluster).await;
            (slots == 8 && free == 8).then_some(())
        }
    })
    .await;
    assert!(
        idle.is_ok(),
        "idle cluster: {:?}",
        free_slots(&cluster).await
    );
    let id = client
        .submit(TaskSpec::exec(["sleep", "30"]))
        .await
        .expect("submit");
    cluster.wait_for_state(id, TaskState::Running).await;
    assert_eq!(free_slots(&cluster).await, (8.into(), 7.into()));
    client.cancel(id).await.expect("cancel");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_cancel_answers_the_task_as_cancelled() {
    let cluster = cli_cluster().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::exec(["sleep", "30"]))
        .await
        .expect("submit");
    cluster.wait_for_state(id, TaskState::Running).await;
    let out = cluster
        .weft(&["-o", "json", "cancel", &id.to_string()])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let json: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        (json["state"].clone(), json["cancel_requested"].clone()),
        ("cancelled".into(), false.into()),
        "{out}"
    );

    let id = client
        .submit(TaskSpec::exec(["sleep", "30"]))
        .await
        .expect("submit");
    cluster.wait_for_state(id, TaskState::Running).await;
    let out = cluster.weft(&["cancel", &id.to_string()]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout, format!("task {id} cancelled\n"), "{out}");

    // Cancelling it again: one plain line, and an unknown id says "not
    // found" once.
    let unknown = weft_client::TaskId::new();
    let out = cluster.weft(&["cancel", &unknown.to_string()]).await;
    assert_ne!(out.code, Some(0), "{out}");
    assert_eq!(out.stderr.matches("not found").count(), 1, "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_weft_watch_stops_watching_with_its_own_code_and_says_where_to_resume() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let cluster = cli_cluster().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::exec(["sh", "-c", "echo started; sleep 30"]))
        .await
        .expect("submit");
    cluster.wait_for_state(id, TaskState::Running).await;
    let mut watch = tokio::process::Command::new(weft_tests::process::bin_path("weft"))
        .args(["watch", &id.to_string()])
        .env("WEFT_COORDINATOR", cluster.url())
        .env("WEFT_TOKEN", cluster.admin_token())
        .env("XDG_CONFIG_HOME", "/nonexistent/weft-test-config")
        .envs(cluster.trust().and_then(|trust| match trust {
            weft_client::Trust::CaFile(ca) => Some(("WEFT_CA", ca)),
            _ => None,
        }))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting weft watch");
    let mut lines = BufReader::new(watch.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    // The state lines carry their seq; wait for the running one.
    let running = tokio::time::timeout(weft_tests::default_timeout(), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line.clone());
            if line.contains(" running on ") {
                return Some(line);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| panic!("no running line: {seen:?}"));
    assert!(running.contains(", seq "), "{running}");
    let pid = nix::unistd::Pid::from_raw(watch.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = tokio::time::timeout(Duration::from_secs(10), watch.wait())
        .await
        .expect("watch exits after Ctrl-C")
        .expect("wait");
    let mut rest = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        rest.push(line);
    }
    assert_eq!(status.code(), Some(3), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains(&format!("weft watch {id} --from-seq "))),
        "{rest:?}"
    );
    // The task goes on.
    assert_eq!(client.get(id).await.expect("get").state, TaskState::Running);
    client.cancel(id).await.expect("cancel");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_watch_says_the_final_state_once() {
    let cluster = cli_cluster().await;
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::exec(["sh", "-c", "echo fine"]))
        .await
        .expect("submit");
    cluster.wait_for_state(id, TaskState::Succeeded).await;
    let out = cluster.weft(&["watch", &id.to_string()]).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stderr.matches("succeeded").count(), 1, "{out}");

    let id = client
        .submit(TaskSpec::exec(["sh", "-c", "exit 4"]).max_attempts(1))
        .await
        .expect("submit");
    cluster.wait_for_final(id).await;
    let out = cluster.weft(&["watch", &id.to_string()]).await;
    assert_eq!(out.code, Some(4), "{out}");
    assert_eq!(out.stderr.matches(" failed").count(), 1, "{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_file_or_pipe_carry_no_colour_codes() {
    // NO_COLOR unset (the harness sets it for its own children): the
    // binaries must see for themselves that stderr is no terminal.
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = weft_cluster::child::Spawn::new(
        weft_tests::process::bin_path("weft-coordinator"),
        dir.path(),
        "coordinator",
    )
    .wrapper(["env", "-u", "NO_COLOR"])
    .args(["--listen", "127.0.0.1:0", "--in-memory", "--insecure"])
    .spawn()
    .expect("starting weft-coordinator");
    let node = weft_cluster::child::Spawn::new(
        weft_tests::process::bin_path("weft-node"),
        dir.path(),
        "node",
    )
    .wrapper(["env", "-u", "NO_COLOR"])
    .args([
        "--coordinator",
        "http://127.0.0.1:1",
        "--name",
        "plain",
        "--state-dir",
        &dir.path().join("node").display().to_string(),
    ])
    .spawn()
    .expect("starting weft-node");
    for log in [coordinator.log(), node.log()] {
        let written = weft_tests::wait_until(weft_tests::default_timeout(), async || {
            std::fs::read_to_string(log)
                .is_ok_and(|text| text.contains(" INFO ") || text.contains(" WARN "))
        })
        .await;
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(written.is_ok(), "{}: nothing logged: {text}", log.display());
        assert!(
            !text.contains('\u{1b}'),
            "{}: colour codes: {text:?}",
            log.display()
        );
    }
    drop((coordinator, node));

    let cli = tokio::process::Command::new(weft_tests::process::bin_path("weft"))
        .args(["--coordinator", "http://127.0.0.1:1", "info"])
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "debug")
        .env("XDG_CONFIG_HOME", "/nonexistent/weft-test-config")
        .env_remove("WEFT_TOKEN")
        .output()
        .await
        .expect("running weft");
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(!stderr.contains('\u{1b}'), "colour codes: {stderr:?}");
}
