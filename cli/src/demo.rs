//! `weft demo`: starts a local cluster (see [`local`]) on a free port and runs a mixed,
//! visible workload on it (subprocesses, async and blocking handlers, a
//! retry, a cancel, a timeout, a failure), then prints a summary and checks
//! that every task ended as it should. Narrative goes to stdout, task
//! stderr to stderr (each line labelled with its task's tag).
//!
//! With `-o json` stdout carries JSON Lines instead, one object per line as
//! things happen, each with an `"event"` field (`cluster`, `phase`,
//! `task`, `requeued`, `cancelling`, `error`), and last one `summary`
//! object with the checks and `"ok"`: a program can follow progress or
//! read only the last line. Nothing else goes to stdout.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use weft_client::{Client, Error, EventBody, Task, TaskEvent, TaskSpec};
use weft_cluster::wait_nodes_ready;
use weft_proto::{OutputStream, TaskState};

use crate::bench::{note, stop_signal};
use crate::exit;
use crate::local;
use crate::output::{OutputFormat, short_duration, task_json};
use crate::stream::{Events, LastAttemptOutput, Seen, drive, write_stderr};

/// A finished demo task with its collected stdout.
struct Ran {
    task: Task,
    stdout: String,
    took: Duration,
}

/// One expectation of the demo and whether it held.
struct Check {
    what: &'static str,
    ok: bool,
    detail: String,
}

/// Where the narrative goes: readable lines, or one JSON object a line.
#[derive(Clone, Copy)]
struct Say {
    json: bool,
}

impl Say {
    /// Prints `text` (text mode) or `value` (JSON mode) as one line.
    fn line(self, text: impl FnOnce() -> String, value: impl FnOnce() -> Value) {
        if self.json {
            println!("{}", value());
        } else {
            println!("{}", text());
        }
    }
}

/// `weft demo [--nodes N] [--slots S]`. A stop signal (Ctrl-C, SIGTERM,
/// SIGHUP) at any point, start-up included, stops the cluster and removes
/// the temp dirs; the demo then exits 1.
pub async fn run(nodes: usize, slots: u32, format: OutputFormat) -> anyhow::Result<u8> {
    local::check_slots(Some(slots))?;
    // Listening before anything is made that a signal must not leave behind.
    let stop = stop_signal();
    tokio::pin!(stop);
    // Polled once now, so the handlers are installed before anything a
    // signal must not leave behind exists (a signal so early ends it).
    if let std::task::Poll::Ready(signal) = futures::poll!(stop.as_mut()) {
        anyhow::bail!("stopped by {signal}");
    }
    let token_dir = tempfile::Builder::new().prefix("weft-demo-").tempdir()?;
    tokio::select! {
        code = demo(nodes, slots, format, token_dir.path()) => code,
        signal = &mut stop => {
            // The cluster and the workload's dirs went with `demo`;
            // `token_dir` goes on return.
            note(format_args!("demo: {signal}; the cluster was stopped"));
            Ok(exit::FAILURE)
        }
    }
}

/// The demo proper, on a cluster whose identities live in `token_dir`.
async fn demo(
    nodes: usize,
    slots: u32,
    format: OutputFormat,
    token_dir: &std::path::Path,
) -> anyhow::Result<u8> {
    let say = Say {
        json: format == OutputFormat::Json,
    };
    let nodes = nodes.max(1);
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
    let cluster = local::start(listener, nodes, Some(slots), token_dir).await?;
    let url = cluster.url();
    say.line(
        || format!("demo: local cluster at {url}: {nodes} nodes x {slots} slots"),
        || json!({"event": "cluster", "url": url.to_string(), "nodes": nodes, "slots": slots}),
    );
    let client = Client::connect_secure(
        &url,
        cluster.trust().as_ref(),
        cluster.admin_token().as_deref(),
    )
    .await?;
    let ready = wait_nodes_ready(&client, cluster.node_count(), Duration::from_secs(10)).await;
    let outcome = match ready {
        Ok(()) => workload(&client, say).await,
        Err(err) => Err(err.into()),
    };
    cluster.shutdown(Duration::from_secs(2)).await;
    let (checks, tasks, elapsed) = outcome?;
    Ok(summary(say, &checks, &tasks, elapsed))
}

