//! The `weft-node` binary: parse flags, set up tracing, start the node,
//! drain on SIGTERM/SIGINT. Nothing else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use weft_node::{HandlerRegistry, NodeConfig};
use weft_proto::tls::Trust;
use weft_proto::{CoordinatorAddr, ExecPolicy, JoinToken};

/// jemalloc, not the system's malloc: a queue frees its tasks in another
/// order than it made them (priorities, fair keys), and jemalloc's size
/// classes keep that about as cheap as first in, first out (BENCHMARKS.md,
/// "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runs Weft tasks: connects to a coordinator, offers slots, and runs the
/// child processes and handlers it is assigned, streaming their output back.
/// Reconnects with backoff when the coordinator goes away; running tasks
/// carry on for up to --lease, then are stopped (the coordinator will have
/// given them to another node). Results sent just before a coordinator
/// crash are sent again after reconnecting. A small reaper process (this
/// executable) kills the node's exec tasks if the node is killed outright.
///
/// A new node joins a cluster with a join token (--join, from `weft token
/// create --role node`) and keeps its identity (private key, certificate,
/// the cluster CA) in --state-dir; restarted, it needs no token. A node the
/// coordinator refuses for good (revoked, or not joined) stops its tasks
/// and exits 1 saying what to do.
///
/// SIGTERM or SIGINT drains the node: it takes no new work, lets running
/// tasks finish within --drain-grace, cancels and reports the rest, then
/// exits 0. A second signal exits at once (child processes are killed).
#[derive(Debug, Parser)]
#[command(name = "weft-node", version)]
struct Args {
    /// Coordinator address: HOST:PORT or http(s)://HOST:PORT (no scheme
    /// means https://; http:// reaches a coordinator started with
    /// --insecure). Several (repeat the flag, or separate them with
    /// commas, also in $WEFT_COORDINATOR) for coordinators that take over
    /// from each other: the node dials them in order, moves to the next at
    /// once when a session ends or a dial fails, and backs off only after
    /// all of them failed; its running tasks carry on across the move. All
    /// are trusted by the same CA. Given, they replace the address the
    /// node joined through and the --join token's (list that one too to
    /// keep it); a node joining keeps the list in --state-dir. A node the
    /// coordinator refuses for good (e.g. more --slots than its
    /// --max-node-slots) exits 1 with the reason. [default: the addresses
    /// the node joined through (kept in --state-dir), else the --join
    /// token's, else https://127.0.0.1:7070]
    #[arg(
        long,
        env = "WEFT_COORDINATOR",
        value_name = "ADDRESS",
        value_delimiter = ',',
        value_parser = parse_coordinator
    )]
    coordinator: Vec<String>,

    /// Join the cluster with this join token (`weft token create --role
    /// node` prints one): the node checks the coordinator against the CA
    /// pin in the token, makes its own private key, and gets its
    /// certificate, kept in --state-dir. Needed once: a node whose
    /// --state-dir holds its identity ignores it. Unreachable coordinators
    /// are retried; a token that is wrong, expired, revoked or used up, or
    /// a name another node holds, exits 1 saying so. The value is never
    /// logged.
    #[arg(
        long = "join",
        env = "WEFT_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    join: Option<Secret>,

    /// Where the node keeps its identity: its private key (never sent
    /// anywhere; keep this dir private), its certificate, the cluster CA
    /// and node.conf (its node id, name and coordinator). Made 0700 on
    /// join, files 0600. One node per dir: to run a second node on this
    /// machine, or to join again under another name, use another dir.
    #[arg(
        long,
        env = "WEFT_NODE_STATE_DIR",
        value_name = "DIR",
        default_value = weft_node::config::DEFAULT_STATE_DIR
    )]
    state_dir: PathBuf,

    /// Slots offered: how many task slots may run at once [default: number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    slots: Option<u32>,

    /// Extra tasks the node holds queued beyond its slots, so the next task
    /// is already here when a slot frees; 0 disables; higher raises
    /// throughput of short tasks at the cost of balance for long ones.
    /// Counted in slots; never more than --slots run at once. This is a
    /// ceiling: the node holds only what covers ~10 ms of refill at the
    /// average task run time it sees (about one per slot for tasks of
    /// 10 ms and more) [default: 256 per slot, at least 1024].
    #[arg(long, env = "WEFT_NODE_PREFETCH", value_name = "N")]
    prefetch: Option<u32>,

    /// Node name shown by `weft nodes`: 1 to 128 letters, digits, '.', '-'
    /// or '_', unique in the cluster. A node that joined keeps the name it
    /// joined with (another one is refused at start: join again with a new
    /// --state-dir to take another name) [default: the name in
    /// --state-dir, else the host name].
    #[arg(long)]
    name: Option<String>,

    /// A label tasks can require, as key=value. Repeatable; a key given
    /// twice with two values is refused.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,

    /// A numeric resource this node offers beyond slots, as name=amount
    /// (`cpu=8`, `gpu=2`, `mem=32GiB`; k/M/G/T and KiB/MiB/GiB/TiB
    /// suffixes). Repeatable (a name given twice with two amounts is
    /// refused); custom names allowed (a-z 0-9 _ . -). Tasks that ask for
    /// resources are placed only where that much is free.
    #[arg(long = "resource", value_name = "NAME=AMOUNT", value_parser = parse_resource)]
    resources: Vec<(String, u64)>,

    /// On SIGTERM/SIGINT or a coordinator drain: how long running tasks may
    /// take before they are cancelled (e.g. 500ms, 30s, 1m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_grace: Duration,

    /// How long running attempts may continue while the coordinator is
    /// unreachable; after that they are stopped because the coordinator will
    /// have given them to another node (e.g. 5s). More than 0, and at least
    /// twice the coordinator's heartbeat interval, or the node stops at
    /// registration (exit 1) naming the least that works [default: the
    /// coordinator's heartbeat timeout].
    #[arg(long, value_name = "DURATION", value_parser = parse_lease)]
    lease: Option<Duration>,

    /// Whether this node runs exec tasks (shell commands anyone who may
    /// submit can send): allow runs any program as this node's user, deny
    /// runs none (call tasks only). The coordinator never assigns an exec
    /// task to a node that refuses it [default: allow].
    #[arg(long, env = "WEFT_EXEC", value_enum, conflicts_with = "exec_allow")]
    exec: Option<ExecMode>,

    /// Run only exec tasks of this program: a bare name (matches argv[0]
    /// spelled exactly so, looked up in this node's PATH; a task that sets
    /// PATH is refused) or an absolute path (matches argv[0] spelled exactly
    /// so). Nothing is resolved: `python3` does not allow `/usr/bin/python3`.
    /// Repeatable, or comma-separated. Arguments, env and stdin still come
    /// from the submitter: list only programs that are safe with any.
    #[arg(long, env = "WEFT_EXEC_ALLOW", value_name = "PROGRAM", value_delimiter = ',', value_parser = parse_program)]
    exec_allow: Vec<String>,

    /// Threads for blocking handlers, 1 to 1024 (the runtime's blocking
    /// pool grows to match) [default: number of CPUs].
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..=u64::from(weft_node::config::MAX_BLOCKING_THREADS))
    )]
    blocking_threads: Option<u64>,

    /// The cluster CA's certificate (the coordinator's ca.pem): the node
    /// trusts only a coordinator whose certificate it signed [default:
    /// the ca.pem in --state-dir, for a node that joined].
    #[arg(long, env = "WEFT_CA", value_name = "FILE", conflicts_with = "ca_pin")]
    ca_file: Option<PathBuf>,

    /// The cluster CA's pin (sha256:HEX, which the coordinator logs at
    /// start), instead of --ca-file.
    #[arg(long, env = "WEFT_CA_PIN", value_name = "PIN", value_parser = parse_pin)]
    ca_pin: Option<Trust>,

    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Serve Prometheus metrics (`/metrics`, OpenMetrics text) and
    /// `/healthz` over plaintext HTTP on this address, e.g. 127.0.0.1:9464
    /// (port 0 picks a free one: see --http-addr-file) [default: off].
    /// Nothing there checks a token (the node holds no token database), so
    /// only a loopback address is accepted unless --http-listen-any is
    /// given.
    #[arg(long, env = "WEFT_NODE_HTTP_LISTEN", value_name = "ADDR")]
    http_listen: Option<SocketAddr>,

    /// Allow --http-listen on an address that is not loopback (e.g.
    /// 0.0.0.0:9464, for a Prometheus server on another machine). Anyone
    /// who reaches that port reads the node's metrics (counts and the
    /// version; no task ids, inputs or outputs): keep it behind a firewall.
    #[arg(long, env = "WEFT_NODE_HTTP_LISTEN_ANY", requires = "http_listen")]
    http_listen_any: bool,

    /// Write the address --http-listen bound (`host:port`) to this file
    /// once it listens.
    #[arg(long, value_name = "FILE", requires = "http_listen")]
    http_addr_file: Option<PathBuf>,
}

