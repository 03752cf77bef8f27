//! The watch feature, both halves: the driver's side (watchers and
//! `WaitMany` waiters registered with it, and publishing each committed
//! batch's events to them) and the stream side (the tasks that feed one
//! `Watch`/`Run` or `WaitMany` call: history from the store, then live,
//! and resuming by seq after a drop).
//!
//! Watchers register with the driver, so the registration and the live
//! feed are ordered with the commits: a watcher registered in batch N is
//! answered after N's commit and gets live every event from N on, so "read
//! history from the store, then live" has no gap. Live watchers get bounded
//! channels; one that falls behind is dropped from live delivery (never
//! slowing the driver) and resumes from the store by seq.
//!
//! `WaitMany` waiters register the same way for many ids at once: when
//! tasks finalize, their final records go to each waiter as one batch per
//! commit. A waiter whose (bounded) channel is full is dropped, never
//! waited for; it registers again for the ids it still lacks and reads the
//! final ones from the store.
//!
//! Domain values only: the service turns them into `pb` as they leave.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use weft_proto::TaskId;

use super::commit::Reply;
use super::inbox::{Command, FinalRx, FinalTx, Handle, WaitRegistration};
use crate::error::Error;
use crate::scheduler::Scheduler;
use crate::store::{EventBody, Record, TaskEvent, TaskRecord, blocking};

/// Batches a `WaitMany` waiter may have queued before it counts as lagging.
const WAIT_MANY_BUFFER: usize = 256;
/// Events read from the store per page when replaying history.
const HISTORY_PAGE: usize = 256;
/// Events one watch stream queues towards its client.
const WATCH_OUT: usize = 64;
/// Final tasks one `WaitMany` stream queues towards its client.
const WAIT_MANY_OUT: usize = 1024;

/// Live `WaitMany` waiters and the ids they wait for. An id's entry may
/// name waiters that are gone (dropped for lagging, or the client left):
/// they are skipped and forgotten when the task finalizes.
#[derive(Default)]
struct ManyWaiters {
    next: u64,
    /// Each waiter's channel and how many of its ids are not final yet
    /// (it is forgotten at 0).
    waiters: HashMap<u64, (FinalTx, usize)>,
    by_task: HashMap<TaskId, Vec<u64>>,
}

/// The driver's side: who gets the events of each commit.
pub(super) struct Watchers {
    /// Live watchers per task.
    live: HashMap<TaskId, Vec<mpsc::Sender<TaskEvent>>>,
    many: ManyWaiters,
    /// Events a live watcher may have queued before it counts as lagging.
    buffer: usize,
}

impl Watchers {
    /// No watchers; each live one gets a channel of `buffer` events.
    pub fn new(buffer: usize) -> Self {
        Watchers {
            live: HashMap::new(),
            many: ManyWaiters::default(),
            buffer: buffer.max(16),
        }
    }

    /// [`Command::Watch`]: registers a live watcher of `id` if it is live.
    /// Answered after the batch's commit (whatever its result: the caller
    /// reads the store next and sees the failure there).
    pub fn watch(
        &mut self,
        scheduler: &Scheduler,
        id: TaskId,
        reply: oneshot::Sender<Result<Option<mpsc::Receiver<TaskEvent>>, Error>>,
    ) -> Reply {
        let rx = scheduler.is_live(id).then(|| {
            let (tx, rx) = mpsc::channel(self.buffer);
            self.live.entry(id).or_default().push(tx);
            rx
        });
        Box::new(move |_| {
            let _ = reply.send(Ok(rx));
        })
    }

    /// [`Command::WaitMany`]: registers one waiter for the live ids among
    /// `ids`.
    pub fn wait_many(
        &mut self,
        scheduler: &Scheduler,
        ids: Vec<TaskId>,
        reply: oneshot::Sender<WaitRegistration>,
    ) -> Reply {
        let (live, not_live): (Vec<TaskId>, Vec<TaskId>) =
            ids.into_iter().partition(|id| scheduler.is_live(*id));
        let rx = (!live.is_empty()).then(|| {
            let (tx, rx) = mpsc::channel(WAIT_MANY_BUFFER);
            let waiter = self.many.next;
            self.many.next += 1;
            self.many.waiters.insert(waiter, (tx, live.len()));
            for id in live {
                self.many.by_task.entry(id).or_default().push(waiter);
            }
            rx
        });
        Box::new(move |_| {
            let _ = reply.send(WaitRegistration { not_live, live: rx });
        })
    }

