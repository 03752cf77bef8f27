//! Runs assignments: takes them into the slot accounting (`slots.rs`),
//! spawns each started attempt as one tracked task with its own
//! cancellation token (so `Cancel` stops exactly that attempt), and reports
//! the attempts that never run (refused, cancelled or drained while queued,
//! or exec tasks its exec policy refuses) `CANCELLED` or `START_FAILED` at
//! once, without a `Started`.
//!
//! This is the orchestration around [`Slots`], which decides, and
//! `attempt.rs`, which runs one attempt. An attempt holds its slots until
//! the session has taken its `Finished` event off the event channel
//! ([`Executor::release`]), so an attempt whose `Finished` is still
//! buffered is reported as running after a reconnect. No network I/O here:
//! events go to the channel, the session sends them.
//!
//! An assignment is only started while the node's lease holds (asked under
//! the same lock that stopping every attempt takes), so an `Assign` that
//! races the lease's expiry is refused rather than started on a node the
//! coordinator already gave up on.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt as _;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use weft_proto::{ExecPolicy, Outcome, TaskKind, TaskSpec};

use crate::attempt::{self, Assignment, AttemptControl, StopReason};
use crate::events::{AttemptKey, Emitter, EventTx, Finished};
use crate::handlers::{HandlerRegistry, panic_message};
use crate::lease::{self, Lease};
use crate::metrics::NodeMetrics;
use crate::reaper::Reaper;
use crate::slots::{self, Refusal};

/// What starting a queued attempt takes.
struct Work {
    spec: Box<TaskSpec>,
    emit: Emitter,
    parents: Arc<[crate::handlers::ParentResult]>,
}

type Slots = slots::Slots<Arc<AttemptControl>, Work>;
type Queued = slots::Queued<Arc<AttemptControl>, Work>;

struct Inner {
    handlers: HandlerRegistry,
    events: EventTx,
    tasks: TaskTracker,
    /// Parent of every attempt token: cancelled when the node is killed.
    kill: CancellationToken,
    /// Asked before starting an assignment.
    lease: Arc<Lease>,
    slots: Mutex<Slots>,
    /// Number of attempts holding slots, for waiting until idle.
    running_count: watch::Sender<usize>,
    /// Told about every exec task's process group (see `reaper.rs`).
    reaper: Option<Reaper>,
    /// Attempts started and ended, and their run times.
    metrics: Arc<NodeMetrics>,
    /// Which exec tasks this node runs. The coordinator matches tasks to
    /// it already; this refuses (`START_FAILED`, never run) what an older
    /// or wrong coordinator assigns anyway.
    exec: ExecPolicy,
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
                slots: Mutex::new(Slots::new(slots, prefetch)),
                running_count: watch::Sender::new(0),
                reaper: None,
                exec: ExecPolicy::Allow,
                metrics: Arc::default(),
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

