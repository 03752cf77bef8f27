//! `TestCluster`: a coordinator and N nodes on loopback, in-process or as
//! real processes, with the waits that scenario tests need.
//!
//! In-process mode binds the coordinator on `127.0.0.1:0` before starting
//! it, so tests never fight over ports and run in parallel. Process mode
//! runs the same cluster as `weft-coordinator` and `weft-node` binaries.
//! Both start through `weft_cluster`, the one way every tool starts a
//! cluster; this file adds the scenario API and turns errors into panics.
//! Nothing here sleeps to wait for state: every wait polls real state
//! through the client API with a deadline.
//!
//! Layout: `builder.rs` (the settings), `members.rs` (starting and stopping
//! the coordinator and a node), `standby.rs` (more coordinators on one
//! PostgreSQL database, failover), this file (the running cluster and its
//! waits).

mod builder;
mod fakes;
mod members;
mod standby;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tempfile::TempDir;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use weft_client::{BearerToken, Client, NodeInfo, Task};
use weft_proto::pb::admin_service_client::AdminServiceClient;
use weft_proto::pb::task_service_client::TaskServiceClient;
use weft_proto::{ExecPolicy, TaskId, TaskState};

use crate::cli::{CliOutput, run_weft, run_weft_env};
use crate::process::bin_path;
use crate::wait::{default_timeout, wait_for};

use self::builder::Labels;
pub use self::builder::TestClusterBuilder;
pub use self::fakes::Opened;
use self::members::{
    ADMIN_TOKEN_FILE, Coordinator, Node, Reach, start_coordinator, start_node, terminate,
};
pub use self::standby::StandbyCoordinator;

/// How long the join token of a node the harness starts is valid.
const JOIN_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(600);

impl TestClusterBuilder {
    /// Starts the coordinator, then the nodes, and waits until every node
    /// is registered.
    pub async fn start(mut self) -> TestCluster {
        let standby = builder::postgres_by_default() && self.database_url.is_none();
        if standby {
            let url = tokio::task::spawn_blocking(weft_coordinator::store::pg::testdb::database)
                .await
                .expect("a database on the tests' PostgreSQL");
            self.database_url = Some(url);
        }
        let dir = tempfile::Builder::new()
            .prefix("weft-test-")
            .tempdir()
            .expect("creating the cluster temp dir");
        let (coordinator, addr, http_addr) =
            start_coordinator(&self, dir.path(), (None, None), 0).await;
        let (url, ca_file) = if self.insecure {
            (format!("http://{addr}"), None)
        } else {
            let ca_file = dir.path().join("pki").join("ca.pem");
            let url = format!("https://{addr}");
            crate::trust::register(&url, ca_file.clone());
            (url, Some(ca_file))
        };
        let cluster = TestCluster {
            serving: Mutex::new(Serving { url, addr }),
            ca_file,
            http_addr,
            restarts: AtomicUsize::new(0),
            standbys: AtomicUsize::new(0),
            dir: Some(dir),
            coordinator: Mutex::new(Some(coordinator)),
            nodes: Mutex::new(BTreeMap::new()),
            next_node: AtomicUsize::new(0),
            client: Mutex::new(None),
            peers: Mutex::new(Vec::new()),
            settings: self.clone(),
        };
        for index in 0..self.nodes {
            let labels = self.labels.get(&index).cloned().unwrap_or_default();
            let exec = self.exec.get(&index).cloned().unwrap_or_default();
            cluster.spawn_node(self.slots, labels, exec).await;
        }
        cluster.wait_for_nodes(self.nodes).await;
        if standby && self.processes {
            let peer = cluster.start_standby().await;
            peer.wait_standby().await;
            cluster
                .peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(peer);
        }
        cluster
    }
}

/// A raw `TaskService` client with a bearer token.
pub type RawTasks = TaskServiceClient<InterceptedService<Channel, BearerToken>>;
/// A raw `AdminService` client with a bearer token.
pub type RawAdmin = AdminServiceClient<InterceptedService<Channel, BearerToken>>;

fn bearer(token: Option<&str>) -> BearerToken {
    BearerToken::new(token).unwrap_or_else(|e| panic!("a bad token: {e}"))
}

/// How a node stopped after [`TestCluster::stop_node`].
#[derive(Debug)]
pub struct Stopped {
    /// It stopped by itself within the deadline (no SIGKILL needed).
    pub in_time: bool,
    /// Process mode: its exit status.
    pub status: Option<ExitStatus>,
}

