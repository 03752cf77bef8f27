//! `weft-coordinator`: parse flags, install tracing, bind, start, wait for
//! a signal, shut down. Everything else is in the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use tracing_subscriber::EnvFilter;

use weft_coordinator::CoordinatorConfig;
use weft_coordinator::tls::TlsConfig;
use weft_proto::convert::parse_duration;

/// jemalloc, not the system's malloc: a queue frees its tasks in another
/// order than it made them (priorities, fair keys), and jemalloc's size
/// classes keep that about as cheap as first in, first out (BENCHMARKS.md,
/// "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The Weft coordinator: keeps the task queue, matches tasks to connected
/// nodes, and serves the client and admin APIs over gRPC.
///
/// SIGINT or SIGTERM shuts down gracefully (up to --shutdown-grace); a
/// second signal exits at once. Logs go to stderr; RUST_LOG filters them
/// (default `info`).
///
/// Exit status: 0 after a signal's graceful shutdown; 1 when it could not
/// start (address in use, data dir locked, TLS); 2 for bad flags; 65 when
/// the store is damaged or missing (refused at start, or found while
/// running): a restart does not help, restore the data dir's `log/` from a backup or
/// move the data dir away to start an empty cluster; 70 when the gRPC
/// server failed; 74 when a store commit failed (disk full, I/O error):
/// nothing acknowledged was lost, restart once the disk has room; 75 when
/// the active coordinator lost its PostgreSQL database (a standby may take
/// over; restart it and it becomes one); 130 after a second signal.
#[derive(Debug, Parser)]
#[command(name = "weft-coordinator", version)]
struct Args {
    /// Address to listen on, as IP:PORT or HOST:PORT (checked before
    /// anything else, a standby's wait for the database included). Port 0 picks a free
    /// port (see --addr-file).
    #[arg(long, env = "WEFT_LISTEN", value_name = "HOST:PORT", default_value = "127.0.0.1:7070", value_parser = parse_listen)]
    listen: std::net::SocketAddr,

    /// Write the bound `host:port` to this file once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,

    /// Address of the HTTP listener: the dashboard (open it in a browser
    /// and log in with a client token), `/healthz` and `/metrics`. HTTPS
    /// with the cluster's serving certificate whenever gRPC serves TLS;
    /// plaintext (--insecure) only on a loopback address, as for gRPC.
    /// `off` turns it off. Port 0 picks a free port (see
    /// --http-addr-file) [default: 127.0.0.1:7080; when that port is
    /// taken and the flag was not given, the coordinator starts without
    /// it, saying so].
    #[arg(long, env = "WEFT_HTTP_LISTEN", value_name = "ADDR|off", value_parser = parse_http_listen)]
    http_listen: Option<HttpListen>,

    /// Write the HTTP listener's bound `host:port` to this file once
    /// listening (nothing is written when it is off).
    #[arg(long, value_name = "PATH")]
    http_addr_file: Option<PathBuf>,

    /// How often the coordinator and each node send heartbeats (more
    /// than 0).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    heartbeat_interval: Duration,

    /// Silence after which a node is declared lost and its tasks requeued:
    /// at least twice --heartbeat-interval, so an idle node may miss one
    /// heartbeat.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    heartbeat_timeout: Duration,

    /// How long an attempt sent to a node may wait unstarted before it is
    /// taken back and queued again (at no cost to the task). A node that
    /// started none of its attempts in that time (it does not read its
    /// stream, or cannot run anything) is declared lost. Must exceed the
    /// time a node needs to start a process.
    #[arg(long, default_value = "30s", value_parser = parse_start_timeout)]
    start_timeout: Duration,

    /// How long a call whose handler no connected node serves waits for
    /// one (say, while its Python worker restarts) before it fails saying
    /// so. 0 waits forever. Calls submitted while no node at all is
    /// connected always wait.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    schedule_timeout: Duration,

    /// Starvation guard for priorities: a queued task gains one priority
    /// level per this much it has waited since it was submitted, so a
    /// priority-1 task under a constant stream of priority-9 work still
    /// runs within 8 intervals. 0 gives strict priority order (low
    /// priorities may then wait forever).
    #[arg(long, env = "WEFT_PRIORITY_AGING", default_value = "60s", value_parser = parse_duration)]
    priority_aging: Duration,

    /// Directory of the durable store (created if missing). Tasks, their
    /// events and results survive restarts there; one coordinator per dir.
    #[arg(long, env = "WEFT_DATA_DIR", default_value = "weft-data")]
    data_dir: PathBuf,

    /// Keep everything in memory instead (nothing survives a restart).
    #[arg(long, conflicts_with = "database_url")]
    in_memory: bool,

    /// Keep the store in PostgreSQL instead of the data dir's log, e.g.
    /// `postgresql://weft@db.example:5432/weft` (the schema is made or
    /// brought up to date at start). Several coordinators may share one
    /// database: one is active, the others wait as standbys (logging so
    /// once, their ports closed) and one takes over within a second of
    /// the active's death, or within its lease (4s, ended by the database
    /// after 8s) once it is cut off from the database. The cluster CA
    /// lives in the database too (see --ca-seal-key-file); the data dir
    /// holds `ca.pem` and the admin token. TLS to the database:
    /// `?sslmode=verify-full&sslrootcert=CA_FILE` (the server's certificate
    /// and name checked; `require` and `verify-ca` are refused). A
    /// database that cannot be
    /// reached stops the start with exit code 1.
    #[arg(long, env = "WEFT_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,

