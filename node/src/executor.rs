//! Runs assignments: one tracked task per attempt, each with its own
//! cancellation token (so `Cancel` stops exactly that attempt), slot
//! accounting (never more slots than configured), timeouts, and the credit
//! window the session grants from.
//!
//! Prefetch: the node grants `slots + prefetch` credits, so the coordinator
//! may assign more than the free slots. An assignment that finds no free
//! slot waits in a local FIFO (assigned, not started: no `Started` sent) and
//! starts as soon as a slot frees, so the next task is already here when
//! one ends. How much it holds adapts to the work: enough queued attempts
//! per slot to cover [`REFILL_TIME`] at the average run time seen so far,
//! never more than the configured prefetch (none before the first attempt
//! ends), so short tasks stream while long ones stay spread over the nodes.
//! Never more than `slots` run at once. A queued attempt that is
//! cancelled, drained or stopped (lease) is reported `CANCELLED` without
//! ever running.
//!
//! An attempt holds its slots until the session has taken its `Finished`
//! event off the event channel ([`Executor::release`]), so credits are only
//! granted back after the `Finished` they answer, and an attempt whose
//! `Finished` is still buffered is reported as running after a reconnect.
//! No network I/O here: events go to the channel, the session sends them.
//!
//! An assignment is only started while the node's lease holds (checked
//! under the same lock that stopping every attempt takes), so an `Assign`
//! that races the lease's expiry is refused rather than started on a node
//! the coordinator already gave up on.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{Instrument, debug, info, info_span, warn};

use weft_proto::{Attempt, CallSpec, Outcome, TaskId, TaskKind, TaskSpec, pb};

use crate::events::{Emitter, EventTx};
use crate::process::{self, ExecEnd};
use crate::handlers::{HandlerError, HandlerRegistry, HandlerRequest};
use crate::lease::{self, Lease};
use crate::reaper::Reaper;

/// How long the coordinator takes to refill a freed credit (the node's
/// `Finished` and `Credits`, a commit, the next `Assign`), with margin: the
/// node keeps enough queued work to cover it.
pub(crate) const REFILL_TIME: Duration = Duration::from_millis(10);

/// An attempt's key: the unit of fencing.
pub(crate) type AttemptKey = (TaskId, Attempt);

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
    fn new(token: CancellationToken) -> Self {
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
    fn kill_group(&self) {
        if let Some(pgid) = self.pgid.get() {
            process::kill_group(*pgid);
        }
    }
}

struct RunningAttempt {
    slots: u32,
    control: Arc<AttemptControl>,
}

/// An assignment waiting for a free slot (prefetched).
struct QueuedAttempt {
    key: AttemptKey,
    spec: TaskSpec,
    control: Arc<AttemptControl>,
    emit: Emitter,
}

/// An attempt taken off the queue, to start or to report outside the lock.
type Dequeued = Vec<QueuedAttempt>;

/// Slots and credits. Invariants: `used <= total`, and
/// `used + queued_slots + window <= total + prefetch`, where `window` is
/// what this session granted and the coordinator has not used yet.
struct State {
    total: u32,
    /// The most prefetch allowed (configured).
    prefetch: u32,
    /// Average run time of the attempts that ended (EWMA), if any did.
    run_time: Option<Duration>,
    used: u32,
    /// Slots of the attempts waiting in `queued`.
    queued_slots: u32,
    window: u32,
    draining: bool,
    running: HashMap<AttemptKey, RunningAttempt>,
    /// Assigned, not started: FIFO, started as slots free.
    queued: VecDeque<QueuedAttempt>,
}

impl State {
    /// Prefetch in use now: enough to cover [`REFILL_TIME`] at the average
    /// run time, per slot, within the configured prefetch; none before an
    /// attempt has ended.
    fn prefetch_now(&self) -> u32 {
        let Some(run_time) = self.run_time else {
            return 0;
        };
        let per_slot = REFILL_TIME.as_nanos() / run_time.as_nanos().max(1) + 1;
        let wanted = u32::try_from(per_slot).unwrap_or(u32::MAX);
        wanted.saturating_mul(self.total).min(self.prefetch)
    }

