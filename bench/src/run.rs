//! One `weft bench` run: which steps, on which cluster (the bench's own
//! processes, or `--coordinator`), in which order, each failure recorded
//! in the [`Report`] rather than ending the run (a cluster that cannot
//! start or whose nodes never get ready fails the steps it was for; the
//! figures measured so far are kept). Steps that cannot run against
//! `--coordinator` are recorded as skipped, which is no failure. The
//! steps' own work is in [`crate::own_processes`] and [`crate::workload`].

use std::time::SystemTime;

use anyhow::bail;

use weft_client::Client;
use weft_cluster::wait_nodes_ready;

use crate::args::{BenchArgs, Plan, Step};
use crate::cluster::{Cluster, ClusterPlan};
use crate::machine::Machine;
use crate::own_processes;
use crate::report::{Burn, Parallel, PolicyMix, Report, Startup, Throughput};
use crate::{durable, floor, recovery, workload};

/// Slots per node and nodes in the protocol's cluster.
const NODES: usize = 2;
const SLOTS: u32 = 1;

/// Runs the steps `args` asks for and answers what they measured; a step
/// that fails is recorded in the report (the run goes on). `external` is
/// the `--coordinator` URL when the user gave one. Fails before measuring
/// anything when the flags cannot make a run ([`BenchArgs::refusal`]) or
/// the binaries are missing.
pub async fn run(
    args: &BenchArgs,
    external: Option<String>,
    token: Option<String>,
) -> anyhow::Result<Report> {
    if let Some(why) = args.refusal() {
        bail!(why);
    }
    let plan = Plan::from_args(args);
    let started = SystemTime::now();
    let steps = args.steps();
    let mut report = Report::new(
        Machine::detect(),
        started,
        args.run_id.clone(),
        args.quick,
        external.clone(),
    );
    report.memory_store = args.memory_store;
    report.database = args.database_url.as_deref().map(redact_password);
    // Without --coordinator the bench starts processes of its own.
    let own = external.is_none();
    if own {
        // Fail before measuring anything when the binaries are missing.
        Cluster::check_binaries()?;
    }
    let cluster_plan = cluster_plan(args, &steps);
    // The steps that start clusters of their own never share a database.
    let own_plan = cluster_plan.without_database();

    if steps.contains(&Step::Floor) {
        progress("floor: raw tonic round trips and stream");
        match floor::measure(plan.floor).await {
            Ok(f) => report.floor = Some(f),
            Err(err) => report.fail(Step::Floor, &err),
        }
    }

    for step in &steps {
        if external.is_some() && step.needs_own_processes() {
            report.skip(*step, "needs its own processes (not with --coordinator)");
        }
    }

    // The two-node cluster: the last startup's, or one started untimed.
    let mut cluster: Option<Cluster> = None;
    let mut client: Option<Client> = None;
    if own && steps.contains(&Step::Startup) {
        progress(&format!("startup: {} cold launches", plan.startup_runs));
        match own_processes::startup(&cluster_plan, plan.startup_runs).await {
            Ok((runs, kept, kept_client)) => {
                report.startup = Some(Startup { runs });
                cluster = Some(kept);
                client = Some(kept_client);
            }
            Err(err) => report.fail(Step::Startup, &err),
        }
    }
    let cluster_steps_wanted: Vec<Step> = steps
        .iter()
        .copied()
        .filter(|s| s.needs_cluster())
        .collect();
    if !cluster_steps_wanted.is_empty() && client.is_none() {
        let connected = match &external {
            Some(url) => Client::connect_secure(url, args.trust.as_ref(), token.as_deref())
                .await
                .map_err(anyhow::Error::from),
            None => match Cluster::start(&cluster_plan).await {
                Ok(started) => {
                    let connected = started.client().await;
                    cluster = Some(started);
                    connected
                }
                Err(err) => Err(err),
            },
        };
        match connected {
            Ok(connected) => client = Some(connected),
            Err(err) => fail_all(&mut report, &cluster_steps_wanted, &err),
        }
    }
    if let Some(client) = &client
        && !cluster_steps_wanted.is_empty()
    {
        cluster_steps(client, cluster.as_ref(), &steps, &plan, args, &mut report).await;
    }
    if let Some(cluster) = cluster.take() {
        cluster.stop().await;
    }
    drop(client);

    if own {
        if steps.contains(&Step::Scale) {
            progress(&format!(
                "scale: {} tasks queued on a coordinator with no node",
                plan.scale_tasks
            ));
            match own_processes::scale(&own_plan, plan.scale_tasks).await {
                Ok(s) => report.scale = Some(s),
                Err(err) => report.fail(Step::Scale, &err),
            }
        }
        if steps.contains(&Step::ManyNodes) {
            progress(&format!(
                "many-nodes: {} simulated nodes, {:?} idle window",
                plan.sim_nodes, plan.idle_window
            ));
            match own_processes::many_nodes(&own_plan, plan.sim_nodes, plan.idle_window).await {
                Ok(m) => report.many_nodes = Some(m),
                Err(err) => report.fail(Step::ManyNodes, &err),
            }
        }
    }
    if own {
        if steps.contains(&Step::Dag) {
            progress(&format!(
                "dag: {} levels × ({} + join) tasks in one Submit",
                plan.dag_levels, plan.dag_width
            ));
            match crate::policy::dag(&own_plan, plan.dag_levels, plan.dag_width).await {
                Ok(d) => report.dag = Some(d),
                Err(err) => report.fail(Step::Dag, &err),
            }
        }
        if steps.contains(&Step::Fairness) {
            progress(&format!(
                "fairness: {} late tasks behind {} queued, with fair keys and without",
                plan.fair_late, plan.fair_backlog
            ));
            let result =
                crate::policy::fairness_step(&own_plan, plan.fair_backlog, plan.fair_late).await;
            match result {
                Ok(f) => report.fairness = Some(f),
                Err(err) => report.fail(Step::Fairness, &err),
            }
        }
    }
    if own {
        durability_steps(&own_plan, &steps, &plan, args, &mut report).await;
    }
    report.finished = Some(SystemTime::now());
    Ok(report)
}