fn phase(say: Say, number: u32, text: &str) {
    say.line(
        || format!("demo: phase {number}: {text}"),
        || json!({"event": "phase", "phase": number, "what": text}),
    );
}

async fn workload(client: &Client, say: Say) -> anyhow::Result<(Vec<Check>, Vec<Task>, Duration)> {
    let started = Instant::now();
    let marker_dir = tempfile::tempdir()?;
    let marker = marker_dir.path().join("first-attempt-failed");

    phase(
        say,
        1,
        "subprocesses, async handlers and blocking handlers, all at once",
    );
    let execs = (1..=12).map(|i| {
        let spec = TaskSpec::exec([
            "sh",
            "-c",
            "echo \"hello from $0 (pid $$ on $(uname -n))\"",
            &format!("task-{i}"),
        ])
        .name(format!("hello-{i}"));
        announce(client, say, "exec", spec)
    });
    let sleeps = (1..=8).map(|_| announce(client, say, "async", TaskSpec::call("sleep", "200ms")));
    let echoes = (1..=4).map(|i| {
        announce(
            client,
            say,
            "async",
            TaskSpec::call("echo", format!("echo #{i}")),
        )
    });
    let spins = (1..=6).map(|_| announce(client, say, "blocking", TaskSpec::call("spin", "100ms")));
    let (execs, sleeps, echoes, spins) = tokio::join!(
        join_all(execs),
        join_all(sleeps),
        join_all(echoes),
        join_all(spins)
    );
    let mut checks = Vec::new();
    let mut tasks = Vec::new();
    for (what, batch) in [
        ("12 subprocesses succeed", execs),
        ("8 async sleep calls succeed", sleeps),
        ("4 async echo calls succeed", echoes),
        ("6 blocking spin calls succeed", spins),
    ] {
        let total = batch.len();
        let mut ok = 0;
        for ran in batch.into_iter().flatten() {
            ok += usize::from(ran.task.state == TaskState::Succeeded);
            tasks.push(ran.task);
        }
        checks.push(Check {
            what,
            ok: ok == total,
            detail: format!("{ok} of {total} succeeded"),
        });
    }

    phase(say, 2, "a retry, a cancel, a timeout and a failure");
    let retry_script = "if [ -e \"$1\" ]; then echo \"attempt after the failure succeeded\"; \
         else touch \"$1\"; echo \"first attempt fails on purpose\" >&2; exit 3; fi";
    let retry = TaskSpec::exec(["sh", "-c", retry_script, "sh", &marker.to_string_lossy()])
        .name("retry-once")
        .max_attempts(3);
    let timeout = TaskSpec::exec(["sleep", "10"])
        .name("too-slow")
        .timeout(Duration::from_millis(300));
    let fail = TaskSpec::call("fail", "boom: the fail handler always fails").max_attempts(2);
    let (retry, cancelled, timed_out, failed) = tokio::join!(
        announce(client, say, "retry", retry),
        cancel_while_running(client, say),
        announce(client, say, "timeout", timeout),
        announce(client, say, "fail", fail),
    );
    checks.push(expect(
        "a failing first attempt is retried and succeeds",
        &retry,
        |t| t.state == TaskState::Succeeded && t.attempt.0 >= 2,
    ));
    checks.push(expect("a running task is cancelled", &cancelled, |t| {
        t.state == TaskState::Cancelled
    }));
    checks.push(expect(
        "a task past its timeout is killed",
        &timed_out,
        |t| t.state == TaskState::TimedOut,
    ));
    checks.push(expect("a failing handler ends failed", &failed, |t| {
        t.state == TaskState::Failed && t.error.contains("boom")
    }));
    tasks.extend(
        [retry, cancelled, timed_out, failed]
            .into_iter()
            .flatten()
            .map(|ran| ran.task),
    );
    Ok((checks, tasks, started.elapsed()))
}

