//! The timed steps of the workload protocol that run through a [`Client`]
//! on a cluster with two one-slot nodes: throughput, latency, parallel
//! sleeps, CPU fan-out. Every batch's results are checked (a wrong result
//! is an error, not a data point).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use weft_client::{Client, EventBody, Task, TaskId, TaskSpec, TaskState};
use weft_cluster::procfs;

use crate::stats::Latency;

/// Specs per `submit_many` call while waiting starts on earlier ones.
const PIPELINE_CHUNK: usize = 2_000;

/// CPU and wall accounting of one timed phase: the bench process (the
/// client), the cluster processes, and the whole host (for noise).
#[derive(Debug, Clone, Copy)]
pub struct Meter {
    wall: Instant,
    client: Option<f64>,
    cluster: Option<f64>,
    host: Option<(f64, f64)>,
}

/// What a [`Meter`] saw over its phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Metered {
    /// Wall time of the phase.
    pub wall: Duration,
    /// CPU seconds of the bench process.
    pub client_cpu: Option<f64>,
    /// CPU seconds of the coordinator and nodes (None on an external cluster).
    pub cluster_cpu: Option<f64>,
    /// Host busy CPU as a percentage of all cores over the phase.
    pub host_busy_pct: Option<f64>,
    /// Host CPU seconds burnt by anything but the bench and its cluster.
    pub foreign_cpu_s: Option<f64>,
    /// CPU seconds the hypervisor withheld.
    pub steal_s: Option<f64>,
}

impl Meter {
    /// Starts metering; `cluster` reads the cluster's CPU seconds.
    pub fn start(cluster: Option<f64>) -> Meter {
        Meter {
            wall: Instant::now(),
            client: procfs::own_cpu_seconds(),
            cluster,
            host: procfs::host_cpu_seconds(),
        }
    }

    /// Stops metering; `cluster` as in [`Meter::start`].
    pub fn stop(self, cluster: Option<f64>) -> Metered {
        let wall = self.wall.elapsed();
        let client_cpu = procfs::own_cpu_seconds()
            .zip(self.client)
            .map(|(b, a)| b - a);
        let cluster_cpu = cluster.zip(self.cluster).map(|(b, a)| b - a);
        let host = procfs::host_cpu_seconds()
            .zip(self.host)
            .map(|(b, a)| (b.0 - a.0, b.1 - a.1));
        // /proc/stat ticks are 10 ms: too coarse for short phases.
        let host = host.filter(|_| wall >= Duration::from_millis(500));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        Metered {
            wall,
            client_cpu,
            cluster_cpu,
            host_busy_pct: host.map(|(busy, _)| 100.0 * busy / (wall.as_secs_f64() * cpus)),
            foreign_cpu_s: host
                .map(|(busy, _)| busy - client_cpu.unwrap_or(0.0) - cluster_cpu.unwrap_or(0.0)),
            steal_s: host.map(|(_, steal)| steal),
        }
    }
}

/// The noop task carrying `x`.
pub fn noop(x: usize) -> TaskSpec {
    TaskSpec::call("noop", x.to_string())
}

/// What the steps keep of a finished noop: its id (for errors) and its
/// output (checked against its input).
#[derive(Debug, Clone)]
pub struct Output {
    /// The task.
    pub id: TaskId,
    /// Its handler's return value.
    pub output: Bytes,
}

impl Output {
    fn of(task: Task) -> Output {
        Output {
            id: task.id,
            output: task.output,
        }
    }
}

