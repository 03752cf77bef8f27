//! The real binaries as child processes: where they are, how they are
//! started, and how they are stopped.
//!
//! Every child logs stdout and stderr to one file in the cluster's temp
//! dir and is started with `kill_on_drop(true)`, so a failing test never
//! leaves a coordinator or node running behind it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// The folder holding `weft-coordinator`, `weft-node` and `weft`:
/// `WEFT_BIN_DIR` if set, else the cargo target folder this test executable
/// was built into (`target/debug/deps/<test>` -> `target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEFT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of binary `name`, failing the test with the fix when it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --bins` first (or set WEFT_BIN_DIR)",
        path.display()
    );
    path
}

/// One child process of the harness and the file it logs to.
#[derive(Debug)]
pub struct ChildProcess {
    /// What it is, for messages (`coordinator`, `node-1`).
    pub label: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    child: Child,
}

impl ChildProcess {
    /// Starts binary `bin` with `args`, logging to `<dir>/<label>.log`.
    pub fn spawn(bin: &str, args: &[String], dir: &Path, label: &str) -> ChildProcess {
        let log = dir.join(format!("{label}.log"));
        let out = File::create(&log).expect("creating a log file in the cluster temp dir");
        let err = out.try_clone().expect("cloning a log file handle");
        let mut cmd = Command::new(bin_path(bin));
        // Run inside the cluster's temp dir, so anything a binary writes
        // relative to its cwd stays out of the source tree.
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin} for {label}: {e}"));
        ChildProcess {
            label: label.to_owned(),
            log,
            child,
        }
    }

    /// The OS process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `Some(status)` once it has exited (does not block).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal`; a process that already exited is not an error.
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Waits until it exits by itself.
    pub async fn wait(&mut self) -> Option<ExitStatus> {
        self.child.wait().await.ok()
    }

    /// SIGKILL, then reap it.
    pub async fn kill(mut self) -> ExitStatus {
        let _ = self.child.start_kill();
        self.child
            .wait()
            .await
            .expect("waiting for a killed child process")
    }

    /// SIGTERM, then SIGKILL if it has not exited after `deadline`.
    /// Returns the exit status and whether it exited by itself in time.
    pub async fn terminate(mut self, deadline: Duration) -> (ExitStatus, bool) {
        self.signal(Signal::SIGTERM);
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(Ok(status)) => (status, true),
            _ => (self.kill().await, false),
        }
    }

    /// The log so far, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
