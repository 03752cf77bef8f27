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
//! Each watch stream has a byte budget (`--watch-buffer-bytes`, a
//! [`WatchBudget`]): what the driver's live feed and the queue towards the
//! client hold together. The driver adds an event's size as it sends it
//! live, the stream subtracts it as the event leaves towards the client;
//! an event that would take a watcher past its budget drops it from live
//! delivery, as a full channel does, and history waits for room. So a
//! client that never reads costs at most about its budget (plus a page
//! of history read from the store, a quarter of it), however much it
//! falls behind.
//!
//! `WaitMany` waiters register the same way for many ids at once: when
//! tasks finalize, their final records go to each waiter as one batch per
//! commit. A waiter whose (bounded) channel is full is dropped, never
//! waited for; it registers again for the ids it still lacks and reads the
//! final ones from the store. The records of tasks already final when a
//! stream registers are read a piece at a time, each as large as its
//! budget has room for: the stream keeps their ids, not their records, so
//! a stalled one holds about its budget however many of its tasks are
//! final. The first registration checks that the store has every one of
//! them (from its index, where it has one), so an unknown id still fails
//! the call before anything is streamed.
//!
//! Domain values only: the service turns them into `pb` as they leave.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot};

use weft_proto::TaskId;
use weft_proto::limits::MAX_OUTPUT_CHUNK;

use super::commit::Reply;
use super::inbox::{Command, FinalRx, FinalTx, Handle, WaitRegistration};
use crate::error::Error;
use crate::scheduler::Scheduler;
use crate::store::{EventBody, Record, Store, TaskEvent, TaskRecord, blocking};

/// Most ids of a `WaitMany` stream's already-final tasks read from the
/// store in one call (fewer when the stream's room holds fewer at their
/// size): enough that the log store reads neighbouring records together.
const READ_CHUNK: usize = 64;

/// Batches a `WaitMany` waiter may have queued before it counts as lagging.
const WAIT_MANY_BUFFER: usize = 256;
/// Most events read from the store per page when replaying history (a
/// page is also bounded by bytes: see [`page_len`]).
const HISTORY_PAGE: usize = 256;
/// What one queued event costs beyond its payload (the event itself, its
/// channel slot), as a watch budget counts it.
const EVENT_OVERHEAD: usize = 128;
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
    /// Each waiter's channel, its stream's budget, and how many of its
    /// ids are not final yet (it is forgotten at 0).
    waiters: HashMap<u64, (FinalTx, Arc<WatchBudget>, usize)>,
    by_task: crate::IdMap<TaskId, Vec<u64>>,
    /// Entries of `by_task` added since the last [`ManyWaiters::sweep`],
    /// and how many were left after it.
    added: usize,
    kept: usize,
}

impl ManyWaiters {
    /// Forgets the waiters whose stream has gone (the client left, or the
    /// stream registered again after being dropped for lagging) and their
    /// ids' entries, once the entries added since the last sweep outnumber
    /// those it kept: a sweep's cost is shared by the entries that made it
    /// due. Without it, a waiter gone for good would stay until each of
    /// its tasks ends, which for a queued task may be never.
    fn sweep_if_due(&mut self) {
        if self.added <= self.kept.max(SWEEP_AFTER) {
            return;
        }
        self.waiters.retain(|_, (tx, ..)| !tx.is_closed());
        let waiters = &self.waiters;
        self.by_task.retain(|_, ws| {
            ws.retain(|w| waiters.contains_key(w));
            !ws.is_empty()
        });
        self.kept = self.by_task.values().map(Vec::len).sum();
        self.added = 0;
    }
}

/// Registrations (live watchers, or `WaitMany` ids) after which the
/// driver looks for those whose stream has gone, at least: more when more
/// were still in use at the last look.
pub(super) const SWEEP_AFTER: usize = 1_024;

/// The bytes of events queued towards one watch stream: in the driver's
/// live feed and in the stream's queue towards the client, together. The
/// driver and the history replay add an event's [`event_bytes`] as they
/// queue it; the stream subtracts them as it hands the event to the
/// client (or the feeder as it discards one).
pub(crate) struct WatchBudget {
    queued: AtomicUsize,
    /// Signalled whenever bytes are released (one waiter: the feeder).
    freed: Notify,
    limit: usize,
}

impl WatchBudget {
    /// A budget of `limit` bytes, nothing queued.
    pub fn new(limit: usize) -> Arc<WatchBudget> {
        Arc::new(WatchBudget {
            queued: AtomicUsize::new(0),
            freed: Notify::new(),
            limit,
        })
    }

