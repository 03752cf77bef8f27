//! `weft map`: one exec task (or one call, `--call`) per line of stdin, at
//! most N in flight. Each task's stdout (a call's result) is printed whole
//! when it finishes (completion or input order), its stderr streamed to
//! stderr; a progress bar shows on stderr when stderr is a terminal.
//! [`substitute`] is the xargs-like templating; [`limited`] keeps N in
//! flight, in either order. Once stdout's reader is gone (`| head`), map
//! submits no more and cancels the tasks in flight. Stdin is read as the
//! limiter pulls lines ([`read_lines`]), so tasks start as lines arrive
//! (`tail -f log | weft map ...`) and only a line or so is read ahead.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io::IsTerminal;
use std::sync::Mutex;

use anyhow::Context;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use weft_client::{Client, EventBody, Task, TaskSpec};
use weft_proto::{OutputStream, TaskId, TaskState};

use crate::exit::{self, UsageError};
use crate::opts::TaskOpts;
use crate::output::{OutputFormat, task_json};
use crate::stream::{
    Events, Flow, LastAttemptOutput, Seen, drive, failure_line, flow_after, stdout_closed,
    write_stderr, write_stdout,
};

/// The placeholder replaced by each input line.
pub const PLACEHOLDER: &str = "{}";

/// The argv for one input `line`: every `{}` in `template` replaced by the
/// line, or, when no argument has a `{}`, the line appended (like xargs).
pub fn substitute(template: &[String], line: &str) -> Vec<String> {
    if template.iter().any(|arg| arg.contains(PLACEHOLDER)) {
        template
            .iter()
            .map(|arg| arg.replace(PLACEHOLDER, line))
            .collect()
    } else {
        let mut argv = template.to_vec();
        argv.push(line.to_owned());
        argv
    }
}

/// One finished line: its input (shown lossily when it is not UTF-8), the
/// final task (or why it could not run or be followed), and its collected
/// stdout.
struct Done {
    line: String,
    result: Result<Task, LineError>,
    stdout: Vec<u8>,
}

/// Why one line has no final task. Each fails only its own line.
#[derive(Debug, thiserror::Error)]
enum LineError {
    /// The line is not UTF-8, so it cannot be a command's argument (a
    /// `--call` takes its bytes as they are).
    #[error(
        "the line is not valid UTF-8 (at byte {}), so it cannot be an argument; `--call` takes any bytes",
        .0.valid_up_to()
    )]
    NotUtf8(std::str::Utf8Error),
    /// Submitting or following its task failed.
    #[error(transparent)]
    Client(#[from] weft_client::Error),
}

impl LineError {
    /// No coordinator answered (so `map` exits 69).
    fn is_unavailable(&self) -> bool {
        match self {
            LineError::NotUtf8(_) => false,
            LineError::Client(err) => err.is_unavailable(),
        }
    }
}

/// Most tasks `weft map` runs at once unless `-j` says: each is a `Run`
/// stream, and a coordinator lets one client hold 1,024 by default
/// (`--max-streams-per-client`).
const MAX_DEFAULT_JOBS: usize = 512;

/// Most tasks `-j` may ask for: a coordinator lets one client hold 1,024
/// streams by default, and refuses the rest with RESOURCE_EXHAUSTED.
pub const MAX_JOBS: usize = 1024;

/// The `-j N` given: at least 1; above [`MAX_JOBS`] is a usage error, since
/// the tasks past the coordinator's stream limit would be refused.
fn jobs_given(n: usize) -> Result<usize, UsageError> {
    if n > MAX_JOBS {
        return Err(UsageError(format!(
            "-j {n}: at most {MAX_JOBS} tasks at once (a coordinator lets one client hold {MAX_JOBS} streams)"
        )));
    }
    Ok(n.max(1))
}

/// How many tasks `weft map` runs at once without `-j` when its token may
/// not read the cluster's free slots (map itself needs only `submit`).
const FALLBACK_JOBS: usize = 16;

