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
//! reason, is reported as the node gone), reading the stream at once and
//! holding what the driver cannot take yet in a bounded [`backlog`], and a
//! heartbeat task sends
//! `Heartbeat` every interval. Outgoing messages go through a bounded
//! channel of domain values, encoded as they leave ([`codec`] owns the
//! wire form in both directions); the session's token ends both tasks when
//! the driver drops it, and the outgoing stream too ([`outgoing`]), at
//! once, whether or not the node still reads it.

mod backlog;
mod codec;
mod identity;
mod join;
pub(crate) use join::no_node_auth;
mod outgoing;
mod renew;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tokio::sync::mpsc::{self, OwnedPermit, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use weft_proto::pb;

use crate::auth::TokenIndex;
use crate::driver::{Command, Handle, InFlight, NodeTx, ToNode, Unapplied};
use crate::error::Error;
use crate::identity::Identities;
use crate::scheduler::SessionId;
use crate::tls::ServerTls;
use backlog::{Backlog, Item};
use codec::FromNode;
use renew::Renewal;

/// Messages buffered per node session. Assignments are bounded by credits
/// and batched, so this only fills when the node stops reading.
const SESSION_BUFFER: usize = 256;

/// A session's outgoing messages, encoded as they leave, as their wire
/// bytes (an `Assign` written straight from the assignments and split to
/// fit the message limit: [`codec::encode`]).
type Outgoing = Pin<Box<dyn Stream<Item = Result<bytes::Bytes, Status>> + Send>>;

/// The node API.
#[derive(Clone)]
pub(crate) struct NodeApi {
    pub handle: Handle,
    /// Join tokens (`Join` checks and counts them).
    pub tokens: Arc<TokenIndex>,
    /// Joined nodes (`Join` adds them, `Connect` checks them).
    pub identities: Arc<Identities>,
    /// The CA that signs node certificates (`None`: plaintext).
    pub tls: Option<Arc<ServerTls>>,
}

/// The HTTP/2 connection window the coordinator grants each connection.
///
/// HTTP/2 (h2) fails a whole connection with `GOAWAY ENHANCE_YOUR_CALM`
/// once the small DATA frames it received but the application has not read
/// yet cost more than half this window: 256 bytes less the frame's length
/// each. At hyper's default of 1 MiB that is about 2,000 node heartbeats,
/// which arrive in one burst whenever the coordinator gets the CPU later
/// than the node sends. Half of 128 MiB covers a whole stream window
/// (1 MiB, unchanged) of the smallest gRPC messages (5 bytes, 251 each:
/// 52.6 MB), so one stream can no longer fail its connection however
/// slowly it is read (a node session paused by its backlog included): it
/// is held back by its own stream window instead. What a stream may hold
/// unread is still its 1 MiB window.
pub(crate) const CONNECTION_WINDOW: u32 = 128 * 1024 * 1024;

/// A node session's reader reads on while its event batches the driver has
/// not applied yet (in its [`backlog`] and in the driver's inbox together)
/// are at most this many times `--max-message-size`.
const BACKLOG_MESSAGES: usize = 4;

/// How the reading part of a session ended.
enum End {
    /// The stream ended or failed: what was read still goes to the driver.
    Stream,
    /// The session was closed, or the coordinator stops.
    Closed,
}

/// Forwards the node's messages to the driver until the stream ends, the
/// session is closed, or the coordinator stops; then reports the node gone.
///
/// The stream is read at once, whether or not the driver can take the
/// message yet: what it cannot take waits, merged, in a [`Backlog`], so
/// HTTP/2 never holds the node's small frames unread (see [`backlog`]).
/// A node more than [`BACKLOG_MESSAGES`] messages' worth ahead of the
/// driver is read no further until the driver has caught up: HTTP/2 flow
/// control holds it back, on its own stream only ([`CONNECTION_WINDOW`]
/// keeps that from failing the connection).
#[tracing::instrument(skip_all, fields(session = session.0))]
async fn read_session(
    handle: Handle,
    session: SessionId,
    mut inbound: Streaming<pb::NodeMessage>,
    token: CancellationToken,
    mut renewal: Renewal,
) {
    let max = handle.config.max_message_size;
    let limit = BACKLOG_MESSAGES.saturating_mul(max);
    let mut backlog = Backlog::new(max);
    // Event batches in the driver's inbox, not applied yet.
    let unapplied = Arc::new(Unapplied::default());
    // A slot in the driver's inbox being waited for (only while it is full).
    let mut slot: Option<Reserve> = None;
    let mut paused_before = false;
    let end = loop {
        // Hand over what the driver takes now.
        while slot.is_none() && !backlog.is_empty() {
            match handle.inbox.try_reserve() {
                Ok(permit) => {
                    if let Some(item) = backlog.pop() {
                        permit.send(command(session, item, &unapplied));
                    }
                }
                Err(TrySendError::Full(())) => {
                    slot = Some(Box::pin(handle.inbox.clone().reserve_owned()));
                }
                Err(TrySendError::Closed(())) => return,
            }
        }
        let held = backlog.bytes() + unapplied.bytes();
        let paused = held > limit;
        if paused && !paused_before {
            // Once per session: a node this far ahead is rare and expected
            // to stay so.
            paused_before = true;
            tracing::warn!(
                held_bytes = held,
                limit_bytes = limit,
                "node is more than 4 x --max-message-size ahead of the coordinator; \
                 reading it waits until the coordinator has caught up"
            );
        }
        let message = tokio::select! {
            biased;
            _ = token.cancelled() => break End::Closed,
            permit = reserved(&mut slot) => {
                slot = None;
                let Ok(permit) = permit else { return };
                if let Some(item) = backlog.pop() {
                    permit.send(command(session, item, &unapplied));
                }
                continue;
            }
            () = unapplied.applied(), if paused => continue,
            message = inbound.message(), if !paused => message,
        };
        let item = match message {
            Ok(Some(message)) => {
                let encoded = message.encoded_len();
                match codec::from_node(message) {
                    FromNode::Credits(grant) => Item::Credits(grant),
                    FromNode::Heartbeat => Item::Heartbeat,
                    FromNode::Events(events) => {
                        let bytes = backlog::event_bytes(encoded, &events);
                        Item::Events(events, bytes)
                    }
                    FromNode::Draining => Item::Draining,
                    FromNode::RegisterAgain => {
                        tracing::warn!("node sent Register twice; closing its session");
                        break End::Stream;
                    }
                    FromNode::RenewCertificate(csr_der) => {
                        renewal.answer(&csr_der);
                        // Any message shows the node alive.
                        Item::Heartbeat
                    }
                }
            }
            Ok(None) => {
                tracing::debug!("node closed its stream");
                break End::Stream;
            }
            Err(status) => {
                tracing::debug!(%status, "node stream failed");
                break End::Stream;
            }
        };
        backlog.push(item);
    };
    // Dropping the stream releases what HTTP/2 still holds of it.
    drop(inbound);
    drop(slot);
    if let End::Stream = end {
        // What was read goes to the driver first, in order.
        while let Some(item) = backlog.pop() {
            tokio::select! {
                biased;
                _ = token.cancelled() => break,
                sent = handle.tell(command(session, item, &unapplied)) => if sent.is_err() { return },
            }
        }
    }
    let _ = handle.tell(Command::NodeGone { session }).await;
}

/// Waiting for a slot in the driver's inbox.
type Reserve =
    Pin<Box<dyn Future<Output = Result<OwnedPermit<Command>, mpsc::error::SendError<()>>> + Send>>;

/// The slot `slot` waits for; never, when it waits for none.
async fn reserved(
    slot: &mut Option<Reserve>,
) -> Result<OwnedPermit<Command>, mpsc::error::SendError<()>> {
    match slot {
        Some(reserve) => reserve.await,
        None => std::future::pending().await,
    }
}

/// The driver's command for a backlog item of `session`; an event batch
/// counts on `unapplied` until the driver is done with it.
fn command(session: SessionId, item: Item, unapplied: &Arc<Unapplied>) -> Command {
    match item {
        Item::Credits(grant) => Command::Credits { session, grant },
        Item::Heartbeat => Command::Heartbeat { session },
        Item::Events(events, bytes) => Command::NodeEvents {
            session,
            events,
            in_flight: InFlight::new(unapplied, bytes),
        },
        Item::Draining => Command::Draining { session },
    }
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
impl weft_proto::wire::node_service::node_service_server::NodeService for NodeApi {
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
        let mut registration = codec::registration(register, self.handle.config.max_node_slots)?;
        if let Some((node_id, name)) = &certified {
            registration.node_id = *node_id;
            registration.name.clone_from(name);
        }
        let (node_id, node_name) = (registration.node_id, registration.name.clone());
        let session = self.handle.next_session();
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let token = self.handle.cancel.child_token();
        let heartbeat_tx = tx.clone();
        let renewal = Renewal::new(
            tx.clone(),
            certified.and_then(|(node_id, _)| {
                let tls = Arc::clone(self.tls.as_ref()?);
                Some(renew::Certified {
                    node_id,
                    tls,
                    identities: Arc::clone(&self.identities),
                    lifetime: self.handle.config.node_cert_lifetime,
                })
            }),
        );
        let session_token = token.clone();
        // The outgoing stream ends when the session closes, read or not.
        let token_for_stream = token.clone();
        // To its end whatever the node does: once the driver has the
        // session (and the attempts the node reports), only its reader
        // reports it gone, so the reader is started even if the node hangs
        // up meanwhile (its stream then ends at once, and the node's
        // attempts and name are freed, not held until it times out).
        let handle = self.handle.clone();
        let outgoing = crate::service::to_completion(async move {
            handle
                .call(|reply| Command::Register {
                    session,
                    registration,
                    tx,
                    token: session_token,
                    reply,
                })
                .await??;
            tracing::debug!(%node_id, %node_name, session = session.0, "session open");
            let interval = handle.config.heartbeat_interval;
            handle
                .tasks
                .spawn(send_heartbeats(heartbeat_tx, interval, token.clone()));
            handle.tasks.spawn(read_session(
                handle.clone(),
                session,
                inbound,
                token,
                renewal,
            ));
            let max = handle.config.max_message_size;
            let traced = handle.trace.is_some();
            let (outgoing, closer) = outgoing::outgoing(rx, token_for_stream, max, traced);
            handle.tasks.spawn(closer);
            Ok(outgoing)
        })
        .await?;
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
