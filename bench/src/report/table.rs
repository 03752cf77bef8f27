//! The readable rendering of [`Report::figures`]: a header line, then a
//! Markdown table (so it pastes into BENCHMARKS.md) with each figure beside
//! its floor, then detail lines. Formatting only.

use crate::args::Step;

use super::Report;
use super::figures::{Figure, Measured, Outcome, RunCpu};

/// One table row: figure, Weft, floor, Weft / floor.
type Row = [String; 4];

impl Report {
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
        let mut figures = self.figures();
        // The protocol's letters first, (e) after (d), then Weft's own steps.
        figures.sort_by_key(|f| row_order(f.step));
        for figure in &figures {
            for [what, weft, floor, ratio] in rows(figure) {
                out.push(format!("| {what} | {weft} | {floor} | {ratio} |"));
            }
        }
        for figure in &figures {
            if let Outcome::Measured(Measured::Floor(f)) = &figure.outcome {
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
        }
        for figure in &figures {
            if let Outcome::Measured(Measured::Latency(l)) = &figure.outcome {
                let lat = l.latency;
                out.push(format!(
                    "latency detail: p90 {} / mean {} / min {} / max {} µs",
                    num(lat.p90_us, 0),
                    num(lat.mean_us, 0),
                    num(lat.min_us, 0),
                    num(lat.max_us, 0)
                ));
            }
        }
        if let Some((foreign, steal)) = self.noise_max() {
            out.push(format!(
                "noise: max foreign CPU {foreign:.2} s / steal {steal:.2} s in a timed phase \
                 (CPU used by other processes on this host; ≈0 for a clean run)"
            ));
        }
        for e in &self.skipped {
            out.push(format!("{}: skipped: {}", e.step.name(), e.error));
        }
        out.join("\n")
    }
}

/// Where a step's rows sit in the table.
fn row_order(step: Step) -> u8 {
    match step {
        Step::Floor => 0,
        Step::Throughput => 1,
        Step::PolicyMix => 2,
        Step::Latency => 3,
        Step::Sleep => 4,
        Step::Burn => 5,
        Step::Startup => 6,
        Step::Scale => 7,
        Step::ManyNodes => 8,
        Step::Dag => 9,
        Step::Fairness => 10,
        Step::Durable => 11,
        Step::Retention => 12,
        Step::Recovery => 13,
    }
}

/// The short name of a step's row when it failed or was skipped.
fn failure_label(step: Step) -> &'static str {
    match step {
        Step::Floor => "floor (raw tonic)",
        Step::Throughput => "(a) throughput",
        Step::PolicyMix => "policy mix",
        Step::Latency => "(b) latency",
        Step::Sleep => "(c) sleep",
        Step::Burn => "(d) burn",
        Step::Startup => "(e) startup",
        Step::Scale => "scale",
        Step::ManyNodes => "many nodes",
        Step::Dag => "dag",
        Step::Fairness => "fairness",
        Step::Durable => "durable latency",
        Step::Retention => "retention",
        Step::Recovery => "recovery",
    }
}

