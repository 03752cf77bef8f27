//! What `weft bench` measures: the workload protocol of `shared/peers`
//! (v1) run against Weft, plus Weft-only steps (one million queued tasks, a thousand
//! idle nodes; scheduling policy's cost, a 10,000-task graph, fairness),
//! each figure printed beside what plain gRPC costs on the same machine in
//! the same run (the floor) or, for the policy mix, beside plain tasks.
//!
//! By default it starts its own cluster as real processes on loopback: one
//! `weft-coordinator` (store under a temp dir) and two `weft-node --slots 1`,
//! found by `weft_cluster` (next to the `weft` executable or in
//! `WEFT_BIN_DIR`); the client is this process. With `--coordinator URL`
//! it benches that cluster instead (the steps that need their own processes are skipped).
//!
//! The `weft` CLI parses [`BenchArgs`], calls [`run()`] and prints the
//! [`Report`] it answers (table, JSON, results.jsonl lines).
//!
//! Layout:
//! - [`args`]: the steps, the flags, the counts of a run.
//! - [`mod@run`]: one run: which steps on which cluster, failures recorded.
//! - [`own_processes`]: the steps that start their own processes (startup,
//!   scale, many nodes) and the waits the run shares with them.
//! - [`cluster`]: the bench's coordinator and nodes as processes (via `weft_cluster`).
//! - [`machine`]: what the OS says about the machine.
//! - [`stats`]: nearest-rank percentiles, medians, latency summaries.
//! - [`floor`]: the raw tonic measurement (fake services in-process).
//! - [`workload`]: throughput, latency, sleep and burn steps over a `Client`.
//! - [`swarm`]: many simulated nodes from one process.
//! - [`policy`]: the workflow and scheduling-policy steps: policy mix
//!   beside plain tasks, a 10,000-task graph in one Submit, fairness.
//! - [`durable`]: durable latency against the disk's fdatasync and the
//!   in-memory round trip, data-dir bytes per task, the dir under retention.
//! - [`recovery`]: a big queue, SIGKILL, restart: time to serve, peak memory.
//! - [`report`]: the results, one list of figures, rendered as the table,
//!   `--output json` and results.jsonl lines.

pub mod args;
pub mod cluster;
pub mod durable;
pub mod floor;
pub mod machine;
pub mod own_processes;
pub mod policy;
pub mod recovery;
pub mod report;
pub mod run;
pub mod stats;
pub mod swarm;
pub mod workload;

pub use args::{BenchArgs, Plan, Step};
pub use report::Report;
pub use run::run;
