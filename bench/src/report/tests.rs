//! The report's renderings of a fixed run: the jsonl records follow the
//! peers kit's format, the table shows figures and failures.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::figures::{Measured, Outcome, RunCpu};
use super::table::{num, ratio};
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

#[test]
fn the_figures_list_each_step_once_in_run_order_with_its_result_or_error() {
    let r = report();
    let figures = r.figures();
    let steps: Vec<Step> = figures.iter().map(|f| f.step).collect();
    assert_eq!(
        steps,
        [
            Step::Startup,
            Step::Throughput,
            Step::Latency,
            Step::Sleep,
            Step::Burn
        ]
    );
    assert!(matches!(
        figures[1].outcome,
        figures::Outcome::Measured(figures::Measured::Throughput(ref t))
            if t.median_tps == Some(10_000.0) && t.runs == [10_000.0, 8_000.0, 12_000.0]
    ));
    assert!(matches!(
        figures[4].outcome,
        figures::Outcome::Failed("boom")
    ));
}

#[test]
fn a_skipped_step_shows_its_reason_in_every_rendering() {
    let mut r = report();
    r.external = Some("http://10.0.0.1:7070".into());
    r.skip(
        Step::Scale,
        "needs its own processes (not with --coordinator)",
    );
    let table = r.table();
    assert!(
        table.contains("| scale | skipped: needs its own processes"),
        "{table}"
    );
    assert!(!table.contains("failed: skipped"), "{table}");
    assert!(table.ends_with("scale: skipped: needs its own processes (not with --coordinator)"));
    let doc = r.json();
    assert_eq!(doc["scale"], Value::Null);
    assert_eq!(doc["errors"]["scale"], Value::Null);
    assert!(
        doc["skipped"]["scale"]
            .as_str()
            .unwrap()
            .starts_with("needs its own processes")
    );
    // Not a protocol metric: no results.jsonl record.
    assert!(r.jsonl_records().iter().all(|rec| rec["metric"] != "scale"));
}

#[test]
fn skipped_steps_do_not_fail_the_run() {
    let machine = report().machine;
    let mut r = Report::new(machine, SystemTime::UNIX_EPOCH, None, false, None);
    for step in [Step::Startup, Step::Scale, Step::Recovery] {
        r.skip(step, "needs its own processes (not with --coordinator)");
    }
    assert!(!r.failed());
    assert!(
        r.jsonl_records()
            .iter()
            .all(|rec| rec.get("error").is_none() && rec["detail"].get("error").is_none()),
        "{:?}",
        r.jsonl_records()
    );
    r.fail(Step::Burn, &anyhow::anyhow!("boom"));
    assert!(r.failed());
}

#[test]
fn a_failed_floor_shows_in_the_table() {
    let mut r = report();
    r.fail(Step::Floor, &anyhow::anyhow!("binding the fake service"));
    let table = r.table();
    assert!(
        table.contains("| floor (raw tonic) | failed: binding the fake service | — | — |"),
        "{table}"
    );
}

