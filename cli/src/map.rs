//! `weft map`: one exec task (or one call, `--call`) per line of stdin, at
//! most N in flight. Each task's stdout (a call's result) is printed whole
//! when it finishes (completion or input order), its stderr streamed to
//! stderr; a progress bar shows on stderr when stderr is a terminal.
//! [`substitute`] is the xargs-like templating; [`limited`] keeps N in
//! flight, in either order. Once stdout's reader is gone (`| head`), map
//! submits no more and cancels the tasks in flight.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io::IsTerminal;
use std::sync::Mutex;

use anyhow::Context;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::AsyncBufReadExt;

use weft_client::{Client, EventBody, Task, TaskSpec};
use weft_proto::{OutputStream, TaskId, TaskState};

use crate::exit::{self, UsageError};
use crate::opts::TaskOpts;
use crate::output::{OutputFormat, task_json};
use crate::stream::{
    Events, Flow, LastAttemptOutput, Seen, drive, failure_line, flow_after, write_stderr,
    write_stdout,
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

/// One finished line: its input, the final task (or why it could not be
/// followed), and its collected stdout.
struct Done {
    line: String,
    result: Result<Task, weft_client::Error>,
    stdout: Vec<u8>,
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
    let lines = read_lines().await?;
    if lines.is_empty() {
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
    let bar = progress_bar(lines.len() as u64);
    let total = lines.len();
    let bar_for_tasks = bar.clone();
    let work = &work;
    // The tasks submitted and not yet ended, to cancel once stdout's
    // reader is gone.
    let in_flight = Mutex::new(HashSet::new());
    let in_flight_ref = &in_flight;
    let tasks = futures::stream::iter(lines).map(|line| {
        let (spec, call) = match work {
            Work::Exec(template) => (TaskSpec::exec(substitute(template, &line)), false),
            Work::Call(handler) => (TaskSpec::call(handler.clone(), line.clone()), true),
        };
        let spec = opts.apply_with_stdin(spec, stdin.clone());
        let bar = bar_for_tasks.clone();
        async move { run_one(client, spec, line, call, bar, in_flight_ref).await }
    });
    let mut finished = limited(tasks, jobs, keep_order);
    let mut failures = Vec::new();
    let mut unreachable = false;
    while let Some(done) = finished.next().await {
        let written = match format {
            OutputFormat::Text => bar.suspend(|| write_stdout(&done.stdout)),
            OutputFormat::Json => {
                let line = format!("{}\n", done_json(&done));
                bar.suspend(|| write_stdout(line.as_bytes()))
            }
        };
        if flow_after(&written) == Flow::Stop {
            // Dropping the stream submits no more lines and stops
            // following the tasks in flight, which are then cancelled.
            drop(finished);
            bar.finish_and_clear();
            let ids: Vec<TaskId> = match in_flight.lock() {
                Ok(mut ids) => ids.drain().collect(),
                Err(_) => Vec::new(),
            };
            return Ok(cancel_in_flight(client, ids).await);
        }
        bar.inc(1);
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
    bar.finish_and_clear();
    if failures.is_empty() {
        return Ok(exit::SUCCESS);
    }
    eprintln!("weft: map: {} of {total} tasks failed:", failures.len());
    for failure in &failures {
        eprintln!("  {failure}");
    }
    Ok(if unreachable {
        exit::UNAVAILABLE
    } else {
        exit::FAILURE
    })
}

/// Runs `tasks` with at most `jobs` in flight, yielding each result as it
/// finishes, or with `keep_order` in input order. Either way a finished
/// task frees its place at once: in input order, results wait in a reorder
/// buffer (not in the in-flight set, as `buffered` keeps them), so one slow
/// task does not hold the others back to one at a time.
fn limited<'a, F>(
    tasks: impl Stream<Item = F> + Send + 'a,
    jobs: usize,
    keep_order: bool,
) -> BoxStream<'a, F::Output>
where
    F: Future + Send + 'a,
    F::Output: Send + 'a,
{
    if !keep_order {
        return tasks.buffer_unordered(jobs).boxed();
    }
    tasks
        .enumerate()
        .map(|(index, task)| async move { (index, task.await) })
        .buffer_unordered(jobs)
        .scan(
            (0, BTreeMap::new()),
            |(next, waiting): &mut (usize, BTreeMap<usize, F::Output>), (index, result)| {
                waiting.insert(index, result);
                let mut ready = Vec::new();
                while let Some(result) = waiting.remove(next) {
                    ready.push(result);
                    *next += 1;
                }
                futures::future::ready(Some(futures::stream::iter(ready)))
            },
        )
        .flatten()
        .boxed()
}

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
        result,
        stdout,
    }
}

/// Non-blank lines of stdin, without their line endings.
async fn read_lines() -> anyhow::Result<Vec<String>> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut all = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let line = line.trim_end_matches('\r');
        if !line.trim().is_empty() {
            all.push(line.to_owned());
        }
    }
    Ok(all)
}

/// A progress bar on stderr, hidden unless stderr is a terminal.
fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} tasks  {elapsed_precise}  eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
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
        // One poll runs everything but the slow first task, which holds
        // back only the printing.
        assert_eq!(results.next().now_or_never(), None);
        assert_eq!(started.load(Ordering::SeqCst), 20);
        release.send(()).expect("the slow task waits");
        let order: Vec<i32> = futures::executor::block_on(results.collect());
        assert_eq!(order, (0..20).collect::<Vec<_>>());
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
