//! The one task that owns the [`Scheduler`].
//!
//! It drains its inbox in batches (wait for one command, then take what is
//! already there, up to `max_batch`), applies them to the scheduler, writes
//! the batch's records in ONE store commit, and only then answers callers,
//! sends node sessions their messages and publishes task events to
//! watchers. Ticks (heartbeat deadlines, retry backoff) run at the
//! scheduler's next wakeup; retention sweeps between commits.
//!
//! Replies that read the scheduler (`ListNodes`, `ClusterInfo`) read it at
//! the end of their own batch. Reads (`Get`, `List`, watch history) never
//! pass through here: services read the store on the blocking pool
//! themselves, and only ask the driver for what the scheduler alone knows
//! (`pending_reason`).
//!
//! Layout:
//! - `inbox` — [`Command`], [`Handle`]: what services send and get back.
//! - `commit` — the pipelined group commit: one commit in flight, each
//!   batch's effects held until its commit returned, handed back in order.
//! - `sessions` — the fan-out to node sessions.
//! - `watch` — watchers and `WaitMany` waiters: registry, publishing, and
//!   the streams that resume from the store.
//! - `retention` — the sweep of old final tasks.
//!
//! This file is the run loop and its stages (prepare a batch, start its
//! commit, await the commit in flight, release a committed batch's
//! effects), what a batch holds back (`Held`, which the pipeline carries
//! without looking at) and what each command does to the scheduler; no I/O of its own
//! beyond handing batches to the pipeline.

mod commit;
mod inbox;
mod retention;
mod sessions;
#[cfg(test)]
mod tests;
mod watch;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use weft_proto::{TaskId, TaskSpec};

use crate::Failure;
use crate::config::CoordinatorConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::scheduler::{
    ClusterStats, Effects, NodeInfo, NodeOut, NodeRegistration, Now, Scheduler, SessionId,
};
use crate::store::{Store, StoreError};
use commit::{Batch, Committed, Pipeline, Reply, Started};
#[cfg(test)]
pub(crate) use inbox::CancelBatch;
pub(crate) use inbox::{Command, Handle, InFlight, NodeTx, ToNode, Unapplied};
use retention::Retention;
use sessions::Sessions;
use watch::Watchers;
pub(crate) use watch::{EventFeed, FinalFeed, follow, wait_final};

/// A batch's effects, held back in the commit pipeline until its commit
/// returned.
#[derive(Default)]
struct Held {
    /// Messages per node session.
    nodes: BTreeMap<SessionId, NodeOut>,
    /// Sessions to close.
    disconnect: Vec<SessionId>,
    /// Callers to answer.
    replies: Vec<Reply>,
}

impl Held {
    /// Answers every caller with `err`; nothing else leaves.
    fn refuse(self, err: &StoreError) {
        for reply in self.replies {
            reply(Some(err));
        }
    }
}

/// Reads the scheduler as of the end of its batch, before the next batch
/// is applied; the answer then waits for the commit like any [`Reply`].
type BatchRead = Box<dyn FnOnce(&Scheduler) -> Reply + Send>;

/// The driver task's state.
pub(crate) struct Driver {
    scheduler: Scheduler,
    store: Arc<dyn Store>,
    inbox: mpsc::Receiver<Command>,
    config: Arc<CoordinatorConfig>,
    pipeline: Pipeline<Held>,
    sessions: Sessions,
    watchers: Watchers,
    retention: Retention,
    /// The latest Submit's job id: the next one follows it.
    last_job: u128,
    started: Instant,
    /// Where the scheduler's counts go once per batch.
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    /// Set (before `cancel`) when a commit failed, so whoever holds the
    /// coordinator learns why it stopped.
    failure: Arc<OnceLock<Failure>>,
    /// Trace export, when on: each committed batch's records go there.
    trace: Option<crate::trace::Export>,
}

/// Makes the driver and the handle services use to reach it.
pub(crate) fn new(
    scheduler: Scheduler,
    store: Arc<dyn Store>,
    config: Arc<CoordinatorConfig>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) -> (Driver, Handle) {
    let (handle, inbox) = Handle::new(
        config.max_batch.max(64) * 4,
        Arc::clone(&store),
        Arc::clone(&config),
        Arc::clone(&metrics),
        cancel.clone(),
        tasks,
    );
    let driver = Driver {
        scheduler,
        pipeline: Pipeline::new(Arc::clone(&store), Arc::clone(&metrics)),
        metrics,
        store,
        inbox,
        sessions: Sessions::default(),
        watchers: Watchers::new(config.watch_buffer),
        retention: Retention::new(config.retention),
        config,
        last_job: 0,
        started: Instant::now(),
        cancel,
        failure: Arc::new(OnceLock::new()),
        trace: None,
    };
    (driver, handle)
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        wall: SystemTime::now(),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A reply that does not depend on the commit's result.
fn answer<T: Send + 'static>(reply: oneshot::Sender<T>, value: T) -> Reply {
    Box::new(move |_| {
        let _ = reply.send(value);
    })
}