/// Runs `spec`, printing a line when it finishes (and its retries live).
async fn announce(client: &Client, say: Say, tag: &'static str, spec: TaskSpec) -> Option<Ran> {
    let what = describe(&spec);
    let result = run_collecting(client, tag, spec, &mut |event| {
        if let EventBody::State {
            state: TaskState::Queued,
            reason,
            ..
        } = &event.body
            && event.attempt.0 > 0
        {
            say.line(
                || {
                    format!(
                        "  [{tag:<8}] {what}: requeued (attempt {}): {reason}",
                        event.attempt
                    )
                },
                || {
                    json!({"event": "requeued", "tag": tag, "what": what, "id": event.task_id.to_string(),
                        "attempt": event.attempt.0, "reason": reason})
                },
            );
        }
    })
    .await;
    match result {
        Ok(ran) => {
            let node = ran.task.node_name.as_deref().unwrap_or("?");
            let mut line = format!(
                "  [{tag:<8}] {what} -> {} on {node} (attempt {}, {})",
                ran.task.state,
                ran.task.attempt,
                short_duration(ran.took)
            );
            let out = ran.stdout.trim_end();
            if !out.is_empty() {
                line.push_str(&format!(": {out}"));
            } else if !ran.task.output.is_empty() {
                line.push_str(&format!(": {}", String::from_utf8_lossy(&ran.task.output)));
            }
            if !ran.task.error.is_empty() {
                line.push_str(&format!(" [{}]", ran.task.error));
            }
            say.line(
                || line,
                || {
                    json!({"event": "task", "tag": tag, "what": what,
                        "took_ms": millis(ran.took), "stdout": ran.stdout, "task": task_json(&ran.task)})
                },
            );
            Some(ran)
        }
        Err(err) => {
            say.line(
                || format!("  [{tag:<8}] {what}: weft: error: {err}"),
                || json!({"event": "error", "tag": tag, "what": what, "error": err.to_string()}),
            );
            None
        }
    }
}

/// Starts a long task, waits until it runs, cancels it, and waits for the end.
async fn cancel_while_running(client: &Client, say: Say) -> Option<Ran> {
    let started = Instant::now();
    let spec = TaskSpec::exec(["sleep", "30"]).name("cancel-me");
    let outcome: Result<Task, Error> = async {
        let id = client.submit(spec).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.get(id).await?.state != TaskState::Running && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        say.line(
            || "  [cancel  ] sleep 30 is running; cancelling it".to_owned(),
            || json!({"event": "cancelling", "tag": "cancel", "what": "sleep 30", "id": id.to_string()}),
        );
        client.cancel(id).await?;
        client.wait(id).await
    }
    .await;
    match outcome {
        Ok(task) => {
            let took = started.elapsed();
            say.line(
                || {
                    format!(
                        "  [cancel  ] sleep 30 -> {} on {} ({})",
                        task.state,
                        task.node_name.as_deref().unwrap_or("?"),
                        short_duration(took)
                    )
                },
                || {
                    json!({"event": "task", "tag": "cancel", "what": "sleep 30",
                        "took_ms": millis(took), "stdout": "", "task": task_json(&task)})
                },
            );
            Some(Ran {
                task,
                stdout: String::new(),
                took: started.elapsed(),
            })
        }
        Err(err) => {
            say.line(
                || format!("  [cancel  ] weft: error: {err}"),
                || json!({"event": "error", "tag": "cancel", "what": "sleep 30", "error": err.to_string()}),
            );
            None
        }
    }
}

/// Runs `spec` to its end, collecting its stdout; its stderr goes to
/// stderr at once, each line labelled with `tag` ([`labelled`]).
async fn run_collecting(
    client: &Client,
    tag: &str,
    spec: TaskSpec,
    on_event: &mut (dyn FnMut(&TaskEvent) + Send),
) -> Result<Ran, Error> {
    let started = Instant::now();
    let stream = client.run(spec).await?;
    let mut stdout = LastAttemptOutput::default();
    let mut seen = Seen::default();
    let task = drive(client, Events::Once(stream), &mut seen, &mut |event| {
        if let EventBody::Output { stream, data } = &event.body {
            match stream {
                OutputStream::Stdout => stdout.push(event.attempt, data),
                OutputStream::Stderr => write_stderr(labelled(tag, data).as_bytes()),
            }
        }
        on_event(event);
    })
    .await?;
    Ok(Ran {
        task,
        stdout: String::from_utf8_lossy(&stdout.into_bytes()).into_owned(),
        took: started.elapsed(),
    })
}

