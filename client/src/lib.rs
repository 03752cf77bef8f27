//! The typed Rust client for Weft: a library that depends on `weft-proto`
//! and the gRPC stack only (the `weft` command line is the `weft-cli` crate).
//!
//! [`Client`] wraps one gRPC channel to a coordinator and speaks the
//! `TaskService` and `AdminService` of `weft.v1` in domain types: specs go in
//! as [`TaskSpec`], answers come back as [`Task`], [`TaskEvent`],
//! [`NodeInfo`] and [`ClusterInfo`], failures as a classified [`Error`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), weft_client::Error> {
//! use weft_client::{Client, TaskSpec};
//! let client = Client::connect("http://127.0.0.1:7070").await?;
//! let id = client.submit(TaskSpec::call("sha256", "hello")).await?;
//! let task = client.wait(id).await?;
//! println!("{} {}", task.state, String::from_utf8_lossy(&task.output));
//! # Ok(()) }
//! ```
//!
//! Unary calls carry a client-side deadline ([`UNARY_DEADLINE`]); `watch` and
//! `run` streams carry none, because a task may run for hours.
//!
//! Layout:
//! - `lib.rs`: [`Client`] and its calls.
//! - `connect.rs`: connecting (address forms, TLS trust, the plaintext
//!   probe) and wrapping a channel.
//! - `token.rs`: [`BearerToken`], the client token on every call.
//! - `follow.rs`: [`Client::follow`], a watch that resumes across dropped
//!   connections and coordinator restarts.
//! - [`error`]: [`Error`], the classification of `tonic::Status`.
//! - [`types`]: the domain views of tasks, events, nodes, cluster figures.

mod connect;
pub mod error;
mod follow;
mod schedule;
mod token;
pub mod types;

#[cfg(test)]
mod tests;

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};

use bytes::Bytes;

use weft_proto::SpecFields;
use weft_proto::convert::duration_to_pb;
use weft_proto::pb;
use weft_proto::pb::admin_service_client::AdminServiceClient;
use weft_proto::pb::task_service_client::TaskServiceClient;
use weft_proto::wire::EncodedCodec;

pub use error::Error;

/// A named limit and how it stands now (`Client::limits`).
#[derive(Clone, Debug, PartialEq)]
pub struct LimitInfo {
    /// The limit.
    pub limit: weft_proto::policy::Limit,
    /// For a rate limit: whole units in its bucket now.
    pub available: u64,
    /// For a concurrency key: its tasks assigned or running now.
    pub running: u32,
    /// Ready tasks waiting on it now.
    pub waiting: u64,
}
use token::AuthChannel;
pub use token::BearerToken;
pub use types::{
    ClusterInfo, EventBody, JobCancelled, ListFilter, SubmitOutcome, Task, TaskAttempt, TaskEvent,
};
pub use weft_proto::tls::Trust;
pub use weft_proto::{
    Attempt, CallSpec, ExecSpec, NodeId, NodeInfo, NodeState, Outcome, OutputStream, TaskId,
    TaskKind, TaskSpec, TaskState,
};

/// How long [`Client::connect`] tries before an unreachable coordinator is an error.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Deadline of every unary call (submit, get, list, cancel, nodes, ...).
pub const UNARY_DEADLINE: Duration = Duration::from_secs(30);

/// Specs sent per `Submit` call by [`Client::submit_many`].
pub const SUBMIT_BATCH: usize = 5_000;

/// Ids sent per `WaitMany` call by [`Client::wait_many`]: within the
/// coordinator's 100,000, and few enough (28 bytes each on the wire) that
/// a call fits in the smallest message limit a coordinator may set (1 MiB).
pub const WAIT_MANY_BATCH: usize = 30_000;

/// How long [`Client::follow`] and [`Client::wait`] keep trying to resume a
/// broken watch before they give up with [`Error::Unavailable`].
pub const RESUME_WINDOW: Duration = Duration::from_secs(30);

/// Largest `List` page the coordinator serves.
const MAX_PAGE: u32 = 10_000;

/// Largest answer accepted: one task with its spec and its output, each
/// up to the largest `--max-message-size` (a `List` page is cut to the
/// coordinator's limit).
const MAX_MESSAGE_BYTES: usize = weft_proto::limits::CLIENT_MAX_MESSAGE_BYTES;