    /// Counts `bytes` more if they fit; an event always fits when nothing
    /// is queued (so one larger than the whole budget still goes through).
    pub(super) fn try_take(&self, bytes: usize) -> bool {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued == 0 || queued.saturating_add(bytes) <= self.limit)
                    .then_some(queued.saturating_add(bytes))
            })
            .is_ok()
    }

    /// Counts `bytes` more once they fit.
    pub(super) async fn take(&self, bytes: usize) {
        // `notify_one` keeps a permit when nobody waits yet, so a release
        // between the check and the wait is not lost.
        while !self.try_take(bytes) {
            self.freed.notified().await;
        }
    }

    /// `bytes` left the queue.
    pub(super) fn release(&self, bytes: usize) {
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                Some(queued.saturating_sub(bytes))
            });
        self.freed.notify_one();
    }

    /// Bytes counted now.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Bytes it may count now before it is full.
    fn room(&self) -> usize {
        self.limit
            .saturating_sub(self.queued.load(Ordering::Acquire))
    }
}

/// What an event costs a [`WatchBudget`]: its payload (output bytes, text,
/// a final record's output and error) and a fixed overhead.
pub(crate) fn event_bytes(event: &TaskEvent) -> usize {
    EVENT_OVERHEAD
        + match &event.body {
            EventBody::State { reason, .. } => reason.len(),
            EventBody::Output { data, .. } => data.len(),
            EventBody::Progress { message, .. } => message.len(),
            EventBody::Finished(task) => task.output.len() + task.error.len(),
        }
}

/// What a final record costs a [`WatchBudget`] (a `WaitMany` stream's):
/// as its `finished` event does.
pub(crate) fn record_bytes(record: &TaskRecord) -> usize {
    EVENT_OVERHEAD + record.output.len() + record.error.len()
}

/// Events to read per page of history: as many full output chunks as fit
/// in a quarter of `limit`, 1 to [`HISTORY_PAGE`]. Sizes are not known
/// before the read, so every event counts as a full chunk (a guess from
/// earlier pages would read a page of full chunks after small events):
/// a stalled stream holds at most about its budget queued plus a quarter
/// of it read from the store.
pub(super) fn page_len(limit: usize) -> usize {
    (limit / 4 / (MAX_OUTPUT_CHUNK + EVENT_OVERHEAD)).clamp(1, HISTORY_PAGE)
}

/// One live watcher: its channel and its stream's budget.
struct LiveWatcher {
    tx: mpsc::Sender<TaskEvent>,
    budget: Arc<WatchBudget>,
}

impl LiveWatcher {
    /// Queues `event` (of `bytes`) if the channel and the budget have room;
    /// `false`: lagging (or gone), to be dropped from live delivery.
    fn offer(&self, event: &TaskEvent, bytes: usize) -> bool {
        if !self.budget.try_take(bytes) {
            return false;
        }
        if self.tx.try_send(event.clone()).is_err() {
            self.budget.release(bytes);
            return false;
        }
        true
    }
}

/// The driver's side: who gets the events of each commit.
pub(super) struct Watchers {
    /// Live watchers per task. A watcher whose stream has gone (the client
    /// left) is forgotten at its task's next event, or by a sweep
    /// ([`Watchers::watch`]) if that event is long in coming.
    live: crate::IdMap<TaskId, Vec<LiveWatcher>>,
    /// Live watchers registered since the last sweep, and how many the
    /// sweep kept.
    added: usize,
    kept: usize,
    many: ManyWaiters,
    /// Events a live watcher may have queued before it counts as lagging.
    buffer: usize,
}

impl Watchers {
    /// No watchers; each live one gets a channel of `buffer` events.
    pub fn new(buffer: usize) -> Self {
        Watchers {
            live: crate::IdMap::default(),
            added: 0,
            kept: 0,
            many: ManyWaiters::default(),
            buffer: buffer.max(16),
        }
    }

    /// [`Command::Watch`]: registers a live watcher of `id` if it is live,
    /// counting what it is sent against `budget`. Answered after the
    /// batch's commit (whatever its result: the caller reads the store
    /// next and sees the failure there).
    pub fn watch(
        &mut self,
        scheduler: &Scheduler,
        id: TaskId,
        budget: Arc<WatchBudget>,
        reply: oneshot::Sender<Result<Option<mpsc::Receiver<TaskEvent>>, Error>>,
    ) -> Reply {
        let rx = scheduler.is_live(id).then(|| {
            self.sweep_if_due();
            let (tx, rx) = mpsc::channel(self.buffer);
            let watchers = self.live.entry(id).or_default();
            // Watched again and again while quiet (a client polling with a
            // deadline): those gone are forgotten here.
            watchers.retain(|w| !w.tx.is_closed());
            watchers.push(LiveWatcher { tx, budget });
            self.added += 1;
            rx
        });
        Box::new(move |_| {
            let _ = reply.send(Ok(rx));
        })
    }

