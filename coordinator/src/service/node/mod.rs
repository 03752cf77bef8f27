//! `NodeService`: `Connect` (one session per node) and `Join` ([`join`]).
//!
//! With node authentication on (TLS and auth), the node's TLS client
//! certificate is its identity: checked here against the identity index
//! (`crate::identity`) before anything reaches the driver, and its node id
//! is the session's ([`identity`]). The first message must be `Register`;
//! it is validated here and handed to the driver, which puts `Registered`
//! first on the outgoing stream. `RenewCertificate` on the session is
//! answered here too ([`renew`]), not by the driver. Then a
//! reader task forwards the node's messages to the driver (its end, for any
//! reason, is reported as the node gone) and a heartbeat task sends
//! `Heartbeat` every interval. Outgoing messages go through a bounded
//! channel of domain values, encoded as they leave ([`codec`] owns the
//! wire form in both directions); the session's token ends both tasks when
//! the driver drops it.

mod codec;
mod identity;
mod join;
pub(crate) use join::no_node_auth;
mod renew;

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use weft_proto::pb;

use crate::auth::TokenIndex;
use crate::driver::{Command, Handle, NodeTx, ToNode};
use crate::error::Error;
use crate::identity::Identities;
use crate::scheduler::SessionId;
use crate::tls::ServerTls;
use codec::FromNode;
use renew::Renewal;

/// Messages buffered per node session. Assignments are bounded by credits
/// and batched, so this only fills when the node stops reading.
const SESSION_BUFFER: usize = 256;

/// A session's outgoing messages, encoded as they leave (an `Assign` split
/// to fit the message limit: [`codec::encode`]).
type Outgoing = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

/// The node API.
pub(crate) struct NodeApi {
    pub handle: Handle,
    /// Join tokens (`Join` checks and counts them).
    pub tokens: Arc<TokenIndex>,
    /// Joined nodes (`Join` adds them, `Connect` checks them).
    pub identities: Arc<Identities>,
    /// The CA that signs node certificates (`None`: plaintext).
    pub tls: Option<Arc<ServerTls>>,
}

/// Forwards the node's messages to the driver until the stream ends, the
/// session is closed, or the coordinator stops; then reports the node gone.
#[tracing::instrument(skip_all, fields(session = session.0))]
async fn read_session(
    handle: Handle,
    session: SessionId,
    mut inbound: Streaming<pb::NodeMessage>,
    token: CancellationToken,
    renewal: Renewal,
) {
    loop {
        let message = tokio::select! {
            _ = token.cancelled() => break,
            message = inbound.message() => message,
        };
        let command = match message {
            Ok(Some(message)) => match codec::from_node(message) {
                FromNode::Credits(grant) => Command::Credits { session, grant },
                FromNode::Heartbeat => Command::Heartbeat { session },
                FromNode::Events(events) => Command::NodeEvents { session, events },
                FromNode::Draining => Command::Draining { session },
                FromNode::RegisterAgain => {
                    tracing::warn!("node sent Register twice; closing its session");
                    break;
                }
                FromNode::RenewCertificate(csr_der) => {
                    renewal.answer(&csr_der);
                    // Any message shows the node alive.
                    Command::Heartbeat { session }
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
        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(ToNode::Heartbeat) {
            return;
        }
    }
}

#[tonic::async_trait]
impl pb::node_service_server::NodeService for NodeApi {
    type ConnectStream = Outgoing;

    async fn connect(
        &self,
        request: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let node_auth = self.handle.config.node_auth();
        let peer_certs = request.peer_certs();
        if node_auth {
            identity::require_certificate(peer_certs.as_deref())?;
        }
        let mut inbound = request.into_inner();
        let timeout = self.handle.config.heartbeat_timeout;
        let first = tokio::time::timeout(timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register within the heartbeat timeout"))??;
        let register = match first.and_then(|m| m.body) {
            Some(pb::node_message::Body::Register(register)) => register,
            _ => return Err(Error::BadRegistration("the first message must be Register").into()),
        };
        let certified = match node_auth {
            true => Some(self.certified(peer_certs.as_deref(), &register)?),
            false => None,
        };
        let mut registration = codec::registration(register)?;
        if let Some((node_id, name)) = &certified {
            registration.node_id = *node_id;
            registration.name.clone_from(name);
        }
        let (node_id, node_name) = (registration.node_id, registration.name.clone());
        let session = self.handle.next_session();
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let token = self.handle.cancel.child_token();
        let heartbeat_tx = tx.clone();
        let renewal = Renewal {
            tx: tx.clone(),
            certified: certified.and_then(|(node_id, _)| {
                let tls = Arc::clone(self.tls.as_ref()?);
                Some(renew::Certified {
                    node_id,
                    tls,
                    identities: Arc::clone(&self.identities),
                    lifetime: self.handle.config.node_cert_lifetime,
                })
            }),
        };
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
        self.handle.tasks.spawn(read_session(
            self.handle.clone(),
            session,
            inbound,
            token,
            renewal,
        ));
        let max = self.handle.config.max_message_size;
        let outgoing = ReceiverStream::new(rx)
            .flat_map(move |message| futures::stream::iter(codec::encode(message, max)));
        Ok(Response::new(Box::pin(outgoing)))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        join::join(self, request.into_inner())
            .await
            .map(Response::new)
    }
}