/// A stream of a task's events; it ends after the event with the final task.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<TaskEvent, Error>> + Send>>;

/// A stream of final tasks (see [`Client::wait_many`]).
pub type TaskStream = Pin<Box<dyn Stream<Item = Result<Task, Error>> + Send>>;

/// A connection to one coordinator. Cheap to clone: clones share the channel.
#[derive(Clone, Debug)]
pub struct Client {
    url: String,
    /// Set when connected with several coordinator addresses: how
    /// [`Client::follow`] dials them again after its stream broke.
    redial: Option<std::sync::Arc<connect::Redial>>,
    tasks: TaskServiceClient<AuthChannel>,
    /// The same channel for calls whose requests are encoded here from
    /// borrowed specs (`Submit`: see [`weft_proto::wire`]).
    encoded: tonic::client::Grpc<AuthChannel>,
    admin: AdminServiceClient<AuthChannel>,
    schedules: pb::schedule_service_client::ScheduleServiceClient<AuthChannel>,
}

impl Client {
    /// The coordinator URL this client dialed.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Submits one task and answers its id.
    pub async fn submit(&self, spec: TaskSpec) -> Result<TaskId, Error> {
        let ids = self
            .submit_batch(SubmitRequest::of(std::slice::from_ref(&spec)))
            .await?;
        ids.into_iter()
            .next()
            .ok_or(Error::Protocol(weft_proto::ConversionError::MissingField(
                "SubmitResponse.task_ids",
            )))
    }

    /// Submits many tasks, [`SUBMIT_BATCH`] per `Submit` call (fewer when
    /// that many would make a request larger than the smallest message
    /// limit a coordinator may set, 1 MiB), and answers their ids in order.
    /// Each batch is all or nothing; on an error, the batches before it
    /// stay submitted.
    pub async fn submit_many(&self, specs: Vec<TaskSpec>) -> Result<Vec<TaskId>, Error> {
        let budget = weft_proto::limits::max_spec_bytes(weft_proto::limits::MIN_MAX_MESSAGE_BYTES);
        let mut ids = Vec::with_capacity(specs.len());
        let mut batch = SubmitRequest::default();
        let mut spec_bytes = Vec::new();
        for spec in &specs {
            spec_bytes.clear();
            spec.encode_fields(SpecFields::Submitted, &mut spec_bytes);
            let len = weft_proto::wire::message_len(1, spec_bytes.len());
            if batch.specs > 0 && (batch.specs == SUBMIT_BATCH || batch.bytes.len() + len > budget)
            {
                ids.extend(self.submit_batch(std::mem::take(&mut batch)).await?);
            }
            batch.push_encoded(&spec_bytes);
        }
        if batch.specs > 0 {
            ids.extend(self.submit_batch(batch).await?);
        }
        Ok(ids)
    }

    /// Submits `specs` in ONE `Submit` call, all or nothing: a graph whose
    /// tasks name each other by ref (`TaskSpec::ref_name`, `after_ref`).
    /// Answers the job id and every task's id in order.
    pub async fn submit_graph(&self, specs: Vec<TaskSpec>) -> Result<SubmitOutcome, Error> {
        let request = SubmitRequest::of(&specs);
        let sent = request.specs;
        let answer = self.submit_call(request).await?;
        let task_ids = answer
            .task_ids
            .iter()
            .map(|id| id.parse().map_err(Error::from))
            .collect::<Result<Vec<TaskId>, Error>>()?;
        if task_ids.len() != sent {
            return Err(Error::Protocol(weft_proto::ConversionError::Invalid {
                field: "task_ids",
                reason: format!("{} ids for {sent} specs", task_ids.len()),
            }));
        }
        let job_id = match answer.job_id.as_str() {
            "" => task_ids.first().copied().ok_or(Error::Protocol(
                weft_proto::ConversionError::MissingField("SubmitResponse.job_id"),
            ))?,
            id => id.parse()?,
        };
        Ok(SubmitOutcome { job_id, task_ids })
    }

