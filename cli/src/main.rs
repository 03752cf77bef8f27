//! The `weft` command line: act as a node's reaper if started as one,
//! parse, set up logging on stderr, run, exit.
//!
//! Results go to stdout; progress, warnings and errors to stderr. Every
//! error is one line, `weft: error: ...`, and a non-zero exit code (see
//! [`exit`]).
//!
//! Layout:
//! - [`args`]: clap `Args` and `Command`, the help text.
//! - [`run`]: dispatching a command, the one-line error, the exit code.
//! - [`opts`]: flags shared by commands that make tasks; `k=v` parsing.
//! - [`output`]: text and JSON formatting.
//! - [`exit`]: exit codes and their mapping from tasks and errors.
//! - [`stream`]: following a task's events (printing, resuming, Ctrl-C).
//! - [`task`]: `run`, `call`, `submit`, `watch`, `wait`, `get`, `list`, `cancel`.
//! - [`admin`]: `nodes`, `drain`, `info`.
//! - [`schedule`]: `schedule create|list|pause|resume|delete`, cron schedules.
//! - [`token`]: `token create|list|revoke`, `login`, where a command's token comes from.
//! - [`map`]: `map`, one task per input line.
//! - [`local`]: `local`, an in-process cluster (`weft_cluster`); also used by `demo`.
//! - [`demo`]: `demo`, a visible mixed workload on a local cluster.
//! - [`bench`]: `bench`, printing what `weft_bench` measured.
//! - [`top`]: `top`, a live terminal view of nodes, queue and throughput.

mod admin;
mod args;
mod bench;
mod demo;
mod exit;
mod job;
mod limit;
mod local;
mod map;
mod opts;
mod output;
mod policy_opts;
mod run;
mod schedule;
mod stream;
mod task;
#[cfg(test)]
mod testing;
mod token;
mod top;

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// jemalloc, not the system's malloc: a queue frees its tasks in another
/// order than it made them (priorities, fair keys), and jemalloc's size
/// classes keep that about as cheap as first in, first out (BENCHMARKS.md,
/// "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // `weft local` and `weft demo` run nodes in this process; their reaper
    // is this executable (see weft_node::reaper).
    if let Some(code) = weft_node::reaper::run_if_reaper() {
        return code;
    }
    quiet_on_broken_pipe();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => {
            let code = runtime.block_on(start());
            // A read of stdin still waiting (`weft map` whose stdout closed
            // before its input ended) runs on a blocking thread that cannot
            // be cancelled: dropping the runtime would wait for it.
            runtime.shutdown_timeout(std::time::Duration::from_millis(250));
            code
        }
        Err(err) => {
            eprintln!("weft: cannot start the runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `weft list | head`: once the reader of stdout is gone, stop quietly with
/// status 141 (as a tool killed by SIGPIPE does) instead of a panic's
/// message and backtrace. `print!` reports a closed pipe by panicking; any
/// other panic is reported as usual.
fn quiet_on_broken_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        report(info);
    }));
}

async fn start() -> ExitCode {
    let args = args::parse();
    // Logs are for diagnosing; results and errors the user needs are
    // printed by the commands. RUST_LOG=info shows the cluster's logs.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        // Colours only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    ExitCode::from(run::run(args).await)
}
