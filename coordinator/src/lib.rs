//! The Weft coordinator: node registry, scheduler, task store and client API.
//!
//! Nodes hold one `Connect` stream each; clients submit, watch and cancel
//! tasks. Everything that decides lives in the sans-I/O [`scheduler`]; one
//! driver task owns it, applies inbox batches, group-commits them to the
//! [`store`] and only then answers and sends.
//!
//! Layout:
//! - [`config`] — `CoordinatorConfig`.
//! - [`error`] — `Error` and its one mapping to `tonic::Status`.
//! - [`scheduler`] — the sans-I/O core (its own Layout list says which
//!   file holds what): `dispatch` (matching ready tasks to nodes),
//!   [`queue`](scheduler::queue) (ready queues, the retry timer heap),
//!   `retry` (the one retry rule and the backoff), `task` (a live task's
//!   compact state) and `live` (the table of them, an `id_table`),
//!   `transitions` (state changes that write records and events),
//!   `attempts` (attempt events
//!   with fencing, how an attempt ends), `membership` (nodes registering,
//!   granting, draining, lost), [`registry`](scheduler::registry)
//!   (connected nodes), [`recent`](scheduler::recent) (recent results, to
//!   spot redeliveries).
//! - `id_table` — entries by task id in a chunked slab behind a hash index
//!   of slot numbers: the scheduler's live tasks, the log store's index.
//! - `driver` — the task that owns the scheduler: `inbox` (commands and
//!   handle), `commit` (the pipelined group commit), `sessions` (fan-out to
//!   nodes), `watch` (watchers and `WaitMany`: publishing and the resume
//!   loops), `retention` (the sweep).
//! - [`store`] — task records and event logs (its own Layout list says
//!   which file holds what): `record` (the records), `engine` (the `Store`
//!   trait, `StoreError`, the blocking helper), `codec` (records as
//!   protobuf bytes), [`log`](store::log) (the durable store),
//!   [`migrate`](store::migrate) (opening a data dir, moving a redb one to
//!   the log), [`redb`](store::redb) (the older store),
//!   [`memory`](store::memory) (the in-memory one).
//! - `service` — tonic adapters for `NodeService` (`service/node/codec.rs`:
//!   the node stream's wire form, both directions; `join.rs`, `identity.rs`,
//!   `renew.rs`: joining, certified sessions, renewal), `TaskService`,
//!   `AdminService` (`node_admin.rs`: join tokens, `RevokeNode`).
//! - `listener` — the one accept loop (TLS or plaintext): connection caps
//!   per IP and in all, the handshake and HTTP/2 preface deadline, backoff
//!   on accept errors (`caps`, `preface`, `backoff`).
//! - `server` — the tonic server, health, serve-with-shutdown.
//! - [`metrics`] — the Prometheus registry and every coordinator metric
//!   (`Metrics::encode`: the OpenMetrics text `/metrics` serves).
//! - `http` — the HTTP listener (`--http-listen`): the dashboard's pages
//!   and JSON API over the same services, login sessions, the overview's
//!   samples.
//! - [`identity`] — joined nodes: the index `Join`, `Connect` and
//!   `RevokeNode` check, and the rules (names, what a certified node may
//!   claim).
//! - [`tls`] — the cluster CA and serving certificates ([`tls::pki`]),
//!   node certificates ([`tls::node_cert`]), the CA kept in PostgreSQL
//!   and its sealing ([`tls::shared_ca`]), interface addresses, rotation,
//!   the TLS acceptor.
//! - [`trace`] — OpenTelemetry trace export (`--otlp-endpoint`): the
//!   spans of each task, built from what the driver committed.
//!
//! On PostgreSQL several coordinators share one database, one active and
//! the others standbys: [`take_database`] waits for the database before
//! anything is bound, [`start_with`] serves on it, and the lease watchdog
//! ([`store::pg::lease`]) stops the active before a standby may take
//! over.

pub mod auth;
pub mod config;
mod driver;
pub mod error;
mod http;
mod id_table;
pub mod identity;
mod listener;
pub mod metrics;
pub mod scheduler;
mod server;
mod service;
pub mod store;
pub mod tls;
pub mod trace;

