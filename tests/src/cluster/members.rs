//! The members of a test cluster, each in-process or as a real process:
//! starting the coordinator (through `weft_cluster`; in process mode it
//! tells its address through `--addr-file`) and a node, and stopping a
//! child. Failures panic with what went wrong and the child's log.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use weft_cluster::Error as ClusterError;
use weft_coordinator::tls::TlsConfig;
use weft_coordinator::{CoordinatorConfig, RunningCoordinator};
use weft_node::{NodeConfig, RunningNode};
use weft_proto::ExecPolicy;

use crate::process::{ChildProcess, Spawn, bin_path};
use crate::wait::default_timeout;

use super::builder::{Labels, TestClusterBuilder};

/// The admin token's file in the cluster's dir: the same one across
/// restarts (a restarted coordinator without its store adopts it), so the
/// harness's clients keep working.
pub(super) const ADMIN_TOKEN_FILE: &str = "admin.token";

/// How often a starting coordinator's address file is read.
const ADDR_POLL: Duration = Duration::from_millis(10);

/// Starts the coordinator (the `generation`-th time) on `listen`, or on a
/// free port, with its HTTP listener on `http_listen` or a free loopback
/// port; answers its handle and bound addresses (gRPC, HTTP).
pub(super) async fn start_coordinator(
    settings: &TestClusterBuilder,
    dir: &Path,
    (listen, http_listen): (Option<SocketAddr>, Option<SocketAddr>),
    generation: usize,
) -> (Coordinator, SocketAddr, Option<SocketAddr>) {
    let listen = listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let http_listen = http_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let data_dir = settings.durable.then(|| dir.join("coordinator-data"));
    // One CA per cluster, kept across coordinator restarts (so clients and
    // nodes keep trusting it).
    let pki_dir = dir.join("pki");
    if !settings.processes {
        crate::init_tracing();
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("binding the coordinator listener on {listen}: {e}"));
        let config = CoordinatorConfig {
            heartbeat_interval: settings.heartbeat,
            heartbeat_timeout: settings.heartbeat_timeout,
            retry_backoff_base: Duration::from_millis(20),
            retry_backoff_max: Duration::from_millis(500),
            data_dir,
            database_url: settings.database_url.clone(),
            tls: (!settings.insecure).then(|| TlsConfig {
                pki_dir: Some(pki_dir.clone()),
                cert_lifetime: settings
                    .cert_lifetime
                    .unwrap_or(weft_coordinator::tls::DEFAULT_CERT_LIFETIME),
                ..TlsConfig::default()
            }),
            insecure: settings.insecure,
            admin_token_file: Some(dir.join(ADMIN_TOKEN_FILE)),
            http_listen: Some(http_listen),
            ..CoordinatorConfig::default()
        };
        let config = CoordinatorConfig {
            max_queued: settings.max_queued.unwrap_or(config.max_queued),
            max_node_slots: settings.max_node_slots.unwrap_or(config.max_node_slots),
            max_message_size: settings.max_message_size.unwrap_or(config.max_message_size),
            start_timeout: settings.start_timeout.unwrap_or(config.start_timeout),
            schedule_timeout: settings.schedule_timeout.unwrap_or(config.schedule_timeout),
            max_streams_per_client: settings
                .max_streams_per_client
                .unwrap_or(config.max_streams_per_client),
            node_cert_lifetime: settings
                .node_cert_lifetime
                .unwrap_or(config.node_cert_lifetime),
            handshake_timeout: settings
                .handshake_timeout
                .unwrap_or(config.handshake_timeout),
            max_connections: settings.max_connections.or(config.max_connections),
            max_connections_per_ip: settings
                .max_connections_per_ip
                .unwrap_or(config.max_connections_per_ip),
            max_streams_per_connection: settings
                .max_streams_per_connection
                .unwrap_or(config.max_streams_per_connection),
            otlp: settings.otlp_endpoint.clone().map(|endpoint| {
                weft_coordinator::trace::OtlpConfig {
                    endpoint,
                    service_name: weft_coordinator::trace::DEFAULT_SERVICE_NAME.to_owned(),
                }
            }),
            ..config
        };
        let running = weft_cluster::start_coordinator(config, listener)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "starting the in-process coordinator: {}",
                    crate::process::source_of(&e)
                )
            });
        let addr = running.addr();
        let http_addr = running.http_addr();
        return (Coordinator::InProcess(Box::new(running)), addr, http_addr);
    }

    // The binary keeps a durable store (default `./weft-data`): each
    // cluster gets its own, so parallel tests never share one. Without
    // `durable()` a fresh one per start.
    let data_dir = data_dir.unwrap_or_else(|| dir.join(format!("coordinator-data-{generation}")));
    let files = CoordinatorFiles {
        name: "coordinator".to_owned(),
        data_dir,
        pki_dir,
    };
    let args = coordinator_args(settings, dir, (listen, http_listen), &files);
    let (addr_file, http_addr_file) = files.addr_files(dir);
    let label = match generation {
        0 => "coordinator".to_owned(),
        n => format!("coordinator-restart-{n}"),
    };
    let mut child = spawn("weft-coordinator", &args, dir, &label, settings);
    let addr =
        weft_cluster::wait_for_addr_file(&mut child, &addr_file, default_timeout(), ADDR_POLL)
            .await;
    // Written just after the gRPC address: there once that one is.
    let http_addr = match addr {
        Ok(_) => weft_cluster::wait_for_addr_file(
            &mut child,
            &http_addr_file,
            default_timeout(),
            ADDR_POLL,
        )
        .await
        .ok(),
        Err(_) => None,
    };
    match addr {
        Ok(addr) => (Coordinator::Process(Box::new(child)), addr, http_addr),
        Err(ClusterError::Exited { status, .. }) => panic!(
            "weft-coordinator exited early ({status})\n--- {} ---\n{}",
            child.log().display(),
            child.log_text()
        ),
        Err(e) => panic!(
            "weft-coordinator wrote no address to {}: {e}\n--- {} ---\n{}",
            addr_file.display(),
            child.log().display(),
            child.log_text()
        ),
    }
}