    /// Attempts the node holds: running or queued.
    fn held(&self) -> usize {
        self.running.len() + self.queued.len()
    }

    /// Moves the queue's head attempts into `running` while their slots
    /// fit; answers them, to be spawned outside the lock.
    fn start_queued(&mut self) -> Dequeued {
        let mut ready = Vec::new();
        while let Some(head) = self.queued.front() {
            if self.used + head.spec.slots > self.total {
                break;
            }
            let Some(next) = self.queued.pop_front() else {
                break;
            };
            self.queued_slots = self.queued_slots.saturating_sub(next.spec.slots);
            self.used += next.spec.slots;
            self.running.insert(
                next.key,
                RunningAttempt {
                    slots: next.spec.slots,
                    control: next.control.clone(),
                },
            );
            ready.push(next);
        }
        ready
    }

    /// Empties the queue (its attempts never ran).
    fn take_queued(&mut self) -> Dequeued {
        self.queued_slots = 0;
        self.queued.drain(..).collect()
    }
}

struct Inner {
    handlers: HandlerRegistry,
    events: EventTx,
    tasks: TaskTracker,
    /// Parent of every attempt token: cancelled when the node is killed.
    kill: CancellationToken,
    /// Asked before starting an assignment.
    lease: Arc<Lease>,
    state: Mutex<State>,
    /// Number of attempts holding slots, for waiting until idle.
    running_count: watch::Sender<usize>,
    /// Told about every exec task's process group (see `reaper.rs`).
    reaper: Option<Reaper>,
}

/// Runs assignments. Cheap to clone (shared state).
#[derive(Clone)]
pub(crate) struct Executor {
    inner: Arc<Inner>,
}

impl Executor {
    pub(crate) fn new(
        handlers: HandlerRegistry,
        events: EventTx,
        tasks: TaskTracker,
        kill: CancellationToken,
        lease: Arc<Lease>,
        slots: u32,
        prefetch: u32,
    ) -> Self {
        Executor {
            inner: Arc::new(Inner {
                handlers,
                events,
                tasks,
                kill,
                lease,
                state: Mutex::new(State {
                    total: slots.max(1),
                    prefetch,
                    run_time: None,
                    used: 0,
                    queued_slots: 0,
                    window: 0,
                    draining: false,
                    running: HashMap::new(),
                    queued: VecDeque::new(),
                }),
                running_count: watch::Sender::new(0),
                reaper: None,
            }),
        }
    }

    /// Tells `reaper` about every exec task's process group. Call before
    /// the executor is shared.
    pub(crate) fn with_reaper(mut self, reaper: Option<Reaper>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.reaper = reaper;
        }
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No code panics while holding this lock; recover anyway.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Names of the handlers this node serves.
    pub(crate) fn handler_names(&self) -> Vec<String> {
        self.inner.handlers.names()
    }

    /// A new session starts with an empty credit window.
    pub(crate) fn reset_window(&self) {
        self.state().window = 0;
    }

    /// Credits to grant now so that `used + queued + window == total +
    /// prefetch`, or `None` (nothing free, or draining: a draining node
    /// never grants).
    pub(crate) fn take_grant(&self) -> Option<u32> {
        let mut state = self.state();
        if state.draining {
            return None;
        }
        let capacity = state.total.saturating_add(state.prefetch_now());
        let grant = capacity.saturating_sub(state.used + state.queued_slots + state.window);
        state.window += grant;
        (grant > 0).then_some(grant)
    }

    /// Stops granting and refuses new assignments. Queued attempts (never
    /// started) are reported `CANCELLED` at once, so the coordinator gives
    /// them to other nodes instead of waiting for this one's grace.
    pub(crate) fn set_draining(&self) {
        let dropped = {
            let mut state = self.state();
            state.draining = true;
            let dropped = state.take_queued();
            self.publish_held(&state);
            dropped
        };
        for queued in dropped {
            self.refuse(
                queued.emit,
                Outcome::Cancelled,
                "node is draining: returned before it started".into(),
            );
        }
    }

