//! `HaCluster`: several coordinators on one PostgreSQL, on separate lab
//! hosts. PostgreSQL runs on `fab-h6`; `weft-coordinator`s run on
//! `fab-h1`, `fab-h7` and `fab-h8`, all on the same database, one active
//! and the others standbys; one `weft-node` runs on each of
//! `fab-h2`..`fab-h4`, given one name, [`NAME`], which resolves to all
//! three coordinators there (each node host's `/etc/hosts`, through
//! `ip netns exec`'s `/etc/netns/<host>/hosts`). The scenario's client (in
//! `fab-h5`) dials the coordinators in order.
//!
//! Every coordinator has a PKI dir of its own: the cluster CA comes from
//! the database, so a node's certificate and the client's trust hold on
//! whichever coordinator is active.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use weft_client::{Client, ClusterInfo, Trust};
use weft_coordinator::store::pg::testdb;
use weft_proto::TaskState;
use weft_tests::process::ChildProcess;
use weft_tests::wait::wait_for;

use crate::hosts::{PATIENCE, kill, leave, node_name, spawn_in};
use crate::lab::{NODE_HOSTS, address, namespace};

/// The hosts running a coordinator each, in the order clients and nodes
/// dial them.
pub const COORDINATOR_HOSTS: [u8; 3] = [1, 7, 8];
/// The host running PostgreSQL.
pub const DATABASE_HOST: u8 = 6;
/// PostgreSQL's port on [`DATABASE_HOST`].
const DATABASE_PORT: u16 = 5432;
/// Each coordinator's port on its host.
const PORT: u16 = 7070;
/// How often the coordinators and the nodes send heartbeats.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// Silence after which a coordinator declares a node lost; also the
/// nodes' lease, which a takeover must beat for running attempts to carry
/// on (2 s: a takeover after a kill takes about 1 s on a busy 2-core
/// machine).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call to one coordinator may take before the next is tried.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The one name the nodes are given: it resolves to every coordinator.
pub const NAME: &str = "weft-coordinators";

/// The coordinator's URL on `host`.
pub fn url(host: u8) -> String {
    format!("https://{}:{PORT}", address(host))
}

/// The URL the nodes dial: [`NAME`].
fn named_url() -> String {
    format!("https://{NAME}:{PORT}")
}

/// Makes [`NAME`] resolve to every coordinator inside `host`: its
/// `/etc/netns/<namespace>/hosts`, which `ip netns exec` mounts over
/// `/etc/hosts` for what it starts there.
fn name_the_coordinators(host: u8) -> std::path::PathBuf {
    let dir = Path::new("/etc/netns").join(namespace(host));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
    let mut hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    for coordinator in COORDINATOR_HOSTS {
        hosts.push_str(&format!("\n{} {NAME}", address(coordinator)));
    }
    hosts.push('\n');
    let file = dir.join("hosts");
    std::fs::write(&file, hosts).unwrap_or_else(|e| panic!("writing {file:?}: {e}"));
    dir
}

/// PostgreSQL, three coordinators and three nodes. See the module docs.
pub struct HaCluster {
    dir: Option<TempDir>,
    _database: testdb::Server,
    coordinators: BTreeMap<u8, ChildProcess>,
    nodes: BTreeMap<u8, ChildProcess>,
    dialer: Dialer,
    /// The `/etc/netns/<host>` dirs made for [`NAME`], removed on drop.
    named: Vec<std::path::PathBuf>,
}

/// Dials the coordinators in order, as a client given all their
/// addresses does; cheap to clone into a task of its own.
#[derive(Clone)]
pub struct Dialer {
    trust: Trust,
    token: String,
}

