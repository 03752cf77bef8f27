//! Child processes for exec tasks (named `process` so it is not mistaken
//! for the executor, which decides when attempts run).
//!
//! Each child runs in its own process group, so one `killpg(SIGKILL)` stops
//! it and everything it started. stdin gets the spec's bytes and is closed;
//! stdout and stderr are read concurrently by one loop that numbers chunks
//! with one counter and streams them live. Whatever ends the attempt (exit,
//! cancel, timeout, drain, kill), the group is killed and the child reaped:
//! no orphans, no zombies; and if the node itself is killed outright, its
//! reaper (`reaper.rs`) kills the groups it was told about. This module
//! reports output and `Started` only; `attempt.rs` turns an [`ExecEnd`]
//! into the attempt's `Finished`. It decides nothing about when a process
//! runs.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use weft_proto::{ExecSpec, OutputStream, SecretEnv, TraceContext};

use crate::events::Emitter;
use crate::reaper::Reaper;

/// The W3C trace context's environment variables (the convention of
/// `otel-cli` and the OpenTelemetry SDKs' environment carriers).
const TRACEPARENT: &str = "TRACEPARENT";
const TRACESTATE: &str = "TRACESTATE";

/// Bytes read from a pipe at a time (the largest output chunk).
const READ_CHUNK: usize = 32 * 1024;

/// After the child ends, how long its pipes may take to reach EOF. Only a
/// process that left the group (setsid) could hold them longer.
const PIPE_DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// How a child process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ExecEnd {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it (not one the node sent).
    Signaled(i32),
    /// It could not be started; the text says why.
    StartFailed(String),
    /// The node stopped it because `cancel` fired (cancel, timeout, drain,
    /// kill: the caller knows which).
    Stopped,
}

/// Runs `spec` to its end, telling `reaper` (if any) about the child's
/// process group from its start until it is killed and reaped. `on_spawn`
/// gets the child's process group id
/// (= its pid) as soon as it exists, so a crash-style kill can SIGKILL the
/// group without waiting for this future.
///
/// The child's environment: the node's, then `TRACEPARENT`/`TRACESTATE`
/// from `trace` (removed when there is none: the node's own trace context
/// is nothing the task runs under), then the spec's `env`, then its
/// secrets. A value the task itself sets wins.
pub(crate) async fn run(
    spec: &ExecSpec,
    (secret_env, trace): (&SecretEnv, Option<&TraceContext>),
    emit: &Emitter,
    cancel: &CancellationToken,
    reaper: Option<&Reaper>,
    on_spawn: impl FnOnce(u32),
) -> ExecEnd {
    let Some(program) = spec.argv.first() else {
        return ExecEnd::StartFailed("exec.argv is empty: nothing to run".to_owned());
    };
    if let Some(cwd) = &spec.cwd {
        match std::fs::metadata(cwd) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return ExecEnd::StartFailed(format!(
                    "working directory {cwd:?} is not a directory"
                ));
            }
            Err(err) => {
                return ExecEnd::StartFailed(format!("working directory {cwd:?}: {err}"));
            }
        }
    }
    let mut command = Command::new(program);
    match trace {
        Some(trace) => {
            command.env(TRACEPARENT, trace.traceparent());
            if trace.state.is_empty() {
                command.env_remove(TRACESTATE);
            } else {
                command.env(TRACESTATE, &trace.state);
            }
        }
        None => {
            command.env_remove(TRACEPARENT).env_remove(TRACESTATE);
        }
    }
    command
        .args(&spec.argv[1..])
        .envs(&spec.env)
        // After `env`: a secret wins over a plain value of the same name.
        .envs(secret_env.iter())
        .stdin(if spec.stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => return ExecEnd::StartFailed(spawn_error(program, &err)),
    };
    let Some(pid) = child.id() else {
        // Only possible if the child was already reaped, which nobody did.
        return ExecEnd::StartFailed(format!("{program:?} exited before it could be tracked"));
    };
    if let Some(reaper) = reaper {
        reaper.watch(pid);
    }
    on_spawn(pid);
    // `Started` may wait on a full event channel (a slow or partitioned
    // stream); a cancel (timeout, drain, lease expiry) must not.
    tokio::select! {
        biased;
        () = cancel.cancelled() => {
            stop(&mut child, pid, reaper).await;
            return ExecEnd::Stopped;
        }
        _ = emit.started(pid) => {}
    }
    supervise(&mut child, pid, spec, emit, cancel, reaper).await
}

