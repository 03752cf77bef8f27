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
    /// The data dir of the durable store (redb); `None` keeps everything in
    /// memory (tests, `weft local`). The binary's default is `weft-data`.
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
    /// A task lost with this many different nodes while running ends
    /// FAILED instead of being retried on another (poison task); 0: no limit.
    pub max_node_losses: u32,
    /// How long final tasks and their events are kept before a sweep
    /// deletes them; zero keeps them forever.
    pub retention: Duration,
    /// Most bytes the durable store's page cache holds (redb's read cache
    /// and write buffer). Part of the coordinator's memory, whatever the
    /// queue's length.
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
}

/// Default of [`CoordinatorConfig::node_cert_lifetime`].
pub const DEFAULT_NODE_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Default of [`CoordinatorConfig::watch_buffer_bytes`]: 1 MiB, 32 full
/// output chunks.
pub const DEFAULT_WATCH_BUFFER_BYTES: usize = 1 << 20;

/// Smallest [`CoordinatorConfig::watch_buffer_bytes`]: two full output
/// chunks.
pub const MIN_WATCH_BUFFER_BYTES: usize = 64 << 10;

/// Default of [`CoordinatorConfig::max_streams_per_client`].
pub const DEFAULT_MAX_STREAMS_PER_CLIENT: usize = 256;

/// Default of [`CoordinatorConfig::max_node_slots`]: far above any one
/// machine's cores, far below what would pull in the whole queue.
pub const DEFAULT_MAX_NODE_SLOTS: u32 = 1024;

impl CoordinatorConfig {
    /// The restart grace in effect (see [`restart_grace`](Self::restart_grace)).
    pub fn restart_grace(&self) -> Duration {
        self.restart_grace
            .unwrap_or_else(|| self.heartbeat_timeout.saturating_mul(2))
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
            max_queued: 10_000_000,
            retry_backoff_base: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(10),
            max_batch: 1024,
            watch_buffer: 1024,
            watch_buffer_bytes: DEFAULT_WATCH_BUFFER_BYTES,
            max_streams_per_client: DEFAULT_MAX_STREAMS_PER_CLIENT,
            restart_grace: None,
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
        }
    }
}
