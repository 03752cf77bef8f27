//! Fairness between two submitters at equal priority: A queues
//! `--backlog` noop tasks (default 100,000), then B submits `--late`
//! (default 100). Run once with fair keys (A `a`, B `b`, equal weights:
//! B's fair share is 1/2) and once without (first in, first out: B waits
//! behind A's backlog). Prints B's time from its Submit to its last
//! result, and B's share of the tasks that started while B had work.
//!
//! ```text
//! cargo build --release --bins
//! cargo run -p weft-bench --release --example fairness -- [--backlog N] [--late N] [--insecure]
//! ```

use anyhow::Context;

use weft_bench::policy;

struct Args {
    backlog: usize,
    late: usize,
    insecure: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut args = Args {
        backlog: 100_000,
        late: 100,
        insecure: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--backlog" => args.backlog = it.next().context("--backlog N")?.parse()?,
            "--late" => args.late = it.next().context("--late N")?.parse()?,
            "--insecure" => args.insecure = true,
            other => anyhow::bail!("unknown flag {other:?} (--backlog N, --late N, --insecure)"),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse()?;
    println!(
        "| keys | A's {} submitted in | B's {} done after its Submit | B's share while both had work | A's tasks started meanwhile | A's backlog drained in |",
        args.backlog, args.late
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for fair in [true, false] {
        // A fresh cluster per run: nothing of the first run is in the way.
        let (cluster, client) = policy::start_cluster(2, 1, args.insecure, false).await?;
        eprintln!(
            "fairness: {} backlog, {} late, {}",
            args.backlog,
            args.late,
            if fair {
                "fair keys a, b"
            } else {
                "no fair keys"
            }
        );
        let share = policy::fairness(&client, args.backlog, args.late, fair, 256).await?;
        println!(
            "| {} | {:.2} s | {:.3} s | {:.1} % | {} | {:.2} s |",
            if fair {
                "fair keys a, b (weights 1, 1)"
            } else {
                "none (FIFO)"
            },
            share.backlog_submit_s,
            share.late_finish_s,
            100.0 * share.late_share,
            share.backlog_in_window,
            share.backlog_drain_s
        );
        cluster.stop().await;
    }
    Ok(())
}