    fn publish_held(&self, state: &State) {
        self.inner.running_count.send_replace(state.held());
    }

    /// The attempts holding slots or queued for one, for `Register.running`
    /// after a reconnect (the coordinator keeps them assigned here).
    pub(crate) fn running_refs(&self) -> Vec<pb::AttemptRef> {
        let state = self.state();
        let mut refs: Vec<_> = state
            .running
            .keys()
            .chain(state.queued.iter().map(|q| &q.key))
            .map(|(task_id, attempt)| pb::AttemptRef {
                task_id: task_id.to_string(),
                attempt: attempt.0,
            })
            .collect();
        refs.sort_by(|a, b| a.task_id.cmp(&b.task_id).then(a.attempt.cmp(&b.attempt)));
        refs
    }

    /// Number of attempts holding slots.
    pub(crate) fn running(&self) -> usize {
        self.state().running.len()
    }

    /// Number of assigned attempts waiting for a slot.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.state().queued.len()
    }

    /// Frees the slots of an attempt whose `Finished` the session took,
    /// and starts the queued attempts that now fit.
    pub(crate) fn release(&self, key: AttemptKey) {
        let ready = {
            let mut state = self.state();
            if let Some(done) = state.running.remove(&key) {
                state.used = state.used.saturating_sub(done.slots);
            }
            let ready = state.start_queued();
            self.publish_held(&state);
            ready
        };
        for queued in ready {
            self.spawn_attempt(queued);
        }
    }

    /// Resolves once no attempt holds slots or waits for one.
    pub(crate) async fn wait_idle(&self) {
        let mut count = self.inner.running_count.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = count.wait_for(|n| *n == 0).await;
    }

    /// Starts one assignment, or reports at once why it cannot run.
    pub(crate) fn assign(&self, assignment: pb::Assignment) {
        let Ok(task_id) = assignment.task_id.parse::<TaskId>() else {
            warn!(task_id = %assignment.task_id, "assignment with an invalid task id; ignored");
            return;
        };
        let attempt = Attempt(assignment.attempt);
        let key = (task_id, attempt);
        let emit = Emitter::new(self.inner.events.clone(), task_id, attempt);
        let wire_slots = assignment.spec.as_ref().map_or(1, |spec| spec.slots.max(1));
        let spec = match assignment.spec.map(TaskSpec::try_from) {
            Some(Ok(spec)) => spec,
            Some(Err(err)) => {
                self.consume_window(wire_slots);
                return self.refuse(
                    emit,
                    Outcome::StartFailed,
                    format!("invalid task spec: {err}"),
                );
            }
            None => {
                self.consume_window(wire_slots);
                return self.refuse(
                    emit,
                    Outcome::StartFailed,
                    "assignment without a spec".into(),
                );
            }
        };
        let control = Arc::new(AttemptControl::new(self.inner.kill.child_token()));
        let ready = {
            let mut state = self.state();
            state.window = state.window.saturating_sub(spec.slots);
            if state.running.contains_key(&key) || state.queued.iter().any(|q| q.key == key) {
                warn!(%task_id, %attempt, "duplicate assignment; ignored");
                return;
            }
            if state.draining {
                drop(state);
                return self.refuse(emit, Outcome::Cancelled, "node is draining".into());
            }
            // Under the state lock: the lease's expiry marks it expired, then
            // stops every attempt under this lock, so an attempt inserted
            // here is either refused now or stopped by that.
            if let Some(silence) = self.inner.lease.overdue(Instant::now()) {
                drop(state);
                let why = lease::expired_message(silence);
                return self.refuse(emit, Outcome::Cancelled, why);
            }
            let capacity = state.total.saturating_add(state.prefetch);
            if spec.slots > state.total || state.used + state.queued_slots + spec.slots > capacity {
                let why = format!(
                    "node over capacity: task needs {} slots, {} of {} free, {} queued (prefetch {})",
                    spec.slots,
                    state.total - state.used,
                    state.total,
                    state.queued_slots,
                    state.prefetch
                );
                drop(state);
                warn!(%task_id, %attempt, "{why}");
                return self.refuse(emit, Outcome::Cancelled, why);
            }
            state.queued_slots += spec.slots;
            state.queued.push_back(QueuedAttempt {
                key,
                spec,
                control,
                emit,
            });
            let ready = state.start_queued();
            self.publish_held(&state);
            ready
        };
        for queued in ready {
            self.spawn_attempt(queued);
        }
    }

    /// Runs an attempt that was given its slots.
    fn spawn_attempt(&self, queued: QueuedAttempt) {
        let QueuedAttempt {
            key: (task_id, attempt),
            spec,
            control,
            emit,
        } = queued;
        let span = info_span!("attempt", %task_id, %attempt);
        let executor = self.clone();
        self.inner
            .tasks
            .spawn(async move { executor.run_attempt(spec, control, emit).await }.instrument(span));
    }

    /// An assignment used `slots` of the granted window, whether it runs or not.
    fn consume_window(&self, slots: u32) {
        let mut state = self.state();
        state.window = state.window.saturating_sub(slots);
    }

    /// Reports an assignment that never ran (its slots were never taken).
    fn refuse(&self, emit: Emitter, outcome: Outcome, error: String) {
        info!(task_id = %emit.task_id(), attempt = %emit.attempt(), %outcome, %error, "assignment refused");
        self.report(emit, finished(outcome, None, Bytes::new(), error));
    }

    /// Reports the `Finished` of an attempt that never ran.
    fn report(&self, emit: Emitter, done: pb::Finished) {
        // Queued right away when there is room, so a drain that stops the
        // node next still flushes it.
        if let Err(Some(done)) = emit.try_finished(done) {
            self.inner.tasks.spawn(async move {
                emit.finished(done).await;
            });
        }
    }

    /// Stops one attempt for `Cancel` (a queued one is reported at once,
    /// never started); an unknown attempt is ignored.
    pub(crate) fn cancel(&self, key: AttemptKey, reason: String) {
        let mut state = self.state();
        if let Some(running) = state.running.get(&key) {
            info!(task_id = %key.0, attempt = %key.1, %reason, "cancelling attempt");
            running.control.stop(StopReason::Cancelled(reason));
            return;
        }
        let Some(index) = state.queued.iter().position(|q| q.key == key) else {
            drop(state);
            debug!(task_id = %key.0, attempt = %key.1, "cancel for an unknown attempt; ignored");
            return;
        };
        let Some(queued) = state.queued.remove(index) else {
            return;
        };
        state.queued_slots = state.queued_slots.saturating_sub(queued.spec.slots);
        self.publish_held(&state);
        drop(state);
        info!(task_id = %key.0, attempt = %key.1, %reason, "cancelling queued attempt");
        if let Some(done) = stopped(StopReason::Cancelled(reason)) {
            self.report(queued.emit, done);
        }
    }

    /// Stops every attempt for `reason` (queued ones are reported without
    /// running, or dropped when killed); answers how many.
    pub(crate) fn stop_all(&self, reason: &StopReason) -> usize {
        let (count, dropped) = {
            let mut state = self.state();
            for running in state.running.values() {
                if *reason == StopReason::Killed {
                    running.control.kill_group();
                }
                running.control.stop(reason.clone());
            }
            let dropped = state.take_queued();
            self.publish_held(&state);
            (state.running.len() + dropped.len(), dropped)
        };
        for queued in dropped {
            if let Some(done) = stopped(reason.clone()) {
                self.report(queued.emit, done);
            }
        }
        count
    }

    /// Folds one attempt's run time into the average prefetch follows.
    fn record_run_time(&self, took: Duration) {
        let mut state = self.state();
        state.run_time = Some(match state.run_time {
            None => took,
            Some(average) => (average * 7 + took) / 8,
        });
    }

    async fn run_attempt(&self, spec: TaskSpec, control: Arc<AttemptControl>, emit: Emitter) {
        debug!(kind = spec.summary(), "attempt starting");
        let began = Instant::now();
        let work = async {
            match &spec.kind {
                TaskKind::Exec(exec_spec) => {
                    let reaper = self.inner.reaper.as_ref();
                    let end = process::run(exec_spec, &emit, &control.token, reaper, |pgid| {
                        let _ = control.pgid.set(pgid);
                    })
                    .await;
                    exec_finished(end, &control)
                }
                TaskKind::Call(call) => self.run_call(call, &emit, &control).await,
            }
        };
        let result = match spec.timeout {
            None => work.await,
            Some(limit) => {
                tokio::pin!(work);
                tokio::select! {
                    result = &mut work => result,
                    () = tokio::time::sleep(limit) => {
                        control.stop(StopReason::TimedOut(limit));
                        work.await
                    }
                }
            }
        };
        let Some(done) = result else {
            debug!("attempt killed with the node; nothing reported");
            return;
        };
        self.record_run_time(began.elapsed());
        let outcome = Outcome::try_from(done.outcome).map_or("?", Outcome::as_str);
        info!(outcome, exit_code = ?done.exit_code, error = %done.error, "attempt finished");
        emit.finished(done).await;
    }

    async fn run_call(
        &self,
        call: &CallSpec,
        emit: &Emitter,
        control: &AttemptControl,
    ) -> Option<pb::Finished> {
        let Some(service) = self.inner.handlers.get(&call.handler) else {
            let known = self.inner.handlers.names().join(", ");
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
            cancel: control.token.clone(),
            emit: emit.clone(),
        };
        let result = tokio::select! {
            result = service.oneshot(request) => result,
            () = control.token.cancelled() => return stopped(control.reason()),
        };
        match result {
            Ok(output) => Some(finished(Outcome::Succeeded, None, output, String::new())),
            Err(HandlerError::Cancelled) if control.token.is_cancelled() => {
                stopped(control.reason())
            }
            Err(err) => Some(finished(
                Outcome::Failed,
                None,
                Bytes::new(),
                err.to_string(),
            )),
        }
    }
}

