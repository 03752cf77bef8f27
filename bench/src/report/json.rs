//! The machine renderings of [`Report::figures`]: one JSON document
//! (`--output json`) and the peers kit's results.jsonl records
//! (`"peer": "fabric"`, one per protocol metric). Rounding and field names
//! only; [`Report::append_jsonl`] is the one place that writes a file.

use std::io::Write;
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::args::Step;
use crate::stats::round;

use super::Report;
use super::figures::{Measured, Noise, Outcome, ParallelFigures, RunCpu};

impl Report {
    /// Every figure as one JSON document.
    pub fn json(&self) -> Value {
        let m = &self.machine;
        let errors: Map<String, Value> = self
            .errors
            .iter()
            .map(|e| (e.step.name().to_owned(), Value::from(e.error.clone())))
            .collect();
        let skipped: Map<String, Value> = self
            .skipped
            .iter()
            .map(|e| (e.step.name().to_owned(), Value::from(e.error.clone())))
            .collect();
        let mut doc = json!({
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
            "errors": errors,
            "skipped": skipped,
        });
        // Every step has its key; null where it did not run.
        for step in Step::ALL {
            doc[json_key(step)] = Value::Null;
        }
        for figure in self.figures() {
            if let Outcome::Measured(measured) = &figure.outcome {
                doc[json_key(figure.step)] = json_section(measured);
            }
        }
        doc
    }

