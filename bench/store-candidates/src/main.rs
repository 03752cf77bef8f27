//! Candidate task stores side by side on the coordinator's write pattern
//! (issue 14). See README.md.
//!
//! `store-candidates all` runs every candidate in both orders, each run in a
//! child process of its own (clean CPU and I/O counters), interleaved and
//! repeated, under `strace -c` for the sync calls, and prints the medians.
//! `store-candidates run` is one such run.

mod candidates;
mod lean;
mod workload;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use candidates::Kind;
use workload::{Order, Shape, Workload};

#[derive(Parser)]
#[command(about = "Candidate task stores on the coordinator's write pattern")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct ShapeArgs {
    /// Noop tasks taken through their life.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u32).range(1..))]
    tasks: u32,
    /// Tasks per stage per commit: each commit submits, assigns, starts and
    /// finishes up to this many tasks.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Queued tasks the scheduler orders at once (the shuffled order's
    /// window; also how far the later stages trail the submits).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    window: u32,
    /// Where the data dirs go (one per run, deleted after it). Put it on
    /// the disk a coordinator's data dir would be on.
    #[arg(long, default_value = "target/bench-data")]
    dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every candidate in both orders, interleaved, repeated; medians.
    All {
        #[command(flatten)]
        shape: ShapeArgs,
        /// Rounds over all candidates and orders.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
        /// Candidates to run (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        candidates: Vec<Kind>,
        /// Orders to run (default: both).
        #[arg(long, value_enum, value_delimiter = ',')]
        orders: Vec<Order>,
        /// Do not count sync calls with strace.
        #[arg(long)]
        no_strace: bool,
    },
    /// Restart with a backlog: for each candidate, one process submits
    /// `--tasks` tasks (all left queued) and exits, then a new process
    /// reopens the store and reads every live task back; prints the
    /// reopen's time and both processes' peak memory.
    Recovery {
        #[command(flatten)]
        shape: ShapeArgs,
        /// Candidates (those with a recovery: redb-today, log).
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Kind::RedbToday, Kind::Log])]
        candidates: Vec<Kind>,
    },
    /// Submits `--tasks` tasks into a new data dir `--dir` and leaves them
    /// queued (the first half of `recovery`).
    Fill {
        #[command(flatten)]
        shape: ShapeArgs,
        #[arg(long, value_enum)]
        candidate: Kind,
    },
    /// Reopens the data dir `--dir` and reads every live task back (the
    /// second half of `recovery`).
    Load {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_enum)]
        candidate: Kind,
    },
    /// One candidate, one order: prints one `RESULT` line.
    Run {
        #[command(flatten)]
        shape: ShapeArgs,
        #[arg(long, value_enum)]
        candidate: Kind,
        #[arg(long, value_enum)]
        order: Order,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Run {
            shape,
            candidate,
            order,
        } => run(&shape, candidate, order),
        Cmd::All {
            shape,
            repeat,
            candidates,
            orders,
            no_strace,
        } => all(&shape, repeat, candidates, orders, no_strace),
        Cmd::Recovery { shape, candidates } => recovery(&shape, &candidates),
        Cmd::Fill { shape, candidate } => fill(&shape, candidate),
        Cmd::Load { dir, candidate } => load(&dir, candidate),
    }
}

/// Peak resident memory of this process, bytes (`VmHWM`).
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

fn fill(args: &ShapeArgs, kind: Kind) -> Result<()> {
    let shape = Shape {
        tasks: args.tasks as usize,
        batch: args.batch as usize,
        window: args.window as usize,
        order: Order::InOrder,
        submit_only: true,
    };
    if args.dir.exists() {
        bail!("{} exists; fill makes a new data dir", args.dir.display());
    }
    let mut store = candidates::open(kind, &args.dir)?;
    let mut workload = Workload::new(shape);
    let mut records = Vec::new();
    let start = Instant::now();
    while workload.next_commit(&mut records).is_some() {
        store.commit(&records)?;
    }
    drop(store);
    println!(
        "RESULT fill_s={:.2} fill_rss={} dir={}",
        start.elapsed().as_secs_f64(),
        peak_rss(),
        dir_bytes(&args.dir)
    );
    Ok(())
}

