//! `TaskService`: Submit, Get, List, Watch, Cancel, Run, WaitMany.
//!
//! Translates and forwards: commands to the driver, reads to the store (on
//! the blocking pool), and the watch streams to `driver::watch`, which
//! owns history, live delivery and resuming; here their domain values are
//! only encoded as they leave.
//!
//! Each `Watch`, `Run` and `WaitMany` stream holds a place among its
//! client's (`--max-streams-per-client`, see [`ClientStreams`]), given
//! back when the response stream is dropped: it ended, or the client went
//! away.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::Map;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use weft_proto::limits::SpecLimits;
use weft_proto::{ConversionError, TaskId, TaskSpec, TaskState, pb};

use super::batches::Batches;
use super::{event_to_pb, parse_task_id, state_filter, task_result_pb, task_to_pb};
use crate::auth::{self, Caller, Scope};
use crate::driver::{Command, EventFeed, FinalFeed, Handle, follow, wait_final};
use crate::error::Error;
use crate::metrics::{OpenStream, WatchRpc};
use crate::store::{ListQuery, TaskEvent, TaskRecord, blocking};

/// Events of one task, from the store then live, encoded as they leave.
pub(crate) type EventStream =
    Counted<Map<EventFeed, fn(Result<TaskEvent, Error>) -> Result<pb::TaskEvent, Status>>>;

/// Final tasks of one `WaitMany` call, encoded as they leave.
pub(crate) type TaskStream = Counted<FinalTasks>;
/// One `WaitMany` call's final records, as the API sends them.
pub(crate) type FinalTasks =
    Map<FinalFeed, fn(Result<Arc<TaskRecord>, Error>) -> Result<pb::Task, Status>>;

/// Largest `List` page.
const MAX_LIST: u32 = 10_000;
/// Most task records one `List` call examines; past it the page is
/// answered as it is, with a token that carries on (so a filter that
/// matches nothing costs a bounded scan per call, not a full one).
pub(crate) const MAX_LIST_SCAN: usize = 10_000;

/// A `ListRequest` as the store's query, validated: malformed filters
/// (an empty label key, `until` before `since`, a bad page token) are
/// INVALID_ARGUMENT.
pub(crate) fn list_query(request: pb::ListRequest) -> Result<ListQuery, Error> {
    let state = state_filter(request.state)?;
    let limit = match request.limit {
        0 => 100,
        n => n.min(MAX_LIST),
    } as usize;
    let invalid = |field, reason: &str| {
        Error::from(ConversionError::Invalid {
            field,
            reason: reason.to_owned(),
        })
    };
    if request.labels.keys().any(|k| k.trim().is_empty()) {
        return Err(invalid("labels", "a label filter needs a key (KEY=VALUE)"));
    }
    let since = request.since.as_ref().map(time_ms).transpose()?;
    let until = request.until.as_ref().map(time_ms).transpose()?;
    if let (Some(since), Some(until)) = (since, until)
        && until < since
    {
        return Err(invalid("until", "is before `since`"));
    }
    let mut before = match request.page_token.as_str() {
        "" => None,
        token => Some(parse_task_id(token)?),
    };
    // Task ids are ULIDs: their top 48 bits are the millisecond they were
    // made, so a time bound is an id bound (`until` takes its whole
    // millisecond).
    if let Some(end) = until.and_then(first_id_after) {
        before = Some(before.map_or(end, |b| b.min(end)));
    }
    let mut from = since.map(|ms| TaskId::from_u128(u128::from(ms) << 80));
    // A job's tasks: its one range of ids, oldest first; the page token
    // is the last id of the previous page.
    let ascending = !request.job.is_empty();
    if ascending {
        let job = parse_task_id(&request.job)?;
        if crate::scheduler::graph::job_of(job) != job {
            return Err(invalid(
                "job",
                "not a job id (the first task id of a Submit)",
            ));
        }
        let end = TaskId::from_u128(
            crate::scheduler::graph::job_end(job)
                .as_u128()
                .saturating_add(1),
        );
        let after = match request.page_token.as_str() {
            "" => job,
            token => TaskId::from_u128(parse_task_id(token)?.as_u128().saturating_add(1)),
        };
        from = Some(from.map_or(after, |f| f.max(after)));
        before = Some(until.and_then(first_id_after).map_or(end, |u| end.min(u)));
    }
    let query = ListQuery {
        state,
        before,
        from,
        labels: request.labels.into_iter().collect(),
        name: request.name,
        node: request.node.trim().to_owned(),
        limit,
        scan: MAX_LIST_SCAN,
        ascending,
        // The `List` handler bounds it by its --max-message-size.
        budget: usize::MAX,
    };
    Ok(query)
}

