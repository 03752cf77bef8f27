//! The floor: what plain tonic costs on this machine, right now. A fake
//! `TaskService` (canned answers, no state) and an echoing
//! `NodeService.Connect` are served on `127.0.0.1:0` by a runtime on their
//! own thread, so the client side measured here runs on the bench's
//! runtime as Weft's client does. Every Weft figure is printed as a ratio
//! to the matching floor figure.
//!
//! Nothing here touches Weft's coordinator: it is the cost of gRPC itself
//! (HTTP/2 framing, prost, tokio, the loopback socket).

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{Stream, StreamExt, stream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};

use weft_proto::pb;
use weft_proto::pb::node_service_client::NodeServiceClient;
use weft_proto::pb::node_service_server::{NodeService, NodeServiceServer};
use weft_proto::pb::task_service_client::TaskServiceClient;
use weft_proto::pb::task_service_server::{TaskService, TaskServiceServer};

use crate::stats::Latency;

/// How much of each floor measurement to do.
#[derive(Debug, Clone, Copy)]
pub struct FloorPlan {
    /// Sequential round trips per latency figure.
    pub round_trips: usize,
    /// Unary calls for the concurrent-throughput figure.
    pub unary_calls: usize,
    /// Unary calls in flight at once for that figure.
    pub concurrency: usize,
    /// Messages sent (and echoed) over the one bidirectional stream.
    pub stream_messages: usize,
    /// Specs per fake `Submit` call, and how many such calls.
    pub submit_batch: usize,
    /// Number of fake `Submit` calls.
    pub submit_calls: usize,
}

/// What gRPC itself costs, measured in the same run.
#[derive(Debug, Clone)]
pub struct Floor {
    /// Unary `Get` (canned task) round trips, sequential.
    pub unary: Latency,
    /// Server-streaming `Run` (one canned final event) round trips, sequential:
    /// the shape of Weft's submit-then-wait round trip.
    pub run: Latency,
    /// Unary `Get` calls per second with `concurrency` in flight.
    pub unary_per_s: f64,
    /// Small messages per second over one bidirectional stream, each echoed
    /// back (counted once per message sent and echoed).
    pub stream_msgs_per_s: f64,
    /// Specs per second through `Submit` calls of `submit_batch` specs that
    /// answer as many ids (encoding, framing and decoding only).
    pub submit_specs_per_s: f64,
}

/// A canned final task, about the size of a finished `noop`.
fn canned_task() -> pb::Task {
    pb::Task {
        id: "01JDZQ7ZC7M0000000000000000".to_owned(),
        spec: Some(weft_proto::TaskSpec::call("noop", "12345").into()),
        state: pb::TaskState::Succeeded as i32,
        attempt: 1,
        node_id: "01JDZQ7ZC7M0000000000000001".to_owned(),
        node_name: "bench-1".to_owned(),
        output: bytes::Bytes::from_static(b"12345"),
        created_at: Some(weft_proto::convert::timestamp(std::time::SystemTime::now())),
        updated_at: Some(weft_proto::convert::timestamp(std::time::SystemTime::now())),
        next_seq: 4,
        ..Default::default()
    }
}

/// The fake task service: no state, canned answers.
struct FakeTasks {
    task: pb::Task,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::TaskEvent, Status>> + Send>>;
type CoordinatorStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl TaskService for FakeTasks {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let n = request.into_inner().tasks.len();
        Ok(Response::new(pb::SubmitResponse {
            task_ids: vec![self.task.id.clone(); n],
            job_id: self.task.id.clone(),
        }))
    }

    async fn get(&self, _: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        Ok(Response::new(pb::GetResponse {
            task: Some(self.task.clone()),
        }))
    }

    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Err(Status::unimplemented("not part of the floor"))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not part of the floor"))
    }

    async fn cancel(
        &self,
        _: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        Err(Status::unimplemented("not part of the floor"))
    }

    async fn cancel_job(
        &self,
        _: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        Err(Status::unimplemented("not part of the floor"))
    }

    type WaitManyStream = Pin<Box<dyn Stream<Item = Result<pb::Task, Status>> + Send>>;

    async fn wait_many(
        &self,
        _: Request<pb::WaitManyRequest>,
    ) -> Result<Response<Self::WaitManyStream>, Status> {
        Err(Status::unimplemented("not part of the floor"))
    }

    type WaitManyBatchesStream = Pin<Box<dyn Stream<Item = Result<pb::TaskBatch, Status>> + Send>>;

    async fn wait_many_batches(
        &self,
        _: Request<pb::WaitManyRequest>,
    ) -> Result<Response<Self::WaitManyBatchesStream>, Status> {
        Err(Status::unimplemented("not part of the floor"))
    }

    type RunStream = EventStream;

    async fn run(&self, _: Request<pb::RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        let event = pb::TaskEvent {
            task_id: self.task.id.clone(),
            seq: 3,
            attempt: 1,
            time: self.task.updated_at,
            body: Some(pb::task_event::Body::Finished(self.task.clone())),
        };
        Ok(Response::new(Box::pin(stream::iter([Ok(event)]))))
    }
}

/// The fake node service: echoes every message as a heartbeat.
struct EchoNodes;