    /// With --database-url: a file of 32 random bytes (make one with
    /// `head -c 32 /dev/urandom > FILE`, mode 0600, the same on every
    /// coordinator) that seals the cluster CA's key in the database
    /// (ChaCha20-Poly1305). Without it the key is stored unsealed, and
    /// anyone who can read the database can mint node certificates. A
    /// sealed CA without this key, or with another, stops the start
    /// (exit 1).
    #[arg(
        long,
        env = "WEFT_CA_SEAL_KEY_FILE",
        value_name = "FILE",
        requires = "database_url"
    )]
    ca_seal_key_file: Option<PathBuf>,

    /// After a restart, how long tasks that were running wait for their
    /// node to reconnect and claim them before they are requeued.
    /// Default: twice --heartbeat-timeout.
    #[arg(long, value_parser = parse_duration)]
    restart_grace: Option<Duration>,

    /// How long the attempts of a node whose stream broke (it did not drain,
    /// and was not silent past --heartbeat-timeout) wait for it to
    /// reconnect and claim them; they carry on if it does, and are requeued
    /// if it does not. Default: --heartbeat-timeout, which is how long a
    /// node keeps running its attempts after it last heard from the
    /// coordinator (its lease), so a requeued attempt has stopped.
    #[arg(long, value_parser = parse_duration)]
    reconnect_grace: Option<Duration>,

    /// A task lost with this many different nodes while running fails
    /// instead of being retried on another (poison task). 0: no limit.
    #[arg(long, default_value_t = 2)]
    max_node_losses: u32,

    /// How long finished tasks and their output are kept; 0 keeps them forever.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    retention: Duration,

    /// Most tasks not yet final at once; Submit past it answers RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 10_000_000)]
    max_queued: usize,

    /// Most slots one node may declare: a node offering more is refused at
    /// registration (INVALID_ARGUMENT, and weft-node exits 1 with the
    /// reason). A node's prefetch (work it holds queued beyond its slots)
    /// is capped at the same number, so no node is ever given more than
    /// twice this many slots of work at once.
    #[arg(
        long,
        env = "WEFT_MAX_NODE_SLOTS",
        value_name = "N",
        default_value_t = weft_coordinator::config::DEFAULT_MAX_NODE_SLOTS,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_node_slots: u32,

    /// The largest gRPC message the coordinator takes or sends a node:
    /// bytes, or a number with KiB or MiB (1MiB to 64MiB; nodes and
    /// workers accept 64MiB). A Submit with a spec too large to be sent
    /// to a node, or a request past it, is refused with
    /// RESOURCE_EXHAUSTED naming the limit; assignments to a node are
    /// split to fit.
    #[arg(
        long,
        env = "WEFT_MAX_MESSAGE_SIZE",
        value_name = "BYTES",
        default_value = "16MiB",
        value_parser = parse_message_size
    )]
    max_message_size: usize,

    /// How long a new connection may take to finish its TLS handshake and
    /// send the HTTP/2 client preface (what every gRPC client sends
    /// first); one that has not by then is closed, so connections that
    /// open and stay silent cannot pile up. Bytes that are not HTTP/2 are
    /// closed at once.
    #[arg(
        long,
        env = "WEFT_HANDSHAKE_TIMEOUT",
        default_value = "10s",
        value_parser = parse_handshake_timeout
    )]
    handshake_timeout: Duration,

    /// Most connections open at once (clients and nodes, those still in
    /// their handshake included); a connection past it closes the oldest
    /// one still in its handshake to make room, or is closed at once when
    /// all are established, with a warning logged. Default: the descriptor limit (`ulimit -n`)
    /// less 128 (at least half of it), at most 100000, so connections
    /// never use up the descriptors the store needs.
    #[arg(
        long,
        env = "WEFT_MAX_CONNECTIONS",
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_connections: Option<u64>,

    /// Most connections open at once from one IP address; a connection
    /// past it closes that address's oldest one still in its handshake to
    /// make room (so half-open floods lock no one out), or is closed at
    /// once when all are established, with a warning logged: one peer
    /// cannot take the connections (or descriptors) everyone else needs. Each
    /// node holds one connection and each client one per channel.
    #[arg(
        long,
        env = "WEFT_MAX_CONNECTIONS_PER_IP",
        value_name = "N",
        default_value_t = weft_coordinator::config::DEFAULT_MAX_CONNECTIONS_PER_IP as u64,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_connections_per_ip: u64,

    /// Most calls (HTTP/2 streams) open at once on one connection: a
    /// node's session, a watch and each unary call in flight is one. A
    /// client that wants more waits for one to end.
    #[arg(
        long,
        value_name = "N",
        default_value_t = weft_coordinator::config::DEFAULT_MAX_STREAMS_PER_CONNECTION,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_streams_per_connection: u32,

    /// Most bytes of a task's events queued towards one Watch or Run
    /// stream: bytes, or a number with KiB or MiB (64KiB to 1GiB). A
    /// client that reads slower than the task writes falls back to
    /// reading the store (it misses nothing); one that never reads costs
    /// the coordinator about this much, however far it falls behind.
    #[arg(
        long,
        env = "WEFT_WATCH_BUFFER_BYTES",
        value_name = "BYTES",
        default_value = "256KiB",
        value_parser = parse_watch_buffer
    )]
    watch_buffer_bytes: usize,

    /// Most Watch, Run and WaitMany streams one client may have open at
    /// once (a client is its token; with --no-auth its IP address). One
    /// more is refused with RESOURCE_EXHAUSTED naming this limit; ending
    /// a stream frees its place.
    #[arg(
        long,
        env = "WEFT_MAX_STREAMS_PER_CLIENT",
        value_name = "N",
        default_value_t = weft_coordinator::config::DEFAULT_MAX_STREAMS_PER_CLIENT,
        value_parser = clap::builder::TypedValueParser::map(
            clap::value_parser!(u32).range(1..),
            |n| n as usize
        )
    )]
    max_streams_per_client: usize,

    /// Most memory the old redb store's page cache may use while a data
    /// dir written by an older coordinator (`weft.redb`) is moved to the
    /// log, once, at start: bytes, or a number with KiB, MiB or GiB (e.g.
    /// 64MiB). The log has no page cache, so otherwise it is accepted and
    /// unused.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    store_cache_size: usize,

    /// First retry delay after a failed attempt; doubles per attempt. At
    /// most --retry-backoff-max.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    retry_backoff: Duration,

    /// Longest retry delay (at least --retry-backoff).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    retry_backoff_max: Duration,

    /// How long a graceful shutdown waits for sessions and streams to end.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,

    /// Where the admin token is written on first start (no token stored
    /// yet), mode 0600. Default: DATA_DIR/admin.token; with --in-memory a
    /// fresh private temp dir (the path is logged). Not with --no-auth.
    #[arg(long, env = "WEFT_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,

    /// Turns client tokens off: every client is admin without a token.
    /// Only for experiments on a machine nobody else reaches: refused
    /// unless the listen address is loopback; logs a warning at every
    /// start. Nodes are not authenticated either, so --admin-token-file
    /// and --node-cert-lifetime are refused beside it.
    #[arg(long)]
    no_auth: bool,

    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Settings from the environment that a flag makes moot (logged as
    /// warnings once logging is up; the same given as flags are refused).
    #[arg(skip)]
    moot_in_env: Vec<String>,

    /// Serve plaintext gRPC instead of TLS: anyone who reaches the port can
    /// read and forge all traffic. Logs a warning at every start. Clients
    /// then dial http://HOST:PORT. The TLS flags (--pki-dir, --advertise,
    /// --node-cert-lifetime, --ca-seal-key-file) are refused beside it.
    #[arg(long, env = "WEFT_INSECURE")]
    insecure: bool,

    /// Another name clients and nodes dial this coordinator by (a DNS name
    /// or an IP address, without port or scheme), added to its serving
    /// certificate; repeatable.
    /// The listen address, the host name, and (when listening on loopback
    /// or on every address) localhost, 127.0.0.1 and ::1 are always in it.
    #[arg(long, value_name = "NAME", value_parser = parse_advertise)]
    advertise: Vec<String>,

    /// Directory of the cluster CA (ca.pem, ca.key) [default: the data dir;
    /// with --in-memory, a private temp dir removed on exit].
    #[arg(long, env = "WEFT_PKI_DIR", value_name = "DIR")]
    pki_dir: Option<PathBuf>,

    /// Lifetime of each serving certificate (rotated at 2/3 of it). Testing.
    #[arg(long, default_value = "7d", value_parser = parse_duration, hide = true)]
    cert_lifetime: Duration,

    /// Export traces over OTLP/gRPC to this collector URL
    /// (http://HOST:4317; plaintext, to a collector or agent nearby): one
    /// trace per task, with
    /// spans submit, commit, queued, attempt N, result. Off by default (and
    /// then costs nothing per task); a client's W3C trace context still
    /// reaches the node either way.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL", value_parser = weft_coordinator::trace::parse_endpoint)]
    otlp_endpoint: Option<String>,

    /// `service.name` of the exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = weft_coordinator::trace::DEFAULT_SERVICE_NAME)]
    otel_service_name: String,

    /// Lifetime of each node certificate (issued when a node joins;
    /// nodes renew theirs over their session at 2/3 of it). A node away
    /// for longer than this must join again with a new token. At least
    /// 1m.
    #[arg(long, default_value = "7d", value_parser = parse_node_cert_lifetime)]
    node_cert_lifetime: Duration,
}

