//! A raw node speaking `NodeService.Connect` from the generated stubs, so
//! a test can play a node that misbehaves: one that goes silent, reports
//! for attempts it no longer owns, or breaks the message order.
//!
//! It does only what the test tells it to: no automatic heartbeats (call
//! [`FakeNode::keep_alive`]), no credits until [`FakeNode::grant`].

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use weft_proto::pb::coordinator_message::Body as FromCoordinator;
use weft_proto::pb::node_message::Body as ToCoordinator;
use weft_proto::pb::node_service_client::NodeServiceClient;
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_proto::{Outcome, PROTOCOL_VERSION, TaskId, pb};

/// A `Channel` to `url` (the generated clients have no `connect()`);
/// over TLS with the cluster's CA for an `https://` cluster (see
/// [`crate::trust`]).
pub async fn channel(url: &str) -> Channel {
    crate::trust::try_channel(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// A `Register` for `name` with `slots`, serving `handlers`, protocol v1.
pub fn register(name: &str, slots: u32, handlers: &[&str]) -> pb::Register {
    pb::Register {
        name: name.to_owned(),
        slots,
        handlers: handlers.iter().map(|h| (*h).to_owned()).collect(),
        protocol_version: PROTOCOL_VERSION as i32,
        ..pb::Register::default()
    }
}

/// Opens a `Connect` stream whose first message is `first` and returns the
/// coordinator's verdict: its first message, or the status it refused with.
pub async fn open_raw(
    url: &str,
    first: ToCoordinator,
) -> Result<
    (
        mpsc::Sender<pb::NodeMessage>,
        Streaming<pb::CoordinatorMessage>,
        pb::CoordinatorMessage,
    ),
    Status,
> {
    let (tx, rx) = mpsc::channel(64);
    tx.send(pb::NodeMessage { body: Some(first) })
        .await
        .expect("the receiver is alive");
    let mut client = NodeServiceClient::new(channel(url).await);
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    let reply = tokio::time::timeout(Duration::from_secs(10), inbound.next())
        .await
        .map_err(|_| Status::deadline_exceeded("no first message from the coordinator in 10 s"))?;
    match reply {
        Some(Ok(msg)) => Ok((tx, inbound, msg)),
        Some(Err(status)) => Err(status),
        None => Err(Status::unknown("stream ended before the first message")),
    }
}

/// One fake node session. See the module docs.
pub struct FakeNode {
    /// The id the coordinator gave this session.
    pub node_id: String,
    /// The coordinator's `Registered` answer.
    pub registered: pb::Registered,
    tx: mpsc::Sender<pb::NodeMessage>,
    inbound: Streaming<pb::CoordinatorMessage>,
}

impl FakeNode {
    /// Connects and registers with `register`; fails the test unless the
    /// coordinator answers `Registered` first.
    pub async fn connect(url: &str, register: pb::Register) -> FakeNode {
        let (tx, inbound, first) = open_raw(url, ToCoordinator::Register(register))
            .await
            .unwrap_or_else(|s| panic!("fake node registration refused: {s}"));
        let registered = match first.body {
            Some(FromCoordinator::Registered(r)) => r,
            other => panic!("the coordinator's first message was {other:?}, not Registered"),
        };
        FakeNode {
            node_id: registered.node_id.clone(),
            registered,
            tx,
            inbound,
        }
    }

    /// Sends one message; false if the stream is gone.
    pub async fn send(&self, body: ToCoordinator) -> bool {
        self.tx
            .send(pb::NodeMessage { body: Some(body) })
            .await
            .is_ok()
    }

    /// Grants `slots` more credits.
    pub async fn grant(&self, slots: u32) -> bool {
        self.send(ToCoordinator::Credits(pb::Credits { grant: slots }))
            .await
    }

    /// Sends one heartbeat.
    pub async fn heartbeat(&self) -> bool {
        self.send(ToCoordinator::Heartbeat(pb::Heartbeat {})).await
    }

    /// Sends heartbeats every `interval` until the returned task is aborted.
    pub fn keep_alive(&self, interval: Duration) -> JoinHandle<()> {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            loop {
                let beat = pb::NodeMessage {
                    body: Some(ToCoordinator::Heartbeat(pb::Heartbeat {})),
                };
                if tx.send(beat).await.is_err() {
                    return;
                }
                tokio::time::sleep(interval).await;
            }
        })
    }

    /// Reports one event of attempt `attempt` of `task_id`.
    pub async fn report(&self, task_id: TaskId, attempt: u32, body: EventBody) -> bool {
        let event = pb::NodeTaskEvent {
            task_id: task_id.to_string(),
            attempt,
            body: Some(body),
        };
        self.send(ToCoordinator::Events(pb::TaskEvents {
            events: vec![event],
        }))
        .await
    }

    /// Reports that the attempt started.
    pub async fn started(&self, task_id: TaskId, attempt: u32) -> bool {
        self.report(task_id, attempt, EventBody::Started(pb::Started { pid: 0 }))
            .await
    }

    /// Reports the attempt's end.
    pub async fn finished(
        &self,
        task_id: TaskId,
        attempt: u32,
        outcome: Outcome,
        exit_code: Option<i32>,
        output: &[u8],
    ) -> bool {
        let finished = pb::Finished {
            outcome: i32::from(outcome),
            exit_code,
            output: output.to_vec().into(),
            error: String::new(),
        };
        self.report(task_id, attempt, EventBody::Finished(finished))
            .await
    }

    /// The next message other than a heartbeat; `None` when the stream
    /// ended, failed or stayed silent for `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<FromCoordinator> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.inbound.next())
                .await
                .ok()??;
            match msg.ok()?.body {
                Some(FromCoordinator::Heartbeat(_)) | None => continue,
                Some(body) => return Some(body),
            }
        }
    }

    /// Waits for an `Assign` and returns its first assignment.
    pub async fn next_assignment(&mut self, timeout: Duration) -> pb::Assignment {
        loop {
            match self.recv(timeout).await {
                Some(FromCoordinator::Assign(mut assign)) if !assign.tasks.is_empty() => {
                    return assign.tasks.swap_remove(0);
                }
                Some(_) => continue,
                None => panic!("fake node: no assignment within {timeout:?}"),
            }
        }
    }

    /// Waits for a `Cancel`; `None` if none came within `timeout`.
    pub async fn next_cancel(&mut self, timeout: Duration) -> Option<pb::Cancel> {
        loop {
            match self.recv(timeout).await? {
                FromCoordinator::Cancel(cancel) => return Some(cancel),
                _ => continue,
            }
        }
    }
}