/// A hash map keyed by task ids (or their bits) on the hot path: hashed
/// with foldhash, seeded per process, instead of SipHash, which cost
/// about a microsecond per task over the several maps a task passes
/// through. The ids are the coordinator's own ULIDs; a peer only names
/// ones that exist.
pub(crate) type IdMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A set of task ids on the hot path, hashed like [`IdMap`].
pub(crate) type IdSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;

pub use config::CoordinatorConfig;
pub use error::Error;

use scheduler::recent;
use scheduler::{Now, Scheduler};
use store::{MemoryStore, Store, StoreError};

/// Why a coordinator stopped by itself (see
/// [`RunningCoordinator::stopped`]). The binary exits with
/// [`exit_code`](Failure::exit_code) so a supervisor restarts it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    /// A store commit failed (full disk, I/O error). The coordinator
    /// stopped at once: the scheduler had moved on from what the store
    /// refused. Nothing acknowledged was lost: every acknowledged request
    /// was committed before it was answered, and the requests that met the
    /// failure were answered `UNAVAILABLE`.
    #[error(
        "a store commit failed ({0}); the coordinator stopped. Nothing acknowledged was lost: every acknowledged request was committed before it was answered, and the requests that met the failure were refused. {hint}",
        hint = commit_hint(.0)
    )]
    Commit(StoreError),
    /// The gRPC server stopped with an error.
    #[error("the gRPC server failed: {0}")]
    Server(String),
    /// The active coordinator on PostgreSQL lost its hold on the database
    /// (its lease ran out, or its session or lock is gone): it stopped,
    /// ending its node sessions, before a standby may take over (see
    /// [`store::pg::lease`]). Nothing acknowledged was lost: it was
    /// committed first.
    #[error("lost the database: {0}; a standby may take over")]
    LostDatabase(String),
}

fn commit_hint(err: &StoreError) -> &'static str {
    match err {
        StoreError::DiskFull { .. } => {
            "Free space on the data dir's disk, then start the coordinator again."
        }
        err if err.is_damage() => {
            "The store is damaged: restore the data dir's log/ (with its STORE_ID) from a backup, or move the data dir away to start an empty cluster."
        }
        _ => "Check the data dir's disk, then start the coordinator again.",
    }
}

impl Failure {
    /// The exit status `weft-coordinator` ends with: 74 (EX_IOERR) for a
    /// failed commit, 65 (EX_DATAERR) when the store turned out damaged, 70
    /// (EX_SOFTWARE) for a failed server, 75 (EX_TEMPFAIL) for a lost
    /// database.
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Commit(err) if err.is_damage() => EXIT_DAMAGED,
            Failure::Commit(_) => EXIT_COMMIT_FAILED,
            Failure::Server(_) => 70,
            Failure::LostDatabase(_) => EXIT_LOST_DATABASE,
        }
    }
}

/// Exit status when the active coordinator lost the database (EX_TEMPFAIL):
/// a supervisor restarts it, and it comes back as a standby (or active,
/// if the database is free by then).
pub const EXIT_LOST_DATABASE: i32 = 75;

/// Exit status when a commit failed (EX_IOERR): restart once the disk has
/// room; nothing acknowledged was lost.
pub const EXIT_COMMIT_FAILED: i32 = 74;
/// Exit status when the store is damaged or missing (EX_DATAERR): a restart
/// does not help; restore a backup or move the data dir away.
pub const EXIT_DAMAGED: i32 = 65;

/// `shutdown` did not finish within its grace period.
#[derive(Debug, thiserror::Error)]
#[error("coordinator shutdown timed out")]
pub struct ShutdownTimedOut;

/// A running coordinator. Dropping it stops it (without waiting); tests
/// should call [`shutdown`](RunningCoordinator::shutdown).
#[derive(Debug)]
pub struct RunningCoordinator {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    tls: Option<Arc<tls::ServerTls>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    admin_token_file: Option<std::path::PathBuf>,
    failure: Arc<OnceLock<Failure>>,
    metrics: Arc<metrics::Metrics>,
}