/// Without `-j`: as many tasks as the cluster has free slots (all its
/// slots when none is free), at most [`MAX_DEFAULT_JOBS`]. A token without
/// the `read` scope gets [`FALLBACK_JOBS`], said on stderr.
async fn default_jobs(client: &Client) -> Result<usize, weft_client::Error> {
    let info = match client.cluster_info().await {
        Ok(info) => info,
        Err(weft_client::Error::Other {
            code: tonic::Code::PermissionDenied,
            ..
        }) => {
            let jobs = FALLBACK_JOBS.clamp(1, MAX_DEFAULT_JOBS);
            eprintln!(
                "weft: map: the token may not read the cluster's free slots (scope read); running {jobs} at once (-j N to choose)"
            );
            return Ok(jobs);
        }
        Err(err) => return Err(err),
    };
    let free = if info.slots_free > 0 {
        info.slots_free
    } else {
        info.slots
    };
    Ok(usize::try_from(free)
        .unwrap_or(1)
        .clamp(1, MAX_DEFAULT_JOBS))
}

/// What each line becomes.
pub enum Work {
    /// A run of this command template ([`substitute`]).
    Exec(Vec<String>),
    /// A call of this handler, the line its input.
    Call(String),
}

/// `weft map [-j N] [--keep-order] [OPTS] (--call HANDLER | -- CMD ARGS...)`.
pub async fn run(
    client: &Client,
    format: OutputFormat,
    opts: &TaskOpts,
    jobs: Option<usize>,
    keep_order: bool,
    work: Work,
) -> anyhow::Result<u8> {
    // Stdin's first error ends the input; it is said once the lines read
    // before it have run.
    let read_error = Mutex::new(None);
    let lines = read_lines(tokio::io::BufReader::new(tokio::io::stdin()))
        .filter_map(|line| {
            futures::future::ready(match line {
                Ok(line) => Some(line),
                Err(err) => {
                    if let Ok(mut slot) = read_error.lock() {
                        *slot = Some(err);
                    }
                    None
                }
            })
        })
        .peekable();
    let mut lines = std::pin::pin!(lines);
    // Waits for the first line (not for EOF), so empty input needs no
    // coordinator.
    if lines.as_mut().peek().await.is_none() {
        if let Some(err) = take_read_error(&read_error) {
            return Err(err).context("reading the lines of stdin");
        }
        eprintln!("weft: map: no input lines on stdin");
        return Ok(exit::SUCCESS);
    }
    let stdin = match &opts.stdin_file {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("reading --stdin-file {}", path.display()))?,
        ),
        None => None,
    };
    let jobs = match jobs {
        Some(n) => jobs_given(n)?,
        None => default_jobs(client).await?,
    };
    // Its length grows as lines are read.
    let bar = progress_bar();
    let mut total = 0;
    let bar_for_tasks = bar.clone();
    let work = &work;
    // The tasks submitted and not yet ended, to cancel once stdout's
    // reader is gone.
    let in_flight = Mutex::new(HashSet::new());
    let in_flight_ref = &in_flight;
    let tasks = lines.map(|line| {
        bar_for_tasks.inc_length(1);
        let shown = String::from_utf8_lossy(&line).into_owned();
        let call = matches!(work, Work::Call(_));
        let spec = spec_for(work, line).map(|spec| opts.apply_with_stdin(spec, stdin.clone()));
        let bar = bar_for_tasks.clone();
        async move {
            match spec {
                Ok(spec) => run_one(client, spec, shown, call, bar, in_flight_ref).await,
                Err(err) => Done {
                    line: shown,
                    result: Err(err),
                    stdout: Vec::new(),
                },
            }
        }
    });
    let mut finished = limited(tasks, jobs, keep_order);
    let mut failures = Vec::new();
    let mut unreachable = false;
    // Stdout's reader may go away while no line is being printed.
    let mut closed = stdout_closed();
    loop {
        let next = tokio::select! {
            done = finished.next() => Ok(done),
            // Stdout's reader is gone: stop as a failed write would.
            () = &mut closed => Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
        };
        let (done, written) = match next {
            Ok(None) => break,
            Ok(Some(done)) => {
                let written = match format {
                    OutputFormat::Text => bar.suspend(|| write_stdout(&done.stdout)),
                    OutputFormat::Json => {
                        let line = format!("{}\n", done_json(&done));
                        bar.suspend(|| write_stdout(line.as_bytes()))
                    }
                };
                (Some(done), written)
            }
            Err(gone) => (None, Err(gone)),
        };
        let (Some(done), Flow::Continue) = (done, flow_after(&written)) else {
            // Dropping the stream submits no more lines and stops
            // following the tasks in flight, which are then cancelled.
            drop(finished);
            bar.finish_and_clear();
            let ids: Vec<TaskId> = match in_flight.lock() {
                Ok(mut ids) => ids.drain().collect(),
                Err(_) => Vec::new(),
            };
            return Ok(cancel_in_flight(client, ids).await);
        };
        bar.inc(1);
        total += 1;
        match done.result {
            Ok(task) if task.state == TaskState::Succeeded => {}
            Ok(task) => failures.push(format!(
                "{:?}: {}",
                done.line,
                failure_line(&task).unwrap_or_default()
            )),
            Err(err) => {
                unreachable |= err.is_unavailable();
                failures.push(format!("{:?}: weft: error: {err}", done.line));
            }
        }
    }
    drop(finished);
    bar.finish_and_clear();
    if !failures.is_empty() {
        eprintln!("weft: map: {} of {total} tasks failed:", failures.len());
        for failure in &failures {
            eprintln!("  {failure}");
        }
    }
    if let Some(err) = take_read_error(&read_error) {
        return Err(err).context(format!(
            "reading the lines of stdin (the {total} lines before it ran)"
        ));
    }
    if failures.is_empty() {
        return Ok(exit::SUCCESS);
    }
    Ok(if unreachable {
        exit::UNAVAILABLE
    } else {
        exit::FAILURE
    })
}