fn load(dir: &Path, kind: Kind) -> Result<()> {
    let start = Instant::now();
    let live = candidates::recover(kind, dir)?;
    println!(
        "RESULT load_s={:.3} load_rss={} live={live}",
        start.elapsed().as_secs_f64(),
        peak_rss()
    );
    Ok(())
}

fn recovery(args: &ShapeArgs, kinds: &[Kind]) -> Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let exe = std::env::current_exe()?;
    println!(
        "\n{} queued tasks, {} per commit; reopen in a new process (warm page cache).\n",
        args.tasks, args.batch
    );
    println!(
        "| candidate | dir MB | reopen + read all live, s | live read | peak RSS of reopen, MiB | peak RSS of the filling process, MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for kind in kinds {
        let dir = args
            .dir
            .join(format!("recover-{}-{}", kind.name(), std::process::id()));
        let result = (|| -> Result<Figures> {
            let child = |cmd: &mut Command| -> Result<Figures> {
                let out = cmd.output()?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() {
                    bail!(
                        "{} failed: {stdout}{}",
                        kind.name(),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                parse_result(&stdout)
            };
            let mut figures = child(
                Command::new(&exe)
                    .args(["fill", "--candidate", kind.name()])
                    .arg(format!("--tasks={}", args.tasks))
                    .arg(format!("--batch={}", args.batch))
                    .arg("--dir")
                    .arg(&dir),
            )?;
            // The page cache is left as the fill left it (dropping it would
            // slow everything else on the machine): a warm restart.
            figures.extend(child(
                Command::new(&exe)
                    .args(["load", "--candidate", kind.name()])
                    .arg("--dir")
                    .arg(&dir),
            )?);
            Ok(figures)
        })();
        let _ = std::fs::remove_dir_all(&dir);
        let f = result?;
        println!(
            "| {} | {:.0} | {:.2} | {} | {:.0} | {:.0} |",
            kind.name(),
            f["dir"] / 1e6,
            f["load_s"],
            f["live"],
            f["load_rss"] / 1e6 / 1.048_576,
            f["fill_rss"] / 1e6 / 1.048_576,
        );
    }
    Ok(())
}

/// CPU seconds (user + system) of this process, all threads.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc_rusage::Rusage>::zeroed();
    // SAFETY: getrusage writes a `struct rusage` into the pointer.
    let usage = unsafe {
        libc_rusage::getrusage(0, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc_rusage::Timeval| t.sec as f64 + t.usec as f64 / 1e6;
    tv(usage.utime) + tv(usage.stime)
}

/// `getrusage` without a libc crate: the two fields used come first.
mod libc_rusage {
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Timeval {
        pub sec: i64,
        pub usec: i64,
    }
    #[repr(C)]
    pub struct Rusage {
        pub utime: Timeval,
        pub stime: Timeval,
        pub rest: [i64; 14],
    }
    unsafe extern "C" {
        pub fn getrusage(who: i32, usage: *mut Rusage) -> i32;
    }
}

/// Bytes this process caused to be written to storage (`/proc/self/io`).
fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes: ").map(str::to_owned))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes allocated on disk under `dir` (like `du`).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

fn run(args: &ShapeArgs, kind: Kind, order: Order) -> Result<()> {
    let shape = Shape {
        tasks: args.tasks as usize,
        batch: args.batch as usize,
        window: args.window as usize,
        order,
        submit_only: false,
    };
    let dir = args.dir.join(format!(
        "{}-{}-{}",
        kind.name(),
        order.name(),
        std::process::id()
    ));
    if dir.exists() {
        bail!("{} exists; pick another --dir", dir.display());
    }
    let result = run_in(&dir, shape, kind);
    let _ = std::fs::remove_dir_all(&dir);
    let line = result?;
    println!("RESULT {line}");
    Ok(())
}

fn run_in(dir: &Path, shape: Shape, kind: Kind) -> Result<String> {
    let mut store = candidates::open(kind, dir)?;
    let mut workload = Workload::new(shape);
    let mut records = Vec::new();
    let (cpu0, io0, t0) = (cpu_seconds(), write_bytes(), Instant::now());
    while workload.next_commit(&mut records).is_some() {
        store.commit(&records)?;
    }
    let wall = t0.elapsed();
    let (cpu, io) = (cpu_seconds() - cpu0, write_bytes() - io0);
    let bytes_run = dir_bytes(dir);
    // Retention: final tasks that finished in the first half of the
    // finishes go.
    let cut = workload.wall(workload.finish_commit(shape.tasks / 2));
    let (cpu1, t1) = (cpu_seconds(), Instant::now());
    let deleted = store.retain(cut)?;
    let compacted = store.compact()?;
    let retain_wall = t1.elapsed();
    let retain_cpu = cpu_seconds() - cpu1;
    let bytes_after = dir_bytes(dir);
    let journal_after = store.journal_bytes()?;
    drop(store);
    let n = shape.tasks as f64;
    let kept = (shape.tasks - deleted).max(1) as f64;
    Ok(format!(
        "cpu_us={:.2} tasks_s={:.0} wbytes={:.1} dir={:.1} dir_after={:.1} journal_after={:.1} deleted={} compacted={} retain_s={:.3} retain_cpu_s={:.3} commits={}",
        cpu * 1e6 / n,
        n / wall.as_secs_f64().max(1e-9),
        io as f64 / n,
        bytes_run as f64 / n,
        bytes_after as f64 / kept,
        journal_after as f64 / kept,
        deleted,
        compacted,
        retain_wall.as_secs_f64(),
        retain_cpu,
        workload.commits(),
    ))
}

/// One run's figures, by name.
type Figures = std::collections::BTreeMap<String, f64>;

fn parse_result(stdout: &str) -> Result<Figures> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .context("no RESULT line")?;
    line.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').context("bad field")?;
            let v = match v {
                "true" => 1.0,
                "false" => 0.0,
                v => v.parse()?,
            };
            Ok((k.to_owned(), v))
        })
        .collect()
}