/// The node's HTTP listener, as the flags ask for it.
#[derive(Debug)]
struct HttpListen {
    addr: SocketAddr,
    addr_file: Option<PathBuf>,
}

impl HttpListen {
    /// `--http-listen` and its rule: loopback unless `--http-listen-any`.
    fn from_args(args: &Args) -> anyhow::Result<Option<HttpListen>> {
        let Some(addr) = args.http_listen else {
            return Ok(None);
        };
        if !addr.ip().is_loopback() && !args.http_listen_any {
            anyhow::bail!(
                "--http-listen {addr} is not a loopback address: the node's /metrics checks no token \
                 (the node holds none), so anyone who reaches it could read it; pass \
                 --http-listen-any to serve it there anyway (behind a firewall), or listen on 127.0.0.1"
            );
        }
        Ok(Some(HttpListen {
            addr,
            addr_file: args.http_addr_file.clone(),
        }))
    }

    /// Binds the listener (before the node starts, so a taken port fails
    /// the start).
    async fn bind(&self) -> anyhow::Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("binding --http-listen {}", self.addr))
    }
}

/// Writes the address next to `path` then renames, so a reader never sees
/// half a line.
fn write_addr_file(path: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, addr.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// A secret flag value (the join token): its `Debug` hides it.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Takes the value as it is: read as a token in `TryFrom`, where a
/// damaged one is refused without echoing it (clap's own errors would).
fn parse_secret(text: &str) -> Result<Secret, String> {
    Ok(Secret(text.to_owned()))
}

/// Whether the node runs exec tasks (`--exec`).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ExecMode {
    /// Any program.
    Allow,
    /// None: call tasks only.
    Deny,
}