    /// The peers kit's results.jsonl records for this run, one per metric:
    /// `env`, then (e), (a), (b), (c), (d) in run order.
    pub fn jsonl_records(&self) -> Vec<Value> {
        let ts =
            humantime::format_rfc3339_seconds(self.finished.unwrap_or(self.started)).to_string();
        let record = |metric: &str, value: Value, unit: Value, detail: Value| {
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
            Value::Object(rec)
        };
        let mut out = vec![record(
            "env",
            Value::Null,
            Value::Null,
            json!({
                "version": format!("weft {}", env!("CARGO_PKG_VERSION")),
                "config": self.config(),
            }),
        )];
        for figure in self.figures() {
            let Some((metric, unit_on_error)) = jsonl_metric(figure.step) else {
                continue;
            };
            out.push(match &figure.outcome {
                // Nothing measured and nothing failed: no record.
                Outcome::Skipped(_) => continue,
                Outcome::Failed(error) => record(
                    metric,
                    Value::Null,
                    unit_on_error,
                    json!({ "error": error }),
                ),
                Outcome::Measured(measured) => {
                    let (value, unit, detail) = jsonl_parts(measured);
                    record(metric, value, unit, detail)
                }
            });
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

/// A step's key in the JSON document.
fn json_key(step: Step) -> &'static str {
    match step {
        Step::Floor => "floor",
        Step::Startup => "startup_s",
        Step::Throughput => "throughput",
        Step::PolicyMix => "policy_mix",
        Step::Latency => "latency",
        Step::Sleep => "sleep",
        Step::Burn => "burn",
        Step::Scale => "scale",
        Step::ManyNodes => "many_nodes",
        Step::Dag => "dag",
        Step::Fairness => "fairness",
        Step::Durable => "durable",
        Step::Retention => "retention",
        Step::Recovery => "recovery",
    }
}

/// A step's results.jsonl metric and the unit its error record carries;
/// `None` for the steps that are not protocol metrics.
fn jsonl_metric(step: Step) -> Option<(&'static str, Value)> {
    Some(match step {
        Step::Startup => ("startup_s", "s".into()),
        Step::Throughput => ("throughput_tps", Value::Null),
        Step::Latency => ("latency_us", Value::Null),
        Step::Sleep => ("sleep_wall_s", Value::Null),
        Step::Burn => ("burn_wall_s", Value::Null),
        Step::Floor
        | Step::PolicyMix
        | Step::Scale
        | Step::ManyNodes
        | Step::Dag
        | Step::Fairness
        | Step::Durable
        | Step::Retention
        | Step::Recovery => return None,
    })
}

/// A measured step's section of the JSON document.
fn json_section(measured: &Measured<'_>) -> Value {
    match measured {
        Measured::Durable(d) => {
            let (apparent, allocated) = d.bytes_per_task();
            let dir = |s: &crate::durable::DirSize| {
                json!({"files": s.files, "apparent_bytes": s.apparent_bytes,
                       "allocated_bytes": s.allocated_bytes})
            };
            json!({
                "fdatasync_4k_append_us": d.fdatasync.json(),
                "fdatasync_4k_overwrite_us": d.fdatasync_overwrite.json(),
                "fdatasync_4k_overwrite_paced_us": d.fdatasync_paced.json(),
                "paced_gap_us": round(d.paced_gap.as_secs_f64() * 1e6, 1),
                "round_trip_memory_us": d.memory.json(),
                "round_trip_durable_us": d.durable.json(),
                "bound_p50_us": round(d.bound_p50_us(), 1),
                "durable_p50_over_bound": round(d.p50_over_bound(), 3),
                "overwrite_bound_p50_us": round(d.overwrite_bound_p50_us(), 1),
                "durable_p50_over_overwrite_bound": round(d.durable.p50_us / d.overwrite_bound_p50_us(), 3),
                "paced_bound_p50_us": round(d.paced_bound_p50_us(), 1),
                "durable_p50_over_paced_bound": round(d.durable.p50_us / d.paced_bound_p50_us(), 3),
                "durable_p99_over_p50": round(d.p99_over_p50(), 3),
                "tasks_stored": d.tasks_stored,
                "data_dir_empty": dir(&d.dir_empty),
                "data_dir_after": dir(&d.dir_after),
                "apparent_bytes_per_task": round(apparent, 1),
                "allocated_bytes_per_task": round(allocated, 1),
            })
        }
        Measured::Retention(r) => json!({
            "retention_s": r.retention.as_secs_f64(),
            "wave": r.wave,
            "tasks": r.tasks(),
            "run_s": round(r.run_s(), 2),
            "growth_second_half_over_first": r.growth().map(|g| round(g, 3)),
            "bounded": r.bounded(),
            "samples": r.samples.iter().map(|s| json!({
                "at_s": round(s.at_s, 2),
                "tasks": s.tasks,
                "files": s.size.files,
                "apparent_bytes": s.size.apparent_bytes,
                "allocated_bytes": s.size.allocated_bytes,
            })).collect::<Vec<_>>(),
        }),
        Measured::Recovery(r) => json!({
            "tasks": r.tasks,
            "queued_seen": r.queued_seen,
            "submit_s": round(r.submit_s, 3),
            "rss_before_crash": r.rss_before_crash,
            "peak_rss_before_crash": r.peak_before_crash,
            "listening_s": round(r.listening_s, 3),
            "serving_s": round(r.serving_s, 3),
            "rss_serving": r.rss_serving,
            "peak_rss_recovery": r.peak_recovery,
            "peak_recovery_over_rss_before": r.peak_over_before().map(|v| round(v, 3)),
        }),
        Measured::Floor(f) => json!({
            "unary": f.unary.json(),
            "run_stream": f.run.json(),
            "unary_calls_per_s": round(f.unary_per_s, 0),
            "unary_concurrency": 64,
            "bidi_stream_msgs_per_s": round(f.stream_msgs_per_s, 0),
            "submit_specs_per_s": round(f.submit_specs_per_s, 0),
        }),
        Measured::Startup(s) => json!({
            "median": s.median.map(|v| round(v, 3)),
            "runs": s.runs.iter().map(|r| round(*r, 3)).collect::<Vec<_>>(),
        }),
        Measured::Throughput(t) => json!({
            "n": t.n,
            "median_tps": t.median_tps.map(|v| round(v, 1)),
            "runs": t.runs.iter().map(|r| round(*r, 1)).collect::<Vec<_>>(),
            "client_cpu_us_per_task": t.client_cpu_us.map(|v| round(v, 1)),
            "cluster_cpu_us_per_task": t.cluster_cpu_us.map(|v| round(v, 1)),
            "ratio_to_floor_unary_calls": t.floor_unary_per_s
                .zip(t.median_tps).map(|(f, tps)| round(tps / f, 4)),
        }),
        Measured::Latency(l) => {
            let lat = l.latency;
            let mut v = lat.json();
            if let Some((run, unary)) = l.floor {
                v["p50_ratio_to_floor_run"] = round(lat.p50_us / run.p50_us, 2).into();
                v["p99_ratio_to_floor_run"] = round(lat.p99_us / run.p99_us, 2).into();
                v["p50_ratio_to_floor_unary"] = round(lat.p50_us / unary.p50_us, 2).into();
            }
            v
        }
        Measured::PolicyMix(p) => json!({
            "n": p.n,
            "fields": p.fields,
            "plain_tps": p.plain.iter().map(|r| round(*r, 1)).collect::<Vec<_>>(),
            "mixed_tps": p.mixed.iter().map(|r| round(*r, 1)).collect::<Vec<_>>(),
            "plain_median_tps": p.plain_median.map(|v| round(v, 1)),
            "mixed_median_tps": p.mixed_median.map(|v| round(v, 1)),
            "mixed_over_plain": p.plain_median.zip(p.mixed_median).map(|(a, b)| round(b / a, 3)),
            "plain_cpu": run_cpu(&p.plain_cpu),
            "mixed_cpu": run_cpu(&p.mixed_cpu),
        }),
        Measured::Dag(d) => {
            let pair = |v: Option<(f64, f64)>| {
                v.map(|(median, max)| json!({"median": round(median, 2), "max": round(max, 2)}))
            };
            json!({
                "levels": d.dag.levels,
                "width": d.dag.width,
                "tasks": d.dag.levels * (d.dag.width + 1),
                "task": d.dag.task,
                "slots": d.dag.slots,
                "submit_s": round(d.dag.submit_s, 3),
                "wall_s": round(d.dag.wall_s, 3),
                "start_delay_ms": pair(d.start_delay_ms),
                "join_delay_ms": pair(d.join_delay_ms),
                "level_run_ms": pair(d.level_run_ms),
            })
        }
        Measured::Fairness(f) => {
            let share = |s: &crate::policy::FairShare| {
                json!({
                    "backlog_submit_s": round(s.backlog_submit_s, 3),
                    "late_finish_s": round(s.late_finish_s, 4),
                    "late_share": round(s.late_share, 4),
                    "backlog_in_window": s.backlog_in_window,
                    "backlog_drain_s": round(s.backlog_drain_s, 3),
                })
            };
            json!({
                "backlog": f.backlog,
                "late": f.late,
                "fair_keys": share(&f.fair),
                "fifo": share(&f.fifo),
            })
        }
        Measured::Sleep(p) => parallel_json(p),
        Measured::Burn(b) => {
            let mut v = parallel_json(&b.parallel);
            v["burn_single_s"] = round(b.single_s, 4).into();
            v["ideal_measured_s"] = round(b.ideal_measured_s, 3).into();
            v
        }
        Measured::Scale(s) => json!({
            "tasks": s.scale.tasks,
            "queued_seen": s.scale.queued_seen,
            "submit_s": round(s.scale.submit_s, 3),
            "submit_tasks_per_s": round(s.submit_rate, 0),
            "submit_ratio_to_floor": s.floor_submit_per_s.map(|f| round(s.submit_rate / f, 4)),
            "rss_before_bytes": s.scale.rss_before,
            "rss_after_bytes": s.scale.rss_after,
            "bytes_per_task": s.bytes_per_task.map(|v| round(v, 1)),
            "coordinator_cpu_us_per_task": s.coordinator_cpu_us.map(|c| round(c, 2)),
        }),
        Measured::ManyNodes(m) => json!({
            "nodes": m.many.nodes,
            "connect_s": round(m.many.connect_s, 3),
            "rss_before_bytes": m.many.rss_before,
            "rss_idle_start_bytes": m.many.rss_idle_start,
            "rss_idle_bytes": m.many.rss_idle,
            "bytes_per_node": m.bytes_per_node.map(|v| round(v, 0)),
            "idle_cpu_pct": m.many.cpu_pct.map(|v| round(v, 3)),
            "window_s": round(m.many.window_s, 2),
            "connected_after": m.many.connected_after,
            "streams_alive": m.many.streams_alive,
        }),
    }
}

/// A protocol step's results.jsonl value, unit and detail fields.
fn jsonl_parts(measured: &Measured<'_>) -> (Value, Value, Value) {
    match measured {
        Measured::Startup(s) => (
            s.median.map(|v| round(v, 3)).into(),
            "s".into(),
            json!({
                "runs": s.runs.iter().map(|r| round(*r, 3)).collect::<Vec<_>>(),
                "listen_addrs": ["127.0.0.1"],
                "loopback_only": true,
            }),
        ),
        Measured::Throughput(t) => {
            let mut detail = json!({
                "runs": t.runs.iter().map(|r| round(*r, 1)).collect::<Vec<_>>(),
                "n": t.n,
                "client_cpu_us_per_task": t.client_cpu_us.map(|v| round(v, 1)),
                "cluster_cpu_us_per_task": t.cluster_cpu_us.map(|v| round(v, 1)),
            });
            merge_noise(&mut detail, t.noise);
            (
                t.median_tps.map(|v| round(v, 1)).into(),
                "tasks/s".into(),
                detail,
            )
        }
        Measured::Latency(l) => {
            let mut detail = l.latency.json();
            merge_noise(&mut detail, l.noise);
            (round(l.latency.p50_us, 1).into(), "us".into(), detail)
        }
        Measured::Sleep(p) => (
            p.median_wall.map(|w| round(w, 3)).into(),
            "s".into(),
            parallel_json(p),
        ),
        Measured::Burn(b) => {
            let mut detail = parallel_json(&b.parallel);
            detail["burn_single_s"] = round(b.single_s, 4).into();
            detail["ideal_measured_s"] = round(b.ideal_measured_s, 3).into();
            (
                b.parallel.median_wall.map(|w| round(w, 3)).into(),
                "s".into(),
                detail,
            )
        }
        // Not protocol metrics: `jsonl_metric` keeps them out.
        Measured::Floor(_)
        | Measured::PolicyMix(_)
        | Measured::Scale(_)
        | Measured::ManyNodes(_)
        | Measured::Dag(_)
        | Measured::Fairness(_)
        | Measured::Durable(_)
        | Measured::Retention(_)
        | Measured::Recovery(_) => (Value::Null, Value::Null, Value::Null),
    }
}

/// One kind of policy-mix run's CPU.
fn run_cpu(c: &RunCpu) -> Value {
    json!({
        "client_cpu_us_per_task": c.client_us.map(|v| round(v, 2)),
        "cluster_cpu_us_per_task": c.cluster_us.map(|v| round(v, 2)),
        "busy_pct": c.busy_pct.map(|v| round(v, 1)),
    })
}

/// The peers kit's per-run fields of a parallel step.
fn parallel_json(p: &ParallelFigures) -> Value {
    let mut v = json!({
        "runs": p.walls.iter().map(|w| round(*w, 3)).collect::<Vec<_>>(),
        "n": p.n,
        "ideal_s": round(p.ideal_s, 3),
        "efficiency": p.median_wall.map(|w| round(p.ideal_s / w, 3)),
    });
    merge_noise(&mut v, p.noise);
    v
}

/// The noise fields, as the peers kit's `merge_noise` writes them.
fn merge_noise(detail: &mut Value, noise: Noise) {
    detail["host_busy_pct"] = noise.host_busy_pct.map(|v| round(v, 1)).into();
    detail["foreign_cpu_s"] = noise.foreign_cpu_s.map(|v| round(v, 2)).into();
    detail["steal_s"] = noise.steal_s.map(|v| round(v, 2)).into();
}
