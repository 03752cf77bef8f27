//! The bench's own cluster: `weft-coordinator` (store under a temp dir,
//! or `--in-memory`) and N `weft-node`s as real processes on loopback,
//! started through `weft_cluster` (which finds the binaries and owns the
//! child processes), plus the CPU readings the timed steps take of them.
//!
//! Every child is started with `kill_on_drop(true)`: an error or Ctrl-C in
//! the bench drops the cluster and kills it.

use std::time::{Duration, Instant};

use anyhow::Context;

use nix::sys::signal::Signal;
use weft_client::Client;
use weft_cluster::{ChildProcess, Error as ClusterError, Spawn, procfs};
use weft_proto::tls::Trust;

/// How often the coordinator's address file is polled at start-up (the
/// startup step times it, so often).
const ADDR_POLL: Duration = Duration::from_millis(5);

/// How long a coordinator may take to write its address file.
const ADDR_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the join token for the bench's own nodes is valid.
const JOIN_TTL: Duration = Duration::from_secs(10 * 60);

/// Lines of a child's log shown when it exited.
const LOG_TAIL: usize = 10;

/// What a [`Cluster`] is made of.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    /// Nodes to start (0 for the scale and many-nodes steps).
    pub nodes: usize,
    /// Slots per node.
    pub slots: u32,
    /// `RUST_LOG` of the children.
    pub log_filter: String,
    /// Whether the coordinator gets `--data-dir` (its durable store).
    pub durable: bool,
    /// Plaintext (`--insecure`) instead of TLS with the cluster CA.
    pub insecure: bool,
    /// More `weft-node` flags (the policy figures give nodes resources).
    pub node_args: Vec<String>,
    /// More `weft-coordinator` flags (the retention step's `--retention`).
    pub coordinator_args: Vec<String>,
    /// `--database-url` of a durable coordinator (the store in
    /// PostgreSQL). Only the run's shared cluster has one: an in-memory
    /// coordinator never gets it (`--in-memory` would conflict), and the
    /// steps that start clusters of their own run without it.
    pub database_url: Option<String>,
}

impl ClusterPlan {
    /// This plan without a database: for a step that starts clusters of
    /// its own (one database cannot serve them in turn).
    pub fn without_database(&self) -> ClusterPlan {
        ClusterPlan {
            database_url: None,
            ..self.clone()
        }
    }

    /// The coordinator's flags for a cluster in `dir`.
    fn coordinator_flags(&self, dir: &std::path::Path) -> Vec<String> {
        let path = |name: &str| dir.join(name).display().to_string();
        let mut args = vec![
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--addr-file".to_owned(),
            path("coordinator.addr"),
            "--admin-token-file".to_owned(),
            path("admin.token"),
        ];
        if self.durable {
            args.extend(["--data-dir".to_owned(), path("data")]);
            if let Some(url) = &self.database_url {
                args.extend(["--database-url".to_owned(), url.clone()]);
            }
        } else {
            // Without a flag the coordinator would open its default durable
            // store; say explicitly that this run keeps nothing.
            args.push("--in-memory".to_owned());
        }
        if self.insecure {
            args.push("--insecure".to_owned());
        } else {
            args.extend(["--pki-dir".to_owned(), path("pki")]);
        }
        args.extend(self.coordinator_args.iter().cloned());
        args
    }
}

/// A coordinator (durable store under a temp dir) and its nodes, as real
/// processes on loopback.
#[derive(Debug)]
pub struct Cluster {
    /// `https://127.0.0.1:PORT` (`http://` with `insecure`).
    pub url: String,
    /// The cluster CA (`None` with `insecure`).
    pub trust: Option<Trust>,
    /// The coordinator process.
    pub coordinator: ChildProcess,
    /// The node processes.
    pub nodes: Vec<ChildProcess>,
    /// Holds logs and the store; removed on drop.
    pub dir: tempfile::TempDir,
    /// The coordinator's admin token (the bench's client uses it).
    pub token: Option<String>,
    /// How the coordinator was started, to start it again on the same
    /// data dir ([`Cluster::crash_and_restart_coordinator`]).
    respawn: Spawn,
    /// The file the coordinator writes its address to.
    addr_file: std::path::PathBuf,
}

