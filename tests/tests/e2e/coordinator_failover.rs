//! Several coordinator addresses (issue 15, failover without rerun): a
//! node given `OLD,NEW` finds the one that serves, and when the
//! coordinator it is on dies and another takes over (here: a coordinator
//! started on the same data dir at another port, as a hot standby on
//! PostgreSQL would), the node moves there at once and its running attempt
//! is adopted, not run again; `weft run` follows the task there and prints
//! its output once.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;

use weft_client::{Attempt, Client, EventBody, TaskSpec, TaskState};
use weft_proto::TaskId;
use weft_tests::cli::run_weft_env;
use weft_tests::process::{ChildProcess, spawn};
use weft_tests::{TestCluster, default_timeout, spare_addr, wait_for};

/// Long enough that the restarted coordinator waits for the node (and the
/// node's lease outlasts the move) on a loaded machine.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `weft-node` as `name` with one slot, joining the cluster and
/// then dialing `coordinators` in order (`--coordinator A,B`).
async fn node_with(cluster: &TestCluster, name: &str, coordinators: &[String]) -> ChildProcess {
    let token = cluster.join_token(name).await;
    let state_dir = cluster.dir().join(format!("{name}-state"));
    let args: Vec<String> = [
        "--coordinator",
        &coordinators.join(","),
        "--join",
        &token,
        "--state-dir",
        &state_dir.display().to_string(),
        "--name",
        name,
        "--slots",
        "1",
        "--log-format",
        "text",
    ]
    .map(str::to_owned)
    .to_vec();
    spawn("weft-node", &args, cluster.dir(), name)
}

/// A durable cluster of processes with one node, `name`, given the
/// coordinator's address and then a spare one, where the coordinator may
/// move (as a standby taking over would); the node is registered.
struct Movable {
    cluster: TestCluster,
    /// The spare address.
    standby: std::net::SocketAddr,
    /// The coordinator's URL now, and at the spare address.
    first: String,
    second: String,
    node: ChildProcess,
    client: Client,
}

async fn movable(name: &str) -> Movable {
    let cluster = TestCluster::builder()
        .processes()
        .durable()
        .heartbeat_timeout(HEARTBEAT_TIMEOUT)
        .nodes(0)
        .start()
        .await;
    let standby = spare_addr();
    let (first, second) = (cluster.url(), cluster.url_at(standby));
    let node = node_with(&cluster, name, &[first.clone(), second.clone()]).await;
    let client = cluster.client().await;
    wait_for_node(&client, name).await;
    Movable {
        cluster,
        standby,
        first,
        second,
        node,
        client,
    }
}

/// A shell script that prints `before`, waits until `go` exists, then
/// prints `after`: a task that runs for as long as the test wants.
fn waits_for(go: &Path) -> String {
    format!(
        "echo before; while [ ! -e '{}' ]; do sleep 0.05; done; echo after",
        go.display()
    )
}

/// Waits until the coordinator `client` is connected to lists node `name` as
/// registered (the node found it).
async fn wait_for_node(client: &Client, name: &str) {
    let found = wait_for(default_timeout(), || async move {
        let nodes = client.nodes().await.ok()?;
        nodes.iter().any(|node| node.name == name).then_some(())
    })
    .await;
    if let Err(e) = found {
        panic!("{e}: node {name} never registered");
    }
}

/// Waits until task `id`'s first output chunk is recorded (a watcher sees it).
async fn wait_for_output(client: &Client, id: TaskId) {
    let mut events = client.watch(id, 0).await.expect("watch");
    loop {
        let event = tokio::time::timeout(default_timeout(), events.next())
            .await
            .expect("output in time")
            .expect("the stream goes on")
            .expect("an event");
        if matches!(event.body, EventBody::Output { .. }) {
            return;
        }
    }
}