/// How log lines look.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl TryFrom<Args> for NodeConfig {
    type Error = anyhow::Error;

    fn try_from(args: Args) -> anyhow::Result<Self> {
        let mut config = NodeConfig::new("");
        config.coordinators = args.coordinator;
        config.trust = args.ca_file.map(Trust::CaFile).or(args.ca_pin);
        config.join_token = args
            .join
            .map(|Secret(text)| JoinToken::parse(&text))
            .transpose()
            .context("--join")?;
        let state = weft_node::identity::StateDir::new(&args.state_dir);
        if let Some(name) = state.stored_name() {
            config.name = name;
        }
        config.state_dir = Some(args.state_dir);
        if let Some(slots) = args.slots {
            config.slots = slots;
        }
        config.prefetch = args
            .prefetch
            .unwrap_or_else(|| weft_node::config::default_prefetch(config.slots));
        if let Some(name) = args.name {
            config.name = name;
        }
        if let Some(threads) = args.blocking_threads {
            // At most MAX_BLOCKING_THREADS: fits.
            config.blocking_threads = usize::try_from(threads).unwrap_or(usize::MAX);
        }
        config.labels = args.labels.into_iter().collect::<BTreeMap<_, _>>();
        config.resources = args.resources.into_iter().collect::<BTreeMap<_, _>>();
        config.drain_grace = args.drain_grace;
        config.lease = args.lease;
        config.reaper = weft_node::reaper::self_as_reaper();
        config.exec = match (args.exec, args.exec_allow.is_empty()) {
            (Some(ExecMode::Deny), _) => ExecPolicy::Deny,
            (_, false) => ExecPolicy::programs(args.exec_allow).context("--exec-allow")?,
            (Some(ExecMode::Allow) | None, true) => ExecPolicy::Allow,
        };
        Ok(config)
    }
}