/// Kills the group `pgid` led by `child`, reaps the child, and tells
/// `reaper` the group is gone.
async fn stop(child: &mut Child, pgid: u32, reaper: Option<&Reaper>) {
    kill_group(pgid);
    reap(child).await;
    if let Some(reaper) = reaper {
        reaper.forget(pgid);
    }
}

async fn supervise(
    child: &mut Child,
    pgid: u32,
    spec: &ExecSpec,
    emit: &Emitter,
    cancel: &CancellationToken,
    reaper: Option<&Reaper>,
) -> ExecEnd {
    let mut pipes = Pipes::new(child);
    let stdin_bytes = spec.stdin.clone();
    let mut stdin = child.stdin.take();
    let write_stdin = async move {
        if let Some(pipe) = stdin.as_mut() {
            // A child that exits without reading its stdin is not an error.
            if let Err(err) = pipe.write_all(&stdin_bytes).await {
                debug!(error = %err, "child stopped reading stdin");
            }
        }
        drop(stdin); // closes the pipe: the child sees EOF
    };
    tokio::pin!(write_stdin);
    let mut stdin_done = false;

    let status = loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                stop(child, pgid, reaper).await;
                pipes.drain(emit, cancel).await;
                return ExecEnd::Stopped;
            }
            status = child.wait() => break status,
            () = &mut write_stdin, if !stdin_done => stdin_done = true,
            (stream, data) = pipes.read() => pipes.forward(stream, data, emit, cancel).await,
        }
    };
    // The leader is gone; whatever it left in its group goes with it.
    kill_group(pgid);
    if let Some(reaper) = reaper {
        reaper.forget(pgid);
    }
    pipes.drain(emit, cancel).await;
    match status {
        Ok(status) => end_of(status),
        Err(err) => {
            warn!(error = %err, "waiting for the child failed");
            ExecEnd::Signaled(Signal::SIGKILL as i32)
        }
    }
}

fn end_of(status: ExitStatus) -> ExecEnd {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExecEnd::Exited(code),
        (None, Some(signal)) => ExecEnd::Signaled(signal),
        (None, None) => ExecEnd::Signaled(0),
    }
}

/// SIGKILLs process group `pgid`; a group that is already gone is fine.
pub(crate) fn kill_group(pgid: u32) {
    let Ok(raw) = i32::try_from(pgid) else { return };
    if raw <= 1 {
        return; // never signal "every process" or init's group
    }
    match killpg(Pid::from_raw(raw), Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(err) => warn!(pgid, error = %err, "could not kill the process group"),
    }
}

async fn reap(child: &mut Child) {
    if let Err(err) = child.wait().await {
        warn!(error = %err, "reaping the child failed");
    }
}

fn spawn_error(program: &str, err: &io::Error) -> String {
    match err.kind() {
        // A script whose `#!` interpreter is missing exists itself.
        io::ErrorKind::NotFound if std::path::Path::new(program).exists() => {
            format!("cannot start {program:?}: {err}")
        }
        io::ErrorKind::NotFound => format!("program {program:?} not found"),
        io::ErrorKind::PermissionDenied => format!("program {program:?}: permission denied"),
        _ => format!("cannot start {program:?}: {err}"),
    }
}

/// The child's stdout and stderr, read by one loop so chunks are numbered
/// in the order they were read.
struct Pipes {
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    buf_out: BytesMut,
    buf_err: BytesMut,
}

