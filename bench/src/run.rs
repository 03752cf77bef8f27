//! One `weft bench` run: which steps, on which cluster (the bench's own
//! processes, or `--coordinator`), in which order, each failure recorded
//! in the [`Report`] rather than ending the run. The steps' own work is
//! in [`crate::own_processes`] and [`crate::workload`].

use std::time::SystemTime;

use weft_client::Client;
use weft_cluster::wait_nodes_ready;

use crate::args::{BenchArgs, Plan, Step};
use crate::cluster::{Cluster, ClusterPlan};
use crate::machine::Machine;
use crate::own_processes;
use crate::report::{Burn, Parallel, PolicyMix, Report, Startup, StepError, Throughput};
use crate::{durable, floor, recovery, workload};

/// Slots per node and nodes in the protocol's cluster.
const NODES: usize = 2;
const SLOTS: u32 = 1;

/// Runs the steps `args` asks for and answers what they measured; a step
/// that fails is recorded in the report (the run goes on). `external` is
/// the `--coordinator` URL when the user gave one.
pub async fn run(
    args: &BenchArgs,
    external: Option<String>,
    token: Option<String>,
) -> anyhow::Result<Report> {
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
    report.database = args.database_url.as_deref().map(redact_password);
    // Without --coordinator the bench starts processes of its own.
    let own = external.is_none();
    if own {
        // Fail before measuring anything when the binaries are missing.
        Cluster::check_binaries()?;
    }
    let cluster_plan = ClusterPlan {
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
        coordinator_args: args
            .database_url
            .iter()
            .flat_map(|url| ["--database-url".to_owned(), url.clone()])
            .collect(),
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
    if steps.iter().any(|s| s.needs_cluster()) && client.is_none() {
        match &external {
            Some(url) => {
                client =
                    Some(Client::connect_secure(url, args.trust.as_ref(), token.as_deref()).await?)
            }
            None => {
                let started = Cluster::start(&cluster_plan).await?;
                client = Some(started.client().await?);
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

    if own {
        if steps.contains(&Step::Scale) {
            progress(&format!(
                "scale: {} tasks queued on a coordinator with no node",
                plan.scale_tasks
            ));
            match own_processes::scale(&cluster_plan, plan.scale_tasks).await {
                Ok(s) => report.scale = Some(s),
                Err(err) => report.fail(Step::Scale, &err),
            }
        }
        if steps.contains(&Step::ManyNodes) {
            progress(&format!(
                "many-nodes: {} simulated nodes, {:?} idle window",
                plan.sim_nodes, plan.idle_window
            ));
            match own_processes::many_nodes(&cluster_plan, plan.sim_nodes, plan.idle_window).await {
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
            match crate::policy::dag(&cluster_plan, plan.dag_levels, plan.dag_width).await {
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
                crate::policy::fairness_step(&cluster_plan, plan.fair_backlog, plan.fair_late)
                    .await;
            match result {
                Ok(f) => report.fairness = Some(f),
                Err(err) => report.fail(Step::Fairness, &err),
            }
        }
    }
    if own {
        durability_steps(&cluster_plan, &steps, &plan, args, &mut report).await;
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
    wait_nodes_ready(client, NODES, own_processes::READY_TIMEOUT).await?;
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
    use super::redact_password;

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
