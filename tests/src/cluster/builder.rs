//! [`TestClusterBuilder`]: the settings of a test cluster (nodes, slots,
//! timings, labels, exec policies, in-process or real processes) and the defaults every
//! scenario starts from. Plain settings; starting is in `mod.rs` and
//! `members.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use weft_proto::ExecPolicy;

/// Labels of one node.
pub(super) type Labels = BTreeMap<String, String>;

/// Settings of a cluster, chosen with [`TestCluster::builder`](super::TestCluster::builder).
#[derive(Clone, Debug)]
pub struct TestClusterBuilder {
    pub(super) nodes: usize,
    pub(super) slots: u32,
    pub(super) heartbeat: Duration,
    pub(super) heartbeat_timeout: Duration,
    pub(super) drain_grace: Duration,
    pub(super) labels: BTreeMap<usize, Labels>,
    /// Resources of the nodes started with the cluster, by node name
    /// (`node-INDEX`).
    pub(super) resources: BTreeMap<String, BTreeMap<String, u64>>,
    pub(super) exec: BTreeMap<usize, ExecPolicy>,
    pub(super) processes: bool,
    pub(super) durable: bool,
    pub(super) database_url: Option<String>,
    pub(super) max_queued: Option<usize>,
    pub(super) max_node_slots: Option<u32>,
    pub(super) max_message_size: Option<usize>,
    pub(super) start_timeout: Option<Duration>,
    pub(super) schedule_timeout: Option<Duration>,
    pub(super) max_streams_per_client: Option<usize>,
    pub(super) log_filter: Option<String>,
    pub(super) insecure: bool,
    pub(super) cert_lifetime: Option<Duration>,
    pub(super) node_cert_lifetime: Option<Duration>,
    pub(super) handshake_timeout: Option<Duration>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_connections_per_ip: Option<usize>,
    pub(super) max_streams_per_connection: Option<u32>,
    pub(super) descriptor_limit: Option<u64>,
    pub(super) otlp_endpoint: Option<String>,
}

impl Default for TestClusterBuilder {
    fn default() -> Self {
        TestClusterBuilder {
            nodes: 1,
            slots: 4,
            heartbeat: Duration::from_millis(100),
            // Generous against a loaded 2-core CI box; tests about lost
            // nodes set their own.
            heartbeat_timeout: Duration::from_secs(3),
            drain_grace: Duration::from_secs(5),
            labels: BTreeMap::new(),
            resources: BTreeMap::new(),
            exec: BTreeMap::new(),
            processes: processes_by_default(),
            durable: false,
            database_url: None,
            max_queued: None,
            max_node_slots: None,
            max_message_size: None,
            start_timeout: None,
            schedule_timeout: None,
            max_streams_per_client: None,
            log_filter: None,
            insecure: false,
            cert_lifetime: None,
            node_cert_lifetime: None,
            handshake_timeout: None,
            max_connections: None,
            max_connections_per_ip: None,
            max_streams_per_connection: None,
            descriptor_limit: None,
            otlp_endpoint: None,
        }
    }
}

/// `WEFT_TEST_MODE=processes` runs every scenario against the real
/// binaries instead of in-process libraries (CI runs the suite both ways).
fn processes_by_default() -> bool {
    match std::env::var("WEFT_TEST_MODE").as_deref() {
        Ok("processes") => true,
        Ok("in-process") | Ok("") | Err(_) => false,
        Ok(other) => panic!("WEFT_TEST_MODE={other:?}: expected `processes` or `in-process`"),
    }
}

/// `WEFT_TEST_STORE=postgres` keeps every scenario's store in a fresh
/// database on the tests' private PostgreSQL (unless it names its own),
/// and in process mode starts a standby coordinator beside it on that
/// database: the scenarios then run on a two-coordinator cluster (CI runs
/// a selection of them so).
pub(super) fn postgres_by_default() -> bool {
    match std::env::var("WEFT_TEST_STORE").as_deref() {
        Ok("postgres") => true,
        Ok("embedded") | Ok("") | Err(_) => false,
        Ok(other) => panic!("WEFT_TEST_STORE={other:?}: expected `postgres` or `embedded`"),
    }
}

impl TestClusterBuilder {
    /// How many nodes to start (`node-0`, `node-1`, ...). Default 1.
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Slots of each node. Default 4.
    pub fn slots(mut self, slots: u32) -> Self {
        self.slots = slots;
        self
    }

