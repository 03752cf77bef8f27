//! Running one attempt: its [`AttemptControl`] (token, stop reason, process
//! group), why the node stops attempts ([`StopReason`]), running an exec or
//! call spec to its end under the spec's timeout, and the `Finished` the
//! attempt reports. Also the [`Assignment`] the session decodes for the
//! executor.
//!
//! Nothing here decides whether or when an attempt runs (slots, prefetch,
//! drain: `slots.rs` and the executor do), and nothing here talks to the
//! coordinator: events go to the attempt's [`Emitter`].

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, info};

use weft_proto::{CallSpec, Outcome, TaskKind, TaskSpec};

use crate::events::{AttemptKey, Emitter, Finished};
use crate::handlers::{HandlerError, HandlerRegistry, HandlerRequest, ParentResult};
use crate::lease;
use crate::parents::{AttemptDir, OUTPUT_ENV, PARENTS_ENV};
use crate::process::{self, ExecEnd};
use crate::reaper::Reaper;

/// An assignment from the coordinator, decoded once at the session's edge.
#[derive(Debug)]
pub(crate) struct Assignment {
    /// The attempt to run.
    pub(crate) key: AttemptKey,
    /// Its validated spec (boxed: a spec is several hundred bytes, and the
    /// attempt is moved from the decoder to the queue to its task), or why
    /// it cannot start.
    pub(crate) spec: Result<Box<TaskSpec>, InvalidSpec>,
    /// The results of the tasks it runs after, in `after` order.
    pub(crate) parents: Arc<[ParentResult]>,
}

/// A spec that failed validation: the attempt is reported `START_FAILED`.
#[derive(Debug)]
pub(crate) struct InvalidSpec {
    /// The slots the wire spec asked for: what it used of the credit window.
    pub(crate) slots: u32,
    /// Why it cannot start.
    pub(crate) error: String,
}

/// Why the node stopped an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// The coordinator sent `Cancel` (with its reason).
    Cancelled(String),
    /// It ran past `spec.timeout`.
    TimedOut(Duration),
    /// The node drained and the attempt outlived the grace period.
    Drained(Duration),
    /// Nothing was heard from the coordinator for this long, past the
    /// node's lease: the coordinator has given the attempt to another node.
    LeaseExpired(Duration),
    /// The node was killed: report nothing.
    Killed,
}

/// Stops one attempt: its token, why it was stopped, and its process group.
#[derive(Debug)]
pub(crate) struct AttemptControl {
    token: CancellationToken,
    reason: OnceLock<StopReason>,
    pgid: OnceLock<u32>,
}

impl AttemptControl {
    /// A control whose token is `token` (a child of the node's kill token).
    pub(crate) fn new(token: CancellationToken) -> Self {
        AttemptControl {
            token,
            reason: OnceLock::new(),
            pgid: OnceLock::new(),
        }
    }

    /// Stops the attempt; the first reason given wins.
    pub(crate) fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Why it was stopped; a token cancelled by its parent (node kill)
    /// without a reason counts as killed.
    fn reason(&self) -> StopReason {
        self.reason.get().cloned().unwrap_or(StopReason::Killed)
    }

    /// SIGKILLs the attempt's process group now, if it has one.
    pub(crate) fn kill_group(&self) {
        if let Some(pgid) = self.pgid.get() {
            process::kill_group(*pgid);
        }
    }
}

/// Runs one attempt to its end (or its timeout): answers its `Finished`,
/// not yet sent, or `None` when it was killed with the node (report
/// nothing).
pub(crate) async fn run(
    spec: &TaskSpec,
    parents: &Arc<[ParentResult]>,
    control: &AttemptControl,
    emit: &Emitter,
    handlers: &HandlerRegistry,
    reaper: Option<&Reaper>,
) -> Option<Finished> {
    debug!(kind = spec.summary(), "attempt starting");
    let work = async {
        match &spec.kind {
            TaskKind::Exec(exec_spec) => {
                // `$WEFT_PARENTS` and `$WEFT_OUTPUT` (parents.rs).
                let dir = match AttemptDir::create(emit.task_id(), emit.attempt(), parents) {
                    Ok(dir) => dir,
                    Err(err) => {
                        let error = format!("preparing $WEFT_PARENTS: {err}");
                        return Some(finished(Outcome::StartFailed, None, Bytes::new(), error));
                    }
                };
                let mut exec_spec = exec_spec.clone();
                let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
                exec_spec
                    .env
                    .insert(PARENTS_ENV.into(), path(dir.parents()));
                exec_spec.env.insert(OUTPUT_ENV.into(), path(dir.output()));
                let secrets = &spec.secret_env;
                let context = (secrets, spec.trace.as_ref());
                let end = process::run(&exec_spec, context, emit, &control.token, reaper, |pgid| {
                    let _ = control.pgid.set(pgid);
                })
                .await;
                // Only a process that ended on its own left a result: a
                // stopped one (timed out, cancelled, drained) reports why
                // it was stopped, whatever is in `$WEFT_OUTPUT`.
                let ended = matches!(end, ExecEnd::Exited(_) | ExecEnd::Signaled(_));
                let mut done = exec_finished(end, control)?;
                if ended {
                    // Bounded by the largest message a coordinator takes;
                    // the outbox fails a result too large for the one it
                    // has.
                    let limit = weft_proto::limits::max_spec_bytes(
                        weft_proto::limits::MAX_MESSAGE_BYTES_CEILING,
                    );
                    match dir.read_output(limit).await {
                        Ok(output) => done.output = output,
                        Err(error) => {
                            done.outcome = Outcome::Failed;
                            done.error = error;
                        }
                    }
                }
                Some(done)
            }
            TaskKind::Call(call) => run_call(call, spec, parents, emit, control, handlers).await,
        }
    };
    // A timeout too large to add to the clock (i64::MAX seconds is a
    // valid spec) is no deadline at all.
    let deadline = spec
        .timeout
        .and_then(|limit| Some((limit, tokio::time::Instant::now().checked_add(limit)?)));
    match deadline {
        None => work.await,
        Some((limit, deadline)) => {
            tokio::pin!(work);
            tokio::select! {
                result = &mut work => {
                    // Work that held the thread past its deadline (an async
                    // handler that blocks before its first wait) finished
                    // late, not in time: it timed out.
                    if result.is_some() && tokio::time::Instant::now() > deadline {
                        control.stop(StopReason::TimedOut(limit));
                        return stopped(control.reason());
                    }
                    result
                }
                () = tokio::time::sleep_until(deadline) => {
                    control.stop(StopReason::TimedOut(limit));
                    work.await
                }
            }
        }
    }
}