    /// Forgets the live watchers whose stream has gone, once more were
    /// registered since the last look than it kept (at least
    /// [`SWEEP_AFTER`]): the look's cost is shared by the registrations
    /// that made it due. Without it, a watcher of a quiet task (queued with
    /// no node for it, waiting on its parents) would stay until the task's
    /// next event, however many came and went meanwhile.
    fn sweep_if_due(&mut self) {
        if self.added <= self.kept.max(SWEEP_AFTER) {
            return;
        }
        self.live.retain(|_, ws| {
            ws.retain(|w| !w.tx.is_closed());
            !ws.is_empty()
        });
        self.kept = self.live.values().map(Vec::len).sum();
        self.added = 0;
    }

    /// [`Command::WaitMany`]: registers one waiter for the live ids among
    /// `ids`.
    pub fn wait_many(
        &mut self,
        scheduler: &Scheduler,
        ids: Vec<TaskId>,
        budget: Arc<WatchBudget>,
        reply: oneshot::Sender<WaitRegistration>,
    ) -> Reply {
        let (live, not_live): (Vec<TaskId>, Vec<TaskId>) =
            ids.into_iter().partition(|id| scheduler.is_live(*id));
        let rx = (!live.is_empty()).then(|| {
            self.many.sweep_if_due();
            let (tx, rx) = mpsc::channel(WAIT_MANY_BUFFER);
            let waiter = self.many.next;
            self.many.next += 1;
            self.many.waiters.insert(waiter, (tx, budget, live.len()));
            self.many.added += live.len();
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
    /// records to the `WaitMany` waiters. A watcher whose channel is full
    /// or closed, or whose budget the event would exceed, is dropped (it
    /// resumes from the store), never waited for.
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
            // Full, over budget or closed: drop it from live; it resumes
            // from the store.
            let bytes = event_bytes(event);
            watchers.retain(|w| w.offer(event, bytes));
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
        // (waiter, final record) pairs, then one batch per waiter made at
        // its size: a commit's results may go to many waiters (tasks that
        // finish out of order, a few for each of many streams).
        let mut finals: Vec<(u64, &Arc<TaskRecord>)> = Vec::new();
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
                    finals.push((waiter, task));
                }
            }
        }
        // Stable: each waiter's records stay in commit order.
        finals.sort_by_key(|(waiter, _)| *waiter);
        let batches = finals.chunk_by(|a, b| a.0 == b.0).map(|group| {
            // Shared with the commit's records, not copied.
            let batch: Vec<Arc<TaskRecord>> = group.iter().map(|(_, t)| Arc::clone(t)).collect();
            (group[0].0, batch)
        });
        for (waiter, batch) in batches {
            let Some((tx, budget, pending)) = self.many.waiters.get_mut(&waiter) else {
                continue;
            };
            *pending = pending.saturating_sub(batch.len());
            let done = *pending == 0;
            let bytes = batch.iter().map(|r| record_bytes(r)).sum();
            // Over its budget, full or closed: dropped from live, it
            // registers again for the rest and reads them from the store.
            let sent = budget.try_take(bytes) && {
                let sent = tx.try_send(batch).is_ok();
                if !sent {
                    budget.release(bytes);
                }
                sent
            };
            if !sent {
                tracing::debug!(waiter, "WaitMany waiter lagging or gone; dropped from live");
                self.many.waiters.remove(&waiter);
            } else if done {
                self.many.waiters.remove(&waiter);
            }
        }
    }
}

/// The events of one watch stream as they leave towards its client: each
/// one taken releases its bytes from the stream's [`WatchBudget`].
pub(crate) struct EventFeed {
    rx: mpsc::Receiver<Result<TaskEvent, Error>>,
    budget: Arc<WatchBudget>,
}

impl EventFeed {
    /// Bytes its budget counts now.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.budget.queued()
    }
}

impl futures::Stream for EventFeed {
    type Item = Result<TaskEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(self.rx.poll_recv(cx));
        if let Some(Ok(event)) = &item {
            self.budget.release(event_bytes(event));
        }
        Poll::Ready(item)
    }
}