/// A reply that becomes the store's error when the commit failed.
fn answer_committed<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, Error>>,
    result: Result<T, Error>,
) -> Reply {
    Box::new(move |failed| {
        let result = match failed {
            Some(err) => Err(Error::Store(err.clone())),
            None => result,
        };
        let _ = reply.send(result);
    })
}

impl Driver {
    /// Says why it stopped by itself (a failed commit) in `failure`, which
    /// others (the database lease's watchdog, started before the driver)
    /// may set too.
    pub fn share_failure(&mut self, failure: Arc<OnceLock<Failure>>) {
        self.failure = failure;
    }

    /// Hands every committed batch to `export` from now on.
    pub fn export_traces(&mut self, export: crate::trace::Export) {
        self.trace = Some(export);
    }

    /// Runs until the coordinator shuts down, or a commit fails.
    ///
    /// Commits are pipelined: while batch N's commit runs on the blocking
    /// pool, batch N+1 is applied to the scheduler; N's effects (replies,
    /// node messages, published events) leave only after N's commit
    /// returns, and batches are committed and released in order.
    #[tracing::instrument(name = "driver", skip_all)]
    pub async fn run(mut self) {
        let max_batch = self.config.max_batch.max(1);
        let mut commands = Vec::with_capacity(max_batch);
        // Anything restore produced (requeues) is committed before serving.
        let batch = self.prepare(&mut commands);
        if self.start_commit(batch).await {
            self.await_commit().await;
        }
        loop {
            let wake = self.scheduler.next_wakeup();
            let busy = self.pipeline.is_busy();
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                // Before the inbox: under a steady load the inbox is never
                // empty when polled, and a sweep after it would never run.
                // A sweep puts the next one at least 10 ms ahead, so it
                // cannot starve the inbox in turn.
                _ = sleep_until(self.retention.next_sweep()) => {
                    if self.await_commit().await {
                        self.retention.sweep(&self.store, &mut self.scheduler).await;
                    }
                    continue;
                }
                received = self.inbox.recv_many(&mut commands, max_batch) => {
                    if received == 0 {
                        break;
                    }
                }
                committed = self.pipeline.returned(), if busy => {
                    self.release_effects(committed);
                    continue;
                }
                _ = sleep_until(wake) => {}
            }
            let batch = self.prepare(&mut commands);
            if !self.start_commit(batch).await {
                break;
            }
        }
        self.await_commit().await;
        self.sessions.close_all();
        tracing::debug!("driver stopped");
    }

    /// Applies a batch of commands (and a tick) to the scheduler and takes
    /// what it produced: the records to commit and the effects they hold.
    fn prepare(&mut self, commands: &mut Vec<Command>) -> Batch<Held> {
        let now = now();
        let mut replies: Vec<Reply> = Vec::new();
        let mut reads: Vec<BatchRead> = Vec::new();
        for command in commands.drain(..) {
            self.apply(command, now, &mut replies, &mut reads);
        }
        // After the commands, not before: they may have waited in the inbox
        // (a slow commit, a long sweep), and a node's heartbeat or `Started`
        // among them is news as of `now`. Ticking first would find every
        // node silent past the heartbeat timeout, or its attempts unstarted
        // past the start timeout, with the proof in hand. What the tick makes
        // ready is still dispatched in this batch (`take_effects`).
        self.scheduler.tick(now);
        let Effects {
            records,
            nodes,
            disconnect,
            ..
        } = self.scheduler.take_effects(now);
        // Replies that read the scheduler read it now, as of this batch.
        replies.extend(reads.into_iter().map(|read| read(&self.scheduler)));
        // Once per batch, before its commit: a reply that leaves after the
        // commit finds the metrics already counting its batch.
        self.metrics.set_gauges(&self.scheduler.gauges(now.instant));
        self.metrics
            .set_rate_tokens(self.scheduler.rate_tokens(now.instant));
        Batch {
            records,
            held: Held {
                nodes,
                disconnect,
                replies,
            },
        }
    }

    /// Hands a prepared batch to the pipeline and releases what it hands
    /// back. Returns false when a commit failed (the coordinator stops).
    async fn start_commit(&mut self, batch: Batch<Held>) -> bool {
        match self.pipeline.start(batch).await {
            Started::Done(done) => {
                let mut ok = true;
                for committed in done.into_iter().flatten() {
                    ok &= self.release_effects(committed);
                }
                ok
            }
            Started::AfterFailure { failed, refused } => {
                // Told as what it met: a full disk is a full disk.
                let message = "an earlier commit failed".to_owned();
                let err = match &failed.result {
                    Err(StoreError::DiskFull { .. }) => StoreError::DiskFull {
                        op: "committing",
                        message,
                    },
                    _ => StoreError::Backend {
                        op: "committing",
                        message,
                    },
                };
                self.release_effects(failed);
                refused.refuse(&err);
                false
            }
        }
    }

    /// Waits for the commit in flight (if any) and releases its effects.
    /// Returns false when it failed.
    async fn await_commit(&mut self) -> bool {
        match self.pipeline.flush().await {
            Some(committed) => self.release_effects(committed),
            None => true,
        }
    }

    /// Lets a committed batch's effects leave: replies, node messages,
    /// events for watchers, closed sessions. On a failed commit, fails the
    /// replies, sends nothing else and stops the coordinator.
    fn release_effects(&mut self, committed: Committed<Held>) -> bool {
        let Committed {
            held,
            records,
            result,
            ran,
        } = committed;
        if let Err(err) = &result {
            // The scheduler already moved on from what the store refused;
            // carrying on would record later events against a history the
            // store does not have. Stop, so a restart reloads what was
            // committed (nothing acknowledged is lost: this batch's callers
            // get the error).
            tracing::error!(error = %err, "store commit failed; stopping the coordinator");
            let failure = match err {
                StoreError::LostDatabase { message, .. } => Failure::LostDatabase(message.clone()),
                _ => Failure::Commit(err.clone()),
            };
            let _ = self.failure.set(failure);
            self.cancel.cancel();
            held.refuse(err);
            return false;
        }
        for reply in held.replies {
            reply(None);
        }
        for (session, out) in held.nodes {
            self.sessions.send(session, out);
        }
        self.watchers.publish(&records);
        if let Some(trace) = &self.trace {
            trace.committed(crate::trace::CommittedBatch {
                records,
                commit: ran,
                released: SystemTime::now(),
            });
        } else {
            self.scheduler.recycle_records(records);
        }
        for session in held.disconnect {
            if self.scheduler.is_revoked_session(session) {
                self.sessions.close_with(session, ToNode::Revoked);
            } else {
                self.sessions.close(session);
            }
        }
        true
    }

    /// Applies one command. Replies that must wait for the commit go to
    /// `replies`; those that read the scheduler at the end of the batch go
    /// to `reads`.
    fn apply(
        &mut self,
        command: Command,
        now: Now,
        replies: &mut Vec<Reply>,
        reads: &mut Vec<BatchRead>,
    ) {
        match command {
            Command::Submit { specs, reply } => {
                let known = crate::scheduler::graph::KnownParents::new();
                replies.push(self.submit(specs, &known, reply, now));
            }
            Command::SubmitGraph {
                specs,
                known,
                reply,
            } => replies.push(self.submit(specs, &known, reply, now)),
            Command::CancelMany { ids, reason, reply } => {
                let live = self.scheduler.cancel_many(&ids, &reason, now);
                let live = u32::try_from(live).unwrap_or(u32::MAX);
                replies.push(answer_committed(reply, Ok(live)));
            }
            Command::Waiting { ids, reply } => {
                let waiting = ids.iter().map(|id| self.scheduler.waiting(*id)).collect();
                let _ = reply.send(waiting);
            }
            Command::CreateSchedule { parsed, reply } => {
                let result = self.scheduler.create_schedule(*parsed, now);
                replies.push(answer_committed(reply, result));
            }
            Command::ListSchedules {
                after,
                limit,
                reply,
            } => {
                reads.push(Box::new(move |scheduler| {
                    let page = scheduler.list_schedules(
                        after.as_deref(),
                        limit,
                        crate::scheduler::cron::LIST_PAGE_BYTES,
                    );
                    answer(reply, page)
                }));
            }
            Command::PauseSchedule {
                name,
                paused,
                reply,
            } => {
                let result = self.scheduler.pause_schedule(&name, paused, now);
                replies.push(answer_committed(reply, result));
            }
            Command::DeleteSchedule { name, reply } => {
                let result = self.scheduler.delete_schedule(&name, now);
                replies.push(answer_committed(reply, result));
            }
            Command::PendingReasons { ids, reply } => {
                let reasons = ids
                    .iter()
                    .map(|id| self.scheduler.pending_reason(*id))
                    .collect();
                let _ = reply.send(reasons);
            }
            Command::Cancel { id, reason, reply } => {
                let live = self.scheduler.cancel(id, &reason, now);
                replies.push(answer_committed(reply, Ok(live)));
            }
            Command::Watch { id, budget, reply } => {
                replies.push(self.watchers.watch(&self.scheduler, id, budget, reply));
            }
            Command::WaitMany { ids, budget, reply } => {
                replies.push(self.watchers.wait_many(&self.scheduler, ids, budget, reply));
            }
            Command::Register {
                session,
                registration,
                tx,
                token,
                reply,
            } => {
                if let Some(reply) = self.register(session, registration, tx, token, reply, now) {
                    replies.push(reply);
                }
            }
            Command::Credits { session, grant } => self.scheduler.credits(session, grant, now),
            Command::Heartbeat { session } => self.scheduler.heartbeat(session, now),
            Command::NodeEvents {
                session,
                events,
                in_flight,
            } => {
                self.scheduler.node_events(session, events, now);
                // Applied: no longer counted as its session's.
                drop(in_flight);
            }
            Command::Draining { session } => self.scheduler.node_draining(session, now),
            Command::NodeGone { session } => self.scheduler.node_gone(session, now),
            Command::ListNodes { reply } => reads.push(list_nodes(reply, now.instant)),
            Command::DrainNode { node, grace, reply } => {
                let result = self.scheduler.drain_node(&node, grace, now.instant);
                replies.push(answer(reply, result));
            }
            Command::FindNode { selector, reply } => {
                let _ = reply.send(self.scheduler.find_node(&selector));
            }
            Command::RevokeNode { node_id, reply } => {
                let result = self.scheduler.revoke_node(node_id, now);
                replies.push(answer_committed(reply, Ok(result)));
            }
            Command::ClusterInfo { reply } => {
                let uptime = now.instant.saturating_duration_since(self.started);
                reads.push(cluster_info(reply, uptime));
            }
            Command::SetLimit { limit, reply } => {
                self.scheduler.set_limit(limit);
                replies.push(answer_committed(reply, Ok(())));
            }
            Command::DeleteLimit { name, kind, reply } => {
                let result = self.scheduler.delete_limit(&name, &kind);
                replies.push(answer_committed(reply, result));
            }
            Command::ListLimits { reply } => {
                let instant = now.instant;
                reads.push(Box::new(move |scheduler| {
                    answer(reply, scheduler.limits(instant))
                }));
            }
        }
    }

    /// [`Command::Submit`]: gives the specs ids and queues them, all or
    /// nothing.
    /// The ids form one job: contiguous, the first is the job's id (see
    /// `scheduler/graph.rs`).
    fn submit(
        &mut self,
        specs: Vec<TaskSpec>,
        known: &crate::scheduler::graph::KnownParents,
        reply: oneshot::Sender<Result<Vec<TaskId>, Error>>,
        now: Now,
    ) -> Reply {
        let fresh = ulid::Ulid::new().0;
        let ids = crate::scheduler::graph::submit_ids(fresh, &mut self.last_job, specs.len());
        let batch = ids.iter().copied().zip(specs).collect();
        let result = self.scheduler.submit_graph(batch, known, now).map(|()| ids);
        answer_committed(reply, result)
    }

    /// [`Command::Register`]: admits the node (or refuses it: nothing is
    /// sent on its stream), opens the session (`Registered` goes out at
    /// once, first on its stream) and registers the node. `None` when the
    /// node was refused or the session could not even take `Registered`
    /// (answered at once).
    fn register(
        &mut self,
        session: SessionId,
        registration: NodeRegistration,
        tx: NodeTx,
        token: CancellationToken,
        reply: oneshot::Sender<Result<(), Error>>,
        now: Now,
    ) -> Option<Reply> {
        let registration = match self.scheduler.admit_node(registration) {
            Ok(registration) => registration,
            Err(err) => {
                let _ = reply.send(Err(err));
                return None;
            }
        };
        let node_id = registration.node_id;
        if !self
            .sessions
            .open(session, node_id, &self.config, tx, token)
        {
            let _ = reply.send(Err(Error::ShuttingDown));
            return None;
        }
        self.scheduler.register_node(session, registration, now);
        Some(answer(reply, Ok(())))
    }
}

/// [`Command::ListNodes`], read at the end of the batch.
fn list_nodes(reply: oneshot::Sender<Vec<NodeInfo>>, instant: Instant) -> BatchRead {
    Box::new(move |scheduler| answer(reply, scheduler.nodes(instant)))
}

/// [`Command::ClusterInfo`], read at the end of the batch.
fn cluster_info(reply: oneshot::Sender<(ClusterStats, Duration)>, uptime: Duration) -> BatchRead {
    Box::new(move |scheduler| answer(reply, (scheduler.stats(), uptime)))
}