impl Dialer {
    /// A client of the coordinator on `host`, if it answers.
    async fn dial(&self, host: u8) -> Option<Client> {
        let call = async {
            let client = Client::connect_secure(&url(host), Some(&self.trust), Some(&self.token))
                .await
                .ok()?;
            client.cluster_info().await.ok().map(|_| client)
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .ok()
            .flatten()
    }

    /// A client of whichever coordinator answers, waiting for one.
    pub async fn client(&self) -> Client {
        wait_for(PATIENCE, || async {
            for host in COORDINATOR_HOSTS {
                if let Some(client) = self.dial(host).await {
                    return Some(client);
                }
            }
            None
        })
        .await
        .unwrap_or_else(|e| panic!("no coordinator answered: {e}"))
    }
}

impl HaCluster {
    /// Starts PostgreSQL, the coordinator on `fab-h1` (which becomes
    /// active), then the standbys and the nodes; waits until every node is
    /// registered.
    pub async fn start(slots: u32) -> HaCluster {
        let dir = tempfile::Builder::new()
            .prefix("weft-faults-ha-")
            .tempdir()
            .expect("creating the cluster temp dir");
        std::fs::create_dir(dir.path().join("runs")).expect("creating the runs dir");
        let ip: Ipv4Addr = address(DATABASE_HOST).parse().expect("a lab address");
        let database = tokio::task::spawn_blocking(move || {
            testdb::Server::in_namespace(&namespace(DATABASE_HOST), ip, DATABASE_PORT)
        })
        .await
        .expect("starting PostgreSQL");
        let first = COORDINATOR_HOSTS[0];
        let mut cluster = HaCluster {
            dialer: Dialer {
                trust: Trust::CaFile(pki_dir(dir.path(), first).join("ca.pem")),
                token: String::new(),
            },
            dir: Some(dir),
            _database: database,
            coordinators: BTreeMap::new(),
            nodes: BTreeMap::new(),
            named: Vec::new(),
        };
        cluster.start_coordinator(first);
        let token_file = cluster.dir().join("admin.token");
        cluster.dialer.token = wait_for(PATIENCE, || async {
            let token = std::fs::read_to_string(&token_file).ok()?;
            Some(token.trim().to_owned())
        })
        .await
        .unwrap_or_else(|e| panic!("the first coordinator made no admin token: {e}"));
        let client = cluster.client().await;
        for host in &COORDINATOR_HOSTS[1..] {
            cluster.start_coordinator(*host);
        }
        let uses = u32::try_from(NODE_HOSTS.len()).unwrap_or(u32::MAX);
        let (join_token, _) = client
            .create_join_token("failover suite", Some(PATIENCE), uses, &url(first))
            .await
            .unwrap_or_else(|e| panic!("creating a join token: {e}"));
        for host in NODE_HOSTS {
            cluster.named.push(name_the_coordinators(host));
            let args = vec![
                "--join".to_owned(),
                join_token.clone(),
                "--coordinator".to_owned(),
                named_url(),
                "--state-dir".to_owned(),
                cluster
                    .dir()
                    .join(format!("{}-state", node_name(host)))
                    .display()
                    .to_string(),
                "--name".to_owned(),
                node_name(host),
                "--slots".to_owned(),
                slots.to_string(),
            ];
            let node = spawn_in(host, "weft-node", &args, cluster.dir(), &node_name(host));
            cluster.nodes.insert(host, node);
        }
        cluster.wait_for_nodes(NODE_HOSTS.len()).await;
        cluster
    }

    /// The temp dir: logs, PKI dirs, the run markers.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(TempDir::path)
            .expect("the temp dir lives as long as the cluster")
    }

    /// Where marker tasks record their runs.
    pub fn runs(&self) -> std::path::PathBuf {
        self.dir().join("runs")
    }

    /// Starts (or starts again) the coordinator on `host`: active if no
    /// other holds the database, else a standby.
    pub fn start_coordinator(&mut self, host: u8) {
        let database = format!(
            "postgresql://postgres@{}:{DATABASE_PORT}/postgres",
            address(DATABASE_HOST)
        );
        let args = vec![
            "--listen".to_owned(),
            format!("{}:{PORT}", address(host)),
            "--advertise".to_owned(),
            NAME.to_owned(),
            "--database-url".to_owned(),
            database,
            "--heartbeat-interval".to_owned(),
            format!("{}ms", HEARTBEAT_INTERVAL.as_millis()),
            "--heartbeat-timeout".to_owned(),
            format!("{}ms", HEARTBEAT_TIMEOUT.as_millis()),
            "--shutdown-grace".to_owned(),
            "1s".to_owned(),
            "--http-listen".to_owned(),
            "off".to_owned(),
            "--admin-token-file".to_owned(),
            self.dir().join("admin.token").display().to_string(),
            "--pki-dir".to_owned(),
            pki_dir(self.dir(), host).display().to_string(),
            "--data-dir".to_owned(),
            self.dir()
                .join(format!("data-h{host}"))
                .display()
                .to_string(),
        ];
        let label = format!("coordinator-h{host}");
        let child = spawn_in(host, "weft-coordinator", &args, self.dir(), &label);
        self.coordinators.insert(host, child);
    }

    /// The host whose coordinator answers now, if one does.
    pub async fn active(&self) -> Option<u8> {
        for host in COORDINATOR_HOSTS {
            if self.dialer.dial(host).await.is_some() {
                return Some(host);
            }
        }
        None
    }