/// The events of task `id` from `from_seq` on: history from the store,
/// then live, ending after its last event. Fed by a task spawned on the
/// handle's tracker; an error ends the stream. What is queued towards the
/// client is bounded by `--watch-buffer-bytes`.
pub(crate) fn follow(handle: &Handle, id: TaskId, from_seq: u64) -> EventFeed {
    let (tx, rx) = mpsc::channel(WATCH_OUT);
    let budget = WatchBudget::new(handle.config.watch_buffer_bytes);
    handle.tasks.spawn(feed_events(
        handle.clone(),
        id,
        from_seq,
        Arc::clone(&budget),
        tx,
    ));
    EventFeed { rx, budget }
}

/// Feeds one watcher: registers with the driver, replays history from the
/// store, then forwards live events, deduplicating by seq. Dropped from
/// live for lagging (or for its budget), it goes round again from the last
/// seq it sent. Every event it queues towards the client is counted in
/// `budget` (live ones by the driver, history here); those it discards are
/// released.
async fn feed_events(
    handle: Handle,
    id: TaskId,
    mut next: u64,
    budget: Arc<WatchBudget>,
    out: mpsc::Sender<Result<TaskEvent, Error>>,
) {
    let page = page_len(budget.limit);
    loop {
        // Register first, then read history: the driver guarantees that
        // everything not in the live feed is already in the store.
        let registered = handle
            .call(|reply| Command::Watch {
                id,
                budget: Arc::clone(&budget),
                reply,
            })
            .await;
        let mut live = match registered {
            Ok(Ok(live)) => live,
            Ok(Err(err)) | Err(err) => {
                let _ = out.send(Err(err)).await;
                return;
            }
        };
        loop {
            let from = next;
            let page = blocking(&handle.store, "reading events", move |store| {
                store.events(id, from, page)
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
                let bytes = event_bytes(&event);
                if !budget.try_take(bytes) {
                    // No room. What waits in the live feed is only taken
                    // after the history, so it would hold the room this
                    // waits for: give the live feed up now (it would be
                    // dropped for its budget anyway); the live loop below
                    // finds it closed and registers again.
                    if let Some(live) = live.as_mut() {
                        stop_live(live, &budget);
                    }
                    // Waits for room: the client reads, or goes away.
                    tokio::select! {
                        _ = handle.cancel.cancelled() => return,
                        _ = out.closed() => return,
                        () = budget.take(bytes) => {}
                    }
                }
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
            if event.seq != next {
                budget.release(event_bytes(&event));
                if event.seq < next {
                    continue;
                }
                break; // a gap can only be filled from the store
            }
            next = event.seq + 1;
            let last = event.body.is_finished();
            if out.send(Ok(event)).await.is_err() || last {
                return;
            }
        }
        // What the driver queued past a gap is read again from the store.
        stop_live(&mut live, &budget);
        if handle.cancel.is_cancelled() {
            return;
        }
    }
}

/// Closes a live feed and releases what it still holds: the driver sends
/// it nothing more (and drops it at its next event), and what it had sent
/// is read again from the store.
fn stop_live(live: &mut mpsc::Receiver<TaskEvent>, budget: &WatchBudget) {
    live.close();
    while let Ok(event) = live.try_recv() {
        budget.release(event_bytes(&event));
    }
}

/// The final records of `ids` (distinct; `pending` holds the same ids),
/// each once, as they finalize. Registers first, so an id the store does
/// not know fails this call before anything is streamed; then a task
/// spawned on the handle's tracker feeds the stream. What is queued
/// towards the client is bounded by `--watch-buffer-bytes`, as a watch's.
///
/// `outcomes_only`: the caller reads only outcomes (`TASK_VIEW_RESULT`),
/// so records read from the store may come without their spec.
pub(crate) async fn wait_final(
    handle: &Handle,
    ids: Vec<TaskId>,
    pending: HashSet<TaskId>,
    outcomes_only: bool,
) -> Result<FinalFeed, Error> {
    let budget = WatchBudget::new(handle.config.watch_buffer_bytes);
    let (not_live, live) = register_many(handle, ids, &budget).await?;
    let (unread, ready) =
        first_piece(handle, Unread::new(not_live, outcomes_only), &budget).await?;
    let (tx, rx) = mpsc::channel(WAIT_MANY_OUT);
    handle.tasks.spawn(feed_finals(
        handle.clone(),
        pending,
        ready,
        unread,
        live,
        Arc::clone(&budget),
        tx,
    ));
    Ok(FinalFeed { rx, budget })
}

/// The final records of one `WaitMany` stream as they leave towards its
/// client: each one taken releases its bytes from the stream's budget.
pub(crate) struct FinalFeed {
    rx: mpsc::Receiver<Result<Arc<TaskRecord>, Error>>,
    budget: Arc<WatchBudget>,
}

impl FinalFeed {
    /// Bytes its budget counts now.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.budget.queued()
    }
}

impl futures::Stream for FinalFeed {
    type Item = Result<Arc<TaskRecord>, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(self.rx.poll_recv(cx));
        if let Some(Ok(record)) = &item {
            self.budget.release(record_bytes(record));
        }
        Poll::Ready(item)
    }
}

