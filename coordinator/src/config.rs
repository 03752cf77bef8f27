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
    /// The data dir of the durable store (the log); `None` keeps everything in
    /// memory (tests, `weft local`). The binary's default is `weft-data`.
    pub data_dir: Option<PathBuf>,
    /// The PostgreSQL store (`--database-url`): when set, tasks, tokens and
    /// the rest of the store live in that database instead of the data
    /// dir's log; the data dir still holds the TLS files and the admin
    /// token file.
    pub database_url: Option<String>,
    /// With `database_url`: the file of the 32-byte key that seals the
    /// cluster CA's key in the database (`--ca-seal-key-file`); `None`
    /// keeps it unsealed there, with a warning at every start.
    pub ca_seal_key_file: Option<PathBuf>,
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
    /// Most bytes of events queued towards one `Watch`/`Run` stream (the
    /// driver's live feed and the queue towards the client together); a
    /// watcher past it is dropped from live delivery and resumes from the
    /// store, as a lagging one does (`--watch-buffer-bytes`, default
    /// [`DEFAULT_WATCH_BUFFER_BYTES`]).
    pub watch_buffer_bytes: usize,
    /// Most `Watch`, `Run` and `WaitMany` streams one client (its token,
    /// or its IP address without auth) has open at once; one more is
    /// RESOURCE_EXHAUSTED (`--max-streams-per-client`, default
    /// [`DEFAULT_MAX_STREAMS_PER_CLIENT`]).
    pub max_streams_per_client: usize,
    /// After a restart, how long attempts the store has on a node wait for
    /// that node to reconnect and claim them before they are requeued.
    /// `None`: twice the heartbeat timeout.
    pub restart_grace: Option<Duration>,
    /// How long the attempts of a node whose stream ended (not one
    /// declared lost for its silence, revoked or drained) wait for it to
    /// reconnect and claim them before they are requeued. `None`: the
    /// heartbeat timeout (a node stops its attempts that long after it
    /// last heard from the coordinator: its lease, by default).
    pub reconnect_grace: Option<Duration>,
    /// A task lost with this many different nodes while running ends
    /// FAILED instead of being retried on another (poison task); 0: no limit.
    pub max_node_losses: u32,
    /// How long final tasks and their events are kept before a sweep
    /// deletes them; zero keeps them forever.
    pub retention: Duration,
    /// Most bytes redb's page cache (read cache and write buffer) holds
    /// while a data dir's redb store is moved to the log at start; unused
    /// otherwise (the log has no page cache).
    pub store_cache_size: usize,
    /// Most slots one node may declare; a node declaring more is refused
    /// at `Register`. Its prefetch is capped at the same number, so its
    /// credits never exceed twice this (see `proto/README.md`).
    pub max_node_slots: u32,
    /// TLS on the listener: `Some` serves TLS with the cluster CA (what
    /// the binary does unless `--insecure`); `None` serves plaintext.
    /// `Default` is `None` so library tests can dial plainly; the test
    /// harness and `weft local` set it.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Plaintext was asked for (`--insecure`): only then may a coordinator
    /// without TLS listen on a non-loopback address.
    pub insecure: bool,
    /// Whether TaskService and AdminService calls need a client token
    /// (default true). `false` is `--no-auth`: every caller is admin.
    pub auth: bool,
    /// Where the admin token is written on first start (no token stored
    /// yet). `None`: `DATA_DIR/admin.token`, or with no data dir a fresh
    /// private temp dir (logged).
    pub admin_token_file: Option<PathBuf>,
    /// Lifetime of each node certificate issued by `Join` or renewed over
    /// a session (default 7 days; `--node-cert-lifetime`).
    pub node_cert_lifetime: Duration,
    /// The largest gRPC message, in bytes, the coordinator decodes (any
    /// request, a node's event batch) and sends a node (an `Assign` is
    /// split to fit; a spec that never could is refused at Submit with
    /// RESOURCE_EXHAUSTED). `--max-message-size`; between
    /// [`weft_proto::limits::MIN_MAX_MESSAGE_BYTES`] and
    /// [`weft_proto::limits::MAX_MESSAGE_BYTES_CEILING`], which is what
    /// nodes decode.
    pub max_message_size: usize,
    /// How long an attempt sent to a node may stay unstarted (no
    /// `Started`) before it is taken back (`--start-timeout`, default
    /// 30 s). A node that started none of its attempts in that time (it
    /// does not read its stream, or cannot run anything) is declared
    /// lost; a busy node that held a prefetched attempt that long only
    /// gives that attempt back, at no cost to the task.
    pub start_timeout: Duration,
    /// How long a call whose handler no connected node serves waits for
    /// one (its worker restarting, say) before it fails saying so
    /// (`--schedule-timeout`, default 5 min; zero: forever).
    pub schedule_timeout: Duration,
    /// A queued task gains one level of effective priority per this much
    /// waited, so low priorities are never starved (`--priority-aging`,
    /// default 60 s; zero: strict priority order).
    pub priority_aging: Duration,
    /// How long a new connection may take to finish its TLS handshake
    /// and send the HTTP/2 client preface; one that has not is closed
    /// (`--handshake-timeout`, default 10 s).
    pub handshake_timeout: Duration,
    /// Most connections open at once, those in their handshake included;
    /// one past it is closed at once (`--max-connections`). `None`: the
    /// descriptor limit (soft `RLIMIT_NOFILE`) less 128 for the rest of the
    /// process (at least half of it), at most 100,000, read at start; so
    /// connections never use up the descriptors the store needs.
    pub max_connections: Option<usize>,
    /// Most connections open at once from one IP address
    /// (`--max-connections-per-ip`): one peer cannot take them all.
    pub max_connections_per_ip: usize,
    /// Most HTTP/2 streams (calls) open at once on one connection
    /// (`--max-streams-per-connection`); a client past it waits.
    pub max_streams_per_connection: u32,
    /// Where the HTTP listener (the dashboard, `/metrics`) listens
    /// (`--http-listen`); `None`: off (the library's default; the binary's
    /// is `127.0.0.1:7080`). HTTPS whenever [`tls`](Self::tls) is set;
    /// plaintext only on loopback or with [`insecure`](Self::insecure).
    /// Port 0 picks a free port (`RunningCoordinator::http_addr`).
    pub http_listen: Option<std::net::SocketAddr>,
    /// Export traces over OTLP/gRPC (`--otlp-endpoint`); `None` (the
    /// default): no export, and nothing spent on it per task.
    pub otlp: Option<crate::trace::OtlpConfig>,
}

