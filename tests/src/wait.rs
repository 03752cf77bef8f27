//! Polling helpers: readiness is polled against real state, never slept for.
//!
//! Everything here waits with a deadline and backs off from 10 ms to 100 ms
//! between checks, so a fast cluster makes a fast test and a slow machine
//! only makes it slower, not flaky.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
use nix::unistd::Pid;

/// How long harness waits (`wait_for_*`) allow before failing the test.
/// `WEFT_TEST_TIMEOUT` (seconds) overrides it for very slow machines.
pub fn default_timeout() -> Duration {
    std::env::var("WEFT_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(20))
}

/// A condition did not become true in time.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("condition still false after {waited:?}")]
pub struct TimedOut {
    /// How long it was polled.
    pub waited: Duration,
}

/// Polls `check` until it returns true or `timeout` passes.
///
/// ```ignore
/// wait_until(Duration::from_secs(5), async || path.exists()).await.expect("pid file");
/// ```
pub async fn wait_until<F>(timeout: Duration, mut check: F) -> Result<(), TimedOut>
where
    F: AsyncFnMut() -> bool,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        if check().await {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(TimedOut {
                waited: start.elapsed(),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Polls `produce` until it returns `Some`, or gives up after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut produce: F) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(value) = produce().await {
            return Ok(value);
        }
        if start.elapsed() >= timeout {
            return Err(TimedOut {
                waited: start.elapsed(),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// True while process `pid` exists and is not a zombie.
///
/// `kill(pid, None)` alone also succeeds for a zombie, and an orphan whose
/// new parent (a container's PID 1) never reaps it stays a zombie forever,
/// although it runs nothing. So a zombie counts as gone.
pub fn process_is_alive(pid: i32) -> bool {
    if pid <= 0 || kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the parenthesised command name, is the state.
        Ok(stat) => match stat.rfind(')') {
            Some(end) => !matches!(stat[end + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        // No /proc (not Linux) or it vanished between the two checks.
        Err(_) => kill(Pid::from_raw(pid), None).is_ok(),
    }
}

/// Waits until `path` holds a process id (written by a task's shell, e.g.
/// `sleep 300 & echo $! > pidfile`) and returns it.
pub async fn read_pid_file(path: &Path, timeout: Duration) -> Result<i32, TimedOut> {
    wait_for(timeout, || async {
        let text = tokio::fs::read_to_string(path).await.ok()?;
        // A half-written file has no newline yet.
        if !text.ends_with('\n') {
            return None;
        }
        text.trim().parse::<i32>().ok()
    })
    .await
}
