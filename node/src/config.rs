//! `NodeConfig`: the node's settings as a plain struct with usable defaults.
//!
//! Libraries never see clap types; `main.rs` turns its flags into this.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use weft_proto::ExecPolicy;

/// Node settings. `NodeConfig::new(url)` gives usable defaults.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Coordinator URLs, e.g. `https://127.0.0.1:7070` (`http://` for an
    /// `--insecure` coordinator), tried in this order: when a session
    /// ends the node dials the next one at once, and backs off only after
    /// a whole round failed (several coordinators on one database, one of
    /// them serving). One trust for all of them. Empty: the ones the node
    /// joined through (kept in `state_dir`), else the join token's, else
    /// [`DEFAULT_COORDINATOR`]; given, they replace those.
    pub coordinators: Vec<String>,
    /// Node name (default: the host name).
    pub name: String,
    /// Slots offered (default: number of CPUs). At least 1.
    pub slots: u32,
    /// The most extra tasks (in slots) the node holds queued beyond its
    /// slots, so the next task is already here when a slot frees: it grants
    /// up to `slots + prefetch` credits but never runs more than `slots` at
    /// once. Within this limit the node holds only what covers the
    /// coordinator's refill time at the average run time seen (none before
    /// the first attempt ends; about one per slot for tasks of 10 ms and
    /// more), so long tasks stay spread over the nodes. 0 disables; higher
    /// raises the throughput of short tasks at the cost of balance for long
    /// ones (a queued task waits for this node even if another frees up
    /// first). Default: [`default_prefetch`].
    pub prefetch: u32,
    /// Labels tasks can require.
    pub labels: BTreeMap<String, String>,
    /// Numeric resources beyond slots (`--resource cpu=8`), which tasks
    /// ask amounts of (`TaskSpec.resources`).
    pub resources: BTreeMap<String, u64>,
    /// On drain (SIGTERM, `RunningNode::drain` without its own grace, or a
    /// coordinator `Drain` without a grace): how long running attempts may
    /// take before they are cancelled.
    pub drain_grace: Duration,
    /// Reconnect backoff: first delay, doubling up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Threads for blocking handlers (default: number of CPUs). At least 1;
    /// `weft-node` takes 1 to [`MAX_BLOCKING_THREADS`] and sizes its
    /// runtime's blocking pool to match ([`runtime_blocking_threads`]).
    pub blocking_threads: usize,
    /// How long running attempts may go on while nothing is heard from the
    /// coordinator. Past it the coordinator has declared this node lost and
    /// given its attempts to other nodes, so the node stops them itself
    /// rather than run a task twice. `None`: the `heartbeat_timeout` the
    /// coordinator sent in `Registered` (the silence after which it gives
    /// up on this node). A lease under twice the coordinator's heartbeat
    /// interval (zero included) stops the node at registration with
    /// [`Error::LeaseTooShort`](crate::Error::LeaseTooShort): it would run
    /// out between heartbeats.
    pub lease: Option<Duration>,
    /// How long a sent `Finished` event is kept to be sent again after a
    /// reconnect, in case the coordinator crashed before recording it
    /// (default 60 s; zero keeps none).
    pub redeliver_window: Duration,
    /// The program started beside the node as its reaper (`weft-node`
    /// itself, which runs as one when its first argument is
    /// [`REAPER_ARG`](crate::reaper::REAPER_ARG)): it kills the node's exec
    /// tasks if the node is killed outright (see [`reaper`](crate::reaper)).
    /// `None` (the default for an embedded node, whose executable is not
    /// `weft-node`): no reaper, and such a kill leaves exec tasks running.
    pub reaper: Option<PathBuf>,
    /// Which exec tasks this node runs (declared in `Register`; an exec
    /// task it refuses is reported `START_FAILED`, never run). Default:
    /// [`ExecPolicy::Allow`].
    pub exec: ExecPolicy,
    /// How the coordinator's TLS certificate is trusted (the cluster's
    /// `ca.pem` or its pin). Needed for an `https://` coordinator (the
    /// default scheme); ignored for `http://`.
    /// `None`: the cluster CA in `state_dir` when the node has an
    /// identity there, the join token's pin when it joins without a state
    /// dir, else nothing.
    pub trust: Option<weft_proto::tls::Trust>,
    /// Where the node keeps its identity: its private key, its
    /// certificate, the cluster CA and `node.conf` (see
    /// [`identity`](crate::identity)). A node with an identity there uses
    /// it (and needs no join token); one without joins with `join_token`
    /// and saves it there. `None` (the default for an embedded node): an
    /// identity got by joining lives in memory only, so the next start
    /// must join again.
    pub state_dir: Option<PathBuf>,
    /// A join token (`weft token create --role node`): with no identity
    /// in `state_dir`, the node joins with it before its first session.
    /// Ignored (and logged) when `state_dir` holds an identity. Its
    /// `Debug` hides the secret.
    pub join_token: Option<weft_proto::JoinToken>,
}