/// Default of [`CoordinatorConfig::schedule_timeout`].
pub const DEFAULT_SCHEDULE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Default of [`CoordinatorConfig::priority_aging`].
pub const DEFAULT_PRIORITY_AGING: Duration = Duration::from_secs(60);

/// Default of [`CoordinatorConfig::start_timeout`].
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Default of [`CoordinatorConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of [`CoordinatorConfig::max_connections_per_ip`]: far above
/// what one host's nodes and clients need (a node holds one connection,
/// a client one per channel; `weft bench`'s 1,000 simulated nodes, a TLS
/// connection each, raise it with the flag), far below the descriptor limit.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 128;

/// Default of [`CoordinatorConfig::max_streams_per_connection`]: a node
/// needs one stream plus its unary calls, a client a stream per call in
/// flight; `weft bench` keeps up to 256 `WaitMany` streams (its
/// `--wait-concurrency`) and its submits on one connection, and its
/// simulated nodes 100 sessions per connection, so nothing Weft ships
/// ever waits for a stream.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Default of [`CoordinatorConfig::node_cert_lifetime`].
pub const DEFAULT_NODE_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Default of [`CoordinatorConfig::watch_buffer_bytes`]: 256 KiB, 8 full
/// output chunks; with [`DEFAULT_MAX_STREAMS_PER_CLIENT`] streams, one
/// client that reads none of them holds about 320 MiB at most.
pub const DEFAULT_WATCH_BUFFER_BYTES: usize = 256 << 10;

/// Smallest [`CoordinatorConfig::watch_buffer_bytes`]: two full output
/// chunks.
pub const MIN_WATCH_BUFFER_BYTES: usize = 64 << 10;

/// Default of [`CoordinatorConfig::max_streams_per_client`]: room for
/// what clients do (`weft bench` waits over 256 streams, `weft map` runs
/// up to 512 tasks at once, a Python program may wait on a thousand
/// tasks at once), each within `--watch-buffer-bytes`.
pub const DEFAULT_MAX_STREAMS_PER_CLIENT: usize = 1024;

/// Default of [`CoordinatorConfig::max_node_slots`]: far above any one
/// machine's cores, far below what would pull in the whole queue.
pub const DEFAULT_MAX_NODE_SLOTS: u32 = 1024;

/// A setting that cannot work, found by [`CoordinatorConfig::check`]
/// (named by the binary's flags, which is how people set them).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A zero heartbeat interval: every session's heartbeat timer needs a
    /// period.
    #[error("--heartbeat-interval must be more than 0 (e.g. 1s)")]
    ZeroHeartbeatInterval,
    /// A heartbeat timeout under twice the interval: an idle node, heard
    /// from only by its heartbeats, would be declared lost between two of
    /// them (or after one late one).
    #[error(
        "--heartbeat-timeout {timeout:?} must be at least twice --heartbeat-interval {interval:?} \
         (at least {:?}), or idle nodes are declared lost between their heartbeats: raise the \
         timeout or shorten the interval",
        .interval.saturating_mul(2)
    )]
    HeartbeatTimeoutTooShort {
        /// The heartbeat interval.
        interval: Duration,
        /// The heartbeat timeout.
        timeout: Duration,
    },
    /// A first retry delay longer than the longest one.
    #[error(
        "--retry-backoff {base:?} is above --retry-backoff-max {max:?}: the first retry delay \
         cannot exceed the longest; lower --retry-backoff or raise --retry-backoff-max"
    )]
    RetryBackoffAboveMax {
        /// The first retry delay.
        base: Duration,
        /// The longest retry delay.
        max: Duration,
    },
}

impl CoordinatorConfig {
    /// Refuses settings that cannot work: a zero heartbeat interval, a
    /// heartbeat timeout under twice the interval (the rule: a node may
    /// miss one heartbeat, never be lost while idle), a first retry delay
    /// above the longest. The binary checks this at start (exit 2), and
    /// [`start`](crate::start) refuses such a configuration.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval.is_zero() {
            return Err(ConfigError::ZeroHeartbeatInterval);
        }
        if self.heartbeat_timeout < self.heartbeat_interval.saturating_mul(2) {
            return Err(ConfigError::HeartbeatTimeoutTooShort {
                interval: self.heartbeat_interval,
                timeout: self.heartbeat_timeout,
            });
        }
        if self.retry_backoff_base > self.retry_backoff_max {
            return Err(ConfigError::RetryBackoffAboveMax {
                base: self.retry_backoff_base,
                max: self.retry_backoff_max,
            });
        }
        Ok(())
    }

    /// The restart grace in effect (see [`restart_grace`](Self::restart_grace)).
    pub fn restart_grace(&self) -> Duration {
        self.restart_grace
            .unwrap_or_else(|| self.heartbeat_timeout.saturating_mul(2))
    }

    /// The reconnect grace in effect (see
    /// [`reconnect_grace`](Self::reconnect_grace)).
    pub fn reconnect_grace(&self) -> Duration {
        self.reconnect_grace.unwrap_or(self.heartbeat_timeout)
    }

    /// Whether nodes are authenticated by their certificates: whenever
    /// the coordinator serves TLS with authentication on (no `--insecure`,
    /// no `--no-auth`).
    pub fn node_auth(&self) -> bool {
        self.tls.is_some() && self.auth
    }

    /// Whether nodes can join (`Join`, join tokens): only a coordinator
    /// serving TLS with client auth can authenticate them.
    pub fn can_join(&self) -> bool {
        self.tls.is_some() && self.auth
    }

    /// What a submitted spec may hold (slots a node may declare, bytes
    /// that fit in an `Assign`), checked at Submit.
    pub fn spec_limits(&self) -> weft_proto::limits::SpecLimits {
        weft_proto::limits::SpecLimits {
            max_slots: self.max_node_slots,
            max_spec_bytes: weft_proto::limits::max_spec_bytes(self.max_message_size),
        }
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            data_dir: None,
            database_url: None,
            ca_seal_key_file: None,
            max_queued: 10_000_000,
            retry_backoff_base: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(10),
            max_batch: 1024,
            watch_buffer: 1024,
            watch_buffer_bytes: DEFAULT_WATCH_BUFFER_BYTES,
            max_streams_per_client: DEFAULT_MAX_STREAMS_PER_CLIENT,
            restart_grace: None,
            reconnect_grace: None,
            max_node_losses: 2,
            retention: Duration::from_secs(24 * 60 * 60),
            store_cache_size: crate::store::redb::DEFAULT_CACHE_SIZE,
            max_node_slots: DEFAULT_MAX_NODE_SLOTS,
            tls: None,
            insecure: false,
            auth: true,
            admin_token_file: None,
            node_cert_lifetime: DEFAULT_NODE_CERT_LIFETIME,
            max_message_size: weft_proto::limits::DEFAULT_MAX_MESSAGE_BYTES,
            start_timeout: DEFAULT_START_TIMEOUT,
            schedule_timeout: DEFAULT_SCHEDULE_TIMEOUT,
            priority_aging: DEFAULT_PRIORITY_AGING,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: None,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            http_listen: None,
            otlp: None,
        }
    }
}
