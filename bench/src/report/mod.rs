//! The results of one `weft bench` run ([`Report`]: what each step
//! measured, or why it failed) and their three renderings, all drawn from
//! one list of figures:
//! - [`figures`]: the list, each step's numbers computed once;
//! - [`table`]: the readable table (Markdown, so it pastes into BENCHMARKS.md);
//! - [`json`]: one JSON document (`--output json`) and the peers kit's
//!   results.jsonl lines (`"peer": "fabric"`).
//!
//! Pure data and formatting, except [`Report::append_jsonl`], which appends
//! to a file.

pub mod figures;
pub mod json;
pub mod table;

#[cfg(test)]
mod tests;

use std::time::SystemTime;

use crate::args::Step;
use crate::floor::Floor;
use crate::machine::Machine;
use crate::stats::{Latency, median_of};
use crate::workload::Metered;

/// Step (e).
#[derive(Debug, Clone)]
pub struct Startup {
    /// Seconds from spawning the coordinator to the first result, per launch.
    pub runs: Vec<f64>,
}

/// Step (a).
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Tasks per run.
    pub n: usize,
    /// Tasks/s and the meter of each run.
    pub runs: Vec<(f64, Metered)>,
}

impl Throughput {
    /// From the runs of [`crate::workload::throughput`].
    pub fn new(n: usize, runs: Vec<(f64, Metered)>) -> Throughput {
        Throughput { n, runs }
    }

    /// Median tasks/s.
    pub fn median_tps(&self) -> Option<f64> {
        median_of(self.runs.iter().map(|(tps, _)| *tps))
    }

    fn cpu_us_per_task(&self, pick: impl Fn(&Metered) -> Option<f64>) -> Option<f64> {
        let per_run: Option<Vec<f64>> = self.runs.iter().map(|(_, m)| pick(m)).collect();
        median_of(per_run?.into_iter()).map(|s| s / self.n as f64 * 1e6)
    }

    /// Median CPU µs per task of the bench process (the client).
    pub fn client_cpu_us(&self) -> Option<f64> {
        self.cpu_us_per_task(|m| m.client_cpu)
    }

    /// Median CPU µs per task of the coordinator and nodes.
    pub fn cluster_cpu_us(&self) -> Option<f64> {
        self.cpu_us_per_task(|m| m.cluster_cpu)
    }
}

/// The policy-mix step: interleaved pairs of plain and policy-mix runs.
#[derive(Debug, Clone)]
pub struct PolicyMix {
    /// Tasks per run (each kind).
    pub n: usize,
    /// The policy fields the mixed tasks set.
    pub fields: Vec<crate::policy::MixField>,
    /// Tasks/s of each pair.
    pub runs: Vec<crate::policy::PairedRun>,
}

/// The dag step.
#[derive(Debug, Clone)]
pub struct Dag {
    /// Levels of the graph.
    pub levels: usize,
    /// Tasks per level (each level has a join besides).
    pub width: usize,
    /// What every task runs, e.g. `sleep(5ms)`.
    pub task: String,
    /// Slots of the cluster (nodes × slots).
    pub slots: u32,
    /// Seconds the one Submit took.
    pub submit_s: f64,
    /// Seconds from the Submit to the last result.
    pub wall_s: f64,
    /// The delays of each level.
    pub delays: Vec<crate::policy::LevelDelay>,
}

/// The fairness step.
#[derive(Debug, Clone)]
pub struct Fairness {
    /// The backlog's tasks.
    pub backlog: usize,
    /// The late submitter's tasks.
    pub late: usize,
    /// With fair keys (equal weights).
    pub fair: crate::policy::FairShare,
    /// Without (first in, first out).
    pub fifo: crate::policy::FairShare,
}

/// Steps (c) and (d): one batch of parallel tasks, several runs.
#[derive(Debug, Clone)]
pub struct Parallel {
    /// Tasks per run.
    pub n: usize,
    /// `n × duration / slots`.
    pub ideal_s: f64,
    /// The meter of each run.
    pub runs: Vec<Metered>,
}