#[tonic::async_trait]
impl NodeService for EchoNodes {
    type ConnectStream = CoordinatorStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let inbound = request.into_inner();
        let echo = inbound.map(|message| {
            message.map(|_| pb::CoordinatorMessage {
                body: Some(pb::coordinator_message::Body::Heartbeat(pb::Heartbeat {})),
            })
        });
        Ok(Response::new(Box::pin(echo)))
    }

    async fn join(
        &self,
        _request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        Err(Status::unimplemented("the floor's fake has no Join"))
    }
}

/// The fake server on its own thread and runtime; stops when dropped.
struct FloorServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FloorServer {
    fn start() -> anyhow::Result<FloorServer> {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-floor".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(err) => {
                        let _ = addr_tx.send(Err(anyhow::Error::from(err)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                        Ok(l) => l,
                        Err(err) => {
                            let _ = addr_tx.send(Err(err.into()));
                            return;
                        }
                    };
                    let _ = addr_tx.send(listener.local_addr().map_err(Into::into));
                    let incoming = tonic::transport::server::TcpIncoming::from(listener)
                        .with_nodelay(Some(true));
                    let served = Server::builder()
                        .add_service(TaskServiceServer::new(FakeTasks {
                            task: canned_task(),
                        }))
                        .add_service(NodeServiceServer::new(EchoNodes))
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = stopped.await;
                        })
                        .await;
                    if let Err(err) = served {
                        tracing::warn!(error = %err, "floor server failed");
                    }
                });
            })
            .context("starting the floor server thread")?;
        let addr = addr_rx
            .recv()
            .context("the floor server thread ended early")??;
        Ok(FloorServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for FloorServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The server stops within a moment; don't block a runtime thread on it.
            drop(thread);
        }
    }
}

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .context("connecting to the floor server")
}

/// Measures the floor: starts the fake server, runs each figure, stops it.
pub async fn measure(plan: FloorPlan) -> anyhow::Result<Floor> {
    let server = FloorServer::start()?;
    let channel = channel(server.addr).await?;
    let tasks = TaskServiceClient::new(channel.clone());

    // Warm up the connection and both paths.
    for _ in 0..100 {
        tasks.clone().get(get_request()).await?;
        run_once(&tasks).await?;
    }

    let mut unary = Vec::with_capacity(plan.round_trips);
    for _ in 0..plan.round_trips {
        let t0 = Instant::now();
        tasks.clone().get(get_request()).await?;
        unary.push(t0.elapsed());
    }
    let mut run = Vec::with_capacity(plan.round_trips);
    for _ in 0..plan.round_trips {
        let t0 = Instant::now();
        run_once(&tasks).await?;
        run.push(t0.elapsed());
    }

    let t0 = Instant::now();
    let mut calls = stream::iter(0..plan.unary_calls)
        .map(|_| {
            let mut tasks = tasks.clone();
            async move { tasks.get(get_request()).await }
        })
        .buffer_unordered(plan.concurrency.max(1));
    while let Some(answer) = calls.next().await {
        answer?;
    }
    let unary_per_s = plan.unary_calls as f64 / t0.elapsed().as_secs_f64();

    let stream_msgs_per_s = echo_stream(channel.clone(), plan.stream_messages).await?;

    let specs: Vec<pb::TaskSpec> = (0..plan.submit_batch)
        .map(|i| weft_proto::TaskSpec::call("noop", i.to_string()).into())
        .collect();
    let t0 = Instant::now();
    for _ in 0..plan.submit_calls {
        let answer = tasks
            .clone()
            .submit(pb::SubmitRequest {
                tasks: specs.clone(),
            })
            .await?;
        anyhow::ensure!(answer.into_inner().task_ids.len() == specs.len());
    }
    let submit_specs_per_s =
        (plan.submit_batch * plan.submit_calls) as f64 / t0.elapsed().as_secs_f64();

    drop(server);
    Ok(Floor {
        unary: Latency::from_samples(&unary).context("no unary samples")?,
        run: Latency::from_samples(&run).context("no run samples")?,
        unary_per_s,
        stream_msgs_per_s,
        submit_specs_per_s,
    })
}

fn get_request() -> pb::GetRequest {
    pb::GetRequest {
        task_id: "01JDZQ7ZC7M0000000000000000".to_owned(),
    }
}

async fn run_once(tasks: &TaskServiceClient<Channel>) -> anyhow::Result<()> {
    let mut events = tasks
        .clone()
        .run(pb::RunRequest {
            spec: Some(weft_proto::TaskSpec::call("noop", "1").into()),
        })
        .await?
        .into_inner();
    while events.message().await?.is_some() {}
    Ok(())
}

/// Sends `n` heartbeats over one `Connect` stream as fast as the stream
/// takes them while reading the echoes; answers messages per second.
async fn echo_stream(channel: Channel, n: usize) -> anyhow::Result<f64> {
    let (tx, rx) = mpsc::channel::<pb::NodeMessage>(1024);
    let mut nodes = NodeServiceClient::new(channel);
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            let message = pb::NodeMessage {
                body: Some(pb::node_message::Body::Heartbeat(pb::Heartbeat {})),
            };
            if tx.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut echoes = nodes.connect(ReceiverStream::new(rx)).await?.into_inner();
    let mut received = 0;
    while received < n {
        match echoes.message().await? {
            Some(_) => received += 1,
            None => break,
        }
    }
    let elapsed = t0.elapsed();
    sender.abort();
    anyhow::ensure!(
        received == n,
        "the echo stream ended after {received} of {n}"
    );
    Ok(n as f64 / elapsed.as_secs_f64())
}