    /// Cancels every live task of a job (PENDING ones too); NOT_FOUND when
    /// the job has no tasks.
    pub async fn cancel_job(&self, job: TaskId, reason: &str) -> Result<JobCancelled, Error> {
        let mut client = self.tasks.clone();
        let answer = unary(client.cancel_job(request(pb::CancelJobRequest {
            job_id: job.to_string(),
            reason: reason.to_owned(),
        })))
        .await?;
        Ok(JobCancelled {
            cancelled: answer.cancelled,
            already_final: answer.already_final,
        })
    }

    /// Every task of a job, oldest first (paged through all of them).
    pub async fn job_tasks(&self, job: TaskId) -> Result<Vec<Task>, Error> {
        let filter = ListFilter {
            job: Some(job),
            ..ListFilter::default()
        };
        self.list_filtered(&filter, u32::MAX).await
    }

    async fn submit_batch(&self, request: SubmitRequest) -> Result<Vec<TaskId>, Error> {
        let sent = request.specs;
        let answer = self.submit_call(request).await?;
        if answer.task_ids.len() != sent {
            return Err(Error::Protocol(weft_proto::ConversionError::Invalid {
                field: "task_ids",
                reason: format!("{} ids for {sent} specs", answer.task_ids.len()),
            }));
        }
        answer
            .task_ids
            .iter()
            .map(|id| id.parse().map_err(Error::from))
            .collect()
    }

    /// One `Submit` call with a request encoded here.
    async fn submit_call(&self, submit: SubmitRequest) -> Result<pb::SubmitResponse, Error> {
        let mut grpc = self.encoded.clone();
        let call = async move {
            grpc.ready()
                .await
                .map_err(|err| tonic::Status::unavailable(format!("the channel failed: {err}")))?;
            let mut call = request(Bytes::from(submit.bytes));
            call.extensions_mut()
                .insert(tonic::GrpcMethod::new("weft.v1.TaskService", "Submit"));
            grpc.unary(
                call,
                http::uri::PathAndQuery::from_static("/weft.v1.TaskService/Submit"),
                EncodedCodec::<pb::SubmitResponse>::default(),
            )
            .await
        };
        unary(call).await
    }

    /// One task's current record.
    pub async fn get(&self, id: TaskId) -> Result<Task, Error> {
        let mut client = self.tasks.clone();
        let answer = unary(client.get(request(pb::GetRequest {
            task_id: id.to_string(),
        })))
        .await?;
        task_from(answer.task, "GetResponse.task")
    }

    /// Up to `limit` tasks (0: 100), newest first, optionally only those
    /// in `state`.
    pub async fn list(&self, state: Option<TaskState>, limit: u32) -> Result<Vec<Task>, Error> {
        let filter = ListFilter {
            state,
            ..ListFilter::default()
        };
        self.list_filtered(&filter, limit).await
    }

    /// Up to `limit` tasks (0: 100) that match `filter`, newest first. The
    /// coordinator examines a bounded number of tasks per call, so a
    /// filter few tasks match may take several calls; this pages until it
    /// has `limit` tasks or no task is left to examine.
    pub async fn list_filtered(&self, filter: &ListFilter, limit: u32) -> Result<Vec<Task>, Error> {
        let limit = if limit == 0 { 100 } else { limit };
        let mut tasks = Vec::new();
        let mut page_token = String::new();
        loop {
            let want = (limit - tasks.len() as u32).min(MAX_PAGE);
            let mut client = self.tasks.clone();
            let page = unary(client.list(request(pb::ListRequest {
                state: filter.state.map(i32::from).unwrap_or_default(),
                limit: want,
                page_token,
                labels: filter.labels.clone().into_iter().collect(),
                name: filter.name.clone(),
                node: filter.node.clone(),
                since: filter.since.map(weft_proto::convert::timestamp),
                until: filter.until.map(weft_proto::convert::timestamp),
                job: filter.job.map(|j| j.to_string()).unwrap_or_default(),
            })))
            .await?;
            for task in page.tasks {
                tasks.push(Task::try_from(task)?);
            }
            if tasks.len() as u32 >= limit || page.next_page_token.is_empty() {
                tasks.truncate(limit as usize);
                return Ok(tasks);
            }
            page_token = page.next_page_token;
        }
    }