/// Registers `ids` with the driver: answers the ones that were not live
/// (final, or unknown, in the store) and the live feed of the others.
async fn register_many(
    handle: &Handle,
    ids: Vec<TaskId>,
    budget: &Arc<WatchBudget>,
) -> Result<(Vec<TaskId>, Option<FinalRx>), Error> {
    let budget = Arc::clone(budget);
    let WaitRegistration { not_live, live } = handle
        .call(|reply| Command::WaitMany { ids, budget, reply })
        .await?;
    Ok((not_live, live))
}

/// The ids of a `WaitMany` stream's tasks that were not live when it
/// registered, whose final records are read from the store a piece at a
/// time, as the stream has room for them: never all at once.
#[derive(Default)]
struct Unread {
    ids: Vec<TaskId>,
    /// Where the next piece starts.
    next: usize,
    /// The stream sends outcomes only (`TASK_VIEW_RESULT`): records are
    /// read without their specs.
    outcomes_only: bool,
    /// Bytes and number of the records read so far: their mean sizes the
    /// next chunk.
    read_bytes: usize,
    read_count: usize,
}

impl Unread {
    fn new(ids: Vec<TaskId>, outcomes_only: bool) -> Unread {
        Unread {
            ids,
            next: 0,
            outcomes_only,
            read_bytes: 0,
            read_count: 0,
        }
    }

    /// Names `ids` instead (the stream registered again), read as before.
    fn reset(&mut self, ids: Vec<TaskId>) {
        self.ids = ids;
        self.next = 0;
    }

    fn is_empty(&self) -> bool {
        self.next >= self.ids.len()
    }

