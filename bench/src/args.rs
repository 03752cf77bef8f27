//! What `weft bench` is asked to do: the [`Step`]s, the flags
//! ([`BenchArgs`], clap derive: the bench is a command, and its flags are
//! its interface), and the counts of one run ([`Plan`]). No I/O.

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use weft_proto::convert::parse_duration;

use crate::floor;

/// The steps of `weft bench`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Raw tonic: unary and streaming round trips, messages over one stream.
    Floor,
    /// (e) launching coordinator and nodes to the first result, median of 3.
    Startup,
    /// (a) 20,000 noop tasks submitted and awaited, median of 3.
    Throughput,
    /// The same noop tasks with every policy field set (priorities 1-9,
    /// fair keys, a concurrency key that never binds, a resource), runs
    /// interleaved with plain ones: what scheduling policy costs.
    PolicyMix,
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
    /// A 10,000-task graph (100 levels of 100 × sleep 5ms, a join per
    /// level) in one Submit: submit time, scheduling delay per level.
    Dag,
    /// 100 late tasks behind a 100,000-task backlog at equal priority,
    /// with fair keys and without: the late submitter's share and time.
    Fairness,
    /// In one run: fdatasync of 4 KiB beside the data dir (appends,
    /// overwrites, and overwrites paced half an in-memory round trip
    /// apart), and 2,000 noop round trips on the in-memory store and on
    /// the durable one; then 20,000 noops and the data dir's bytes per task.
    Durable,
    /// Waves of 5,000 noops for 120 s on a coordinator with `--retention
    /// 2s`: the data dir's size after each wave (does it stay bounded?).
    Retention,
    /// 1,000,000 noops queued with no node, the coordinator killed
    /// (SIGKILL) and restarted on its data dir: time until it serves the
    /// queue again, peak memory against before the crash.
    Recovery,
}

impl Step {
    /// Every step, in the order they run.
    pub const ALL: [Step; 14] = [
        Step::Floor,
        Step::Startup,
        Step::Throughput,
        Step::PolicyMix,
        Step::Latency,
        Step::Sleep,
        Step::Burn,
        Step::Scale,
        Step::ManyNodes,
        Step::Dag,
        Step::Fairness,
        Step::Durable,
        Step::Retention,
        Step::Recovery,
    ];

    /// Whether the step needs processes of its own (not possible against
    /// `--coordinator`).
    pub(crate) fn needs_own_processes(self) -> bool {
        matches!(
            self,
            Step::Startup
                | Step::Scale
                | Step::ManyNodes
                | Step::Dag
                | Step::Fairness
                | Step::Durable
                | Step::Retention
                | Step::Recovery
        )
    }

    /// Whether the step runs on the two-node cluster.
    pub(crate) fn needs_cluster(self) -> bool {
        matches!(
            self,
            Step::Throughput | Step::PolicyMix | Step::Latency | Step::Sleep | Step::Burn
        )
    }

    /// Whether the step runs on the one cluster the run shares (or on
    /// none: the floor), rather than starting clusters of its own.
    pub(crate) fn runs_on_shared_cluster(self) -> bool {
        self == Step::Floor || self.needs_cluster()
    }

    /// The step's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Step::Floor => "floor",
            Step::Startup => "startup",
            Step::Throughput => "throughput",
            Step::PolicyMix => "policy-mix",
            Step::Latency => "latency",
            Step::Sleep => "sleep",
            Step::Burn => "burn",
            Step::Scale => "scale",
            Step::ManyNodes => "many-nodes",
            Step::Dag => "dag",
            Step::Fairness => "fairness",
            Step::Durable => "durable",
            Step::Retention => "retention",
            Step::Recovery => "recovery",
        }
    }
}

/// Flags of `weft bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Scale every count down for a smoke test (numbers are not comparable).
    #[arg(long)]
    pub quick: bool,
    /// Run the bench's own cluster in plaintext (`--insecure`) instead of
    /// TLS, the default: run both to see what TLS costs.
    #[arg(long)]
    pub insecure: bool,
    /// How an external coordinator (`--coordinator`) is trusted: the CLI's
    /// `--ca-file` / `--ca-pin`.
    #[arg(skip)]
    pub trust: Option<weft_proto::tls::Trust>,
    /// Run only these steps (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "STEP,...")]
    pub only: Vec<Step>,
    /// Policy fields the policy-mix step sets on its tasks (comma-separated;
    /// default: priority, fair-key, concurrency and resource), to see what
    /// each one costs alone; own-fair-key gives every task a key of its own.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "FIELD,...")]
    pub mix: Vec<crate::policy::MixField>,
    /// Tasks queued in the scale step [default: 1000000; 20000 with --quick].
    #[arg(long, value_name = "N")]
    pub scale_tasks: Option<usize>,
    /// Tasks queued before the crash in the recovery step [default:
    /// 1000000; 20000 with --quick].
    #[arg(long, value_name = "N")]
    pub recovery_tasks: Option<usize>,
    /// How long the retention step keeps submitting waves [default: 120s;
    /// 6s with --quick].
    #[arg(long, value_parser = parse_duration_arg, value_name = "DURATION")]
    pub retention_run: Option<Duration>,
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
    /// Keep the bench's coordinator's store in PostgreSQL at URL (passed to
    /// it as `--database-url`; its data dir still holds the TLS files and
    /// the admin token). The bench never creates or empties the database:
    /// give it an empty one. Only with `--only` and steps that share the
    /// one cluster (floor, throughput, policy-mix, latency, sleep, burn);
    /// every other step starts clusters of its own, which one database
    /// cannot serve in turn.
    #[arg(long, value_name = "URL", conflicts_with = "memory_store")]
    pub database_url: Option<String>,
}