    /// A task's events from `from_seq` on: the recorded ones, then live
    /// ones, ending after the final task. The stream fails if the
    /// connection drops; see [`Client::follow`] for one that resumes.
    pub async fn watch(&self, id: TaskId, from_seq: u64) -> Result<EventStream, Error> {
        let mut client = self.tasks.clone();
        let stream = client
            .watch(pb::WatchRequest {
                task_id: id.to_string(),
                from_seq,
            })
            .await?
            .into_inner();
        Ok(events(stream))
    }

    /// Submits `spec` and streams its events: the first is the QUEUED state
    /// change carrying the new id, the last carries the final task.
    pub async fn run(&self, spec: TaskSpec) -> Result<EventStream, Error> {
        let mut client = self.tasks.clone();
        let stream = client
            .run(pb::RunRequest {
                spec: Some(spec.into()),
            })
            .await?
            .into_inner();
        Ok(events(stream))
    }

    /// Waits until the task reaches a final state and answers it, resuming
    /// the watch for up to [`RESUME_WINDOW`] if the connection drops.
    pub async fn wait(&self, id: TaskId) -> Result<Task, Error> {
        let mut events = self.follow(id, 0, RESUME_WINDOW);
        let mut finished = None;
        while let Some(event) = events.next().await {
            if let EventBody::Finished(task) = event?.body {
                // Keep polling: `follow` then reads the watch to its end,
                // which closes the HTTP/2 stream cleanly (see `Follow::next`).
                finished = Some(task);
            }
        }
        match finished {
            Some(task) => Ok(task),
            // `follow` ends only after `Finished` or an error; this is a guard.
            None => self.get(id).await,
        }
    }

    /// Waits for many tasks at once: yields each task's final record as
    /// soon as it is final (those already final first), in completion
    /// order, once per distinct id, and ends when all are done. Ids go
    /// [`WAIT_MANY_BATCH`] per `WaitMany` call, one call after the other.
    /// An unknown id fails the stream (NotFound). Unlike [`Client::wait`]
    /// it does not resume a dropped connection: on an error, wait again
    /// for the ids not yet yielded.
    pub fn wait_many(&self, ids: Vec<TaskId>) -> TaskStream {
        self.wait_many_view(ids, pb::TaskView::Full)
    }

    /// [`Client::wait_many`] for callers that need only the outcomes: each
    /// task comes without its spec ([`Task::spec`] is `None`), so the
    /// inputs are not sent back (`TASK_VIEW_RESULT`). A coordinator that
    /// predates the view sends whole records, which this yields as they
    /// are.
    pub fn wait_results(&self, ids: Vec<TaskId>) -> TaskStream {
        self.wait_many_view(ids, pb::TaskView::Result)
    }

    fn wait_many_view(&self, ids: Vec<TaskId>, view: pb::TaskView) -> TaskStream {
        let client = self.tasks.clone();
        let chunks: Vec<Vec<String>> = ids
            .chunks(WAIT_MANY_BATCH)
            .map(|chunk| chunk.iter().map(TaskId::to_string).collect())
            .collect();
        let stream = futures::stream::iter(chunks)
            .then(move |task_ids| {
                let mut client = client.clone();
                async move {
                    let stream = client
                        .wait_many(pb::WaitManyRequest {
                            task_ids,
                            view: view.into(),
                        })
                        .await?
                        .into_inner();
                    Ok::<_, Error>(stream.map(|item| Ok(Task::try_from(item?)?)))
                }
            })
            .try_flatten();
        Box::pin(stream)
    }

    /// Cancels a task; answers the task as it is after the cancel.
    pub async fn cancel(&self, id: TaskId) -> Result<Task, Error> {
        let mut client = self.tasks.clone();
        let answer = unary(client.cancel(request(pb::CancelRequest {
            task_id: id.to_string(),
            reason: "cancelled by client".to_owned(),
        })))
        .await?;
        task_from(answer.task, "CancelResponse.task")
    }

    /// Every node the coordinator knows, by name.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, Error> {
        let mut client = self.admin.clone();
        let answer = unary(client.list_nodes(request(pb::ListNodesRequest {}))).await?;
        let mut nodes = answer
            .nodes
            .into_iter()
            .map(NodeInfo::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        nodes.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(nodes)
    }