/// `--http-listen`: an address, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpListen {
    Off,
    At(std::net::SocketAddr),
}

/// The binary's `--http-listen` when none is given.
const DEFAULT_HTTP_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 7080),
);

/// Parses `--http-listen`: `off`, or `IP:PORT`.
fn parse_http_listen(text: &str) -> Result<HttpListen, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(HttpListen::Off);
    }
    text.parse().map(HttpListen::At).map_err(|_| {
        format!("{text:?} is neither `off` nor an IP:PORT address (e.g. 127.0.0.1:7080, 0.0.0.0:7080, [::1]:7080)")
    })
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl From<&Args> for CoordinatorConfig {
    fn from(args: &Args) -> Self {
        CoordinatorConfig {
            heartbeat_interval: args.heartbeat_interval,
            heartbeat_timeout: args.heartbeat_timeout,
            data_dir: (!args.in_memory).then(|| args.data_dir.clone()),
            database_url: args.database_url.clone(),
            ca_seal_key_file: args.ca_seal_key_file.clone(),
            max_queued: args.max_queued,
            retry_backoff_base: args.retry_backoff,
            retry_backoff_max: args.retry_backoff_max,
            restart_grace: args.restart_grace,
            reconnect_grace: args.reconnect_grace,
            max_node_losses: args.max_node_losses,
            retention: args.retention,
            store_cache_size: args.store_cache_size,
            max_node_slots: args.max_node_slots,
            start_timeout: args.start_timeout,
            schedule_timeout: args.schedule_timeout,
            priority_aging: args.priority_aging,
            insecure: args.insecure,
            tls: (!args.insecure).then(|| TlsConfig {
                pki_dir: args
                    .pki_dir
                    .clone()
                    .or_else(|| (!args.in_memory).then(|| args.data_dir.clone())),
                advertise: args.advertise.clone(),
                cert_lifetime: args.cert_lifetime,
            }),
            auth: !args.no_auth,
            admin_token_file: args.admin_token_file.clone(),
            node_cert_lifetime: args.node_cert_lifetime,
            max_message_size: args.max_message_size,
            handshake_timeout: args.handshake_timeout,
            max_connections: args
                .max_connections
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            max_connections_per_ip: usize::try_from(args.max_connections_per_ip)
                .unwrap_or(usize::MAX),
            max_streams_per_connection: args.max_streams_per_connection,
            watch_buffer_bytes: args.watch_buffer_bytes,
            max_streams_per_client: args.max_streams_per_client,
            http_listen: match args.http_listen {
                Some(HttpListen::Off) => None,
                Some(HttpListen::At(addr)) => Some(addr),
                None => Some(DEFAULT_HTTP_LISTEN),
            },
            otlp: args
                .otlp_endpoint
                .clone()
                .map(|endpoint| weft_coordinator::trace::OtlpConfig {
                    endpoint,
                    service_name: args.otel_service_name.clone(),
                }),
            ..CoordinatorConfig::default()
        }
    }
}

