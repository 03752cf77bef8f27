//! The reaper: one small process beside each node that kills the node's
//! exec tasks when the node dies without doing it itself (SIGKILL, the OOM
//! killer), instead of leaving them running while the coordinator gives
//! the same tasks to other nodes.
//!
//! The node starts it once, as `weft-node __weft-reaper` (the node's own
//! executable) in a process group of its own, with a pipe on its stdin.
//! The node writes `+PGID` when an exec task's process group starts and
//! `-PGID` as soon as it is killed and its leader reaped. The reaper keeps
//! those groups (counted, so a reused id stays covered); when its stdin
//! reaches EOF (the node closed it, or died and the kernel closed it) it
//! SIGKILLs every group still registered and exits. Nothing else ends it:
//! stray SIGTERM/SIGINT/SIGHUP are blocked. Nothing runs per task but two
//! short writes to a pipe.
//!
//! The reaper side ([`run_if_reaper`]) runs before any runtime or thread
//! exists; the node side is `Reaper`.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal, killpg};
use nix::unistd::Pid;
use tracing::warn;

/// The first argument that makes `weft-node` a reaper.
pub const REAPER_ARG: &str = "__weft-reaper";

/// Set once `main` has called [`run_if_reaper`]: this executable can act
/// as a reaper.
static HOOKED: AtomicBool = AtomicBool::new(false);

/// If this process was started as a reaper (`args[1] == REAPER_ARG`), runs
/// it to the end and answers its exit code; `None` otherwise. Call first
/// thing in `main`; a binary that does can be its nodes' reaper
/// ([`self_as_reaper`]).
pub fn run_if_reaper() -> Option<ExitCode> {
    if std::env::args_os()
        .nth(1)
        .is_none_or(|first| first != REAPER_ARG)
    {
        HOOKED.store(true, Ordering::Relaxed);
        return None;
    }
    // Only EOF ends it: a stray SIGTERM/SIGINT/SIGHUP (`pkill -f weft`)
    // must not leave the node without its reaper. Blocked, they stay
    // pending and harmless; this process has no other thread.
    let mut stray = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGPIPE,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        stray.add(signal);
    }
    let _ = stray.thread_block();
    let groups = watch(std::io::stdin().lock());
    for pgid in groups {
        kill_group(pgid);
    }
    Some(ExitCode::SUCCESS)
}

/// This executable as the reaper program for
/// [`NodeConfig::reaper`](crate::NodeConfig::reaper), if its `main` called
/// [`run_if_reaper`]; `None` otherwise (a test binary, an embedding
/// program). `/proc/self/exe` names the running executable even if its
/// file was replaced since.
pub fn self_as_reaper() -> Option<PathBuf> {
    HOOKED
        .load(Ordering::Relaxed)
        .then(|| PathBuf::from("/proc/self/exe"))
}

/// Reads `+PGID` / `-PGID` lines to EOF (or a read error); answers the
/// groups still registered then (counted, so a `-` for an old group whose
/// id a new one reuses leaves the new one registered). Other lines are
/// ignored.
fn watch(input: impl BufRead) -> Vec<i32> {
    let mut groups: HashMap<i32, u32> = HashMap::new();
    for line in input.lines() {
        let Ok(line) = line else { break };
        let (sign, number) = line.split_at(line.len().min(1));
        let Ok(pgid) = number.parse::<i32>() else {
            continue;
        };
        if pgid <= 1 {
            continue; // never "every process" or init's group
        }
        match sign {
            "+" => *groups.entry(pgid).or_insert(0) += 1,
            "-" => {
                if let Some(count) = groups.get_mut(&pgid) {
                    *count -= 1;
                    if *count == 0 {
                        groups.remove(&pgid);
                    }
                }
            }
            _ => {}
        }
    }
    groups.into_keys().collect()
}

fn kill_group(pgid: i32) {
    // A group that is already gone is fine.
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
}

/// The node's side: the running reaper process and the pipe to it.
pub(crate) struct Reaper {
    inner: Mutex<Option<(Child, ChildStdin)>>,
}

impl Reaper {
    /// Starts `program REAPER_ARG`; `None` (and a warning) if it cannot.
    pub(crate) fn start(program: &Path) -> Option<Reaper> {
        let spawned = Command::new(program)
            .arg(REAPER_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Its own group: a Ctrl-C meant for the node's group is not
            // for it.
            .process_group(0)
            .spawn();
        match spawned {
            Ok(mut child) => {
                let stdin = child.stdin.take()?;
                Some(Reaper {
                    inner: Mutex::new(Some((child, stdin))),
                })
            }
            Err(err) => {
                warn!(program = %program.display(), error = %err, "cannot start the reaper; exec tasks will outlive a node that is killed outright");
                None
            }
        }
    }

    /// Exec task group `pgid` started: kill it if the node dies.
    pub(crate) fn watch(&self, pgid: u32) {
        self.send(&format!("+{pgid}\n"));
    }

    /// Exec task group `pgid` is gone.
    pub(crate) fn forget(&self, pgid: u32) {
        self.send(&format!("-{pgid}\n"));
    }

    fn send(&self, line: &str) {
        let mut inner = self.inner();
        if let Some((child, stdin)) = inner.as_mut()
            && let Err(err) = stdin.write_all(line.as_bytes())
        {
            warn!(error = %err, "the reaper is gone; exec tasks will outlive a node that is killed outright");
            // It exited (its pipe is closed): reap it, leave no zombie.
            let _ = child.try_wait();
            *inner = None;
        }
    }

    fn inner(&self) -> MutexGuard<'_, Option<(Child, ChildStdin)>> {
        // No code panics while holding this lock; recover anyway.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Reaper {
    /// Closes the pipe (the reaper exits at once) and reaps it.
    fn drop(&mut self) {
        let Some((mut child, stdin)) = self.inner().take() else {
            return;
        };
        drop(stdin);
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                Ok(Some(_)) | Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_groups_left_at_eof_are_those_started_and_not_gone() {
        let input = "+100\n+200\n-100\n+300\nnonsense\n+1\n+-5\n-999\n+\n\n+400\n+500\n+500\n-500";
        let mut left = watch(input.as_bytes());
        left.sort_unstable();
        assert_eq!(left, [200, 300, 400, 500]);
    }
}
