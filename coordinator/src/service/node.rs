//! `NodeService.Connect`: one session per node.
//!
//! The first message must be `Register`; it is validated here and handed to
//! the driver, which puts `Registered` first on the outgoing stream. Then a
//! reader task forwards the node's messages to the driver (its end, for any
//! reason, is reported as the node gone) and a heartbeat task sends
//! `Heartbeat` every interval. Outgoing messages go through a bounded
//! channel; the session's token ends both tasks when the driver drops it.

use std::collections::BTreeMap;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use weft_proto::{Attempt, NodeId, Outcome, OutputStream, PROTOCOL_VERSION, TaskId, pb};

use crate::driver::{Command, Handle, NodeTx};
use crate::error::Error;
use crate::scheduler::{NodeEventBody, NodeRegistration, NodeTaskEvent, SessionId};

/// Messages buffered per node session. Assignments are bounded by credits
/// and batched, so this only fills when the node stops reading.
const SESSION_BUFFER: usize = 256;

/// The node API.
pub(crate) struct NodeApi {
    pub handle: Handle,
}

fn registration(register: pb::Register) -> Result<NodeRegistration, Error> {
    if register.protocol_version != PROTOCOL_VERSION as i32 {
        return Err(Error::ProtocolVersion(register.protocol_version));
    }
    if register.slots == 0 {
        return Err(Error::BadRegistration("slots must be at least 1"));
    }
    let node_id = register
        .previous_node_id
        .parse::<NodeId>()
        .unwrap_or_else(|_| NodeId::new());
    let name = if register.name.trim().is_empty() {
        node_id.to_string()
    } else {
        register.name
    };
    let running = register
        .running
        .iter()
        .filter_map(|r| match r.task_id.parse::<TaskId>() {
            Ok(id) => Some((id, Attempt(r.attempt))),
            Err(err) => {
                tracing::warn!(node_name = %name, error = %err, "ignoring a running attempt with a bad task id");
                None
            }
        })
        .collect();
    Ok(NodeRegistration {
        node_id,
        name,
        labels: register.labels.into_iter().collect::<BTreeMap<_, _>>(),
        slots: register.slots,
        prefetch: register.prefetch,
        handlers: register.handlers,
        running,
    })
}

/// A node's event batch as domain events; malformed entries are dropped.
fn node_events(events: pb::TaskEvents) -> Vec<NodeTaskEvent> {
    use pb::node_task_event::Body;
    events
        .events
        .into_iter()
        .filter_map(|event| {
            let Ok(task_id) = event.task_id.parse::<TaskId>() else {
                tracing::warn!(task_id = %event.task_id, "dropping node event with a bad task id");
                return None;
            };
            let body = match event.body? {
                Body::Started(_) => NodeEventBody::Started,
                Body::Output(chunk) => NodeEventBody::Output {
                    stream: OutputStream::try_from(chunk.stream).unwrap_or(OutputStream::Stdout),
                    data: chunk.data,
                    seq: chunk.seq,
                },
                Body::Progress(p) => NodeEventBody::Progress {
                    fraction: p.fraction,
                    message: p.message,
                },
                Body::Finished(f) => match Outcome::try_from(f.outcome) {
                    Ok(outcome) => NodeEventBody::Finished {
                        outcome,
                        exit_code: f.exit_code,
                        output: f.output,
                        error: f.error,
                    },
                    Err(_) => NodeEventBody::Finished {
                        outcome: Outcome::Failed,
                        exit_code: f.exit_code,
                        output: f.output,
                        error: format!("node reported no outcome ({})", f.outcome),
                    },
                },
            };
            Some(NodeTaskEvent {
                task_id,
                attempt: Attempt(event.attempt),
                body,
            })
        })
        .collect()
}

/// Forwards the node's messages to the driver until the stream ends, the
/// session is closed, or the coordinator stops; then reports the node gone.
#[tracing::instrument(skip_all, fields(session = session.0))]
async fn read_session(
    handle: Handle,
    session: SessionId,
    mut inbound: Streaming<pb::NodeMessage>,
    token: CancellationToken,
) {
    use pb::node_message::Body;
    loop {
        let message = tokio::select! {
            _ = token.cancelled() => break,
            message = inbound.message() => message,
        };
        let command = match message {
            Ok(Some(message)) => match message.body {
                Some(Body::Credits(c)) => Command::Credits {
                    session,
                    grant: c.grant,
                },
                Some(Body::Heartbeat(_)) | None => Command::Heartbeat { session },
                Some(Body::Events(events)) => Command::NodeEvents {
                    session,
                    events: node_events(events),
                },
                Some(Body::Draining(_)) => Command::Draining { session },
                Some(Body::Register(_)) => {
                    tracing::warn!("node sent Register twice; closing its session");
                    break;
                }
            },
            Ok(None) => {
                tracing::debug!("node closed its stream");
                break;
            }
            Err(status) => {
                tracing::debug!(%status, "node stream failed");
                break;
            }
        };
        if handle.tell(command).await.is_err() {
            return;
        }
    }
    let _ = handle.tell(Command::NodeGone { session }).await;
}

/// Sends `Heartbeat` every interval so an idle stream never looks dead.
async fn send_heartbeats(tx: NodeTx, interval: std::time::Duration, token: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let beat = pb::CoordinatorMessage {
            body: Some(pb::coordinator_message::Body::Heartbeat(pb::Heartbeat {})),
        };
        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Ok(beat)) {
            return;
        }
    }
}

#[tonic::async_trait]
impl pb::node_service_server::NodeService for NodeApi {
    type ConnectStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let timeout = self.handle.config.heartbeat_timeout;
        let first = tokio::time::timeout(timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register within the heartbeat timeout"))??;
        let register = match first.and_then(|m| m.body) {
            Some(pb::node_message::Body::Register(register)) => register,
            _ => return Err(Error::BadRegistration("the first message must be Register").into()),
        };
        let registration = registration(register)?;
        let (node_id, node_name) = (registration.node_id, registration.name.clone());
        let session = self.handle.next_session();
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let token = self.handle.cancel.child_token();
        let heartbeat_tx = tx.clone();
        let session_token = token.clone();
        self.handle
            .call(|reply| Command::Register {
                session,
                registration,
                tx,
                token: session_token,
                reply,
            })
            .await??;
        tracing::debug!(%node_id, %node_name, session = session.0, "session open");
        let interval = self.handle.config.heartbeat_interval;
        self.handle
            .tasks
            .spawn(send_heartbeats(heartbeat_tx, interval, token.clone()));
        self.handle
            .tasks
            .spawn(read_session(self.handle.clone(), session, inbound, token));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