fn exec_finished(end: ExecEnd, control: &AttemptControl) -> Option<pb::Finished> {
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
fn stopped(reason: StopReason) -> Option<pb::Finished> {
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

fn finished(
    outcome: Outcome,
    exit_code: Option<i32>,
    output: Bytes,
    error: String,
) -> pb::Finished {
    pb::Finished {
        outcome: outcome.into(),
        exit_code,
        output,
        error,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant as StdInstant;

    use weft_proto::pb::node_task_event::Body;

    use super::*;
    use crate::events::{self, EventRx};
    use crate::process::tests::assert_gone_soon;

    fn executor(slots: u32) -> (Executor, EventRx) {
        executor_with_lease(slots, Arc::new(Lease::new(None)))
    }

    fn executor_with_lease(slots: u32, lease: Arc<Lease>) -> (Executor, EventRx) {
        let (tx, rx) = events::channel();
        let executor = Executor::new(
            HandlerRegistry::with_builtins(),
            tx,
            TaskTracker::new(),
            CancellationToken::new(),
            lease,
            slots,
            0,
        );
        (executor, rx)
    }

    fn prefetching(slots: u32, prefetch: u32) -> (Executor, EventRx) {
        let (tx, rx) = events::channel();
        let executor = Executor::new(
            HandlerRegistry::with_builtins(),
            tx,
            TaskTracker::new(),
            CancellationToken::new(),
            Arc::new(Lease::new(None)),
            slots,
            prefetch,
        );
        (executor, rx)
    }

    #[tokio::test]
    async fn prefetched_attempts_wait_for_a_slot_and_never_overcommit() {
        let (executor, mut rx) = prefetching(1, 2);
        assert_eq!(
            executor.take_grant(),
            Some(1),
            "no prefetch before a run time is known"
        );
        let (first, first_key) = assignment(TaskSpec::call("noop", "1"));
        executor.assign(first);
        until_finished(&executor, &mut rx, first_key).await;
        // A noop is short: the whole prefetch is used now (slot + 2).
        assert_eq!(executor.take_grant(), Some(3));
        let (long, long_key) = assignment(TaskSpec::call("sleep", "1h"));
        let (queued, queued_key) = assignment(TaskSpec::call("noop", "2"));
        let (cancelled, cancelled_key) = assignment(TaskSpec::call("noop", "3"));
        executor.assign(long);
        executor.assign(queued);
        executor.assign(cancelled);
        assert_eq!((executor.running(), executor.queued()), (1, 2));
        let (over, over_key) = assignment(TaskSpec::call("noop", "4"));
        executor.assign(over);
        let (_, done) = until_finished(&executor, &mut rx, over_key).await;
        assert!(done.error.contains("over capacity"), "{}", done.error);
        // Cancelling a queued attempt reports it without running it.
        executor.cancel(cancelled_key, "by test".into());
        let (seen, done) = until_finished(&executor, &mut rx, cancelled_key).await;
        assert_eq!(
            (outcome(&done), done.error.as_str()),
            (Outcome::Cancelled, "cancelled: by test")
        );
        assert!(
            seen.iter()
                .all(|e| e.task_id != cancelled_key.0.to_string()),
            "never started: {seen:?}"
        );
        assert_eq!(
            executor.running_refs().len(),
            2,
            "running and queued listed"
        );
        executor.cancel(long_key, String::new());
        until_finished(&executor, &mut rx, long_key).await;
        // The slot freed: the queued one runs.
        let (seen, done) = until_finished(&executor, &mut rx, queued_key).await;
        assert!(matches!(
            seen.last().and_then(|e| e.body.as_ref()),
            Some(Body::Started(_))
        ));
        assert_eq!(outcome(&done), Outcome::Succeeded);
        assert_eq!((executor.running(), executor.queued()), (0, 0));
    }

    #[tokio::test]
    async fn draining_reports_queued_attempts_cancelled_at_once() {
        let (executor, mut rx) = prefetching(1, 1);
        let (warm, warm_key) = assignment(TaskSpec::call("noop", ""));
        executor.assign(warm);
        until_finished(&executor, &mut rx, warm_key).await;
        let (long, long_key) = assignment(TaskSpec::call("sleep", "1h"));
        let (queued, queued_key) = assignment(TaskSpec::call("noop", ""));
        executor.assign(long);
        executor.assign(queued);
        executor.set_draining();
        let (_, done) = until_finished(&executor, &mut rx, queued_key).await;
        assert_eq!(outcome(&done), Outcome::Cancelled);
        assert!(done.error.contains("before it started"), "{}", done.error);
        assert_eq!((executor.running(), executor.queued()), (1, 0));
        executor.stop_all(&StopReason::Drained(Duration::ZERO));
        until_finished(&executor, &mut rx, long_key).await;
    }

    fn assignment(spec: TaskSpec) -> (pb::Assignment, AttemptKey) {
        let task_id = TaskId::new();
        let wire = pb::Assignment {
            task_id: task_id.to_string(),
            attempt: 1,
            spec: Some(spec.into()),
        };
        (wire, (task_id, Attempt::FIRST))
    }

    /// Events until the `Finished` of `key`, which is released like the
    /// session would.
    async fn until_finished(
        executor: &Executor,
        rx: &mut EventRx,
        key: AttemptKey,
    ) -> (Vec<pb::NodeTaskEvent>, pb::Finished) {
        let mut seen = Vec::new();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("attempt finishes")
                .expect("channel open");
            let ours = event.task_id == key.0.to_string();
            if let (true, Some(Body::Finished(done))) = (ours, &event.body) {
                executor.release(key);
                return (seen, done.clone());
            }
            seen.push(event);
        }
    }

    fn outcome(done: &pb::Finished) -> Outcome {
        Outcome::try_from(done.outcome).unwrap()
    }

    #[tokio::test]
    async fn call_runs_its_handler_and_returns_the_output() {
        let (executor, mut rx) = executor(1);
        let (wire, key) = assignment(TaskSpec::call("sha256", "abc"));
        executor.assign(wire);
        let (seen, done) = until_finished(&executor, &mut rx, key).await;
        assert!(matches!(seen[0].body, Some(Body::Started(_))));
        assert_eq!(outcome(&done), Outcome::Succeeded);
        assert!(done.output.starts_with(b"ba7816bf"));
        assert_eq!(executor.running(), 0);
    }

    #[tokio::test]
    async fn unknown_handler_cannot_start_and_names_the_known_ones() {
        let (executor, mut rx) = executor(1);
        let (wire, key) = assignment(TaskSpec::call("nope", ""));
        executor.assign(wire);
        let (_, done) = until_finished(&executor, &mut rx, key).await;
        assert_eq!(outcome(&done), Outcome::StartFailed);
        assert!(
            done.error.contains("\"nope\"") && done.error.contains("sha256"),
            "{}",
            done.error
        );
    }

    #[tokio::test]
    async fn failures_report_exit_code_or_handler_error() {
        let (executor, mut rx) = executor(2);
        let (exit, exit_key) = assignment(TaskSpec::exec(["sh", "-c", "exit 3"]));
        let (fail, fail_key) = assignment(TaskSpec::call("fail", "broken"));
        executor.assign(exit);
        let (_, done) = until_finished(&executor, &mut rx, exit_key).await;
        assert_eq!((outcome(&done), done.exit_code), (Outcome::Failed, Some(3)));
        assert_eq!(done.error, "exited with code 3");
        executor.assign(fail);
        let (_, done) = until_finished(&executor, &mut rx, fail_key).await;
        assert_eq!(
            (outcome(&done), done.error.as_str()),
            (Outcome::Failed, "broken")
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group_and_reports_timed_out() {
        let (executor, mut rx) = executor(1);
        let spec = TaskSpec::exec(["sh", "-c", "sleep 100 & echo $!; wait"])
            .timeout(Duration::from_millis(300));
        let (wire, key) = assignment(spec);
        let start = StdInstant::now();
        executor.assign(wire);
        let (seen, done) = until_finished(&executor, &mut rx, key).await;
        assert_eq!(outcome(&done), Outcome::TimedOut);
        assert_eq!(done.exit_code, None);
        assert!(start.elapsed() < Duration::from_secs(3));
        let grandchild = seen
            .iter()
            .find_map(|e| match &e.body {
                Some(Body::Output(c)) => {
                    String::from_utf8_lossy(&c.data).trim().parse::<u32>().ok()
                }
                _ => None,
            })
            .expect("the script printed its background pid");
        assert_gone_soon(grandchild).await;
    }

    #[tokio::test]
    async fn handler_timeout_reports_timed_out() {
        let (executor, mut rx) = executor(1);
        let (wire, key) =
            assignment(TaskSpec::call("sleep", "1h").timeout(Duration::from_millis(50)));
        executor.assign(wire);
        let (_, done) = until_finished(&executor, &mut rx, key).await;
        assert_eq!(outcome(&done), Outcome::TimedOut);
    }

    #[tokio::test]
    async fn cancel_stops_exactly_that_attempt() {
        let (executor, mut rx) = executor(2);
        let (first, first_key) = assignment(TaskSpec::call("sleep", "1h"));
        let (second, second_key) = assignment(TaskSpec::call("sleep", "1h"));
        executor.assign(first);
        executor.assign(second);
        executor.cancel(first_key, "by test".into());
        let (_, done) = until_finished(&executor, &mut rx, first_key).await;
        assert_eq!(
            (outcome(&done), done.error.as_str()),
            (Outcome::Cancelled, "cancelled: by test")
        );
        assert_eq!(executor.running_refs().len(), 1);
        assert_eq!(executor.running_refs()[0].task_id, second_key.0.to_string());
        executor.cancel((TaskId::new(), Attempt::FIRST), "unknown".into()); // ignored
        executor.stop_all(&StopReason::Cancelled(String::new()));
        let (_, done) = until_finished(&executor, &mut rx, second_key).await;
        assert_eq!(outcome(&done), Outcome::Cancelled);
    }

    #[tokio::test]
    async fn slots_are_never_overcommitted_and_credits_top_up() {
        let (executor, mut rx) = executor(2);
        assert_eq!(executor.take_grant(), Some(2));
        assert_eq!(executor.take_grant(), None);
        let (big, big_key) = assignment(TaskSpec::call("sleep", "1h").slots(2));
        executor.assign(big);
        let (over, over_key) = assignment(TaskSpec::call("noop", ""));
        executor.assign(over);
        let (_, done) = until_finished(&executor, &mut rx, over_key).await;
        assert_eq!(outcome(&done), Outcome::Cancelled);
        assert!(done.error.contains("over capacity"), "{}", done.error);
        assert_eq!(executor.take_grant(), None, "both slots are in use");
        executor.cancel(big_key, String::new());
        until_finished(&executor, &mut rx, big_key).await;
        assert_eq!(executor.take_grant(), Some(2));
        executor.set_draining();
        executor.reset_window();
        assert_eq!(executor.take_grant(), None, "a draining node never grants");
    }

    #[tokio::test]
    async fn invalid_spec_cannot_start() {
        let (executor, mut rx) = executor(1);
        let task_id = TaskId::new();
        executor.assign(pb::Assignment {
            task_id: task_id.to_string(),
            attempt: 2,
            spec: Some(pb::TaskSpec::default()),
        });
        let (_, done) = until_finished(&executor, &mut rx, (task_id, Attempt(2))).await;
        assert_eq!(outcome(&done), Outcome::StartFailed);
        assert!(done.error.contains("invalid task spec"), "{}", done.error);
    }

    #[tokio::test]
    async fn killed_attempts_report_nothing_and_leave_no_process() {
        let (executor, mut rx) = executor(1);
        let (wire, _key) = assignment(TaskSpec::exec(["sh", "-c", "sleep 100 & echo $!; wait"]));
        executor.assign(wire);
        let grandchild = loop {
            let event = rx.recv().await.unwrap();
            if let Some(Body::Output(c)) = event.body {
                break String::from_utf8_lossy(&c.data)
                    .trim()
                    .parse::<u32>()
                    .unwrap();
            }
        };
        executor.stop_all(&StopReason::Killed);
        assert_gone_soon(grandchild).await;
        executor.inner.tasks.close();
        tokio::time::timeout(Duration::from_secs(5), executor.inner.tasks.wait())
            .await
            .unwrap();
        while let Ok(event) = rx.try_recv() {
            assert!(
                !matches!(event.body, Some(Body::Finished(_))),
                "killed attempt reported {event:?}"
            );
        }
    }

    #[tokio::test]
    async fn lease_expiry_stops_running_attempts_and_refuses_new_ones() {
        let lease = Arc::new(Lease::new(Some(Duration::from_millis(200))));
        let (executor, mut rx) = executor_with_lease(2, lease.clone());
        lease.begin(
            Duration::from_secs(5),
            Duration::from_secs(1),
            Instant::now(),
        );
        let (running, running_key) = assignment(TaskSpec::call("sleep", "1h"));
        executor.assign(running);
        let silence = lease
            .check(Instant::now() + Duration::from_secs(3))
            .expect("the lease ran out");
        executor.stop_all(&StopReason::LeaseExpired(silence));
        let (_, done) = until_finished(&executor, &mut rx, running_key).await;
        assert_eq!(outcome(&done), Outcome::Cancelled);
        assert!(
            done.error
                .starts_with("lease expired: coordinator unreachable for 3."),
            "{}",
            done.error
        );
        // An Assign read after the expiry (it raced the disconnect) never runs.
        let (late, late_key) = assignment(TaskSpec::call("sleep", "1h"));
        executor.assign(late);
        let (seen, done) = until_finished(&executor, &mut rx, late_key).await;
        assert!(seen.is_empty(), "not even Started: {seen:?}");
        assert_eq!(outcome(&done), Outcome::Cancelled);
        assert!(done.error.starts_with("lease expired"), "{}", done.error);
        assert_eq!(executor.running(), 0);
    }
}
