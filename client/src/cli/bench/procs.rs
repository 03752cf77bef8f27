//! The processes `weft bench` starts and what it reads about them: finding
//! the `weft-coordinator` and `weft-node` binaries, spawning them on
//! loopback with logs in a temp dir, and reading resident memory and CPU
//! time from `/proc` (Linux only; elsewhere every reading is `None`).
//!
//! Every child is started with `kill_on_drop(true)`: an error or Ctrl-C in
//! the bench drops the cluster and kills it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, fixed at
/// 100 by the Linux ABI on every architecture we build for).
const USER_HZ: f64 = 100.0;

/// How often the coordinator's address file is polled at start-up.
const ADDR_POLL: Duration = Duration::from_millis(5);

/// How long a coordinator may take to write its address file.
const ADDR_TIMEOUT: Duration = Duration::from_secs(30);

/// The folder holding the Weft binaries: `WEFT_BIN_DIR`, else the folder of
/// the running `weft` executable.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("WEFT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the weft executable")?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The path of binary `name` in `dir`, or an error saying how to build it.
pub fn bin_path(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build with `cargo build --release --bins` (or set WEFT_BIN_DIR)",
            path.display()
        );
    }
    Ok(path)
}

/// One child process of the bench, logging to a file.
#[derive(Debug)]
pub struct ChildProcess {
    label: String,
    log: PathBuf,
    child: Child,
}

impl ChildProcess {
    /// Starts `bin` with `args`, stdout and stderr to `<dir>/<label>.log`,
    /// log level from `log_filter`.
    pub fn spawn(
        bin: &Path,
        args: &[String],
        dir: &Path,
        label: &str,
        log_filter: &str,
    ) -> anyhow::Result<ChildProcess> {
        let log = dir.join(format!("{label}.log"));
        let out = std::fs::File::create(&log)
            .with_context(|| format!("creating log file {}", log.display()))?;
        let err = out.try_clone().context("cloning a log file handle")?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env("RUST_LOG", log_filter)
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} for {label}", bin.display()))?;
        Ok(ChildProcess {
            label: label.to_owned(),
            log,
            child,
        })
    }

    /// The OS process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{} exited ({status}); log {}:\n{}",
                self.label,
                self.log.display(),
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub async fn kill(mut self) {
        if let Err(err) = self.child.kill().await {
            tracing::debug!(label = %self.label, error = %err, "kill failed (already gone?)");
        }
    }
}

/// What a [`Cluster`] is made of.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    /// Nodes to start (0 for the scale and many-nodes steps).
    pub nodes: usize,
    /// Slots per node.
    pub slots: u32,
    /// `RUST_LOG` of the children.
    pub log_filter: String,
    /// Whether the coordinator gets `--data-dir` (its durable store).
    pub durable: bool,
}

/// A coordinator (durable store under a temp dir) and its nodes, as real
/// processes on loopback.
#[derive(Debug)]
pub struct Cluster {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The coordinator process.
    pub coordinator: ChildProcess,
    /// The node processes.
    pub nodes: Vec<ChildProcess>,
    /// Holds logs and the store; removed on drop.
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Spawns the coordinator, polls its address file every 5 ms until it
    /// is listening, then spawns the nodes at once. Returns without waiting
    /// for the nodes to register.
    pub async fn start(bins: &Path, plan: &ClusterPlan) -> anyhow::Result<Cluster> {
        let coordinator_bin = bin_path(bins, "weft-coordinator")?;
        let node_bin = bin_path(bins, "weft-node")?;
        let dir = tempfile::Builder::new()
            .prefix("weft-bench-")
            .tempdir()
            .context("creating the bench temp dir")?;
        let addr_file = dir.path().join("coordinator.addr");
        let data_dir = dir.path().join("data");
        let mut args = vec![
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--addr-file".to_owned(),
            addr_file.display().to_string(),
        ];
        if plan.durable {
            args.push("--data-dir".to_owned());
            args.push(data_dir.display().to_string());
        } else {
            // Without a flag the coordinator would open its default durable
            // store; say explicitly that this run keeps nothing.
            args.push("--in-memory".to_owned());
        }
        let mut coordinator = ChildProcess::spawn(
            &coordinator_bin,
            &args,
            dir.path(),
            "coordinator",
            &plan.log_filter,
        )?;
        let deadline = Instant::now() + ADDR_TIMEOUT;
        let addr = loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file)
                && !text.trim().is_empty()
            {
                break text.trim().to_owned();
            }
            coordinator.check_alive()?;
            if Instant::now() >= deadline {
                bail!("the coordinator wrote no address within {ADDR_TIMEOUT:?}");
            }
            tokio::time::sleep(ADDR_POLL).await;
        };
        let url = format!("http://{addr}");
        let nodes = (1..=plan.nodes)
            .map(|i| {
                let args = vec![
                    "--coordinator".to_owned(),
                    url.clone(),
                    "--slots".to_owned(),
                    plan.slots.to_string(),
                    "--name".to_owned(),
                    format!("bench-{i}"),
                ];
                ChildProcess::spawn(
                    &node_bin,
                    &args,
                    dir.path(),
                    &format!("node-{i}"),
                    &plan.log_filter,
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Cluster {
            url,
            coordinator,
            nodes,
            dir,
        })
    }

    /// Process ids of the coordinator and nodes still running.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.coordinator)
            .chain(&self.nodes)
            .filter_map(ChildProcess::pid)
            .collect()
    }

    /// CPU seconds used so far by the coordinator and every node.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.pids().into_iter().map(cpu_seconds).sum()
    }

    /// Fails with a log tail if any process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.coordinator.check_alive()?;
        for node in &mut self.nodes {
            node.check_alive()?;
        }
        Ok(())
    }

    /// Kills every process (nodes first) and removes the temp dir.
    pub async fn stop(self) {
        for node in self.nodes {
            node.kill().await;
        }
        self.coordinator.kill().await;
    }
}

/// Resident memory of process `pid` in bytes (`VmRSS`), Linux only.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// User + system CPU seconds used by process `pid` (all its threads), Linux only.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat)
}

/// CPU seconds used by this process.
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// `utime + stime` of a `/proc/<pid>/stat` line, in seconds. The command
/// name in parentheses may hold spaces, so fields count from the last `)`.
fn parse_stat_cpu(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ... utime is field 14 of the line, so 11 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// Busy and steal CPU seconds of the whole host (`/proc/stat`), for noise
/// accounting: (busy, steal).
pub fn host_cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    Some((busy as f64 / USER_HZ, *v.get(7)? as f64 / USER_HZ))
}

/// The machine a run happened on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// Total memory, GiB.
    pub mem_gib: Option<f64>,
    /// Kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: Option<String>,
    /// `std::env::consts::OS`-`ARCH`.
    pub os: String,
}

impl Machine {
    /// Reads what the OS tells about this machine.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned());
        let mem_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<f64>().ok()
            })
            .map(|kib| kib / (1024.0 * 1024.0));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|k| k.trim().to_owned());
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            mem_gib,
            kernel,
            os: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tweft\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn stat_cpu_counts_fields_after_the_command_name() {
        let stat = "42 (weft coord) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0";
        assert_eq!(parse_stat_cpu(stat), Some(3.0));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn own_process_readings_exist_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(rss_bytes(std::process::id()).unwrap() > 0);
            assert!(own_cpu_seconds().is_some());
        }
    }
}
