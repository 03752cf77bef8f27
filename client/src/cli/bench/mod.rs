//! `weft bench`: the workload protocol of `shared/peers` (v1) run against
//! Weft, plus two Weft-only steps (one million queued tasks, a thousand
//! idle nodes), each figure printed beside what plain gRPC costs on the
//! same machine in the same run (the floor).
//!
//! By default it starts its own cluster as real processes on loopback: one
//! `weft-coordinator` (store under a temp dir) and two `weft-node --slots 1`,
//! found next to the `weft` executable or in `WEFT_BIN_DIR`; the client is
//! this process. With `--coordinator URL` it benches that cluster instead
//! (the steps that need their own processes are skipped).
//!
//! Layout:
//! - [`stats`]: nearest-rank percentiles, medians, latency summaries.
//! - [`procs`]: binaries, child processes, `/proc` readings, the machine.
//! - [`floor`]: the raw tonic measurement (fake services in-process).
//! - [`workload`]: throughput, latency, sleep and burn steps over a `Client`.
//! - [`swarm`]: many simulated nodes from one process.
//! - [`report`]: the results, the table, `--output json`, results.jsonl lines.

pub mod floor;
pub mod procs;
pub mod report;
pub mod stats;
pub mod swarm;
pub mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::ValueEnum;

use weft_proto::NodeState;

use crate::Client;
use crate::cli::exit;
use crate::cli::opts::parse_duration_arg;
use crate::cli::output::OutputFormat;

use self::procs::{Cluster, ClusterPlan, Machine};
use self::report::{Burn, ManyNodes, Parallel, Report, Scale, Startup, StepError, Throughput};
use self::stats::median;

/// The steps of `weft bench`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Raw tonic: unary and streaming round trips, messages over one stream.
    Floor,
    /// (e) launching coordinator and nodes to the first result, median of 3.
    Startup,
    /// (a) 20,000 noop tasks submitted and awaited, median of 3.
    Throughput,
    /// (b) 2,000 sequential noop round trips.
    Latency,
    /// (c) 200 × sleep 50ms on 2 slots (ideal 5.0 s).
    Sleep,
    /// (d) 40 × spin 100ms on 2 slots (ideal 2.0 s).
    Burn,
    /// 1,000,000 tasks queued with no node: memory per task, submit rate.
    Scale,
    /// 1,000 simulated idle nodes: coordinator memory and CPU.
    ManyNodes,
}

impl Step {
    /// Every step, in the order they run.
    pub const ALL: [Step; 8] = [
        Step::Floor,
        Step::Startup,
        Step::Throughput,
        Step::Latency,
        Step::Sleep,
        Step::Burn,
        Step::Scale,
        Step::ManyNodes,
    ];

    /// Whether the step needs processes of its own (not possible against
    /// `--coordinator`).
    fn needs_own_processes(self) -> bool {
        matches!(self, Step::Startup | Step::Scale | Step::ManyNodes)
    }

    /// Whether the step runs on the two-node cluster.
    fn needs_cluster(self) -> bool {
        matches!(
            self,
            Step::Throughput | Step::Latency | Step::Sleep | Step::Burn
        )
    }

    /// The step's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Step::Floor => "floor",
            Step::Startup => "startup",
            Step::Throughput => "throughput",
            Step::Latency => "latency",
            Step::Sleep => "sleep",
            Step::Burn => "burn",
            Step::Scale => "scale",
            Step::ManyNodes => "many-nodes",
        }
    }
}