/// The table rows of one figure.
fn rows(figure: &Figure<'_>) -> Vec<Row> {
    let none = || "—".to_owned();
    let measured = match &figure.outcome {
        Outcome::Failed(err) => {
            let what = failure_label(figure.step).to_owned();
            return vec![[what, failed(err), none(), none()]];
        }
        Outcome::Skipped(why) => {
            let what = failure_label(figure.step).to_owned();
            return vec![[what, format!("skipped: {why}"), none(), none()]];
        }
        Outcome::Measured(measured) => measured,
    };
    match measured {
        Measured::Floor(_) => Vec::new(),
        Measured::Durable(d) => {
            let pair =
                |l: &crate::stats::Latency| format!("{} / {}", num(l.p50_us, 0), num(l.p99_us, 0));
            let (apparent, allocated) = d.bytes_per_task();
            vec![
                [
                    format!(
                        "durable: write + fdatasync of a 4 KiB append beside the data dir, p50 / p99 µs ({})",
                        num(d.fdatasync.n as f64, 0)
                    ),
                    pair(&d.fdatasync),
                    none(),
                    none(),
                ],
                [
                    format!(
                        "durable: write + fdatasync of a 4 KiB overwrite in place beside the data dir, p50 / p99 µs ({})",
                        num(d.fdatasync_overwrite.n as f64, 0)
                    ),
                    pair(&d.fdatasync_overwrite),
                    "(no size change to commit)".to_owned(),
                    none(),
                ],
                [
                    format!(
                        "durable: the same overwrites, each after the disk idled {} µs (half the in-memory round trip, as a round trip spaces its commits), p50 / p99 µs ({})",
                        num(d.paced_gap.as_secs_f64() * 1e6, 0),
                        num(d.fdatasync_paced.n as f64, 0)
                    ),
                    pair(&d.fdatasync_paced),
                    none(),
                    none(),
                ],
                [
                    format!(
                        "durable: round trip, in-memory store, p50 / p99 µs ({} sequential)",
                        num(d.memory.n as f64, 0)
                    ),
                    pair(&d.memory),
                    none(),
                    none(),
                ],
                [
                    format!(
                        "durable: round trip, durable store, p50 µs ({} sequential; target ≤ bound)",
                        num(d.durable.n as f64, 0)
                    ),
                    num(d.durable.p50_us, 0),
                    format!(
                        "bound: in-memory p50 + 2 × append fdatasync p50 = {}",
                        num(d.bound_p50_us(), 0)
                    ),
                    ratio(d.durable.p50_us, d.bound_p50_us()),
                ],
                [
                    "durable: the same p50 against overwrites (the log writes its commits over zeros written ahead)".to_owned(),
                    num(d.durable.p50_us, 0),
                    format!(
                        "in-memory p50 + 2 × overwrite fdatasync p50 = {}",
                        num(d.overwrite_bound_p50_us(), 0)
                    ),
                    ratio(d.durable.p50_us, d.overwrite_bound_p50_us()),
                ],
                [
                    "durable: the same p50 against overwrites paced as its commits are".to_owned(),
                    num(d.durable.p50_us, 0),
                    format!(
                        "in-memory p50 + 2 × paced overwrite fdatasync p50 = {}",
                        num(d.paced_bound_p50_us(), 0)
                    ),
                    ratio(d.durable.p50_us, d.paced_bound_p50_us()),
                ],
                [
                    "durable: round trip, durable store, p99 µs (target ≤ 2 × p50)".to_owned(),
                    num(d.durable.p99_us, 0),
                    format!("p50 {}", num(d.durable.p50_us, 0)),
                    ratio(d.durable.p99_us, d.durable.p50_us),
                ],
                [
                    format!(
                        "durable: data-dir bytes per finished noop task ({} tasks stored), apparent / allocated",
                        num(d.tasks_stored as f64, 0)
                    ),
                    format!("{} / {} B", num(apparent, 0), num(allocated, 0)),
                    format!(
                        "dir {} MiB allocated ({} MiB empty), {} files",
                        mib(Some(d.dir_after.allocated_bytes)),
                        mib(Some(d.dir_empty.allocated_bytes)),
                        d.dir_after.files
                    ),
                    none(),
                ],
            ]
        }
        Measured::Retention(r) => {
            let sizes = r.first_max_last().map_or_else(none, |(first, max, last)| {
                format!(
                    "{} / {} / {} (last allocated {})",
                    mib(Some(first)),
                    mib(Some(max)),
                    mib(Some(last)),
                    mib(r.samples.last().map(|s| s.size.allocated_bytes))
                )
            });
            let verdict = match (r.bounded(), r.growth()) {
                (Some(true), Some(g)) => {
                    format!("bounded: second half's max {}× the first half's", num(g, 2))
                }
                (Some(false), Some(g)) => format!(
                    "NOT bounded: second half's max {}× the first half's",
                    num(g, 2)
                ),
                _ => "too few waves to tell".to_owned(),
            };
            vec![[
                format!(
                    "retention {}: data dir under {} waves of {} noops ({} tasks in {} s), MiB after the first wave / max / last (larger of apparent, allocated)",
                    humantime::format_duration(r.retention),
                    r.samples.len().saturating_sub(1),
                    num(r.wave as f64, 0),
                    num(r.tasks() as f64, 0),
                    num(r.run_s(), 1)
                ),
                sizes,
                verdict,
                r.growth().map_or_else(none, |g| format!("{}×", num(g, 2))),
            ]]
        }
        Measured::Recovery(r) => vec![
            [
                format!(
                    "recovery: {} queued, SIGKILL, restart → ClusterInfo counts them, s (target ≤ 3)",
                    num(r.tasks as f64, 0)
                ),
                format!(
                    "{} (listening at {}; {} counted)",
                    num(r.serving_s, 3),
                    num(r.listening_s, 3),
                    num(r.queued_seen as f64, 0)
                ),
                "target 3 s".to_owned(),
                ratio(r.serving_s, 3.0),
            ],
            [
                "recovery: peak RSS of the restart (VmHWM) / RSS before the crash (target ≤ 1.5×)"
                    .to_owned(),
                format!(
                    "{} / {} MiB (serving at {} MiB)",
                    mib(r.peak_recovery),
                    mib(r.rss_before_crash),
                    mib(r.rss_serving)
                ),
                format!("peak before the crash {} MiB", mib(r.peak_before_crash)),
                r.peak_over_before()
                    .map_or_else(none, |v| format!("{}×", num(v, 2))),
            ],
        ],
        Measured::Throughput(t) => {
            let tps = t.median_tps.unwrap_or(0.0);
            let runs: Vec<String> = t.runs.iter().map(|r| num(*r, 0)).collect();
            vec![
                [
                    format!(
                        "(a) throughput, {} noop, tasks/s (median of {})",
                        t.n,
                        t.runs.len()
                    ),
                    format!("{} ({})", num(tps, 0), runs.join(", ")),
                    t.floor_unary_per_s.map_or_else(none, |f| {
                        format!("{} unary calls/s, 64 in flight", num(f, 0))
                    }),
                    t.floor_unary_per_s.map_or_else(none, |f| ratio(tps, f)),
                ],
                [
                    "(a) CPU per task: client / cluster".to_owned(),
                    format!(
                        "{} / {} µs",
                        opt(t.client_cpu_us, 1),
                        opt(t.cluster_cpu_us, 0)
                    ),
                    none(),
                    none(),
                ],
            ]
        }
        Measured::PolicyMix(p) => {
            let run_cpu = |c: &RunCpu| {
                format!(
                    "{} / {} µs, busy {} %",
                    opt(c.client_us, 1),
                    opt(c.cluster_us, 0),
                    opt(c.busy_pct, 0)
                )
            };
            let mixed = p.mixed_median.unwrap_or(0.0);
            let plain = p.plain_median.unwrap_or(0.0);
            let runs = |v: &[f64]| v.iter().map(|r| num(*r, 0)).collect::<Vec<_>>().join(", ");
            vec![
                [
                    format!(
                        "policy mix, {} noop with {}, tasks/s (median of {}, interleaved with plain)",
                        p.n,
                        p.fields,
                        p.mixed.len()
                    ),
                    format!("{} ({})", num(mixed, 0), runs(&p.mixed)),
                    format!("{} plain ({})", num(plain, 0), runs(&p.plain)),
                    ratio(mixed, plain),
                ],
                [
                    "policy mix CPU per task: client / cluster, and busy (% of all cores)"
                        .to_owned(),
                    run_cpu(&p.mixed_cpu),
                    format!("{} plain", run_cpu(&p.plain_cpu)),
                    match (p.mixed_cpu.total_us(), p.plain_cpu.total_us()) {
                        (Some(mixed), Some(plain)) => format!("{} CPU", ratio(mixed, plain)),
                        _ => none(),
                    },
                ],
            ]
        }
        Measured::Dag(d) => {
            let pair = |v: Option<(f64, f64)>| {
                v.map_or_else(none, |(median, max)| {
                    format!("{} / {}", num(median, 1), num(max, 1))
                })
            };
            let g = d.dag;
            vec![
                [
                    format!(
                        "dag: {} tasks ({} levels × {} {} + a join each, {} slots) in one Submit, s",
                        g.levels * (g.width + 1),
                        g.levels,
                        g.width,
                        g.task,
                        g.slots
                    ),
                    num(g.submit_s, 3),
                    format!("whole graph {} s", num(g.wall_s, 2)),
                    none(),
                ],
                [
                    "dag: previous join's end → level's first start, ms median / max".to_owned(),
                    pair(d.start_delay_ms),
                    format!("level's own run {}", pair(d.level_run_ms)),
                    none(),
                ],
                [
                    "dag: level's last end → its join's start, ms median / max".to_owned(),
                    pair(d.join_delay_ms),
                    none(),
                    none(),
                ],
            ]
        }
        Measured::Fairness(f) => {
            let row = |what: &str, s: &crate::policy::FairShare| {
                [
                    format!(
                        "fairness, {what}: {} late tasks behind {} queued, late share % / done in s",
                        f.late, f.backlog
                    ),
                    format!(
                        "{} / {}",
                        num(100.0 * s.late_share, 1),
                        num(s.late_finish_s, 3)
                    ),
                    format!(
                        "fair share 50 %; backlog drained in {} s",
                        num(s.backlog_drain_s, 2)
                    ),
                    none(),
                ]
            };
            vec![
                row("fair keys a, b (weights 1, 1)", &f.fair),
                row("no fair keys (FIFO)", &f.fifo),
            ]
        }
        Measured::Latency(l) => {
            let lat = l.latency;
            let floor = |pick: fn(&crate::stats::Latency) -> f64| {
                l.floor.map_or_else(none, |(run, _)| {
                    format!("{} (Run stream)", num(pick(run), 0))
                })
            };
            let against = |weft: f64, pick: fn(&crate::stats::Latency) -> f64| {
                l.floor.map_or_else(none, |(run, _)| ratio(weft, pick(run)))
            };
            vec![
                [
                    format!("(b) round trip p50, µs ({} sequential)", lat.n),
                    num(lat.p50_us, 0),
                    floor(|f| f.p50_us),
                    against(lat.p50_us, |f| f.p50_us),
                ],
                [
                    "(b) round trip p99, µs".to_owned(),
                    num(lat.p99_us, 0),
                    floor(|f| f.p99_us),
                    against(lat.p99_us, |f| f.p99_us),
                ],
            ]
        }
        Measured::Sleep(s) => {
            let wall = s.median_wall.unwrap_or(0.0);
            vec![[
                format!("(c) {} × sleep 50ms on 2 slots, wall s", s.n),
                format!("{} (eff {})", num(wall, 2), num(s.ideal_s / wall, 2)),
                format!("ideal {}", num(s.ideal_s, 2)),
                ratio(wall, s.ideal_s),
            ]]
        }
        Measured::Burn(b) => {
            let p = &b.parallel;
            let wall = p.median_wall.unwrap_or(0.0);
            vec![[
                format!("(d) {} × spin 100ms on 2 slots, wall s", p.n),
                format!(
                    "{} (eff {}; t1 {} ms → ideal {})",
                    num(wall, 2),
                    num(p.ideal_s / wall, 2),
                    num(b.single_s * 1e3, 0),
                    num(b.ideal_measured_s, 2)
                ),
                format!("ideal {}", num(p.ideal_s, 2)),
                ratio(wall, p.ideal_s),
            ]]
        }
        Measured::Startup(s) => {
            let runs: Vec<String> = s.runs.iter().map(|r| num(*r, 3)).collect();
            vec![[
                format!(
                    "(e) startup to first result, s (median of {})",
                    s.runs.len()
                ),
                format!("{} ({})", num(s.median.unwrap_or(0.0), 3), runs.join(", ")),
                none(),
                none(),
            ]]
        }
        Measured::Scale(s) => vec![
            [
                format!(
                    "scale: submit rate, {} tasks queued, tasks/s",
                    s.scale.tasks
                ),
                num(s.submit_rate, 0),
                s.floor_submit_per_s
                    .map_or_else(none, |f| format!("{} specs/s through Submit", num(f, 0))),
                s.floor_submit_per_s
                    .map_or_else(none, |f| ratio(s.submit_rate, f)),
            ],
            [
                "scale: coordinator memory per queued task".to_owned(),
                format!(
                    "{} B (RSS {} → {} MiB; coordinator CPU {} µs/task)",
                    opt(s.bytes_per_task, 0),
                    mib(s.scale.rss_before),
                    mib(s.scale.rss_after),
                    opt(s.coordinator_cpu_us, 1)
                ),
                none(),
                none(),
            ],
        ],
        Measured::ManyNodes(m) => {
            let many = m.many;
            vec![[
                format!("many nodes: {} idle simulated nodes", many.nodes),
                format!(
                    "RSS {} MiB (+{} KiB/node), CPU {} % of a core over {} s; \
                     registered in {} s; {} listed, {} streams up",
                    mib(many.rss_idle),
                    opt(m.bytes_per_node.map(|b| b / 1024.0), 1),
                    opt(many.cpu_pct, 2),
                    num(many.window_s, 1),
                    num(many.connect_s, 2),
                    many.connected_after,
                    many.streams_alive
                ),
                none(),
                none(),
            ]]
        }
    }
}

/// A number with thousands separators and `digits` decimals.
pub(super) fn num(value: f64, digits: usize) -> String {
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

pub(super) fn ratio(weft: f64, floor: f64) -> String {
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