/// Sync calls counted by `strace -c` in `summary`.
fn syncs(summary: &str) -> f64 {
    summary
        .lines()
        .filter(|l| {
            let name = l.split_whitespace().last().unwrap_or("");
            matches!(
                name,
                "fsync" | "fdatasync" | "sync_file_range" | "syncfs" | "msync"
            )
        })
        .filter_map(|l| {
            // % time, seconds, usecs/call, calls, [errors,] syscall
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(3).and_then(|c| c.parse::<f64>().ok())
        })
        .sum()
}

fn all(
    args: &ShapeArgs,
    repeat: u32,
    mut kinds: Vec<Kind>,
    mut orders: Vec<Order>,
    no_strace: bool,
) -> Result<()> {
    if kinds.is_empty() {
        kinds = vec![
            Kind::None,
            Kind::RedbToday,
            Kind::RedbLean,
            Kind::Fjall,
            Kind::Log,
        ];
    }
    if orders.is_empty() {
        orders = vec![Order::InOrder, Order::Shuffled];
    }
    let strace = !no_strace && Command::new("strace").arg("-V").output().is_ok();
    std::fs::create_dir_all(&args.dir)?;
    let exe = std::env::current_exe()?;
    let mut results: std::collections::BTreeMap<(usize, usize), Vec<Figures>> = Default::default();
    for round in 0..repeat as usize {
        // Interleaved: every candidate once per order per round, starting
        // with a different one each round.
        for (oi, order) in orders.iter().enumerate() {
            for k in 0..kinds.len() {
                let ki = (k + round) % kinds.len();
                let kind = kinds[ki];
                let summary = args.dir.join(format!("strace-{}.txt", std::process::id()));
                let mut cmd = if strace {
                    let mut c = Command::new("strace");
                    c.args(["-f", "--seccomp-bpf", "-c", "-U", "calls,name"])
                        .args(["-e", "trace=fsync,fdatasync,sync_file_range,syncfs,msync"])
                        .arg("-o")
                        .arg(&summary)
                        .arg(&exe);
                    c
                } else {
                    Command::new(&exe)
                };
                cmd.args(["run", "--candidate", kind.name(), "--order", order.name()])
                    .arg(format!("--tasks={}", args.tasks))
                    .arg(format!("--batch={}", args.batch))
                    .arg(format!("--window={}", args.window))
                    .arg("--dir")
                    .arg(&args.dir);
                let start = Instant::now();
                let out = cmd
                    .output()
                    .with_context(|| format!("running {}", kind.name()))?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() {
                    bail!(
                        "{} {} failed: {}{}",
                        kind.name(),
                        order.name(),
                        stdout,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let mut figures = parse_result(&stdout)?;
                if strace {
                    let text = std::fs::read_to_string(&summary).unwrap_or_default();
                    let _ = std::fs::remove_file(&summary);
                    figures.insert("syncs".into(), syncs_calls(&text));
                }
                eprintln!(
                    "round {} {:>10} {:>8}: {:?} ({:.1?})",
                    round + 1,
                    kind.name(),
                    order.name(),
                    figures,
                    Duration::from_secs_f64(start.elapsed().as_secs_f64())
                );
                results.entry((ki, oi)).or_default().push(figures);
            }
        }
    }
    print_table(args, repeat, &kinds, &orders, &results, strace);
    Ok(())
}

/// Sync calls from a `strace -c -U calls,name` summary.
fn syncs_calls(summary: &str) -> f64 {
    let counted: f64 = summary
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let calls = cols.next()?.parse::<f64>().ok()?;
            let name = cols.next()?;
            matches!(
                name,
                "fsync" | "fdatasync" | "sync_file_range" | "syncfs" | "msync"
            )
            .then_some(calls)
        })
        .sum::<f64>()
        + 0.0;
    if counted > 0.0 {
        counted
    } else {
        syncs(summary) + 0.0
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print_table(
    args: &ShapeArgs,
    repeat: u32,
    kinds: &[Kind],
    orders: &[Order],
    results: &std::collections::BTreeMap<(usize, usize), Vec<Figures>>,
    strace: bool,
) {
    let n = f64::from(args.tasks);
    println!(
        "\n{} noop tasks, {} per stage per commit, window {}; medians of {} interleaved rounds.",
        args.tasks, args.batch, args.window, repeat
    );
    println!(
        "CPU: user+sys of the process (all threads) over the commits; store CPU = CPU - the `none` row's (making the records)."
    );
    println!();
    println!(
        "| candidate | order | CPU µs/task | store CPU µs/task | tasks/s | fsync/task | bytes written/task | dir bytes/task | dir bytes/kept task after retention |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (oi, order) in orders.iter().enumerate() {
        let base = kinds
            .iter()
            .position(|k| *k == Kind::None)
            .and_then(|ki| results.get(&(ki, oi)))
            .map(|runs| median(runs.iter().map(|f| f["cpu_us"]).collect()));
        for (ki, kind) in kinds.iter().enumerate() {
            let Some(runs) = results.get(&(ki, oi)) else {
                continue;
            };
            let m = |key: &str| median(runs.iter().filter_map(|f| f.get(key).copied()).collect());
            let cpu = m("cpu_us");
            let store_cpu = base.map_or(f64::NAN, |b| cpu - b);
            let syncs = if strace {
                format!(
                    "{:.4} ({:.1}/commit)",
                    m("syncs") / n,
                    m("syncs") / m("commits")
                )
            } else {
                "-".into()
            };
            let after = if m("compacted") > 0.0 || *kind == Kind::Log {
                format!("{:.0}", m("dir_after"))
            } else {
                format!("{:.0} (no compaction)", m("dir_after"))
            };
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.0} | {} | {:.0} | {:.0} | {} |",
                kind.name(),
                order.name(),
                cpu,
                store_cpu,
                m("tasks_s"),
                syncs,
                m("wbytes"),
                m("dir"),
                after,
            );
        }
    }
    println!("\nRetention pass (delete ~half, then compact), median seconds wall / CPU:");
    for (oi, order) in orders.iter().enumerate() {
        for (ki, kind) in kinds.iter().enumerate() {
            if let Some(runs) = results.get(&(ki, oi)) {
                let m =
                    |key: &str| median(runs.iter().filter_map(|f| f.get(key).copied()).collect());
                println!(
                    "- {} {}: {:.2} s / {:.2} s CPU, {} deleted; of the dir after it, {:.0} B/kept task are journal",
                    kind.name(),
                    order.name(),
                    m("retain_s"),
                    m("retain_cpu_s"),
                    m("deleted"),
                    m("journal_after")
                );
            }
        }
    }
}
