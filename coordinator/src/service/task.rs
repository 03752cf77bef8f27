//! `TaskService`: Submit, Get, List, Watch, Cancel, Run, WaitMany.

use std::collections::HashSet;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use std::time::SystemTime;

use weft_proto::{TaskId, TaskSpec, TaskState, pb};

use super::{event_to_pb, parse_task_id, state_filter, task_to_pb};
use crate::driver::{Command, FinalRx, Handle, WaitRegistration, blocking};
use crate::error::Error;
use crate::store::TaskRecord;

/// Events of one task, from the store then live.
pub(crate) type EventStream = ReceiverStream<Result<pb::TaskEvent, Status>>;

/// Events read from the store per page when replaying history.
const HISTORY_PAGE: usize = 256;
/// Largest `List` page.
const MAX_LIST: u32 = 10_000;
/// Most ids one `WaitMany` call may name.
pub(crate) const MAX_WAIT_MANY: usize = 100_000;
/// Final tasks `WaitMany` queues towards its client.
const WAIT_MANY_OUT: usize = 1024;

/// Final tasks of one `WaitMany` call.
pub(crate) type TaskStream = ReceiverStream<Result<pb::Task, Status>>;

/// The client API.
pub(crate) struct TaskApi {
    pub handle: Handle,
}