/// The first task id made after millisecond `ms`: the exclusive id bound
/// of `until`. `None` after the last millisecond ids can hold (its next
/// would not fit in 48 bits): no bound.
fn first_id_after(ms: u64) -> Option<TaskId> {
    let next = u128::from(ms) + 1;
    (next < 1 << 48).then(|| TaskId::from_u128(next << 80))
}

/// A filter's time as milliseconds since the Unix epoch (ULIDs hold 48
/// bits of them); before 1970 or past the year 10889 is malformed.
fn time_ms(time: &prost_types::Timestamp) -> Result<u64, Error> {
    let ms = i128::from(time.seconds) * 1000 + i128::from(time.nanos) / 1_000_000;
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms < 1 << 48)
        .ok_or_else(|| {
            Error::from(ConversionError::Invalid {
                field: "since/until",
                reason: "a time between 1970 and the year 10889".to_owned(),
            })
        })
}
/// Most ids one `WaitMany` call may name.
pub(crate) const MAX_WAIT_MANY: usize = 100_000;

/// Who a stream counts against for `--max-streams-per-client`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Client {
    /// The caller's token id (auth on).
    Token(String),
    /// The peer's IP address (`--no-auth`).
    Address(IpAddr),
    /// Neither is known (not a TCP peer): all such callers share one count.
    Unknown,
}

impl Client {
    fn of<T>(request: &Request<T>) -> Client {
        if let Some(id) = request
            .extensions()
            .get::<Caller>()
            .and_then(|caller| caller.token_id.clone())
        {
            return Client::Token(id);
        }
        match request.remote_addr() {
            Some(addr) => Client::Address(addr.ip()),
            None => Client::Unknown,
        }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Token(id) => write!(f, "token {id}"),
            Client::Address(ip) => write!(f, "address {ip}"),
            Client::Unknown => f.write_str("an unknown peer"),
        }
    }
}

/// How often a refusal for too many streams is logged at most.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The `Watch`, `Run` and `WaitMany` streams open per client, each at most
/// `--max-streams-per-client`. A place is held by a [`StreamPlace`] for as
/// long as the stream lives.
pub(crate) struct ClientStreams {
    max: usize,
    open: Mutex<OpenStreams>,
}

#[derive(Default)]
struct OpenStreams {
    by_client: HashMap<Client, usize>,
    last_warned: Option<Instant>,
}

impl ClientStreams {
    fn new(max: usize) -> Arc<ClientStreams> {
        Arc::new(ClientStreams {
            max,
            open: Mutex::new(OpenStreams::default()),
        })
    }

    /// Takes one of `client`'s places, or RESOURCE_EXHAUSTED naming the
    /// limit and the flag when it holds them all.
    fn open(self: &Arc<Self>, client: Client) -> Result<StreamPlace, Status> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.by_client.entry(client.clone()).or_default();
        if *count >= self.max {
            let message = format!(
                "too many streams: {client} already has {count} Watch, Run and WaitMany streams open, the most one client may (--max-streams-per-client {}); end one, or ask the operator to raise the limit",
                self.max
            );
            let now = Instant::now();
            if open
                .last_warned
                .is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_EVERY)
            {
                open.last_warned = Some(now);
                tracing::warn!(%client, max = self.max, "stream refused: client at --max-streams-per-client (logged at most every 10s)");
            }
            return Err(Status::resource_exhausted(message));
        }
        *count += 1;
        Ok(StreamPlace {
            streams: Arc::clone(self),
            client,
        })
    }

    /// Streams `client` has open.
    #[cfg(test)]
    fn count(&self, client: &Client) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.by_client.get(client).copied().unwrap_or(0)
    }
}

/// One open stream's place among its client's; given back when dropped.
pub(crate) struct StreamPlace {
    streams: Arc<ClientStreams>,
    client: Client,
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.by_client.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.by_client.remove(&self.client);
            }
        }
    }
}

/// A response stream holding its client's [`StreamPlace`]: tonic drops it
/// when the stream ends or the client goes away, which frees the place.
pub(crate) struct Counted<S> {
    inner: S,
    _place: StreamPlace,
    /// Counted in `weft_watch_streams` while it lives.
    _open: OpenStream,
}

