//! The `recovery` step: a coordinator with no node and a big queue
//! (default a million noops) is killed with SIGKILL and started again on
//! the same data dir; how long until it serves again (a `ClusterInfo`
//! answer counting every task queued) and the memory recovery takes
//! (the new process's `VmHWM`, its peak resident set) against what the
//! coordinator held before the crash.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use weft_client::Client;

use crate::cluster::{Cluster, ClusterPlan};
use crate::own_processes::queue_noops;

/// How long a restarted coordinator may take to serve the whole queue.
const SERVE_TIMEOUT: Duration = Duration::from_secs(300);

/// How often the restarted coordinator is asked for its counts.
const SERVE_POLL: Duration = Duration::from_millis(2);

/// The `recovery` step's figures.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Tasks queued before the crash.
    pub tasks: usize,
    /// Seconds it took to queue them.
    pub submit_s: f64,
    /// The coordinator's `VmRSS` just before SIGKILL, bytes.
    pub rss_before_crash: Option<u64>,
    /// Its `VmHWM` (peak resident set over its life) then, bytes.
    pub peak_before_crash: Option<u64>,
    /// Seconds from spawning the new coordinator to its address file.
    pub listening_s: f64,
    /// Seconds from spawning it to the first `ClusterInfo` counting
    /// `tasks` queued.
    pub serving_s: f64,
    /// The QUEUED count of that answer.
    pub queued_seen: u64,
    /// The new coordinator's `VmRSS` then, bytes.
    pub rss_serving: Option<u64>,
    /// Its `VmHWM` then: the peak of recovery, bytes.
    pub peak_recovery: Option<u64>,
}

impl Recovery {
    /// Peak resident memory of recovery over the resident memory before
    /// the crash (the target is ≤ 1.5).
    pub fn peak_over_before(&self) -> Option<f64> {
        let (peak, before) = self.peak_recovery.zip(self.rss_before_crash)?;
        Some(peak as f64 / before.max(1) as f64)
    }
}

/// A `kB` field (`VmRSS:`, `VmHWM:`) of a `/proc/<pid>/status` text, in bytes.
pub fn status_field_bytes(status: &str, field: &str) -> Option<u64> {
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))?;
    let mut words = line.split(':').nth(1)?.split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(kib * 1024),
        Some(_) => None,
    }
}

/// The peak resident set of process `pid` so far, in bytes, Linux only:
/// `VmHWM`, or `VmRSS` where that is more. The kernel counts resident
/// pages per CPU and sums them inexactly for the high-water mark, so a
/// running multi-threaded process can show a `VmHWM` a little under its
/// `VmRSS` of the same moment; the peak is never under the present.
fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    peak_of_status(&status)
}

/// `VmHWM`, or `VmRSS` where that is more, of a `/proc/<pid>/status` text.
fn peak_of_status(status: &str) -> Option<u64> {
    let hwm = status_field_bytes(status, "VmHWM")?;
    Some(status_field_bytes(status, "VmRSS").map_or(hwm, |rss| rss.max(hwm)))
}

/// The `recovery` step: queue `n` noops on a durable coordinator with no
/// node, SIGKILL it, start it again on the same data dir, wait until it
/// counts all `n` queued.
pub async fn recovery(base: &ClusterPlan, n: usize) -> anyhow::Result<Recovery> {
    let plan = ClusterPlan {
        nodes: 0,
        durable: true,
        ..base.clone()
    };
    let mut cluster = Cluster::start(&plan).await?;
    let result = measure(&mut cluster, n).await;
    cluster.stop().await;
    result
}