impl RunningCoordinator {
    /// The coordinator's metrics ([`Metrics::encode`](metrics::Metrics::encode)
    /// is what `/metrics` serves).
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Where this start wrote the admin token (first start only: `None`
    /// when tokens already existed or with `--no-auth`).
    pub fn admin_token_file(&self) -> Option<&std::path::Path> {
        self.admin_token_file.as_deref()
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://ADDR` (or `http://ADDR` without TLS), what nodes and
    /// clients dial.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The address the HTTP listener (dashboard, `/metrics`) is bound to;
    /// `None` when it is off.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// `https://ADDR` (or `http://ADDR` without TLS), the dashboard's
    /// address; `None` when the HTTP listener is off.
    pub fn http_url(&self) -> Option<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.http_addr.map(|addr| format!("{scheme}://{addr}"))
    }

    /// Where the cluster's `ca.pem` is, when serving TLS.
    pub fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.tls.as_ref().map(|tls| tls.ca_file())
    }

    /// The CA pin (`sha256:HEX`), when serving TLS.
    pub fn ca_pin(&self) -> Option<String> {
        self.tls.as_ref().map(|tls| tls.ca_pin())
    }

    /// Issues a new serving certificate now (what the rotation timer
    /// does at 2/3 of each certificate's life); for tests.
    pub fn rotate_certificate(&self) -> Result<(), tls::pki::PkiError> {
        match &self.tls {
            Some(tls) => tls.rotate().map(|_| ()),
            None => Ok(()),
        }
    }

    /// Waits until the coordinator stops: `Err` with the reason when it
    /// stopped by itself (a failed commit, a failed server), `Ok` when it
    /// was told to (dropped, or [`shutdown`](Self::shutdown) from another
    /// handle's task). Embedders wait on this beside their own signals.
    pub async fn stopped(&self) -> Result<(), Failure> {
        self.cancel.cancelled().await;
        match self.failure.get() {
            Some(failure) => Err(failure.clone()),
            None => Ok(()),
        }
    }

    /// Why it stopped by itself, if it did.
    pub fn failure(&self) -> Option<Failure> {
        self.failure.get().cloned()
    }

    /// Stops accepting, ends node sessions and watch streams, and waits up
    /// to `grace` for every task to finish.
    pub async fn shutdown(self, grace: Duration) -> Result<(), ShutdownTimedOut> {
        self.cancel.cancel();
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait())
            .await
            .map_err(|_| ShutdownTimedOut)
    }
}

impl Drop for RunningCoordinator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A PostgreSQL database this coordinator holds (see [`take_database`]):
/// its store, holding the coordinator lock. Dropping it lets go.
#[derive(Debug)]
pub struct Database(Arc<store::PgStore>);

/// Takes the database at `url` for this coordinator, before it binds
/// anything: at once when no other coordinator holds it, else as a
/// standby, waiting (however long) until the active one lets go or dies.
/// `None` when `cancel` was cancelled while waiting. Logs once at info
/// when it waits.
pub async fn take_database(
    url: &str,
    cancel: &CancellationToken,
) -> Result<Option<Database>, Error> {
    let url = url.to_owned();
    let cancel = cancel.clone();
    let taken = tokio::task::spawn_blocking(move || store::PgStore::open_until(&url, &cancel))
        .await
        .map_err(|err| StoreError::Database {
            target: "(the database URL)".into(),
            message: err.to_string(),
        })??;
    Ok(taken.map(|store| Database(Arc::new(store))))
}

/// Starts a coordinator on an already bound listener (so callers can bind
/// port 0 and know the address first). Returns once it serves. With
/// `database_url`, waits first as a standby while another coordinator
/// holds the database (the binary takes it with [`take_database`] before
/// it binds, so that a standby's port stays closed).
pub async fn start(
    config: CoordinatorConfig,
    listener: TcpListener,
) -> Result<RunningCoordinator, Error> {
    start_with(config, listener, None).await
}