#[test]
fn durability_figures_show_in_the_table_and_the_json() {
    use crate::durable::{DirSample, DirSize, Durable, RetentionRun};
    let lat = |p50_us: f64, p99_us: f64| Latency {
        p50_us,
        p90_us: p99_us,
        p99_us,
        mean_us: p50_us,
        min_us: p50_us,
        max_us: p99_us,
        n: 2_000,
    };
    let size = |bytes: u64| DirSize {
        files: 2,
        apparent_bytes: bytes,
        allocated_bytes: bytes,
    };
    let mut r = report();
    r.durable = Some(Durable {
        fdatasync: lat(1_000.0, 2_000.0),
        fdatasync_overwrite: lat(300.0, 600.0),
        fdatasync_paced: lat(900.0, 1_800.0),
        paced_gap: Duration::from_micros(250),
        memory: lat(500.0, 800.0),
        durable: lat(2_500.0, 6_000.0),
        tasks_stored: 10_000,
        dir_empty: size(0),
        dir_after: size(15_000_000),
    });
    r.retention = Some(RetentionRun {
        retention: Duration::from_secs(2),
        wave: 5_000,
        samples: (0..9)
            .map(|i| DirSample {
                at_s: i as f64,
                tasks: i * 5_000,
                size: size(if i == 0 { 0 } else { 1 << 20 }),
            })
            .collect(),
    });
    r.errors.push(StepError {
        step: Step::Recovery,
        error: "the restarted coordinator counted 3 of 10 tasks queued".into(),
    });
    let table = r.table();
    assert!(
        table.contains(
            "| durable: round trip, durable store, p50 µs (2,000 sequential; target ≤ bound) | 2,500 \
             | bound: in-memory p50 + 2 × append fdatasync p50 = 2,500 | 1.00× |"
        ),
        "{table}"
    );
    assert!(
        table.contains("| 2,500 | in-memory p50 + 2 × overwrite fdatasync p50 = 1,100 | 2.27× |"),
        "{table}"
    );
    assert!(
        table.contains(
            "| durable: the same overwrites, each after the disk idled 250 µs (half the in-memory \
             round trip, as a round trip spaces its commits), p50 / p99 µs (2,000) | 900 / 1,800 |"
        ),
        "{table}"
    );
    assert!(
        table.contains(
            "| 2,500 | in-memory p50 + 2 × paced overwrite fdatasync p50 = 2,300 | 1.09× |"
        ),
        "{table}"
    );
    assert!(table.contains("| 6,000 | p50 2,500 | 2.40× |"), "{table}");
    assert!(table.contains("| 1,500 / 1,500 B |"), "{table}");
    assert!(
        table.contains("bounded: second half's max 1.00× the first half's"),
        "{table}"
    );
    assert!(table.contains("| recovery | failed: the restarted coordinator"));
    let doc = r.json();
    assert!(
        table
            .contains("overwrite in place beside the data dir, p50 / p99 µs (2,000) | 300 / 600 |"),
        "{table}"
    );
    assert_eq!(doc["durable"]["bound_p50_us"], 2_500.0);
    assert_eq!(doc["durable"]["overwrite_bound_p50_us"], 1_100.0);
    assert_eq!(doc["durable"]["fdatasync_4k_overwrite_us"]["p50_us"], 300.0);
    assert_eq!(
        doc["durable"]["fdatasync_4k_overwrite_paced_us"]["p50_us"],
        900.0
    );
    assert_eq!(doc["durable"]["paced_gap_us"], 250.0);
    assert_eq!(doc["durable"]["paced_bound_p50_us"], 2_300.0);
    assert_eq!(doc["durable"]["durable_p50_over_paced_bound"], 1.087);
    assert_eq!(doc["durable"]["durable_p99_over_p50"], 2.4);
    assert_eq!(doc["durable"]["allocated_bytes_per_task"], 1_500.0);
    assert_eq!(doc["retention"]["bounded"], true);
    assert_eq!(doc["retention"]["samples"].as_array().unwrap().len(), 9);
    assert_eq!(doc["recovery"], Value::Null);
    assert!(
        r.jsonl_records()
            .iter()
            .all(|rec| rec["metric"] != "durable")
    );
}

#[test]
fn the_policy_mix_shows_each_kinds_cpu_per_task_and_how_busy_the_machine_was() {
    let meter = |wall_ms: u64, client: f64, cluster: f64| Metered {
        wall: Duration::from_millis(wall_ms),
        client_cpu: Some(client),
        cluster_cpu: Some(cluster),
        ..metered(wall_ms)
    };
    let pair = |plain: Metered, mixed: Metered| crate::policy::PairedRun {
        plain_tps: 1_000.0 / plain.wall.as_secs_f64(),
        mixed_tps: 1_000.0 / mixed.wall.as_secs_f64(),
        plain,
        mixed,
    };
    let mut r = report();
    r.policy_mix = Some(PolicyMix {
        n: 1_000,
        fields: crate::policy::MixField::ALL.to_vec(),
        runs: vec![
            // Plain: 5 + 30 µs a task, 35 ms of CPU in 25 ms on 2 cores.
            pair(meter(25, 0.005, 0.030), meter(40, 0.006, 0.034)),
            pair(meter(25, 0.005, 0.030), meter(40, 0.006, 0.034)),
            pair(meter(20, 0.004, 0.026), meter(50, 0.007, 0.040)),
        ],
    });
    let figures = r.figures();
    let Some(Measured::PolicyMix(p)) = figures.iter().find_map(|f| match &f.outcome {
        Outcome::Measured(m @ Measured::PolicyMix(_)) => Some(m.clone()),
        _ => None,
    }) else {
        panic!("no policy-mix figures");
    };
    let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-6);
    assert!(close(p.plain_cpu.client_us, 5.0), "{:?}", p.plain_cpu);
    assert!(close(p.plain_cpu.cluster_us, 30.0), "{:?}", p.plain_cpu);
    assert!(close(p.mixed_cpu.cluster_us, 34.0), "{:?}", p.mixed_cpu);
    // Busy: the CPU over the wall time of both cores, median per kind.
    assert!(close(p.plain_cpu.busy_pct, 70.0), "{:?}", p.plain_cpu);
    assert!(close(p.mixed_cpu.busy_pct, 50.0), "{:?}", p.mixed_cpu);
    let table = r.table();
    assert!(
        table.contains("| 6.0 / 34 µs, busy 50 % | 5.0 / 30 µs, busy 70 % plain | 1.14× CPU |"),
        "{table}"
    );
    let json = r.json();
    assert_eq!(
        json["policy_mix"]["mixed_cpu"]["cluster_cpu_us_per_task"],
        json!(34.0)
    );
    assert_eq!(json["policy_mix"]["plain_cpu"]["busy_pct"], json!(70.0));
    // A cluster the bench did not start has no CPU to read: no busy figure.
    let unread = RunCpu::of(
        1_000,
        2,
        [Metered {
            cluster_cpu: None,
            ..metered(10)
        }]
        .iter(),
    );
    assert_eq!((unread.cluster_us, unread.busy_pct), (None, None));
}
