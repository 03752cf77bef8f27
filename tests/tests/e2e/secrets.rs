//! Secret environment values (`--secret-env`, `TaskSpec.secret_env`): they
//! reach the process of the attempt, its handler and the node running it,
//! and nothing else: no rpc answer (searched as encoded bytes), no log file
//! of the coordinator or the node, no `weft get` output. They survive a
//! coordinator restart while the task waits.

use std::path::Path;

use futures::StreamExt;
use prost::Message;
use tonic::Streaming;

use weft_client::{TaskSpec, TaskState};
use weft_proto::pb;
use weft_tests::process::bin_path;
use weft_tests::{TestCluster, default_timeout, fake_node};

/// A value that cannot turn up by chance. Lowercase, so the tasks' upper-cased
/// echo of it (their proof that they had it) never matches it.
fn secret_value() -> String {
    format!(
        "s3cr3t-{}",
        weft_proto::TaskId::new().to_string().to_lowercase()
    )
}

/// Prints `$API_KEY` upper-cased: the process had the value, and the value
/// itself never enters the task's output events.
const ECHO_UPPER: &str = r#"printf %s "$API_KEY" | tr a-z A-Z"#;

fn echo_upper(secret: &str) -> TaskSpec {
    TaskSpec::exec(["sh", "-c", ECHO_UPPER])
        // A plain value of the same name loses to the secret.
        .env("API_KEY", "plain-value")
        .env("PLAIN", "visible")
        .secret_env("API_KEY", secret)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// The encoded answers of one rpc, each checked for the secret.
#[derive(Default)]
struct Answers(Vec<(String, Vec<u8>)>);

impl Answers {
    fn add(&mut self, what: impl Into<String>, message: &impl Message) {
        self.0.push((what.into(), message.encode_to_vec()));
    }

    fn assert_free_of(&self, secret: &str) {
        assert!(
            self.0.len() >= 8,
            "too few answers checked: {}",
            self.0.len()
        );
        for (what, bytes) in &self.0 {
            assert!(!contains(bytes, secret), "{what} carries the secret value");
        }
    }
}

/// Reads a task's event stream to its `finished` event, keeping every
/// encoded event and the stdout bytes.
async fn read_events(
    mut stream: Streaming<pb::TaskEvent>,
    rpc: &str,
    answers: &mut Answers,
) -> (Vec<u8>, pb::Task) {
    let mut stdout = Vec::new();
    loop {
        let next = tokio::time::timeout(default_timeout(), stream.next())
            .await
            .unwrap_or_else(|_| panic!("{rpc}: no event in time"));
        let event = next
            .unwrap_or_else(|| panic!("{rpc}: stream ended before `finished`"))
            .unwrap_or_else(|s| panic!("{rpc}: {s}"));
        answers.add(format!("{rpc} event {}", event.seq), &event);
        match event.body {
            Some(pb::task_event::Body::Output(out)) => stdout.extend_from_slice(&out.data),
            Some(pb::task_event::Body::Finished(task)) => return (stdout, task),
            _ => {}
        }
    }
}

async fn task_service(cluster: &TestCluster) -> weft_tests::RawTasks {
    cluster.raw_tasks(Some(&cluster.admin_token())).await
}

/// Every process log file of the cluster (process mode), with its name.
fn log_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let entries = std::fs::read_dir(dir).expect("reading the cluster dir");
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| {
            let text = std::fs::read(&p).unwrap_or_default();
            (p.display().to_string(), text)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_the_process_and_no_rpc_answer_log_or_cli_output() {
    let cluster = TestCluster::builder()
        .nodes(1)
        // The most the processes ever log, all of it searched below.
        .log_filter("debug")
        .start()
        .await;
    let secret = secret_value();
    let mut tasks = task_service(&cluster).await;
    let mut answers = Answers::default();

    let submitted = tasks
        .submit(pb::SubmitRequest {
            tasks: vec![pb::TaskSpec::from(echo_upper(&secret))],
        })
        .await
        .expect("submit")
        .into_inner();
    answers.add("Submit", &submitted);
    let id = submitted.task_ids[0].clone();
    let wait_many = tasks
        .wait_many(pb::WaitManyRequest {
            task_ids: vec![id.clone()],
            ..Default::default()
        })
        .await
        .expect("wait many")
        .into_inner();
    let watch = tasks
        .watch(pb::WatchRequest {
            task_id: id.clone(),
            from_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let (stdout, finished) = read_events(watch, "Watch", &mut answers).await;
    assert_eq!(
        String::from_utf8_lossy(&stdout),
        secret.to_uppercase(),
        "the process got the secret, over the plain value of the same name"
    );
    assert_eq!(finished.state, i32::from(TaskState::Succeeded));
    let mut wait_many = wait_many;
    let done = tokio::time::timeout(default_timeout(), wait_many.next())
        .await
        .expect("WaitMany answers in time")
        .expect("WaitMany answers")
        .expect("WaitMany answers without an error");
    answers.add("WaitMany", &done);

    // Readers see the plain env, never the secret (not even its name).
    let got = tasks
        .get(pb::GetRequest {
            task_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    answers.add("Get", &got);
    let spec = got.task.and_then(|t| t.spec).expect("Get shows the spec");
    assert!(spec.secret_env.is_empty(), "{spec:?}");
    let Some(pb::task_spec::Kind::Exec(exec)) = &spec.kind else {
        panic!("not an exec spec: {spec:?}");
    };
    assert_eq!(exec.env.get("PLAIN").map(String::as_str), Some("visible"));
    let listed = tasks
        .list(pb::ListRequest::default())
        .await
        .expect("list")
        .into_inner();
    answers.add("List", &listed);

    // Run streams the same way.
    let run = tasks
        .run(pb::RunRequest {
            spec: Some(pb::TaskSpec::from(echo_upper(&secret))),
        })
        .await
        .expect("run")
        .into_inner();
    let (run_stdout, _) = read_events(run, "Run", &mut answers).await;
    assert_eq!(String::from_utf8_lossy(&run_stdout), secret.to_uppercase());

    // Cancelling a queued task answers its record: no secret in it either.
    let waiting = tasks
        .submit(pb::SubmitRequest {
            tasks: vec![pb::TaskSpec::from(
                echo_upper(&secret).label("zone", "nowhere"),
            )],
        })
        .await
        .expect("submit")
        .into_inner();
    let cancelled = tasks
        .cancel(pb::CancelRequest {
            task_id: waiting.task_ids[0].clone(),
            reason: "not needed".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    answers.add("Cancel", &cancelled);
    answers.assert_free_of(&secret);

    // The CLI shows the task, its plain env included, never the secret.
    for args in [
        vec!["get", id.as_str()],
        vec!["get", &id, "--output", "json"],
    ] {
        let out = cluster.weft(&args).await;
        assert_eq!(out.code, Some(0), "{out}");
        assert!(
            !out.stdout.contains(&secret) && !out.stderr.contains(&secret),
            "`weft {}` shows the secret",
            args.join(" ")
        );
    }

    if cluster.is_processes() {
        // Everything the processes logged for these tasks (they log line by
        // line), read while the cluster still holds its files.
        let logs = log_files(cluster.dir());
        assert!(
            logs.iter().any(|(name, _)| name.contains("coordinator"))
                && logs.iter().any(|(name, _)| name.contains("node-0")),
            "the coordinator's and the node's logs: {:?}",
            logs.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        for (name, text) in &logs {
            assert!(!contains(text, &secret), "{name} logs the secret value");
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_a_secret_from_its_own_environment() {
    let cluster = TestCluster::builder().nodes(1).start().await;
    let secret = secret_value();
    // `--secret-env API_KEY`: the value comes from the CLI's environment,
    // so it is on neither the command line nor in the shell history.
    let out = tokio::process::Command::new(bin_path("weft"))
        .args([
            "run",
            "--secret-env",
            "API_KEY",
            "--",
            "sh",
            "-c",
            ECHO_UPPER,
        ])
        .env("WEFT_COORDINATOR", cluster.url())
        .env("WEFT_CA", cluster.ca_file().expect("a TLS cluster"))
        .env("WEFT_TOKEN", cluster.admin_token())
        .env("API_KEY", &secret)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("running weft");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), secret.to_uppercase());
    // KEY=VALUE works too; a name that is not set is refused clearly.
    let inline = format!("API_KEY={secret}");
    let out = cluster
        .weft(&[
            "submit",
            "--secret-env",
            &inline,
            "--",
            "sh",
            "-c",
            ECHO_UPPER,
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out}");
    let id: weft_proto::TaskId = out.stdout.trim().parse().expect("submit prints an id");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    let shown = cluster.weft(&["get", &id.to_string()]).await;
    assert!(!shown.stdout.contains(&secret), "{shown}");
    let unset = cluster
        .weft(&[
            "submit",
            "--secret-env",
            "WEFT_NOT_SET_ANYWHERE",
            "--",
            "true",
        ])
        .await;
    assert_eq!(unset.code, Some(2), "{unset}");
    assert!(
        unset.stderr.contains("WEFT_NOT_SET_ANYWHERE is not set")
            || unset
                .stderr
                .contains("\"WEFT_NOT_SET_ANYWHERE\" is not set"),
        "{unset}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_node_running_the_attempt_gets_the_secret_in_its_assign() {
    let cluster = TestCluster::builder().nodes(0).start().await;
    let mut runner = cluster
        .fake_node(fake_node::register("runner", 1, &["noop"]))
        .await;
    runner.grant(1).await;
    let secret = secret_value();
    let client = cluster.client().await;
    let id = client
        .submit(TaskSpec::call("noop", "in").secret_env("API_KEY", &secret))
        .await
        .expect("submit");
    let assignment = runner.next_assignment(default_timeout()).await;
    assert_eq!(assignment.task_id, id.to_string());
    let spec = assignment.spec.expect("an Assign carries the spec");
    assert_eq!(
        spec.secret_env.get("API_KEY").map(String::as_str),
        Some(secret.as_str())
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_task_keeps_its_secret_across_a_coordinator_restart() {
    let cluster = TestCluster::builder().nodes(1).durable().start().await;
    let secret = secret_value();
    let client = cluster.client().await;
    // Waits for a node that does not exist yet.
    let id = client
        .submit(echo_upper(&secret).label("zone", "later"))
        .await
        .expect("submit");
    cluster.restart_coordinator().await;
    cluster.wait_for_nodes(1).await;
    let node = cluster.add_node(1, [("zone", "later")]).await;
    let mut tasks = task_service(&cluster).await;
    let watch = tasks
        .watch(pb::WatchRequest {
            task_id: id.to_string(),
            from_seq: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut answers = Answers::default();
    let (stdout, finished) = read_events(watch, "Watch", &mut answers).await;
    assert_eq!(finished.node_name, node);
    assert_eq!(String::from_utf8_lossy(&stdout), secret.to_uppercase());
    for (what, bytes) in &answers.0 {
        assert!(!contains(bytes, &secret), "{what} carries the secret value");
    }
    cluster.shutdown().await;
}
