//! What durability costs, measured against what the disk allows:
//! - the `durable` step: in one run, the fdatasync latency of the disk the
//!   data dir is on, the noop round trip on an in-memory store and on the
//!   durable store, and the data dir's bytes per finished noop task;
//! - the `retention` step: waves of noops on a coordinator with a short
//!   `--retention`, the data dir's size sampled after every wave, to see
//!   whether it stays bounded.
//!
//! A round trip (`Run` of a noop) needs two synced commits: the Submit and
//! the result. So its durable p50 is held against in-memory p50 + 2 ×
//! fdatasync p50, all three measured here.
//!
//! A sync costs more when the disk has been idle before it (on the
//! virtual disks measured here, a sync after half a millisecond idle takes
//! 1.5–2× one issued back to back), and a round trip's commits come half a
//! round trip apart. So the probe is also run paced that way, and the
//! durable p50 is shown against that bound too.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use weft_client::Client;
use weft_cluster::wait_nodes_ready;

use crate::cluster::{Cluster, ClusterPlan};
use crate::own_processes::READY_TIMEOUT;
use crate::stats::Latency;
use crate::workload;

/// Bytes of each append the fdatasync probe makes (a small commit's size).
pub const PROBE_BLOCK: usize = 4096;

/// Name of the probe's file, beside the data dir.
const PROBE_FILE: &str = "fdatasync-probe";

/// Nodes and slots of the clusters of both steps (the protocol's).
const NODES: usize = 2;
const SLOTS: u32 = 1;

/// The counts of the two steps.
#[derive(Debug, Clone, Copy)]
pub struct DurablePlan {
    /// Untimed round trips on each cluster.
    pub warmup: usize,
    /// Timed round trips on each cluster, and fdatasync samples.
    pub round_trips: usize,
    /// Noop tasks run on the durable cluster before its data dir is measured.
    pub bytes_tasks: usize,
    /// `WaitMany` streams open at once.
    pub concurrency: usize,
}

/// The counts of the retention step.
#[derive(Debug, Clone, Copy)]
pub struct RetentionPlan {
    /// The coordinator's `--retention`.
    pub retention: Duration,
    /// Noop tasks per wave.
    pub wave: usize,
    /// Waves go on until this much time has passed.
    pub run_for: Duration,
    /// `WaitMany` streams open at once.
    pub concurrency: usize,
}

/// Size of a directory tree: regular files only, links not followed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirSize {
    /// Regular files found.
    pub files: u64,
    /// Sum of their lengths (`ls -l`).
    pub apparent_bytes: u64,
    /// Sum of the blocks allocated to them (`du`), bytes.
    pub allocated_bytes: u64,
}

impl DirSize {
    /// What the dir can occupy: the larger of its apparent and allocated
    /// bytes. A store may extend a file sparsely and fill its holes
    /// later, so allocated bytes alone can grow while the file does not.
    pub fn footprint(&self) -> u64 {
        self.apparent_bytes.max(self.allocated_bytes)
    }
}

/// Walks `path` and sums its regular files' sizes. A file that vanishes
/// while the walk runs (the store renames and removes files) is skipped.
pub fn dir_size(path: &Path) -> std::io::Result<DirSize> {
    let mut size = DirSize::default();
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            // symlink_metadata: a link is neither followed nor counted.
            let meta = match entry.path().symlink_metadata() {
                Ok(meta) => meta,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                size.files += 1;
                size.apparent_bytes += meta.len();
                // st_blocks counts 512-byte units whatever the block size.
                size.allocated_bytes += meta.blocks() * 512;
            }
        }
    }
    Ok(size)
}

/// How the fdatasync probe writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Each write extends the file: fdatasync must also commit the new
    /// size (on ext4, a journal commit), as a log append does.
    Append,
    /// Each write overwrites a block already allocated and synced: the
    /// data alone is flushed, as a store rewriting pages in place.
    Overwrite,
}