impl<S: Stream + Unpin> Stream for Counted<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// The client API.
pub(crate) struct TaskApi {
    pub handle: Handle,
    streams: Arc<ClientStreams>,
}

impl TaskApi {
    /// `WaitMany` and `WaitManyBatches`: checks the request (scope, id
    /// count, ids), registers the waiter, and answers its feed of final
    /// records with the client's stream place. Unknown ids fail the call
    /// itself, before anything is streamed.
    async fn open_wait_many(
        &self,
        request: Request<pb::WaitManyRequest>,
    ) -> Result<(FinalTasks, StreamPlace), Status> {
        auth::require(&request, Scope::Read)?;
        let place = self.streams.open(Client::of(&request))?;
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
        let view = super::task_view(request.view)?;
        let outcomes_only = view == pb::TaskView::Result;
        let finals = wait_final(&self.handle, ids, pending, outcomes_only).await?;
        let tasks: fn(Result<Arc<TaskRecord>, Error>) -> Result<pb::Task, Status> = match view {
            pb::TaskView::Result => |task| task.map(|t| task_result_pb(&t)).map_err(Status::from),
            pb::TaskView::Unspecified | pb::TaskView::Full => {
                |task| task.map(|t| task_to_pb(&t)).map_err(Status::from)
            }
        };
        Ok((finals.map(tasks), place))
    }

    /// The client API over the driver's `handle`.
    pub fn new(handle: Handle) -> TaskApi {
        let streams = ClientStreams::new(handle.config.max_streams_per_client);
        TaskApi { handle, streams }
    }

