//! A tiny fake coordinator for the node's socket tests: a tonic
//! `NodeService` on 127.0.0.1:0 that hands each connection to the test,
//! which plays the coordinator's side message by message; and the helpers
//! those tests share (a node's config, waiting, outcomes).

// Each test file uses a part of this.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use weft_node::{HandlerRegistry, NodeConfig, RunningNode};
use weft_proto::convert::duration_to_pb;
use weft_proto::pb::coordinator_message::Body as Inbound;
use weft_proto::pb::node_message::Body as Outbound;
use weft_proto::pb::node_service_server::{NodeService, NodeServiceServer};
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_proto::{NodeId, Outcome, TaskId, TaskSpec, pb};

use crate::common::process_is_gone;

pub mod tls;

pub const WAIT: Duration = Duration::from_secs(10);

struct Fake {
    conns: mpsc::UnboundedSender<Conn>,
}

/// One node session, seen from the coordinator's side.
pub struct Conn {
    pub inbound: Streaming<pb::NodeMessage>,
    pub out: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    /// The certificate the node presented (DER), over TLS (`tls.rs`).
    pub peer: Option<Vec<u8>>,
}

#[tonic::async_trait]
impl NodeService for Fake {
    type ConnectStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (out, rx) = mpsc::channel(64);
        let conn = Conn {
            inbound: request.into_inner(),
            out,
            peer: None,
        };
        self.conns
            .send(conn)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn join(
        &self,
        _request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        Err(Status::unimplemented("the fake coordinator has no Join"))
    }
}

/// Starts the fake coordinator; answers its URL and its connections.
pub async fn fake_coordinator() -> (String, mpsc::UnboundedReceiver<Conn>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (conns, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeServiceServer::new(Fake { conns }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (url, rx)
}

/// A fake coordinator that can be stopped and started again on the same
/// address, like a restarted coordinator.
pub struct FakeServer {
    pub addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    handle: JoinHandle<()>,
}

impl FakeServer {
    /// Serves on `addr` (port 0 picks one); answers the server and its
    /// connections.
    pub async fn start(addr: SocketAddr) -> (FakeServer, mpsc::UnboundedReceiver<Conn>) {
        // tokio sets SO_REUSEADDR, so a stopped server's port can be bound again.
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conns, rx) = mpsc::unbounded_channel();
        let (shutdown, stop) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(NodeServiceServer::new(Fake { conns }))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop.await;
                })
                .await;
        });
        (
            FakeServer {
                addr,
                shutdown,
                handle,
            },
            rx,
        )
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and frees the port (after the open streams ended, or
    /// at once if they do not end in time).
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        let mut handle = self.handle;
        if tokio::time::timeout(WAIT, &mut handle).await.is_err() {
            handle.abort();
            let _ = handle.await;
        }
    }
}

pub async fn next_conn(conns: &mut mpsc::UnboundedReceiver<Conn>) -> Conn {
    tokio::time::timeout(WAIT, conns.recv())
        .await
        .expect("node connects")
        .expect("server running")
}

impl Conn {
    /// The next message that is not a heartbeat; `None` when the node
    /// closed the stream.
    pub async fn next(&mut self) -> Option<Outbound> {
        loop {
            let message = tokio::time::timeout(WAIT, self.inbound.message())
                .await
                .expect("node sends something")
                .ok()??;
            match message.body {
                Some(Outbound::Heartbeat(_)) => continue,
                body => return body,
            }
        }
    }

    /// Ends the stream with `status`, as a refusing coordinator does.
    pub async fn refuse(&self, status: Status) {
        self.out.send(Err(status)).await.expect("node listening");
    }

    pub async fn send(&self, body: Inbound) {
        let message = pb::CoordinatorMessage { body: Some(body) };
        self.out.send(Ok(message)).await.expect("node listening");
    }

    /// Reads the Register, answers Registered; returns both.
    pub async fn accept(
        &mut self,
        heartbeat: Duration,
        timeout: Duration,
    ) -> (pb::Register, NodeId) {
        let Some(Outbound::Register(register)) = self.next().await else {
            panic!("first message must be Register");
        };
        let node_id = NodeId::new();
        self.send(Inbound::Registered(pb::Registered {
            node_id: node_id.to_string(),
            heartbeat_interval: Some(duration_to_pb(heartbeat)),
            heartbeat_timeout: Some(duration_to_pb(timeout)),
            max_message_size: 0,
            start_timeout: None,
        }))
        .await;
        (register, node_id)
    }