    /// The next records until they come to `room` bytes: at least one,
    /// and the last may take them past `room`. Read a chunk of ids at a
    /// time (outcomes in one store call per chunk, so the log store reads
    /// neighbours together), as many as `room` holds at the size of the
    /// records read so far (one at first, at most [`READ_CHUNK`]): what a
    /// read holds for a moment stays about `room`. Records read past
    /// `room` are dropped and read again with the next piece. An id the
    /// store does not have is an error.
    fn read(
        &mut self,
        store: &dyn Store,
        room: usize,
        retention: Duration,
    ) -> Result<Vec<Arc<TaskRecord>>, Error> {
        let mut piece = Vec::new();
        let mut bytes = 0;
        while !self.is_empty() && (bytes < room || piece.is_empty()) {
            // One record first; then as many as the room left holds at
            // the mean size read so far.
            let fits = match (self.read_bytes, self.read_count) {
                (_, 0) => 1,
                (total, count) => room.saturating_sub(bytes) / (total / count).max(1),
            };
            let end = (self.next + fits.clamp(1, READ_CHUNK)).min(self.ids.len());
            let chunk = &self.ids[self.next..end];
            let records = match self.outcomes_only {
                true => store.task_outcomes(chunk)?,
                false => chunk
                    .iter()
                    .map(|id| store.task(*id))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            for (record, &id) in records.into_iter().zip(chunk) {
                if bytes >= room && !piece.is_empty() {
                    break;
                }
                let record =
                    record.ok_or_else(|| Error::missing_task(id, retention, SystemTime::now()))?;
                let size = record_bytes(&record);
                self.next += 1;
                self.read_bytes += size;
                self.read_count += 1;
                bytes += size;
                piece.push(Arc::new(record));
            }
        }
        Ok(piece)
    }

    /// The first piece ([`read`](Self::read), but within `room` unless it
    /// is one record: what took it past is read again later), then every
    /// other id checked to be in the store ([`Store::has_tasks`]: from an
    /// index, without reading the records).
    fn first(
        &mut self,
        store: &dyn Store,
        room: usize,
        retention: Duration,
    ) -> Result<Vec<Arc<TaskRecord>>, Error> {
        let mut piece = self.read(store, room, retention)?;
        if piece.len() > 1 && piece.iter().map(|r| record_bytes(r)).sum::<usize>() > room {
            piece.pop();
            self.next -= 1;
        }
        let rest = &self.ids[self.next..];
        let has = store.has_tasks(rest)?;
        if let Some((id, _)) = rest.iter().zip(has).find(|(_, has)| !has) {
            return Err(Error::missing_task(*id, retention, SystemTime::now()));
        }
        Ok(piece)
    }
}

/// The first piece of the records `unread` names, as much as `budget` has
/// room for, after checking that the store has every one: an unknown id
/// fails the call before anything is streamed.
async fn first_piece(
    handle: &Handle,
    mut unread: Unread,
    budget: &WatchBudget,
) -> Result<(Unread, Vec<Arc<TaskRecord>>), Error> {
    if unread.is_empty() {
        return Ok((unread, Vec::new()));
    }
    let (room, retention) = (budget.room(), handle.config.retention);
    let (unread, piece) = blocking(&handle.store, "reading tasks", move |store| {
        let piece = unread.first(store, room, retention);
        Ok((unread, piece))
    })
    .await?;
    Ok((unread, piece?))
}

/// The next piece of the records `unread` names, as much as `budget` has
/// room for now (one record when it has none: it waits for room).
async fn next_piece(
    handle: &Handle,
    mut unread: Unread,
    budget: &WatchBudget,
) -> Result<(Unread, Vec<Arc<TaskRecord>>), Error> {
    let (room, retention) = (budget.room(), handle.config.retention);
    let (unread, piece) = blocking(&handle.store, "reading tasks", move |store| {
        let piece = unread.read(store, room, retention);
        Ok((unread, piece))
    })
    .await?;
    Ok((unread, piece?))
}

/// Feeds one `WaitMany` call: the already-final records first (`ready`,
/// then the rest of `unread`, a piece at a time), then the live ones as
/// they finalize. Dropped by the driver for lagging (or over its budget),
/// it registers again for the ids still missing.
///
/// Records from the live feed were counted by the driver; those read from
/// the store are counted here before they are queued. When one must wait
/// for room, the live feed is given up first (what it holds is released;
/// those ids are still pending and come from the store later), since only
/// this task drains it and the room may be all in there.
async fn feed_finals(
    handle: Handle,
    mut pending: HashSet<TaskId>,
    mut ready: Vec<Arc<TaskRecord>>,
    mut unread: Unread,
    mut live: Option<FinalRx>,
    budget: Arc<WatchBudget>,
    out: mpsc::Sender<Result<Arc<TaskRecord>, Error>>,
) {
    // Whether the records in `ready` are counted already (from the feed).
    let mut counted = false;
    loop {
        for record in ready.drain(..) {
            let bytes = record_bytes(&record);
            if !(record.state.is_final() && pending.contains(&record.id)) {
                if counted {
                    budget.release(bytes);
                }
                continue;
            }
            if !counted && !budget.try_take(bytes) {
                if let Some(mut rx) = live.take() {
                    rx.close();
                    while let Ok(batch) = rx.try_recv() {
                        budget.release(batch.iter().map(|r| record_bytes(r)).sum());
                    }
                }
                tokio::select! {
                    _ = handle.cancel.cancelled() => return,
                    _ = out.closed() => return,
                    () = budget.take(bytes) => {}
                }
            }
            pending.remove(&record.id);
            if out.send(Ok(record)).await.is_err() {
                return;
            }
        }
        if pending.is_empty() {
            return;
        }
        if !unread.is_empty() {
            let unread_now = std::mem::take(&mut unread);
            match next_piece(&handle, unread_now, &budget).await {
                Ok((rest, piece)) => {
                    unread = rest;
                    ready = piece;
                    counted = false;
                    continue;
                }
                Err(err) => {
                    let _ = out.send(Err(err)).await;
                    return;
                }
            }
        }
        if let Some(rx) = live.as_mut() {
            let batch = tokio::select! {
                _ = handle.cancel.cancelled() => return,
                _ = out.closed() => return,
                batch = rx.recv() => batch,
            };
            if let Some(batch) = batch {
                ready = batch;
                counted = true;
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
        match register_many(&handle, ids, &budget).await {
            Ok((not_live, rx)) => {
                unread.reset(not_live);
                live = rx;
            }
            Err(err) => {
                let _ = out.send(Err(err)).await;
                return;
            }
        }
    }
}
