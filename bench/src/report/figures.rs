//! The one list of figures of a run: every step that ran or failed, in run
//! order, each with the numbers its renderings show, computed once here
//! (medians, per-task CPU, efficiencies, the floor figures it compares
//! with, the noise of its timed phases). The table, the JSON document and
//! the results.jsonl lines only round and format these.

use crate::args::Step;
use crate::floor::Floor;
use crate::stats::{Latency, median_of};
use crate::workload::Metered;

use super::{
    Burn, Dag, Fairness, ManyNodes, Parallel, PolicyMix, Report, Scale, Startup, Throughput,
};

/// One step of the run: what it measured, or why it did not.
#[derive(Debug, Clone)]
pub struct Figure<'a> {
    /// Which step.
    pub step: Step,
    /// Its figures, or its error.
    pub outcome: Outcome<'a>,
}

/// A step's figures, or why a failed or skipped step has none.
#[derive(Debug, Clone)]
pub enum Outcome<'a> {
    /// The step ran.
    Measured(Measured<'a>),
    /// The step failed: why.
    Failed(&'a str),
    /// The step was not taken: why.
    Skipped(&'a str),
}

/// The figures of one step that ran.
#[derive(Debug, Clone)]
pub enum Measured<'a> {
    /// Raw tonic, what the other figures are compared with.
    Floor(&'a Floor),
    /// (e).
    Startup(StartupFigures),
    /// (a).
    Throughput(ThroughputFigures),
    /// Policy mix beside plain tasks.
    PolicyMix(PolicyMixFigures),
    /// (b).
    Latency(LatencyFigures<'a>),
    /// (c).
    Sleep(ParallelFigures),
    /// (d).
    Burn(BurnFigures),
    /// The scale step.
    Scale(ScaleFigures<'a>),
    /// The many-nodes step.
    ManyNodes(ManyNodesFigures<'a>),
    /// The dag step.
    Dag(DagFigures<'a>),
    /// The fairness step.
    Fairness(&'a Fairness),
    /// The durable step.
    Durable(&'a crate::durable::Durable),
    /// The retention step.
    Retention(&'a crate::durable::RetentionRun),
    /// The recovery step.
    Recovery(&'a crate::recovery::Recovery),
}

/// The dag step's medians and maxima over the levels, in ms.
#[derive(Debug, Clone)]
pub struct DagFigures<'a> {
    /// What was measured.
    pub dag: &'a Dag,
    /// Previous join's end → the level's first start (levels 1 on).
    pub start_delay_ms: Option<(f64, f64)>,
    /// The level's last end → its join's start.
    pub join_delay_ms: Option<(f64, f64)>,
    /// The level's first start → last end: the tasks' own work.
    pub level_run_ms: Option<(f64, f64)>,
}

/// The worst noise over a step's timed phases (the peers kit's `merge_noise`):
/// `None` where any phase lacks the reading.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noise {
    /// Host busy CPU, percent of all cores.
    pub host_busy_pct: Option<f64>,
    /// CPU seconds burnt by other processes.
    pub foreign_cpu_s: Option<f64>,
    /// CPU seconds the hypervisor withheld.
    pub steal_s: Option<f64>,
}

/// The policy-mix step.
#[derive(Debug, Clone)]
pub struct PolicyMixFigures {
    /// Tasks per run.
    pub n: usize,
    /// What the mixed tasks set ("priority, fair key, ...").
    pub fields: String,
    /// Plain tasks/s of each pair.
    pub plain: Vec<f64>,
    /// Policy-mix tasks/s of each pair.
    pub mixed: Vec<f64>,
    /// Median of `plain`.
    pub plain_median: Option<f64>,
    /// Median of `mixed`.
    pub mixed_median: Option<f64>,
    /// CPU of the plain runs.
    pub plain_cpu: RunCpu,
    /// CPU of the mixed runs.
    pub mixed_cpu: RunCpu,
}

/// CPU of one kind of run of the policy-mix step, the median over its
/// runs of each figure: whether the mixed tasks' extra time is work or
/// waiting.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunCpu {
    /// CPU µs per task of the bench process (the client).
    pub client_us: Option<f64>,
    /// CPU µs per task of the coordinator and nodes.
    pub cluster_us: Option<f64>,
    /// Client and cluster CPU together over the run's wall time, in % of
    /// all the machine's cores: under 100, the machine had idle time.
    pub busy_pct: Option<f64>,
}

impl RunCpu {
    /// From the meters of runs of `n` tasks each, on `cpus` cores.
    pub fn of<'a>(n: usize, cpus: usize, runs: impl Iterator<Item = &'a Metered>) -> RunCpu {
        let runs: Vec<&Metered> = runs.collect();
        let per_task = |cpu: Option<f64>| cpu.map(|s| s / n as f64 * 1e6);
        let busy = |m: &Metered| {
            let cpu = m.client_cpu? + m.cluster_cpu?;
            let capacity = m.wall.as_secs_f64() * cpus as f64;
            (capacity > 0.0).then(|| 100.0 * cpu / capacity)
        };
        let median = |pick: &dyn Fn(&Metered) -> Option<f64>| {
            let all: Option<Vec<f64>> = runs.iter().map(|m| pick(m)).collect();
            median_of(all?.into_iter())
        };
        RunCpu {
            client_us: median(&|m| per_task(m.client_cpu)),
            cluster_us: median(&|m| per_task(m.cluster_cpu)),
            busy_pct: median(&busy),
        }
    }

    /// Client and cluster CPU µs per task together.
    pub fn total_us(&self) -> Option<f64> {
        Some(self.client_us? + self.cluster_us?)
    }
}

/// (e) startup.
#[derive(Debug, Clone)]
pub struct StartupFigures {
    /// Seconds per launch.
    pub runs: Vec<f64>,
    /// Median of `runs`.
    pub median: Option<f64>,
}

/// (a) throughput.
#[derive(Debug, Clone)]
pub struct ThroughputFigures {
    /// Tasks per run.
    pub n: usize,
    /// Tasks/s of each run.
    pub runs: Vec<f64>,
    /// Median tasks/s.
    pub median_tps: Option<f64>,
    /// Median CPU µs per task of the client.
    pub client_cpu_us: Option<f64>,
    /// Median CPU µs per task of the coordinator and nodes.
    pub cluster_cpu_us: Option<f64>,
    /// The floor's unary calls/s, if it was measured.
    pub floor_unary_per_s: Option<f64>,
    /// Noise over the runs.
    pub noise: Noise,
}

/// (b) latency.
#[derive(Debug, Clone)]
pub struct LatencyFigures<'a> {
    /// The round trips' summary.
    pub latency: &'a Latency,
    /// The floor's `Run` stream and unary round trips, if measured.
    pub floor: Option<(&'a Latency, &'a Latency)>,
    /// Noise over the timed phase.
    pub noise: Noise,
}

/// (c), and the batch runs of (d).
#[derive(Debug, Clone)]
pub struct ParallelFigures {
    /// Tasks per run.
    pub n: usize,
    /// `n × duration / slots`.
    pub ideal_s: f64,
    /// Wall seconds of each run.
    pub walls: Vec<f64>,
    /// Median wall seconds.
    pub median_wall: Option<f64>,
    /// Noise over the runs.
    pub noise: Noise,
}

/// (d) burn.
#[derive(Debug, Clone)]
pub struct BurnFigures {
    /// The batch runs.
    pub parallel: ParallelFigures,
    /// One `spin 100ms` alone, seconds.
    pub single_s: f64,
    /// `ceil(n / slots) × single_s`.
    pub ideal_measured_s: f64,
}

/// The scale step.
#[derive(Debug, Clone)]
pub struct ScaleFigures<'a> {
    /// What it measured.
    pub scale: &'a Scale,
    /// Submitted tasks per second.
    pub submit_rate: f64,
    /// Resident bytes per queued task.
    pub bytes_per_task: Option<f64>,
    /// Coordinator CPU µs per submitted task.
    pub coordinator_cpu_us: Option<f64>,
    /// The floor's specs/s through `Submit`, if measured.
    pub floor_submit_per_s: Option<f64>,
}

/// The many-nodes step.
#[derive(Debug, Clone)]
pub struct ManyNodesFigures<'a> {
    /// What it measured.
    pub many: &'a ManyNodes,
    /// Resident bytes per connected node.
    pub bytes_per_node: Option<f64>,
}

impl Report {
    /// Every step that ran, failed or was skipped, in run order
    /// ([`Step::ALL`]); a step with none of these is left out.
    pub fn figures(&self) -> Vec<Figure<'_>> {
        Step::ALL
            .into_iter()
            .filter_map(|step| {
                let outcome = match self.measured(step) {
                    Some(measured) => Outcome::Measured(measured),
                    None => match self.error_of(step) {
                        Some(error) => Outcome::Failed(error),
                        None => Outcome::Skipped(self.skip_reason(step)?),
                    },
                };
                Some(Figure { step, outcome })
            })
            .collect()
    }

    /// The largest foreign-CPU and steal readings of any timed phase, for
    /// the table's noise line; `None` unless both were read somewhere.
    pub fn noise_max(&self) -> Option<(f64, f64)> {
        let all = self.metered();
        let foreign = all
            .iter()
            .filter_map(|m| m.foreign_cpu_s)
            .reduce(f64::max)?;
        let steal = all.iter().filter_map(|m| m.steal_s).reduce(f64::max)?;
        Some((foreign, steal))
    }

    fn measured(&self, step: Step) -> Option<Measured<'_>> {
        let floor = self.floor.as_ref();
        Some(match step {
            Step::Floor => Measured::Floor(floor?),
            Step::Startup => Measured::Startup(startup(self.startup.as_ref()?)),
            Step::Throughput => Measured::Throughput(throughput(self.throughput.as_ref()?, floor)),
            Step::PolicyMix => {
                Measured::PolicyMix(policy_mix(self.policy_mix.as_ref()?, self.machine.cpus))
            }
            Step::Latency => {
                let (latency, metered) = self.latency.as_ref()?;
                Measured::Latency(LatencyFigures {
                    latency,
                    floor: floor.map(|f| (&f.run, &f.unary)),
                    noise: noise(std::iter::once(metered)),
                })
            }
            Step::Sleep => Measured::Sleep(parallel(self.sleep.as_ref()?)),
            Step::Burn => Measured::Burn(burn(self.burn.as_ref()?)),
            Step::Scale => Measured::Scale(scale(self.scale.as_ref()?, floor)),
            Step::Dag => {
                let dag = self.dag.as_ref()?;
                Measured::Dag(DagFigures {
                    dag,
                    start_delay_ms: crate::policy::median_max_ms(
                        dag.delays.iter().filter_map(|d| d.start_delay),
                    ),
                    join_delay_ms: crate::policy::median_max_ms(
                        dag.delays.iter().map(|d| d.join_delay),
                    ),
                    level_run_ms: crate::policy::median_max_ms(
                        dag.delays.iter().map(|d| d.level_run),
                    ),
                })
            }
            Step::Fairness => Measured::Fairness(self.fairness.as_ref()?),
            Step::Durable => Measured::Durable(self.durable.as_ref()?),
            Step::Retention => Measured::Retention(self.retention.as_ref()?),
            Step::Recovery => Measured::Recovery(self.recovery.as_ref()?),
            Step::ManyNodes => {
                let many = self.many_nodes.as_ref()?;
                Measured::ManyNodes(ManyNodesFigures {
                    many,
                    bytes_per_node: many.bytes_per_node(),
                })
            }
        })
    }

    /// Every timed phase's meter.
    fn metered(&self) -> Vec<&Metered> {
        let mut all: Vec<&Metered> = Vec::new();
        if let Some(t) = &self.throughput {
            all.extend(t.runs.iter().map(|(_, m)| m));
        }
        if let Some(p) = &self.policy_mix {
            all.extend(p.runs.iter().flat_map(|r| [&r.plain, &r.mixed]));
        }
        if let Some((_, m)) = &self.latency {
            all.push(m);
        }
        if let Some(s) = &self.sleep {
            all.extend(&s.runs);
        }
        if let Some(b) = &self.burn {
            all.extend(&b.parallel.runs);
        }
        all
    }
}

/// The policy-mix figures of runs on a machine of `cpus` cores.
fn policy_mix(p: &PolicyMix, cpus: usize) -> PolicyMixFigures {
    let plain: Vec<f64> = p.runs.iter().map(|r| r.plain_tps).collect();
    let mixed: Vec<f64> = p.runs.iter().map(|r| r.mixed_tps).collect();
    PolicyMixFigures {
        n: p.n,
        fields: p
            .fields
            .iter()
            .map(|f| f.label())
            .collect::<Vec<_>>()
            .join(", "),
        plain_median: median_of(plain.iter().copied()),
        mixed_median: median_of(mixed.iter().copied()),
        plain,
        mixed,
        plain_cpu: RunCpu::of(p.n, cpus, p.runs.iter().map(|r| &r.plain)),
        mixed_cpu: RunCpu::of(p.n, cpus, p.runs.iter().map(|r| &r.mixed)),
    }
}

fn startup(s: &Startup) -> StartupFigures {
    StartupFigures {
        runs: s.runs.clone(),
        median: median_of(s.runs.iter().copied()),
    }
}

fn throughput(t: &Throughput, floor: Option<&Floor>) -> ThroughputFigures {
    ThroughputFigures {
        n: t.n,
        runs: t.runs.iter().map(|(tps, _)| *tps).collect(),
        median_tps: t.median_tps(),
        client_cpu_us: t.client_cpu_us(),
        cluster_cpu_us: t.cluster_cpu_us(),
        floor_unary_per_s: floor.map(|f| f.unary_per_s),
        noise: noise(t.runs.iter().map(|(_, m)| m)),
    }
}

fn parallel(p: &Parallel) -> ParallelFigures {
    ParallelFigures {
        n: p.n,
        ideal_s: p.ideal_s,
        walls: p.runs.iter().map(|m| m.wall.as_secs_f64()).collect(),
        median_wall: p.median_wall(),
        noise: noise(p.runs.iter()),
    }
}

fn burn(b: &Burn) -> BurnFigures {
    BurnFigures {
        parallel: parallel(&b.parallel),
        single_s: b.single_s,
        ideal_measured_s: b.ideal_measured_s,
    }
}

fn scale<'a>(s: &'a Scale, floor: Option<&Floor>) -> ScaleFigures<'a> {
    ScaleFigures {
        scale: s,
        submit_rate: s.submit_rate(),
        bytes_per_task: s.bytes_per_task(),
        coordinator_cpu_us: s.coordinator_cpu_s.map(|c| c / s.tasks.max(1) as f64 * 1e6),
        floor_submit_per_s: floor.map(|f| f.submit_specs_per_s),
    }
}

/// The worst of each noise reading over `runs`.
fn noise<'a>(runs: impl Iterator<Item = &'a Metered>) -> Noise {
    let runs: Vec<&Metered> = runs.collect();
    let worst = |pick: fn(&Metered) -> Option<f64>| -> Option<f64> {
        let values: Option<Vec<f64>> = runs.iter().map(|m| pick(m)).collect();
        values.and_then(|v| v.into_iter().reduce(f64::max))
    };
    Noise {
        host_busy_pct: worst(|m| m.host_busy_pct),
        foreign_cpu_s: worst(|m| m.foreign_cpu_s),
        steal_s: worst(|m| m.steal_s),
    }
}