/// Parses `--start-timeout`: at least a second (a node needs that long to
/// report an attempt it started on a loaded machine).
fn parse_start_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text).map_err(|err| err.to_string())?;
    if timeout < Duration::from_secs(1) {
        return Err(format!(
            "{timeout:?} is too short: nodes need time to start an attempt (at least 1s)"
        ));
    }
    Ok(timeout)
}

/// Parses `--listen`: `IP:PORT`, or `HOST:PORT` resolved now (its first
/// address), so that a bad one is said at start, not after a standby's
/// wait for the database.
fn parse_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let text = text.trim();
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let expected = "expected IP:PORT or HOST:PORT (e.g. 127.0.0.1:7070, 0.0.0.0:7070, [::]:7070, localhost:7070)";
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{text} resolves to no address; {expected}")),
        Err(err) => Err(format!("cannot use {text:?} ({err}): {expected}")),
    }
}

/// Parses an `--advertise` name: a DNS name or an IP address (an IPv6
/// one may be in brackets), never with a port or a scheme; what the
/// serving certificate can name and a join token can point nodes at.
fn parse_advertise(text: &str) -> Result<String, String> {
    let name = text.trim();
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    let valid = !bare.is_empty()
        && (bare.parse::<std::net::IpAddr>().is_ok()
            || (bare == name && rustls_pki_types::DnsName::try_from(bare).is_ok()));
    if !valid {
        return Err(
            "expected a DNS name or IP address, without port or scheme (e.g. weft.example.com, 10.0.0.5)"
                .to_owned(),
        );
    }
    Ok(name.to_owned())
}

/// The shortest `--node-cert-lifetime`: a node renews at 2/3 of it, and
/// a session may renew at most once a second.
const MIN_NODE_CERT_LIFETIME: Duration = Duration::from_secs(1);

/// Parses `--node-cert-lifetime`: at least [`MIN_NODE_CERT_LIFETIME`].
fn parse_node_cert_lifetime(text: &str) -> Result<Duration, String> {
    let lifetime = parse_duration(text).map_err(|err| err.to_string())?;
    if lifetime < MIN_NODE_CERT_LIFETIME {
        return Err(
            "too short: a node certificate lives at least 1s (nodes renew theirs at 2/3 of it)"
                .to_owned(),
        );
    }
    Ok(lifetime)
}

/// Parses `--handshake-timeout`: a duration, not zero.
fn parse_handshake_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text).map_err(|err| err.to_string())?;
    if timeout.is_zero() {
        return Err("must be more than 0 (e.g. 10s)".to_owned());
    }
    Ok(timeout)
}

/// Parses `--max-message-size`: a size within what nodes accept.
fn parse_message_size(text: &str) -> Result<usize, String> {
    use weft_proto::limits::{MAX_MESSAGE_BYTES_CEILING, MIN_MAX_MESSAGE_BYTES};
    let size = parse_size(text)?;
    if !(MIN_MAX_MESSAGE_BYTES..=MAX_MESSAGE_BYTES_CEILING).contains(&size) {
        return Err(format!(
            "{size} bytes is outside {MIN_MAX_MESSAGE_BYTES}..={MAX_MESSAGE_BYTES_CEILING} (1MiB to 64MiB)"
        ));
    }
    Ok(size)
}

/// Parses `--watch-buffer-bytes`: room for two output chunks at least,
/// 1 GiB at most.
fn parse_watch_buffer(text: &str) -> Result<usize, String> {
    use weft_coordinator::config::MIN_WATCH_BUFFER_BYTES;
    let size = parse_size(text)?;
    if !(MIN_WATCH_BUFFER_BYTES..=1 << 30).contains(&size) {
        return Err(format!(
            "{size} bytes is outside {MIN_WATCH_BUFFER_BYTES}..={} (64KiB to 1GiB)",
            1 << 30
        ));
    }
    Ok(size)
}