fn parse_program(text: &str) -> Result<String, String> {
    ExecPolicy::programs([text]).map_err(|err| err.to_string())?;
    Ok(text.to_owned())
}

fn parse_pin(text: &str) -> Result<Trust, String> {
    Trust::pin(text).map_err(|err| err.to_string())
}

fn parse_resource(text: &str) -> Result<(String, u64), String> {
    weft_proto::policy::parse_resource(text).map_err(|e| e.to_string())
}

/// Parses `--lease`: a duration, not zero (leave the flag out for the
/// coordinator's heartbeat timeout).
fn parse_lease(text: &str) -> Result<Duration, String> {
    let lease = parse_duration(text)?;
    if lease.is_zero() {
        return Err(
            "must be more than 0 (e.g. 5s); leave --lease out to use the coordinator's heartbeat timeout"
                .to_owned(),
        );
    }
    Ok(lease)
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("expected KEY=VALUE (e.g. gpu=1), got {text:?}")),
    }
}

/// The address as a URL with its scheme, or the error that names the
/// forms that work (a usage error: exit 2).
fn parse_coordinator(text: &str) -> Result<String, String> {
    CoordinatorAddr::parse(text)
        .map(|address| address.url())
        .map_err(|err| err.to_string())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    weft_proto::convert::parse_duration(text).map_err(|err| err.to_string())
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

/// Parses `argv` as [`Args`], then refuses what clap cannot say by
/// itself: a `--label` key or `--resource` name given twice with two
/// values (which one would the node offer?). A usage error (exit 2).
fn check_usage<I, T>(argv: I) -> Result<Args, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut command = Args::command();
    let matches = command.try_get_matches_from_mut(argv)?;
    let args = Args::from_arg_matches(&matches).map_err(|err| err.format(&mut command))?;
    // The values as given (a resource's `32GiB`, not its bytes), in the
    // order of the parsed ones.
    let given = |id: &str| -> Vec<String> {
        matches
            .get_raw(id)
            .into_iter()
            .flatten()
            .map(|text| text.to_string_lossy().trim().to_owned())
            .collect()
    };
    let labels = args.labels.iter().map(|(k, v)| (k.as_str(), v));
    let resources = args.resources.iter().map(|(k, v)| (k.as_str(), v));
    let twice = given_twice("--label", "label", labels.zip(given("labels")))
        .or_else(|| given_twice("--resource", "resource", resources.zip(given("resources"))));
    match twice {
        Some(message) => Err(command.error(ErrorKind::ArgumentConflict, message)),
        None => Ok(args),
    }
}

/// The first key given twice with two values, as the message that names
/// both; the same pair twice is harmless.
fn given_twice<'a, V: PartialEq + 'a>(
    flag: &str,
    what: &str,
    values: impl Iterator<Item = ((&'a str, &'a V), String)>,
) -> Option<String> {
    let mut seen: BTreeMap<&str, (&V, String)> = BTreeMap::new();
    for ((key, value), text) in values {
        match seen.get(key) {
            Some((first, first_text)) if *first != value => {
                return Some(format!(
                    "{flag} {first_text} and {flag} {text}: a node offers one value per {what}; give it once"
                ));
            }
            Some(_) => {}
            None => {
                seen.insert(key, (value, text));
            }
        }
    }
    None
}

/// The node's runtime, its blocking pool sized for `blocking_threads`
/// blocking handler calls at once beside its other blocking work.
fn runtime(blocking_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(weft_node::config::runtime_blocking_threads(
            blocking_threads,
        ))
        .build()
}