impl TaskApi {
    async fn submit_specs(&self, specs: Vec<pb::TaskSpec>) -> Result<Vec<TaskId>, Error> {
        let specs = specs
            .into_iter()
            .enumerate()
            .map(|(index, spec)| {
                TaskSpec::try_from(spec).map_err(|source| Error::InvalidSpec { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        self.handle
            .call(|reply| Command::Submit { specs, reply })
            .await?
    }

    /// A task's stored record, read on the blocking pool; a missing one is
    /// NOT_FOUND (or expired, by the id's age).
    async fn read_task(&self, id: TaskId) -> Result<TaskRecord, Error> {
        let found = blocking(&self.handle.store, "reading a task", move |store| {
            store.task(id)
        })
        .await?;
        found
            .ok_or_else(|| Error::missing_task(id, self.handle.config.retention, SystemTime::now()))
    }

    /// Fills `pending_reason` of the queued records from the scheduler.
    async fn with_pending(&self, records: &mut [TaskRecord]) -> Result<(), Error> {
        let queued: Vec<usize> = (0..records.len())
            .filter(|i| records[*i].state == TaskState::Queued)
            .collect();
        if queued.is_empty() {
            return Ok(());
        }
        let ids = queued.iter().map(|i| records[*i].id).collect();
        let reasons = self
            .handle
            .call(|reply| Command::PendingReasons { ids, reply })
            .await?;
        for (i, reason) in queued.into_iter().zip(reasons) {
            records[i].pending_reason = reason.unwrap_or_default();
        }
        Ok(())
    }

    /// Registers `ids` with the driver and reads the ones that were not
    /// live from the store. An id the store does not have is an error.
    async fn wait_register(
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

    fn watch_stream(&self, id: TaskId, from_seq: u64) -> EventStream {
        let (tx, rx) = mpsc::channel(64);
        let handle = self.handle.clone();
        self.handle.tasks.spawn(pump(handle, id, from_seq, tx));
        ReceiverStream::new(rx)
    }
}

/// Feeds one watcher: registers with the driver, replays history from the
/// store, then forwards live events, deduplicating by seq. Dropped from
/// live for lagging, it goes round again from the last seq it sent.
async fn pump(
    handle: Handle,
    id: TaskId,
    mut next: u64,
    out: mpsc::Sender<Result<pb::TaskEvent, Status>>,
) {
    loop {
        // Register first, then read history: the driver guarantees that
        // everything not in the live feed is already in the store.
        let live = match handle.call(|reply| Command::Watch { id, reply }).await {
            Ok(Ok(live)) => live,
            Ok(Err(err)) | Err(err) => {
                let _ = out.send(Err(err.into())).await;
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
                    let _ = out.send(Err(Error::from(err).into())).await;
                    return;
                }
            };
            if page.is_empty() {
                break;
            }
            for event in page {
                next = event.seq + 1;
                let last = event.body.is_finished();
                if out.send(Ok(event_to_pb(&event))).await.is_err() || last {
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
            if out.send(Ok(event_to_pb(&event))).await.is_err() || last {
                return;
            }
        }
        if handle.cancel.is_cancelled() {
            return;
        }
    }
}

/// Feeds one `WaitMany` call: the already-final records first, then the
/// live ones as they finalize. Dropped by the driver for lagging, it
/// registers again for the ids still missing.
async fn pump_final(
    handle: Handle,
    mut pending: HashSet<TaskId>,
    mut ready: Vec<TaskRecord>,
    mut live: Option<FinalRx>,
    out: mpsc::Sender<Result<pb::Task, Status>>,
) {
    loop {
        for record in ready.drain(..) {
            if record.state.is_final()
                && pending.remove(&record.id)
                && out.send(Ok(task_to_pb(&record))).await.is_err()
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
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let ids: Vec<TaskId> = pending.iter().copied().collect();
        match TaskApi::wait_register(&handle, ids).await {
            Ok((records, rx)) => {
                ready = records;
                live = rx;
            }
            Err(err) => {
                let _ = out.send(Err(err.into())).await;
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl pb::task_service_server::TaskService for TaskApi {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let ids = self.submit_specs(request.into_inner().tasks).await?;
        Ok(Response::new(pb::SubmitResponse {
            task_ids: ids.iter().map(TaskId::to_string).collect(),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let id = parse_task_id(&request.into_inner().task_id)?;
        let mut record = [self.read_task(id).await?];
        self.with_pending(&mut record).await?;
        Ok(Response::new(pb::GetResponse {
            task: Some(task_to_pb(&record[0])),
        }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let request = request.into_inner();
        let state = state_filter(request.state)?;
        let limit = match request.limit {
            0 => 100,
            n => n.min(MAX_LIST),
        } as usize;
        let before = match request.page_token.as_str() {
            "" => None,
            token => Some(parse_task_id(token)?),
        };
        let mut records = blocking(&self.handle.store, "listing tasks", move |store| {
            store.list(state, before, limit)
        })
        .await
        .map_err(Error::from)?;
        self.with_pending(&mut records).await?;
        let next_page_token = match records.last() {
            Some(last) if records.len() == limit => last.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListResponse {
            tasks: records.iter().map(task_to_pb).collect(),
            next_page_token,
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let id = parse_task_id(&request.task_id)?;
        // Unknown ids fail the call itself, not the stream.
        self.read_task(id).await?;
        Ok(Response::new(self.watch_stream(id, request.from_seq)))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let request = request.into_inner();
        let id = parse_task_id(&request.task_id)?;
        let reason = request.reason;
        let live = self
            .handle
            .call(|reply| Command::Cancel { id, reason, reply })
            .await??;
        // The cancel is committed; the store has the record as it left it.
        let mut record = [self.read_task(id).await?];
        if !live && record[0].state.is_final() {
            return Err(Error::TaskFinal {
                id,
                state: record[0].state,
            }
            .into());
        }
        self.with_pending(&mut record).await?;
        let record = &record[0];
        Ok(Response::new(pb::CancelResponse {
            task: Some(task_to_pb(record)),
        }))
    }

    type WaitManyStream = TaskStream;

    async fn wait_many(
        &self,
        request: Request<pb::WaitManyRequest>,
    ) -> Result<Response<Self::WaitManyStream>, Status> {
        let request = request.into_inner();
        if request.task_ids.len() > MAX_WAIT_MANY {
            return Err(
                Error::InvalidArgument(weft_proto::ConversionError::Invalid {
                    field: "task_ids",
                    reason: format!(
                        "{} ids; at most {MAX_WAIT_MANY} per call",
                        request.task_ids.len()
                    ),
                })
                .into(),
            );
        }
        let mut pending = HashSet::with_capacity(request.task_ids.len());
        let mut ids = Vec::with_capacity(request.task_ids.len());
        for text in &request.task_ids {
            let id = parse_task_id(text)?;
            if pending.insert(id) {
                ids.push(id);
            }
        }
        // Unknown ids fail the call itself, before anything is streamed.
        let (ready, live) = Self::wait_register(&self.handle, ids).await?;
        let (tx, rx) = mpsc::channel(WAIT_MANY_OUT);
        self.handle
            .tasks
            .spawn(pump_final(self.handle.clone(), pending, ready, live, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type RunStream = EventStream;

    async fn run(
        &self,
        request: Request<pb::RunRequest>,
    ) -> Result<Response<Self::RunStream>, Status> {
        let spec = request.into_inner().spec.ok_or(Error::InvalidArgument(
            weft_proto::ConversionError::MissingField("spec"),
        ))?;
        let ids = self.submit_specs(vec![spec]).await?;
        let id = ids.first().copied().ok_or(Error::InvalidArgument(
            weft_proto::ConversionError::MissingField("spec"),
        ))?;
        Ok(Response::new(self.watch_stream(id, 0)))
    }
}