/// Parses a byte count: `4096`, `512KiB`, `64MiB`, `1GiB` (also `K`, `M`, `G`
/// and `KB`, `MB`, `GB`, all as powers of 1024).
fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size (like 64MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size unit '{other}' (use KiB, MiB or GiB)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Writes the address next to `path` then renames, so a reader never sees
/// half a line.
fn write_addr_file(path: &PathBuf, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, addr.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

async fn signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Parses `argv` as [`Args`], then refuses what clap cannot say by
/// itself: flags that contradict each other or that another flag makes
/// moot. Every refusal is a usage error (exit 2) naming the flags.
fn try_parse_args<I, T>(argv: I) -> Result<Args, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut command = Args::command();
    let matches = command.try_get_matches_from_mut(argv)?;
    let mut args = Args::from_arg_matches(&matches).map_err(|err| err.format(&mut command))?;
    let (refused, in_env) = moot_flags(&command, &args, &matches);
    if let Some(conflict) = refused {
        return Err(command.error(clap::error::ErrorKind::ArgumentConflict, conflict));
    }
    args.moot_in_env = in_env;
    CoordinatorConfig::from(&args)
        .check()
        .map_err(|err| command.error(clap::error::ErrorKind::ValueValidation, err))?;
    Ok(args)
}

/// Settings another flag makes moot, each as the message that names
/// both: the first given on the command line (refused: silently ignoring
/// it would leave its author believing it took), and those set in the
/// environment (warned about: an image or a service file may set them for
/// every run, and a flag then says what this run does).
fn moot_flags(
    command: &clap::Command,
    args: &Args,
    matches: &clap::ArgMatches,
) -> (Option<String>, Vec<String>) {
    use clap::parser::ValueSource;
    // A flag's name as its author wrote it (the env var when it came from
    // there), and whether it came from the environment.
    let given = |id: &str| -> Option<(String, bool)> {
        let arg = command.get_arguments().find(|arg| arg.get_id() == id)?;
        let long = format!("--{}", arg.get_long().unwrap_or(id));
        match matches.value_source(id)? {
            ValueSource::CommandLine => Some((long, false)),
            ValueSource::EnvVariable => Some((
                format!(
                    "{} ({long})",
                    arg.get_env()
                        .map_or_else(String::new, |env| env.to_string_lossy().into_owned())
                ),
                true,
            )),
            _ => None,
        }
    };
    let moot: [(bool, &str, &[&str], &str); 3] = [
        (
            args.in_memory,
            "in_memory",
            &["data_dir"],
            "the store is kept in memory, so nothing would be written there",
        ),
        (
            args.no_auth,
            "no_auth",
            &["admin_token_file", "node_cert_lifetime"],
            "no client tokens and no node certificates are issued without authentication",
        ),
        (
            args.insecure,
            "insecure",
            &[
                "pki_dir",
                "advertise",
                "node_cert_lifetime",
                "cert_lifetime",
                "ca_seal_key_file",
            ],
            "plaintext has no CA, serving certificate or node certificates",
        ),
    ];
    let mut refused = None;
    let mut in_env = Vec::new();
    for (_, flag, ids, why) in moot.into_iter().filter(|(on, ..)| *on) {
        let flag =
            given(flag).map_or_else(|| format!("--{}", flag.replace('_', "-")), |(name, _)| name);
        for (other, from_env) in ids.iter().filter_map(|id| given(id)) {
            if from_env {
                in_env.push(format!("{other} is ignored with {flag}: {why}"));
            } else if refused.is_none() {
                refused = Some(format!(
                    "{other} cannot be used with {flag}: {why}; drop one of them"
                ));
            }
        }
    }
    (refused, in_env)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = try_parse_args(std::env::args_os()).unwrap_or_else(|err| err.exit());
    init_tracing(args.log_format);
    for moot in &args.moot_in_env {
        tracing::warn!("{moot}");
    }
    if args.insecure {
        tracing::warn!(
            "--insecure: serving plaintext; anyone who reaches {} can read and forge all traffic, and nodes are not authenticated (any process can register as a node)",
            args.listen
        );
    }
    // The database before the ports: a standby does not listen, so nodes
    // and clients that dial it are refused at once and try the next
    // coordinator.
    let database = match &args.database_url {
        Some(url) => {
            let cancel = tokio_util::sync::CancellationToken::new();
            tokio::select! {
                taken = weft_coordinator::take_database(url, &cancel) => {
                    taken.context("taking the database")?
                }
                result = signal() => {
                    cancel.cancel();
                    result?;
                    tracing::info!("signal while waiting for the database: exiting");
                    return Ok(());
                }
            }
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding coordinator listener on {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let mut config = CoordinatorConfig::from(&args);
    if args.http_listen.is_none() && std::net::TcpListener::bind(DEFAULT_HTTP_LISTEN).is_err() {
        // The default port is taken (another coordinator on this host):
        // start without the dashboard rather than not at all.
        tracing::warn!(
            "the dashboard's default address {DEFAULT_HTTP_LISTEN} is in use: starting without the HTTP listener; pass --http-listen ADDR (port 0 picks a free one) to serve it"
        );
        config.http_listen = None;
    }
    let coordinator = match weft_coordinator::start_with(config, listener, database).await {
        Ok(coordinator) => coordinator,
        Err(weft_coordinator::Error::Store(err))
            if err.is_damage() && args.database_url.is_some() =>
        {
            tracing::error!(
                "refusing to start: {err}. The database holds a record this coordinator cannot read: restore the database from a backup"
            );
            std::process::exit(weft_coordinator::EXIT_DAMAGED);
        }
        Err(weft_coordinator::Error::Store(err)) if err.is_damage() => {
            tracing::error!(
                "refusing to start: {err}. To recover: stop every coordinator on {dir}, then restore {dir}/log/ (with {dir}/STORE_ID) from a backup; or, to start an empty cluster that forgets every task, move {dir} away",
                dir = args.data_dir.display()
            );
            std::process::exit(weft_coordinator::EXIT_DAMAGED);
        }
        Err(weft_coordinator::Error::Store(
            err @ weft_coordinator::store::StoreError::LostDatabase { .. },
        )) => {
            tracing::error!("{err}; stopping, so that a standby may take over");
            std::process::exit(weft_coordinator::EXIT_LOST_DATABASE);
        }
        Err(err) => return Err(anyhow::Error::new(err).context("starting the coordinator")),
    };
    if let Some(path) = &args.addr_file {
        write_addr_file(path, addr)?;
    }
    if let (Some(path), Some(http_addr)) = (&args.http_addr_file, coordinator.http_addr()) {
        write_addr_file(path, http_addr)?;
    }
    tokio::select! {
        result = signal() => result?,
        stopped = coordinator.stopped() => {
            if let Err(failure) = stopped {
                tracing::error!("{failure} Exiting with status {}.", failure.exit_code());
                // Sessions and streams were told to end; do not wait long.
                let grace = args.shutdown_grace.min(Duration::from_secs(2));
                let _ = coordinator.shutdown(grace).await;
                std::process::exit(failure.exit_code());
            }
        }
    }
    tracing::info!(grace = ?args.shutdown_grace, "shutting down");
    tokio::select! {
        result = coordinator.shutdown(args.shutdown_grace) => {
            if result.is_err() {
                tracing::warn!("shutdown grace period ran out");
            }
        }
        _ = signal() => {
            tracing::warn!("second signal; exiting now");
            std::process::exit(130);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Args, parse_size, try_parse_args};

    /// The usage error (exit 2) `args` get, as text.
    fn refused(args: &[&str]) -> String {
        let err = try_parse_args([&["weft-coordinator"], args].concat())
            .expect_err(&format!("{args:?} accepted"));
        assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        err.to_string()
    }

    #[test]
    fn the_dashboard_listens_on_7080_by_default_and_off_turns_it_off() {
        let config = |args: &[&str]| {
            let args = Args::try_parse_from(
                std::iter::once("weft-coordinator").chain(args.iter().copied()),
            )
            .unwrap();
            weft_coordinator::CoordinatorConfig::from(&args).http_listen
        };
        assert_eq!(config(&[]), Some("127.0.0.1:7080".parse().unwrap()));
        assert_eq!(config(&["--http-listen", "off"]), None);
        assert_eq!(
            config(&["--http-listen", "0.0.0.0:0"]),
            Some("0.0.0.0:0".parse().unwrap())
        );
        let err = Args::try_parse_from(["weft-coordinator", "--http-listen", "localhost"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("IP:PORT"), "{err}");
    }

    #[test]
    fn max_node_slots_defaults_to_1024_and_is_documented() {
        let args = Args::try_parse_from(["weft-coordinator"]).unwrap();
        assert_eq!(args.max_node_slots, 1024);
        let args = Args::try_parse_from(["weft-coordinator", "--max-node-slots", "8"]).unwrap();
        assert_eq!(
            weft_coordinator::CoordinatorConfig::from(&args).max_node_slots,
            8
        );
        assert!(Args::try_parse_from(["weft-coordinator", "--max-node-slots", "0"]).is_err());
        let help = Args::command().render_long_help().to_string();
        assert!(
            help.contains("--max-node-slots <N>")
                && help.contains("WEFT_MAX_NODE_SLOTS")
                && help.contains("prefetch")
                && help.contains("twice"),
            "{help}"
        );
    }

    #[test]
    fn the_start_timeout_defaults_to_30s_and_must_leave_nodes_time() {
        let args = Args::try_parse_from(["weft-coordinator"]).unwrap();
        let config = weft_coordinator::CoordinatorConfig::from(&args);
        assert_eq!(config.start_timeout, std::time::Duration::from_secs(30));
        let args = Args::try_parse_from(["weft-coordinator", "--start-timeout", "2m"]).unwrap();
        assert_eq!(args.start_timeout, std::time::Duration::from_secs(120));
        let err = Args::try_parse_from(["weft-coordinator", "--start-timeout", "200ms"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 1s"), "{err}");
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("--start-timeout"), "{help}");
    }

    #[test]
    fn tls_is_the_default_and_insecure_turns_it_off() {
        let args = Args::try_parse_from(["weft-coordinator"]).unwrap();
        let config = weft_coordinator::CoordinatorConfig::from(&args);
        let tls = config.tls.expect("TLS by default");
        assert_eq!(tls.pki_dir, Some(std::path::PathBuf::from("weft-data")));
        assert_eq!(
            tls.cert_lifetime,
            std::time::Duration::from_secs(7 * 24 * 3600)
        );
        let args = Args::try_parse_from([
            "weft-coordinator",
            "--in-memory",
            "--advertise",
            "a.example",
            "--advertise",
            "10.0.0.1",
        ])
        .unwrap();
        let tls = weft_coordinator::CoordinatorConfig::from(&args)
            .tls
            .unwrap();
        assert_eq!(tls.pki_dir, None);
        assert_eq!(tls.advertise, ["a.example", "10.0.0.1"]);
        let args = Args::try_parse_from(["weft-coordinator", "--insecure"]).unwrap();
        let config = weft_coordinator::CoordinatorConfig::from(&args);
        assert!(config.tls.is_none() && config.insecure);
    }

    #[test]
    fn nodes_must_join_by_default_and_node_certificates_live_seven_days() {
        let config = |args: &[&str]| {
            let args = Args::try_parse_from([&["weft-coordinator"], args].concat()).unwrap();
            weft_coordinator::CoordinatorConfig::from(&args)
        };
        let default = config(&[]);
        assert!(default.node_auth());
        assert_eq!(
            default.node_cert_lifetime,
            std::time::Duration::from_secs(7 * 24 * 3600)
        );
        assert!(!config(&["--insecure"]).node_auth());
        assert!(!config(&["--no-auth"]).node_auth());
        assert_eq!(
            config(&["--node-cert-lifetime", "90s"]).node_cert_lifetime,
            std::time::Duration::from_secs(90)
        );
    }

    #[test]
    fn connection_limits_have_defaults_and_refuse_zero() {
        let config = |args: &[&str]| {
            Args::try_parse_from([&["weft-coordinator"], args].concat())
                .map(|args| weft_coordinator::CoordinatorConfig::from(&args))
        };
        let default = config(&[]).unwrap();
        assert_eq!(
            default.handshake_timeout,
            std::time::Duration::from_secs(10)
        );
        assert_eq!(default.max_connections, None);
        assert_eq!(default.max_connections_per_ip, 128);
        assert_eq!(default.max_streams_per_connection, 1024);
        let set = config(&[
            "--handshake-timeout",
            "1s",
            "--max-connections",
            "500",
            "--max-connections-per-ip",
            "20",
            "--max-streams-per-connection",
            "64",
        ])
        .unwrap();
        assert_eq!(
            (
                set.handshake_timeout,
                set.max_connections,
                set.max_connections_per_ip,
                set.max_streams_per_connection
            ),
            (std::time::Duration::from_secs(1), Some(500), 20, 64)
        );
        for zero in [
            "--handshake-timeout",
            "--max-connections",
            "--max-connections-per-ip",
            "--max-streams-per-connection",
        ] {
            assert!(config(&[zero, "0"]).is_err(), "{zero} 0 accepted");
        }
        let help = Args::command().render_long_help().to_string();
        assert!(
            help.contains("ulimit -n") && help.contains("HTTP/2 client preface"),
            "{help}"
        );
    }

    #[test]
    fn the_ca_seal_key_file_goes_with_a_database_and_is_documented() {
        let args = Args::try_parse_from([
            "weft-coordinator",
            "--database-url",
            "postgresql://weft@db/weft",
            "--ca-seal-key-file",
            "/etc/weft/ca-seal.key",
        ])
        .unwrap();
        assert_eq!(
            weft_coordinator::CoordinatorConfig::from(&args).ca_seal_key_file,
            Some(std::path::PathBuf::from("/etc/weft/ca-seal.key"))
        );
        let err = Args::try_parse_from(["weft-coordinator", "--ca-seal-key-file", "k"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--database-url"), "{err}");
        let help = Args::command().render_long_help().to_string();
        assert!(
            help.contains("WEFT_CA_SEAL_KEY_FILE")
                && help.contains("head -c 32 /dev/urandom")
                && help.contains("standbys"),
            "{help}"
        );
    }

    #[test]
    fn exit_codes_are_documented_in_help() {
        let help = Args::command().render_long_help().to_string();
        for code in ["65", "70", "74", "75", "130"] {
            assert!(help.contains(code), "exit status {code} missing: {help}");
        }
        assert!(
            help.contains("disk full") && help.contains("damaged"),
            "{help}"
        );
    }

    #[test]
    fn watch_limits_default_to_256_kib_and_1024_streams_and_are_validated() {
        let config = |args: &[&str]| {
            Args::try_parse_from([&["weft-coordinator"], args].concat())
                .map(|args| weft_coordinator::CoordinatorConfig::from(&args))
        };
        let default = config(&[]).unwrap();
        assert_eq!(
            (default.watch_buffer_bytes, default.max_streams_per_client),
            (256 << 10, 1024)
        );
        let set = config(&[
            "--watch-buffer-bytes",
            "1MiB",
            "--max-streams-per-client",
            "4",
        ])
        .unwrap();
        assert_eq!(
            (set.watch_buffer_bytes, set.max_streams_per_client),
            (1 << 20, 4)
        );
        assert!(config(&["--watch-buffer-bytes", "1KiB"]).is_err());
        assert!(config(&["--watch-buffer-bytes", "2GiB"]).is_err());
        assert!(config(&["--max-streams-per-client", "0"]).is_err());
        let help = Args::command().render_long_help().to_string();
        assert!(
            help.contains("--watch-buffer-bytes <BYTES>")
                && help.contains("--max-streams-per-client <N>")
                && help.contains("RESOURCE_EXHAUSTED"),
            "{help}"
        );
    }

    #[test]
    fn sizes_parse_with_binary_units_and_bad_ones_are_refused() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert_eq!(super::parse_message_size("16MiB"), Ok(16 << 20));
        assert!(super::parse_message_size("1KiB").is_err());
        assert!(super::parse_message_size("65MiB").is_err());
    }

    #[test]
    fn a_zero_heartbeat_interval_or_a_timeout_under_twice_it_is_refused() {
        let err = refused(&["--heartbeat-interval", "0s"]);
        assert!(err.contains("--heartbeat-interval"), "{err}");
        for (interval, timeout) in [("1s", "1s"), ("5s", "5s"), ("3s", "5s"), ("1s", "1999ms")] {
            let err = refused(&[
                "--heartbeat-interval",
                interval,
                "--heartbeat-timeout",
                timeout,
            ]);
            assert!(
                err.contains("--heartbeat-timeout")
                    && err.contains("--heartbeat-interval")
                    && err.contains("twice"),
                "{interval} {timeout}: {err}"
            );
        }
        let err = refused(&["--heartbeat-interval", "10s"]);
        assert!(
            err.contains("at least 20s"),
            "against the default timeout: {err}"
        );
        // What the test harness and the fault labs run with.
        for (interval, timeout) in [("100ms", "3000ms"), ("250ms", "2s"), ("1s", "2s")] {
            try_parse_args([
                "weft-coordinator",
                "--heartbeat-interval",
                interval,
                "--heartbeat-timeout",
                timeout,
            ])
            .unwrap_or_else(|err| panic!("{interval} {timeout}: {err}"));
        }
    }

    #[test]
    fn the_listen_address_is_checked_before_anything_else() {
        for bad in [
            "localhost",
            "127.0.0.1",
            "127.0.0.1:70000",
            "",
            "http://0.0.0.0:7070",
        ] {
            let err = refused(&["--listen", bad]);
            assert!(err.contains("IP:PORT"), "{bad}: {err}");
        }
        let args = try_parse_args(["weft-coordinator", "--listen", "[::1]:0"]).unwrap();
        assert_eq!(args.listen.to_string(), "[::1]:0");
        let args = try_parse_args(["weft-coordinator", "--listen", "localhost:7070"]).unwrap();
        assert!(args.listen.ip().is_loopback() && args.listen.port() == 7070);
    }

    #[test]
    fn advertised_names_are_bare_dns_names_or_ip_addresses() {
        for bad in [
            "weft.example:7070",
            "10.0.0.1:7070",
            "https://weft.example",
            "",
            " ",
            "wéft.example",
            "[::1]:7070",
            "a b",
        ] {
            let err = refused(&["--in-memory", "--advertise", bad]);
            assert!(
                err.contains("expected a DNS name or IP address, without port or scheme"),
                "{bad:?}: {err}"
            );
        }
        let args = try_parse_args([
            "weft-coordinator",
            "--advertise",
            "weft.example",
            "--advertise",
            "10.0.0.1",
            "--advertise",
            "::1",
            "--advertise",
            "[fd00::5]",
            "--advertise",
            "node_7.lan",
        ])
        .unwrap();
        assert_eq!(
            args.advertise,
            ["weft.example", "10.0.0.1", "::1", "[fd00::5]", "node_7.lan"]
        );
    }

    #[test]
    fn flags_another_flag_makes_moot_are_refused_naming_both() {
        for (line, flags) in [
            (
                &["--in-memory", "--data-dir", "d"][..],
                ["--in-memory", "--data-dir"],
            ),
            (
                &["--no-auth", "--admin-token-file", "t"],
                ["--no-auth", "--admin-token-file"],
            ),
            (
                &["--no-auth", "--node-cert-lifetime", "1h"],
                ["--no-auth", "--node-cert-lifetime"],
            ),
            (
                &["--insecure", "--pki-dir", "p"],
                ["--insecure", "--pki-dir"],
            ),
            (
                &["--insecure", "--advertise", "a.example"],
                ["--insecure", "--advertise"],
            ),
            (
                &["--insecure", "--node-cert-lifetime", "1h"],
                ["--insecure", "--node-cert-lifetime"],
            ),
            (
                &["--insecure", "--cert-lifetime", "1h"],
                ["--insecure", "--cert-lifetime"],
            ),
            (
                &[
                    "--insecure",
                    "--database-url",
                    "postgresql://db/weft",
                    "--ca-seal-key-file",
                    "k",
                ],
                ["--insecure", "--ca-seal-key-file"],
            ),
            (
                &["--in-memory", "--database-url", "postgresql://db/weft"],
                ["--in-memory", "--database-url"],
            ),
        ] {
            let err = refused(line);
            assert!(
                err.contains(flags[0]) && err.contains(flags[1]),
                "{line:?}: {err}"
            );
        }
        // What the harness, the fault labs and the bench pass.
        for line in [
            &["--in-memory", "--pki-dir", "p", "--admin-token-file", "t"][..],
            &["--insecure", "--in-memory", "--admin-token-file", "t"],
            &["--data-dir", "d", "--insecure", "--no-auth"],
            &[
                "--data-dir",
                "d",
                "--database-url",
                "postgresql://db/weft",
                "--advertise",
                "w",
            ],
        ] {
            try_parse_args([&["weft-coordinator"], line].concat())
                .unwrap_or_else(|err| panic!("{line:?}: {err}"));
        }
    }

    #[test]
    fn a_retry_backoff_above_its_max_is_refused_naming_both() {
        let err = refused(&["--retry-backoff", "20s"]);
        assert!(
            err.contains("--retry-backoff 20s") && err.contains("--retry-backoff-max 10s"),
            "{err}"
        );
        let err = refused(&["--retry-backoff-max", "50ms"]);
        assert!(err.contains("--retry-backoff-max 50ms"), "{err}");
        let args =
            try_parse_args(["weft-coordinator", "--retry-backoff", "10s"]).expect("equal is fine");
        assert_eq!(args.retry_backoff, args.retry_backoff_max);
    }

    #[test]
    fn a_node_certificate_lifetime_under_a_second_is_refused() {
        for short in ["0s", "999ms"] {
            let err = refused(&["--node-cert-lifetime", short]);
            assert!(err.contains("at least 1s"), "{short}: {err}");
        }
        let args = try_parse_args(["weft-coordinator", "--node-cert-lifetime", "3s"]).unwrap();
        assert_eq!(args.node_cert_lifetime, std::time::Duration::from_secs(3));
    }
}