impl Pipes {
    fn new(child: &mut Child) -> Self {
        Pipes {
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            buf_out: BytesMut::with_capacity(READ_CHUNK),
            buf_err: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    fn open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }

    /// Reads what is ready on either pipe: `(stream, Some(bytes))`, or
    /// `(stream, None)` when that pipe closed. Cancel-safe (nothing read is
    /// lost if dropped); pends forever when both pipes are closed.
    async fn read(&mut self) -> (OutputStream, Option<Bytes>) {
        if !self.open() {
            return std::future::pending().await;
        }
        tokio::select! {
            read = read_some(&mut self.stdout, &mut self.buf_out) => (OutputStream::Stdout, read),
            read = read_some(&mut self.stderr, &mut self.buf_err) => (OutputStream::Stderr, read),
        }
    }

    /// Streams what `read` returned, or closes the pipe it came from.
    async fn forward(
        &mut self,
        stream: OutputStream,
        data: Option<Bytes>,
        emit: &Emitter,
        cancel: &CancellationToken,
    ) {
        match data {
            Some(data) => {
                // Cancellation must not wait on a full event channel.
                tokio::select! {
                    _ = emit.output(stream, data) => {}
                    () = cancel.cancelled() => {}
                }
            }
            None => match stream {
                OutputStream::Stdout => self.stdout = None,
                OutputStream::Stderr => self.stderr = None,
            },
        }
    }

    /// After the child ended: streams what is left until both pipes reach
    /// EOF, for at most `PIPE_DRAIN_LIMIT`.
    async fn drain(&mut self, emit: &Emitter, cancel: &CancellationToken) {
        let drain = async {
            while self.open() {
                let (stream, data) = self.read().await;
                self.forward(stream, data, emit, cancel).await;
            }
        };
        if tokio::time::timeout(PIPE_DRAIN_LIMIT, drain).await.is_err() {
            warn!("child output still open after it ended; leaving it");
        }
    }
}

/// One read from `pipe`: `Some(bytes)`, or `None` at EOF or error (the pipe
/// is then closed by the caller). Pends forever on a closed pipe.
async fn read_some<R: AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut BytesMut,
) -> Option<Bytes> {
    let Some(reader) = pipe.as_mut() else {
        return std::future::pending().await;
    };
    buf.reserve(READ_CHUNK);
    match reader.read_buf(buf).await {
        Ok(0) => None,
        Ok(_) => Some(buf.split().freeze()),
        Err(err) => {
            debug!(error = %err, "reading child output failed");
            None
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use weft_proto::{Attempt, TaskId};

    use super::*;
    use crate::events::{self, Event, EventBody as Body, EventRx};

    /// True when `pid` no longer runs (gone, or a zombie nobody reaped yet
    /// because its parent died and init is slow or absent).
    pub(crate) fn process_is_gone(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X"),
        }
    }

    /// Polls until `pid` is gone, failing after a deadline.
    pub(crate) async fn assert_gone_soon(pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !process_is_gone(pid) {
            assert!(Instant::now() < deadline, "process {pid} still runs");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn spec(argv: &[&str]) -> ExecSpec {
        ExecSpec {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            env: BTreeMap::new(),
            cwd: None,
            stdin: bytes::Bytes::new(),
        }
    }

    struct Run {
        end: ExecEnd,
        events: Vec<Event>,
    }

    impl Run {
        fn output(&self, stream: OutputStream) -> String {
            let mut text = String::new();
            for event in &self.events {
                if let Body::Output {
                    stream: from, data, ..
                } = &event.body
                    && *from == stream
                {
                    text.push_str(&String::from_utf8_lossy(data));
                }
            }
            text
        }

        fn seqs(&self) -> Vec<u64> {
            self.events
                .iter()
                .filter_map(|e| match &e.body {
                    Body::Output { seq, .. } => Some(*seq),
                    _ => None,
                })
                .collect()
        }
    }

    fn collect(mut rx: EventRx) -> Vec<Event> {
        let mut events = Vec::new();
        while let Ok(event) = rx.try_recv() {
            events.push(event);
        }
        events
    }

    async fn run_spec(spec: &ExecSpec) -> Run {
        run_with_secrets(spec, &SecretEnv::new()).await
    }

    async fn run_with_secrets(spec: &ExecSpec, secrets: &SecretEnv) -> Run {
        run_traced(spec, secrets, None).await
    }

    async fn run_traced(spec: &ExecSpec, secrets: &SecretEnv, trace: Option<&TraceContext>) -> Run {
        let (tx, rx) = events::channel();
        let emit = Emitter::new(tx, TaskId::new(), Attempt::FIRST);
        let end = run(
            spec,
            (secrets, trace),
            &emit,
            &CancellationToken::new(),
            None,
            |_| {},
        )
        .await;
        drop(emit);
        Run {
            end,
            events: collect(rx),
        }
    }

    #[tokio::test]
    async fn stdout_and_stderr_stream_in_order_with_one_seq_counter() {
        let script = "echo one; sleep 0.05; echo two >&2; sleep 0.05; echo three";
        let run = run_spec(&spec(&["sh", "-c", script])).await;
        assert_eq!(run.end, ExecEnd::Exited(0));
        assert!(matches!(run.events[0].body, Body::Started { pid } if pid > 0));
        assert_eq!(run.output(OutputStream::Stdout), "one\nthree\n");
        assert_eq!(run.output(OutputStream::Stderr), "two\n");
        let seqs = run.seqs();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
        let order: Vec<_> = run.events[1..]
            .iter()
            .filter_map(|e| match &e.body {
                Body::Output { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(order.concat(), "one\ntwo\nthree\n");
    }

    #[tokio::test]
    async fn exit_codes_are_recorded() {
        assert_eq!(run_spec(&spec(&["true"])).await.end, ExecEnd::Exited(0));
        assert_eq!(
            run_spec(&spec(&["sh", "-c", "exit 7"])).await.end,
            ExecEnd::Exited(7)
        );
    }

    #[tokio::test]
    async fn a_signal_death_has_no_exit_code() {
        let run = run_spec(&spec(&["sh", "-c", "kill -TERM $$"])).await;
        assert_eq!(run.end, ExecEnd::Signaled(Signal::SIGTERM as i32));
    }

    #[tokio::test]
    async fn stdin_bytes_reach_the_child_then_eof() {
        let mut with_stdin = spec(&["cat"]);
        with_stdin.stdin = bytes::Bytes::from_static(b"fed through stdin");
        let run = run_spec(&with_stdin).await;
        assert_eq!(run.end, ExecEnd::Exited(0));
        assert_eq!(run.output(OutputStream::Stdout), "fed through stdin");
    }

    #[tokio::test]
    async fn secret_env_reaches_the_child_and_wins_over_plain_env() {
        let mut s = spec(&["sh", "-c", "printf '%s %s' \"$API_KEY\" \"$PLAIN\""]);
        s.env.insert("API_KEY".into(), "plain-value".into());
        s.env.insert("PLAIN".into(), "p".into());
        let mut secrets = SecretEnv::new();
        secrets.insert("API_KEY", "s3cr3t");
        let run = run_with_secrets(&s, &secrets).await;
        assert_eq!(run.end, ExecEnd::Exited(0));
        assert_eq!(run.output(OutputStream::Stdout), "s3cr3t p");
    }

    #[tokio::test]
    async fn the_trace_context_is_in_the_environment_unless_the_task_sets_it() {
        let trace = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "k=v",
        )
        .unwrap();
        let echo = spec(&[
            "sh",
            "-c",
            "printf '%s|%s' \"$TRACEPARENT\" \"$TRACESTATE\"",
        ]);
        let run = run_traced(&echo, &SecretEnv::new(), Some(&trace)).await;
        assert_eq!(
            run.output(OutputStream::Stdout),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01|k=v"
        );
        let mut own = echo.clone();
        own.env.insert("TRACEPARENT".into(), "mine".into());
        let run = run_traced(&own, &SecretEnv::new(), Some(&trace)).await;
        assert_eq!(run.output(OutputStream::Stdout), "mine|k=v");
        // No trace: nothing (not even one the node itself runs under).
        let run = run_traced(&echo, &SecretEnv::new(), None).await;
        assert_eq!(run.output(OutputStream::Stdout), "|");
    }

    #[tokio::test]
    async fn env_and_cwd_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(&["sh", "-c", "echo $WEFT_TEST_VAR; pwd"]);
        s.env.insert("WEFT_TEST_VAR".into(), "from-spec".into());
        s.cwd = Some(dir.path().to_string_lossy().into_owned());
        let run = run_spec(&s).await;
        let real = dir.path().canonicalize().unwrap();
        assert_eq!(
            run.output(OutputStream::Stdout),
            format!("from-spec\n{}\n", real.display())
        );
    }

    #[tokio::test]
    async fn missing_binary_or_bad_cwd_cannot_start() {
        let run = run_spec(&spec(&["weft-no-such-program-here"])).await;
        assert!(
            matches!(&run.end, ExecEnd::StartFailed(why) if why.contains("not found")),
            "{:?}",
            run.end
        );
        assert!(run.events.is_empty(), "no Started for a failed start");
        let mut bad_cwd = spec(&["true"]);
        bad_cwd.cwd = Some("/weft/no/such/dir".into());
        let run = run_spec(&bad_cwd).await;
        assert!(
            matches!(&run.end, ExecEnd::StartFailed(why) if why.contains("/weft/no/such/dir")),
            "{:?}",
            run.end
        );
    }

    /// Starts `sh -c 'sleep 100 & echo $!; wait'` and returns the grandchild pid.
    async fn start_with_grandchild(
        cancel: CancellationToken,
    ) -> (tokio::task::JoinHandle<ExecEnd>, EventRx, u32) {
        let (tx, mut rx) = events::channel();
        let emit = Emitter::new(tx, TaskId::new(), Attempt::FIRST);
        let task = tokio::spawn(async move {
            let s = spec(&["sh", "-c", "sleep 100 & echo $!; wait"]);
            run(&s, (&SecretEnv::new(), None), &emit, &cancel, None, |_| {}).await
        });
        let grandchild = loop {
            let event = rx.recv().await.expect("child output");
            if let Body::Output { data, .. } = event.body {
                break String::from_utf8_lossy(&data)
                    .trim()
                    .parse::<u32>()
                    .unwrap();
            }
        };
        assert!(!process_is_gone(grandchild));
        (task, rx, grandchild)
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_group_and_leaves_no_process() {
        let cancel = CancellationToken::new();
        let (task, _rx, grandchild) = start_with_grandchild(cancel.clone()).await;
        cancel.cancel();
        let end = tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("cancel acts within a second")
            .unwrap();
        assert_eq!(end, ExecEnd::Stopped);
        assert_gone_soon(grandchild).await;
    }

    /// Cancelling does not wait for `Started` to find room: with the event
    /// channel full (a slow or partitioned stream), the child is still
    /// killed at once.
    #[tokio::test]
    async fn cancel_stops_a_child_whose_started_waits_on_a_full_event_channel() {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let emit = Emitter::new(tx, TaskId::new(), Attempt::FIRST);
        assert!(emit.progress(0.0, "fills the channel").await);
        let cancel = CancellationToken::new();
        let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
        let task = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let s = spec(&["sleep", "100"]);
                run(&s, (&SecretEnv::new(), None), &emit, &cancel, None, |pid| {
                    let _ = pid_tx.send(pid);
                })
                .await
            })
        };
        let pid = pid_rx.await.expect("the child started");
        cancel.cancel();
        let end = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("cancel acts while Started waits")
            .unwrap();
        assert_eq!(end, ExecEnd::Stopped);
        assert_gone_soon(pid).await;
    }

    #[tokio::test]
    async fn background_children_die_with_their_leader() {
        let run = run_spec(&spec(&["sh", "-c", "sleep 100 & echo $!"])).await;
        assert_eq!(run.end, ExecEnd::Exited(0));
        let pid: u32 = run.output(OutputStream::Stdout).trim().parse().unwrap();
        assert_gone_soon(pid).await;
    }
}
