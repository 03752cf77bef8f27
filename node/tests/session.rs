//! The node's session against a tiny fake coordinator: a tonic
//! `NodeService` on 127.0.0.1:0 that hands each connection to the test, which
//! plays the coordinator's side message by message.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use common::process_is_gone;
use weft_node::{HandlerRegistry, NodeConfig, RunningNode};
use weft_proto::convert::duration_to_pb;
use weft_proto::pb::coordinator_message::Body as Inbound;
use weft_proto::pb::node_message::Body as Outbound;
use weft_proto::pb::node_service_server::{NodeService, NodeServiceServer};
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_proto::{NodeId, Outcome, TaskId, TaskSpec, pb};

const WAIT: Duration = Duration::from_secs(10);

struct Fake {
    conns: mpsc::UnboundedSender<Conn>,
}

/// One node session, seen from the coordinator's side.
struct Conn {
    inbound: Streaming<pb::NodeMessage>,
    out: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
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
        };
        self.conns
            .send(conn)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Starts the fake coordinator; answers its URL and its connections.
async fn fake_coordinator() -> (String, mpsc::UnboundedReceiver<Conn>) {
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
struct FakeServer {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    handle: JoinHandle<()>,
}

impl FakeServer {
    /// Serves on `addr` (port 0 picks one); answers the server and its
    /// connections.
    async fn start(addr: SocketAddr) -> (FakeServer, mpsc::UnboundedReceiver<Conn>) {
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

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and frees the port (after the open streams ended, or
    /// at once if they do not end in time).
    async fn stop(self) {
        let _ = self.shutdown.send(());
        let mut handle = self.handle;
        if tokio::time::timeout(WAIT, &mut handle).await.is_err() {
            handle.abort();
            let _ = handle.await;
        }
    }
}

async fn next_conn(conns: &mut mpsc::UnboundedReceiver<Conn>) -> Conn {
    tokio::time::timeout(WAIT, conns.recv())
        .await
        .expect("node connects")
        .expect("server running")
}

impl Conn {
    /// The next message that is not a heartbeat; `None` when the node
    /// closed the stream.
    async fn next(&mut self) -> Option<Outbound> {
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

    async fn send(&self, body: Inbound) {
        let message = pb::CoordinatorMessage { body: Some(body) };
        self.out.send(Ok(message)).await.expect("node listening");
    }

    /// Reads the Register, answers Registered; returns both.
    async fn accept(&mut self, heartbeat: Duration, timeout: Duration) -> (pb::Register, NodeId) {
        let Some(Outbound::Register(register)) = self.next().await else {
            panic!("first message must be Register");
        };
        let node_id = NodeId::new();
        self.send(Inbound::Registered(pb::Registered {
            node_id: node_id.to_string(),
            heartbeat_interval: Some(duration_to_pb(heartbeat)),
            heartbeat_timeout: Some(duration_to_pb(timeout)),
        }))
        .await;
        (register, node_id)
    }

    async fn credits(&mut self) -> u32 {
        match self.next().await {
            Some(Outbound::Credits(credits)) => credits.grant,
            other => panic!("expected Credits, got {other:?}"),
        }
    }

    async fn assign(&self, specs: Vec<TaskSpec>) -> Vec<TaskId> {
        let ids: Vec<TaskId> = specs.iter().map(|_| TaskId::new()).collect();
        let tasks = ids
            .iter()
            .zip(specs)
            .map(|(id, spec)| pb::Assignment {
                task_id: id.to_string(),
                attempt: 1,
                spec: Some(spec.into()),
            })
            .collect();
        self.send(Inbound::Assign(pb::Assign { tasks })).await;
        ids
    }

    /// Events until the Finished of `task`; other messages are collected.
    async fn until_finished(&mut self, task: TaskId) -> (Vec<Outbound>, pb::Finished) {
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
    async fn first_output(&mut self) -> String {
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

fn config(url: &str, slots: u32) -> NodeConfig {
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
async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn touch(path: &Path) {
    std::fs::write(path, b"").unwrap();
}

fn start(url: &str, slots: u32) -> RunningNode {
    weft_node::start(config(url, slots), HandlerRegistry::with_builtins())
}

/// A node with `slots` slots, registered with a fresh fake coordinator
/// (heartbeats every second, 5 s timeout), its first grant taken. Keep the
/// connection receiver alive: dropping it stops taking reconnects.
async fn registered(slots: u32) -> (mpsc::UnboundedReceiver<Conn>, RunningNode, Conn) {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, slots);
    let mut conn = next_conn(&mut conns).await;
    conn.accept(SECOND, 5 * SECOND).await;
    conn.credits().await;
    (conns, node, conn)
}

fn outcome(done: &pb::Finished) -> Outcome {
    Outcome::try_from(done.outcome).unwrap()
}

async fn assert_gone_soon(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process_is_gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} still runs");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn node_registers_first_then_grants_its_free_slots() {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, 3);
    let mut conn = next_conn(&mut conns).await;
    let (register, node_id) = conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(register.name, "test-node");
    assert_eq!(register.slots, 3);
    assert_eq!(
        register.protocol_version,
        pb::ProtocolVersion::ProtocolVersion1 as i32
    );
    assert_eq!(register.labels.get("zone").map(String::as_str), Some("a"));
    assert!(
        register.handlers.contains(&"sleep".to_owned())
            && register.handlers.contains(&"spin".to_owned())
    );
    assert!(register.running.is_empty() && register.previous_node_id.is_empty());
    assert_eq!(conn.credits().await, 3);
    assert_eq!(node.registered(WAIT).await, Some(node_id));
    assert_eq!(node.node_id(), Some(node_id));
    node.kill().await;
}

#[tokio::test]
async fn finished_attempt_grants_its_slots_back_after_the_finished_event() {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, 2);
    let mut conn = next_conn(&mut conns).await;
    conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(conn.credits().await, 2);
    let ids = conn
        .assign(vec![TaskSpec::call("echo", "hi").slots(2)])
        .await;
    let (seen, done) = conn.until_finished(ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Succeeded);
    assert_eq!(done.output.as_ref(), b"hi");
    assert!(
        seen.iter().all(|m| !matches!(m, Outbound::Credits(_))),
        "no grant before Finished"
    );
    assert_eq!(
        conn.credits().await,
        2,
        "the slots come back after Finished"
    );
    node.kill().await;
}

#[tokio::test]
async fn events_travel_in_batches() {
    let (_conns, node, mut conn) = registered(64).await;
    let ids = conn.assign(vec![TaskSpec::call("noop", "x"); 64]).await;
    let (mut finished, mut messages, mut largest) = (0, 0, 0);
    while finished < ids.len() {
        match conn.next().await.expect("stream open") {
            Outbound::Events(batch) => {
                messages += 1;
                largest = largest.max(batch.events.len());
                finished += batch
                    .events
                    .iter()
                    .filter(|e| matches!(e.body, Some(EventBody::Finished(_))))
                    .count();
            }
            Outbound::Credits(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(largest > 1, "some batch carried several events");
    assert!(
        messages < 2 * ids.len(),
        "{messages} messages for {} events",
        2 * ids.len()
    );
    node.kill().await;
}

#[tokio::test]
async fn coordinator_cancel_stops_exactly_one_attempt() {
    let (_conns, node, mut conn) = registered(2).await;
    let ids = conn
        .assign(vec![
            TaskSpec::call("sleep", "1h"),
            TaskSpec::call("sleep", "300ms"),
        ])
        .await;
    conn.send(Inbound::Cancel(pb::Cancel {
        task_id: ids[0].to_string(),
        attempt: 1,
        reason: "client asked".into(),
    }))
    .await;
    let (_, done) = conn.until_finished(ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Cancelled);
    assert!(done.error.contains("client asked"), "{}", done.error);
    let (_, done) = conn.until_finished(ids[1]).await;
    assert_eq!(
        outcome(&done),
        Outcome::Succeeded,
        "the other attempt ran to its end"
    );
    node.kill().await;
}

#[tokio::test]
async fn coordinator_drain_finishes_work_cancels_past_grace_and_closes() {
    let (_conns, mut node, mut conn) = registered(2).await;
    let ids = conn
        .assign(vec![
            TaskSpec::exec(["sh", "-c", "sleep 100 & echo $!; wait"]),
            TaskSpec::call("sleep", "50ms"),
        ])
        .await;
    let grandchild: u32 = conn.first_output().await.trim().parse().unwrap();
    conn.send(Inbound::Drain(pb::Drain {
        grace: Some(duration_to_pb(Duration::from_millis(400))),
    }))
    .await;
    let mut order = Vec::new();
    while let Some(message) = conn.next().await {
        match message {
            Outbound::Draining(_) => order.push("draining".to_owned()),
            Outbound::Credits(c) => panic!("granted {} credits while draining", c.grant),
            Outbound::Events(batch) => {
                for event in batch.events {
                    if let Some(EventBody::Finished(done)) = event.body {
                        let which = if event.task_id == ids[0].to_string() {
                            "exec"
                        } else {
                            "sleep"
                        };
                        order.push(format!("{which}:{}", outcome(&done).as_str()));
                    }
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(order, ["draining", "sleep:succeeded", "exec:cancelled"]);
    tokio::time::timeout(WAIT, node.wait())
        .await
        .expect("node stops after a drain");
    assert_gone_soon(grandchild).await;
}

#[tokio::test]
async fn drain_from_the_handle_lets_running_attempts_finish() {
    let (_conns, node, mut conn) = registered(1).await;
    let ids = conn.assign(vec![TaskSpec::call("sleep", "200ms")]).await;
    assert!(
        matches!(conn.next().await, Some(Outbound::Events(_))),
        "Started"
    );
    let drain = tokio::spawn(node.drain(Duration::from_secs(5)));
    assert!(matches!(conn.next().await, Some(Outbound::Draining(_))));
    let (_, done) = conn.until_finished(ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Succeeded);
    assert!(conn.next().await.is_none(), "stream closed after the drain");
    tokio::time::timeout(WAIT, drain)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn running_attempts_survive_a_reconnect_and_are_reported() {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, 3);
    let mut conn = next_conn(&mut conns).await;
    let (_, first_id) = conn.accept(SECOND, 5 * SECOND).await;
    conn.credits().await;
    let ids = conn
        .assign(vec![TaskSpec::call("sleep", "1s").slots(2)])
        .await;
    // Wait for Started, then the coordinator goes away.
    assert!(matches!(conn.next().await, Some(Outbound::Events(_))));
    drop(conn);
    let mut conn = next_conn(&mut conns).await;
    let (register, second_id) = conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(register.previous_node_id, first_id.to_string());
    assert_eq!(
        register.running,
        vec![pb::AttemptRef {
            task_id: ids[0].to_string(),
            attempt: 1
        }]
    );
    assert_eq!(conn.credits().await, 1, "only the free slot is granted");
    assert_eq!(node.registered(WAIT).await, Some(second_id));
    let (_, done) = conn.until_finished(ids[0]).await;
    assert_eq!(
        outcome(&done),
        Outcome::Succeeded,
        "the attempt carried on and reports to the new session"
    );
    assert_eq!(conn.credits().await, 2);
    node.kill().await;
}

#[tokio::test]
async fn silent_coordinator_is_dropped_and_the_node_reconnects_with_heartbeats_meanwhile() {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, 1);
    let mut conn = next_conn(&mut conns).await;
    conn.accept(Duration::from_millis(50), Duration::from_millis(400))
        .await;
    conn.credits().await;
    let mut heartbeats = 0;
    while heartbeats < 3 {
        let message = tokio::time::timeout(WAIT, conn.inbound.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(Outbound::Heartbeat(_)) = message.body {
            heartbeats += 1;
        }
    }
    // The fake never sends anything: the node gives up on it and redials.
    let mut again = next_conn(&mut conns).await;
    let (register, _) = again.accept(SECOND, 5 * SECOND).await;
    assert!(!register.previous_node_id.is_empty());
    drop(conn);
    node.kill().await;
}

#[tokio::test]
async fn kill_reports_nothing_and_leaves_no_process() {
    let (_conns, node, mut conn) = registered(1).await;
    conn.assign(vec![TaskSpec::exec([
        "sh",
        "-c",
        "sleep 100 & echo $!; wait",
    ])])
    .await;
    let grandchild: u32 = conn.first_output().await.trim().parse().unwrap();
    node.kill().await;
    while let Some(message) = conn.next().await {
        if let Outbound::Events(batch) = message {
            assert!(
                batch
                    .events
                    .iter()
                    .all(|e| !matches!(e.body, Some(EventBody::Finished(_)))),
                "a killed node reports nothing"
            );
        }
    }
    assert_gone_soon(grandchild).await;
}

#[tokio::test]
async fn node_keeps_redialing_until_a_coordinator_appears() {
    // At first something that is no coordinator holds the port: it accepts
    // each dial and hangs up at once, counting them.
    let refuser = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = refuser.local_addr().unwrap();
    let (dialed, mut dials) = mpsc::unbounded_channel();
    let refuser = tokio::spawn(async move {
        loop {
            let (socket, _) = refuser.accept().await.unwrap();
            drop(socket);
            let _ = dialed.send(());
        }
    });
    let node = start(&format!("http://{addr}"), 1);
    for _ in 0..3 {
        tokio::time::timeout(WAIT, dials.recv())
            .await
            .expect("the node dials again")
            .unwrap();
    }
    assert_eq!(node.node_id(), None);
    refuser.abort();
    let _ = refuser.await; // the listener is closed once the task is gone
    let (server, mut conns) = FakeServer::start(addr).await;
    let mut conn = next_conn(&mut conns).await;
    let (_, node_id) = conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(node.registered(WAIT).await, Some(node_id));
    node.kill().await;
    drop(conn);
    server.stop().await;
}

/// Output chunks and the `Finished` of `task` (other events skipped) until
/// its `Finished`; panics on a `Started` (the attempt must not restart).
async fn output_until_finished(
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

#[tokio::test]
async fn attempt_keeps_running_across_a_coordinator_restart_within_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (away, after) = (dir.path().join("away"), dir.path().join("after"));
    let script = format!(
        "echo before; until [ -e {away} ]; do sleep 0.01; done; echo away; \
         until [ -e {after} ]; do sleep 0.01; done; echo after",
        away = away.display(),
        after = after.display()
    );
    let (server, mut conns) = FakeServer::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let node = start(&server.url(), 2);
    let mut conn = next_conn(&mut conns).await;
    // The lease is the heartbeat timeout: 20 s, far longer than the restart.
    let (_, first_id) = conn.accept(SECOND, 20 * SECOND).await;
    conn.credits().await;
    let ids = conn
        .assign(vec![TaskSpec::exec(["sh", "-c", &script])])
        .await;
    let (mut pid, mut before) = (None, None);
    while pid.is_none() || before.is_none() {
        let Some(Outbound::Events(batch)) = conn.next().await else {
            continue;
        };
        for event in batch.events {
            match event.body {
                Some(EventBody::Started(started)) => pid = Some(started.pid),
                Some(EventBody::Output(chunk)) => {
                    before = Some((chunk.seq, String::from_utf8_lossy(&chunk.data).into_owned()));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let pid = pid.unwrap();
    assert_eq!(before, Some((0, "before\n".to_owned())));

    // The coordinator restarts: its stream ends and the port is free a while.
    drop(conn);
    server.stop().await;
    wait_until("the node noticed", || node.node_id().is_none()).await;
    touch(&away); // output while disconnected waits in the node
    let (server, mut conns) = FakeServer::start(addr).await;
    let mut conn = next_conn(&mut conns).await;
    let (register, _) = conn.accept(SECOND, 20 * SECOND).await;
    assert_eq!(register.previous_node_id, first_id.to_string());
    assert_eq!(
        register.running,
        vec![pb::AttemptRef {
            task_id: ids[0].to_string(),
            attempt: 1
        }]
    );
    assert!(!process_is_gone(pid), "the same process still runs");
    assert_eq!(conn.credits().await, 1, "the attempt still holds its slot");
    touch(&after);
    let (chunks, done) = output_until_finished(&mut conn, ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Succeeded, "{done:?}");
    let seqs: Vec<u64> = chunks.iter().map(|(seq, _)| *seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(
        seqs, expected,
        "seqs carry on from the first stream, no gap, no repeat"
    );
    let text: String = chunks.iter().map(|(_, data)| data.as_str()).collect();
    assert_eq!(text, "away\nafter\n");
    node.kill().await;
    drop(conn);
    server.stop().await;
}

#[tokio::test]
async fn silent_coordinator_past_the_lease_gets_the_attempt_killed_and_reported_after_reconnecting()
{
    let (url, mut conns) = fake_coordinator().await;
    let mut config = config(&url, 1);
    config.lease = Some(Duration::from_millis(300));
    let node = weft_node::start(config, HandlerRegistry::with_builtins());
    let mut conn = next_conn(&mut conns).await;
    // The stream stays open but the coordinator never says a word. (Its
    // heartbeat timeout is long: the lease is what runs out.)
    let (_, first_id) = conn.accept(Duration::from_millis(50), 20 * SECOND).await;
    conn.credits().await;
    let ids = conn
        .assign(vec![TaskSpec::exec([
            "sh",
            "-c",
            "sleep 100 & echo $!; wait",
        ])])
        .await;
    let grandchild: u32 = conn.first_output().await.trim().parse().unwrap();
    assert_gone_soon(grandchild).await;
    // The node dropped the stream itself, with no Finished on it...
    while let Some(message) = conn.next().await {
        if let Outbound::Events(batch) = message {
            assert!(
                batch
                    .events
                    .iter()
                    .all(|e| !matches!(e.body, Some(EventBody::Finished(_)))),
                "{batch:?}"
            );
        }
    }
    // ...and reports the attempt on the next session, where the coordinator
    // fences it.
    let mut again = next_conn(&mut conns).await;
    let (register, _) = again.accept(SECOND, 20 * SECOND).await;
    assert_eq!(register.previous_node_id, first_id.to_string());
    assert_eq!(register.running.len(), 1, "its Finished is not sent yet");
    let (_, done) = again.until_finished(ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Cancelled);
    assert!(
        done.error
            .starts_with("lease expired: coordinator unreachable for 0.")
            && done
                .error
                .ends_with("; the coordinator has reassigned this attempt"),
        "{}",
        done.error
    );
    node.kill().await;
}

#[tokio::test]
async fn sent_results_are_sent_again_after_a_reconnect_until_the_coordinator_cancels_them() {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, 2);
    let mut conn = next_conn(&mut conns).await;
    conn.accept(SECOND, 20 * SECOND).await;
    conn.credits().await;
    let ids = conn.assign(vec![TaskSpec::call("echo", "result")]).await;
    let (_, done) = conn.until_finished(ids[0]).await;
    assert_eq!(done.output.as_ref(), b"result");
    // The coordinator crashes before it recorded the result.
    drop(conn);
    let mut conn = next_conn(&mut conns).await;
    let (register, _) = conn.accept(SECOND, 20 * SECOND).await;
    let attempt = pb::AttemptRef {
        task_id: ids[0].to_string(),
        attempt: 1,
    };
    assert_eq!(
        register.running,
        vec![attempt.clone()],
        "listed so the coordinator keeps it"
    );
    // The result again, before the credits: until it is in, the listed
    // attempt counts against the slots.
    match conn.next().await {
        Some(Outbound::Events(batch)) => {
            assert_eq!(batch.events.len(), 1);
            let event = &batch.events[0];
            assert_eq!((&event.task_id, event.attempt), (&attempt.task_id, 1));
            assert_eq!(event.body, Some(EventBody::Finished(done.clone())));
        }
        other => panic!("expected the Finished again right after Registered, got {other:?}"),
    }
    assert_eq!(conn.credits().await, 2);
    // A coordinator that no longer wants it (stale) says Cancel: dropped.
    // The node reads in order, so once the probe assigned after the Cancel
    // has finished, the Cancel was handled.
    conn.send(Inbound::Cancel(pb::Cancel {
        task_id: ids[0].to_string(),
        attempt: 1,
        reason: "stale".into(),
    }))
    .await;
    let probe = conn.assign(vec![TaskSpec::call("noop", "")]).await;
    conn.until_finished(probe[0]).await;
    drop(conn);
    let mut conn = next_conn(&mut conns).await;
    let (register, _) = conn.accept(SECOND, 20 * SECOND).await;
    let probe_ref = pb::AttemptRef {
        task_id: probe[0].to_string(),
        attempt: 1,
    };
    assert_eq!(
        register.running,
        vec![probe_ref],
        "the cancelled one is gone"
    );
    node.kill().await;
}

#[tokio::test]
async fn a_node_resumed_after_a_pause_past_its_lease_kills_its_attempts_at_once() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let (url, mut conns) = fake_coordinator().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_weft-node"))
        .args(["--coordinator", &url, "--slots", "1", "--name", "paused"])
        .args(["--lease", "1s"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let node = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    let mut conn = next_conn(&mut conns).await;
    // The coordinator's own timeout is long: only the lease can stop the attempt.
    conn.accept(Duration::from_millis(50), 60 * SECOND).await;
    conn.credits().await;
    let heartbeats = {
        let out = conn.out.clone();
        tokio::spawn(async move {
            let beat = pb::CoordinatorMessage {
                body: Some(Inbound::Heartbeat(pb::Heartbeat {})),
            };
            while out.send(Ok(beat.clone())).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let ids = conn
        .assign(vec![TaskSpec::exec([
            "sh",
            "-c",
            "sleep 100 & echo $!; wait",
        ])])
        .await;
    let grandchild: u32 = conn.first_output().await.trim().parse().unwrap();
    kill(node, Signal::SIGSTOP).unwrap();
    // The pause itself is the scenario: the node is stopped past its lease
    // while the coordinator's heartbeats pile up unread.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!process_is_gone(grandchild), "a stopped node kills nothing");
    kill(node, Signal::SIGCONT).unwrap();
    let resumed = Instant::now();
    assert_gone_soon(grandchild).await;
    assert!(
        resumed.elapsed() < SECOND,
        "killed {:?} after resuming",
        resumed.elapsed()
    );
    let mut again = next_conn(&mut conns).await;
    again.accept(SECOND, 60 * SECOND).await;
    let (_, done) = again.until_finished(ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Cancelled);
    assert!(
        done.error
            .starts_with("lease expired: coordinator unreachable for "),
        "{}",
        done.error
    );
    heartbeats.abort();
    child.kill().await.unwrap();
}