impl Parallel {
    /// Median wall seconds.
    pub fn median_wall(&self) -> Option<f64> {
        median_of(self.runs.iter().map(|m| m.wall.as_secs_f64()))
    }
}

/// Step (d).
#[derive(Debug, Clone)]
pub struct Burn {
    /// The batch runs.
    pub parallel: Parallel,
    /// One `spin 100ms` task alone through the cluster (round trip), median of 3.
    pub single_s: f64,
    /// `ceil(n / slots) × single_s`.
    pub ideal_measured_s: f64,
}

/// The scale step.
#[derive(Debug, Clone)]
pub struct Scale {
    /// Tasks submitted.
    pub tasks: usize,
    /// QUEUED count the coordinator reported afterwards.
    pub queued_seen: u64,
    /// Seconds to submit them all.
    pub submit_s: f64,
    /// Coordinator VmRSS before, bytes.
    pub rss_before: Option<u64>,
    /// Coordinator VmRSS after, bytes.
    pub rss_after: Option<u64>,
    /// Coordinator CPU seconds spent while submitting.
    pub coordinator_cpu_s: Option<f64>,
}

impl Scale {
    /// Submitted tasks per second.
    pub fn submit_rate(&self) -> f64 {
        self.tasks as f64 / self.submit_s
    }

    /// Resident bytes per queued task.
    pub fn bytes_per_task(&self) -> Option<f64> {
        let (after, before) = self.rss_after.zip(self.rss_before)?;
        Some((after as f64 - before as f64) / self.tasks.max(1) as f64)
    }
}

/// The many-nodes step.
#[derive(Debug, Clone)]
pub struct ManyNodes {
    /// Simulated nodes.
    pub nodes: usize,
    /// Seconds until all were registered and listed ready.
    pub connect_s: f64,
    /// Coordinator VmRSS before the swarm, bytes.
    pub rss_before: Option<u64>,
    /// Coordinator VmRSS once all were ready, bytes.
    pub rss_idle_start: Option<u64>,
    /// Coordinator VmRSS at the end of the idle window, bytes.
    pub rss_idle: Option<u64>,
    /// Coordinator CPU over the idle window, percent of one core.
    pub cpu_pct: Option<f64>,
    /// Length of the idle window, seconds.
    pub window_s: f64,
    /// Nodes the coordinator listed at the end of the window.
    pub connected_after: usize,
    /// Simulated sessions still up at the end of the window.
    pub streams_alive: usize,
}

impl ManyNodes {
    /// Resident bytes per connected node.
    pub fn bytes_per_node(&self) -> Option<f64> {
        let (idle, before) = self.rss_idle.zip(self.rss_before)?;
        Some((idle as f64 - before as f64) / self.nodes.max(1) as f64)
    }
}

/// A step that failed, or one that was skipped (see [`Report::skipped`]).
#[derive(Debug, Clone)]
pub struct StepError {
    /// Which step.
    pub step: Step,
    /// Why, on one line.
    pub error: String,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// When it started.
    pub started: SystemTime,
    /// When it ended.
    pub finished: Option<SystemTime>,
    /// results.jsonl `run_id`.
    pub run_id: String,
    /// Scaled-down counts (not comparable).
    pub quick: bool,
    /// The `--coordinator` URL benched, or `None` for the bench's own cluster.
    pub external: Option<String>,
    /// The bench's coordinators ran without `--data-dir` (`--memory-store`).
    pub memory_store: bool,
    /// The bench's coordinator kept its store in PostgreSQL here
    /// (`--database-url`, password removed).
    pub database: Option<String>,
    /// Raw tonic figures.
    pub floor: Option<Floor>,
    /// (e).
    pub startup: Option<Startup>,
    /// (a).
    pub throughput: Option<Throughput>,
    /// Policy mix beside plain tasks.
    pub policy_mix: Option<PolicyMix>,
    /// (b).
    pub latency: Option<(Latency, Metered)>,
    /// (c).
    pub sleep: Option<Parallel>,
    /// (d).
    pub burn: Option<Burn>,
    /// Scale step.
    pub scale: Option<Scale>,
    /// Many-nodes step.
    pub many_nodes: Option<ManyNodes>,
    /// Dag step.
    pub dag: Option<Dag>,
    /// Fairness step.
    pub fairness: Option<Fairness>,
    /// Durable step.
    pub durable: Option<crate::durable::Durable>,
    /// Retention step.
    pub retention: Option<crate::durable::RetentionRun>,
    /// Recovery step.
    pub recovery: Option<crate::recovery::Recovery>,
    /// Failed steps (the run exits 1 if there is one).
    pub errors: Vec<StepError>,
    /// Steps not taken, and why (not failures: e.g. a step that needs its
    /// own processes, with `--coordinator`).
    pub skipped: Vec<StepError>,
}