    /// Asks a node (by id or name) to drain within `grace` (`None`: the
    /// node's own default).
    pub async fn drain(&self, node: &str, grace: Option<Duration>) -> Result<NodeInfo, Error> {
        let mut client = self.admin.clone();
        let answer = unary(client.drain_node(request(pb::DrainNodeRequest {
            node: node.to_owned(),
            grace: grace.map(duration_to_pb),
        })))
        .await?;
        let node = answer
            .node
            .ok_or(weft_proto::ConversionError::MissingField(
                "DrainNodeResponse.node",
            ))?;
        Ok(NodeInfo::try_from(node)?)
    }

    /// Sets (creates or replaces) a named limit: a rate limit tasks take
    /// units from, or a concurrency key's limit. Needs scope `admin`.
    pub async fn set_limit(&self, limit: &weft_proto::policy::Limit) -> Result<(), Error> {
        let mut client = self.admin.clone();
        unary(client.set_limit(request(pb::SetLimitRequest {
            limit: Some(pb::Limit::from(limit)),
        })))
        .await?;
        Ok(())
    }

    /// Every limit set, with how it stands (`available` units, `running`
    /// tasks, `waiting` tasks). Needs scope `read`.
    pub async fn limits(&self) -> Result<Vec<LimitInfo>, Error> {
        let mut client = self.admin.clone();
        let answer = unary(client.list_limits(request(pb::ListLimitsRequest {}))).await?;
        answer
            .limits
            .into_iter()
            .map(|info| {
                let limit = info
                    .limit
                    .ok_or(weft_proto::ConversionError::MissingField("LimitInfo.limit"))?;
                Ok(LimitInfo {
                    limit: weft_proto::policy::Limit::try_from(limit)?,
                    available: info.available,
                    running: info.running,
                    waiting: info.waiting,
                })
            })
            .collect()
    }

    /// Deletes a named limit (`kind`: "rate", "concurrency", or empty for
    /// whichever there is). NOT_FOUND for an unknown one. Needs `admin`.
    pub async fn delete_limit(&self, name: &str, kind: &str) -> Result<(), Error> {
        let mut client = self.admin.clone();
        unary(client.delete_limit(request(pb::DeleteLimitRequest {
            name: name.to_owned(),
            kind: kind.to_owned(),
        })))
        .await?;
        Ok(())
    }

    /// Cluster-wide figures.
    pub async fn cluster_info(&self) -> Result<ClusterInfo, Error> {
        let mut client = self.admin.clone();
        let answer = unary(client.cluster_info(request(pb::ClusterInfoRequest {}))).await?;
        Ok(ClusterInfo::try_from(answer)?)
    }

    /// Makes a client token with `scopes` (names: read, submit, cancel,
    /// admin), valid for `ttl` (`None`: no expiry). Needs scope `admin`.
    /// Returns the token string (shown this once) and its record.
    pub async fn create_token(
        &self,
        scopes: Vec<String>,
        name: &str,
        ttl: Option<Duration>,
    ) -> Result<(String, pb::TokenInfo), Error> {
        self.create(pb::CreateTokenRequest {
            scopes,
            name: name.to_owned(),
            ttl: ttl.map(duration_to_pb),
            role: String::new(),
            uses: 0,
            join_address: String::new(),
        })
        .await
    }

    /// `CreateToken`: the token string and its record.
    async fn create(
        &self,
        create: pb::CreateTokenRequest,
    ) -> Result<(String, pb::TokenInfo), Error> {
        let mut client = self.admin.clone();
        let answer = unary(client.create_token(request(create))).await?;
        let info = answer
            .info
            .ok_or(weft_proto::ConversionError::MissingField(
                "CreateTokenResponse.info",
            ))?;
        Ok((answer.token, info))
    }

    /// Makes a node join token (`weftjoin_...`) for `uses` joins (0: no
    /// limit), valid for `ttl` (`None`: no expiry), naming `join_address`
    /// (empty: the coordinator's advertised address, else the address
    /// this call reached). Needs scope `admin`. Returns the token (shown
    /// this once) and its record.
    pub async fn create_join_token(
        &self,
        name: &str,
        ttl: Option<Duration>,
        uses: u32,
        join_address: &str,
    ) -> Result<(String, pb::TokenInfo), Error> {
        self.create(pb::CreateTokenRequest {
            scopes: Vec::new(),
            name: name.to_owned(),
            ttl: ttl.map(duration_to_pb),
            role: "node".to_owned(),
            uses,
            join_address: join_address.to_owned(),
        })
        .await
    }

