//! The steps that start processes of their own: (e) startup, the scale
//! step (a million queued tasks, no node) and the many-nodes step (a
//! thousand simulated idle nodes); and the waits they share with the run.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

use weft_client::Client;
use weft_cluster::{procfs, wait_nodes_ready};

use crate::cluster::{Cluster, ClusterPlan};
use crate::report::{ManyNodes, Scale};
use crate::{swarm, workload};

/// How long nodes (real or simulated) may take to register.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the simulated nodes' join token is valid.
const JOIN_TTL: Duration = Duration::from_secs(10 * 60);

/// Connections the many-nodes step's client side needs beside one per
/// simulated node (the bench's client, the swarm's joining channel).
const CLIENT_CONNECTIONS: usize = 16;

/// Uses of the swarm's join token: one per simulated node.
fn join_uses(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// (e): `runs` cold launches, each timed from just before spawning the
/// coordinator to the first noop result at the client. The last cluster
/// (and its client) is kept.
pub async fn startup(
    plan: &ClusterPlan,
    runs: usize,
) -> anyhow::Result<(Vec<f64>, Cluster, Client)> {
    let mut times = Vec::new();
    for i in 0..runs.max(1) {
        let t0 = Instant::now();
        let mut cluster = Cluster::start(plan).await?;
        let client = cluster.client().await?;
        let first = workload::noop_round_trip(&client, 7).await;
        let took = t0.elapsed();
        if let Err(err) = first {
            cluster.check_alive()?;
            return Err(err);
        }
        times.push(took.as_secs_f64());
        if i + 1 == runs.max(1) {
            return Ok((times, cluster, client));
        }
        drop(client);
        cluster.stop().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    unreachable!("the loop returns on its last iteration")
}

/// The scale step: a coordinator with no node; `n` noops submitted in
/// `submit_many` chunks; resident memory before and after.
pub async fn scale(base: &ClusterPlan, n: usize) -> anyhow::Result<Scale> {
    let plan = ClusterPlan {
        nodes: 0,
        ..base.clone()
    };
    let mut cluster = Cluster::start(&plan).await?;
    let client = cluster.client().await?;
    let pid = cluster
        .coordinator
        .pid()
        .context("the coordinator exited")?;
    // One small submit first, so lazily built state is in the baseline.
    client.submit_many(vec![workload::noop(0)]).await?;
    let rss_before = procfs::rss_bytes(pid);
    let cpu_before = procfs::cpu_seconds(pid);
    let submit_s = queue_noops(&mut cluster, &client, n).await?;
    let cpu_after = procfs::cpu_seconds(pid);
    let rss_after = procfs::rss_bytes(pid);
    let info = client.cluster_info().await?;
    let queued = info.count(weft_proto::TaskState::Queued);
    drop(client);
    cluster.stop().await;
    Ok(Scale {
        tasks: n,
        queued_seen: queued,
        submit_s,
        rss_before,
        rss_after,
        coordinator_cpu_s: cpu_after.zip(cpu_before).map(|(a, b)| a - b),
    })
}

/// Submits `n` noops in `submit_many` chunks of 10,000 (a cluster with no
/// node queues them all); answers the seconds it took. A failed submit
/// says how many went in, and the coordinator's log tail if it died.
pub(crate) async fn queue_noops(
    cluster: &mut Cluster,
    client: &Client,
    n: usize,
) -> anyhow::Result<f64> {
    const CHUNK: usize = 10_000;
    let t0 = Instant::now();
    let mut submitted = 0;
    while submitted < n {
        let count = CHUNK.min(n - submitted);
        let specs = (submitted..submitted + count).map(workload::noop).collect();
        if let Err(err) = client.submit_many(specs).await {
            cluster.check_alive()?;
            return Err(err).with_context(|| format!("after {submitted} tasks"));
        }
        submitted += count;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Descriptors a process of the many-nodes step needs beside one per
/// simulated node: the coordinator keeps `--max-connections` 128 below its
/// limit, plus its store, logs and listeners.
const FILES_BESIDES_NODES: usize = 256;

/// Raises this process's soft limit of open files to at least `need`
/// (children inherit it), up to the hard limit; an error naming `ulimit -n`
/// when the hard limit is lower.
fn open_files_for(need: usize) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let need = need as u64;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading the open-file limit")?;
    if soft >= need {
        return Ok(());
    }
    ensure!(
        hard >= need,
        "the many-nodes step needs {need} open files per process and the hard limit is {hard}: \
         raise it (ulimit -Hn) or pass fewer --sim-nodes"
    );
    setrlimit(Resource::RLIMIT_NOFILE, need, hard).context("raising the open-file limit")
}

/// The many-nodes step: `n` simulated nodes registered and heartbeating;
/// coordinator memory and CPU over an idle `window`.
pub async fn many_nodes(
    base: &ClusterPlan,
    n: usize,
    window: Duration,
) -> anyhow::Result<ManyNodes> {
    let mut plan = ClusterPlan {
        nodes: 0,
        ..base.clone()
    };
    // A descriptor per simulated node here and in the coordinator (which
    // starts with this process's limit and sizes `--max-connections` by it).
    open_files_for(n + CLIENT_CONNECTIONS + FILES_BESIDES_NODES)?;
    // With TLS every simulated node has a connection of its own (its
    // certificate is the connection's), all from 127.0.0.1.
    plan.coordinator_args.extend([
        "--max-connections-per-ip".to_owned(),
        (n + CLIENT_CONNECTIONS).to_string(),
    ]);
    let cluster = Cluster::start(&plan).await?;
    let client = cluster.client().await?;
    let pid = cluster
        .coordinator
        .pid()
        .context("the coordinator exited")?;
    // A coordinator with TLS authenticates nodes: they join first (not
    // timed; joining is not what an idle node costs).
    let join = match &cluster.trust {
        Some(_) => Some(
            client
                .create_join_token("weft bench swarm", Some(JOIN_TTL), join_uses(n), "")
                .await
                .context("creating a join token for the simulated nodes")?
                .0,
        ),
        None => None,
    };
    let rss_before = procfs::rss_bytes(pid);
    let t0 = Instant::now();
    let mut swarm =
        swarm::Swarm::connect(&cluster.url, n, cluster.trust.as_ref(), join.as_deref()).await?;
    wait_nodes_ready(&client, n, READY_TIMEOUT).await?;
    let connect_s = t0.elapsed().as_secs_f64();
    let rss_idle_start = procfs::rss_bytes(pid);
    let cpu0 = procfs::cpu_seconds(pid);
    let w0 = Instant::now();
    tokio::time::sleep(window).await; // a measurement window, not a wait for state
    let cpu1 = procfs::cpu_seconds(pid);
    let elapsed = w0.elapsed().as_secs_f64();
    let rss_idle = procfs::rss_bytes(pid);
    let connected_after = client.nodes().await?.len();
    let alive = swarm.alive();
    drop(swarm);
    drop(client);
    cluster.stop().await;
    Ok(ManyNodes {
        nodes: n,
        connect_s,
        rss_before,
        rss_idle_start,
        rss_idle,
        cpu_pct: cpu1.zip(cpu0).map(|(b, a)| 100.0 * (b - a) / elapsed),
        window_s: elapsed,
        connected_after,
        streams_alive: alive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_soft_open_file_limit_below_the_swarm_is_raised_up_to_the_hard_one() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        if hard < 4096 {
            eprintln!("skipped: the hard open-file limit is {hard}");
            return;
        }
        // As under `ulimit -Sn 1024`, where 1,000 simulated nodes did not fit.
        setrlimit(Resource::RLIMIT_NOFILE, 1024, hard).unwrap();
        let raised = open_files_for(1_000 + CLIENT_CONNECTIONS + FILES_BESIDES_NODES);
        let now = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
        raised.unwrap();
        assert_eq!(now, (1_272, hard));
        if let Some(over) = usize::try_from(hard).ok().and_then(|h| h.checked_add(1)) {
            let err = open_files_for(over).unwrap_err();
            assert!(err.to_string().contains("ulimit -Hn"), "{err}");
        }
    }

    /// The bench's default cluster: TLS, admin token, durable store.
    fn tls_plan() -> ClusterPlan {
        ClusterPlan {
            nodes: 2,
            slots: 1,
            log_filter: "warn".to_owned(),
            durable: true,
            insecure: false,
            node_args: Vec::new(),
            coordinator_args: Vec::new(),
            database_url: None,
        }
    }

    #[tokio::test]
    async fn many_nodes_registers_every_simulated_node_with_tls_and_auth() {
        Cluster::check_binaries().expect("run `cargo build --bins` first");
        let nodes = 5;
        let m = many_nodes(&tls_plan(), nodes, Duration::from_millis(50))
            .await
            .expect("the many-nodes step");
        assert_eq!((m.connected_after, m.streams_alive), (nodes, nodes));
    }

    #[tokio::test]
    async fn many_nodes_registers_every_simulated_node_in_plaintext() {
        Cluster::check_binaries().expect("run `cargo build --bins` first");
        let plan = ClusterPlan {
            insecure: true,
            ..tls_plan()
        };
        let m = many_nodes(&plan, 3, Duration::from_millis(50))
            .await
            .expect("the many-nodes step");
        assert_eq!((m.connected_after, m.streams_alive), (3, 3));
    }
}
