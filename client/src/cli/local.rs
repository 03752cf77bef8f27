//! `weft local`: a coordinator and N nodes in this process, until Ctrl-C.
//! [`LocalCluster`] is also what `weft demo` runs its workload on.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;

use weft_coordinator::{CoordinatorConfig, RunningCoordinator};
use weft_node::{HandlerRegistry, NodeConfig, RunningNode};
use weft_proto::NodeState;

use crate::Client;
use crate::cli::exit;

/// How long nodes may take to register before `local` warns and `demo` fails.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long running tasks get to finish when the cluster stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A coordinator and its nodes, all in this process.
pub struct LocalCluster {
    coordinator: RunningCoordinator,
    nodes: Vec<RunningNode>,
}

impl LocalCluster {
    /// Starts a coordinator on `listener` and `nodes` nodes named
    /// `local-1`, `local-2`, ... with `slots` slots each (default: CPUs)
    /// and the built-in handlers.
    pub async fn start(
        listener: TcpListener,
        nodes: usize,
        slots: Option<u32>,
    ) -> anyhow::Result<LocalCluster> {
        let coordinator = weft_coordinator::start(CoordinatorConfig::default(), listener)
            .await
            .context("starting the coordinator")?;
        let url = coordinator.url();
        let nodes = (1..=nodes)
            .map(|i| {
                let mut config = NodeConfig::new(url.clone());
                config.name = format!("local-{i}");
                if let Some(slots) = slots {
                    config.slots = slots.max(1);
                }
                config.reconnect_min = Duration::from_millis(50);
                config.reaper = weft_node::reaper::self_as_reaper();
                weft_node::start(config, HandlerRegistry::with_builtins())
            })
            .collect();
        Ok(LocalCluster { coordinator, nodes })
    }

    /// `http://ADDR` of the coordinator.
    pub fn url(&self) -> String {
        self.coordinator.url()
    }

    /// Waits until every node is connected and ready (or `timeout` passes).
    pub async fn wait_ready(&self, client: &Client, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = client
                .nodes()
                .await?
                .iter()
                .filter(|n| n.state == NodeState::Ready)
                .count();
            if ready >= self.nodes.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "only {ready} of {} nodes registered within {timeout:?}",
                    self.nodes.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drains every node (running tasks get `grace`), then stops the coordinator.
    pub async fn shutdown(self, grace: Duration) {
        let drains = self.nodes.into_iter().map(|node| async move {
            let name = node.name().to_owned();
            if let Err(err) = node.drain(grace).await {
                tracing::warn!(node_name = %name, error = %err, "node did not drain cleanly");
            }
        });
        futures::future::join_all(drains).await;
        if self.coordinator.shutdown(grace).await.is_err() {
            tracing::warn!("coordinator did not shut down within the grace period");
        }
    }
}

/// Binds `listen`; if the address is taken, a free port on the same host,
/// with a note on stderr.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(listen).await {
        Ok(listener) => Ok(listener),
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && listen.port() != 0 => {
            let listener = TcpListener::bind(SocketAddr::new(listen.ip(), 0))
                .await
                .with_context(|| format!("binding a free port on {}", listen.ip()))?;
            eprintln!(
                "weft: note: {listen} is in use; listening on {} instead",
                listener.local_addr()?
            );
            Ok(listener)
        }
        Err(err) => Err(err).with_context(|| format!("binding {listen}")),
    }
}

/// `weft local [--nodes N] [--slots S] [--listen ADDR]`.
pub async fn run(listen: SocketAddr, nodes: usize, slots: Option<u32>) -> anyhow::Result<u8> {
    let listener = bind(listen).await?;
    let cluster = LocalCluster::start(listener, nodes, slots).await?;
    let url = cluster.url();
    let client = Client::connect(&url).await?;
    if let Err(err) = cluster.wait_ready(&client, READY_TIMEOUT).await {
        eprintln!("weft: warning: {err:#}");
    }
    let slots_text = match slots {
        Some(s) => format!("{s} slots"),
        None => "one slot per CPU".to_owned(),
    };
    println!(
        "weft local: coordinator at {url}, {nodes} nodes with {slots_text} each (Ctrl-C to stop)"
    );
    println!("export WEFT_COORDINATOR={url}");
    shutdown_signal().await;
    eprintln!("weft local: shutting down (Ctrl-C again to exit at once)");
    tokio::select! {
        () = cluster.shutdown(SHUTDOWN_GRACE) => {}
        () = shutdown_signal() => eprintln!("weft local: exiting at once"),
    }
    Ok(exit::SUCCESS)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