impl BenchArgs {
    /// The steps this run takes (`--only`, else all), in the order they run.
    pub fn steps(&self) -> Vec<Step> {
        Step::ALL
            .into_iter()
            .filter(|s| self.only.is_empty() || self.only.contains(s))
            .collect()
    }

    /// Why these flags cannot make a run, if they cannot: `--database-url`
    /// with a step that starts clusters of its own (a second coordinator on
    /// a database that already holds tokens writes no admin token, and
    /// tasks would carry over from step to step).
    pub fn refusal(&self) -> Option<String> {
        self.database_url.as_ref()?;
        let own: Vec<&str> = self
            .steps()
            .into_iter()
            .filter(|s| !s.runs_on_shared_cluster())
            .map(Step::name)
            .collect();
        if own.is_empty() {
            return None;
        }
        let shared: Vec<&str> = Step::ALL
            .into_iter()
            .filter(|s| s.runs_on_shared_cluster())
            .map(Step::name)
            .collect();
        Some(format!(
            "--database-url serves one cluster, and these steps start clusters of their own: {}; \
             with --database-url, choose among {} (e.g. --only {})",
            own.join(", "),
            shared.join(", "),
            shared.join(",")
        ))
    }
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
    /// Dag step: levels, and tasks per level (plus one join each).
    pub dag_levels: usize,
    /// See `dag_levels`.
    pub dag_width: usize,
    /// Fairness step: the backlog's tasks.
    pub fair_backlog: usize,
    /// Fairness step: the late submitter's tasks.
    pub fair_late: usize,
    /// Durable step: noops run before the data dir is measured.
    pub durable_bytes_tasks: usize,
    /// Retention step: the coordinator's `--retention`.
    pub retention: Duration,
    /// Retention step: noops per wave.
    pub retention_wave: usize,
    /// Retention step: how long waves go on.
    pub retention_run: Duration,
    /// Recovery step: tasks queued before the crash.
    pub recovery_tasks: usize,
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
                dag_levels: 10,
                dag_width: 20,
                fair_backlog: 5_000,
                fair_late: 50,
                durable_bytes_tasks: 2_000,
                retention: Duration::from_secs(1),
                retention_wave: 1_000,
                retention_run: Duration::from_secs(6),
                recovery_tasks: 20_000,
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
                dag_levels: 100,
                dag_width: 100,
                fair_backlog: 100_000,
                fair_late: 100,
                durable_bytes_tasks: 20_000,
                retention: Duration::from_secs(2),
                retention_wave: 5_000,
                retention_run: Duration::from_secs(120),
                recovery_tasks: 1_000_000,
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
        if let Some(n) = args.recovery_tasks {
            plan.recovery_tasks = n;
        }
        if let Some(run) = args.retention_run {
            plan.retention_run = run;
        }
        if let Some(window) = args.idle_window {
            plan.idle_window = window;
        }
        plan
    }
}

/// Parses a duration flag (`500ms`, `2s`, `1m`).
fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|err| err.to_string())
}

/// `weft bench`'s flags from `argv` (without the command name), for tests.
#[cfg(test)]
pub(crate) fn parse(argv: &[&str]) -> BenchArgs {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }
    Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
        .expect("flags parse")
        .bench
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_with_multi_cluster_steps_is_refused() {
        let all = parse(&["--database-url", "postgresql://h/db"]);
        let why = all.refusal().expect("all steps with --database-url");
        for step in [
            "startup",
            "scale",
            "many-nodes",
            "dag",
            "fairness",
            "durable",
            "retention",
            "recovery",
        ] {
            assert!(why.contains(step), "{step}: {why}");
        }
        let one = parse(&[
            "--database-url",
            "postgresql://h/db",
            "--only",
            "latency,durable",
        ]);
        let why = one.refusal().expect("durable with --database-url");
        assert!(
            why.contains("durable") && why.contains("--only floor,throughput"),
            "{why}"
        );
    }

    #[test]
    fn database_url_with_shared_cluster_steps_only_is_accepted() {
        let args = parse(&[
            "--database-url",
            "postgresql://h/db",
            "--only",
            "floor,throughput,policy-mix,latency,sleep,burn",
        ]);
        assert_eq!(args.refusal(), None);
        assert_eq!(parse(&[]).refusal(), None);
    }
}