async fn measure(cluster: &mut Cluster, n: usize) -> anyhow::Result<Recovery> {
    let client = cluster.client().await?;
    let submit_s = queue_noops(cluster, &client, n).await?;
    drop(client);
    let pid = cluster
        .coordinator
        .pid()
        .context("the coordinator exited")?;
    let rss_before_crash = weft_cluster::procfs::rss_bytes(pid);
    let peak_before_crash = peak_rss_bytes(pid);

    let spawned = cluster.crash_and_restart_coordinator().await?;
    let listening_s = spawned.elapsed().as_secs_f64();
    let pid = cluster
        .coordinator
        .pid()
        .context("the restarted coordinator exited")?;
    let client = cluster.client().await?;
    let queued_seen = wait_queued(cluster, &client, n as u64, spawned).await?;
    let serving_s = spawned.elapsed().as_secs_f64();
    let rss_serving = weft_cluster::procfs::rss_bytes(pid);
    let peak_recovery = peak_rss_bytes(pid);
    Ok(Recovery {
        tasks: n,
        submit_s,
        rss_before_crash,
        peak_before_crash,
        listening_s,
        serving_s,
        queued_seen,
        rss_serving,
        peak_recovery,
    })
}

/// Asks the coordinator for its counts until it reports at least `n`
/// queued; answers that count. Fails if it dies or takes longer than
/// [`SERVE_TIMEOUT`] from `since`.
async fn wait_queued(
    cluster: &mut Cluster,
    client: &Client,
    n: u64,
    since: Instant,
) -> anyhow::Result<u64> {
    let mut last = None;
    loop {
        match client.cluster_info().await {
            Ok(info) => {
                let queued = info.count(weft_proto::TaskState::Queued);
                if queued >= n {
                    return Ok(queued);
                }
                last = Some(queued);
            }
            Err(err) if err.is_retryable() => {}
            Err(err) => return Err(err).context("asking the restarted coordinator"),
        }
        cluster.check_alive()?;
        if since.elapsed() > SERVE_TIMEOUT {
            bail!(
                "the restarted coordinator counted {} of {n} tasks queued after {SERVE_TIMEOUT:?}",
                last.map_or_else(|| "none".to_owned(), |q| q.to_string())
            );
        }
        tokio::time::sleep(SERVE_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_bytes() {
        let status =
            "Name:\tweft-coordinator\nVmPeak:\t  900 kB\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_field_bytes(status, "VmHWM"), Some(2048 * 1024));
        assert_eq!(status_field_bytes(status, "VmRSS"), Some(1024 * 1024));
        // A prefix of another field's name is not that field.
        assert_eq!(status_field_bytes(status, "Vm"), None);
        assert_eq!(status_field_bytes(status, "VmSwap"), None);
        assert_eq!(status_field_bytes("VmHWM:\t12 MB\n", "VmHWM"), None);
    }

    #[test]
    fn recovery_peak_is_held_against_the_memory_before_the_crash() {
        let r = Recovery {
            tasks: 10,
            submit_s: 1.0,
            rss_before_crash: Some(100),
            peak_before_crash: Some(120),
            listening_s: 0.1,
            serving_s: 0.2,
            queued_seen: 10,
            rss_serving: Some(110),
            peak_recovery: Some(150),
        };
        assert_eq!(r.peak_over_before(), Some(1.5));
        let unknown = Recovery {
            rss_before_crash: None,
            ..r
        };
        assert_eq!(unknown.peak_over_before(), None);
    }

    #[test]
    fn the_peak_is_the_high_water_mark_and_never_under_the_present() {
        let status = |hwm: u64, rss: u64| format!("VmHWM:\t{hwm} kB\nVmRSS:\t{rss} kB\n");
        assert_eq!(peak_of_status(&status(900, 400)), Some(900 * 1024));
        // The mark summed a little short of the present: the present.
        assert_eq!(peak_of_status(&status(1000, 1004)), Some(1004 * 1024));
        assert_eq!(peak_of_status("VmHWM:\t7 kB\n"), Some(7 * 1024));
        assert_eq!(peak_of_status("VmRSS:\t7 kB\n"), None);
    }

    #[test]
    fn this_process_has_a_peak_resident_set_on_linux() {
        if cfg!(target_os = "linux") {
            // The present first: the peak read after it is at least it.
            let rss = weft_cluster::procfs::rss_bytes(std::process::id()).unwrap();
            let peak = peak_rss_bytes(std::process::id()).unwrap();
            assert!(peak >= rss && rss > 0, "peak {peak} B, resident {rss} B");
        }
    }
}
