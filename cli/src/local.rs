//! `weft local`: a coordinator and N nodes in this process, until Ctrl-C,
//! on `weft_cluster`'s [`LocalCluster`]; [`start`] is also what `weft demo`
//! runs its workload on. Both wait for the nodes with
//! [`weft_cluster::wait_nodes_ready`].
//!
//! The stop signals (Ctrl-C, SIGTERM, SIGHUP) are listened for before the
//! cluster starts: one during start-up stops it there (exit 1), so the temp dirs
//! (admin token, node identities, the CA's key) are removed, never left
//! behind by the signal's default action.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use weft_client::Client;
use weft_cluster::{LocalCluster, wait_nodes_ready};
use weft_coordinator::CoordinatorConfig;
use weft_coordinator::tls::TlsConfig;

use crate::bench::{note, stop_signal};
use crate::exit::{self, UsageError};
use crate::output::OutputFormat;

/// How long nodes may take to register before `local` warns and `demo` fails.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the local nodes' join token is valid (they join at once).
const JOIN_TTL: Duration = Duration::from_secs(10 * 60);

/// How long running tasks get to finish when the cluster stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The dashboard's port, on the coordinator's host, when it is free.
const DASHBOARD_PORT: u16 = 7080;

/// Where the dashboard listens: port [`DASHBOARD_PORT`] on `ip`, or a free
/// port there when that one is taken (another cluster on this host).
fn dashboard_listen(ip: std::net::IpAddr) -> SocketAddr {
    let wanted = SocketAddr::new(ip, DASHBOARD_PORT);
    match std::net::TcpListener::bind(wanted) {
        Ok(_) => wanted,
        Err(_) => SocketAddr::new(ip, 0),
    }
}

/// Starts a coordinator on `listener` and `nodes` nodes named `local-1`,
/// `local-2`, ... with `slots` slots each (default: CPUs) and the built-in
/// handlers, all in this process.
///
/// The admin token goes to `token_dir/admin.token` (0600); the caller
/// keeps the dir and reads the token with [`LocalCluster::admin_token`].
/// The nodes join with a join token, as on a real network, and keep their
/// identities in `token_dir/local-N`.
pub async fn start(
    listener: TcpListener,
    nodes: usize,
    slots: Option<u32>,
    token_dir: &std::path::Path,
) -> anyhow::Result<LocalCluster> {
    let defaults = CoordinatorConfig::default();
    // Nodes and coordinator are both this command's: a node asked for
    // more slots than the default limit raises the limit, not a refusal.
    let config = CoordinatorConfig {
        max_node_slots: defaults.max_node_slots.max(slots.unwrap_or(0)),
        // The same TLS path as a real cluster, with a CA that lives as
        // long as this process (in a private temp dir).
        tls: Some(TlsConfig::default()),
        admin_token_file: Some(token_dir.join(weft_coordinator::auth::ADMIN_TOKEN_FILE)),
        // The dashboard, on the coordinator's host.
        http_listen: Some(dashboard_listen(listener.local_addr()?.ip())),
        ..defaults
    };
    let mut cluster = LocalCluster::start(config, listener).await?;
    // The nodes join as on a real network: one join token for all of
    // them, each node its own key and certificate (kept in `token_dir`).
    let client = Client::connect_secure(
        &cluster.url(),
        cluster.trust().as_ref(),
        cluster.admin_token().as_deref(),
    )
    .await?;
    let uses = u32::try_from(nodes).unwrap_or(u32::MAX);
    let (token, _) = client
        .create_join_token("weft local", Some(JOIN_TTL), uses, "")
        .await
        .context("creating a join token for the local nodes")?;
    let token = weft_proto::JoinToken::parse(&token)?;
    for i in 1..=nodes {
        let mut config = cluster.node_config();
        config.name = format!("local-{i}");
        config.coordinators.clear();
        config.trust = None;
        config.join_token = Some(token.clone());
        config.state_dir = Some(token_dir.join(format!("local-{i}")));
        if let Some(slots) = slots {
            config.slots = slots;
        }
        config.reconnect_min = Duration::from_millis(50);
        cluster.add_node(config);
    }
    Ok(cluster)
}

/// Binds `listen`; if the address is taken, a free port on the same host,
/// with a note on stderr.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(listen).await {
        Ok(listener) => Ok(listener),
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && listen.port() != 0 => {
            let listener = TcpListener::bind(SocketAddr::new(listen.ip(), 0))
                .await
                .with_context(|| format!("binding a free port on {}", listen.ip()))?;
            eprintln!(
                "weft: note: {listen} is in use; listening on {} instead",
                listener.local_addr()?
            );
            Ok(listener)
        }
        Err(err) => Err(err).with_context(|| format!("binding {listen}")),
    }
}