/// Where a coordinator process keeps its files in the cluster's dir.
pub(super) struct CoordinatorFiles {
    /// Its name: its address files are `<name>.addr` and `<name>.http.addr`.
    pub(super) name: String,
    pub(super) data_dir: std::path::PathBuf,
    pub(super) pki_dir: std::path::PathBuf,
}

impl CoordinatorFiles {
    /// Where it writes its gRPC and HTTP addresses once it listens.
    pub(super) fn addr_files(&self, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        (
            dir.join(format!("{}.addr", self.name)),
            dir.join(format!("{}.http.addr", self.name)),
        )
    }
}

/// The flags of a `weft-coordinator` process of the cluster, listening on
/// `listen` and `http_listen`, with `files` (old address files removed).
pub(super) fn coordinator_args(
    settings: &TestClusterBuilder,
    dir: &Path,
    (listen, http_listen): (SocketAddr, SocketAddr),
    files: &CoordinatorFiles,
) -> Vec<String> {
    let (addr_file, http_addr_file) = files.addr_files(dir);
    let _ = std::fs::remove_file(&addr_file);
    let _ = std::fs::remove_file(&http_addr_file);
    let mut args = vec![
        "--listen".to_owned(),
        listen.to_string(),
        "--addr-file".to_owned(),
        addr_file.display().to_string(),
        "--http-listen".to_owned(),
        http_listen.to_string(),
        "--http-addr-file".to_owned(),
        http_addr_file.display().to_string(),
        "--heartbeat-interval".to_owned(),
        format!("{}ms", settings.heartbeat.as_millis()),
        "--heartbeat-timeout".to_owned(),
        format!("{}ms", settings.heartbeat_timeout.as_millis()),
        "--log-format".to_owned(),
        "text".to_owned(),
        "--admin-token-file".to_owned(),
        dir.join(ADMIN_TOKEN_FILE).display().to_string(),
    ];
    if let Some(n) = settings.max_queued {
        args.push("--max-queued".to_owned());
        args.push(n.to_string());
    }
    if let Some(n) = settings.max_node_slots {
        args.push("--max-node-slots".to_owned());
        args.push(n.to_string());
    }
    if let Some(n) = settings.max_message_size {
        args.push("--max-message-size".to_owned());
        args.push(n.to_string());
    }
    if let Some(timeout) = settings.schedule_timeout {
        args.push("--schedule-timeout".to_owned());
        args.push(format!("{}ms", timeout.as_millis()));
    }
    if let Some(timeout) = settings.start_timeout {
        args.push("--start-timeout".to_owned());
        args.push(format!("{}ms", timeout.as_millis()));
    }
    if let Some(timeout) = settings.handshake_timeout {
        args.push("--handshake-timeout".to_owned());
        args.push(format!("{}ms", timeout.as_millis()));
    }
    if let Some(n) = settings.max_connections {
        args.push("--max-connections".to_owned());
        args.push(n.to_string());
    }
    if let Some(n) = settings.max_connections_per_ip {
        args.push("--max-connections-per-ip".to_owned());
        args.push(n.to_string());
    }
    if let Some(n) = settings.max_streams_per_connection {
        args.push("--max-streams-per-connection".to_owned());
        args.push(n.to_string());
    }
    if let Some(n) = settings.max_streams_per_client {
        args.push("--max-streams-per-client".to_owned());
        args.push(n.to_string());
    }
    if let Some(url) = &settings.otlp_endpoint {
        args.push("--otlp-endpoint".to_owned());
        args.push(url.clone());
    }
    if settings.insecure {
        args.push("--insecure".to_owned());
    } else {
        args.push("--pki-dir".to_owned());
        args.push(files.pki_dir.display().to_string());
        if let Some(lifetime) = settings.cert_lifetime {
            args.push("--cert-lifetime".to_owned());
            args.push(format!("{}ms", lifetime.as_millis()));
        }
        if let Some(lifetime) = settings.node_cert_lifetime {
            args.push("--node-cert-lifetime".to_owned());
            args.push(format!("{}ms", lifetime.as_millis()));
        }
    }
    args.push("--data-dir".to_owned());
    args.push(files.data_dir.display().to_string());
    if let Some(url) = &settings.database_url {
        args.push("--database-url".to_owned());
        args.push(url.clone());
    }
    args
}