/// Flags of `weft bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Scale every count down for a smoke test (numbers are not comparable).
    #[arg(long)]
    pub quick: bool,
    /// Run only these steps (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "STEP,...")]
    pub only: Vec<Step>,
    /// Tasks queued in the scale step [default: 1000000; 20000 with --quick].
    #[arg(long, value_name = "N")]
    pub scale_tasks: Option<usize>,
    /// Simulated nodes in the many-nodes step [default: 1000; 100 with --quick].
    #[arg(long, value_name = "N")]
    pub sim_nodes: Option<usize>,
    /// Idle window over which the many-nodes step measures coordinator CPU.
    #[arg(long, value_parser = parse_duration_arg, value_name = "DURATION")]
    pub idle_window: Option<Duration>,
    /// `WaitMany` streams (one per submitted chunk of 2,000) open at once
    /// while waiting for results.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub wait_concurrency: usize,
    /// Append the protocol figures to this results.jsonl (peers kit format,
    /// `"peer": "fabric"`).
    #[arg(long, value_name = "PATH")]
    pub results_jsonl: Option<PathBuf>,
    /// `run_id` of the results.jsonl lines [default: the start time, UTC, like 20261125T151207Z].
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,
    /// RUST_LOG of the coordinator and nodes the bench starts (their logs go
    /// to files in a temp dir).
    #[arg(long, default_value = "warn", value_name = "FILTER")]
    pub child_log: String,
    /// Start coordinators without `--data-dir` (in-memory store), to see
    /// what durability costs. Not the protocol's configuration.
    #[arg(long)]
    pub memory_store: bool,
}

/// The counts of one run: the protocol's, or scaled down by `--quick`.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// (e) cluster launches.
    pub startup_runs: usize,
    /// Untimed noop tasks before (a).
    pub warmup: usize,
    /// (a) tasks per run.
    pub throughput_n: usize,
    /// (a) runs.
    pub throughput_runs: usize,
    /// (b) untimed round trips.
    pub latency_warmup: usize,
    /// (b) timed round trips.
    pub latency_n: usize,
    /// (c) sleep tasks.
    pub sleep_n: usize,
    /// (d) burn tasks.
    pub burn_n: usize,
    /// (c), (d) runs.
    pub par_runs: usize,
    /// Scale step: tasks queued.
    pub scale_tasks: usize,
    /// Many-nodes step: simulated nodes.
    pub sim_nodes: usize,
    /// Many-nodes step: idle window.
    pub idle_window: Duration,
    /// The floor's counts.
    pub floor: floor::FloorPlan,
}

impl Plan {
    /// The protocol's counts, or the `--quick` ones, with overrides applied.
    pub fn from_args(args: &BenchArgs) -> Plan {
        let mut plan = if args.quick {
            Plan {
                startup_runs: 1,
                warmup: 200,
                throughput_n: 2_000,
                throughput_runs: 1,
                latency_warmup: 20,
                latency_n: 200,
                sleep_n: 20,
                burn_n: 4,
                par_runs: 1,
                scale_tasks: 20_000,
                sim_nodes: 100,
                idle_window: Duration::from_secs(3),
                floor: floor::FloorPlan {
                    round_trips: 200,
                    unary_calls: 2_000,
                    concurrency: 64,
                    stream_messages: 20_000,
                    submit_batch: 5_000,
                    submit_calls: 2,
                },
            }
        } else {
            Plan {
                startup_runs: 3,
                warmup: 200,
                throughput_n: 20_000,
                throughput_runs: 3,
                latency_warmup: 100,
                latency_n: 2_000,
                sleep_n: 200,
                burn_n: 40,
                par_runs: 3,
                scale_tasks: 1_000_000,
                sim_nodes: 1_000,
                idle_window: Duration::from_secs(10),
                floor: floor::FloorPlan {
                    round_trips: 2_000,
                    unary_calls: 20_000,
                    concurrency: 64,
                    stream_messages: 200_000,
                    submit_batch: 5_000,
                    submit_calls: 20,
                },
            }
        };
        if let Some(n) = args.scale_tasks {
            plan.scale_tasks = n;
        }
        if let Some(n) = args.sim_nodes {
            plan.sim_nodes = n;
        }
        if let Some(window) = args.idle_window {
            plan.idle_window = window;
        }
        plan
    }
}