    /// Hands a committed batch's events to the live watchers and its final
    /// records to the `WaitMany` waiters. A full or closed watcher is
    /// dropped (it resumes from the store), never waited for.
    pub fn publish(&mut self, records: &[Record]) {
        self.publish_final(records);
        if self.live.is_empty() {
            return;
        }
        for record in records {
            let Record::Event(event) = record else {
                continue;
            };
            let Some(watchers) = self.live.get_mut(&event.task_id) else {
                continue;
            };
            // Full or closed: drop it from live; it resumes from the store.
            watchers.retain(|w| w.try_send(event.clone()).is_ok());
            if event.body.is_finished() || watchers.is_empty() {
                self.live.remove(&event.task_id);
            }
        }
    }

    /// Hands the final records of this commit to the `WaitMany` waiters,
    /// one batch per waiter. A full or closed waiter is dropped (its
    /// stream registers again and reads the store), never waited for.
    fn publish_final(&mut self, records: &[Record]) {
        if self.many.by_task.is_empty() {
            return;
        }
        let mut batches: HashMap<u64, Vec<TaskRecord>> = HashMap::new();
        for record in records {
            let Record::Event(TaskEvent {
                task_id,
                body: EventBody::Finished(task),
                ..
            }) = record
            else {
                continue;
            };
            let Some(waiters) = self.many.by_task.remove(task_id) else {
                continue;
            };
            for waiter in waiters {
                if self.many.waiters.contains_key(&waiter) {
                    batches
                        .entry(waiter)
                        .or_default()
                        .push(TaskRecord::clone(task));
                }
            }
        }
        for (waiter, batch) in batches {
            let Some((tx, pending)) = self.many.waiters.get_mut(&waiter) else {
                continue;
            };
            *pending = pending.saturating_sub(batch.len());
            let done = *pending == 0;
            if tx.try_send(batch).is_err() {
                tracing::debug!(waiter, "WaitMany waiter lagging or gone; dropped from live");
                self.many.waiters.remove(&waiter);
            } else if done {
                self.many.waiters.remove(&waiter);
            }
        }
    }
}

/// The events of task `id` from `from_seq` on: history from the store,
/// then live, ending after its last event. Fed by a task spawned on the
/// handle's tracker; an error ends the stream.
pub(crate) fn follow(
    handle: &Handle,
    id: TaskId,
    from_seq: u64,
) -> mpsc::Receiver<Result<TaskEvent, Error>> {
    let (tx, rx) = mpsc::channel(WATCH_OUT);
    handle
        .tasks
        .spawn(feed_events(handle.clone(), id, from_seq, tx));
    rx
}

/// Feeds one watcher: registers with the driver, replays history from the
/// store, then forwards live events, deduplicating by seq. Dropped from
/// live for lagging, it goes round again from the last seq it sent.
async fn feed_events(
    handle: Handle,
    id: TaskId,
    mut next: u64,
    out: mpsc::Sender<Result<TaskEvent, Error>>,
) {
    loop {
        // Register first, then read history: the driver guarantees that
        // everything not in the live feed is already in the store.
        let live = match handle.call(|reply| Command::Watch { id, reply }).await {
            Ok(Ok(live)) => live,
            Ok(Err(err)) | Err(err) => {
                let _ = out.send(Err(err)).await;
                return;
            }
        };
        loop {
            let from = next;
            let page = blocking(&handle.store, "reading events", move |store| {
                store.events(id, from, HISTORY_PAGE)
            })
            .await;
            let page = match page {
                Ok(page) => page,
                Err(err) => {
                    let _ = out.send(Err(Error::from(err))).await;
                    return;
                }
            };
            if page.is_empty() {
                break;
            }
            for event in page {
                next = event.seq + 1;
                let last = event.body.is_finished();
                if out.send(Ok(event)).await.is_err() || last {
                    return;
                }
            }
        }
        let Some(mut live) = live else {
            return; // final before we registered: history had it all
        };
        loop {
            let event = tokio::select! {
                _ = handle.cancel.cancelled() => return,
                _ = out.closed() => return,
                event = live.recv() => event,
            };
            let Some(event) = event else {
                break; // dropped for lagging: resume from the store
            };
            if event.seq < next {
                continue;
            }
            if event.seq > next {
                break; // a gap can only be filled from the store
            }
            next = event.seq + 1;
            let last = event.body.is_finished();
            if out.send(Ok(event)).await.is_err() || last {
                return;
            }
        }
        if handle.cancel.is_cancelled() {
            return;
        }
    }
}