/// [`start`] on a database already taken with [`take_database`] (`None`:
/// take it now if `database_url` says one).
pub async fn start_with(
    config: CoordinatorConfig,
    listener: TcpListener,
    database: Option<Database>,
) -> Result<RunningCoordinator, Error> {
    config.check()?;
    let database = match (database, &config.database_url) {
        (Some(database), _) => Some(database),
        (None, Some(url)) => take_database(url, &CancellationToken::new()).await?,
        (None, None) => None,
    };
    let pg = database.map(|Database(store)| store);
    let addr = listener.local_addr().map_err(Error::Listener)?;
    if config.tls.is_none() && !config.insecure && !addr.ip().is_loopback() {
        return Err(Error::Tls(format!(
            "refusing to serve plaintext on {addr}, which is not a loopback address: \
             serve TLS (the default) or pass --insecure"
        )));
    }
    if !config.auth && !addr.ip().is_loopback() {
        return Err(Error::NoAuthNotLoopback(addr));
    }
    let http_listener = match config.http_listen {
        Some(http_addr) => Some(bind_http(&config, http_addr).await?),
        None => None,
    };
    // The CA first: a broken PKI dir fails the start before anything else.
    // On PostgreSQL, the database's (made or uploaded on the first start).
    let server_tls = match &config.tls {
        Some(tls_config) => {
            let tls_config = tls_config.clone();
            let seal_key_file = config.ca_seal_key_file.clone();
            let pg = pg.clone();
            let server_tls = tokio::task::spawn_blocking(move || {
                let shared = match &pg {
                    Some(store) => {
                        let seal = seal_key_file
                            .as_deref()
                            .map(tls::shared_ca::SealKey::read)
                            .transpose()
                            .map_err(|err| err.to_string())?;
                        let pems = tls::shared_ca::from_database(
                            store,
                            tls_config.pki_dir.as_deref(),
                            seal.as_ref(),
                        )
                        .map_err(|err| err.to_string())?;
                        Some(pems)
                    }
                    None => None,
                };
                tls::ServerTls::with_ca(&tls_config, addr, shared.as_ref())
                    .map_err(|err| err.to_string())
            })
            .await
            .map_err(|err| Error::Tls(err.to_string()))?
            .map_err(Error::Tls)?;
            Some(Arc::new(server_tls))
        }
        None => None,
    };
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    // The lease is kept from here on, through the load: a session idle
    // for its coordinator too long (a long start after the load) is one a
    // standby ends, and a start with no lease checks could go on without
    // the database.
    let failure: Arc<OnceLock<Failure>> = Arc::new(OnceLock::new());
    if let Some(store) = &pg {
        tasks.spawn(watch_lease(
            Arc::clone(store),
            Arc::clone(&failure),
            cancel.clone(),
        ));
    }
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;

    // Opening may repair the file after a crash and loading reads every
    // live task: both on the blocking pool.
    let data_dir = config.data_dir.clone();
    let taken = pg.clone();
    let cache_size = config.store_cache_size;
    let scheduler = Scheduler::new((&config).into());
    let (store, mut scheduler, tokens, identities) = tokio::task::spawn_blocking(move || {
        // The redb library panics on some damage (debug checks on a
        // zeroed page), which a move of a redb data dir to the log reads:
        // caught here, so a damaged file is refused with a message instead
        // of a crash.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let engine = match taken {
                Some(store) => Engine::Postgres(store),
                None => Engine::DataDir(data_dir.as_deref()),
            };
            open_and_load(engine, cache_size, scheduler)
        }))
        .unwrap_or_else(|panic| {
            // The redb file while it is being moved, else the log.
            let path = data_dir
                .as_deref()
                .map(|dir| {
                    let redb = dir.join(store::redb::FILE_NAME);
                    match redb.exists() {
                        true => redb,
                        false => dir.join(store::migrate::LOG_DIR),
                    }
                })
                .unwrap_or_default();
            Err(StoreError::Unreadable {
                path,
                message: format!(
                    "the store library panicked: {}",
                    store::panic_message(&*panic)
                ),
            })
        })
    })
    .await
    .map_err(|err| StoreError::Open {
        path: config.data_dir.clone().unwrap_or_default(),
        message: err.to_string(),
    })??;
    match (&config.database_url, &config.data_dir) {
        (Some(_), _) => tracing::info!(live = scheduler.live_tasks(), "store open: PostgreSQL"),
        (None, Some(dir)) => tracing::info!(
            data_dir = %dir.display(),
            live = scheduler.live_tasks(),
            "store open"
        ),
        (None, None) => tracing::info!("in-memory store: tasks do not survive a restart"),
    }
    let tokens = Arc::new(auth::TokenIndex::new(tokens));
    let identities = Arc::new(identity::Identities::new(identities));
    // Revocations kept beside the CA hold even when the store lost them.
    if let Some(server_tls) = &server_tls {
        let revoked = server_tls
            .revoked_nodes()
            .map_err(|err| Error::Tls(err.to_string()))?;
        identities.bar(&revoked, SystemTime::now());
    }
    let admin_token_file = if config.auth && tokens.is_empty() {
        Some(create_admin_token(&config, &store, &tokens).await?)
    } else {
        None
    };
    if !config.auth {
        tracing::warn!(
            "--no-auth: every client is admin without a token; anyone who reaches this port can run commands on every node"
        );
    }
    scheduler.restore_revoked(identities.revoked());

    let auth_on = config.auth;
    let node_auth = config.node_auth();
    let config = Arc::new(config);
    let metrics = Arc::new(metrics::Metrics::default());
    scheduler.set_metrics(Arc::clone(metrics.tasks()));
    let (mut driver, mut handle) = driver::new(
        scheduler,
        store,
        Arc::clone(&config),
        Arc::clone(&metrics),
        cancel.clone(),
        tasks.clone(),
    );
    if let Some(otlp) = &config.otlp {
        let export =
            trace::Export::start(otlp, &tasks, cancel.clone()).map_err(Error::TraceExport)?;
        driver.export_traces(export.clone());
        handle.trace = Some(export);
    }
    driver.share_failure(Arc::clone(&failure));
    // Lost while starting: stop before serving anything.
    if let (Some(Failure::LostDatabase(why)), Some(store)) = (failure.get(), &pg) {
        cancel.cancel();
        return Err(Error::Store(StoreError::LostDatabase {
            target: store.target().to_owned(),
            message: format!("while starting: {why}"),
        }));
    }
    tasks.spawn(driver.run());
    // One instance of each API, served by gRPC and called by HTTP.
    let task_api = Arc::new(service::task::TaskApi::new(handle.clone()));
    let admin_api = Arc::new(service::admin::AdminApi {
        handle: handle.clone(),
        tokens: Arc::clone(&tokens),
        identities: Arc::clone(&identities),
        tls: server_tls.clone(),
        listen: addr,
    });
    let http_addr = match http_listener {
        Some(listener) => Some(start_http(
            listener,
            (&config, &handle, server_tls.as_ref()),
            (Arc::clone(&task_api), Arc::clone(&admin_api)),
            auth_on.then(|| Arc::clone(&tokens)),
            (&cancel, &tasks),
        )?),
        None => None,
    };
    server::mark_serving(&reporter).await;
    let server_cancel = cancel.clone();
    let serve_tls = server_tls.clone();
    let serve_tasks = tasks.clone();
    let serve_failure = Arc::clone(&failure);
    tasks.spawn(async move {
        let result = server::serve(
            (listener, serve_tls, &serve_tasks),
            handle,
            (tokens, identities),
            (task_api, admin_api),
            auth_on,
            health,
            server_cancel.clone(),
        )
        .await;
        if let Err(err) = result {
            tracing::error!(error = %err, "server failed");
            let _ = serve_failure.set(Failure::Server(err.to_string()));
            server_cancel.cancel();
        }
    });
    match &server_tls {
        Some(server_tls) => {
            tasks.spawn(Arc::clone(server_tls).rotate_until(cancel.clone()));
            tracing::info!(
                %addr,
                ca_file = %server_tls.ca_file().display(),
                ca_pin = %server_tls.ca_pin(),
                "listening (TLS); clients and nodes trust the cluster CA with --ca-file CA_FILE or --ca-pin CA_PIN"
            );
        }
        None => tracing::info!(%addr, "listening (plaintext)"),
    }
    if node_auth {
        tracing::info!(
            "nodes must join: make a join token with `weft token create --role node [--ttl 1h] [--uses N]`, then start each node with `weft-node --join TOKEN`"
        );
    } else if server_tls.is_some() && auth_on {
        tracing::warn!(
            "nodes are not required to join (node certificates not required): any process that reaches this port can register as a node"
        );
    } else {
        tracing::warn!(
            "nodes are not authenticated (--insecure or --no-auth): any process that reaches this port can register as a node"
        );
    }
    Ok(RunningCoordinator {
        addr,
        http_addr,
        tls: server_tls,
        cancel,
        tasks,
        admin_token_file,
        failure,
        metrics,
    })
}