    /// Heartbeat interval of the coordinator (and so of the nodes). Default 100 ms.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Silence after which a node is lost. Default 3 s.
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = timeout;
        self
    }

    /// Each node's drain grace (SIGTERM / `stop_node`). Default 5 s.
    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.drain_grace = grace;
        self
    }

    /// Labels of node `index`.
    pub fn node_labels<K, V>(
        mut self,
        index: usize,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.labels.insert(
            index,
            labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    /// Resources of node `index` (`--resource name=amount`).
    pub fn node_resources(mut self, index: usize, resources: &[(&str, u64)]) -> Self {
        self.resources.insert(
            format!("node-{index}"),
            resources
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        );
        self
    }

    /// Exec policy of node `index` (default: allow, as `weft-node`'s).
    pub fn node_exec(mut self, index: usize, exec: ExecPolicy) -> Self {
        self.exec.insert(index, exec);
        self
    }

    /// Runs the real `weft-coordinator` and `weft-node` binaries instead of
    /// the libraries in this process.
    pub fn processes(mut self) -> Self {
        self.processes = true;
        self
    }

    /// Runs the libraries in this process, whatever `WEFT_TEST_MODE` says:
    /// for scenarios about in-process handles (e.g. `RunningNode::kill`).
    pub fn in_process(mut self) -> Self {
        self.processes = false;
        self
    }

    /// Caps the tasks the coordinator holds unfinished (Submit past it is
    /// RESOURCE_EXHAUSTED). Default: the coordinator's own.
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = Some(n);
        self
    }

    /// Caps the slots one node may declare (and its prefetch). Default:
    /// the coordinator's own.
    pub fn max_node_slots(mut self, n: u32) -> Self {
        self.max_node_slots = Some(n);
        self
    }

    /// Sets the coordinator's `--max-message-size` in bytes (the largest
    /// message it takes or sends a node). Default: the coordinator's own.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = Some(bytes);
        self
    }

    /// Sets the coordinator's `--schedule-timeout` (how long a call no
    /// connected node serves waits for one). Default: the coordinator's own.
    pub fn schedule_timeout(mut self, timeout: Duration) -> Self {
        self.schedule_timeout = Some(timeout);
        self
    }

    /// Sets the coordinator's `--start-timeout` (how long an attempt sent
    /// to a node may stay unstarted). Default: the coordinator's own.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = Some(timeout);
        self
    }

    /// Exports the coordinator's traces to `url` (`--otlp-endpoint`; see
    /// `crate::otlp::OtlpReceiver`). Default: no export.
    pub fn otlp_endpoint(mut self, url: impl Into<String>) -> Self {
        self.otlp_endpoint = Some(url.into());
        self
    }

    /// Sets the coordinator's `--max-streams-per-client` (Watch, Run and
    /// WaitMany streams one client may have open). Default: the
    /// coordinator's own.
    pub fn max_streams_per_client(mut self, n: usize) -> Self {
        self.max_streams_per_client = Some(n);
        self
    }

    /// Process mode: the `RUST_LOG` of the coordinator and node processes
    /// (default: this process's `RUST_LOG`, else `info`), e.g. `debug` for a
    /// scenario that reads their log files.
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = Some(filter.to_owned());
        self
    }

    /// Serves plaintext (`--insecure`) instead of TLS with the cluster CA,
    /// the default; clients, nodes and the CLI then dial `http://`.
    pub fn insecure(mut self) -> Self {
        self.insecure = true;
        self
    }

    /// Lifetime of the coordinator's serving certificates (rotated at 2/3
    /// of it). Default: the coordinator's own (7 days).
    pub fn cert_lifetime(mut self, lifetime: Duration) -> Self {
        self.cert_lifetime = Some(lifetime);
        self
    }

    /// Lifetime of the node certificates the coordinator issues.
    pub fn node_cert_lifetime(mut self, lifetime: Duration) -> Self {
        self.node_cert_lifetime = Some(lifetime);
        self
    }

    /// The coordinator's `--handshake-timeout` (TLS handshake and HTTP/2
    /// preface). Default: the coordinator's own (10 s).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = Some(timeout);
        self
    }

    /// The coordinator's `--max-connections`. Default: the coordinator's
    /// own (derived from its descriptor limit).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// The coordinator's `--max-connections-per-ip`. Default: the
    /// coordinator's own.
    pub fn max_connections_per_ip(mut self, n: usize) -> Self {
        self.max_connections_per_ip = Some(n);
        self
    }

    /// The coordinator's `--max-streams-per-connection`. Default: the
    /// coordinator's own.
    pub fn max_streams_per_connection(mut self, n: u32) -> Self {
        self.max_streams_per_connection = Some(n);
        self
    }

    /// Process mode only: runs the coordinator with at most `n` open file
    /// descriptors (`ulimit -n`), for scenarios that use them all up. In
    /// process it would limit the whole test binary, so it is not applied.
    pub fn coordinator_descriptor_limit(mut self, n: u64) -> Self {
        self.descriptor_limit = Some(n);
        self
    }

    /// Whether the cluster runs as real processes (`.processes()` or
    /// `WEFT_TEST_MODE=processes`).
    pub fn is_processes(&self) -> bool {
        self.processes
    }

    /// Gives the coordinator a data dir in the cluster's temp dir, so it
    /// keeps committed tasks across [`TestCluster::restart_coordinator`].
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// Keeps the coordinator's store in the PostgreSQL database at `url`
    /// (`--database-url`), across [`TestCluster::restart_coordinator`].
    pub fn postgres(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }
}