/// The final records of `ids` (distinct; `pending` holds the same ids),
/// each once, as they finalize. Registers first, so an id the store does
/// not know fails this call before anything is streamed; then a task
/// spawned on the handle's tracker feeds the stream.
pub(crate) async fn wait_final(
    handle: &Handle,
    ids: Vec<TaskId>,
    pending: HashSet<TaskId>,
) -> Result<mpsc::Receiver<Result<TaskRecord, Error>>, Error> {
    let (ready, live) = register_many(handle, ids).await?;
    let (tx, rx) = mpsc::channel(WAIT_MANY_OUT);
    handle
        .tasks
        .spawn(feed_finals(handle.clone(), pending, ready, live, tx));
    Ok(rx)
}

/// Registers `ids` with the driver and reads the ones that were not
/// live from the store. An id the store does not have is an error.
async fn register_many(
    handle: &Handle,
    ids: Vec<TaskId>,
) -> Result<(Vec<TaskRecord>, Option<FinalRx>), Error> {
    let WaitRegistration { not_live, live } = handle
        .call(|reply| Command::WaitMany { ids, reply })
        .await?;
    if not_live.is_empty() {
        return Ok((Vec::new(), live));
    }
    let retention = handle.config.retention;
    let found = blocking(&handle.store, "reading tasks", move |store| {
        not_live
            .into_iter()
            .map(|id| store.task(id).map(|found| found.ok_or(id)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let records = found
        .into_iter()
        .map(|found| found.map_err(|id| Error::missing_task(id, retention, SystemTime::now())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((records, live))
}

/// Feeds one `WaitMany` call: the already-final records first, then the
/// live ones as they finalize. Dropped by the driver for lagging, it
/// registers again for the ids still missing.
async fn feed_finals(
    handle: Handle,
    mut pending: HashSet<TaskId>,
    mut ready: Vec<TaskRecord>,
    mut live: Option<FinalRx>,
    out: mpsc::Sender<Result<TaskRecord, Error>>,
) {
    loop {
        for record in ready.drain(..) {
            if record.state.is_final()
                && pending.remove(&record.id)
                && out.send(Ok(record)).await.is_err()
            {
                return;
            }
        }
        if pending.is_empty() {
            return;
        }
        if let Some(rx) = live.as_mut() {
            let batch = tokio::select! {
                _ = handle.cancel.cancelled() => return,
                _ = out.closed() => return,
                batch = rx.recv() => batch,
            };
            if let Some(batch) = batch {
                ready = batch;
                continue;
            }
        }
        // Dropped for lagging (or nothing was live: a task not final in
        // the store was live a moment ago): register again for the rest.
        if handle.cancel.is_cancelled() {
            return;
        }
        if live.is_none() {
            // Not live, yet not final in the store: only a transient state
            // (a restart restoring it); do not spin.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ids: Vec<TaskId> = pending.iter().copied().collect();
        match register_many(&handle, ids).await {
            Ok((records, rx)) => {
                ready = records;
                live = rx;
            }
            Err(err) => {
                let _ = out.send(Err(err)).await;
                return;
            }
        }
    }
}