/// Starts another `weft-coordinator` process on the cluster's database
/// (`files` its own data and PKI dirs): a standby while the cluster's
/// coordinator holds the database, so it writes no address until it
/// takes over.
pub(super) fn spawn_coordinator(
    settings: &TestClusterBuilder,
    dir: &Path,
    listen: (SocketAddr, SocketAddr),
    files: &CoordinatorFiles,
) -> ChildProcess {
    let args = coordinator_args(settings, dir, listen, files);
    spawn("weft-coordinator", &args, dir, &files.name, settings)
}

// Boxed: the in-process handles and a child process differ a lot in size.
pub(super) enum Coordinator {
    InProcess(Box<RunningCoordinator>),
    Process(Box<ChildProcess>),
}

pub(super) enum Node {
    InProcess(Box<RunningNode>),
    Process(Box<ChildProcess>),
}

/// How a node reaches the coordinator: with TLS (the default) it joins
/// with a join token and keeps its identity in its own state dir (the
/// token names the address and the CA pin); with `--insecure` it dials
/// the plaintext URL.
pub(super) enum Reach<'a> {
    /// `weft-node --join TOKEN --state-dir DIR`.
    Join {
        /// The join token.
        token: &'a str,
        /// The node's own state dir.
        state_dir: &'a Path,
    },
    /// `weft-node --coordinator http://...`.
    Plain(&'a str),
    /// `weft-node --coordinator URL --state-dir DIR`: a node that joined
    /// before, dialing another coordinator with its identity.
    Joined {
        /// The coordinator to dial.
        url: &'a str,
        /// The state dir it joined with.
        state_dir: &'a Path,
    },
}

