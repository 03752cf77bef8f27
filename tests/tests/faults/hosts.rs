//! `LabCluster`: the real `weft-coordinator` on `fab-h1` and one real
//! `weft-node` on each of `fab-h2`..`fab-h4`, driven by a client in the
//! scenario's own host (`fab-h5`). Runs only inside the lab (see `lab`).
//!
//! Timings are short so the suite takes minutes: heartbeats every 200 ms,
//! a node is lost after 1 s of silence, and the nodes' lease is their
//! default (the coordinator's heartbeat timeout, 1 s). Every process logs
//! to a file in the cluster's temp dir; their tails are printed when a
//! scenario fails (`WEFT_TEST_KEEP=1` keeps the dir).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::Signal;
use tempfile::TempDir;

use weft_client::{Client, ClusterInfo, EventBody, NodeInfo, Task, TaskSpec, Trust};
use weft_proto::{Attempt, TaskId, TaskState};
use weft_tests::process::{ChildProcess, Spawn, bin_path, source_of};
use weft_tests::wait::wait_for;

use crate::lab::{COORDINATOR_HOST, NODE_HOSTS, address, failure, namespace, say};

/// How often the coordinator and the nodes send heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
/// Silence after which the coordinator declares a node lost; also the
/// nodes' lease (their default).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
/// The nodes' lease: they stop their attempts after this much silence.
pub const LEASE: Duration = HEARTBEAT_TIMEOUT;
/// The coordinator's port on `fab-h1`.
const PORT: u16 = 7070;
/// Generous deadline for waits on a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Starts binary `bin` inside `host` through `ip netns exec` (which execs
/// it: the child's pid is the binary's), logging to `<dir>/<label>.log`
/// (appending, so restarts keep one log).
pub fn spawn_in(host: u8, bin: &str, args: &[String], dir: &Path, label: &str) -> ChildProcess {
    Spawn::new(bin_path(bin), dir, label)
        .wrapper(["ip", "netns", "exec", &namespace(host)])
        .args(args)
        .append_log()
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "starting {bin} in {}: {e}: {}",
                namespace(host),
                source_of(&e)
            )
        })
}

/// SIGKILL and reap; one already gone is no error.
pub async fn kill(child: ChildProcess) {
    let _ = child.kill().await;
}

/// How a [`LabCluster`] is started.
#[derive(Clone, Copy, Debug)]
pub struct LabSettings {
    /// Slots of each node.
    pub slots: u32,
    /// A durable store (`--data-dir` in the temp dir) instead of memory.
    pub durable: bool,
}

/// The coordinator and three nodes on their own hosts. See the module docs.
pub struct LabCluster {
    dir: Option<TempDir>,
    coordinator_args: Vec<String>,
    coordinator: Option<ChildProcess>,
    restarts: u32,
    nodes: BTreeMap<u8, ChildProcess>,
    /// A client in the scenario's host, connected to the coordinator.
    pub client: Client,
}