/// Submits `specs` (pipelined: chunks of `PIPELINE_CHUNK` through
/// `submit_many` while earlier ones are already being waited on) and waits
/// for every chunk's results through one `WaitMany` stream per chunk, at
/// most `concurrency` open at once; answers each task's output, in
/// submission order. Any task not SUCCEEDED is an error.
///
/// Only ids and outputs are kept, each put in its place as it arrives
/// (what a consumer of results does): keeping every whole record and
/// putting it back in order would spend the cores the cluster shares with
/// this process on copying records.
pub async fn run_all(
    client: &Client,
    specs: Vec<TaskSpec>,
    concurrency: usize,
) -> anyhow::Result<Vec<Output>> {
    let total = specs.len();
    let (tx, rx) = mpsc::channel::<Vec<TaskId>>(64);
    let submitter = async move {
        let mut specs = specs.into_iter().peekable();
        while specs.peek().is_some() {
            let chunk: Vec<TaskSpec> = specs.by_ref().take(PIPELINE_CHUNK).collect();
            let ids = client.submit_many(chunk).await.context("submitting")?;
            if tx.send(ids).await.is_err() {
                break; // the waiter failed; its error is the one to report
            }
        }
        anyhow::Ok(())
    };
    let waiter = ReceiverStream::new(rx)
        .map(|ids| async move { wait_chunk(client, ids, Output::of).await })
        .buffered(concurrency.max(1))
        .try_fold(Vec::with_capacity(total), |mut outputs, chunk| async move {
            outputs.extend(chunk);
            Ok(outputs)
        });
    let ((), outputs) = futures::try_join!(submitter, waiter)?;
    ensure!(
        outputs.len() == total,
        "{} results for {total} tasks",
        outputs.len()
    );
    Ok(outputs)
}

/// Waits for tasks already submitted, one `WaitMany` stream per chunk of
/// `PIPELINE_CHUNK`, at most `concurrency` open at once; answers the final
/// tasks in the order of `ids`. Any task not SUCCEEDED is an error.
pub async fn wait_ids(
    client: &Client,
    ids: Vec<TaskId>,
    concurrency: usize,
) -> anyhow::Result<Vec<Task>> {
    let chunks: Vec<Vec<TaskId>> = ids.chunks(PIPELINE_CHUNK).map(<[TaskId]>::to_vec).collect();
    let done: Vec<Vec<Task>> = stream::iter(chunks)
        .map(|ids| wait_chunk(client, ids, |task| task))
        .buffered(concurrency.max(1))
        .try_collect()
        .await?;
    Ok(done.into_iter().flatten().collect())
}

/// Waits for one chunk of tasks through `WaitMany`; answers what `keep`
/// takes of each, in the order of `ids`. Any task not SUCCEEDED is an
/// error.
async fn wait_chunk<T>(
    client: &Client,
    ids: Vec<TaskId>,
    keep: impl Fn(Task) -> T,
) -> anyhow::Result<Vec<T>> {
    // Each result goes straight to its place: what is kept is moved once.
    let at: HashMap<TaskId, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut done: Vec<Option<T>> = Vec::with_capacity(ids.len());
    done.resize_with(ids.len(), || None);
    let mut finals = client.wait_results(ids.clone());
    while let Some(task) = finals.next().await {
        let task = task.context("waiting for a batch")?;
        if task.state != TaskState::Succeeded {
            bail!("task {} ended {} ({})", task.id, task.state, task.error);
        }
        let Some(&i) = at.get(&task.id) else {
            bail!(
                "a result for task {}, which this wait did not ask for",
                task.id
            );
        };
        done[i] = Some(keep(task));
    }
    ids.iter()
        .zip(done)
        .map(|(id, kept)| kept.with_context(|| format!("no result for task {id}")))
        .collect()
}

/// Checks that the outputs are the inputs, in submission order.
pub fn check_noop(outputs: &[Output], inputs: impl Iterator<Item = usize>) -> anyhow::Result<()> {
    for (done, x) in outputs.iter().zip(inputs) {
        if done.output[..] != *x.to_string().as_bytes() {
            bail!(
                "wrong result for noop({x}) (task {}): {:?}",
                done.id,
                String::from_utf8_lossy(&done.output)
            );
        }
    }
    Ok(())
}

/// One submit-then-wait round trip (`Run`: submit and watch in one call);
/// answers the final task.
pub async fn round_trip(client: &Client, spec: TaskSpec) -> anyhow::Result<Task> {
    let mut events = client.run(spec).await?;
    while let Some(event) = events.next().await {
        if let EventBody::Finished(task) = event?.body {
            // Read to the trailers so the stream closes cleanly.
            weft_client::drain(events).await;
            return Ok(task);
        }
    }
    bail!("the run stream ended before the task finished")
}

