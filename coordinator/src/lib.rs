//! STUB: public API of weft-coordinator, to be filled in.
#![allow(missing_docs, dead_code, unused_variables)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Coordinator settings. `Default` is usable by tests.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// How often each side of a node stream sends a heartbeat (default 1 s).
    pub heartbeat_interval: Duration,
    /// Silence after which a node is lost (default 5 s).
    pub heartbeat_timeout: Duration,
    /// Where the durable store lives; `None` keeps everything in memory.
    pub data_dir: Option<PathBuf>,
    /// Most tasks queued (not final) at once; Submit past it is RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// First retry delay; doubles per attempt up to `retry_backoff_max`.
    pub retry_backoff_base: Duration,
    /// Longest retry delay.
    pub retry_backoff_max: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            data_dir: None,
            max_queued: 10_000_000,
            retry_backoff_base: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("stub")]
    Stub,
}

#[derive(Debug, thiserror::Error)]
#[error("shutdown timed out")]
pub struct ShutdownTimedOut;

pub struct RunningCoordinator {
    addr: SocketAddr,
}

impl RunningCoordinator {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `http://ADDR`, what nodes and clients dial.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub async fn shutdown(self, grace: Duration) -> Result<(), ShutdownTimedOut> {
        todo!()
    }
}

pub async fn start(
    config: CoordinatorConfig,
    listener: tokio::net::TcpListener,
) -> Result<RunningCoordinator, Error> {
    todo!()
}
