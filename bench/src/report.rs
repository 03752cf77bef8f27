//! The results of one `weft bench` run and their three renderings: the
//! readable table (a Markdown table, so it pastes into BENCHMARKS.md), one
//! JSON document (`--output json`), and lines in the peers kit's
//! results.jsonl format (`"peer": "fabric"`). Pure formatting, except
//! [`Report::append_jsonl`], which appends to a file.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use serde_json::{Map, Value, json};

use crate::args::Step;
use crate::floor::Floor;
use crate::machine::Machine;
use crate::stats::{Latency, median_of, round};
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

/// A step that failed or was skipped.
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
    /// Raw tonic figures.
    pub floor: Option<Floor>,
    /// (e).
    pub startup: Option<Startup>,
    /// (a).
    pub throughput: Option<Throughput>,
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
    /// Failed or skipped steps.
    pub errors: Vec<StepError>,
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
            floor: None,
            startup: None,
            throughput: None,
            latency: None,
            sleep: None,
            burn: None,
            scale: None,
            many_nodes: None,
            errors: Vec::new(),
        }
    }

    /// Records a failed step (and says so on stderr at once).
    pub fn fail(&mut self, step: Step, err: &anyhow::Error) {
        let error = format!("{err:#}").replace('\n', " ");
        eprintln!("weft bench: {} failed: {error}", step.name());
        self.errors.push(StepError { step, error });
    }

    fn error_of(&self, step: Step) -> Option<&str> {
        self.errors
            .iter()
            .find(|e| e.step == step)
            .map(|e| e.error.as_str())
    }

    fn config(&self) -> String {
        match &self.external {
            Some(url) => format!("external cluster at {url}; client = one weft process"),
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

    /// The readable table: a header line, then a Markdown table.
    pub fn table(&self) -> String {
        let m = &self.machine;
        let mut out = vec![format!(
            "weft bench {} — {}, {} CPUs ({}), {:.1} GiB, {} {}{}",
            env!("CARGO_PKG_VERSION"),
            humantime::format_rfc3339_seconds(self.started),
            m.cpus,
            m.cpu_model.as_deref().unwrap_or("cpu ?"),
            m.mem_gib.unwrap_or(0.0),
            m.os,
            m.kernel.as_deref().unwrap_or(""),
            if self.quick {
                " — QUICK RUN: scaled-down counts, not comparable"
            } else {
                ""
            }
        )];
        out.push(format!("cluster: {}", self.config()));
        out.push(String::new());
        out.push("| figure | Weft | floor (raw tonic, same run) | Weft / floor |".to_owned());
        out.push("|---|---:|---:|---:|".to_owned());
        let f = self.floor.as_ref();
        let mut row = |what: &str, weft: String, floor: String, ratio: String| {
            out.push(format!("| {what} | {weft} | {floor} | {ratio} |"));
        };

        match (&self.throughput, self.error_of(Step::Throughput)) {
            (Some(t), _) => {
                let tps = t.median_tps().unwrap_or(0.0);
                let runs: Vec<String> = t.runs.iter().map(|(r, _)| num(*r, 0)).collect();
                row(
                    &format!(
                        "(a) throughput, {} noop, tasks/s (median of {})",
                        t.n,
                        t.runs.len()
                    ),
                    format!("{} ({})", num(tps, 0), runs.join(", ")),
                    f.map_or("—".into(), |f| {
                        format!("{} unary calls/s, 64 in flight", num(f.unary_per_s, 0))
                    }),
                    f.map_or("—".into(), |f| ratio(tps, f.unary_per_s)),
                );
                row(
                    "(a) CPU per task: client / cluster",
                    format!(
                        "{} / {} µs",
                        opt(t.client_cpu_us(), 1),
                        opt(t.cluster_cpu_us(), 0)
                    ),
                    "—".into(),
                    "—".into(),
                );
            }
            (None, Some(err)) => row("(a) throughput", failed(err), "—".into(), "—".into()),
            (None, None) => {}
        }
        match (&self.latency, self.error_of(Step::Latency)) {
            (Some((lat, _)), _) => {
                row(
                    &format!("(b) round trip p50, µs ({} sequential)", lat.n),
                    num(lat.p50_us, 0),
                    f.map_or("—".into(), |f| {
                        format!("{} (Run stream)", num(f.run.p50_us, 0))
                    }),
                    f.map_or("—".into(), |f| ratio(lat.p50_us, f.run.p50_us)),
                );
                row(
                    "(b) round trip p99, µs",
                    num(lat.p99_us, 0),
                    f.map_or("—".into(), |f| {
                        format!("{} (Run stream)", num(f.run.p99_us, 0))
                    }),
                    f.map_or("—".into(), |f| ratio(lat.p99_us, f.run.p99_us)),
                );
            }
            (None, Some(err)) => row("(b) latency", failed(err), "—".into(), "—".into()),
            (None, None) => {}
        }
        match (&self.sleep, self.error_of(Step::Sleep)) {
            (Some(s), _) => {
                let wall = s.median_wall().unwrap_or(0.0);
                row(
                    &format!("(c) {} × sleep 50ms on 2 slots, wall s", s.n),
                    format!("{} (eff {})", num(wall, 2), num(s.ideal_s / wall, 2)),
                    format!("ideal {}", num(s.ideal_s, 2)),
                    ratio(wall, s.ideal_s),
                );
            }
            (None, Some(err)) => row("(c) sleep", failed(err), "—".into(), "—".into()),
            (None, None) => {}
        }
        match (&self.burn, self.error_of(Step::Burn)) {
            (Some(b), _) => {
                let wall = b.parallel.median_wall().unwrap_or(0.0);
                row(
                    &format!("(d) {} × spin 100ms on 2 slots, wall s", b.parallel.n),
                    format!(
                        "{} (eff {}; t1 {} ms → ideal {})",
                        num(wall, 2),
                        num(b.parallel.ideal_s / wall, 2),
                        num(b.single_s * 1e3, 0),
                        num(b.ideal_measured_s, 2)
                    ),
                    format!("ideal {}", num(b.parallel.ideal_s, 2)),
                    ratio(wall, b.parallel.ideal_s),
                );
            }
            (None, Some(err)) => row("(d) burn", failed(err), "—".into(), "—".into()),
            (None, None) => {}
        }
        match (&self.startup, self.error_of(Step::Startup)) {
            (Some(s), _) => {
                let runs: Vec<String> = s.runs.iter().map(|r| num(*r, 3)).collect();
                row(
                    &format!(
                        "(e) startup to first result, s (median of {})",
                        s.runs.len()
                    ),
                    format!(
                        "{} ({})",
                        num(median_of(s.runs.iter().copied()).unwrap_or(0.0), 3),
                        runs.join(", ")
                    ),
                    "—".into(),
                    "—".into(),
                );
            }
            (None, Some(err)) => row("(e) startup", failed(err), "—".into(), "—".into()),
            (None, None) => {}
        }
        match (&self.scale, self.error_of(Step::Scale)) {
            (Some(s), _) => {
                row(
                    &format!("scale: submit rate, {} tasks queued, tasks/s", s.tasks),
                    num(s.submit_rate(), 0),
                    f.map_or("—".into(), |f| {
                        format!("{} specs/s through Submit", num(f.submit_specs_per_s, 0))
                    }),
                    f.map_or("—".into(), |f| {
                        ratio(s.submit_rate(), f.submit_specs_per_s)
                    }),
                );
                row(
                    "scale: coordinator memory per queued task",
                    format!(
                        "{} B (RSS {} → {} MiB; coordinator CPU {} µs/task)",
                        opt(s.bytes_per_task(), 0),
                        mib(s.rss_before),
                        mib(s.rss_after),
                        opt(
                            s.coordinator_cpu_s.map(|c| c / s.tasks.max(1) as f64 * 1e6),
                            1
                        )
                    ),
                    "—".into(),
                    "—".into(),
                );
            }
            (None, Some(err)) => row("scale", failed(err), "—".into(), "—".into()),
            (None, None) => {}
        }
        match (&self.many_nodes, self.error_of(Step::ManyNodes)) {
            (Some(m), _) => {
                row(
                    &format!("many nodes: {} idle simulated nodes", m.nodes),
                    format!(
                        "RSS {} MiB (+{} KiB/node), CPU {} % of a core over {} s; \
                         registered in {} s; {} listed, {} streams up",
                        mib(m.rss_idle),
                        opt(m.bytes_per_node().map(|b| b / 1024.0), 1),
                        opt(m.cpu_pct, 2),
                        num(m.window_s, 1),
                        num(m.connect_s, 2),
                        m.connected_after,
                        m.streams_alive
                    ),
                    "—".into(),
                    "—".into(),
                );
            }
            (None, Some(err)) => row("many nodes", failed(err), "—".into(), "—".into()),
            (None, None) => {}
        }
        if let Some(f) = f {
            out.push(String::new());
            out.push(format!(
                "floor detail: unary p50/p99 {}/{} µs; Run (server stream, 1 event) p50/p99 {}/{} µs; \
                 {} unary calls/s (64 in flight); {} msgs/s over one bidi stream (echoed); \
                 {} specs/s through 5,000-spec Submit calls",
                num(f.unary.p50_us, 0),
                num(f.unary.p99_us, 0),
                num(f.run.p50_us, 0),
                num(f.run.p99_us, 0),
                num(f.unary_per_s, 0),
                num(f.stream_msgs_per_s, 0),
                num(f.submit_specs_per_s, 0)
            ));
        }
        if let Some((lat, _)) = &self.latency {
            out.push(format!(
                "latency detail: p90 {} / mean {} / min {} / max {} µs",
                num(lat.p90_us, 0),
                num(lat.mean_us, 0),
                num(lat.min_us, 0),
                num(lat.max_us, 0)
            ));
        }
        let noise = self.noise_max();
        if let Some((foreign, steal)) = noise {
            out.push(format!(
                "noise: max foreign CPU {foreign:.2} s / steal {steal:.2} s in a timed phase \
                 (CPU used by other processes on this host; ≈0 for a clean run)"
            ));
        }
        for e in &self.errors {
            if e.error.starts_with("skipped") {
                out.push(format!("{}: {}", e.step.name(), e.error));
            }
        }
        out.join("\n")
    }

    fn metered(&self) -> Vec<&Metered> {
        let mut all: Vec<&Metered> = Vec::new();
        if let Some(t) = &self.throughput {
            all.extend(t.runs.iter().map(|(_, m)| m));
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

    fn noise_max(&self) -> Option<(f64, f64)> {
        let all = self.metered();
        let foreign = all
            .iter()
            .filter_map(|m| m.foreign_cpu_s)
            .reduce(f64::max)?;
        let steal = all.iter().filter_map(|m| m.steal_s).reduce(f64::max)?;
        Some((foreign, steal))
    }

    /// Every figure as one JSON document.
    pub fn json(&self) -> Value {
        let m = &self.machine;
        let errors: Map<String, Value> = self
            .errors
            .iter()
            .map(|e| (e.step.name().to_owned(), Value::from(e.error.clone())))
            .collect();
        json!({
            "weft_version": env!("CARGO_PKG_VERSION"),
            "run_id": self.run_id,
            "date": humantime::format_rfc3339_seconds(self.started).to_string(),
            "finished": self.finished.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "quick": self.quick,
            "cluster": self.config(),
            "machine": {
                "cpus": m.cpus,
                "cpu_model": m.cpu_model,
                "mem_gib": m.mem_gib.map(|g| round(g, 1)),
                "kernel": m.kernel,
                "os": m.os,
            },
            "floor": self.floor.as_ref().map(|f| json!({
                "unary": f.unary.json(),
                "run_stream": f.run.json(),
                "unary_calls_per_s": round(f.unary_per_s, 0),
                "unary_concurrency": 64,
                "bidi_stream_msgs_per_s": round(f.stream_msgs_per_s, 0),
                "submit_specs_per_s": round(f.submit_specs_per_s, 0),
            })),
            "startup_s": self.startup.as_ref().map(|s| json!({
                "median": median_of(s.runs.iter().copied()).map(|v| round(v, 3)),
                "runs": s.runs.iter().map(|r| round(*r, 3)).collect::<Vec<_>>(),
            })),
            "throughput": self.throughput.as_ref().map(|t| {
                let tps = t.median_tps();
                json!({
                    "n": t.n,
                    "median_tps": tps.map(|v| round(v, 1)),
                    "runs": t.runs.iter().map(|(r, _)| round(*r, 1)).collect::<Vec<_>>(),
                    "client_cpu_us_per_task": t.client_cpu_us().map(|v| round(v, 1)),
                    "cluster_cpu_us_per_task": t.cluster_cpu_us().map(|v| round(v, 1)),
                    "ratio_to_floor_unary_calls": self.floor.as_ref()
                        .zip(tps).map(|(f, tps)| round(tps / f.unary_per_s, 4)),
                })
            }),
            "latency": self.latency.as_ref().map(|(lat, _)| {
                let mut v = lat.json();
                if let Some(f) = &self.floor {
                    v["p50_ratio_to_floor_run"] = round(lat.p50_us / f.run.p50_us, 2).into();
                    v["p99_ratio_to_floor_run"] = round(lat.p99_us / f.run.p99_us, 2).into();
                    v["p50_ratio_to_floor_unary"] = round(lat.p50_us / f.unary.p50_us, 2).into();
                }
                v
            }),
            "sleep": self.sleep.as_ref().map(parallel_json),
            "burn": self.burn.as_ref().map(|b| {
                let mut v = parallel_json(&b.parallel);
                v["burn_single_s"] = round(b.single_s, 4).into();
                v["ideal_measured_s"] = round(b.ideal_measured_s, 3).into();
                v
            }),
            "scale": self.scale.as_ref().map(|s| json!({
                "tasks": s.tasks,
                "queued_seen": s.queued_seen,
                "submit_s": round(s.submit_s, 3),
                "submit_tasks_per_s": round(s.submit_rate(), 0),
                "submit_ratio_to_floor": self.floor.as_ref()
                    .map(|f| round(s.submit_rate() / f.submit_specs_per_s, 4)),
                "rss_before_bytes": s.rss_before,
                "rss_after_bytes": s.rss_after,
                "bytes_per_task": s.bytes_per_task().map(|v| round(v, 1)),
                "coordinator_cpu_us_per_task": s.coordinator_cpu_s
                    .map(|c| round(c / s.tasks.max(1) as f64 * 1e6, 2)),
            })),
            "many_nodes": self.many_nodes.as_ref().map(|m| json!({
                "nodes": m.nodes,
                "connect_s": round(m.connect_s, 3),
                "rss_before_bytes": m.rss_before,
                "rss_idle_start_bytes": m.rss_idle_start,
                "rss_idle_bytes": m.rss_idle,
                "bytes_per_node": m.bytes_per_node().map(|v| round(v, 0)),
                "idle_cpu_pct": m.cpu_pct.map(|v| round(v, 3)),
                "window_s": round(m.window_s, 2),
                "connected_after": m.connected_after,
                "streams_alive": m.streams_alive,
            })),
            "errors": errors,
        })
    }

    /// The peers kit's results.jsonl records for this run, one per metric.
    pub fn jsonl_records(&self) -> Vec<Value> {
        let ts =
            humantime::format_rfc3339_seconds(self.finished.unwrap_or(self.started)).to_string();
        let mut out = Vec::new();
        let mut emit = |metric: &str, value: Value, unit: Value, detail: Value| {
            let mut rec = Map::new();
            rec.insert("run_id".into(), self.run_id.clone().into());
            rec.insert("peer".into(), "fabric".into());
            rec.insert("metric".into(), metric.into());
            rec.insert("value".into(), value);
            rec.insert("unit".into(), unit);
            rec.insert("ts".into(), ts.clone().into());
            if self.quick {
                rec.insert("quick".into(), true.into());
            }
            if let Value::Object(detail) = detail {
                rec.extend(detail);
            }
            out.push(Value::Object(rec));
        };
        emit(
            "env",
            Value::Null,
            Value::Null,
            json!({
                "version": format!("weft {}", env!("CARGO_PKG_VERSION")),
                "config": self.config(),
            }),
        );
        let error = |step: Step| json!({ "error": self.error_of(step).unwrap_or("not run") });
        match &self.startup {
            Some(s) => emit(
                "startup_s",
                median_of(s.runs.iter().copied())
                    .map(|v| round(v, 3))
                    .into(),
                "s".into(),
                json!({
                    "runs": s.runs.iter().map(|r| round(*r, 3)).collect::<Vec<_>>(),
                    "listen_addrs": ["127.0.0.1"],
                    "loopback_only": true,
                }),
            ),
            None if self.error_of(Step::Startup).is_some() => {
                emit("startup_s", Value::Null, "s".into(), error(Step::Startup))
            }
            None => {}
        }
        match &self.throughput {
            Some(t) => {
                let mut detail = json!({
                    "runs": t.runs.iter().map(|(r, _)| round(*r, 1)).collect::<Vec<_>>(),
                    "n": t.n,
                    "client_cpu_us_per_task": t.client_cpu_us().map(|v| round(v, 1)),
                    "cluster_cpu_us_per_task": t.cluster_cpu_us().map(|v| round(v, 1)),
                });
                merge_noise(&mut detail, t.runs.iter().map(|(_, m)| m));
                emit(
                    "throughput_tps",
                    t.median_tps().map(|v| round(v, 1)).into(),
                    "tasks/s".into(),
                    detail,
                );
            }
            None if self.error_of(Step::Throughput).is_some() => emit(
                "throughput_tps",
                Value::Null,
                Value::Null,
                error(Step::Throughput),
            ),
            None => {}
        }
        match &self.latency {
            Some((lat, m)) => {
                let mut detail = lat.json();
                merge_noise(&mut detail, std::iter::once(m));
                emit(
                    "latency_us",
                    round(lat.p50_us, 1).into(),
                    "us".into(),
                    detail,
                );
            }
            None if self.error_of(Step::Latency).is_some() => {
                emit("latency_us", Value::Null, Value::Null, error(Step::Latency))
            }
            None => {}
        }
        match &self.sleep {
            Some(s) => {
                let wall = s.median_wall();
                emit(
                    "sleep_wall_s",
                    wall.map(|w| round(w, 3)).into(),
                    "s".into(),
                    parallel_json(s),
                );
            }
            None if self.error_of(Step::Sleep).is_some() => {
                emit("sleep_wall_s", Value::Null, Value::Null, error(Step::Sleep))
            }
            None => {}
        }
        match &self.burn {
            Some(b) => {
                let mut detail = parallel_json(&b.parallel);
                detail["burn_single_s"] = round(b.single_s, 4).into();
                detail["ideal_measured_s"] = round(b.ideal_measured_s, 3).into();
                emit(
                    "burn_wall_s",
                    b.parallel.median_wall().map(|w| round(w, 3)).into(),
                    "s".into(),
                    detail,
                );
            }
            None if self.error_of(Step::Burn).is_some() => {
                emit("burn_wall_s", Value::Null, Value::Null, error(Step::Burn))
            }
            None => {}
        }
        out
    }

    /// Appends [`Report::jsonl_records`] to `path`, one line each.
    pub fn append_jsonl(&self, path: &Path) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let mut text = String::new();
        for rec in self.jsonl_records() {
            text.push_str(&rec.to_string());
            text.push('\n');
        }
        file.write_all(text.as_bytes())
    }
}

/// The peers kit's per-run fields of a parallel step.
fn parallel_json(p: &Parallel) -> Value {
    let wall = p.median_wall();
    let mut v = json!({
        "runs": p.runs.iter().map(|m| round(m.wall.as_secs_f64(), 3)).collect::<Vec<_>>(),
        "n": p.n,
        "ideal_s": round(p.ideal_s, 3),
        "efficiency": wall.map(|w| round(p.ideal_s / w, 3)),
    });
    merge_noise(&mut v, p.runs.iter());
    v
}

/// Worst noise over several runs, as the peers kit's `merge_noise`.
fn merge_noise<'a>(detail: &mut Value, runs: impl Iterator<Item = &'a Metered>) {
    let runs: Vec<&Metered> = runs.collect();
    let worst = |pick: fn(&Metered) -> Option<f64>, digits| -> Value {
        let values: Option<Vec<f64>> = runs.iter().map(|m| pick(m)).collect();
        values
            .and_then(|v| v.into_iter().reduce(f64::max))
            .map(|v| round(v, digits))
            .into()
    };
    detail["host_busy_pct"] = worst(|m| m.host_busy_pct, 1);
    detail["foreign_cpu_s"] = worst(|m| m.foreign_cpu_s, 2);
    detail["steal_s"] = worst(|m| m.steal_s, 2);
}

/// `20261125T151207Z` for a time.
fn compact_utc(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .replace(['-', ':'], "")
}

/// A number with thousands separators and `digits` decimals.
fn num(value: f64, digits: usize) -> String {
    let text = format!("{:.*}", digits, value.abs());
    let (int, frac) = text
        .split_once('.')
        .map_or((text.as_str(), ""), |(i, f)| (i, f));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if value < 0.0 { "-" } else { "" };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| num(v, digits))
}