    /// Validates and submits `specs`, from a request of `bytes` bytes.
    /// Submits what a `Submit` or `Run` request carried: its task specs,
    /// field 1 of either message, so the request's size is the sum of
    /// theirs as that field (measured while their limits are checked, not
    /// by walking the request again).
    async fn submit_specs(&self, specs: Vec<pb::TaskSpec>) -> Result<Vec<TaskId>, Error> {
        let limits = self.handle.config.spec_limits();
        let mut bytes = 0;
        let specs = specs
            .into_iter()
            .enumerate()
            .map(|(index, spec)| {
                let (spec, len) = validate_spec(&limits, index, spec)?;
                bytes += weft_proto::wire::message_len(1, len);
                Ok(spec)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        self.handle.metrics.observe_submit(specs.len(), bytes);
        // Traced: the `submit` spans run from here to the acknowledgement.
        let received = SystemTime::now();
        let contexts: Option<Vec<_>> = self
            .handle
            .trace
            .as_ref()
            .map(|_| specs.iter().map(|spec| spec.trace.clone()).collect());
        let ids = if specs
            .iter()
            .any(|s| !s.after.is_empty() || s.not_before.is_some())
        {
            super::jobs::submit_graph(&self.handle, specs).await?
        } else {
            self.handle
                .call(|reply| Command::Submit { specs, reply })
                .await??
        };
        if let (Some(trace), Some(contexts)) = (&self.handle.trace, contexts) {
            trace.submitted(ids.iter().copied().zip(contexts).collect(), received);
        }
        Ok(ids)
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
        let pending: Vec<usize> = (0..records.len())
            .filter(|i| records[*i].state == TaskState::Pending)
            .collect();
        if !pending.is_empty() {
            let ids = pending.iter().map(|i| records[*i].id).collect();
            let waiting = self
                .handle
                .call(|reply| Command::Waiting { ids, reply })
                .await?;
            for (i, waiting) in pending.into_iter().zip(waiting) {
                if let Some((ids, reason)) = waiting {
                    records[i].waiting_for = ids;
                    records[i].pending_reason = reason;
                }
            }
        }
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

    fn watch_stream(
        &self,
        id: TaskId,
        from_seq: u64,
        place: StreamPlace,
        rpc: WatchRpc,
    ) -> EventStream {
        let events: fn(Result<TaskEvent, Error>) -> Result<pb::TaskEvent, Status> =
            |event| event.map(|e| event_to_pb(&e)).map_err(Status::from);
        Counted {
            inner: follow(&self.handle, id, from_seq).map(events),
            _place: place,
            _open: self.handle.metrics.open_stream(rpc),
        }
    }
}

/// A submitted spec as the scheduler takes it: within this coordinator's
/// limits, then well-formed. INVALID_ARGUMENT or RESOURCE_EXHAUSTED
/// (too large), naming spec `index` and the field.
pub(crate) fn validate_spec(
    limits: &SpecLimits,
    index: usize,
    spec: pb::TaskSpec,
) -> Result<(TaskSpec, usize), Error> {
    limits
        .checked_len(&spec)
        .and_then(|len| Ok((TaskSpec::try_from(spec)?, len)))
        .map_err(|source| Error::InvalidSpec { index, source })
}

#[tonic::async_trait]
impl pb::task_service_server::TaskService for TaskApi {
    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        auth::require(&request, Scope::Cancel)?;
        let request = request.into_inner();
        let job = parse_task_id(&request.job_id)?;
        // Before the job's tasks are read: as List's job filter answers.
        if crate::scheduler::graph::job_of(job) != job {
            return Err(Error::from(ConversionError::Invalid {
                field: "job_id",
                reason: "not a job id (the first task id of a Submit)".to_owned(),
            })
            .into());
        }
        weft_proto::limits::check_cancel_reason(&request.reason).map_err(Error::from)?;
        let tasks = super::jobs::job_tasks(&self.handle, job).await?;
        if tasks.is_empty() {
            return Err(Error::JobNotFound(job).into());
        }
        // Newest first; the scheduler puts children before the tasks they
        // run after (a ref may point forward, to a task later in the
        // Submit), so they end CANCELLED themselves rather than by their rule.
        let ids: Vec<TaskId> = tasks
            .iter()
            .rev()
            .filter(|(_, state)| !state.is_final())
            .map(|(id, _)| *id)
            .collect();
        let reason = match request.reason.trim() {
            "" => format!("job {job} cancelled by client"),
            reason => reason.to_owned(),
        };
        let cancelled = self
            .handle
            .call(|reply| Command::CancelMany { ids, reason, reply })
            .await??;
        let total = u32::try_from(tasks.len()).unwrap_or(u32::MAX);
        Ok(Response::new(pb::CancelJobResponse {
            cancelled,
            already_final: total.saturating_sub(cancelled),
        }))
    }

    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        auth::require(&request, Scope::Submit)?;
        auth::require_for_specs(&request, &request.get_ref().tasks)?;
        let ids = self.submit_specs(request.into_inner().tasks).await?;
        Ok(Response::new(pb::SubmitResponse {
            job_id: ids.first().map(TaskId::to_string).unwrap_or_default(),
            task_ids: ids.iter().map(TaskId::to_string).collect(),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        auth::require(&request, Scope::Read)?;
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
        auth::require(&request, Scope::Read)?;
        let request = request.into_inner();
        let budget = self.handle.config.max_message_size;
        // The store stops reading records at about the message size (by
        // an estimate of each task's encoded size), so a page of large
        // tasks never loads `limit` of them only to send a few.
        let query = ListQuery {
            budget,
            ..list_query(request)?
        };
        let page = blocking(&self.handle.store, "listing tasks", move |store| {
            store.list_page(&query)
        })
        .await
        .map_err(Error::from)?;
        let (mut records, resume) = (page.tasks, page.resume);
        self.with_pending(&mut records).await?;
        // A page ends early where the next task would take the answer past
        // --max-message-size (it always holds one task), by the exact
        // encoding this time (the store's cut was by an estimate, without
        // what `with_pending` added): the client goes on from the page
        // token as after a full page.
        let mut tasks = Vec::with_capacity(records.len());
        let mut size = 0;
        for record in &records {
            let task = task_to_pb(record);
            size += prost::encoding::message::encoded_len(1, &task);
            if !tasks.is_empty() && size > budget {
                break;
            }
            tasks.push(task);
        }
        // Cut short by the message size: on from the last task sent;
        // otherwise from where the store's scan stopped, if it did.
        let next_page_token = match tasks.last() {
            Some(last) if tasks.len() < records.len() => last.id.clone(),
            _ => resume.map(|id| id.to_string()).unwrap_or_default(),
        };
        Ok(Response::new(pb::ListResponse {
            tasks,
            next_page_token,
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        auth::require(&request, Scope::Read)?;
        let place = self.streams.open(Client::of(&request))?;
        let request = request.into_inner();
        let id = parse_task_id(&request.task_id)?;
        // Unknown ids fail the call itself, not the stream.
        self.read_task(id).await?;
        Ok(Response::new(self.watch_stream(
            id,
            request.from_seq,
            place,
            WatchRpc::Watch,
        )))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        auth::require(&request, Scope::Cancel)?;
        let can_read = auth::allows(&request, Scope::Read);
        let request = request.into_inner();
        let id = parse_task_id(&request.task_id)?;
        weft_proto::limits::check_cancel_reason(&request.reason).map_err(Error::from)?;
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
        // A token without `read` learns only the id and the state, not
        // the task's argv, env, stdin, input or output.
        if !can_read {
            return Ok(Response::new(pb::CancelResponse {
                task: Some(pb::Task {
                    id: id.to_string(),
                    state: i32::from(record[0].state),
                    ..Default::default()
                }),
            }));
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
        let (finals, place) = self.open_wait_many(request).await?;
        Ok(Response::new(Counted {
            inner: finals,
            _place: place,
            _open: self.handle.metrics.open_stream(WatchRpc::WaitMany),
        }))
    }

    type WaitManyBatchesStream = Counted<Batches<FinalTasks>>;

    async fn wait_many_batches(
        &self,
        request: Request<pb::WaitManyRequest>,
    ) -> Result<Response<Self::WaitManyBatchesStream>, Status> {
        let (finals, place) = self.open_wait_many(request).await?;
        Ok(Response::new(Counted {
            inner: Batches::new(finals),
            _place: place,
            _open: self.handle.metrics.open_stream(WatchRpc::WaitMany),
        }))
    }

    type RunStream = EventStream;

    async fn run(
        &self,
        request: Request<pb::RunRequest>,
    ) -> Result<Response<Self::RunStream>, Status> {
        auth::require(&request, Scope::Submit)?;
        auth::require_for_specs(&request, &request.get_ref().spec)?;
        // Before the submit: a Run refused here leaves no task behind.
        let place = self.streams.open(Client::of(&request))?;
        let spec = request.into_inner().spec.ok_or(Error::InvalidArgument(
            weft_proto::ConversionError::MissingField("spec"),
        ))?;
        let ids = self.submit_specs(vec![spec]).await?;
        let id = ids.first().copied().ok_or(Error::InvalidArgument(
            weft_proto::ConversionError::MissingField("spec"),
        ))?;
        Ok(Response::new(self.watch_stream(
            id,
            0,
            place,
            WatchRpc::Run,
        )))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;
    use tonic::Code;

    use super::*;

    const LIMITS: SpecLimits = SpecLimits {
        max_slots: 4,
        max_spec_bytes: 512,
    };

    #[test]
    fn a_job_id_at_the_top_of_the_id_space_lists_and_does_not_panic() {
        // The last job id there is: its tasks' range ends at the top.
        let job = "7ZZZZZZZZZZZZZZZZZZW000000";
        let query = list_query(pb::ListRequest {
            job: job.into(),
            ..Default::default()
        })
        .expect("a job id");
        assert_eq!(query.from.map(|id| id.to_string()).as_deref(), Some(job));
        assert!(query.before.is_some_and(|b| Some(b) > query.from));
    }

    #[test]
    fn until_at_the_largest_accepted_time_lists_every_task_up_to_it() {
        use crate::store::{MemoryStore, Record, Store};

        let last_ms: i64 = (1 << 48) - 1;
        let until = prost_types::Timestamp {
            seconds: last_ms / 1000,
            nanos: i32::try_from(last_ms % 1000).unwrap() * 1_000_000,
        };
        let job = crate::scheduler::graph::job_of(TaskId::new());
        let spec = Arc::new(TaskSpec::call("noop", ""));
        let store = MemoryStore::new();
        store
            .commit(&[Record::Task(TaskRecord::for_test(
                job,
                spec,
                TaskState::Queued,
                SystemTime::now(),
            ))])
            .unwrap();
        // Newest first, and a job's tasks oldest first.
        for job_filter in [String::new(), job.to_string()] {
            let query = list_query(pb::ListRequest {
                until: Some(until),
                job: job_filter.clone(),
                ..Default::default()
            })
            .expect("the largest time is accepted");
            let page = store.list_page(&query).unwrap();
            let listed: Vec<TaskId> = page.tasks.iter().map(|t| t.id).collect();
            assert_eq!(listed, [job], "job filter {job_filter:?}");
        }
    }

    #[test]
    fn too_large_is_resource_exhausted_and_malformed_invalid_argument() {
        let code = |spec: TaskSpec| {
            validate_spec(&LIMITS, 3, pb::TaskSpec::from(spec))
                .map(|_| ())
                .map_err(|err| Status::from(err).code())
        };
        assert_eq!(code(TaskSpec::call("echo", "")), Ok(()));
        assert_eq!(
            code(TaskSpec::call("echo", vec![0u8; 600])),
            Err(Code::ResourceExhausted)
        );
        assert_eq!(
            code(TaskSpec::call("echo", "").slots(5)),
            Err(Code::InvalidArgument)
        );
        assert_eq!(
            code(TaskSpec::call("ec\0ho", "")),
            Err(Code::InvalidArgument)
        );
        let err = validate_spec(&LIMITS, 3, pb::TaskSpec::from(TaskSpec::call("a\0", "")));
        let message = Status::from(err.unwrap_err()).message().to_owned();
        assert!(
            message.starts_with("task 3: ") && message.contains("call.handler"),
            "{message}"
        );
    }

    #[test]
    fn a_submits_size_is_measured_from_its_specs_as_the_request_encodes() {
        let specs: Vec<pb::TaskSpec> = [
            TaskSpec::call("noop", ""),
            TaskSpec::call("echo", vec![7u8; 300]),
            TaskSpec::call("noop", "1")
                .priority(7)
                .fair_key("team-a", 2)
                .concurrency("user-42", 3, weft_proto::OverLimit::Queue)
                .resource("cpu", 2),
        ]
        .into_iter()
        .map(pb::TaskSpec::from)
        .collect();
        let measured: usize = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                weft_proto::wire::message_len(1, validate_spec(&LIMITS, i, spec.clone()).unwrap().1)
            })
            .sum();
        assert_eq!(
            measured,
            pb::SubmitRequest {
                tasks: specs.clone()
            }
            .encoded_len()
        );
        let one = specs[2].clone();
        assert_eq!(
            weft_proto::wire::message_len(1, validate_spec(&LIMITS, 0, one.clone()).unwrap().1),
            pb::RunRequest { spec: Some(one) }.encoded_len()
        );
    }

    #[test]
    fn a_client_past_its_streams_is_resource_exhausted_naming_the_flag_and_others_are_not() {
        let streams = ClientStreams::new(2);
        let alice = Client::Token("a1".into());
        let bob = Client::Address("10.0.0.2".parse().unwrap());
        let first = streams.open(alice.clone()).unwrap();
        let _second = streams.open(alice.clone()).unwrap();
        let refused = streams.open(alice.clone()).err().unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(
            refused.message().contains("--max-streams-per-client 2")
                && refused.message().contains("token a1"),
            "{}",
            refused.message()
        );
        let _other = streams.open(bob.clone()).unwrap();
        assert_eq!(streams.count(&bob), 1);
        drop(first);
        assert_eq!(streams.count(&alice), 1);
        let _again = streams.open(alice.clone()).unwrap();
        assert_eq!(streams.count(&alice), 2);
    }

    proptest! {
        /// Whatever a client submits, validation never panics, and a
        /// refusal is INVALID_ARGUMENT or RESOURCE_EXHAUSTED: a code the
        /// client can act on, never INTERNAL or OUT_OF_RANGE.
        #[test]
        fn any_submitted_spec_converts_or_is_refused_with_a_client_code(bytes in prop::collection::vec(any::<u8>(), 0..700)) {
            if let Ok(spec) = pb::TaskSpec::decode(bytes.as_slice())
                && let Err(err) = validate_spec(&LIMITS, 0, spec)
            {
                let code = Status::from(err).code();
                prop_assert!(
                    matches!(code, Code::InvalidArgument | Code::ResourceExhausted),
                    "{code:?}"
                );
            }
        }
    }

    use pb::task_service_server::TaskService as _;

    /// The API over a running driver with the memory store and no node
    /// (what is submitted stays queued); `stop` ends the driver.
    struct Running {
        api: TaskApi,
        cancel: tokio_util::sync::CancellationToken,
        run: tokio::task::JoinHandle<()>,
    }

    impl Running {
        fn start() -> Running {
            let config = crate::config::CoordinatorConfig::default();
            let mut scheduler = crate::scheduler::Scheduler::new((&config).into());
            let metrics = Arc::new(crate::metrics::Metrics::default());
            scheduler.set_metrics(Arc::clone(metrics.tasks()));
            let cancel = tokio_util::sync::CancellationToken::new();
            let (driver, handle) = crate::driver::new(
                scheduler,
                Arc::new(crate::store::MemoryStore::new()),
                Arc::new(config),
                metrics,
                cancel.clone(),
                tokio_util::task::TaskTracker::new(),
            );
            let run = tokio::spawn(driver.run());
            Running {
                api: TaskApi::new(handle),
                cancel,
                run,
            }
        }

        /// Submits `n` tasks in one Submit: its job id and task ids.
        async fn submit(&self, n: usize) -> pb::SubmitResponse {
            let spec = pb::TaskSpec::from(TaskSpec::call("noop", ""));
            self.api
                .submit(admin(pb::SubmitRequest {
                    tasks: vec![spec; n],
                }))
                .await
                .unwrap_or_else(|err| panic!("{err}"))
                .into_inner()
        }

        async fn state(&self, id: &str) -> i32 {
            let task = self
                .api
                .get(admin(pb::GetRequest {
                    task_id: id.to_owned(),
                }))
                .await
                .unwrap_or_else(|err| panic!("{err}"))
                .into_inner()
                .task;
            task.map(|t| t.state).unwrap_or_default()
        }

        async fn stop(self) {
            self.cancel.cancel();
            self.run.await.unwrap_or_else(|err| panic!("{err}"));
        }
    }

    /// `message` as the edge passes it on for an admin caller.
    fn admin<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(Caller {
            token_id: None,
            scopes: crate::auth::Scopes::ADMIN,
        });
        request
    }

    #[tokio::test]
    async fn a_cancel_reason_past_its_limit_is_invalid_argument_and_cancels_nothing() {
        use weft_proto::limits::MAX_CANCEL_REASON_BYTES;

        let running = Running::start();
        let job = running.submit(2).await;
        let long = "x".repeat(MAX_CANCEL_REASON_BYTES + 1);
        let refused = [
            running
                .api
                .cancel(admin(pb::CancelRequest {
                    task_id: job.task_ids[0].clone(),
                    reason: long.clone(),
                }))
                .await
                .map(drop),
            running
                .api
                .cancel_job(admin(pb::CancelJobRequest {
                    job_id: job.job_id.clone(),
                    reason: long,
                }))
                .await
                .map(drop),
        ];
        for refused in refused {
            let status = refused.expect_err("a reason past the limit");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(
                status.message().contains("`reason`")
                    && status
                        .message()
                        .contains(&MAX_CANCEL_REASON_BYTES.to_string()),
                "{}",
                status.message()
            );
        }
        for id in &job.task_ids {
            assert_eq!(running.state(id).await, i32::from(TaskState::Queued));
        }
        // At the limit it is taken, and kept whole.
        let longest = "y".repeat(MAX_CANCEL_REASON_BYTES);
        let task = running
            .api
            .cancel(admin(pb::CancelRequest {
                task_id: job.task_ids[0].clone(),
                reason: longest.clone(),
            }))
            .await
            .unwrap_or_else(|err| panic!("{err}"))
            .into_inner()
            .task
            .unwrap_or_default();
        assert_eq!(task.state, i32::from(TaskState::Cancelled));
        assert_eq!(task.error, longest);
        running.stop().await;
    }

    #[tokio::test]
    async fn cancel_job_naming_a_task_that_is_not_a_job_is_invalid_argument_and_cancels_nothing() {
        let running = Running::start();
        let job = running.submit(2).await;
        let status = running
            .api
            .cancel_job(admin(pb::CancelJobRequest {
                job_id: job.task_ids[1].clone(),
                reason: String::new(),
            }))
            .await
            .expect_err("the second task's id is not a job id");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("job_id") && status.message().contains("not a job id"),
            "{}",
            status.message()
        );
        for id in &job.task_ids {
            assert_eq!(running.state(id).await, i32::from(TaskState::Queued));
        }
        let answer = running
            .api
            .cancel_job(admin(pb::CancelJobRequest {
                job_id: job.job_id.clone(),
                reason: String::new(),
            }))
            .await
            .unwrap_or_else(|err| panic!("{err}"))
            .into_inner();
        assert_eq!((answer.cancelled, answer.already_final), (2, 0));
        running.stop().await;
    }
}