/// `weft local [--nodes N] [--slots S] [--listen ADDR]`. With `--output
/// json`, what another program needs to use the cluster is one JSON object
/// on one line of stdout instead of the `export` lines.
pub async fn run(
    listen: SocketAddr,
    nodes: usize,
    slots: Option<u32>,
    format: OutputFormat,
) -> anyhow::Result<u8> {
    check_slots(slots)?;
    // Listening from here on: a signal during start-up stops it.
    let stop = stop_signal();
    tokio::pin!(stop);
    // Polled once now, so the handlers are installed before anything a
    // signal must not leave behind exists (a signal so early ends it).
    if let std::task::Poll::Ready(signal) = futures::poll!(stop.as_mut()) {
        anyhow::bail!("stopped by {signal}");
    }
    let listener = bind(listen).await?;
    // Private (0700), removed when `weft local` exits.
    let token_dir = tempfile::Builder::new()
        .prefix("weft-local-")
        .tempdir()
        .context("creating a dir for the admin token")?;
    let starting = async {
        let cluster = start(listener, nodes, slots, token_dir.path()).await?;
        let token = cluster.admin_token();
        let client =
            Client::connect_secure(&cluster.url(), cluster.trust().as_ref(), token.as_deref())
                .await?;
        if let Err(err) = wait_nodes_ready(&client, cluster.node_count(), READY_TIMEOUT).await {
            eprintln!("weft: warning: {:#}", anyhow::Error::new(err));
        }
        anyhow::Ok(cluster)
    };
    let cluster = tokio::select! {
        cluster = starting => cluster?,
        signal = &mut stop => {
            // The half-started cluster was dropped (and so stopped) with
            // `starting`; `token_dir` goes on return.
            note(format_args!("weft local: {signal} during start-up; stopped"));
            return Ok(exit::FAILURE);
        }
    };
    let url = cluster.url();
    let token = cluster.admin_token();
    match format {
        OutputFormat::Text => print_exports(&cluster, &url, nodes, slots, token.as_deref()),
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({
                "coordinator": url,
                "dashboard": cluster.http_url().map(|u| format!("{u}/")),
                "ca_file": cluster.ca_file().map(|f| f.display().to_string()),
                "token": token,
                "nodes": nodes,
                "slots_per_node": slots,
            })
        ),
    }
    // Seen at once by a reader of a pipe.
    std::io::Write::flush(&mut std::io::stdout())?;
    stop.await;
    note(format_args!(
        "weft local: shutting down (Ctrl-C again to exit at once)"
    ));
    tokio::select! {
        () = cluster.shutdown(SHUTDOWN_GRACE) => {}
        // Dropping the shutdown drops the cluster: every node's handle
        // kills what still runs (handlers see their cancel token), so the
        // runtime is not kept waiting by a blocking handler.
        _ = stop_signal() => note(format_args!("weft local: exiting at once")),
    }
    Ok(exit::SUCCESS)
}

/// `--slots 0` is refused: a node has at least one slot.
pub(crate) fn check_slots(slots: Option<u32>) -> Result<(), UsageError> {
    match slots {
        Some(0) => Err(UsageError("--slots must be at least 1".to_owned())),
        _ => Ok(()),
    }
}

/// The text form: a line for a person, then `export` lines for another terminal.
fn print_exports(
    cluster: &LocalCluster,
    url: &str,
    nodes: usize,
    slots: Option<u32>,
    token: Option<&str>,
) {
    let slots_text = match slots {
        Some(s) => format!("{s} slots"),
        None => "one slot per CPU".to_owned(),
    };
    println!(
        "weft local: coordinator at {url}, {nodes} nodes with {slots_text} each (Ctrl-C to stop)"
    );
    if let Some(dashboard) = cluster.http_url() {
        println!(
            "weft local: dashboard at {dashboard}/ (log in with the WEFT_TOKEN below; the browser must trust the CA file WEFT_CA)"
        );
    }
    match cluster.ca_file() {
        Some(ca_file) => println!(
            "export WEFT_COORDINATOR={url} WEFT_CA={}",
            ca_file.display()
        ),
        None => println!("export WEFT_COORDINATOR={url}"),
    }
    if let Some(token) = token {
        // The admin token of this throwaway cluster, for another terminal.
        println!("export WEFT_TOKEN={token}");
        if cluster.ca_file().is_some() {
            println!(
                "# more nodes: weft-node --join \"$(weft token create --role node)\" --state-dir DIR"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_slots_is_refused() {
        assert!(check_slots(Some(0)).is_err());
        assert!(check_slots(Some(1)).is_ok());
        assert!(check_slots(None).is_ok());
    }
}