/// The active coordinator's lease watchdog (PostgreSQL): once the lease is
/// lost, records why and stops the coordinator, which ends its node
/// sessions, before a standby may take over.
async fn watch_lease(
    store: Arc<store::PgStore>,
    failure: Arc<OnceLock<Failure>>,
    cancel: CancellationToken,
) {
    if let Some(why) = store.watch_lease(cancel.clone()).await {
        tracing::error!(reason = %why, "lost the database: stopping, so that a standby may take over");
        let _ = failure.set(Failure::LostDatabase(why));
        cancel.cancel();
    }
}

/// Binds the HTTP listener at `addr`, once its plaintext and `--no-auth`
/// rules allow it (those of the gRPC listener).
async fn bind_http(config: &CoordinatorConfig, addr: SocketAddr) -> Result<TcpListener, Error> {
    let refuse = |message: String| Error::HttpListen { addr, message };
    http::check_plaintext(addr, config.tls.is_some(), config.insecure).map_err(refuse)?;
    if !config.auth && !addr.ip().is_loopback() {
        return Err(refuse(format!(
            "refusing --no-auth on {addr}, which is not a loopback address: anyone who reaches it could cancel tasks and drain nodes; listen on 127.0.0.1 or use client tokens"
        )));
    }
    TcpListener::bind(addr).await.map_err(|err| {
        refuse(format!(
            "cannot bind: {err} (choose another address with --http-listen, or turn it off with --http-listen off)"
        ))
    })
}