/// Starts node `name` with `slots`, `labels` and `exec`, joining or
/// dialing as `reach` says: the `weft-node` binary logging into `dir`, or
/// the library in this process.
pub(super) fn start_node(
    settings: &TestClusterBuilder,
    reach: Reach<'_>,
    dir: &Path,
    name: &str,
    slots: u32,
    labels: Labels,
    exec: ExecPolicy,
) -> Node {
    if settings.processes {
        let mut args = match reach {
            Reach::Join { token, state_dir } => vec![
                "--join".to_owned(),
                token.to_owned(),
                "--state-dir".to_owned(),
                state_dir.display().to_string(),
            ],
            Reach::Plain(url) => vec!["--coordinator".to_owned(), url.to_owned()],
            Reach::Joined { url, state_dir } => vec![
                "--coordinator".to_owned(),
                url.to_owned(),
                "--state-dir".to_owned(),
                state_dir.display().to_string(),
            ],
        };
        args.extend([
            "--name".to_owned(),
            name.to_owned(),
            "--slots".to_owned(),
            slots.to_string(),
            "--drain-grace".to_owned(),
            format!("{}ms", settings.drain_grace.as_millis()),
            "--log-format".to_owned(),
            "text".to_owned(),
        ]);
        for (k, v) in &labels {
            args.push("--label".to_owned());
            args.push(format!("{k}={v}"));
        }
        for (k, v) in settings.resources.get(name).into_iter().flatten() {
            args.push("--resource".to_owned());
            args.push(format!("{k}={v}"));
        }
        match &exec {
            ExecPolicy::Allow => {}
            ExecPolicy::Deny => args.extend(["--exec".to_owned(), "deny".to_owned()]),
            ExecPolicy::Programs(programs) => {
                for program in programs {
                    args.extend(["--exec-allow".to_owned(), program.clone()]);
                }
            }
        }
        Node::Process(Box::new(spawn("weft-node", &args, dir, name, settings)))
    } else {
        let mut config = match reach {
            Reach::Join { token, state_dir } => {
                let mut config = NodeConfig::new(String::new());
                config.join_token = Some(
                    weft_proto::JoinToken::parse(token)
                        .unwrap_or_else(|e| panic!("the harness's join token: {e}")),
                );
                config.state_dir = Some(state_dir.to_owned());
                config
            }
            Reach::Plain(url) => NodeConfig::new(url.to_owned()),
            Reach::Joined { url, state_dir } => {
                let mut config = NodeConfig::new(url.to_owned());
                config.state_dir = Some(state_dir.to_owned());
                config
            }
        };
        config.name = name.to_owned();
        config.slots = slots;
        config.labels = labels;
        config.resources = settings.resources.get(name).cloned().unwrap_or_default();
        config.exec = exec;
        config.drain_grace = settings.drain_grace;
        config.reconnect_min = Duration::from_millis(20);
        config.reconnect_max = Duration::from_millis(500);
        config.blocking_threads = 2;
        Node::InProcess(Box::new(weft_cluster::start_node(config)))
    }
}

/// SIGTERM, then SIGKILL after `deadline`: the exit status and whether it
/// stopped by itself in time.
pub(super) async fn terminate(child: ChildProcess, deadline: Duration) -> (ExitStatus, bool) {
    child
        .terminate(deadline)
        .await
        .expect("waiting for a killed child process")
}

/// Starts binary `bin` for the cluster, logging to `<dir>/<label>.log`
/// under the builder's log filter.
fn spawn(
    bin: &str,
    args: &[String],
    dir: &Path,
    label: &str,
    settings: &TestClusterBuilder,
) -> ChildProcess {
    let mut spawn = Spawn::new(bin_path(bin), dir, label).args(args);
    if let Some(n) = settings.descriptor_limit
        && bin == "weft-coordinator"
    {
        // The shell sets the limit and execs the binary ($0) with its
        // flags ($@), so the child's pid is the coordinator's.
        spawn = spawn.wrapper([
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            format!("ulimit -n {n} && exec \"$0\" \"$@\""),
        ]);
    }
    if let Some(filter) = &settings.log_filter {
        spawn = spawn.log_filter(filter);
    }
    spawn
        .spawn()
        .unwrap_or_else(|e| panic!("{e}: {}", crate::process::source_of(&e)))
}