/// Where the coordinator serves: its URL and bound address (another one
/// after [`TestCluster::crash_and_move_coordinator`]).
struct Serving {
    url: String,
    addr: SocketAddr,
}

/// A free loopback address to move the coordinator to
/// ([`TestCluster::crash_and_move_coordinator`]), known before it is used
/// so that nodes and clients can be given it first. Free when answered
/// (bound, then released): nothing listens there until the coordinator
/// does, so dialing it is refused, as a standby that is not serving is.
pub fn spare_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a spare port");
    listener.local_addr().expect("a bound listener's address")
}

/// A running coordinator and its nodes. See the module docs.
pub struct TestCluster {
    serving: Mutex<Serving>,
    ca_file: Option<PathBuf>,
    /// The HTTP listener's (dashboard) address: kept across restarts.
    http_addr: Option<SocketAddr>,
    restarts: AtomicUsize,
    /// Standby coordinators started ([`TestCluster::start_standby`]).
    standbys: AtomicUsize,
    dir: Option<TempDir>,
    // std mutexes, never held across an await.
    coordinator: Mutex<Option<Coordinator>>,
    nodes: Mutex<BTreeMap<String, Node>>,
    next_node: AtomicUsize,
    /// The shared admin client; made again after the coordinator moved.
    client: Mutex<Option<Client>>,
    /// `WEFT_TEST_STORE=postgres` in process mode: the standby started
    /// beside the coordinator, killed with the cluster.
    peers: Mutex<Vec<StandbyCoordinator>>,
    settings: TestClusterBuilder,
}

impl TestCluster {
    /// A builder with 1 node, 4 slots, 100 ms heartbeats, in-process.
    pub fn builder() -> TestClusterBuilder {
        TestClusterBuilder::default()
    }

    /// The coordinator's URL, `https://127.0.0.1:PORT` (`http://` for an
    /// [`insecure`](TestClusterBuilder::insecure) cluster).
    pub fn url(&self) -> String {
        self.lock_serving().url.clone()
    }

    /// The URL of a coordinator at `addr` in this cluster (its scheme).
    pub fn url_at(&self, addr: SocketAddr) -> String {
        match self.settings.insecure {
            true => format!("http://{addr}"),
            false => format!("https://{addr}"),
        }
    }

    /// The dashboard's URL (the coordinator's HTTP listener, on a free
    /// loopback port): `https://127.0.0.1:PORT`, with the cluster's
    /// serving certificate (`http://` for an insecure cluster).
    pub fn http_url(&self) -> String {
        let addr = self
            .http_addr
            .expect("every test cluster's coordinator serves HTTP");
        match self.settings.insecure {
            true => format!("http://{addr}"),
            false => format!("https://{addr}"),
        }
    }

    /// The cluster CA's `ca.pem` (`None` for an insecure cluster).
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// How clients trust the coordinator (`None` for an insecure cluster).
    pub fn trust(&self) -> Option<weft_client::Trust> {
        self.ca_file.clone().map(weft_client::Trust::CaFile)
    }

