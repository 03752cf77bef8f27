//! Running the `weft` CLI binary the way a user does, and capturing what
//! it printed, its exit code and how long it took.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::process::bin_path;

/// What one `weft` invocation did.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// Exit code; `None` if it was killed by a signal (or by the harness's
    /// 60 s limit).
    pub code: Option<i32>,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?} after {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `weft ARGS` with `WEFT_COORDINATOR=url`, `WEFT_TOKEN=token` (if
/// given) and `WEFT_CA` (the CA registered for `url` in [`crate::trust`],
/// if any), feeding `stdin` if given. Killed after 60 s so a hanging CLI
/// fails its test instead of the suite.
pub async fn run_weft(
    url: &str,
    token: Option<&str>,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> CliOutput {
    run_weft_env(url, token, &[], args, stdin).await
}

/// [`run_weft`] with extra environment variables (set last). The user's
/// own `weft login` context is never read: `XDG_CONFIG_HOME` points at a
/// missing dir unless `env` sets it.
pub async fn run_weft_env(
    url: &str,
    token: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: Option<&[u8]>,
) -> CliOutput {
    let mut cmd = weft_command(url, token, env);
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let start = Instant::now();
    let mut child = cmd.spawn().expect("starting the weft CLI");
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        // Written beside the wait, so a CLI that reads lazily cannot deadlock us.
        tokio::spawn(async move {
            let _ = pipe.write_all(&data).await;
            let _ = pipe.shutdown().await;
        });
    }
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await;
    let elapsed = start.elapsed();
    match output {
        Ok(Ok(out)) => CliOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed,
        },
        Ok(Err(e)) => panic!("waiting for weft {args:?}: {e}"),
        Err(_) => CliOutput {
            code: None,
            stdout: String::new(),
            stderr: format!("weft {args:?} still running after 60 s; killed"),
            elapsed,
        },
    }
}

/// The `weft` binary with `WEFT_COORDINATOR=url`, `WEFT_TOKEN=token`, the
/// CA registered for `url` and `env` (see [`run_weft_env`]).
fn weft_command(url: &str, token: Option<&str>, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin_path("weft"));
    cmd.env_remove("WEFT_TOKEN")
        .env("XDG_CONFIG_HOME", "/nonexistent/weft-test-config");
    if let Some(token) = token {
        cmd.env("WEFT_TOKEN", token);
    }
    if url.is_empty() {
        cmd.env_remove("WEFT_COORDINATOR");
    } else {
        cmd.env("WEFT_COORDINATOR", url);
    }
    // The CA registered for `url` in [`crate::trust`], if any.
    if let Some(weft_proto::tls::Trust::CaFile(ca)) = crate::trust::for_url(url) {
        cmd.env("WEFT_CA", ca);
    } else {
        cmd.env_remove("WEFT_CA");
    }
    cmd.env_remove("WEFT_CA_PIN");
    cmd.envs(env.iter().copied());
    cmd
}

/// Runs `weft ARGS` (as [`run_weft`]) with its stdout a pipe whose reader
/// is gone before it writes, as `weft list | head -1` leaves it once
/// `head` has its line. Answers the exit code (`None`: killed by a signal)
/// and what it wrote to stderr.
pub async fn run_weft_reader_gone(
    url: &str,
    token: Option<&str>,
    args: &[&str],
) -> (Option<i32>, String) {
    let mut cmd = weft_command(url, token, &[]);
    cmd.args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("starting the weft CLI");
    drop(child.stdout.take());
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("weft still running after 60 s")
        .expect("waiting for weft");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