/// Sends the `Finished` of an attempt that ran: always its last event.
pub(crate) async fn report(emit: &Emitter, done: Finished) {
    let outcome = done.outcome.as_str();
    info!(outcome, exit_code = ?done.exit_code, error = %done.error, "attempt finished");
    emit.finished(done).await;
}

async fn run_call(
    call: &CallSpec,
    spec: &TaskSpec,
    parents: &Arc<[ParentResult]>,
    emit: &Emitter,
    control: &AttemptControl,
    handlers: &HandlerRegistry,
) -> Option<Finished> {
    let Some(service) = handlers.get(&call.handler) else {
        let known = handlers.names().join(", ");
        let error = format!(
            "unknown handler {:?} (this node serves: {known})",
            call.handler
        );
        return Some(finished(Outcome::StartFailed, None, Bytes::new(), error));
    };
    emit.started(0).await;
    let request = HandlerRequest {
        task_id: emit.task_id(),
        attempt: emit.attempt(),
        input: call.input.clone(),
        secret_env: spec.secret_env.clone(),
        trace: spec.trace.clone(),
        cancel: control.token.clone(),
        emit: emit.clone(),
        parents: Arc::clone(parents),
    };
    let result = tokio::select! {
        result = service.oneshot(request) => result,
        () = control.token.cancelled() => return stopped(control.reason()),
    };
    match result {
        Ok(output) => Some(finished(Outcome::Succeeded, None, output, String::new())),
        Err(HandlerError::Cancelled) if control.token.is_cancelled() => stopped(control.reason()),
        Err(err) => Some(finished(
            Outcome::Failed,
            None,
            Bytes::new(),
            err.to_string(),
        )),
    }
}

fn exec_finished(end: ExecEnd, control: &AttemptControl) -> Option<Finished> {
    Some(match end {
        ExecEnd::Exited(0) => finished(Outcome::Succeeded, Some(0), Bytes::new(), String::new()),
        ExecEnd::Exited(code) => finished(
            Outcome::Failed,
            Some(code),
            Bytes::new(),
            format!("exited with code {code}"),
        ),
        ExecEnd::Signaled(signal) => {
            let name = Signal::try_from(signal).map_or("unknown signal", Signal::as_str);
            let error = format!("killed by signal {signal} ({name})");
            finished(Outcome::Failed, None, Bytes::new(), error)
        }
        ExecEnd::StartFailed(error) => finished(Outcome::StartFailed, None, Bytes::new(), error),
        ExecEnd::Stopped => return stopped(control.reason()),
    })
}

/// The `Finished` of a stopped attempt; `None` when killed (report nothing).
pub(crate) fn stopped(reason: StopReason) -> Option<Finished> {
    let (outcome, error) = match reason {
        StopReason::Killed => return None,
        StopReason::Cancelled(why) if why.is_empty() => {
            (Outcome::Cancelled, "cancelled".to_owned())
        }
        StopReason::Cancelled(why) => (Outcome::Cancelled, format!("cancelled: {why}")),
        StopReason::TimedOut(limit) => (Outcome::TimedOut, format!("timed out after {limit:?}")),
        StopReason::Drained(grace) => (
            Outcome::Cancelled,
            format!("cancelled by node drain: still running after the {grace:?} grace period"),
        ),
        StopReason::LeaseExpired(silence) => (Outcome::Cancelled, lease::expired_message(silence)),
    };
    Some(finished(outcome, None, Bytes::new(), error))
}