impl Report {
    /// An empty report for a run starting at `started`.
    pub fn new(
        machine: Machine,
        started: SystemTime,
        run_id: Option<String>,
        quick: bool,
        external: Option<String>,
    ) -> Report {
        Report {
            machine,
            started,
            finished: None,
            run_id: run_id.unwrap_or_else(|| compact_utc(started)),
            quick,
            external,
            memory_store: false,
            database: None,
            floor: None,
            startup: None,
            throughput: None,
            policy_mix: None,
            latency: None,
            sleep: None,
            burn: None,
            scale: None,
            many_nodes: None,
            dag: None,
            fairness: None,
            durable: None,
            retention: None,
            recovery: None,
            errors: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Records a step not taken, and why (no failure).
    pub fn skip(&mut self, step: Step, why: &str) {
        eprintln!("weft bench: {} skipped: {why}", step.name());
        self.skipped.push(StepError {
            step,
            error: why.to_owned(),
        });
    }

    /// Why `step` was skipped, if it was.
    pub fn skip_reason(&self, step: Step) -> Option<&str> {
        self.skipped
            .iter()
            .find(|e| e.step == step)
            .map(|e| e.error.as_str())
    }

    /// Whether any step failed (skipped ones do not count).
    pub fn failed(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Records a failed step (and says so on stderr at once).
    pub fn fail(&mut self, step: Step, err: &anyhow::Error) {
        let error = format!("{err:#}").replace('\n', " ");
        eprintln!("weft bench: {} failed: {error}", step.name());
        self.errors.push(StepError { step, error });
    }

    /// The error recorded for `step`, if any.
    pub fn error_of(&self, step: Step) -> Option<&str> {
        self.errors
            .iter()
            .find(|e| e.step == step)
            .map(|e| e.error.as_str())
    }

    /// The cluster the run measured, in words (the table's and the records' `config`).
    pub fn config(&self) -> String {
        match &self.external {
            Some(url) => format!("external cluster at {url}; client = one weft process"),
            None if self.database.is_some() => format!(
                "weft-coordinator (--database-url: PostgreSQL store at {}) + 2 x weft-node --slots 1, \
                 real processes on 127.0.0.1; client = the weft bench process",
                self.database.as_deref().unwrap_or_default()
            ),
            None if self.memory_store => {
                "weft-coordinator (NO --data-dir: in-memory store) + 2 x weft-node --slots 1, \
                 real processes on 127.0.0.1; client = the weft bench process"
                    .to_owned()
            }
            None => "weft-coordinator (--data-dir on a temp dir) + 2 x weft-node --slots 1, \
                     real processes on 127.0.0.1; client = the weft bench process \
                     (submit_many batches + one WaitMany stream per 2,000-task chunk; Run for round trips)"
                .to_owned(),
        }
    }
}

/// `20261125T151207Z` for a time.
fn compact_utc(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .replace(['-', ':'], "")
}