/// The bench's own cluster: [`NODES`] nodes of [`SLOTS`] slots, TLS
/// unless `--insecure`, the store `--memory-store` or `--database-url`
/// asks for; nodes declare the policy mix's resource when it runs.
fn cluster_plan(args: &BenchArgs, steps: &[Step]) -> ClusterPlan {
    ClusterPlan {
        nodes: NODES,
        slots: SLOTS,
        log_filter: args.child_log.clone(),
        durable: !args.memory_store,
        insecure: args.insecure,
        // The policy mix asks for a resource: the nodes declare plenty.
        node_args: if steps.contains(&Step::PolicyMix) {
            crate::policy::node_resource_args()
        } else {
            Vec::new()
        },
        coordinator_args: Vec::new(),
        database_url: args.database_url.clone(),
    }
}

/// Records `err` as the failure of every step in `steps`.
fn fail_all(report: &mut Report, steps: &[Step], err: &anyhow::Error) {
    for step in steps {
        report.fail(*step, err);
    }
}

/// The slots the sleep and burn steps' ideal times divide by: the
/// cluster's, as it reports them (at least 1).
fn ideal_slots(reported: u32) -> f64 {
    f64::from(reported.max(1))
}

/// Steps (a) to (d) on the two-node cluster (or `--coordinator`'s). A
/// cluster whose nodes never get ready fails them all.
async fn cluster_steps(
    client: &Client,
    cluster: Option<&Cluster>,
    steps: &[Step],
    plan: &Plan,
    args: &BenchArgs,
    report: &mut Report,
) {
    // The bench's own cluster has NODES nodes; an external one at least one.
    let want_nodes = if cluster.is_some() { NODES } else { 1 };
    let ready = async {
        wait_nodes_ready(client, want_nodes, own_processes::READY_TIMEOUT).await?;
        anyhow::Ok(client.cluster_info().await?)
    };
    let info = match ready.await {
        Ok(info) => info,
        Err(err) => {
            let wanted: Vec<Step> = steps
                .iter()
                .copied()
                .filter(|s| s.needs_cluster())
                .collect();
            fail_all(report, &wanted, &err);
            return;
        }
    };
    if cluster.is_some() && info.slots != NODES as u32 * SLOTS {
        eprintln!(
            "weft bench: warning: the cluster has {} slots; the protocol wants {}",
            info.slots,
            NODES as u32 * SLOTS
        );
    }
    let slots = ideal_slots(info.slots);
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
    if steps.contains(&Step::PolicyMix) {
        progress(&format!(
            "policy-mix: {} × ({} plain, {} policy-mix) noop tasks, interleaved",
            plan.throughput_runs, plan.throughput_n, plan.throughput_n
        ));
        let fields = if args.mix.is_empty() {
            crate::policy::MixField::ALL.to_vec()
        } else {
            args.mix.clone()
        };
        let result = async {
            let warm = (0..plan.warmup)
                .map(|x| crate::policy::mixed(x, &fields))
                .collect();
            workload::run_all(client, warm, concurrency).await?;
            crate::policy::interleaved_throughput(
                client,
                plan.throughput_n,
                plan.throughput_runs,
                concurrency,
                &fields,
                &cluster_cpu,
            )
            .await
        }
        .await;
        match result {
            Ok(runs) => {
                report.policy_mix = Some(PolicyMix {
                    n: plan.throughput_n,
                    fields: fields.clone(),
                    runs,
                })
            }
            Err(err) => report.fail(Step::PolicyMix, &err),
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
        let ideal = plan.sleep_n as f64 * 0.05 / slots;
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
}

/// The durable-latency, retention and recovery steps (their own clusters).
async fn durability_steps(
    cluster_plan: &ClusterPlan,
    steps: &[Step],
    plan: &Plan,
    args: &BenchArgs,
    report: &mut Report,
) {
    if steps.contains(&Step::Durable) {
        progress(&format!(
            "durable: {} × fdatasync, {} round trips in memory and durable, then {} noops",
            plan.latency_n, plan.latency_n, plan.durable_bytes_tasks
        ));
        let durable_plan = durable::DurablePlan {
            warmup: plan.latency_warmup,
            round_trips: plan.latency_n,
            bytes_tasks: plan.durable_bytes_tasks,
            concurrency: args.wait_concurrency,
        };
        match durable::durable(cluster_plan, durable_plan).await {
            Ok(d) => report.durable = Some(d),
            Err(err) => report.fail(Step::Durable, &err),
        }
    }
    if steps.contains(&Step::Retention) {
        progress(&format!(
            "retention: waves of {} noops for {:?}, --retention {:?}",
            plan.retention_wave, plan.retention_run, plan.retention
        ));
        let retention_plan = durable::RetentionPlan {
            retention: plan.retention,
            wave: plan.retention_wave,
            run_for: plan.retention_run,
            concurrency: args.wait_concurrency,
        };
        match durable::retention(cluster_plan, retention_plan).await {
            Ok(r) => report.retention = Some(r),
            Err(err) => report.fail(Step::Retention, &err),
        }
    }
    if steps.contains(&Step::Recovery) {
        progress(&format!(
            "recovery: {} tasks queued, SIGKILL, restart on the same data dir",
            plan.recovery_tasks
        ));
        match recovery::recovery(cluster_plan, plan.recovery_tasks).await {
            Ok(r) => report.recovery = Some(r),
            Err(err) => report.fail(Step::Recovery, &err),
        }
    }
}

fn progress(what: &str) {
    eprintln!("weft bench: {what}");
}

/// A database URL as a report may show it: `user:password@` becomes
/// `user@`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(a key=value database URL)".to_owned();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (auth, host),
        None => return url.to_owned(),
    };
    let user = auth.split_once(':').map_or(auth, |(user, _)| user);
    format!("{scheme}://{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse;

    /// A loopback port nothing listens on: connecting is refused at once.
    const NOBODY: &str = "http://127.0.0.1:1";

    #[test]
    fn steps_with_clusters_of_their_own_never_get_the_database_url() {
        let args = parse(&["--database-url", "postgresql://h/db", "--only", "latency"]);
        let shared = cluster_plan(&args, &args.steps());
        assert_eq!(shared.database_url.as_deref(), Some("postgresql://h/db"));
        // What scale, many-nodes, dag, fairness, durable, retention and
        // recovery are given (and what durable's in-memory half derives).
        let own = shared.without_database();
        assert_eq!(own.database_url, None);
        assert!(!own.coordinator_args.iter().any(|a| a.contains("database")));
    }

    #[test]
    fn ideal_times_divide_by_the_slots_the_cluster_reports() {
        assert_eq!(ideal_slots(8), 8.0);
        assert_eq!(ideal_slots(0), 1.0);
    }

    #[tokio::test]
    async fn skipped_steps_do_not_fail_a_run_against_a_coordinator() {
        let args = parse(&["--only", "scale,recovery"]);
        let report = run(&args, Some(NOBODY.to_owned()), None).await.unwrap();
        assert!(!report.failed(), "{:?}", report.errors);
        assert!(report.skip_reason(Step::Scale).is_some());
        assert!(report.skip_reason(Step::Recovery).is_some());
    }

    #[tokio::test]
    async fn a_cluster_that_cannot_be_reached_fails_its_steps_and_the_run_goes_on() {
        let args = parse(&["--only", "latency,burn,scale"]);
        let report = run(&args, Some(NOBODY.to_owned()), None).await.unwrap();
        assert!(report.error_of(Step::Latency).is_some());
        assert!(report.error_of(Step::Burn).is_some());
        assert!(report.skip_reason(Step::Scale).is_some());
        assert!(report.finished.is_some());
    }

    #[tokio::test]
    async fn database_url_with_startup_is_refused_before_anything_runs() {
        let args = parse(&["--database-url", "postgresql://h/db", "--only", "startup"]);
        let err = run(&args, None, None).await.unwrap_err();
        assert!(err.to_string().contains("startup"), "{err}");
    }

    #[test]
    fn a_database_password_never_reaches_the_report() {
        assert_eq!(
            redact_password("postgresql://weft:secret@127.0.0.1:5432/weft"),
            "postgresql://weft@127.0.0.1:5432/weft"
        );
        assert_eq!(
            redact_password("postgresql://postgres@h:1/db"),
            "postgresql://postgres@h:1/db"
        );
        assert!(!redact_password("host=h password=secret").contains("secret"));
    }
}