/// The task for one input `line` of `work`: an exec needs it as UTF-8
/// text (a line that is not fails on its own); a call takes its bytes as
/// they are.
fn spec_for(work: &Work, line: Vec<u8>) -> Result<TaskSpec, LineError> {
    match work {
        Work::Exec(template) => {
            let line = std::str::from_utf8(&line).map_err(LineError::NotUtf8)?;
            Ok(TaskSpec::exec(substitute(template, line)))
        }
        Work::Call(handler) => Ok(TaskSpec::call(handler.clone(), line)),
    }
}

/// The error that ended stdin, if one did.
fn take_read_error(slot: &Mutex<Option<std::io::Error>>) -> Option<std::io::Error> {
    slot.lock().ok().and_then(|mut slot| slot.take())
}

/// Runs `tasks` with at most `jobs` in flight, yielding each result as it
/// finishes, or with `keep_order` in input order. Either way a finished
/// task frees its place at once: in input order, results wait in a reorder
/// buffer (not in the in-flight set, as `buffered` keeps them), so one slow
/// task does not hold the others back to one at a time; a task starts only
/// within [`ORDER_WINDOW`] × `jobs` of the oldest not yet yielded, so the
/// results held (and stdin read ahead) behind a slow one stay bounded.
fn limited<'a, F>(
    tasks: impl Stream<Item = F> + Send + 'a,
    jobs: usize,
    keep_order: bool,
) -> BoxStream<'a, F::Output>
where
    F: Future + Send + 'a,
    F::Output: Send + 'a,
{
    use futures::stream::FuturesUnordered;
    use std::task::Poll;

    if !keep_order {
        return tasks.buffer_unordered(jobs).boxed();
    }
    let jobs = jobs.max(1);
    let window = jobs.saturating_mul(ORDER_WINDOW);
    let mut tasks = tasks.boxed().fuse();
    let mut running = FuturesUnordered::new();
    let mut waiting: BTreeMap<usize, F::Output> = BTreeMap::new();
    let (mut started, mut next) = (0usize, 0usize);
    futures::stream::poll_fn(move |cx| {
        loop {
            if let Some(result) = waiting.remove(&next) {
                next += 1;
                return Poll::Ready(Some(result));
            }
            while running.len() < jobs && started < next + window && !tasks.is_done() {
                match tasks.poll_next_unpin(cx) {
                    Poll::Ready(Some(task)) => {
                        let index = started;
                        started += 1;
                        running.push(async move { (index, task.await) });
                    }
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
            match running.poll_next_unpin(cx) {
                Poll::Ready(Some((index, result))) => {
                    waiting.insert(index, result);
                }
                // Nothing in flight: the end, or waiting for a line.
                Poll::Ready(None) if tasks.is_done() => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    })
    .boxed()
}

/// How many times `-j` tasks `--keep-order` may start past the oldest
/// still running (their results wait to be printed in order).
const ORDER_WINDOW: usize = 4;

/// Once stdout's reader is gone: cancels `ids`, the tasks in flight, and
/// answers [`exit::CLOSED_PIPE`], or as the first error says when one
/// could not be cancelled (said on stderr, with the `weft cancel` to run).
async fn cancel_in_flight(client: &Client, ids: Vec<TaskId>) -> u8 {
    let cancels = ids
        .iter()
        .map(|&id| async move { (id, client.cancel(id).await) });
    let mut code = exit::CLOSED_PIPE;
    let mut cancelled = 0;
    for (id, result) in futures::future::join_all(cancels).await {
        match result {
            // FAILED_PRECONDITION: it had ended already.
            Ok(_) | Err(weft_client::Error::FailedPrecondition(_)) => cancelled += 1,
            Err(err) => {
                eprintln!(
                    "weft: error: could not cancel task {id}; it may still be running (to cancel it: weft cancel {id}): {err}"
                );
                if code == exit::CLOSED_PIPE {
                    code = exit::for_error(&err.into());
                }
            }
        }
    }
    eprintln!(
        "weft: map: stdout was closed; submitted no more and cancelled {cancelled} tasks in flight"
    );
    code
}

/// One finished line as `--output json` prints it.
fn done_json(done: &Done) -> serde_json::Value {
    match &done.result {
        Ok(task) => serde_json::json!({
            "line": done.line,
            "stdout": String::from_utf8_lossy(&done.stdout),
            "task": task_json(task),
        }),
        Err(err) => serde_json::json!({ "line": done.line, "error": err.to_string() }),
    }
}

/// Runs one line's task to its end. Its stdout is what it wrote, or for a
/// call its result (with a newline added when it has none).
async fn run_one(
    client: &Client,
    spec: TaskSpec,
    line: String,
    call: bool,
    bar: ProgressBar,
    in_flight: &Mutex<HashSet<TaskId>>,
) -> Done {
    let mut stdout = LastAttemptOutput::default();
    let result = match client.run(spec).await {
        Err(err) => Err(err),
        Ok(stream) => {
            let mut seen = Seen::default();
            let mut known = false;
            let result = drive(client, Events::Once(stream), &mut seen, &mut |event| {
                if !known && let Ok(mut ids) = in_flight.lock() {
                    ids.insert(event.task_id);
                    known = true;
                }
                if let EventBody::Output { stream, data } = &event.body {
                    match stream {
                        OutputStream::Stdout => stdout.push(event.attempt, data),
                        OutputStream::Stderr => bar.suspend(|| write_stderr(data)),
                    }
                }
            })
            .await;
            if let (Some(id), Ok(mut ids)) = (seen.id, in_flight.lock()) {
                ids.remove(&id);
            }
            result
        }
    };
    let stdout = match (&result, call) {
        (Ok(task), true) if task.state == TaskState::Succeeded => {
            let mut output = task.output.to_vec();
            if !output.is_empty() && !output.ends_with(b"\n") {
                output.push(b'\n');
            }
            output
        }
        (_, true) => Vec::new(),
        (_, false) => stdout.into_bytes(),
    };
    Done {
        line,
        result: result.map_err(LineError::from),
        stdout,
    }
}

/// The non-blank lines of `input` as bytes, without their line endings
/// (`\n`, and any `\r` before it), each as soon as it is read: a line is
/// read only when the stream is polled, so the reader runs no further
/// ahead than its consumer. Bytes are kept as they are (not every line is
/// UTF-8); a line is blank when it is UTF-8 and only whitespace. The first
/// read error is the last item.
fn read_lines<R>(input: R) -> impl Stream<Item = std::io::Result<Vec<u8>>> + Send
where
    R: AsyncBufRead + Unpin + Send,
{
    futures::stream::unfold(Some(input), |input| async move {
        let mut input = input?;
        loop {
            let mut line = Vec::new();
            match input.read_until(b'\n', &mut line).await {
                Ok(0) => return None,
                Ok(_) => {}
                Err(err) => return Some((Err(err), None)),
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            while line.last() == Some(&b'\r') {
                line.pop();
            }
            let blank = std::str::from_utf8(&line).is_ok_and(|text| text.trim().is_empty());
            if !blank {
                return Some((Ok(line), Some(input)));
            }
        }
    })
}

/// A progress bar on stderr, hidden unless stderr is a terminal. Its
/// length starts at 0 and grows as lines are read.
fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} tasks  {elapsed_precise}  eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;

    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn jobs_above_the_coordinators_stream_limit_are_a_usage_error() {
        assert_eq!(jobs_given(0).ok(), Some(1));
        assert_eq!(jobs_given(MAX_JOBS).ok(), Some(MAX_JOBS));
        let err = jobs_given(2000).expect_err("over the limit");
        assert!(err.0.contains("at most 1024"), "{}", err.0);
    }

    #[test]
    fn in_input_order_one_slow_task_does_not_hold_the_others_back() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        let started = AtomicUsize::new(0);
        let (release, slow) = futures::channel::oneshot::channel::<()>();
        let mut slow = Some(slow);
        let started_ref = &started;
        let tasks = futures::stream::iter(0..20).map(move |i| {
            let wait = if i == 0 { slow.take() } else { None };
            async move {
                started_ref.fetch_add(1, Ordering::SeqCst);
                if let Some(wait) = wait {
                    let _ = wait.await;
                }
                i
            }
        });
        let mut results = limited(tasks, 4, true);
        // One poll runs all it may but the slow first task, which holds
        // back the printing and, past its window, further starts.
        assert_eq!(results.next().now_or_never(), None);
        assert_eq!(started.load(Ordering::SeqCst), 4 * ORDER_WINDOW);
        release.send(()).expect("the slow task waits");
        let order: Vec<i32> = futures::executor::block_on(results.collect());
        assert_eq!(order, (0..20).collect::<Vec<_>>());
    }

    /// The lines `input` reads, as the stream gives them.
    async fn lines_of(input: &'static [u8]) -> Vec<Vec<u8>> {
        read_lines(input)
            .map(|line| line.expect("reading from memory"))
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_line_that_is_not_utf8_fails_only_its_own_exec_and_is_a_calls_input_as_is() {
        let lines = lines_of(b"ok\ncaf\xe9\nfine\n").await;
        assert_eq!(lines, [&b"ok"[..], b"caf\xe9", b"fine"]);
        let exec = Work::Exec(argv(&["echo"]));
        let specs: Vec<_> = lines
            .iter()
            .map(|line| spec_for(&exec, line.clone()))
            .collect();
        assert!(specs[0].is_ok() && specs[2].is_ok(), "{specs:?}");
        let err = specs[1].as_ref().expect_err("not UTF-8");
        assert!(matches!(err, LineError::NotUtf8(_)), "{err:?}");
        assert!(err.to_string().contains("at byte 3"), "{err}");
        let call = Work::Call("echo".into());
        let spec = spec_for(&call, lines[1].clone()).expect("a call takes any bytes");
        assert_eq!(spec, TaskSpec::call("echo", &b"caf\xe9"[..]));
    }

    #[tokio::test]
    async fn blank_lines_are_skipped_and_line_endings_dropped_as_before() {
        let lines = lines_of(b"a\r\n \t\n\r\n\nb c\r\r\n\xe2\x80\x83\nlast\r").await;
        assert_eq!(lines, [&b"a"[..], b"b c", b"last"]);
    }

    #[tokio::test]
    async fn the_first_line_starts_its_task_before_stdin_ends() {
        use tokio::io::AsyncWriteExt;

        // A pipe that has one line in it and stays open (`tail -f`).
        let (mut writer, reader) = tokio::io::duplex(64);
        writer.write_all(b"first\n").await.expect("in memory");
        let (started, mut starts) = tokio::sync::mpsc::unbounded_channel();
        let tasks = read_lines(tokio::io::BufReader::new(reader)).map(|line| {
            let started = started.clone();
            async move {
                let _ = started.send(line.expect("reading from memory"));
                futures::future::pending::<()>().await
            }
        });
        let mut results = limited(tasks, 4, false);
        let first = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                _ = results.next() => panic!("no task ends"),
                first = starts.recv() => first,
            }
        })
        .await
        .expect("the first task starts while stdin is still open");
        assert_eq!(first.as_deref(), Some(&b"first"[..]));
        drop(writer);
    }

    #[test]
    fn every_placeholder_is_replaced_by_the_line() {
        let template = argv(&["cp", "{}", "{}.bak"]);
        assert_eq!(
            substitute(&template, "a.txt"),
            argv(&["cp", "a.txt", "a.txt.bak"])
        );
    }

    #[test]
    fn without_a_placeholder_the_line_is_appended() {
        let template = argv(&["echo", "hello"]);
        assert_eq!(
            substitute(&template, "world"),
            argv(&["echo", "hello", "world"])
        );
    }

    #[test]
    fn the_line_is_one_argument_even_with_spaces() {
        let template = argv(&["sh", "-c", "echo {} | wc -c"]);
        assert_eq!(
            substitute(&template, "two words"),
            argv(&["sh", "-c", "echo two words | wc -c"])
        );
        assert_eq!(
            substitute(&argv(&["echo"]), "two words"),
            argv(&["echo", "two words"])
        );
    }
}