/// `n` writes of `block` bytes to a new file in `dir` (appends, or
/// overwrites cycling over `n` blocks written and synced first), each
/// followed by fdatasync (`File::sync_data`), timed one by one (write +
/// sync), each after sleeping `gap` (zero: back to back). The file is
/// removed afterwards. Blocking.
pub fn fdatasync_samples(
    dir: &Path,
    n: usize,
    block: usize,
    probe: Probe,
    gap: Duration,
) -> std::io::Result<Vec<Duration>> {
    let path = dir.join(PROBE_FILE);
    let result = (|| {
        let mut file: File = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let data = vec![0x5a_u8; block];
        let blocks = match probe {
            Probe::Append => 1,
            Probe::Overwrite => n.max(1),
        };
        for _ in 0..blocks {
            file.write_all(&data)?;
        }
        file.sync_all()?;
        let mut samples = Vec::with_capacity(n);
        for i in 0..n {
            if probe == Probe::Overwrite {
                file.seek(SeekFrom::Start(((i % blocks) * block) as u64))?;
            }
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
            let t0 = Instant::now();
            file.write_all(&data)?;
            file.sync_data()?;
            samples.push(t0.elapsed());
        }
        Ok(samples)
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// The `durable` step's figures.
#[derive(Debug, Clone)]
pub struct Durable {
    /// write + fdatasync of a [`PROBE_BLOCK`] append in the data dir's
    /// temp dir (the bound is drawn from this one).
    pub fdatasync: Latency,
    /// write + fdatasync of a [`PROBE_BLOCK`] overwrite in place there.
    pub fdatasync_overwrite: Latency,
    /// The same overwrites, each after the disk idled `paced_gap`.
    pub fdatasync_paced: Latency,
    /// Half the in-memory round trip p50: how far apart a round trip's
    /// two commits come.
    pub paced_gap: Duration,
    /// Noop round trips on a coordinator with the in-memory store.
    pub memory: Latency,
    /// Noop round trips on a coordinator with the durable store.
    pub durable: Latency,
    /// Noop tasks the durable store holds when its dir is measured.
    pub tasks_stored: usize,
    /// The data dir just after the durable coordinator started.
    pub dir_empty: DirSize,
    /// The data dir after `tasks_stored` finished tasks.
    pub dir_after: DirSize,
}

impl Durable {
    /// What the durable p50 is held against: in-memory p50 + 2 × fdatasync
    /// p50 (a Submit commit and a result commit), µs.
    pub fn bound_p50_us(&self) -> f64 {
        self.memory.p50_us + 2.0 * self.fdatasync.p50_us
    }

    /// The bound with the overwrite probe instead of the append one:
    /// in-memory p50 + 2 × overwrite fdatasync p50, µs. The log writes its
    /// commits over zeros it wrote ahead, so this is the disk's limit for
    /// its commits; the append bound is the issue's.
    pub fn overwrite_bound_p50_us(&self) -> f64 {
        self.memory.p50_us + 2.0 * self.fdatasync_overwrite.p50_us
    }

    /// The bound with overwrites spaced as a round trip's commits are:
    /// in-memory p50 + 2 × paced overwrite fdatasync p50, µs.
    pub fn paced_bound_p50_us(&self) -> f64 {
        self.memory.p50_us + 2.0 * self.fdatasync_paced.p50_us
    }

    /// Durable p50 over [`Durable::bound_p50_us`] (≤ 1 meets the target).
    pub fn p50_over_bound(&self) -> f64 {
        self.durable.p50_us / self.bound_p50_us()
    }

    /// Durable p99 over durable p50 (the target is ≤ 2).
    pub fn p99_over_p50(&self) -> f64 {
        self.durable.p99_us / self.durable.p50_us
    }

    /// Data-dir bytes per stored task beyond the empty store's: apparent
    /// and allocated.
    pub fn bytes_per_task(&self) -> (f64, f64) {
        let per = |after: u64, empty: u64| {
            after.saturating_sub(empty) as f64 / self.tasks_stored.max(1) as f64
        };
        (
            per(self.dir_after.apparent_bytes, self.dir_empty.apparent_bytes),
            per(
                self.dir_after.allocated_bytes,
                self.dir_empty.allocated_bytes,
            ),
        )
    }
}

/// The `durable` step: the in-memory cluster's round trips, then on the
/// durable cluster the fdatasync probes (back to back, and overwrites
/// paced half an in-memory round trip apart), its round trips, and
/// `bytes_tasks` more noops before its data dir is measured.
pub async fn durable(base: &ClusterPlan, plan: DurablePlan) -> anyhow::Result<Durable> {
    let memory_plan = ClusterPlan {
        nodes: NODES,
        slots: SLOTS,
        durable: false,
        ..base.clone()
    };
    let memory = with_cluster(&memory_plan, |started| async move {
        round_trips(&started.client, plan).await
    })
    .await
    .context("in-memory store")?;

    let durable_plan = ClusterPlan {
        durable: true,
        ..memory_plan
    };
    with_cluster(&durable_plan, |started| async move {
        let Started {
            client,
            data_dir,
            temp_dir: probe_dir,
        } = started;
        let data_dir = data_dir.context("the durable coordinator made no data dir")?;
        let dir_empty = dir_size(&data_dir).context("measuring the data dir")?;
        let n = plan.round_trips;
        let probe = |kind: Probe, gap: Duration| {
            let dir = probe_dir.clone();
            async move {
                let samples = tokio::task::spawn_blocking(move || {
                    fdatasync_samples(&dir, n, PROBE_BLOCK, kind, gap)
                })
                .await
                .context("the fdatasync probe panicked")?
                .context("probing fdatasync beside the data dir")?;
                Latency::from_samples(&samples).context("no fdatasync samples")
            }
        };
        let fdatasync = probe(Probe::Append, Duration::ZERO).await?;
        let fdatasync_overwrite = probe(Probe::Overwrite, Duration::ZERO).await?;
        let paced_gap = Duration::from_secs_f64(memory.p50_us / 2.0 / 1e6);
        let fdatasync_paced = probe(Probe::Overwrite, paced_gap).await?;
        let durable = round_trips(&client, plan).await.context("durable store")?;
        let specs = (0..plan.bytes_tasks).map(workload::noop).collect();
        let tasks = workload::run_all(&client, specs, plan.concurrency).await?;
        workload::check_noop(&tasks, 0..plan.bytes_tasks)?;
        let dir_after = dir_size(&data_dir).context("measuring the data dir")?;
        Ok(Durable {
            fdatasync,
            fdatasync_overwrite,
            fdatasync_paced,
            paced_gap,
            memory,
            durable,
            tasks_stored: plan.warmup.max(1) + plan.round_trips + plan.bytes_tasks,
            dir_empty,
            dir_after,
        })
    })
    .await
}

/// `warmup` untimed then `round_trips` timed noop round trips (the latency
/// step's own code).
async fn round_trips(client: &Client, plan: DurablePlan) -> anyhow::Result<Latency> {
    let no_cpu = || None;
    let (latency, _) =
        workload::latency(client, plan.warmup.max(1), plan.round_trips, &no_cpu).await?;
    Ok(latency)
}

/// What a step's body gets of the cluster [`with_cluster`] started.
struct Started {
    /// A client of the cluster, its nodes ready.
    client: Client,
    /// The coordinator's data dir (`None`: in-memory store).
    data_dir: Option<PathBuf>,
    /// The bench's temp dir of this cluster (the data dir is inside).
    temp_dir: PathBuf,
}

/// Starts a cluster, waits for its nodes, runs `body`, stops the cluster
/// whatever `body` answered (with the coordinator's log tail if it died).
async fn with_cluster<F, Fut, T>(plan: &ClusterPlan, body: F) -> anyhow::Result<T>
where
    F: FnOnce(Started) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut cluster = Cluster::start(plan).await?;
    let result = async {
        let client = cluster.client().await?;
        wait_nodes_ready(&client, plan.nodes, READY_TIMEOUT).await?;
        body(Started {
            client,
            data_dir: cluster.data_dir(),
            temp_dir: cluster.dir.path().to_owned(),
        })
        .await
    }
    .await;
    let result = match result {
        Err(err) => Err(match cluster.check_alive() {
            Err(dead) => dead.context(err.to_string()),
            Ok(()) => err,
        }),
        ok => ok,
    };
    cluster.stop().await;
    result
}

/// One sample of the retention step: after a wave.
#[derive(Debug, Clone, Copy)]
pub struct DirSample {
    /// Seconds since the first wave started.
    pub at_s: f64,
    /// Tasks finished so far.
    pub tasks: usize,
    /// The data dir's size then.
    pub size: DirSize,
}

/// The `retention` step's figures.
#[derive(Debug, Clone)]
pub struct RetentionRun {
    /// The coordinator's `--retention`.
    pub retention: Duration,
    /// Noop tasks per wave.
    pub wave: usize,
    /// The data dir before the first wave, then after every wave.
    pub samples: Vec<DirSample>,
}

/// Growth under a steady load above which a dir is called unbounded:
/// the second half's largest size over the first half's.
pub const BOUNDED_GROWTH: f64 = 1.10;

impl RetentionRun {
    /// Tasks finished over the run.
    pub fn tasks(&self) -> usize {
        self.samples.last().map_or(0, |s| s.tasks)
    }

    /// Seconds the waves took.
    pub fn run_s(&self) -> f64 {
        self.samples.last().map_or(0.0, |s| s.at_s)
    }

    /// The dir's [`DirSize::footprint`] after the first wave, the largest,
    /// the last.
    pub fn first_max_last(&self) -> Option<(u64, u64, u64)> {
        let waves = self.samples.get(1..)?;
        let first = waves.first()?.size.footprint();
        let max = waves.iter().map(|s| s.size.footprint()).max()?;
        let last = waves.last()?.size.footprint();
        Some((first, max, last))
    }

    /// The largest [`DirSize::footprint`] over the second half of the
    /// waves divided by the largest over the first half; `None` with fewer
    /// than 4 waves (too few to tell).
    pub fn growth(&self) -> Option<f64> {
        let waves = self.samples.get(1..)?;
        if waves.len() < 4 {
            return None;
        }
        let (early, late) = waves.split_at(waves.len() / 2);
        let max = |s: &[DirSample]| s.iter().map(|x| x.size.footprint()).max();
        let (early, late) = (max(early)?, max(late)?);
        Some(late as f64 / early.max(1) as f64)
    }

    /// Whether the dir stayed bounded: [`RetentionRun::growth`] within
    /// [`BOUNDED_GROWTH`].
    pub fn bounded(&self) -> Option<bool> {
        self.growth().map(|g| g <= BOUNDED_GROWTH)
    }
}

/// The `retention` step: a durable cluster whose coordinator keeps
/// finished tasks for `plan.retention` only; waves of `plan.wave` noops
/// until `plan.run_for` has passed, the data dir's size after each.
pub async fn retention(base: &ClusterPlan, plan: RetentionPlan) -> anyhow::Result<RetentionRun> {
    let mut coordinator_args = base.coordinator_args.clone();
    coordinator_args.extend([
        "--retention".to_owned(),
        humantime::format_duration(plan.retention).to_string(),
    ]);
    let cluster_plan = ClusterPlan {
        nodes: NODES,
        slots: SLOTS,
        durable: true,
        coordinator_args,
        ..base.clone()
    };
    with_cluster(&cluster_plan, |started| async move {
        let Started {
            client, data_dir, ..
        } = started;
        let data_dir = data_dir.context("the durable coordinator made no data dir")?;
        let measure = || dir_size(&data_dir).context("measuring the data dir");
        let t0 = Instant::now();
        let mut samples = vec![DirSample {
            at_s: 0.0,
            tasks: 0,
            size: measure()?,
        }];
        let mut tasks = 0;
        while t0.elapsed() < plan.run_for || samples.len() < 2 {
            let specs = (0..plan.wave).map(workload::noop).collect();
            let done = workload::run_all(&client, specs, plan.concurrency).await?;
            workload::check_noop(&done, 0..plan.wave)?;
            tasks += plan.wave;
            samples.push(DirSample {
                at_s: t0.elapsed().as_secs_f64(),
                tasks,
                size: measure()?,
            });
        }
        Ok(RetentionRun {
            retention: plan.retention,
            wave: plan.wave,
            samples,
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(p50_us: f64, p99_us: f64) -> Latency {
        Latency {
            p50_us,
            p90_us: p99_us,
            p99_us,
            mean_us: p50_us,
            min_us: p50_us,
            max_us: p99_us,
            n: 100,
        }
    }

    fn size(allocated_bytes: u64) -> DirSize {
        DirSize {
            files: 1,
            apparent_bytes: allocated_bytes,
            allocated_bytes,
        }
    }

    #[test]
    fn durable_round_trip_is_held_against_memory_plus_two_syncs() {
        let d = Durable {
            fdatasync: lat(500.0, 900.0),
            fdatasync_overwrite: lat(100.0, 200.0),
            fdatasync_paced: lat(200.0, 400.0),
            paced_gap: Duration::from_micros(150),
            memory: lat(300.0, 600.0),
            durable: lat(1_300.0, 3_900.0),
            tasks_stored: 1_000,
            dir_empty: size(1_000_000),
            dir_after: DirSize {
                files: 2,
                apparent_bytes: 3_000_000,
                allocated_bytes: 2_500_000,
            },
        };
        assert_eq!(d.bound_p50_us(), 1_300.0);
        assert_eq!(d.overwrite_bound_p50_us(), 500.0);
        assert_eq!(d.paced_bound_p50_us(), 700.0);
        assert_eq!(d.p50_over_bound(), 1.0);
        assert_eq!(d.p99_over_p50(), 3.0);
        assert_eq!(d.bytes_per_task(), (2_000.0, 1_500.0));
    }

    #[test]
    fn a_dir_that_levels_off_is_bounded_and_one_that_keeps_growing_is_not() {
        let run = |sizes: &[u64]| RetentionRun {
            retention: Duration::from_secs(2),
            wave: 10,
            samples: sizes
                .iter()
                .enumerate()
                .map(|(i, &s)| DirSample {
                    at_s: i as f64,
                    tasks: i * 10,
                    size: size(s),
                })
                .collect(),
        };
        let level = run(&[0, 50, 100, 100, 98, 101, 100]);
        assert_eq!(level.first_max_last(), Some((50, 101, 100)));
        assert_eq!(level.bounded(), Some(true));
        assert_eq!((level.tasks(), level.run_s()), (60, 6.0));
        let growing = run(&[0, 50, 100, 150, 200, 250, 300]);
        assert_eq!(growing.growth(), Some(2.0));
        assert_eq!(growing.bounded(), Some(false));
        // Too few waves to tell.
        assert_eq!(run(&[0, 50, 100]).bounded(), None);
        assert_eq!(run(&[0]).first_max_last(), None);
    }

    #[test]
    fn a_sparse_file_filling_its_holes_is_not_growth() {
        let sparse = |allocated_bytes: u64| DirSize {
            files: 1,
            apparent_bytes: 34,
            allocated_bytes,
        };
        assert_eq!(sparse(26).footprint(), 34);
        assert_eq!(sparse(40).footprint(), 40);
        let run = RetentionRun {
            retention: Duration::from_secs(2),
            wave: 10,
            samples: [0, 21, 26, 26, 27, 29, 30]
                .iter()
                .enumerate()
                .map(|(i, &a)| DirSample {
                    at_s: i as f64,
                    tasks: i * 10,
                    size: sparse(a),
                })
                .collect(),
        };
        assert_eq!(run.first_max_last(), Some((34, 34, 34)));
        assert_eq!(run.bounded(), Some(true));
    }

    #[test]
    fn dir_size_sums_regular_files_in_subdirs_and_skips_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 10_000]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub").join("b"), vec![2u8; 5]).unwrap();
        std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("link")).unwrap();
        let size = dir_size(dir.path()).unwrap();
        assert_eq!((size.files, size.apparent_bytes), (2, 10_005));
        // Allocated in whole blocks (a filesystem may compress or inline
        // tiny files, so only the order of magnitude is checked).
        assert!(size.allocated_bytes.is_multiple_of(512));
        assert!(size.allocated_bytes <= 10_005 + 2 * 65_536);
        assert!(dir_size(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_fdatasync_probe_times_each_append_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        for probe in [Probe::Append, Probe::Overwrite] {
            let samples = fdatasync_samples(dir.path(), 5, 4096, probe, Duration::ZERO).unwrap();
            assert_eq!(samples.len(), 5);
            assert!(!dir.path().join(PROBE_FILE).exists());
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    #[test]
    fn a_paced_probe_idles_before_each_sync_and_times_only_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let gap = Duration::from_millis(20);
        let started = Instant::now();
        let samples = fdatasync_samples(dir.path(), 5, 4096, Probe::Overwrite, gap).unwrap();
        let took = started.elapsed();
        assert_eq!(samples.len(), 5);
        // Each sample was preceded by the gap...
        assert!(
            took >= gap * 5,
            "5 samples paced {gap:?} apart took {took:?}"
        );
        // ...which none of them counts: the samples and gaps add up to at
        // most the whole run.
        let timed: Duration = samples.iter().sum();
        assert!(timed + gap * 5 <= took, "timed {timed:?} + gaps > {took:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