/// The node's log lines that say it registered.
fn registrations(node: &ChildProcess) -> Vec<String> {
    node.log_text()
        .lines()
        .filter(|line| line.contains("registered") && line.contains("coordinator"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_given_a_dead_address_first_registers_with_the_live_one_and_runs_work() {
    let cluster = TestCluster::builder().processes().nodes(0).start().await;
    let dead = cluster.url_at(spare_addr());
    let node = node_with(&cluster, "second-choice", &[dead, cluster.url()]).await;
    let client = cluster.client().await;
    wait_for_node(&client, "second-choice").await;
    let id = client
        .submit(TaskSpec::exec(["echo", "hi"]))
        .await
        .expect("submit");
    let task = cluster.wait_for_final(id).await;
    assert_eq!(
        (task.state, task.node_name.as_deref()),
        (TaskState::Succeeded, Some("second-choice")),
        "{task:?}"
    );
    let registered = registrations(&node);
    assert!(
        registered.iter().any(|line| line.contains(&cluster.url())),
        "the log names the coordinator it registered with: {registered:?}"
    );
    let (status, in_time) = node.terminate(default_timeout()).await.expect("stopping");
    assert!(in_time && status.success(), "{status}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_follows_a_coordinator_that_moved_and_its_running_attempt_is_adopted() {
    let Movable {
        cluster,
        standby,
        second,
        node,
        client,
        ..
    } = movable("mover").await;
    let go = cluster.dir().join("go");
    let spec = TaskSpec::exec(["sh", "-c", &waits_for(&go)]);
    let id = client.submit(spec).await.expect("submit");
    assert_eq!(cluster.wait_for_running(id).await, "mover");

    // The coordinator dies; another takes over at the second address.
    assert_eq!(cluster.crash_and_move_coordinator(standby).await, second);
    let client = cluster.client().await;
    wait_for_node(&client, "mover").await;
    // Still its first attempt, running on the same node: adopted.
    let running = cluster
        .wait_for_task(id, |task| task.state == TaskState::Running)
        .await;
    assert_eq!(
        (running.attempt, running.node_name.as_deref()),
        (Attempt(1), Some("mover")),
        "{running:?}"
    );
    std::fs::write(&go, b"").expect("creating the go file");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.attempt, done.node_losses),
        (TaskState::Succeeded, Attempt(1), 0),
        "{done:?}"
    );

    // New work runs on the coordinator that took over.
    let next = client
        .submit(TaskSpec::exec(["echo", "again"]))
        .await
        .expect("submit after the move");
    let next = cluster.wait_for_final(next).await;
    assert_eq!(
        (next.state, next.node_name.as_deref()),
        (TaskState::Succeeded, Some("mover")),
        "{next:?}"
    );
    let registered = registrations(&node);
    assert!(
        registered.last().is_some_and(|line| line.contains(&second)),
        "the node says it registered with the new coordinator: {registered:?}"
    );
    let (status, in_time) = node.terminate(default_timeout()).await.expect("stopping");
    assert!(in_time && status.success(), "{status}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_weft_run_after_a_failover_cancels_the_task_at_the_new_coordinator() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let Movable {
        cluster,
        standby,
        first,
        second,
        node,
        client,
    } = movable("interrupted").await;
    // Never told to go on: it runs until cancelled.
    let script = waits_for(&cluster.dir().join("never"));
    let mut run = tokio::process::Command::new(weft_tests::process::bin_path("weft"))
        .args(["run", "--", "sh", "-c", &script])
        .env("WEFT_COORDINATOR", format!("{first},{second}"))
        .env("WEFT_TOKEN", cluster.admin_token())
        .env("WEFT_CA", cluster.ca_file().expect("a TLS cluster"))
        .env("XDG_CONFIG_HOME", "/nonexistent/weft-test-config")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting weft run");
    let mut stdout = BufReader::new(run.stdout.take().expect("stdout")).lines();
    let before = tokio::time::timeout(default_timeout(), stdout.next_line())
        .await
        .expect("the task's first output in time")
        .expect("reading stdout");
    assert_eq!(before.as_deref(), Some("before"));
    let id = wait_for(default_timeout(), || {
        let client = client.clone();
        async move {
            let running = client.list(Some(TaskState::Running), 10).await.ok()?;
            running.first().map(|task| task.id)
        }
    })
    .await
    .expect("the task of `weft run` runs");

    // The coordinator `weft run` connected to dies; another serves at the
    // second address, with the node and its running attempt.
    cluster.crash_and_move_coordinator(standby).await;
    let client = cluster.client().await;
    wait_for_node(&client, "interrupted").await;
    cluster.wait_for_running(id).await;
    let pid = nix::unistd::Pid::from_raw(run.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let out = tokio::time::timeout(default_timeout(), run.wait_with_output())
        .await
        .expect("weft run exits after Ctrl-C")
        .expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    // The cancel reached the coordinator that serves now: the task ends.
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Cancelled, "{done:?} {stderr}");
    node.terminate(default_timeout()).await.expect("stopping");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_run_given_two_addresses_prints_the_whole_output_once_across_a_failover() {
    let Movable {
        cluster,
        standby,
        first,
        second,
        node,
        client,
    } = movable("runner").await;
    let go = cluster.dir().join("go-run");
    let script = waits_for(&go);
    let token = cluster.admin_token();
    let ca = cluster
        .ca_file()
        .expect("a TLS cluster")
        .display()
        .to_string();
    let both = format!("{first},{second}");
    let env = [("WEFT_CA", ca.as_str())];
    let args = ["run", "--", "sh", "-c", &script];
    let run = run_weft_env(&both, Some(&token), &env, &args, None);
    let failover = async {
        // The task runs and `weft run` has had its first output from the
        // first coordinator; then that coordinator dies.
        let id = wait_for(default_timeout(), || {
            let client = client.clone();
            async move {
                let running = client.list(Some(TaskState::Running), 10).await.ok()?;
                running.first().map(|task| task.id)
            }
        })
        .await
        .expect("the task of `weft run` runs");
        wait_for_output(&client, id).await;
        cluster.crash_and_move_coordinator(standby).await;
        wait_for_node(&cluster.client().await, "runner").await;
        std::fs::write(&go, b"").expect("creating the go file");
        id
    };
    let (out, id) = tokio::join!(run, failover);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(out.stdout, "before\nafter\n", "each line once: {out}");
    let done = cluster.wait_for_final(id).await;
    assert_eq!(
        (done.state, done.attempt, done.node_losses),
        (TaskState::Succeeded, Attempt(1), 0),
        "{done:?}"
    );
    node.terminate(default_timeout()).await.expect("stopping");
    cluster.shutdown().await;
}