    /// The cluster's temp dir: logs, pid files, markers of tests.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(TempDir::path)
            .expect("the temp dir lives as long as the cluster")
    }

    /// True in process mode.
    pub fn is_processes(&self) -> bool {
        self.settings.processes
    }

    /// A client connected to the coordinator (one shared connection, made
    /// again after the coordinator moved), with the admin token.
    pub async fn client(&self) -> Client {
        let url = self.url();
        let shared = self.lock_client().clone();
        if let Some(client) = shared.filter(|client| client.url() == url) {
            return client;
        }
        let client = self.client_with(Some(&self.admin_token())).await;
        *self.lock_client() = Some(client.clone());
        client
    }

    /// A new client with `token` (`None`: no token at all).
    pub async fn client_with(&self, token: Option<&str>) -> Client {
        let url = self.url();
        Client::connect_secure(&url, self.trust().as_ref(), token)
            .await
            .unwrap_or_else(|e| panic!("connecting a client to {url}: {e}"))
    }

    /// The admin token the coordinator wrote on its first start.
    pub fn admin_token(&self) -> String {
        let path = self.admin_token_file();
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading the admin token {}: {e}", path.display()))
            .trim()
            .to_owned()
    }

    /// Where the coordinator wrote its admin token.
    pub fn admin_token_file(&self) -> PathBuf {
        self.dir().join(ADMIN_TOKEN_FILE)
    }

    /// Makes a token with `scopes` (e.g. `["read"]`) through the admin
    /// client; returns the token string.
    pub async fn scoped_token(&self, scopes: &[&str]) -> String {
        let scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
        self.client()
            .await
            .create_token(scopes, "test", None)
            .await
            .unwrap_or_else(|e| panic!("creating a token: {e}"))
            .0
    }

    /// A raw `TaskService` client (proto types) sending `token` (`None`:
    /// none) on every call.
    pub async fn raw_tasks(&self, token: Option<&str>) -> RawTasks {
        let channel = crate::fake_node::channel(&self.url()).await;
        TaskServiceClient::with_interceptor(channel, bearer(token))
    }

    /// A raw `AdminService` client sending `token` (`None`: none).
    pub async fn raw_admin(&self, token: Option<&str>) -> RawAdmin {
        let channel = crate::fake_node::channel(&self.url()).await;
        AdminServiceClient::with_interceptor(channel, bearer(token))
    }

    /// Runs the `weft` CLI binary against this cluster, with the admin token.
    pub async fn weft(&self, args: &[&str]) -> CliOutput {
        run_weft(&self.url(), Some(&self.admin_token()), args, None).await
    }

    /// Runs the `weft` CLI binary with `token` (`None`: none) and extra
    /// environment variables.
    pub async fn weft_as(
        &self,
        token: Option<&str>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> CliOutput {
        run_weft_env(&self.url(), token, env, args, None).await
    }

    /// Runs the `weft` CLI binary with `stdin` fed to it.
    pub async fn weft_with_stdin(&self, args: &[&str], stdin: &[u8]) -> CliOutput {
        run_weft(&self.url(), Some(&self.admin_token()), args, Some(stdin)).await
    }

    /// Names of the nodes the harness started and has not stopped.
    pub fn node_names(&self) -> Vec<String> {
        self.lock_nodes().keys().cloned().collect()
    }

    /// Process mode: the OS pid of the `weft-coordinator` process.
    pub fn coordinator_pid(&self) -> Option<u32> {
        match &*self.coordinator.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(Coordinator::Process(child)) => child.pid(),
            _ => None,
        }
    }

    /// Process mode: the OS pid of node `name`'s `weft-node` process.
    pub fn node_pid(&self, name: &str) -> Option<u32> {
        match self.lock_nodes().get(name) {
            Some(Node::Process(child)) => child.pid(),
            _ => None,
        }
    }

    /// Waits until the coordinator lists exactly `n` nodes; returns them.
    pub async fn wait_for_nodes(&self, n: usize) -> Vec<NodeInfo> {
        let client = self.client().await;
        let found = wait_for(default_timeout(), || {
            let client = client.clone();
            async move {
                let nodes = client.nodes().await.ok()?;
                (nodes.len() == n).then_some(nodes)
            }
        })
        .await;
        match found {
            Ok(nodes) => nodes,
            Err(e) => {
                let seen = client.nodes().await.map(|v| v.len());
                panic!("{e}: waiting for {n} nodes; the coordinator lists {seen:?}")
            }
        }
    }

    /// Waits until task `id` is RUNNING; returns the name of its node.
    pub async fn wait_for_running(&self, id: TaskId) -> String {
        let task = self.wait_for_state(id, TaskState::Running).await;
        match task.node_name {
            Some(name) => name,
            None => panic!("running task {id} has no node name"),
        }
    }

    /// Waits until task `id` is in `state`; returns the task. Fails at once
    /// when the task reaches a different final state.
    pub async fn wait_for_state(&self, id: TaskId, state: TaskState) -> Task {
        let client = self.client().await;
        let found = wait_for(default_timeout(), || {
            let client = client.clone();
            async move {
                let task = client.get(id).await.ok()?;
                if task.state == state {
                    return Some(task);
                }
                if task.state.is_final() {
                    panic!(
                        "task {id} ended {} while waiting for {state}: {task:?}",
                        task.state
                    );
                }
                None
            }
        })
        .await;
        match found {
            Ok(task) => task,
            Err(e) => {
                let now = client.get(id).await;
                panic!("{e}: waiting for task {id} to be {state}; it is {now:?}")
            }
        }
    }

    /// Waits until task `id` satisfies `check` (e.g. "running as attempt
    /// 2"); returns it.
    pub async fn wait_for_task(&self, id: TaskId, check: impl Fn(&Task) -> bool) -> Task {
        let client = self.client().await;
        let check = &check;
        let found = wait_for(default_timeout(), || {
            let client = client.clone();
            async move {
                let task = client.get(id).await.ok()?;
                check(&task).then_some(task)
            }
        })
        .await;
        match found {
            Ok(task) => task,
            Err(e) => {
                let now = client.get(id).await;
                panic!("{e}: task {id} never met the condition; it is {now:?}")
            }
        }
    }

    /// Waits until task `id` reaches a final state; returns it.
    pub async fn wait_for_final(&self, id: TaskId) -> Task {
        let client = self.client().await;
        let found = wait_for(default_timeout(), || {
            let client = client.clone();
            async move {
                let task = client.get(id).await.ok()?;
                task.state.is_final().then_some(task)
            }
        })
        .await;
        match found {
            Ok(task) => task,
            Err(e) => {
                let now = client.get(id).await;
                panic!("{e}: waiting for task {id} to finish; it is {now:?}")
            }
        }
    }

    /// Starts one more node with `slots` and `labels`; waits until it is
    /// registered and returns its name.
    pub async fn add_node<K, V>(
        &self,
        slots: u32,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> String
    where
        K: Into<String>,
        V: Into<String>,
    {
        let labels = labels
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self.add_node_with(slots, labels, ExecPolicy::Allow).await
    }

    /// Starts one more node with `slots`, no labels and exec policy
    /// `exec`; waits until it is registered and returns its name.
    pub async fn add_node_with_exec(&self, slots: u32, exec: ExecPolicy) -> String {
        self.add_node_with(slots, Labels::new(), exec).await
    }

    async fn add_node_with(&self, slots: u32, labels: Labels, exec: ExecPolicy) -> String {
        let name = self.spawn_node(slots, labels, exec).await;
        let client = self.client().await;
        let wanted = name.clone();
        let seen = wait_for(default_timeout(), || {
            let client = client.clone();
            let wanted = wanted.clone();
            async move {
                let nodes = client.nodes().await.ok()?;
                nodes.iter().any(|n| n.name == wanted).then_some(())
            }
        })
        .await;
        if let Err(e) = seen {
            panic!("{e}: waiting for added node {name} to register");
        }
        name
    }

    /// Kills node `name` abruptly, like a crash: in-process
    /// `RunningNode::kill`, in process mode SIGKILL.
    pub async fn kill_node(&self, name: impl AsRef<str>) {
        match self.take_node(name.as_ref()) {
            Node::InProcess(node) => node.kill().await,
            Node::Process(child) => {
                child
                    .kill()
                    .await
                    .expect("waiting for a killed child process");
            }
        }
    }

    /// Stops node `name` gracefully: in-process `RunningNode::drain` with
    /// the cluster's drain grace; in process mode SIGTERM, then SIGKILL
    /// if it has not exited after the grace plus 10 s.
    pub async fn stop_node(&self, name: impl AsRef<str>) -> Stopped {
        let grace = self.settings.drain_grace;
        let deadline = grace + Duration::from_secs(10);
        match self.take_node(name.as_ref()) {
            Node::InProcess(node) => {
                let done = tokio::time::timeout(deadline, node.drain(grace)).await;
                Stopped {
                    in_time: matches!(done, Ok(Ok(()))),
                    status: None,
                }
            }
            Node::Process(child) => {
                let (status, in_time) = terminate(*child, deadline).await;
                Stopped {
                    in_time,
                    status: Some(status),
                }
            }
        }
    }

    /// Waits until node `name` stops by itself (after a `Drain` from the
    /// coordinator); true if it did within the default timeout.
    pub async fn wait_node_stopped(&self, name: impl AsRef<str>) -> bool {
        let timeout = default_timeout();
        match self.take_node(name.as_ref()) {
            Node::InProcess(mut node) => tokio::time::timeout(timeout, node.wait()).await.is_ok(),
            Node::Process(mut child) => tokio::time::timeout(timeout, child.wait()).await.is_ok(),
        }
    }

    /// Stops everything: nodes first (killed in-process; SIGTERM for
    /// processes), then the coordinator, which must stop within 5 s.
    pub async fn shutdown(self) {
        // A coordinator that crashed or wedged during the test fails it
        // here, loudly, rather than passing by accident.
        let answering = tokio::time::timeout(Duration::from_secs(10), async {
            self.client().await.cluster_info().await
        })
        .await;
        let mut problems = Vec::new();
        match answering {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.push(format!("the coordinator stopped answering: {e}")),
            Err(_) => problems.push("the coordinator did not answer ClusterInfo in 10 s".into()),
        }
        // The standby first, or it would take the database over when the
        // coordinator stops.
        if !self.stop_peers().await {
            problems.push("the standby coordinator did not stop in 5 s".into());
        }
        let nodes = std::mem::take(&mut *self.lock_nodes());
        for (name, node) in nodes {
            match node {
                Node::InProcess(node) => node.kill().await,
                Node::Process(mut child) => {
                    // Exited by itself before we asked: fine if drained
                    // (status 0), a crash otherwise.
                    if let Some(status) = child.try_wait().filter(|s| !s.success()) {
                        problems.push(format!("weft-node {name} died during the test ({status})"));
                    }
                    terminate(*child, Duration::from_secs(3)).await;
                }
            }
        }
        let coordinator = self
            .coordinator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match coordinator {
            Some(Coordinator::InProcess(running)) => {
                let stopped = running.shutdown(Duration::from_secs(5)).await;
                if stopped.is_err() {
                    problems.push("the coordinator did not shut down within 5 s".into());
                }
            }
            Some(Coordinator::Process(mut child)) => {
                if let Some(status) = child.try_wait() {
                    problems.push(format!("weft-coordinator died during the test ({status})"));
                }
                let (status, in_time) = terminate(*child, Duration::from_secs(5)).await;
                if !in_time {
                    problems.push(format!(
                        "weft-coordinator ignored SIGTERM for 5 s ({status})"
                    ));
                }
            }
            None => {}
        }
        assert!(
            problems.is_empty(),
            "cluster shutdown: {}",
            problems.join("; ")
        );
    }

    /// Stops the coordinator (SIGTERM / `shutdown`) and starts it again on
    /// the same address and data dir; nodes reconnect by themselves.
    pub async fn restart_coordinator(&self) {
        self.restart_coordinator_after(false).await;
    }

    /// Stops the standby `WEFT_TEST_STORE=postgres` started, so that a
    /// scenario restarting its coordinator gets the same one back (a
    /// standby would take over at another address). Answers whether each
    /// stopped cleanly in time.
    async fn stop_peers(&self) -> bool {
        let peers = std::mem::take(&mut *self.peers.lock().unwrap_or_else(|p| p.into_inner()));
        let mut clean = true;
        for peer in peers {
            clean &= peer.stop(Duration::from_secs(5)).await;
        }
        clean
    }

    /// Process mode: kills the coordinator with SIGKILL, as a crash would,
    /// and starts it again on the same address and data dir.
    pub async fn crash_and_restart_coordinator(&self) {
        self.restart_coordinator_after(true).await;
    }

    /// Process mode, [`durable`](TestClusterBuilder::durable): kills the
    /// coordinator with SIGKILL and starts one on the same data dir at
    /// `addr` (a [`spare_addr`]), as a standby taking over on another
    /// machine would; answers its URL. Nothing listens at the old address
    /// afterwards: only nodes and clients given the new one too (`OLD,NEW`)
    /// find it. The cluster's URL, client and `weft` runs move with it.
    pub async fn crash_and_move_coordinator(&self, addr: SocketAddr) -> String {
        assert!(
            self.settings.durable,
            "crash_and_move_coordinator needs TestCluster::builder().durable(): the new coordinator loads the old one's store"
        );
        self.restart_coordinator_at(true, Some(addr)).await;
        self.url()
    }

    async fn restart_coordinator_after(&self, crash: bool) {
        self.restart_coordinator_at(crash, None).await;
    }

    /// Stops (or with `crash`, kills) the coordinator and starts it again
    /// on the same data dir, at `moved_to` or else where it was.
    async fn restart_coordinator_at(&self, crash: bool, moved_to: Option<SocketAddr>) {
        assert!(
            self.stop_peers().await,
            "the standby coordinator did not stop in 5 s"
        );
        let old = self
            .coordinator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match old {
            Some(Coordinator::Process(child)) if crash => {
                child
                    .kill()
                    .await
                    .expect("waiting for a killed child process");
            }
            Some(Coordinator::InProcess(_)) if crash => {
                panic!("crash_and_restart_coordinator needs TestCluster::builder().processes()")
            }
            Some(Coordinator::InProcess(running)) => {
                let stopped = running.shutdown(Duration::from_secs(5)).await;
                assert!(
                    stopped.is_ok(),
                    "the coordinator did not shut down within 5 s"
                );
            }
            Some(Coordinator::Process(child)) => {
                let (status, in_time) = terminate(*child, Duration::from_secs(5)).await;
                assert!(
                    in_time,
                    "weft-coordinator ignored SIGTERM for 5 s ({status})"
                );
            }
            None => panic!("the coordinator is not running"),
        }
        let generation = self.restarts.fetch_add(1, Ordering::SeqCst) + 1;
        let wanted = moved_to.unwrap_or_else(|| self.lock_serving().addr);
        let (coordinator, addr, http_addr) = start_coordinator(
            &self.settings,
            self.dir(),
            (Some(wanted), self.http_addr),
            generation,
        )
        .await;
        assert_eq!(
            addr, wanted,
            "the restarted coordinator is not where it was asked to be"
        );
        assert_eq!(http_addr, self.http_addr, "the restarted dashboard moved");
        *self.coordinator.lock().unwrap_or_else(|p| p.into_inner()) = Some(coordinator);
        if moved_to.is_some() {
            let url = self.url_at(addr);
            if let Some(ca_file) = &self.ca_file {
                crate::trust::register(&url, ca_file.clone());
            }
            *self.lock_serving() = Serving { url, addr };
        }
    }

    /// Starts node `node-N`. With TLS it joins as on a real network: a
    /// join token for one node (made through the admin API, as `weft
    /// token create --role node` does), and a state dir of its own.
    async fn spawn_node(&self, slots: u32, labels: Labels, exec: ExecPolicy) -> String {
        let name = format!("node-{}", self.next_node.fetch_add(1, Ordering::SeqCst));
        let state_dir = self.dir().join(format!("{name}-state"));
        let token = match self.settings.insecure {
            true => None,
            false => Some(self.join_token(&name).await),
        };
        let url = self.url();
        let reach = match &token {
            Some(token) => Reach::Join {
                token,
                state_dir: &state_dir,
            },
            None => Reach::Plain(&url),
        };
        let node = start_node(
            &self.settings,
            reach,
            self.dir(),
            &name,
            slots,
            labels,
            exec,
        );
        self.lock_nodes().insert(name.clone(), node);
        name
    }

    /// A join token for one node, valid for a while.
    pub async fn join_token(&self, name: &str) -> String {
        let client = self.client().await;
        let (token, _) = client
            .create_join_token(name, Some(JOIN_TOKEN_TTL), 1, "")
            .await
            .unwrap_or_else(|e| panic!("creating a join token for {name}: {e}"));
        token
    }

    fn take_node(&self, name: &str) -> Node {
        self.lock_nodes()
            .remove(name)
            .unwrap_or_else(|| panic!("the harness runs no node named {name:?}"))
    }

    fn lock_client(&self) -> std::sync::MutexGuard<'_, Option<Client>> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_serving(&self) -> std::sync::MutexGuard<'_, Serving> {
        self.serving.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Node>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every process log of the cluster, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(self.dir()) else {
            return out;
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for path in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(200)..];
            out.push_str(&format!(
                "--- {} (last {} lines) ---\n",
                path.display(),
                tail.len()
            ));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let keep = std::env::var("WEFT_TEST_KEEP").is_ok_and(|v| v == "1");
        if std::thread::panicking() && self.settings.processes {
            eprintln!("{}", self.logs());
        }
        if keep && let Some(dir) = self.dir.take() {
            eprintln!(
                "WEFT_TEST_KEEP=1: cluster files kept in {}",
                dir.keep().display()
            );
        }
    }
}

/// Runs `weft` with `args` against `url`; a helper for tests with no cluster.
pub async fn weft_at(url: &str, args: &[&str]) -> CliOutput {
    // Fail early with the build hint rather than inside the runner.
    bin_path("weft");
    run_weft(url, None, args, None).await
}