impl LabCluster {
    /// Starts the coordinator, then the three nodes, and waits until all
    /// are registered.
    pub async fn start(settings: LabSettings) -> LabCluster {
        let dir = tempfile::Builder::new()
            .prefix("weft-faults-")
            .tempdir()
            .expect("creating the cluster temp dir");
        std::fs::create_dir(dir.path().join("runs")).expect("creating the runs dir");
        let mut coordinator_args = vec![
            "--listen".to_owned(),
            format!("{}:{PORT}", address(COORDINATOR_HOST)),
            "--heartbeat-interval".to_owned(),
            format!("{}ms", HEARTBEAT_INTERVAL.as_millis()),
            "--heartbeat-timeout".to_owned(),
            format!("{}ms", HEARTBEAT_TIMEOUT.as_millis()),
            "--shutdown-grace".to_owned(),
            "1s".to_owned(),
            "--admin-token-file".to_owned(),
            dir.path().join("admin.token").display().to_string(),
        ];
        // TLS and node certificates, as by default; the CA outlives
        // coordinator restarts.
        let ca_file = dir.path().join("pki").join("ca.pem");
        coordinator_args.push("--pki-dir".to_owned());
        coordinator_args.push(dir.path().join("pki").display().to_string());
        let trust = Trust::CaFile(ca_file.clone());
        if settings.durable {
            coordinator_args.push("--data-dir".to_owned());
            coordinator_args.push(dir.path().join("data").display().to_string());
        } else {
            coordinator_args.push("--in-memory".to_owned());
        }
        let coordinator = spawn_in(
            COORDINATOR_HOST,
            "weft-coordinator",
            &coordinator_args,
            dir.path(),
            "coordinator",
        );
        let client = wait_for(PATIENCE, || async {
            let token = std::fs::read_to_string(dir.path().join("admin.token")).ok()?;
            let client = Client::connect_secure(&url(), Some(&trust), Some(token.trim()))
                .await
                .ok()?;
            client.cluster_info().await.ok().map(|_| client)
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "coordinator on {} never answered: {e}\n{}",
                namespace(COORDINATOR_HOST),
                coordinator.log_tail(40)
            )
        });
        // Nodes join as on a real network: one join token (it names the
        // coordinator's address on fab-h1 and the CA pin), then each node
        // its own key and certificate, kept in its state dir.
        let uses = u32::try_from(NODE_HOSTS.len()).unwrap_or(u32::MAX);
        let (join_token, _) = client
            .create_join_token("fault suite", Some(PATIENCE), uses, &url())
            .await
            .unwrap_or_else(|e| panic!("creating a join token: {e}"));
        let mut nodes = BTreeMap::new();
        for host in NODE_HOSTS {
            let args = vec![
                "--join".to_owned(),
                join_token.clone(),
                "--state-dir".to_owned(),
                dir.path()
                    .join(format!("{}-state", node_name(host)))
                    .display()
                    .to_string(),
                "--name".to_owned(),
                node_name(host),
                "--slots".to_owned(),
                settings.slots.to_string(),
            ];
            let label = node_name(host);
            nodes.insert(host, spawn_in(host, "weft-node", &args, dir.path(), &label));
        }
        let cluster = LabCluster {
            dir: Some(dir),
            coordinator_args,
            coordinator: Some(coordinator),
            restarts: 0,
            nodes,
            client,
        };
        cluster.wait_for_nodes(NODE_HOSTS.len()).await;
        cluster
    }

    /// The temp dir: logs, the store, the run markers.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(TempDir::path)
            .expect("the temp dir lives as long as the cluster")
    }

    /// Where marker tasks record their runs (see [`marker_task`]).
    pub fn runs(&self) -> PathBuf {
        self.dir().join("runs")
    }

    /// Waits until `n` nodes are connected and ready.
    pub async fn wait_for_nodes(&self, n: usize) {
        wait_for(PATIENCE, || async {
            let nodes = self.client.nodes().await.ok()?;
            (nodes.len() == n).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{n} nodes never connected: {e}"));
    }

    /// The node on `host` as the coordinator sees it, if connected.
    pub async fn node_info(&self, host: u8) -> Option<NodeInfo> {
        let nodes = self.client.nodes().await.ok()?;
        nodes.into_iter().find(|n| n.name == node_name(host))
    }

    /// Cluster figures, retried while the coordinator is unreachable.
    pub async fn info(&self) -> ClusterInfo {
        wait_for(PATIENCE, || async { self.client.cluster_info().await.ok() })
            .await
            .unwrap_or_else(|e| panic!("cluster info unavailable: {e}"))
    }

    /// Sends `signal` to the node on `host`.
    pub fn signal_node(&self, host: u8, signal: Signal) {
        self.nodes
            .get(&host)
            .unwrap_or_else(|| panic!("no node runs on h{host}"))
            .signal(signal);
    }

    /// SIGKILLs the node on `host`; answers the instant just before the
    /// signal was sent.
    pub async fn kill_node(&mut self, host: u8) -> Instant {
        let node = self
            .nodes
            .remove(&host)
            .unwrap_or_else(|| panic!("no node runs on h{host}"));
        let at = Instant::now();
        kill(node).await;
        at
    }

    /// SIGKILLs the coordinator and starts it again with the same flags
    /// (and so the same store); answers how long it did not answer: from
    /// the signal to the first `ClusterInfo` of the new process.
    pub async fn crash_and_restart_coordinator(&mut self) -> Duration {
        let old = self.coordinator.take().expect("the coordinator is running");
        let at = Instant::now();
        kill(old).await;
        self.restarts += 1;
        let label = "coordinator";
        let new = spawn_in(
            COORDINATOR_HOST,
            "weft-coordinator",
            &self.coordinator_args,
            self.dir(),
            label,
        );
        self.coordinator = Some(new);
        wait_for(PATIENCE, || async { self.client.cluster_info().await.ok() })
            .await
            .unwrap_or_else(|e| panic!("restart {} never answered: {e}", self.restarts));
        at.elapsed()
    }

    /// Submits `specs`, failing the scenario on error.
    pub async fn submit(&self, specs: Vec<TaskSpec>) -> Vec<TaskId> {
        self.client
            .submit_many(specs)
            .await
            .unwrap_or_else(|e| panic!("submitting: {e}"))
    }

    /// Waits until no task is queued, assigned or running, and at least
    /// `total` tasks are final.
    pub async fn wait_until_all_final(&self, total: u64) {
        wait_for(PATIENCE, || async {
            let info = self.client.cluster_info().await.ok()?;
            let open = info.count(TaskState::Queued)
                + info.count(TaskState::Assigned)
                + info.count(TaskState::Running);
            let done = info.count(TaskState::Succeeded)
                + info.count(TaskState::Failed)
                + info.count(TaskState::Cancelled)
                + info.count(TaskState::TimedOut);
            (open == 0 && done >= total).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("the tasks did not all finish: {e}"));
    }

    /// Every task the coordinator holds, by id.
    pub async fn all_tasks(&self) -> BTreeMap<TaskId, Task> {
        let tasks = self
            .client
            .list(None, 1_000_000)
            .await
            .unwrap_or_else(|e| panic!("listing tasks: {e}"));
        tasks.into_iter().map(|t| (t.id, t)).collect()
    }
}

/// What a lab cluster does when dropped: while a scenario panics, the
/// tail of each process's log and then the panic again; with
/// `WEFT_TEST_KEEP`, its temp dir kept.
pub fn leave(procs: Vec<&ChildProcess>, dir: &mut Option<TempDir>) {
    if std::thread::panicking() {
        for process in procs {
            say(&format!(
                "--- {} (last 30 lines of {}) ---\n{}",
                process.label(),
                process.log().display(),
                process.log_tail(30)
            ));
        }
        if let Some(failure) = failure() {
            say(&format!("--- the scenario failed (logs above): {failure}"));
        }
    }
    if std::env::var_os("WEFT_TEST_KEEP").is_some()
        && let Some(dir) = dir.take()
    {
        say(&format!("kept {}", dir.keep().display()));
    }
}

impl Drop for LabCluster {
    fn drop(&mut self) {
        let mut procs: Vec<&ChildProcess> = self.nodes.values().collect();
        procs.extend(self.coordinator.as_ref());
        leave(procs, &mut self.dir);
        // The children are killed by `kill_on_drop`; `teardown` kills
        // anything else left in the lab.
    }
}

/// The coordinator's URL as lab hosts dial it (TLS: its certificate names
/// the listen address).
pub fn url() -> String {
    format!("https://{}:{PORT}", address(COORDINATOR_HOST))
}

/// The name the node on `host` registers with.
pub fn node_name(host: u8) -> String {
    format!("node-h{host}")
}

/// An exec task that appends one line to `<runs>/<key>` when it starts,
/// then sleeps `sleep` (`sleep`'s syntax, e.g. `0.05`; `None`: no sleep).
/// The hosts share the filesystem, so the lines count the executions.
pub fn marker_task(runs: &Path, key: &str, sleep: Option<&str>) -> TaskSpec {
    let script = match sleep {
        Some(secs) => format!("echo $$ >> \"$0\"; sleep {secs}"),
        None => "echo $$ >> \"$0\"".to_owned(),
    };
    let marker = runs.join(key).display().to_string();
    TaskSpec::exec(["sh".to_owned(), "-c".to_owned(), script, marker])
}

/// How many times each marker key ran (lines in its file).
pub fn run_counts(runs: &Path) -> BTreeMap<String, usize> {
    let entries = std::fs::read_dir(runs).unwrap_or_else(|e| panic!("reading {runs:?}: {e}"));
    entries
        .filter_map(Result::ok)
        .map(|entry| {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            (
                entry.file_name().to_string_lossy().into_owned(),
                text.lines().count(),
            )
        })
        .collect()
}

/// What a task's recorded event history says about accepted results.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// `finished` events (exactly one for a final task).
    pub finished: usize,
    /// State changes to SUCCEEDED.
    pub succeeded: usize,
    /// Events of an attempt recorded after a later attempt's first event:
    /// a stale attempt's event the coordinator let through.
    pub stale_accepted: usize,
    /// The highest attempt in the history.
    pub last_attempt: u32,
}

impl History {
    /// True unless the history holds more than one result, or a result
    /// or other event of a superseded attempt.
    pub fn single_result(&self) -> bool {
        self.finished == 1 && self.succeeded <= 1 && self.stale_accepted == 0
    }
}

/// Replays every task's recorded events (`Watch` from seq 0, which ends
/// after the final event) and summarizes them.
pub async fn histories(client: &Client, ids: &[TaskId]) -> BTreeMap<TaskId, History> {
    futures::stream::iter(ids.iter().copied())
        .map(|id| async move {
            let history = tokio::time::timeout(Duration::from_secs(30), history(client, id))
                .await
                .unwrap_or_else(|_| panic!("replaying the events of {id} took over 30 s"));
            (id, history)
        })
        .buffer_unordered(32)
        .collect()
        .await
}

async fn history(client: &Client, id: TaskId) -> History {
    let mut events = client
        .watch(id, 0)
        .await
        .unwrap_or_else(|e| panic!("watching {id}: {e}"));
    let mut history = History::default();
    while let Some(event) = events.next().await {
        let event = event.unwrap_or_else(|e| panic!("events of {id}: {e}"));
        let Attempt(attempt) = event.attempt;
        if attempt < history.last_attempt {
            history.stale_accepted += 1;
        }
        history.last_attempt = history.last_attempt.max(attempt);
        match event.body {
            EventBody::Finished(_) => history.finished += 1,
            EventBody::State {
                state: TaskState::Succeeded,
                ..
            } => history.succeeded += 1,
            _ => {}
        }
    }
    history
}

/// Milliseconds of `d`, for figures.
pub fn ms(d: Duration) -> u128 {
    d.as_millis()
}
