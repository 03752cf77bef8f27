//! One Weft binary as a child process with its own log file: [`Spawn`]
//! says how to start it, [`ChildProcess`] is the running child.
//!
//! Every child runs in its cluster's folder (so anything it writes
//! relative to its cwd stays out of the source tree), sends stdout and
//! stderr to `<dir>/<label>.log`, reads no stdin, and is started with
//! `kill_on_drop(true)`, so an error or a failing test never leaves a
//! coordinator or node running behind it. It inherits none of this
//! process's `WEFT_*` variables: a user's `WEFT_DATABASE_URL`, `WEFT_CA`
//! and the like are for their own cluster, and the flags the caller
//! passes say everything the child is to use. Which binary and which
//! flags is the caller's business; this file only starts, signals and
//! reaps.
//!
//! Children get no `PR_SET_PDEATHSIG`: setting it between fork and exec
//! needs `pre_exec`, which is `unsafe`, and the workspace forbids unsafe
//! code. A parent killed with SIGKILL leaves its children behind; callers
//! stop them on every signal they can catch.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::error::Error;

/// How to start one child: program, flags, folder, label, log settings.
#[derive(Debug, Clone)]
pub struct Spawn {
    program: PathBuf,
    args: Vec<OsString>,
    dir: PathBuf,
    label: String,
    log_filter: Option<String>,
    wrapper: Vec<OsString>,
    append_log: bool,
}

impl Spawn {
    /// Runs `program` (a path, e.g. from [`crate::bin_path`]) in `dir`,
    /// logging to `<dir>/<label>.log`.
    pub fn new(program: impl Into<PathBuf>, dir: impl Into<PathBuf>, label: &str) -> Spawn {
        Spawn {
            program: program.into(),
            args: Vec::new(),
            dir: dir.into(),
            label: label.to_owned(),
            log_filter: None,
            wrapper: Vec::new(),
            append_log: false,
        }
    }

    /// Adds the program's arguments.
    pub fn args<I, S>(mut self, args: I) -> Spawn
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// `RUST_LOG` of the child. Default: this process's `RUST_LOG`, else `info`.
    pub fn log_filter(mut self, filter: &str) -> Spawn {
        self.log_filter = Some(filter.to_owned());
        self
    }

    /// Runs the program through a wrapper command that execs it, e.g.
    /// `["ip", "netns", "exec", "fab-h2"]`: the child's pid is then the
    /// program's only if the wrapper execs (as `ip netns exec` does).
    pub fn wrapper<I, S>(mut self, wrapper: I) -> Spawn
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// Appends to the log file instead of truncating it, so a restarted
    /// child under the same label keeps one log.
    pub fn append_log(mut self) -> Spawn {
        self.append_log = true;
        self
    }

    /// Starts the child.
    pub fn spawn(self) -> Result<ChildProcess, Error> {
        let log = self.dir.join(format!("{}.log", self.label));
        let opened = if self.append_log {
            File::options().create(true).append(true).open(&log)
        } else {
            File::create(&log)
        };
        let log_error = |source| Error::LogFile {
            path: log.clone(),
            source,
        };
        let out = opened.map_err(log_error)?;
        let err = out.try_clone().map_err(log_error)?;
        let (program, wrapped) = match self.wrapper.split_first() {
            Some((first, rest)) => (PathBuf::from(first), Some(rest)),
            None => (self.program.clone(), None),
        };
        let mut cmd = Command::new(&program);
        if let Some(rest) = wrapped {
            cmd.args(rest).arg(&self.program);
        }
        let log_filter = self
            .log_filter
            .unwrap_or_else(|| std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()));
        for name in weft_variables(std::env::vars_os()) {
            cmd.env_remove(name);
        }
        cmd.args(&self.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env("NO_COLOR", "1")
            .env("RUST_LOG", log_filter)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            program: self.program.clone(),
            label: self.label.clone(),
            source,
        })?;
        Ok(ChildProcess {
            label: self.label,
            log,
            child,
        })
    }
}

/// The names of the `WEFT_*` variables among `vars` (what a child must
/// not inherit).
fn weft_variables(vars: impl Iterator<Item = (OsString, OsString)>) -> Vec<OsString> {
    vars.map(|(name, _)| name)
        .filter(|name| name.as_encoded_bytes().starts_with(b"WEFT_"))
        .collect()
}

