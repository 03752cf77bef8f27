//! Coordinator settings: a plain struct with `Duration` fields. The binary
//! builds it from flags; tests use `Default` and tweak fields.

use std::path::PathBuf;
use std::time::Duration;

/// Coordinator settings. `Default` is usable by tests.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// How often each side of a node stream sends a heartbeat (default 1 s).
    pub heartbeat_interval: Duration,
    /// Silence after which a node is lost (default 5 s).
    pub heartbeat_timeout: Duration,
    /// Where the durable store will live. Reserved: the store is in memory
    /// for now whatever this says.
    pub data_dir: Option<PathBuf>,
    /// Most tasks not yet final at once; a Submit past it is RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// First retry delay after a failed attempt; doubles per attempt.
    pub retry_backoff_base: Duration,
    /// Longest retry delay.
    pub retry_backoff_max: Duration,
    /// Most commands the driver applies before one group commit. Bigger
    /// batches amortize the commit; smaller ones answer sooner.
    pub max_batch: usize,
    /// Events buffered per live watcher; a watcher further behind is
    /// dropped from live delivery and resumes from the store.
    pub watch_buffer: usize,
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
            max_batch: 1024,
            watch_buffer: 1024,
        }
    }
}