fn main() -> ExitCode {
    // The node's reaper is this same executable (see weft_node::reaper).
    if let Some(code) = weft_node::reaper::run_if_reaper() {
        return code;
    }
    let args = check_usage(std::env::args_os()).unwrap_or_else(|err| err.exit());
    init_tracing(args.log_format);
    let blocking_threads = args
        .blocking_threads
        .map_or_else(weft_node::config::cpu_count, |threads| {
            usize::try_from(threads).unwrap_or(usize::MAX)
        });
    let runtime = match runtime(blocking_threads) {
        Ok(runtime) => runtime,
        Err(err) => {
            error!("starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let http = HttpListen::from_args(&args)?;
    let http_listener = match &http {
        Some(http) => Some(http.bind().await?),
        None => None,
    };
    let config = NodeConfig::try_from(args)?;
    let grace = config.drain_grace;
    let coordinators = match config.coordinators_text().as_str() {
        "" => "(from the state dir or the join token)".to_owned(),
        given => given.to_owned(),
    };
    info!(
        coordinators,
        state_dir = ?config.state_dir,
        joining = config.join_token.is_some(),
        node_name = %config.name,
        slots = config.slots,
        exec = ?config.exec,
        "starting"
    );
    let mut node = weft_node::start(config, HandlerRegistry::with_builtins());
    if let (Some(http), Some(listener)) = (http, http_listener) {
        let addr = node.serve_http(listener).context("serving --http-listen")?;
        info!(%addr, "serving /metrics and /healthz (plaintext, no token check)");
        if let Some(path) = &http.addr_file {
            write_addr_file(path, addr)?;
        }
    }

    tokio::select! {
        result = node.wait() => {
            return Ok(match result {
                Ok(()) => {
                    info!("node stopped (drained by the coordinator)");
                    ExitCode::SUCCESS
                }
                // The node logged why it stopped.
                Err(_) => ExitCode::FAILURE,
            });
        }
        _ = sigterm.recv() => info!("SIGTERM: draining"),
        _ = sigint.recv() => info!("SIGINT: draining"),
    }
    let drain = node.drain(grace);
    tokio::select! {
        result = drain => {
            result.context("draining the node")?;
            info!("drained; exiting");
            Ok(ExitCode::SUCCESS)
        }
        // Dropping the drain future drops the node, which kills its children.
        _ = sigterm.recv() => {
            error!("second signal: exiting now");
            Ok(ExitCode::from(130))
        }
        _ = sigint.recv() => {
            error!("second signal: exiting now");
            Ok(ExitCode::from(130))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn flags_parse_into_the_config() {
        let args = Args::try_parse_from([
            "weft-node",
            "--coordinator",
            "http://c:1",
            "--slots",
            "3",
            "--name",
            "n1",
            "--label",
            "gpu=1",
            "--label",
            "zone=a",
            "--drain-grace",
            "500ms",
            "--lease",
            "2s",
            "--prefetch",
            "7",
        ])
        .unwrap();
        let config = NodeConfig::try_from(args).unwrap();
        assert_eq!(config.reaper, None, "a test binary cannot be a reaper");
        assert_eq!(
            (
                config.coordinators_text().as_str(),
                config.slots,
                config.name.as_str()
            ),
            ("http://c:1", 3, "n1")
        );
        assert_eq!(config.labels.get("gpu").map(String::as_str), Some("1"));
        assert_eq!(config.drain_grace, Duration::from_millis(500));
        assert_eq!(config.lease, Some(Duration::from_secs(2)));
        assert_eq!(config.prefetch, 7);
        let three =
            NodeConfig::try_from(Args::try_parse_from(["weft-node", "--slots", "3"]).unwrap())
                .unwrap();
        assert_eq!(three.prefetch, weft_node::config::default_prefetch(3));
        let defaults = NodeConfig::try_from(Args::try_parse_from(["weft-node"]).unwrap()).unwrap();
        assert_eq!(defaults.lease, None, "the coordinator's heartbeat timeout");
        assert_eq!(defaults.exec, ExecPolicy::Allow, "today's behaviour");
    }

    #[test]
    fn exec_flags_choose_the_policy_and_refuse_contradictions() {
        let config = |argv: &[&str]| {
            let args = Args::try_parse_from(["weft-node"].iter().chain(argv))?;
            Ok::<_, anyhow::Error>(NodeConfig::try_from(args)?.exec)
        };
        assert_eq!(config(&["--exec", "deny"]).unwrap(), ExecPolicy::Deny);
        assert_eq!(config(&["--exec", "allow"]).unwrap(), ExecPolicy::Allow);
        assert_eq!(
            config(&["--exec-allow", "echo", "--exec-allow", "/bin/true,cat"]).unwrap(),
            ExecPolicy::programs(["echo", "/bin/true", "cat"]).unwrap()
        );
        assert!(config(&["--exec", "deny", "--exec-allow", "echo"]).is_err());
        let relative = config(&["--exec-allow", "./run.sh"]).unwrap_err();
        assert!(relative.to_string().contains("absolute path"), "{relative}");
    }

    #[test]
    fn a_coordinator_without_a_scheme_is_taken_and_garbage_is_a_usage_error() {
        let bare = Args::try_parse_from(["weft-node", "--coordinator", "127.0.0.1:7171"]).unwrap();
        assert_eq!(
            NodeConfig::try_from(bare).unwrap().coordinators,
            ["https://127.0.0.1:7171"]
        );
        let v6 = Args::try_parse_from(["weft-node", "--coordinator", "[::1]:7171"]).unwrap();
        assert_eq!(v6.coordinator, ["https://[::1]:7171"]);
        let err = Args::try_parse_from(["weft-node", "--coordinator", "x"]).unwrap_err();
        assert!(
            err.to_string().contains(
                "invalid coordinator address 'x': expected HOST:PORT or http(s)://HOST:PORT"
            ),
            "{err}"
        );
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn several_coordinators_come_repeated_or_comma_separated_in_order_each_checked() {
        let line = [
            "weft-node",
            "--coordinator",
            "a:1,http://b:2",
            "--coordinator",
            "c:3",
        ];
        let config = NodeConfig::try_from(Args::try_parse_from(line).unwrap()).unwrap();
        assert_eq!(
            config.coordinators,
            ["https://a:1", "http://b:2", "https://c:3"]
        );
        for bad in ["a:1,x", "a:1,,b:2"] {
            let err = Args::try_parse_from(["weft-node", "--coordinator", bad]).unwrap_err();
            assert!(
                err.to_string().contains("expected HOST:PORT"),
                "{bad}: {err}"
            );
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn the_ca_comes_from_a_file_or_a_pin_and_a_bad_pin_is_a_usage_error() {
        let file = Args::try_parse_from(["weft-node", "--ca-file", "/x/ca.pem"]).unwrap();
        assert_eq!(
            NodeConfig::try_from(file).unwrap().trust,
            Some(Trust::CaFile("/x/ca.pem".into()))
        );
        let pin = format!("sha256:{}", "ab".repeat(32));
        let pinned = Args::try_parse_from(["weft-node", "--ca-pin", &pin]).unwrap();
        assert_eq!(
            NodeConfig::try_from(pinned).unwrap().trust,
            Some(Trust::pin(&pin).unwrap())
        );
        let err = Args::try_parse_from(["weft-node", "--ca-pin", "sha256:xyz"]).unwrap_err();
        assert!(err.to_string().contains("expected sha256:"), "{err}");
        assert_eq!(err.exit_code(), 2);
        let both = Args::try_parse_from(["weft-node", "--ca-file", "f", "--ca-pin", &pin]);
        assert!(both.is_err());
    }

    fn join_token() -> JoinToken {
        JoinToken {
            address: "10.0.0.5:7070".into(),
            ca_pin: format!("sha256:{}", "ab".repeat(32)),
            credential: format!("0123456789abcdef_{}", "s".repeat(43)),
        }
    }

    #[test]
    fn a_join_token_reaches_the_config_and_is_never_shown() {
        let text = join_token().encode();
        let args = Args::try_parse_from(["weft-node", "--join", &text]).unwrap();
        assert!(!format!("{args:?}").contains(&text));
        let config = NodeConfig::try_from(args).unwrap();
        assert_eq!(config.join_token, Some(join_token()));
        assert!(
            config.coordinators.is_empty(),
            "the token's, resolved at start"
        );
        assert!(!format!("{config:?}").contains("sssss"), "{config:?}");
        assert_eq!(
            config.state_dir.as_deref(),
            Some(std::path::Path::new("weft-node-state"))
        );

        let damaged = format!("{}x", &text[..text.len() - 10]);
        let args = Args::try_parse_from(["weft-node", "--join", &damaged]).unwrap();
        let err = format!("{:#}", NodeConfig::try_from(args).unwrap_err());
        assert!(err.contains("--join") && err.contains("damaged"), "{err}");
        assert!(!err.contains(&damaged[10..]), "{err}");
        let client = Args::try_parse_from(["weft-node", "--join", "weft_0123"]).unwrap();
        let err = format!("{:#}", NodeConfig::try_from(client).unwrap_err());
        assert!(err.contains("weft token create --role node"), "{err}");
    }

    #[test]
    fn a_node_that_joined_takes_its_name_from_the_state_dir_unless_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_str().unwrap();
        let id = weft_proto::NodeId::new();
        std::fs::write(
            tmp.path().join("node.conf"),
            format!("node_id={id}\nname=joined-1\ncoordinator=c:1\n"),
        )
        .unwrap();
        let args = Args::try_parse_from(["weft-node", "--state-dir", dir]).unwrap();
        let config = NodeConfig::try_from(args).unwrap();
        assert_eq!(config.name, "joined-1");
        assert_eq!(config.state_dir.as_deref(), Some(tmp.path()));
        let named =
            Args::try_parse_from(["weft-node", "--state-dir", dir, "--name", "other"]).unwrap();
        // Refused when the node starts (see resolve.rs), not here.
        assert_eq!(NodeConfig::try_from(named).unwrap().name, "other");
    }

    #[test]
    fn help_says_where_the_private_key_lives_and_hides_the_token() {
        let help = Args::command().render_long_help().to_string();
        assert!(
            help.contains("--join <TOKEN>")
                && help.contains("WEFT_JOIN_TOKEN")
                && help.contains("--state-dir <DIR>")
                && help.contains("private key")
                && help.contains("[default: weft-node-state]"),
            "{help}"
        );
    }

    #[test]
    fn resources_parse_with_size_suffixes_and_bad_ones_are_refused() {
        let args = Args::try_parse_from([
            "weft-node",
            "--resource",
            "gpu=2",
            "--resource",
            "mem=32GiB",
        ])
        .unwrap();
        assert_eq!(
            args.resources,
            [("gpu".into(), 2), ("mem".into(), 32 << 30)]
        );
        let err = Args::try_parse_from(["weft-node", "--resource", "gpu"]).unwrap_err();
        assert!(err.to_string().contains("name=amount"), "{err}");
    }

    #[test]
    fn a_label_without_equals_is_a_clear_usage_error() {
        let err = Args::try_parse_from(["weft-node", "--label", "gpu"]).unwrap_err();
        assert!(err.to_string().contains("expected KEY=VALUE"), "{err}");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn help_explains_defaults_and_sigterm() {
        Args::command().debug_assert();
        let help = Args::command().render_long_help().to_string();
        assert!(
            help.contains("SIGTERM") && help.contains("https://127.0.0.1:7070"),
            "{help}"
        );
        assert!(
            help.contains("--lease <DURATION>")
                && help.contains("coordinator is unreachable")
                && help.contains("given them to another node"),
            "{help}"
        );
        assert!(
            help.contains("--prefetch <N>") && help.contains("0 disables"),
            "{help}"
        );
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn a_zero_lease_is_a_usage_error() {
        for zero in ["0s", "0ms"] {
            let err = Args::try_parse_from(["weft-node", "--lease", zero]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{err}");
            assert!(err.to_string().contains("more than 0"), "{err}");
        }
        let args = Args::try_parse_from(["weft-node", "--lease", "2s"]).unwrap();
        assert_eq!(args.lease, Some(Duration::from_secs(2)));
    }

    #[test]
    fn blocking_threads_past_the_documented_most_are_a_usage_error_not_a_panic() {
        for huge in ["1025", "4294967296", "18446744073709551615"] {
            let err = Args::try_parse_from(["weft-node", "--blocking-threads", huge]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{huge}: {err}");
            assert!(err.to_string().contains("1..=1024"), "{huge}: {err}");
        }
        let args = Args::try_parse_from(["weft-node", "--blocking-threads", "1024"]).unwrap();
        assert_eq!(NodeConfig::try_from(args).unwrap().blocking_threads, 1024);
    }

    #[test]
    fn the_runtime_runs_as_many_blocking_handler_calls_at_once_as_asked_past_tokios_512() {
        use std::sync::{Arc, Condvar, Mutex};

        let threads = 600;
        let runtime = super::runtime(threads).expect("runtime");
        // Every call holds its thread until all of them run at once.
        let gate = Arc::new((Mutex::new((0usize, false)), Condvar::new()));
        for _ in 0..threads {
            let gate = gate.clone();
            runtime.spawn_blocking(move || {
                let (lock, ready) = &*gate;
                let mut state = lock.lock().unwrap();
                state.0 += 1;
                ready.notify_all();
                while !state.1 {
                    state = ready.wait(state).unwrap();
                }
            });
        }
        let (lock, ready) = &*gate;
        let (mut state, _) = ready
            .wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(30), |s| {
                s.0 < threads
            })
            .unwrap();
        let running = state.0;
        state.1 = true;
        ready.notify_all();
        drop(state);
        runtime.shutdown_timeout(Duration::from_secs(10));
        assert_eq!(running, threads, "blocking calls running at once");
    }

    #[test]
    fn a_label_or_resource_given_twice_with_two_values_is_a_usage_error_naming_it() {
        let err = check_usage(["weft-node", "--label", "zone=a", "--label", "zone=b"]).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(
            err.to_string()
                .contains("--label zone=a and --label zone=b"),
            "{err}"
        );
        let err =
            check_usage(["weft-node", "--resource", "gpu=2", "--resource", "gpu=4"]).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        assert!(
            err.to_string()
                .contains("--resource gpu=2 and --resource gpu=4"),
            "{err}"
        );
        // The same pair twice says nothing new: taken.
        let args = check_usage(["weft-node", "--label", "zone=a", "--label", "zone=a"]).unwrap();
        assert_eq!(
            NodeConfig::try_from(args).unwrap().labels,
            BTreeMap::from([("zone".to_owned(), "a".to_owned())])
        );
    }
}

#[cfg(test)]
mod http_flag_tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn http_listen_is_off_by_default_and_loopback_only_unless_any() {
        let off = Args::try_parse_from(["weft-node"]).unwrap();
        assert!(HttpListen::from_args(&off).unwrap().is_none());

        let local = Args::try_parse_from(["weft-node", "--http-listen", "127.0.0.1:0"]).unwrap();
        let http = HttpListen::from_args(&local).unwrap().unwrap();
        assert_eq!(http.addr, SocketAddr::from(([127, 0, 0, 1], 0)));

        let wide = Args::try_parse_from(["weft-node", "--http-listen", "0.0.0.0:9464"]).unwrap();
        let err = HttpListen::from_args(&wide).unwrap_err().to_string();
        assert!(
            err.contains("not a loopback address") && err.contains("--http-listen-any"),
            "{err}"
        );

        let any = Args::try_parse_from([
            "weft-node",
            "--http-listen",
            "0.0.0.0:9464",
            "--http-listen-any",
        ])
        .unwrap();
        assert!(HttpListen::from_args(&any).unwrap().is_some());
    }

    #[test]
    fn http_flags_are_checked_and_explained() {
        let bad = Args::try_parse_from(["weft-node", "--http-listen", "localhost"]).unwrap_err();
        assert_eq!(bad.exit_code(), 2);
        let alone = Args::try_parse_from(["weft-node", "--http-listen-any"]).unwrap_err();
        assert_eq!(
            alone.exit_code(),
            2,
            "--http-listen-any needs --http-listen"
        );
        let help = Args::command().render_long_help().to_string();
        assert!(
            help.contains("--http-listen <ADDR>")
                && help.contains("WEFT_NODE_HTTP_LISTEN")
                && help.contains("checks a token")
                && help.contains("--http-addr-file <FILE>"),
            "{help}"
        );
    }
}