/// Starts the HTTP listener on `listener` and the overview's sampler;
/// returns the bound address.
fn start_http(
    listener: TcpListener,
    (config, handle, tls): (
        &CoordinatorConfig,
        &driver::Handle,
        Option<&Arc<tls::ServerTls>>,
    ),
    (task_api, admin_api): (Arc<service::task::TaskApi>, Arc<service::admin::AdminApi>),
    tokens: Option<Arc<auth::TokenIndex>>,
    (cancel, tasks): (&CancellationToken, &TaskTracker),
) -> Result<SocketAddr, Error> {
    let addr = listener.local_addr().map_err(Error::Listener)?;
    let series = Arc::new(http::Series::default());
    tasks.spawn(Arc::clone(&series).sample_until(handle.clone(), cancel.clone()));
    let app = Arc::new(http::App {
        tasks: task_api,
        admin: admin_api,
        schedules: service::schedule::ScheduleApi {
            handle: handle.clone(),
        },
        tokens,
        sessions: http::session::Sessions::new(
            http::session::MAX_SESSIONS,
            http::session::SESSION_IDLE,
        ),
        series,
        secure: tls.is_some(),
        cookie: http::session::cookie_name(addr.port()),
        cancel: cancel.clone(),
        // `/metrics`: the registry's text, rendered at each scrape.
        metrics: Some({
            let metrics = Arc::clone(&handle.metrics);
            Arc::new(move || metrics.encode())
        }),
    });
    tasks.spawn(http::serve(
        listener,
        tls.cloned(),
        app,
        listener::Limits::of(config),
        config.max_streams_per_connection,
        cancel.clone(),
        tasks.clone(),
    ));
    let scheme = if tls.is_some() { "https" } else { "http" };
    match tls {
        Some(tls) => tracing::info!(
            url = %format!("{scheme}://{addr}/"),
            ca_file = %tls.ca_file().display(),
            "dashboard: open the url and log in with a client token; the browser must trust the cluster CA (ca_file), curl takes --cacert CA_FILE"
        ),
        None => tracing::info!(
            url = %format!("{scheme}://{addr}/"),
            "dashboard: open the url and log in with a client token"
        ),
    }
    Ok(addr)
}

