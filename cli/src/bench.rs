//! `weft bench`: runs [`weft_bench::run`] (interruptible by Ctrl-C,
//! SIGTERM or SIGHUP, any of which drops and so kills the bench's cluster
//! and removes its temp dir), prints the report as the table or `--output
//! json`, appends the results.jsonl lines if asked, and answers exit 1 if
//! a step failed (a skipped step is no failure). Measuring is
//! `weft_bench`'s job.
//!
//! The children are not given `PR_SET_PDEATHSIG`: setting it needs
//! `pre_exec`, which is `unsafe`, and the workspace forbids unsafe code.
//! A `weft bench` killed with SIGKILL therefore leaves its cluster behind;
//! every signal it can catch stops the cluster first.

use anyhow::{Context, bail};

use weft_bench::BenchArgs;

use crate::exit::{self, UsageError};
use crate::output::OutputFormat;

/// `weft bench`. `external` is the `--coordinator` URL when the user gave
/// one, `token` the client token for it (its own cluster's admin token
/// otherwise).
pub async fn run(
    args: BenchArgs,
    external: Option<String>,
    token: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<u8> {
    if let Some(why) = args.refusal() {
        return Err(UsageError(why).into());
    }
    let report = tokio::select! {
        report = weft_bench::run(&args, external, token) => report?,
        signal = stop_signal() => bail!("interrupted by {signal}; the cluster was stopped"),
    };
    match format {
        OutputFormat::Text => println!("{}", report.table()),
        OutputFormat::Json => println!("{:#}", report.json()),
    }
    if let Some(path) = &args.results_jsonl {
        report
            .append_jsonl(path)
            .with_context(|| format!("appending to {}", path.display()))?;
        eprintln!("weft bench: appended results to {}", path.display());
    }
    Ok(if report.failed() {
        exit::FAILURE
    } else {
        exit::SUCCESS
    })
}

/// Resolves with the signal's name on SIGINT (Ctrl-C), SIGTERM or SIGHUP
/// (the terminal closed): each must stop the bench's cluster, which the
/// default action (exit without unwinding) would leave running. SIGHUP
/// only when it was not ignored at start (`nohup`): a handler would undo
/// that, and the children would no longer inherit it.
pub(crate) async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let hup = match hangup_ignored() {
        true => None,
        false => signal(SignalKind::hangup()).ok(),
    };
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    let hangup = async move {
        match hup {
            Some(mut hup) => hup.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hangup => "SIGHUP",
    }
}

/// True when this process ignores SIGHUP (as under `nohup`), read from
/// the ignored-signal mask in `/proc/self/status`.
fn hangup_ignored() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| sighup_in_mask(&status))
}

/// Whether the `SigIgn:` line of a `/proc/PID/status` text has SIGHUP
/// (signal 1, the mask's lowest bit).
fn sighup_in_mask(status: &str) -> bool {
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & 1 == 1)
}

/// A line on stderr that never panics: after a hang-up the terminal is
/// gone, and the cluster must still be stopped.
pub(crate) fn note(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// `weft` (as built: `cargo build --bins`), with none of this
    /// process's `WEFT_*` variables and `TMPDIR` set to `tmp`.
    pub(crate) fn weft_command(tmp: &Path) -> Command {
        let weft = weft_cluster::bin_path("weft").expect("run `cargo build --bins` first");
        let mut command = Command::new(weft);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("WEFT_") {
                command.env_remove(name);
            }
        }
        command
            .env("TMPDIR", tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    /// Sends `signal` (`-TERM`, `-INT`) to process `pid`.
    pub(crate) fn send(signal: &str, pid: u32) {
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Polls `check` every 20 ms until it answers `Some`, for up to `limit`.
    pub(crate) fn wait_for<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = check() {
                return Some(found);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Processes whose working directory is under `dir` (the bench's
    /// children run in their cluster's temp dir).
    fn processes_in(dir: &Path) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                alive(*pid)
                    && std::fs::read_link(format!("/proc/{pid}/cwd"))
                        .is_ok_and(|cwd| cwd.starts_with(dir))
            })
            .collect()
    }

    /// Whether process `pid` exists and is not a zombie.
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        })
    }

    /// The bench's `weft-bench-*` temp dir under `tmp`, once its
    /// coordinator wrote its address (the cluster is up).
    fn started_cluster(tmp: &Path) -> Option<PathBuf> {
        std::fs::read_dir(tmp)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.join("coordinator.addr").is_file())
    }

    #[test]
    fn only_an_ignored_sighup_is_seen_in_the_mask() {
        let status =
            |mask: &str| format!("Name:\tweft\nSigBlk:\t0000000000000001\nSigIgn:\t{mask}\n");
        assert!(super::sighup_in_mask(&status("0000000000000001")));
        assert!(super::sighup_in_mask(&status("0000000000001003")));
        assert!(!super::sighup_in_mask(&status("0000000000001000")));
        assert!(!super::sighup_in_mask("Name:\tweft\n"));
    }

    #[test]
    fn weft_local_under_nohup_outlives_a_hangup_and_stops_on_ctrl_c() {
        use std::io::BufRead;
        let tmp = tempfile::tempdir().unwrap();
        let weft = weft_cluster::bin_path("weft").expect("run `cargo build --bins` first");
        // As `nohup` starts it: SIGHUP ignored.
        let program = weft_command(tmp.path());
        let mut shell = Command::new("/bin/sh");
        for (name, value) in program.get_envs() {
            match value {
                Some(value) => shell.env(name, value),
                None => shell.env_remove(name),
            };
        }
        let mut local = shell
            .env("WEFT_BIN", weft)
            .args([
                "-c",
                "trap '' HUP; exec \"$WEFT_BIN\" local --nodes 1 -o json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufReader::new(local.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert!(ready.contains("\"coordinator\""), "{ready}");
        send("-HUP", local.id());
        // A handled SIGHUP would shut it down at once; nothing to wait on
        // but time for a signal that must have no effect.
        let exited = wait_for(Duration::from_secs(1), || local.try_wait().unwrap());
        assert!(exited.is_none(), "exited on SIGHUP: {exited:?}");
        send("-INT", local.id());
        let status = local.wait().unwrap();
        assert!(status.success(), "{status}");
    }

    #[test]
    fn sigterm_to_bench_kills_its_cluster() {
        let tmp = tempfile::tempdir().unwrap();
        // The idle window keeps the cluster (a coordinator) up until signalled.
        let mut bench = weft_command(tmp.path())
            .args(["bench", "--only", "many-nodes", "--sim-nodes", "2"])
            .args(["--idle-window", "120s"])
            .spawn()
            .unwrap();
        let cluster = wait_for(Duration::from_secs(60), || started_cluster(tmp.path()));
        let Some(cluster) = cluster else {
            let _ = bench.kill();
            panic!("the bench started no cluster");
        };
        let children = wait_for(Duration::from_secs(30), || {
            Some(processes_in(&cluster)).filter(|p| !p.is_empty())
        })
        .expect("the coordinator");
        send("-TERM", bench.id());
        let status = bench.wait().unwrap();
        assert!(!status.success(), "{status}");
        let gone = wait_for(Duration::from_secs(10), || {
            children.iter().all(|pid| !alive(*pid)).then_some(())
        });
        assert!(gone.is_some(), "still running: {children:?}");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    }
}