    /// The `Started` a node sends again right after `Registered`, one per
    /// listed attempt that runs: `(task id, pid)` in order.
    pub async fn started_again(&mut self) -> Vec<(String, u32)> {
        let Some(Outbound::Events(batch)) = self.next().await else {
            panic!("expected the Started of the running attempts");
        };
        batch
            .events
            .into_iter()
            .map(|event| match event.body {
                Some(EventBody::Started(started)) => (event.task_id, started.pid),
                other => panic!("expected Started, got {other:?}"),
            })
            .collect()
    }

    pub async fn credits(&mut self) -> u32 {
        match self.next().await {
            Some(Outbound::Credits(credits)) => credits.grant,
            other => panic!("expected Credits, got {other:?}"),
        }
    }

    pub async fn assign(&self, specs: Vec<TaskSpec>) -> Vec<TaskId> {
        let ids: Vec<TaskId> = specs.iter().map(|_| TaskId::new()).collect();
        let tasks = ids
            .iter()
            .zip(specs)
            .map(|(id, spec)| pb::Assignment {
                task_id: id.to_string(),
                attempt: 1,
                spec: Some(spec.into()),
                trace: None,
                parents: Vec::new(),
            })
            .collect();
        self.send(Inbound::Assign(pb::Assign { tasks })).await;
        ids
    }

    /// Events until the Finished of `task`; other messages are collected.
    pub async fn until_finished(&mut self, task: TaskId) -> (Vec<Outbound>, pb::Finished) {
        let mut seen = Vec::new();
        loop {
            let message = self.next().await.expect("stream open until Finished");
            if let Outbound::Events(batch) = &message {
                for event in &batch.events {
                    if let (true, Some(EventBody::Finished(done))) =
                        (event.task_id == task.to_string(), &event.body)
                    {
                        return (seen, done.clone());
                    }
                }
            }
            seen.push(message);
        }
    }

    /// The first output chunk's text.
    pub async fn first_output(&mut self) -> String {
        loop {
            if let Some(Outbound::Events(batch)) = self.next().await {
                for event in batch.events {
                    if let Some(EventBody::Output(chunk)) = event.body {
                        return String::from_utf8_lossy(&chunk.data).into_owned();
                    }
                }
            }
        }
    }
}

pub fn config(url: &str, slots: u32) -> NodeConfig {
    let mut config = NodeConfig::new(url);
    config.name = "test-node".into();
    config.slots = slots;
    // These scenarios check the strict window (credits = free slots).
    config.prefetch = 0;
    config.labels = BTreeMap::from([("zone".to_owned(), "a".to_owned())]);
    config.reconnect_min = Duration::from_millis(20);
    config.reconnect_max = Duration::from_millis(200);
    config.drain_grace = Duration::from_secs(5);
    config
}

/// Polls `check` until it holds, failing after [`WAIT`].
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn touch(path: &Path) {
    std::fs::write(path, b"").unwrap();
}

pub fn start(url: &str, slots: u32) -> RunningNode {
    weft_node::start(config(url, slots), HandlerRegistry::with_builtins())
}

/// A node with `slots` slots, registered with a fresh fake coordinator
/// (heartbeats every second, 5 s timeout), its first grant taken. Keep the
/// connection receiver alive: dropping it stops taking reconnects.
pub async fn registered(slots: u32) -> (mpsc::UnboundedReceiver<Conn>, RunningNode, Conn) {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, slots);
    let mut conn = next_conn(&mut conns).await;
    conn.accept(SECOND, 5 * SECOND).await;
    conn.credits().await;
    (conns, node, conn)
}

pub fn outcome(done: &pb::Finished) -> Outcome {
    Outcome::try_from(done.outcome).unwrap()
}

pub async fn assert_gone_soon(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process_is_gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} still runs");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub const SECOND: Duration = Duration::from_secs(1);

/// Output chunks and the `Finished` of `task` (other events skipped) until
/// its `Finished`; panics on a `Started` (the attempt must not restart).
pub async fn output_until_finished(
    conn: &mut Conn,
    task: TaskId,
) -> (Vec<(u64, String)>, pb::Finished) {
    let mut chunks = Vec::new();
    loop {
        let Some(Outbound::Events(batch)) = conn.next().await else {
            continue;
        };
        for event in batch.events {
            if event.task_id != task.to_string() {
                continue;
            }
            match event.body {
                Some(EventBody::Output(chunk)) => {
                    chunks.push((chunk.seq, String::from_utf8_lossy(&chunk.data).into_owned()));
                }
                Some(EventBody::Finished(done)) => return (chunks, done),
                Some(EventBody::Started(started)) => panic!("started again: {started:?}"),
                _ => {}
            }
        }
    }
}