/// A task's stderr chunk as the demo prints it: each line labelled like
/// the narrative (`  [retry   ] stderr: ...`), so it is clear which task
/// wrote it.
fn labelled(tag: &str, data: &[u8]) -> String {
    String::from_utf8_lossy(data)
        .lines()
        .map(|line| format!("  [{tag:<8}] stderr: {line}\n"))
        .collect()
}

fn describe(spec: &TaskSpec) -> String {
    match &spec.kind {
        weft_proto::TaskKind::Call(call) => {
            format!("{} {}", call.handler, String::from_utf8_lossy(&call.input))
        }
        weft_proto::TaskKind::Exec(_) => spec.summary(),
    }
}

fn expect(what: &'static str, ran: &Option<Ran>, ok: impl Fn(&Task) -> bool) -> Check {
    match ran {
        Some(ran) => Check {
            what,
            ok: ok(&ran.task),
            detail: format!(
                "ended {} after {} attempt(s){}",
                ran.task.state,
                ran.task.attempt,
                if ran.task.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", ran.task.error)
                }
            ),
        },
        None => Check {
            what,
            ok: false,
            detail: "could not be followed".into(),
        },
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn summary(say: Say, checks: &[Check], tasks: &[Task], elapsed: Duration) -> u8 {
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_state: BTreeMap<&str, usize> = BTreeMap::new();
    for task in tasks {
        *per_node
            .entry(task.node_name.as_deref().unwrap_or("(none)"))
            .or_default() += 1;
        *per_state.entry(task.state.as_str()).or_default() += 1;
    }
    let join = |map: &BTreeMap<&str, usize>| {
        map.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let failed: Vec<&Check> = checks.iter().filter(|c| !c.ok).collect();
    let rate = tasks.len() as f64 / elapsed.as_secs_f64().max(0.001);
    if say.json {
        let checks: Vec<Value> = checks
            .iter()
            .map(|c| json!({"what": c.what, "ok": c.ok, "detail": c.detail}))
            .collect();
        println!(
            "{}",
            json!({"event": "summary", "ok": failed.is_empty(), "tasks": tasks.len(),
                "elapsed_ms": millis(elapsed), "tasks_per_second": rate,
                "per_node": per_node, "states": per_state, "checks": checks})
        );
    } else {
        println!("demo: summary");
        println!(
            "  tasks:     {} in {} ({rate:.1} tasks/s)",
            tasks.len(),
            short_duration(elapsed),
        );
        println!("  per node:  {}", join(&per_node));
        println!("  states:    {}", join(&per_state));
        for check in checks {
            let mark = if check.ok { "ok  " } else { "FAIL" };
            println!("  {mark} {}: {}", check.what, check.detail);
        }
    }
    if failed.is_empty() {
        if !say.json {
            println!("demo: everything behaved as expected");
        }
        exit::SUCCESS
    } else {
        eprintln!(
            "weft: error: demo: {} of {} checks failed",
            failed.len(),
            checks.len()
        );
        exit::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::tests::{send, wait_for, weft_command};

    #[test]
    fn ctrl_c_during_startup_leaves_no_temp_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let mut demo = weft_command(tmp.path()).arg("demo").spawn().unwrap();
        // The demo's dir, then the CA's (made while the cluster starts).
        let started = wait_for(Duration::from_secs(30), || {
            let names: Vec<String> = std::fs::read_dir(tmp.path())
                .ok()?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect();
            let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
            (has("weft-demo-") && has("weft-pki-")).then_some(())
        });
        send("-INT", demo.id());
        let status = demo.wait().unwrap();
        assert!(started.is_some(), "the demo made no dirs ({status})");
        assert_eq!(status.code(), Some(i32::from(exit::FAILURE)), "{status}");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    }

    #[test]
    fn a_tasks_stderr_is_labelled_with_its_tag() {
        assert_eq!(
            labelled("retry", b"first attempt fails on purpose\n"),
            "  [retry   ] stderr: first attempt fails on purpose\n"
        );
        assert_eq!(
            labelled("fail", b"a\nb"),
            "  [fail    ] stderr: a\n  [fail    ] stderr: b\n"
        );
    }
}
