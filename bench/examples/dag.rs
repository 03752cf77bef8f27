//! A 10,000-task graph in one Submit: `--levels` levels (default 100) of
//! `--width` tasks (default 100), each level after the previous level's
//! join, each join after its level's tasks (levels × (width + 1) tasks in
//! all). Prints the Submit's time and, from the tasks' attempt times (the
//! coordinator's), the scheduling delay per level: from the previous
//! join's end to the level's first start, and from the level's last end
//! to its join's start, median and max over the levels.
//!
//! ```text
//! cargo build --release --bins
//! cargo run -p weft-bench --release --example dag -- [--levels 100] [--width 100] \
//!     [--handler sleep] [--input 5ms] [--nodes 2] [--slots 8] [--insecure] [--per-level]
//! ```

use std::time::Instant;

use anyhow::Context;

use weft_bench::policy;
use weft_bench::workload;

struct Args {
    levels: usize,
    width: usize,
    handler: String,
    input: String,
    nodes: usize,
    slots: u32,
    insecure: bool,
    per_level: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut args = Args {
        levels: 100,
        width: 100,
        handler: "sleep".to_owned(),
        input: "5ms".to_owned(),
        nodes: 2,
        slots: 8,
        insecure: false,
        per_level: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--levels" => args.levels = value("--levels")?.parse()?,
            "--width" => args.width = value("--width")?.parse()?,
            "--handler" => args.handler = value("--handler")?,
            "--input" => args.input = value("--input")?,
            "--nodes" => args.nodes = value("--nodes")?.parse()?,
            "--slots" => args.slots = value("--slots")?.parse()?,
            "--insecure" => args.insecure = true,
            "--per-level" => args.per_level = true,
            other => anyhow::bail!("unknown flag {other:?}"),
        }
    }
    anyhow::ensure!(
        args.levels > 0 && args.width > 0,
        "--levels and --width must be > 0"
    );
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let (cluster, client) =
        policy::start_cluster(args.nodes, args.slots, args.insecure, false).await?;
    // Warm the cluster: connections, the store, the nodes' handlers.
    let warm = (0..200).map(workload::noop).collect();
    workload::run_all(&client, warm, 64).await?;
    let specs = policy::dag_specs(args.levels, args.width, &args.handler, &args.input);
    let total = specs.len();
    eprintln!(
        "dag: {} levels × ({} + join) = {total} tasks of {}({}) on {} × {} slots, one Submit",
        args.levels, args.width, args.handler, args.input, args.nodes, args.slots
    );
    let t0 = Instant::now();
    let (job, ids) = client
        .submit_graph(specs)
        .await
        .context("submitting the graph")?;
    let submit = t0.elapsed();
    let tasks = workload::wait_ids(&client, ids, 64).await?;
    let wall = t0.elapsed();
    let delays = policy::dag_delays(&tasks, args.levels, args.width)?;
    if args.per_level {
        println!("| level | start delay ms | join delay ms | level run ms |");
        println!("|---:|---:|---:|---:|");
        for (i, d) in delays.iter().enumerate() {
            println!(
                "| {i} | {} | {:.1} | {:.1} |",
                d.start_delay
                    .map_or("-".to_owned(), |s| format!("{:.1}", s.as_secs_f64() * 1e3)),
                d.join_delay.as_secs_f64() * 1e3,
                d.level_run.as_secs_f64() * 1e3
            );
        }
    }
    let (start_med, start_max) =
        policy::median_max_ms(delays.iter().filter_map(|d| d.start_delay)).unwrap_or_default();
    let (join_med, join_max) =
        policy::median_max_ms(delays.iter().map(|d| d.join_delay)).unwrap_or_default();
    let (run_med, run_max) =
        policy::median_max_ms(delays.iter().map(|d| d.level_run)).unwrap_or_default();
    println!("job {job}: {total} tasks");
    println!("| figure | median | max |");
    println!("|---|---:|---:|");
    println!(
        "| Submit of the whole graph (one call) | {:.0} ms | |",
        submit.as_secs_f64() * 1e3
    );
    println!(
        "| previous join's end → level's first start | {start_med:.1} ms | {start_max:.1} ms |"
    );
    println!("| level's last end → its join's start | {join_med:.1} ms | {join_max:.1} ms |");
    println!("| level's first start → last end (the work) | {run_med:.1} ms | {run_max:.1} ms |");
    println!(
        "| whole graph, Submit to last result | {:.2} s | |",
        wall.as_secs_f64()
    );
    cluster.stop().await;
    Ok(())
}