/// One noop round trip, checked.
pub async fn noop_round_trip(client: &Client, x: usize) -> anyhow::Result<()> {
    let task = round_trip(client, noop(x)).await?;
    if task.state != TaskState::Succeeded || task.output[..] != *x.to_string().as_bytes() {
        bail!(
            "noop({x}) ended {} with {:?} ({})",
            task.state,
            String::from_utf8_lossy(&task.output),
            task.error
        );
    }
    Ok(())
}

/// Throughput: `runs` × (submit `n` noops, wait for all); tasks/s per run
/// and the meter of each run.
pub async fn throughput(
    client: &Client,
    n: usize,
    runs: usize,
    concurrency: usize,
    cluster_cpu: &dyn Fn() -> Option<f64>,
) -> anyhow::Result<Vec<(f64, Metered)>> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let specs: Vec<TaskSpec> = (0..n).map(noop).collect();
        let meter = Meter::start(cluster_cpu());
        let tasks = run_all(client, specs, concurrency).await?;
        let metered = meter.stop(cluster_cpu());
        check_noop(&tasks, 0..n)?;
        out.push((n as f64 / metered.wall.as_secs_f64(), metered));
    }
    Ok(out)
}

/// Latency: `warmup` untimed then `n` timed sequential noop round trips.
pub async fn latency(
    client: &Client,
    warmup: usize,
    n: usize,
    cluster_cpu: &dyn Fn() -> Option<f64>,
) -> anyhow::Result<(Latency, Metered)> {
    for i in 0..warmup {
        noop_round_trip(client, i).await?;
    }
    let mut samples = Vec::with_capacity(n);
    let meter = Meter::start(cluster_cpu());
    for i in 0..n {
        let t0 = Instant::now();
        noop_round_trip(client, i).await?;
        samples.push(t0.elapsed());
    }
    let metered = meter.stop(cluster_cpu());
    Ok((
        Latency::from_samples(&samples).context("no latency samples")?,
        metered,
    ))
}

/// Parallel step: `runs` × (submit `n` calls of `handler(input)` at once,
/// wait for all); the meter of each run.
pub async fn parallel(
    client: &Client,
    handler: &str,
    input: &'static str,
    n: usize,
    runs: usize,
    cluster_cpu: &dyn Fn() -> Option<f64>,
) -> anyhow::Result<Vec<Metered>> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let specs: Vec<TaskSpec> = (0..n).map(|_| TaskSpec::call(handler, input)).collect();
        let meter = Meter::start(cluster_cpu());
        run_all(client, specs, n).await?;
        out.push(meter.stop(cluster_cpu()));
    }
    Ok(out)
}

/// The standalone time of one `spin 100ms` task through the cluster: one
/// untimed, then the median of 3 round trips.
pub async fn burn_single(client: &Client) -> anyhow::Result<f64> {
    let once = || async {
        let t0 = Instant::now();
        let task = round_trip(client, TaskSpec::call("spin", "100ms")).await?;
        ensure!(
            task.state == TaskState::Succeeded,
            "spin ended {}: {}",
            task.state,
            task.error
        );
        anyhow::Ok(t0.elapsed().as_secs_f64())
    };
    once().await?;
    let mut times = Vec::new();
    for _ in 0..3 {
        times.push(once().await?);
    }
    crate::stats::median(&times).context("no burn samples")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(x: &str) -> Output {
        Output {
            id: TaskId::new(),
            output: Bytes::copy_from_slice(x.as_bytes()),
        }
    }

    #[test]
    fn outputs_pass_the_check_only_when_each_is_its_own_input_in_order() {
        let outputs = vec![done("0"), done("1"), done("2")];
        check_noop(&outputs, 0..3).unwrap();

        let swapped = vec![done("0"), done("2"), done("1")];
        let bad = swapped[1].id;
        let err = check_noop(&swapped, 0..3).unwrap_err().to_string();
        assert!(
            err.contains("noop(1)") && err.contains(&bad.to_string()),
            "{err}"
        );
    }
}
