//! Scheduling policy's cost: throughput of plain noop tasks beside noop
//! tasks that use every policy field (priorities 1 to 9, four fair keys
//! with weights, eight concurrency keys whose limit never binds, one unit
//! of a resource the nodes have plenty of), interleaved runs on one
//! cluster in one sitting (BENCHMARKS.md "Workflows and scheduling policy").
//!
//! ```text
//! cargo build --release --bins
//! cargo run -p weft-bench --release --example policy_mix -- [--tasks N] [--runs R] [--insecure]
//! ```
//!
//! The cluster is the protocol's: a durable coordinator and two one-slot
//! nodes as processes (binaries next to the example, or `WEFT_BIN_DIR`).

use anyhow::Context;

use weft_bench::policy::{self, PairedRun};
use weft_bench::stats::median_of;
use weft_bench::workload;

struct Args {
    tasks: usize,
    runs: usize,
    insecure: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut args = Args {
        tasks: 20_000,
        runs: 5,
        insecure: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--tasks" => args.tasks = it.next().context("--tasks N")?.parse()?,
            "--runs" => args.runs = it.next().context("--runs R")?.parse()?,
            "--insecure" => args.insecure = true,
            other => anyhow::bail!("unknown flag {other:?} (--tasks N, --runs R, --insecure)"),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let (cluster, client) = policy::start_cluster(2, 1, args.insecure, true).await?;
    let warm = (0..200).map(workload::noop).collect();
    workload::run_all(&client, warm, 256).await?;
    let warm = (0..200).map(policy::mixed).collect();
    workload::run_all(&client, warm, 256).await?;
    eprintln!(
        "policy_mix: {} × ({} plain, {} mixed) noop tasks, interleaved",
        args.runs, args.tasks, args.tasks
    );
    let runs: Vec<PairedRun> =
        policy::interleaved_throughput(&client, args.tasks, args.runs, 256).await?;
    println!("| run | plain tasks/s | policy-mix tasks/s | mix / plain |");
    println!("|---|---:|---:|---:|");
    for (i, run) in runs.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.0} | {:.1} % |",
            i + 1,
            run.plain_tps,
            run.mixed_tps,
            100.0 * run.mixed_tps / run.plain_tps
        );
    }
    let plain = median_of(runs.iter().map(|r| r.plain_tps)).context("no runs")?;
    let mixed = median_of(runs.iter().map(|r| r.mixed_tps)).context("no runs")?;
    println!(
        "| median | {plain:.0} | {mixed:.0} | {:.1} % |",
        100.0 * mixed / plain
    );
    cluster.stop().await;
    Ok(())
}