    /// Dials the coordinators in order.
    pub fn dialer(&self) -> Dialer {
        self.dialer.clone()
    }

    /// A client of whichever coordinator answers, waiting for one.
    pub async fn client(&self) -> Client {
        self.dialer.client().await
    }

    /// Cluster figures from whichever coordinator answers.
    pub async fn info(&self) -> ClusterInfo {
        wait_for(PATIENCE, || async {
            let client = self.client().await;
            client.cluster_info().await.ok()
        })
        .await
        .unwrap_or_else(|e| panic!("cluster info unavailable: {e}"))
    }

    /// Waits until `n` nodes are registered with the active coordinator.
    pub async fn wait_for_nodes(&self, n: usize) {
        wait_for(PATIENCE, || async {
            let nodes = self.client().await.nodes().await.ok()?;
            (nodes.len() == n).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{n} nodes never connected: {e}"));
    }

    /// SIGKILLs the coordinator on `host`; answers the instant just before
    /// the signal.
    pub async fn kill_coordinator(&mut self, host: u8) -> Instant {
        let child = self
            .coordinators
            .remove(&host)
            .unwrap_or_else(|| panic!("no coordinator runs on h{host}"));
        let at = Instant::now();
        kill(child).await;
        at
    }

    /// Waits until the coordinator on `host` has exited on its own, and
    /// answers its log.
    pub async fn wait_for_exit(&mut self, host: u8, within: Duration) -> String {
        let child = self
            .coordinators
            .get_mut(&host)
            .unwrap_or_else(|| panic!("no coordinator runs on h{host}"));
        let exited = tokio::time::timeout(within, child.wait()).await;
        let log = child.log_text();
        match exited {
            Ok(Ok(status)) => {
                assert!(!status.success(), "h{host} exited with {status}\n{log}");
                self.coordinators.remove(&host);
                log
            }
            Ok(Err(e)) => panic!("waiting for the coordinator on h{host}: {e}"),
            Err(_) => panic!("the coordinator on h{host} still runs after {within:?}\n{log}"),
        }
    }

    /// From `killed` until a coordinator other than `old` answers with
    /// every node registered and has recorded a task's success since it
    /// first answered: the nodes are back at work. Answers the new active
    /// host and the time.
    pub async fn back_to_work(&self, old: u8, killed: Instant) -> (u8, Duration) {
        let (host, client) = wait_for(PATIENCE, || async {
            for host in COORDINATOR_HOSTS.into_iter().filter(|h| *h != old) {
                if let Some(client) = self.dialer.dial(host).await {
                    return Some((host, client));
                }
            }
            None
        })
        .await
        .unwrap_or_else(|e| panic!("no standby took over from h{old}: {e}"));
        let first = client
            .cluster_info()
            .await
            .map(|info| info.count(TaskState::Succeeded))
            .unwrap_or(0);
        wait_for(PATIENCE, || async {
            let info = client.cluster_info().await.ok()?;
            let working =
                info.nodes as usize == NODE_HOSTS.len() && info.count(TaskState::Succeeded) > first;
            working.then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("the nodes never worked for h{host}: {e}"));
        (host, killed.elapsed())
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        for dir in &self.named {
            let _ = std::fs::remove_dir_all(dir);
        }
        let mut procs: Vec<&ChildProcess> = self.nodes.values().collect();
        procs.extend(self.coordinators.values());
        leave(procs, &mut self.dir);
    }
}

/// The PKI dir of the coordinator on `host`.
fn pki_dir(dir: &Path, host: u8) -> std::path::PathBuf {
    dir.join(format!("pki-h{host}"))
}

/// Cuts `host` off from PostgreSQL's host both ways, leaving every other
/// path alone: blackhole routes inside the two lab namespaces.
pub fn cut_from_database(host: u8) {
    route(host, DATABASE_HOST, "add");
    route(DATABASE_HOST, host, "add");
}

/// Undoes [`cut_from_database`].
pub fn reconnect_to_database(host: u8) {
    route(host, DATABASE_HOST, "del");
    route(DATABASE_HOST, host, "del");
}

/// `ip route ACTION blackhole <to>/32` inside `from`'s namespace.
fn route(from: u8, to: u8, action: &str) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &namespace(from), "ip", "route", action])
        .args(["blackhole", &format!("{}/32", address(to))])
        .output()
        .unwrap_or_else(|e| panic!("running ip route in h{from}: {e}"));
    assert!(
        out.status.success(),
        "ip route {action} blackhole {} in h{from}: {}",
        address(to),
        String::from_utf8_lossy(&out.stderr)
    );
}