impl Cluster {
    /// A client of this cluster (its CA and admin token), retrying for up
    /// to 30 s while the just-started coordinator comes up.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect_secure(&self.url, self.trust.as_ref(), self.token.as_deref())
                .await
            {
                Ok(client) => return Ok(client),
                Err(err) if Instant::now() < deadline && err.is_retryable() => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Fails with how to build them unless `weft-coordinator` and
    /// `weft-node` are where [`weft_cluster::bin_dir`] looks.
    pub fn check_binaries() -> anyhow::Result<()> {
        for name in ["weft-coordinator", "weft-node"] {
            bin_path(name)?;
        }
        Ok(())
    }

    /// Spawns the coordinator, polls its address file every 5 ms until it
    /// is listening, makes a join token (with TLS), then spawns the nodes
    /// at once, each joining with it. Returns without waiting for the
    /// nodes to register.
    pub async fn start(plan: &ClusterPlan) -> anyhow::Result<Cluster> {
        let coordinator_bin = bin_path("weft-coordinator")?;
        let node_bin = bin_path("weft-node")?;
        let dir = tempfile::Builder::new()
            .prefix("weft-bench-")
            .tempdir()
            .context("creating the bench temp dir")?;
        let addr_file = dir.path().join("coordinator.addr");
        let token_file = dir.path().join("admin.token");
        let pki_dir = dir.path().join("pki");
        let args = plan.coordinator_flags(dir.path());
        let respawn = Spawn::new(coordinator_bin, dir.path(), "coordinator")
            .args(args)
            .log_filter(&plan.log_filter);
        let mut coordinator = respawn.clone().spawn()?;
        let addr =
            weft_cluster::wait_for_addr_file(&mut coordinator, &addr_file, ADDR_TIMEOUT, ADDR_POLL)
                .await
                .map_err(|err| explain(err, &coordinator))?;
        let (url, trust) = if plan.insecure {
            (format!("http://{addr}"), None)
        } else {
            (
                format!("https://{addr}"),
                Some(Trust::CaFile(pki_dir.join("ca.pem"))),
            )
        };
        // Written before the coordinator listens, when its store holds no
        // token yet; without one the bench's client is refused everything.
        let Ok(token) = std::fs::read_to_string(&token_file) else {
            anyhow::bail!(
                "the coordinator wrote no admin token: its store already holds tokens{}",
                match &plan.database_url {
                    Some(_) =>
                        " (the --database-url database was used before; the bench needs an empty one)",
                    None => "",
                }
            );
        };
        let token = Some(token.trim().to_owned());
        let mut cluster = Cluster {
            url,
            trust,
            coordinator,
            nodes: Vec::new(),
            dir,
            token,
            respawn: respawn.append_log(),
            addr_file,
        };
        // With TLS, nodes join as on a real network: one join token for
        // all of them, each node its own key and certificate.
        let join = match (&cluster.trust, plan.nodes) {
            (Some(_), 1..) => {
                let client = cluster.client().await?;
                let uses = u32::try_from(plan.nodes).unwrap_or(u32::MAX);
                let (token, _) = client
                    .create_join_token("weft bench", Some(JOIN_TTL), uses, "")
                    .await
                    .context("creating a join token for the bench's nodes")?;
                Some(token)
            }
            _ => None,
        };
        let node_bin = &node_bin;
        let dir = cluster.dir.path().to_owned();
        cluster.nodes = (1..=plan.nodes)
            .map(|i| {
                let mut args = vec![
                    "--slots".to_owned(),
                    plan.slots.to_string(),
                    "--name".to_owned(),
                    format!("bench-{i}"),
                ];
                args.extend(plan.node_args.iter().cloned());
                match &join {
                    Some(token) => args.extend([
                        "--join".to_owned(),
                        token.clone(),
                        "--state-dir".to_owned(),
                        dir.join(format!("node-{i}-state")).display().to_string(),
                    ]),
                    None => args.extend(["--coordinator".to_owned(), cluster.url.clone()]),
                }
                Spawn::new(node_bin, &dir, &format!("node-{i}"))
                    .args(args)
                    .log_filter(&plan.log_filter)
                    .spawn()
                    .map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(cluster)
    }

    /// The coordinator's data dir (`None` for an in-memory store).
    pub fn data_dir(&self) -> Option<std::path::PathBuf> {
        let dir = self.dir.path().join("data");
        dir.is_dir().then_some(dir)
    }

    /// Kills the coordinator with SIGKILL (no shutdown of any kind), then
    /// starts it again with the same flags on the same data dir and waits
    /// for its new address (its port changes; `url` follows). Answers the
    /// instant just before the new process was spawned. The nodes are left
    /// alone.
    pub async fn crash_and_restart_coordinator(&mut self) -> anyhow::Result<Instant> {
        self.coordinator.signal(Signal::SIGKILL);
        self.coordinator
            .wait()
            .await
            .map_err(|err| explain(err, &self.coordinator))?;
        // The old address must not be taken for the new one.
        match std::fs::remove_file(&self.addr_file) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(err).context("removing the old address file");
            }
            _ => {}
        }
        let spawned = Instant::now();
        self.coordinator = self.respawn.clone().spawn()?;
        let addr = weft_cluster::wait_for_addr_file(
            &mut self.coordinator,
            &self.addr_file,
            ADDR_TIMEOUT,
            ADDR_POLL,
        )
        .await
        .map_err(|err| explain(err, &self.coordinator))?;
        let scheme = if self.trust.is_some() {
            "https"
        } else {
            "http"
        };
        self.url = format!("{scheme}://{addr}");
        Ok(spawned)
    }

    /// Process ids of the coordinator and nodes still running.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.coordinator)
            .chain(&self.nodes)
            .filter_map(ChildProcess::pid)
            .collect()
    }