    /// Revokes a node by id or name (scope `admin`): its stream is closed,
    /// its attempts requeued, its certificate refused from now on.
    pub async fn revoke_node(&self, node: &str) -> Result<pb::RevokeNodeResponse, Error> {
        let mut client = self.admin.clone();
        unary(client.revoke_node(request(pb::RevokeNodeRequest {
            node: node.to_owned(),
        })))
        .await
    }

    /// Every token's record (never a secret). Needs scope `admin`.
    pub async fn list_tokens(&self) -> Result<Vec<pb::TokenInfo>, Error> {
        let mut client = self.admin.clone();
        Ok(unary(client.list_tokens(request(pb::ListTokensRequest {})))
            .await?
            .tokens)
    }

    /// Revokes a token by id; refused from the moment this returns. Needs
    /// scope `admin`.
    pub async fn revoke_token(&self, id: &str) -> Result<pb::TokenInfo, Error> {
        let mut client = self.admin.clone();
        let answer =
            unary(client.revoke_token(request(pb::RevokeTokenRequest { id: id.to_owned() })))
                .await?;
        Ok(answer
            .info
            .ok_or(weft_proto::ConversionError::MissingField(
                "RevokeTokenResponse.info",
            ))?)
    }
}

/// A `SubmitRequest` written spec by spec (field 1, `tasks`, repeated)
/// from borrowed specs: the bytes the generated encoder would write for
/// `pb::SubmitRequest { tasks }`, without building a `pb::TaskSpec` each.
#[derive(Default)]
struct SubmitRequest {
    bytes: Vec<u8>,
    /// Specs written so far.
    specs: usize,
}

impl SubmitRequest {
    /// A request of `specs`, written one after another.
    fn of(specs: &[TaskSpec]) -> SubmitRequest {
        let mut request = SubmitRequest::default();
        let mut scratch = Vec::new();
        for spec in specs {
            scratch.clear();
            spec.encode_fields(SpecFields::Submitted, &mut scratch);
            request.push_encoded(&scratch);
        }
        request
    }

    /// A spec's bytes, as [`TaskSpec::encode_fields`] wrote them.
    fn push_encoded(&mut self, spec_bytes: &[u8]) {
        weft_proto::wire::put_message(1, spec_bytes, &mut self.bytes);
        self.specs += 1;
    }
}

/// A unary request carrying the deadline, so the coordinator can give up too.
fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(UNARY_DEADLINE);
    request
}

/// Awaits a unary call under [`UNARY_DEADLINE`], enforced on this side too.
async fn unary<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Error> {
    match tokio::time::timeout(UNARY_DEADLINE, call).await {
        Err(_) => Err(Error::DeadlineExceeded(format!(
            "no answer from the coordinator within {UNARY_DEADLINE:?}"
        ))),
        Ok(answer) => Ok(answer?.into_inner()),
    }
}

fn task_from(task: Option<pb::Task>, field: &'static str) -> Result<Task, Error> {
    let task = task.ok_or(weft_proto::ConversionError::MissingField(field))?;
    Ok(Task::try_from(task)?)
}

fn events(stream: tonic::Streaming<pb::TaskEvent>) -> EventStream {
    Box::pin(stream.map(|item| Ok(TaskEvent::try_from(item?)?)))
}

/// Reads a finished task's event stream to its end (the gRPC trailers,
/// which the coordinator sends right after the final event), for at most
/// a second (`DRAIN_TIMEOUT`). Dropping the stream before that makes h2 reset it,
/// and trailers then arriving for the forgotten stream count against h2's
/// limit of 1,024 library-initiated resets per connection; past it h2
/// closes the whole connection (GOAWAY ENHANCE_YOUR_CALM), failing every
/// other call on the channel. A client that waits on thousands of tasks
/// over one channel hits that within seconds.
pub async fn drain(mut events: EventStream) {
    let rest = async { while events.next().await.is_some() {} };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, rest).await;
}

/// How long [`drain`] waits for a finished stream's end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