/// Slots per node and nodes in the protocol's cluster.
const NODES: usize = 2;
const SLOTS: u32 = 1;

/// How long nodes (real or simulated) may take to register.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `weft bench`. `external` is the `--coordinator` URL when the user gave one.
pub async fn run(
    args: BenchArgs,
    external: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<u8> {
    let bench = bench(&args, external);
    let report = tokio::select! {
        report = bench => report?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the cluster was stopped"),
    };
    match format {
        OutputFormat::Text => println!("{}", report.table()),
        OutputFormat::Json => println!("{:#}", report.json()),
    }
    if let Some(path) = &args.results_jsonl {
        report
            .append_jsonl(path)
            .with_context(|| format!("appending to {}", path.display()))?;
        eprintln!("weft bench: appended results to {}", path.display());
    }
    Ok(if report.errors.is_empty() {
        exit::SUCCESS
    } else {
        exit::FAILURE
    })
}

async fn bench(args: &BenchArgs, external: Option<String>) -> anyhow::Result<Report> {
    let plan = Plan::from_args(args);
    let started = SystemTime::now();
    let steps: Vec<Step> = Step::ALL
        .into_iter()
        .filter(|s| args.only.is_empty() || args.only.contains(s))
        .collect();
    let mut report = Report::new(
        Machine::detect(),
        started,
        args.run_id.clone(),
        args.quick,
        external.clone(),
    );
    report.memory_store = args.memory_store;
    let bins = match external {
        Some(_) => None,
        None => Some(procs::bin_dir()?),
    };
    if let Some(bins) = &bins {
        // Fail before measuring anything when the binaries are missing.
        procs::bin_path(bins, "weft-coordinator")?;
        procs::bin_path(bins, "weft-node")?;
    }
    let cluster_plan = ClusterPlan {
        nodes: NODES,
        slots: SLOTS,
        log_filter: args.child_log.clone(),
        durable: !args.memory_store,
    };

    if steps.contains(&Step::Floor) {
        progress("floor: raw tonic round trips and stream");
        match floor::measure(plan.floor).await {
            Ok(f) => report.floor = Some(f),
            Err(err) => report.fail(Step::Floor, &err),
        }
    }

    for step in &steps {
        if external.is_some() && step.needs_own_processes() {
            report.errors.push(StepError {
                step: *step,
                error: "skipped: needs its own processes (not with --coordinator)".to_owned(),
            });
        }
    }

    // The two-node cluster: the last startup's, or one started untimed.
    let mut cluster: Option<Cluster> = None;
    let mut client: Option<Client> = None;
    if let Some(bins) = &bins
        && steps.contains(&Step::Startup)
    {
        progress(&format!("startup: {} cold launches", plan.startup_runs));
        match startup(bins, &cluster_plan, plan.startup_runs).await {
            Ok((runs, kept, kept_client)) => {
                report.startup = Some(Startup { runs });
                cluster = Some(kept);
                client = Some(kept_client);
            }
            Err(err) => report.fail(Step::Startup, &err),
        }
    }
    if steps.iter().any(|s| s.needs_cluster()) && client.is_none() {
        match &external {
            Some(url) => client = Some(Client::connect(url).await?),
            None => {
                let bins = bins.as_deref().context("no binary folder")?;
                let started = Cluster::start(bins, &cluster_plan).await?;
                client = Some(connect_retrying(&started.url).await?);
                cluster = Some(started);
            }
        }
    }
    if let Some(client) = &client
        && steps.iter().any(|s| s.needs_cluster())
    {
        cluster_steps(client, cluster.as_ref(), &steps, &plan, args, &mut report).await?;
    }
    if let Some(cluster) = cluster.take() {
        cluster.stop().await;
    }
    drop(client);

    if let Some(bins) = &bins {
        if steps.contains(&Step::Scale) {
            progress(&format!(
                "scale: {} tasks queued on a coordinator with no node",
                plan.scale_tasks
            ));
            match scale(bins, &cluster_plan, plan.scale_tasks).await {
                Ok(s) => report.scale = Some(s),
                Err(err) => report.fail(Step::Scale, &err),
            }
        }
        if steps.contains(&Step::ManyNodes) {
            progress(&format!(
                "many-nodes: {} simulated nodes, {:?} idle window",
                plan.sim_nodes, plan.idle_window
            ));
            match many_nodes(bins, &cluster_plan, plan.sim_nodes, plan.idle_window).await {
                Ok(m) => report.many_nodes = Some(m),
                Err(err) => report.fail(Step::ManyNodes, &err),
            }
        }
    }
    report.finished = Some(SystemTime::now());
    Ok(report)
}

/// Steps (a) to (d) on the two-node cluster.
async fn cluster_steps(
    client: &Client,
    cluster: Option<&Cluster>,
    steps: &[Step],
    plan: &Plan,
    args: &BenchArgs,
    report: &mut Report,
) -> anyhow::Result<()> {
    wait_nodes_ready(client, NODES).await?;
    let info = client.cluster_info().await?;
    if info.slots != NODES as u32 * SLOTS {
        eprintln!(
            "weft bench: warning: the cluster has {} slots; the protocol wants {}",
            info.slots,
            NODES as u32 * SLOTS
        );
    }
    let cluster_cpu = || cluster.and_then(Cluster::cpu_seconds);
    let concurrency = args.wait_concurrency;

    if steps.contains(&Step::Throughput) {
        progress(&format!(
            "throughput: {} × {} noop tasks",
            plan.throughput_runs, plan.throughput_n
        ));
        let result = async {
            let warm = (0..plan.warmup).map(workload::noop).collect();
            let tasks = workload::run_all(client, warm, concurrency).await?;
            workload::check_noop(&tasks, 0..plan.warmup)?;
            workload::throughput(
                client,
                plan.throughput_n,
                plan.throughput_runs,
                concurrency,
                &cluster_cpu,
            )
            .await
        }
        .await;
        match result {
            Ok(runs) => report.throughput = Some(Throughput::new(plan.throughput_n, runs)),
            Err(err) => report.fail(Step::Throughput, &err),
        }
    }
    if steps.contains(&Step::Latency) {
        progress(&format!(
            "latency: {} sequential round trips",
            plan.latency_n
        ));
        match workload::latency(client, plan.latency_warmup, plan.latency_n, &cluster_cpu).await {
            Ok(lat) => report.latency = Some(lat),
            Err(err) => report.fail(Step::Latency, &err),
        }
    }
    if steps.contains(&Step::Sleep) {
        progress(&format!("sleep: {} × sleep 50ms", plan.sleep_n));
        let ideal = plan.sleep_n as f64 * 0.05 / (NODES as f64 * SLOTS as f64);
        match workload::parallel(
            client,
            "sleep",
            "50ms",
            plan.sleep_n,
            plan.par_runs,
            &cluster_cpu,
        )
        .await
        {
            Ok(runs) => {
                report.sleep = Some(Parallel {
                    n: plan.sleep_n,
                    ideal_s: ideal,
                    runs,
                })
            }
            Err(err) => report.fail(Step::Sleep, &err),
        }
    }
    if steps.contains(&Step::Burn) {
        progress(&format!("burn: {} × spin 100ms", plan.burn_n));
        let slots = (NODES as f64) * SLOTS as f64;
        let result = async {
            let t1 = workload::burn_single(client).await?;
            let runs = workload::parallel(
                client,
                "spin",
                "100ms",
                plan.burn_n,
                plan.par_runs,
                &cluster_cpu,
            )
            .await?;
            anyhow::Ok(Burn {
                parallel: Parallel {
                    n: plan.burn_n,
                    ideal_s: plan.burn_n as f64 * 0.1 / slots,
                    runs,
                },
                single_s: t1,
                ideal_measured_s: (plan.burn_n as f64 / slots).ceil() * t1,
            })
        }
        .await;
        match result {
            Ok(burn) => report.burn = Some(burn),
            Err(err) => report.fail(Step::Burn, &err),
        }
    }
    Ok(())
}

/// (e): `runs` cold launches, each timed from just before spawning the
/// coordinator to the first noop result at the client. The last cluster
/// (and its client) is kept.
async fn startup(
    bins: &std::path::Path,
    plan: &ClusterPlan,
    runs: usize,
) -> anyhow::Result<(Vec<f64>, Cluster, Client)> {
    let mut times = Vec::new();
    for i in 0..runs.max(1) {
        let t0 = Instant::now();
        let mut cluster = Cluster::start(bins, plan).await?;
        let client = connect_retrying(&cluster.url).await?;
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
async fn scale(bins: &std::path::Path, base: &ClusterPlan, n: usize) -> anyhow::Result<Scale> {
    const CHUNK: usize = 10_000;
    let plan = ClusterPlan {
        nodes: 0,
        ..base.clone()
    };
    let mut cluster = Cluster::start(bins, &plan).await?;
    let client = connect_retrying(&cluster.url).await?;
    let pid = cluster
        .coordinator
        .pid()
        .context("the coordinator exited")?;
    // One small submit first, so lazily built state is in the baseline.
    client.submit_many(vec![workload::noop(0)]).await?;
    let rss_before = procs::rss_bytes(pid);
    let cpu_before = procs::cpu_seconds(pid);
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
    let submit_s = t0.elapsed().as_secs_f64();
    let cpu_after = procs::cpu_seconds(pid);
    let rss_after = procs::rss_bytes(pid);
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

/// The many-nodes step: `n` simulated nodes registered and heartbeating;
/// coordinator memory and CPU over an idle `window`.
async fn many_nodes(
    bins: &std::path::Path,
    base: &ClusterPlan,
    n: usize,
    window: Duration,
) -> anyhow::Result<ManyNodes> {
    let plan = ClusterPlan {
        nodes: 0,
        ..base.clone()
    };
    let cluster = Cluster::start(bins, &plan).await?;
    let client = connect_retrying(&cluster.url).await?;
    let pid = cluster
        .coordinator
        .pid()
        .context("the coordinator exited")?;
    let rss_before = procs::rss_bytes(pid);
    let t0 = Instant::now();
    let mut swarm = swarm::Swarm::connect(&cluster.url, n).await?;
    wait_nodes_ready(&client, n).await?;
    let connect_s = t0.elapsed().as_secs_f64();
    let rss_idle_start = procs::rss_bytes(pid);
    let cpu0 = procs::cpu_seconds(pid);
    let w0 = Instant::now();
    tokio::time::sleep(window).await; // a measurement window, not a wait for state
    let cpu1 = procs::cpu_seconds(pid);
    let elapsed = w0.elapsed().as_secs_f64();
    let rss_idle = procs::rss_bytes(pid);
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

/// Connects, retrying for up to 30 s (a just-started coordinator).
async fn connect_retrying(url: &str) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(url).await {
            Ok(client) => return Ok(client),
            Err(err) if Instant::now() < deadline && err.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// Polls `ListNodes` until `n` nodes are ready.
async fn wait_nodes_ready(client: &Client, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let nodes = client.nodes().await?;
        let ready = nodes.iter().filter(|n| n.state == NodeState::Ready).count();
        if ready >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("only {ready} of {n} nodes ready within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn progress(what: &str) {
    eprintln!("weft bench: {what}");
}

/// Median of the runs' values (for the report).
pub(crate) fn median_of(values: impl Iterator<Item = f64>) -> Option<f64> {
    median(&values.collect::<Vec<_>>())
}