    /// Counts attempts into `metrics`. Call before the executor is shared.
    pub(crate) fn with_metrics(mut self, metrics: Arc<NodeMetrics>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.metrics = metrics;
        }
        self
    }

    /// The slots as a scrape shows them: (slots used, running, queued,
    /// draining).
    pub(crate) fn gauges(&self) -> (u32, usize, usize, bool) {
        let slots = self.slots();
        let (used, draining) = slots.used();
        (used, slots.running(), slots.queued(), draining)
    }

    /// Runs only the exec tasks `exec` allows (the default allows all).
    /// Call before the executor is shared.
    pub(crate) fn with_exec(mut self, exec: ExecPolicy) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.exec = exec;
        }
        self
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        // No code panics while holding this lock; recover anyway.
        self.inner
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Names of the handlers this node serves.
    pub(crate) fn handler_names(&self) -> Vec<String> {
        self.inner.handlers.names()
    }

    /// A new session starts with an empty credit window.
    pub(crate) fn reset_window(&self) {
        self.slots().reset_window();
    }

    /// Credits to grant now (see [`Slots::take_grant`]); `None` when
    /// nothing is free or the node drains.
    pub(crate) fn take_grant(&self) -> Option<u32> {
        self.slots().take_grant()
    }

    /// Stops granting and refuses new assignments. Queued attempts (never
    /// started) are reported `CANCELLED` at once, so the coordinator gives
    /// them to other nodes instead of waiting for this one's grace.
    pub(crate) fn set_draining(&self) {
        let dropped = {
            let mut slots = self.slots();
            let dropped = slots.set_draining();
            self.publish_held(&slots);
            dropped
        };
        for queued in dropped {
            self.refuse(
                queued.work.emit,
                Outcome::Cancelled,
                "node is draining: returned before it started".into(),
            );
        }
    }

    /// Keeps the count of attempts held up to date for [`wait_idle`],
    /// waking its waiters only when the count reaches zero: what they
    /// wait for. Every assignment and release changes the count, and
    /// waking at each would take the channel's lock for nothing.
    ///
    /// [`wait_idle`]: Self::wait_idle
    fn publish_held(&self, slots: &Slots) {
        let held = slots.held();
        self.inner.running_count.send_if_modified(|count| {
            let reached_zero = held == 0 && *count != 0;
            *count = held;
            reached_zero
        });
    }

    /// The attempts holding slots or queued for one, sorted, for
    /// `Register.running` after a reconnect (the coordinator keeps them
    /// assigned here).
    pub(crate) fn running_keys(&self) -> Vec<AttemptKey> {
        self.slots().keys()
    }

    /// Whether `key` is running or queued on this node.
    pub(crate) fn holds(&self, key: AttemptKey) -> bool {
        self.slots().holds(key)
    }

    /// Number of attempts holding slots.
    pub(crate) fn running(&self) -> usize {
        self.slots().running()
    }

    /// Number of assigned attempts waiting for a slot.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.slots().queued()
    }

    /// Frees the slots of an attempt whose `Finished` the session took,
    /// and starts the queued attempts that now fit.
    pub(crate) fn release(&self, key: AttemptKey) {
        let ready = {
            let mut slots = self.slots();
            let ready = slots.release(key);
            self.publish_held(&slots);
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
    pub(crate) fn assign(&self, assignment: Assignment) {
        let Assignment { key, spec, parents } = assignment;
        let (task_id, attempt) = key;
        // A repeat of an attempt held here is a duplicate whatever its
        // spec: refusing it would report (and free the slots of) the
        // attempt that runs.
        {
            let mut slots = self.slots();
            if slots.holds(key) {
                let wanted = spec
                    .as_ref()
                    .map_or_else(|invalid| invalid.slots, |spec| spec.slots);
                slots.consume_window(wanted);
                drop(slots);
                warn!(%task_id, %attempt, "duplicate assignment; ignored");
                return;
            }
        }
        let emit = Emitter::new(self.inner.events.clone(), task_id, attempt);
        let spec = match spec {
            Ok(spec) => spec,
            Err(invalid) => {
                self.slots().consume_window(invalid.slots);
                return self.refuse(emit, Outcome::StartFailed, invalid.error);
            }
        };
        if let TaskKind::Exec(exec) = &spec.kind
            && let Some(why) = self.inner.exec.refusal(exec, spec.secret_env.names())
        {
            warn!(%task_id, %attempt, "{why}");
            self.slots().consume_window(spec.slots);
            return self.refuse(emit, Outcome::StartFailed, why);
        }
        let control = Arc::new(AttemptControl::new(self.inner.kill.child_token()));
        let queued = Queued {
            key,
            slots: spec.slots,
            control,
            work: Work {
                spec,
                emit,
                parents,
            },
        };
        let taken = {
            let mut slots = self.slots();
            // Under the slots lock: the lease's expiry marks it expired,
            // then stops every attempt under this lock, so an attempt taken
            // here is either refused now or stopped by that.
            let taken = slots.assign(queued, || self.inner.lease.overdue(Instant::now()));
            if taken.is_ok() {
                self.publish_held(&slots);
            }
            taken
        };
        match taken {
            Ok(ready) => {
                for queued in ready {
                    self.spawn_attempt(queued);
                }
            }
            Err((Refusal::Duplicate, _)) => {
                warn!(%task_id, %attempt, "duplicate assignment; ignored");
            }
            Err((Refusal::Draining, queued)) => {
                self.refuse(
                    queued.work.emit,
                    Outcome::Cancelled,
                    "node is draining".into(),
                );
            }
            Err((Refusal::LeaseExpired(silence), queued)) => {
                let why = lease::expired_message(silence);
                self.refuse(queued.work.emit, Outcome::Cancelled, why);
            }
            Err((over @ Refusal::OverCapacity { .. }, queued)) => {
                let why = over.to_string();
                warn!(%task_id, %attempt, "{why}");
                self.refuse(queued.work.emit, Outcome::Cancelled, why);
            }
        }
    }

    /// Runs an attempt that was given its slots.
    fn spawn_attempt(&self, queued: Queued) {
        let Queued {
            key: (task_id, attempt),
            control,
            work:
                Work {
                    spec,
                    emit,
                    parents,
                },
            ..
        } = queued;
        let span = info_span!("attempt", %task_id, %attempt);
        let executor = self.clone();
        let run = async move {
            let began = Instant::now();
            let inner = &executor.inner;
            inner.metrics.attempt_started();
            // Boxed: the attempt's future is large (it holds the state of
            // every kind of work it may run), and this task's future is
            // moved whole into the runtime at spawn; boxed, it is moved
            // once, into its box, when the task first runs.
            let ran = Box::pin(attempt::run(
                &spec,
                &parents,
                &control,
                &emit,
                &inner.handlers,
                inner.reaper.as_ref(),
            ));
            // A panic anywhere in the attempt still ends it: its group is
            // killed and it reports a failure, which frees its slot.
            let done = match AssertUnwindSafe(ran).catch_unwind().await {
                Ok(Some(done)) => done,
                Ok(None) => {
                    debug!("attempt killed with the node; nothing reported");
                    return;
                }
                Err(payload) => {
                    control.kill_group();
                    let error = format!("attempt panicked: {}", panic_message(payload));
                    warn!(%error, "attempt panicked");
                    attempt::finished(Outcome::Failed, None, Bytes::new(), error)
                }
            };
            executor.record_run_time(began.elapsed());
            inner.metrics.attempt_finished(done.outcome);
            attempt::report(&emit, done).await;
        };
        self.inner.tasks.spawn(run.instrument(span));
    }

    /// Reports an assignment that never ran (its slots were never taken).
    fn refuse(&self, emit: Emitter, outcome: Outcome, error: String) {
        info!(task_id = %emit.task_id(), attempt = %emit.attempt(), %outcome, %error, "assignment refused");
        self.report(emit, attempt::finished(outcome, None, Bytes::new(), error));
    }

    /// Reports the `Finished` of an attempt that never ran.
    fn report(&self, emit: Emitter, done: Finished) {
        self.inner.metrics.attempt_finished(done.outcome);
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
        let mut slots = self.slots();
        if let Some(control) = slots.control(key) {
            info!(task_id = %key.0, attempt = %key.1, %reason, "cancelling attempt");
            control.stop(StopReason::Cancelled(reason));
            return;
        }
        let Some(queued) = slots.dequeue(key) else {
            drop(slots);
            debug!(task_id = %key.0, attempt = %key.1, "cancel for an unknown attempt; ignored");
            return;
        };
        self.publish_held(&slots);
        drop(slots);
        info!(task_id = %key.0, attempt = %key.1, %reason, "cancelling queued attempt");
        if let Some(done) = attempt::stopped(StopReason::Cancelled(reason)) {
            self.report(queued.work.emit, done);
        }
    }

    /// Stops every attempt for `reason` (queued ones are reported without
    /// running, or dropped when killed); answers how many.
    pub(crate) fn stop_all(&self, reason: &StopReason) -> usize {
        let (count, dropped) = {
            let mut slots = self.slots();
            for control in slots.controls() {
                if *reason == StopReason::Killed {
                    control.kill_group();
                }
                control.stop(reason.clone());
            }
            let dropped = slots.take_queued();
            self.publish_held(&slots);
            (slots.running() + dropped.len(), dropped)
        };
        for queued in dropped {
            if let Some(done) = attempt::stopped(reason.clone()) {
                self.report(queued.work.emit, done);
            }
        }
        count
    }

    /// Folds one attempt's run time into the average prefetch follows.
    fn record_run_time(&self, took: Duration) {
        self.inner.metrics.attempt_ran(took);
        self.slots().record_run_time(took);
    }
}

#[cfg(test)]
mod tests;