/// How an attempt ended, for its `Finished` event.
pub(crate) fn finished(
    outcome: Outcome,
    exit_code: Option<i32>,
    output: Bytes,
    error: String,
) -> Finished {
    Finished {
        outcome,
        exit_code,
        output,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_reasons_read_as_their_finished() {
        let text = |reason| {
            let done = stopped(reason).expect("reported");
            (done.outcome, done.error)
        };
        assert_eq!(
            text(StopReason::Cancelled(String::new())),
            (Outcome::Cancelled, "cancelled".to_owned())
        );
        assert_eq!(
            text(StopReason::TimedOut(Duration::from_millis(300))),
            (Outcome::TimedOut, "timed out after 300ms".to_owned())
        );
        assert_eq!(
            text(StopReason::Drained(Duration::from_secs(2))).1,
            "cancelled by node drain: still running after the 2s grace period"
        );
        assert!(
            text(StopReason::LeaseExpired(Duration::from_secs(5)))
                .1
                .starts_with("lease expired")
        );
        assert_eq!(
            stopped(StopReason::Killed),
            None,
            "a killed attempt reports nothing"
        );
    }

    #[tokio::test]
    async fn a_call_handler_reads_the_tasks_secret_env_on_its_request() {
        let mut handlers = HandlerRegistry::new();
        handlers.register_async("key", |request: HandlerRequest| async move {
            let value = request.secret_env.get("API_KEY").unwrap_or("missing");
            Ok(Bytes::from(value.to_uppercase()))
        });
        let spec = TaskSpec::call("key", "").secret_env("API_KEY", "s3cr3t");
        let (tx, _rx) = crate::events::channel();
        let emit = Emitter::new(tx, weft_proto::TaskId::new(), weft_proto::Attempt::FIRST);
        let control = AttemptControl::new(CancellationToken::new());
        let done = run(&spec, &Arc::from([]), &control, &emit, &handlers, None)
            .await
            .expect("reported");
        assert_eq!(
            (done.outcome, &done.output[..]),
            (Outcome::Succeeded, &b"S3CR3T"[..])
        );
    }

    fn parent(ref_name: &str, output: &str) -> ParentResult {
        ParentResult {
            task_id: weft_proto::TaskId::new(),
            ref_name: ref_name.into(),
            state: weft_proto::TaskState::Succeeded,
            output: Bytes::from(output.to_owned()),
        }
    }

    async fn run_with_parents(spec: &TaskSpec, parents: Vec<ParentResult>) -> Finished {
        let mut handlers = HandlerRegistry::new();
        handlers.register_async("join", |request: HandlerRequest| async move {
            let joined: Vec<String> = request
                .parents
                .iter()
                .map(|p| format!("{}={}", p.ref_name, String::from_utf8_lossy(&p.output)))
                .collect();
            Ok(Bytes::from(joined.join(",")))
        });
        let (tx, _rx) = crate::events::channel();
        let emit = Emitter::new(tx, weft_proto::TaskId::new(), weft_proto::Attempt::FIRST);
        let control = AttemptControl::new(CancellationToken::new());
        run(spec, &Arc::from(parents), &control, &emit, &handlers, None)
            .await
            .expect("reported")
    }

    #[tokio::test]
    async fn an_exec_task_reads_its_parents_from_files_and_writes_its_output() {
        let script = r#"cat "$WEFT_PARENTS/a" "$WEFT_PARENTS/b" > "$WEFT_OUTPUT"; grep -q '"ref":"b"' "$WEFT_PARENTS/index.json" && echo "$WEFT_PARENTS" >&2"#;
        let spec = TaskSpec::exec(["sh", "-c", script]);
        let done = run_with_parents(&spec, vec![parent("a", "1"), parent("b", "2")]).await;
        assert_eq!(done.outcome, Outcome::Succeeded, "{}", done.error);
        assert_eq!(&done.output[..], b"12");
        // Without parents, `$WEFT_OUTPUT` still works.
        let spec = TaskSpec::exec(["sh", "-c", r#"printf done > "$WEFT_OUTPUT""#]);
        let done = run_with_parents(&spec, Vec::new()).await;
        assert_eq!(&done.output[..], b"done");
    }

    #[tokio::test]
    async fn a_call_handler_gets_its_parents_on_its_request() {
        let spec = TaskSpec::call("join", "");
        let done = run_with_parents(&spec, vec![parent("a", "x"), parent("b", "y")]).await;
        assert_eq!(&done.output[..], b"a=x,b=y");
    }

    #[test]
    fn the_first_stop_reason_wins_and_a_parent_cancel_counts_as_killed() {
        let parent = CancellationToken::new();
        let control = AttemptControl::new(parent.child_token());
        parent.cancel();
        assert_eq!(control.reason(), StopReason::Killed);
        let control = AttemptControl::new(CancellationToken::new());
        control.stop(StopReason::TimedOut(Duration::from_secs(1)));
        control.stop(StopReason::Cancelled("later".into()));
        assert!(control.token.is_cancelled());
        assert_eq!(
            control.reason(),
            StopReason::TimedOut(Duration::from_secs(1))
        );
    }
}
