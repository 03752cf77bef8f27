//! The `weft-node` binary: parse flags, set up tracing, start the node,
//! drain on SIGTERM/SIGINT. Nothing else.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use weft_node::{HandlerRegistry, NodeConfig};
use weft_proto::tls::Trust;
use weft_proto::{CoordinatorAddr, ExecPolicy};

/// Runs Weft tasks: connects to a coordinator, offers slots, and runs the
/// child processes and handlers it is assigned, streaming their output back.
/// Reconnects with backoff when the coordinator goes away; running tasks
/// carry on for up to --lease, then are stopped (the coordinator will have
/// given them to another node). Results sent just before a coordinator
/// crash are sent again after reconnecting. A small reaper process (this
/// executable) kills the node's exec tasks if the node is killed outright.
///
/// SIGTERM or SIGINT drains the node: it takes no new work, lets running
/// tasks finish within --drain-grace, cancels and reports the rest, then
/// exits 0. A second signal exits at once (child processes are killed).
#[derive(Debug, Parser)]
#[command(name = "weft-node", version)]
struct Args {
    /// Coordinator address: HOST:PORT or http(s)://HOST:PORT (no scheme
    /// means https://; http:// reaches a coordinator started with
    /// --insecure). A node the coordinator refuses for good (e.g. more
    /// --slots than its --max-node-slots) exits 1 with the reason.
    #[arg(
        long,
        env = "WEFT_COORDINATOR",
        default_value = "https://127.0.0.1:7070",
        value_name = "ADDRESS",
        value_parser = parse_coordinator
    )]
    coordinator: String,

    /// Slots offered: how many task slots may run at once [default: number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    slots: Option<u32>,

    /// Extra tasks the node holds queued beyond its slots, so the next task
    /// is already here when a slot frees; 0 disables; higher raises
    /// throughput of short tasks at the cost of balance for long ones.
    /// Counted in slots; never more than --slots run at once. This is a
    /// ceiling: the node holds only what covers ~10 ms of refill at the
    /// average task run time it sees (about one per slot for tasks of
    /// 10 ms and more) [default: 256 per slot].
    #[arg(long, env = "WEFT_NODE_PREFETCH", value_name = "N")]
    prefetch: Option<u32>,

    /// Node name shown by `weft nodes` [default: the host name].
    #[arg(long)]
    name: Option<String>,

    /// A label tasks can require, as key=value. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,

    /// On SIGTERM/SIGINT or a coordinator drain: how long running tasks may
    /// take before they are cancelled (e.g. 500ms, 30s, 1m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_grace: Duration,

    /// How long running attempts may continue while the coordinator is
    /// unreachable; after that they are stopped because the coordinator will
    /// have given them to another node (e.g. 5s) [default: the coordinator's
    /// heartbeat timeout].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
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

    /// Threads for blocking handlers [default: number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    blocking_threads: Option<u64>,

    /// The cluster CA's certificate (the coordinator's ca.pem): the node
    /// trusts only a coordinator whose certificate it signed.
    #[arg(long, env = "WEFT_CA", value_name = "FILE", conflicts_with = "ca_pin")]
    ca_file: Option<PathBuf>,

    /// The cluster CA's pin (sha256:HEX, which the coordinator logs at
    /// start), instead of --ca-file.
    #[arg(long, env = "WEFT_CA_PIN", value_name = "PIN", value_parser = parse_pin)]
    ca_pin: Option<Trust>,

    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
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
        let mut config = NodeConfig::new(args.coordinator);
        config.trust = args.ca_file.map(Trust::CaFile).or(args.ca_pin);
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
            config.blocking_threads = usize::try_from(threads).unwrap_or(usize::MAX);
        }
        config.labels = args.labels.into_iter().collect::<BTreeMap<_, _>>();
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // The node's reaper is this same executable (see weft_node::reaper).
    if let Some(code) = weft_node::reaper::run_if_reaper() {
        return code;
    }
    let args = Args::parse();
    init_tracing(args.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
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
    let config = NodeConfig::try_from(args)?;
    let grace = config.drain_grace;
    info!(coordinator = %config.coordinator, node_name = %config.name, slots = config.slots, exec = ?config.exec, "starting");
    let mut node = weft_node::start(config, HandlerRegistry::with_builtins());

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
                config.coordinator.as_str(),
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
            NodeConfig::try_from(bare).unwrap().coordinator,
            "https://127.0.0.1:7171"
        );
        let v6 = Args::try_parse_from(["weft-node", "--coordinator", "[::1]:7171"]).unwrap();
        assert_eq!(v6.coordinator, "https://[::1]:7171");
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