impl NodeConfig {
    /// Defaults: the host name, one slot and one blocking thread per CPU,
    /// no labels, 30 s drain grace, reconnect backoff from 100 ms to 10 s,
    /// the coordinator's heartbeat timeout as the lease, finished events
    /// kept 60 s for redelivery. `coordinator` is one URL (empty: none
    /// configured); see [`NodeConfig::coordinators`] for several.
    pub fn new(coordinator: impl Into<String>) -> Self {
        let cpus = cpu_count();
        let slots = u32::try_from(cpus).unwrap_or(u32::MAX);
        let coordinator: String = coordinator.into();
        NodeConfig {
            coordinators: match coordinator.trim() {
                "" => Vec::new(),
                _ => vec![coordinator],
            },
            name: hostname(),
            slots,
            prefetch: default_prefetch(slots),
            labels: BTreeMap::new(),
            resources: BTreeMap::new(),
            drain_grace: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            blocking_threads: cpus,
            lease: None,
            redeliver_window: Duration::from_secs(60),
            reaper: None,
            exec: ExecPolicy::Allow,
            trust: None,
            state_dir: None,
            join_token: None,
        }
    }
}

/// The coordinator a node dials when neither its config, its state dir
/// nor a join token names one.
pub const DEFAULT_COORDINATOR: &str = "https://127.0.0.1:7070";

impl NodeConfig {
    /// The coordinators as one line, comma-separated (for logs and
    /// `node.conf`).
    pub fn coordinators_text(&self) -> String {
        self.coordinators.join(",")
    }
}

/// The state dir `weft-node` uses when `--state-dir` is not given.
pub const DEFAULT_STATE_DIR: &str = "weft-node-state";

/// Default prefetch per slot (see [`NodeConfig::prefetch`]).
pub const DEFAULT_PREFETCH_PER_SLOT: u32 = 256;

/// The least default prefetch of a node, whatever its slots: for tasks
/// of a few microseconds, what a node must hold to cover the refill is
/// bound by what it can run per second, not by its slots. On a loaded
/// machine the refill (the node's `Finished`, a commit, the next
/// `Assign`) takes more than 10 ms, and a one-slot node holding 256
/// noops ran dry between refills (BENCHMARKS.md, "A node's prefetch").
/// It is also the coordinator's default cap (`--max-node-slots`), so a
/// node of four slots or more held this much already.
pub const DEFAULT_PREFETCH_MIN: u32 = 1024;

/// The default prefetch of a node with `slots` slots:
/// [`DEFAULT_PREFETCH_PER_SLOT`] per slot, at least [`DEFAULT_PREFETCH_MIN`].
/// Only tasks short enough to need it fill it (see [`NodeConfig::prefetch`]).
pub fn default_prefetch(slots: u32) -> u32 {
    slots
        .max(1)
        .saturating_mul(DEFAULT_PREFETCH_PER_SLOT)
        .max(DEFAULT_PREFETCH_MIN)
}

/// The most `--blocking-threads` `weft-node` takes: far above what
/// CPU-bound handlers use, far below what the machine could run.
pub const MAX_BLOCKING_THREADS: u16 = 1024;

/// Blocking threads a node's runtime keeps for everything but blocking
/// handlers (files, parents' outputs, the `sleep` built-in): tokio's
/// default pool.
pub const OTHER_BLOCKING_THREADS: usize = 512;

/// The blocking pool a runtime needs to run `blocking_threads` blocking
/// handler calls at once beside its other blocking work (tokio's default
/// of 512 would cap the handlers, and they would starve the rest).
pub fn runtime_blocking_threads(blocking_threads: usize) -> usize {
    OTHER_BLOCKING_THREADS.saturating_add(blocking_threads)
}

/// Number of CPUs this process may use (at least 1).
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// This machine's host name, or `weft-node` when it cannot be read.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "weft-node".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_offer_a_slot_per_cpu_under_the_host_name() {
        let config = NodeConfig::new("http://127.0.0.1:7070");
        assert!(config.slots >= 1 && config.blocking_threads >= 1);
        assert!(!config.name.is_empty());
        assert!(config.reconnect_min <= config.reconnect_max);
        assert_eq!(config.prefetch, default_prefetch(config.slots));
    }

    #[test]
    fn the_default_prefetch_is_256_per_slot_and_never_under_1024() {
        assert_eq!(default_prefetch(0), 1024);
        assert_eq!(default_prefetch(1), 1024);
        assert_eq!(default_prefetch(4), 1024);
        assert_eq!(default_prefetch(5), 1280);
        assert_eq!(default_prefetch(64), 16_384);
        assert_eq!(default_prefetch(u32::MAX), u32::MAX);
    }
}