    /// CPU seconds used so far by the coordinator and every node.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.pids().into_iter().map(procfs::cpu_seconds).sum()
    }

    /// Fails with a log tail if any process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let Cluster {
            coordinator, nodes, ..
        } = self;
        for child in std::iter::once(coordinator).chain(nodes.iter_mut()) {
            if let Err(err) = child.check_alive() {
                return Err(explain(err, child));
            }
        }
        Ok(())
    }

    /// Kills every process (nodes first) and removes the temp dir.
    pub async fn stop(self) {
        for node in self.nodes {
            kill(node).await;
        }
        kill(self.coordinator).await;
    }
}

/// The path of binary `name`, or an error saying how to build it for a
/// benchmark (release).
fn bin_path(name: &str) -> anyhow::Result<std::path::PathBuf> {
    weft_cluster::bin_path(name).map_err(|err| match err {
        ClusterError::BinaryNotFound { path } => anyhow::anyhow!(
            "{} not found: build with `cargo build --release --bins` (or set WEFT_BIN_DIR)",
            path.display()
        ),
        other => other.into(),
    })
}

/// `err`, with the tail of `child`'s log when it says the child exited;
/// the wording of the messages the bench printed before.
fn explain(err: ClusterError, child: &ChildProcess) -> anyhow::Error {
    match err {
        ClusterError::Exited { label, status, log } => anyhow::anyhow!(
            "{label} exited ({status}); log {}:\n{}",
            log.display(),
            child.log_tail(LOG_TAIL)
        ),
        ClusterError::NoAddress { .. } => {
            anyhow::anyhow!("the coordinator wrote no address within {ADDR_TIMEOUT:?}")
        }
        other => other.into(),
    }
}

/// Kills `child` (SIGKILL) and reaps it; one already gone is no error.
async fn kill(child: ChildProcess) {
    let label = child.label().to_owned();
    if let Err(err) = child.kill().await {
        tracing::debug!(label = %label, error = %err, "kill failed (already gone?)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(durable: bool) -> ClusterPlan {
        ClusterPlan {
            nodes: 2,
            slots: 1,
            log_filter: "warn".to_owned(),
            durable,
            insecure: false,
            node_args: Vec::new(),
            coordinator_args: Vec::new(),
            database_url: Some("postgresql://h/db".to_owned()),
        }
    }

    #[test]
    fn an_in_memory_coordinator_never_gets_the_database_url() {
        let args = plan(false).coordinator_flags(std::path::Path::new("/d"));
        assert!(args.contains(&"--in-memory".to_owned()), "{args:?}");
        assert!(!args.iter().any(|a| a.contains("database")), "{args:?}");
    }

    #[test]
    fn a_durable_coordinator_gets_the_database_url_unless_planned_without() {
        let with = plan(true).coordinator_flags(std::path::Path::new("/d"));
        assert!(
            with.windows(2)
                .any(|w| w == ["--database-url", "postgresql://h/db"])
        );
        assert!(!with.contains(&"--in-memory".to_owned()), "{with:?}");
        let without = plan(true)
            .without_database()
            .coordinator_flags(std::path::Path::new("/d"));
        assert!(
            !without.iter().any(|a| a.contains("database")),
            "{without:?}"
        );
    }
}
