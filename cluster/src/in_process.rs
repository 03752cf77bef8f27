//! A coordinator and nodes as libraries in this process: what `weft local`,
//! `weft demo` and the test harness's in-process mode run.
//!
//! [`start_coordinator`] and [`start_node`] are the one way to start each
//! (a node gets the built-in handlers, and this executable as its reaper
//! where it can be one, see `weft_node::reaper`); [`LocalCluster`] holds a
//! coordinator and its nodes as one handle. Waiting for nodes to register
//! is the caller's (it needs a client; this crate has none).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;

use weft_coordinator::{CoordinatorConfig, RunningCoordinator};
use weft_node::{HandlerRegistry, NodeConfig, RunningNode};

use crate::error::Error;

/// Starts a coordinator on an already bound `listener` (bind port 0 first
/// to know the address without racing anyone for it).
pub async fn start_coordinator(
    config: CoordinatorConfig,
    listener: TcpListener,
) -> Result<RunningCoordinator, Error> {
    weft_coordinator::start(config, listener)
        .await
        .map_err(Error::Coordinator)
}

/// Starts a node with the built-in handlers. Unless `config` names a
/// reaper, this executable is the reaper if its `main` can act as one
/// (the `weft` binary can; a test executable cannot, and runs none).
pub fn start_node(mut config: NodeConfig) -> RunningNode {
    if config.reaper.is_none() {
        config.reaper = weft_node::reaper::self_as_reaper();
    }
    weft_node::start(config, HandlerRegistry::with_builtins())
}

/// A coordinator and its nodes, all in this process.
pub struct LocalCluster {
    coordinator: RunningCoordinator,
    nodes: Vec<RunningNode>,
}

impl LocalCluster {
    /// Starts a coordinator with `config` on `listener`, and no node yet
    /// (see [`LocalCluster::add_node`]).
    pub async fn start(
        config: CoordinatorConfig,
        listener: TcpListener,
    ) -> Result<LocalCluster, Error> {
        let coordinator = start_coordinator(config, listener).await?;
        Ok(LocalCluster {
            coordinator,
            nodes: Vec::new(),
        })
    }

    /// The admin token the coordinator wrote on its first start (read
    /// from its file), for this process's own clients.
    pub fn admin_token(&self) -> Option<String> {
        let path = self.coordinator.admin_token_file()?;
        std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_owned())
    }

    /// Where the coordinator wrote the admin token.
    pub fn admin_token_file(&self) -> Option<&std::path::Path> {
        self.coordinator.admin_token_file()
    }

    /// `https://ADDR` of the coordinator (`http://` without TLS).
    pub fn url(&self) -> String {
        self.coordinator.url()
    }

    /// The dashboard's URL (`https://ADDR`, `http://` without TLS);
    /// `None` when the coordinator's HTTP listener is off.
    pub fn http_url(&self) -> Option<String> {
        self.coordinator.http_url()
    }

    /// How clients and nodes trust this coordinator: its `ca.pem`
    /// (`None` when it serves plaintext).
    pub fn trust(&self) -> Option<weft_proto::tls::Trust> {
        self.coordinator
            .ca_file()
            .map(weft_proto::tls::Trust::CaFile)
    }

    /// Where the coordinator's `ca.pem` is (`None` without TLS).
    pub fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.coordinator.ca_file()
    }

    /// The coordinator's bound address.
    pub fn addr(&self) -> SocketAddr {
        self.coordinator.addr()
    }

    /// A node's settings pointed at this coordinator (the caller names it
    /// and sets slots, labels, timings).
    pub fn node_config(&self) -> NodeConfig {
        let mut config = NodeConfig::new(self.url());
        config.trust = self.trust();
        config
    }

    /// Starts one more node (see [`start_node`]).
    pub fn add_node(&mut self, config: NodeConfig) {
        self.nodes.push(start_node(config));
    }

    /// How many nodes this cluster started.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Drains every node (running tasks get `grace`), then stops the
    /// coordinator; what did not stop in time is logged, not returned.
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
