//! STUB: public API of weft-node, to be filled in.
#![allow(missing_docs, dead_code, unused_variables)]

use std::collections::BTreeMap;
use std::time::Duration;

use weft_proto::NodeId;

/// Node settings. `NodeConfig::new(url)` gives usable defaults.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Coordinator URL, e.g. `http://127.0.0.1:7070`.
    pub coordinator: String,
    /// Node name (default: the host name).
    pub name: String,
    /// Slots offered (default: number of CPUs).
    pub slots: u32,
    /// Labels tasks can require.
    pub labels: BTreeMap<String, String>,
    /// On drain: how long running attempts may take before they are cancelled.
    pub drain_grace: Duration,
    /// Reconnect backoff: first delay, doubling up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Threads for blocking handlers (default: number of CPUs).
    pub blocking_threads: usize,
}

impl NodeConfig {
    pub fn new(coordinator: impl Into<String>) -> Self {
        todo!()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("stub")]
    Stub,
}

/// Handlers by name.
#[derive(Clone, Default)]
pub struct HandlerRegistry {}

impl HandlerRegistry {
    /// The built-ins: noop, echo, sleep, sha256, fail, spin.
    pub fn with_builtins() -> Self {
        todo!()
    }
}

pub struct RunningNode {}

impl RunningNode {
    pub fn name(&self) -> &str {
        todo!()
    }
    /// The id the coordinator gave this node, once registered.
    pub fn node_id(&self) -> Option<NodeId> {
        todo!()
    }
    /// Waits until the node is registered (or `timeout` passes).
    pub async fn registered(&self, timeout: Duration) -> Option<NodeId> {
        todo!()
    }
    /// Drains like SIGTERM: stop taking work, finish within `grace`, report, close.
    pub async fn drain(self, grace: Duration) -> Result<(), Error> {
        todo!()
    }
    /// Dies abruptly, as a crash would: child process groups are SIGKILLed,
    /// the stream is dropped, nothing more is reported.
    pub async fn kill(self) {
        todo!()
    }
    /// Waits until the node stops by itself (drained by the coordinator).
    pub async fn wait(&mut self) {
        todo!()
    }
}

/// Starts a node: returns at once; the session dials and reconnects in the background.
pub fn start(config: NodeConfig, handlers: HandlerRegistry) -> RunningNode {
    todo!()
}