/// What a start reads from the store: the store, the scheduler with the
/// live tasks put back, tokens and node identities.
type Opened = (
    Arc<dyn Store>,
    Scheduler,
    Vec<auth::TokenRecord>,
    Vec<store::NodeIdentityRecord>,
);

/// Which store a start opens.
enum Engine<'a> {
    /// The data dir's log (`None`: in memory).
    DataDir(Option<&'a std::path::Path>),
    /// PostgreSQL (`--database-url`), taken.
    Postgres(Arc<store::PgStore>),
}

/// Opens the store (in memory, a data dir's log, or PostgreSQL; a data
/// dir's redb store is moved to the log first, once, with a redb page
/// cache of `cache_size` bytes) and reads what a start needs into
/// `scheduler`, one live task at a time (the full records are never all
/// held at once: a restart fits in about what the run needed).
fn open_and_load(
    engine: Engine<'_>,
    cache_size: usize,
    mut scheduler: Scheduler,
) -> Result<Opened, StoreError> {
    let store: Arc<dyn Store> = match engine {
        Engine::DataDir(Some(dir)) => store::migrate::open_data_dir_with_cache(dir, cache_size)?,
        Engine::DataDir(None) => Arc::new(MemoryStore::new()),
        Engine::Postgres(store) => store,
    };
    let since = SystemTime::now()
        .checked_sub(recent::WINDOW)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let now = Now {
        instant: Instant::now(),
        wall: SystemTime::now(),
    };
    let loaded = store.load_each(since, &mut |record, secret| {
        scheduler.restore_task(record, secret, now);
    })?;
    scheduler.restore_summary(loaded.final_counts, loaded.recently_final, now);
    scheduler.restore_next_chunks(loaded.next_chunks);
    scheduler.restore_schedules(loaded.schedules, now);
    scheduler.restore_limits(loaded.limits);
    // Pending tasks' parents that ended before the restart: read back. A
    // read that fails fails the start (a parent read as missing would
    // fail its children for good).
    let mut lookup = |id| {
        store.task(id).map(|record| {
            record
                .as_ref()
                .and_then(scheduler::graph::ParentResult::of_final)
        })
    };
    scheduler.finish_restore(&mut lookup, now)?;
    let tokens = store.tokens()?;
    let identities = store.node_identities()?;
    Ok((store, scheduler, tokens, identities))
}

/// First start (no token stored): makes an admin token, stores its hash
/// and writes the token to its file (0600). A token already in that file
/// (the store was wiped, or `--in-memory` restarts with the same
/// `--admin-token-file`) is adopted instead of replaced, so clients holding
/// it keep working. Logs the path, never the token.
async fn create_admin_token(
    config: &CoordinatorConfig,
    store: &Arc<dyn Store>,
    tokens: &Arc<auth::TokenIndex>,
) -> Result<std::path::PathBuf, Error> {
    let path = auth::admin_token_path(
        config.admin_token_file.as_deref(),
        config.data_dir.as_deref(),
    );
    let fail = |message: String| Error::AdminToken {
        path: path.clone(),
        message,
    };
    let file = path.clone();
    let (record, adopted) = tokio::task::spawn_blocking(move || {
        if let Some(record) = auth::read_own_token_file(&file)?
            .and_then(|text| auth::adopt_token(&text, "admin", SystemTime::now()))
        {
            return Ok((record, true));
        }
        let (record, token) =
            auth::new_token("admin", auth::Scopes::ADMIN, None, SystemTime::now())
                .map_err(|status| status.message().to_owned())?;
        auth::write_token_file(&file, &token).map_err(|err| err.to_string())?;
        Ok::<_, String>((record, false))
    })
    .await
    .map_err(|err| fail(err.to_string()))?
    .map_err(fail)?;
    let stored = record.clone();
    store::blocking(store, "writing a token", move |store| {
        store.put_token(&stored)
    })
    .await?;
    tokens.put(record);
    tracing::info!(
        path = %path.display(),
        adopted,
        "admin token (first start) in {}; use it with `weft --token-file {}` or make scoped ones with `weft token create --scope ...`",
        path.display(),
        path.display()
    );
    Ok(path)
}