/// One running child and the file it logs to. Dropping it kills it.
#[derive(Debug)]
pub struct ChildProcess {
    label: String,
    log: PathBuf,
    child: Child,
}

impl ChildProcess {
    /// What it is, for messages (`coordinator`, `node-1`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Where its stdout and stderr go.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The OS process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `Some(status)` once it has exited (does not block).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// [`Error::Exited`] if it has exited.
    pub fn check_alive(&mut self) -> Result<(), Error> {
        match self.try_wait() {
            Some(status) => Err(Error::Exited {
                label: self.label.clone(),
                status,
                log: self.log.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Sends `signal`; a process that already exited is not an error.
    pub fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Waits until it exits by itself.
    pub async fn wait(&mut self) -> Result<ExitStatus, Error> {
        self.child.wait().await.map_err(|source| Error::Wait {
            label: self.label.clone(),
            source,
        })
    }

    /// SIGKILL, then reap it.
    pub async fn kill(mut self) -> Result<ExitStatus, Error> {
        let _ = self.child.start_kill();
        self.wait().await
    }

    /// SIGTERM, then SIGKILL if it has not exited after `deadline`.
    /// Answers the exit status and whether it exited by itself in time.
    pub async fn terminate(mut self, deadline: Duration) -> Result<(ExitStatus, bool), Error> {
        self.signal(Signal::SIGTERM);
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(Ok(status)) => Ok((status, true)),
            _ => Ok((self.kill().await?, false)),
        }
    }

    /// The whole log so far (empty if unreadable).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_logs_to_its_file_and_reports_its_exit() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Spawn::new("/bin/sh", dir.path(), "echoer")
            .args(["-c", "echo one; echo two >&2; echo $RUST_LOG; exit 3"])
            .log_filter("debug")
            .spawn()
            .unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(child.log(), dir.path().join("echoer.log"));
        assert_eq!(child.log_text(), "one\ntwo\ndebug\n");
        assert_eq!(child.log_tail(2), "two\ndebug");
        let err = child.check_alive().unwrap_err();
        assert!(err.to_string().starts_with("echoer exited"), "{err}");
    }

    #[test]
    fn a_child_inherits_no_weft_variable() {
        let vars = [
            ("WEFT_DATABASE_URL", "postgresql://h/db"),
            ("WEFT_CA", "/ca.pem"),
            ("PATH", "/bin"),
            ("RUST_LOG", "info"),
            ("MY_WEFT_X", "1"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        assert_eq!(
            weft_variables(vars.into_iter()),
            [
                OsString::from("WEFT_DATABASE_URL"),
                OsString::from("WEFT_CA")
            ]
        );
    }

    #[tokio::test]
    async fn a_childs_environment_keeps_what_spawn_sets() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Spawn::new("/bin/sh", dir.path(), "env")
            .args(["-c", "env | grep -c '^WEFT_'; echo $NO_COLOR $RUST_LOG"])
            .log_filter("debug")
            .spawn()
            .unwrap();
        child.wait().await.unwrap();
        assert_eq!(child.log_text(), "0\n1 debug\n");
    }

    #[tokio::test]
    async fn terminate_stops_a_child_that_honours_sigterm_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let child = Spawn::new("/bin/sleep", dir.path(), "sleeper")
            .args(["30"])
            .spawn()
            .unwrap();
        assert!(child.pid().is_some());
        let (status, in_time) = child.terminate(Duration::from_secs(10)).await.unwrap();
        assert!(in_time && !status.success(), "{status}");
    }

    #[tokio::test]
    async fn a_wrapper_runs_the_program_and_an_appended_log_keeps_both_runs() {
        let dir = tempfile::tempdir().unwrap();
        for word in ["first", "second"] {
            let mut child = Spawn::new("/bin/echo", dir.path(), "wrapped")
                .wrapper(["/usr/bin/env", "--"])
                .args([word])
                .append_log()
                .spawn()
                .unwrap();
            assert!(child.wait().await.unwrap().success());
        }
        let text = std::fs::read_to_string(dir.path().join("wrapped.log")).unwrap();
        assert_eq!(text, "first\nsecond\n");
    }
}