fn mib(bytes: Option<u64>) -> String {
    opt(bytes.map(|b| b as f64 / (1024.0 * 1024.0)), 1)
}

fn ratio(weft: f64, floor: f64) -> String {
    if floor > 0.0 {
        format!(
            "{}×",
            num(weft / floor, if weft / floor < 10.0 { 2 } else { 1 })
        )
    } else {
        "n/a".to_owned()
    }
}

fn failed(err: &str) -> String {
    let short: String = err.chars().take(120).collect();
    format!("failed: {short}")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn metered(wall_ms: u64) -> Metered {
        Metered {
            wall: Duration::from_millis(wall_ms),
            client_cpu: Some(0.2),
            cluster_cpu: Some(1.0),
            host_busy_pct: Some(90.0),
            foreign_cpu_s: Some(0.01),
            steal_s: Some(0.0),
        }
    }

    fn report() -> Report {
        let machine = Machine {
            cpus: 2,
            cpu_model: Some("AMD EPYC".into()),
            mem_gib: Some(23.5),
            kernel: Some("6.1".into()),
            os: "linux-x86_64".into(),
        };
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let mut r = Report::new(machine, started, None, false, None);
        r.startup = Some(Startup {
            runs: vec![0.2, 0.1, 0.3],
        });
        r.throughput = Some(Throughput::new(
            20_000,
            vec![
                (10_000.0, metered(2000)),
                (8_000.0, metered(2500)),
                (12_000.0, metered(1666)),
            ],
        ));
        let samples: Vec<Duration> = (1..=2000).map(Duration::from_micros).collect();
        r.latency = Some((Latency::from_samples(&samples).unwrap(), metered(3000)));
        r.sleep = Some(Parallel {
            n: 200,
            ideal_s: 5.0,
            runs: vec![metered(5100), metered(5050), metered(5200)],
        });
        r.errors.push(StepError {
            step: Step::Burn,
            error: "boom".into(),
        });
        r
    }

    #[test]
    fn jsonl_lines_follow_the_peers_kit_format() {
        let recs = report().jsonl_records();
        let by: std::collections::BTreeMap<&str, &Value> = recs
            .iter()
            .map(|r| (r["metric"].as_str().unwrap(), r))
            .collect();
        for r in &recs {
            assert_eq!(r["peer"], "fabric");
            assert_eq!(r["run_id"], "20261118T110640Z");
            assert!(r["ts"].as_str().unwrap().starts_with("2026-11-18T"));
        }
        assert!(by["env"]["config"].as_str().unwrap().contains("weft-node"));
        let st = by["startup_s"];
        assert_eq!(
            (st["value"].clone(), st["unit"].clone()),
            (json!(0.2), json!("s"))
        );
        assert_eq!(st["runs"], json!([0.2, 0.1, 0.3]));
        assert_eq!(st["loopback_only"], true);
        let tp = by["throughput_tps"];
        assert_eq!(tp["value"], json!(10_000.0));
        assert_eq!(tp["n"], 20_000);
        // median client CPU 0.2 s over 20,000 tasks = 10 µs/task
        assert_eq!(tp["client_cpu_us_per_task"], json!(10.0));
        assert_eq!(tp["cluster_cpu_us_per_task"], json!(50.0));
        assert_eq!(tp["foreign_cpu_s"], json!(0.01));
        let lat = by["latency_us"];
        assert_eq!(lat["value"], lat["p50_us"]);
        assert_eq!(
            (lat["p99_us"].clone(), lat["n"].clone()),
            (json!(1980.0), json!(2000))
        );
        let sl = by["sleep_wall_s"];
        assert_eq!(sl["value"], json!(5.1));
        assert_eq!(sl["ideal_s"], json!(5.0));
        assert_eq!(sl["efficiency"], json!(0.98));
        assert_eq!(sl["runs"], json!([5.1, 5.05, 5.2]));
        let bu = by["burn_wall_s"];
        assert_eq!(
            (bu["value"].clone(), bu["error"].clone()),
            (Value::Null, json!("boom"))
        );
    }

    #[test]
    fn every_jsonl_record_is_one_line_of_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        let r = report();
        r.append_jsonl(&path).unwrap();
        r.append_jsonl(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 * r.jsonl_records().len());
        for line in lines {
            let v: Value = serde_json::from_str(line).unwrap();
            assert!(v.get("metric").is_some() && v.get("value").is_some());
        }
    }

    #[test]
    fn the_table_shows_figures_and_failures() {
        let table = report().table();
        assert!(table.contains("| (a) throughput, 20000 noop"), "{table}");
        assert!(table.contains("10,000 (10,000, 8,000, 12,000)"), "{table}");
        assert!(table.contains("| (d) burn | failed: boom"), "{table}");
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(num(1234567.891, 1), "1,234,567.9");
        assert_eq!(num(999.0, 0), "999");
        assert_eq!(num(-1500.0, 0), "-1,500");
        assert_eq!(ratio(50.0, 10.0), "5.00×");
        assert_eq!(ratio(1.0, 0.0), "n/a");
    }
}
