//! A raw node speaking `NodeService.Connect` from the generated stubs, so
//! a test can play a node that misbehaves: one that goes silent, reports
//! for attempts it no longer owns, or breaks the message order.
//!
//! It does only what the test tells it to: no automatic heartbeats (call
//! [`FakeNode::keep_alive`]), no credits until [`FakeNode::grant`].
//!
//! It can also join as a real node does ([`join`]: a key and a request made
//! with rcgen, `Join` over TLS trusting the token's CA pin) and connect
//! presenting the certificate it got ([`FakeNode::connect_as`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use weft_proto::pb::coordinator_message::Body as FromCoordinator;
use weft_proto::pb::node_message::Body as ToCoordinator;
use weft_proto::pb::node_service_client::NodeServiceClient;
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_proto::tls::ClientIdentity;
use weft_proto::{CoordinatorAddr, JoinToken, Outcome, PROTOCOL_VERSION, TaskId, pb};

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

/// A node key (ECDSA P-256, PKCS#8 PEM) and a PKCS#10 request (DER)
/// signed with it, as `weft-node` makes them.
pub fn key_and_csr() -> (String, Vec<u8>) {
    let key = rcgen::KeyPair::generate().expect("a P-256 key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("empty params")
        .serialize_request(&key)
        .expect("a certificate request");
    (key.serialize_pem(), csr.der().to_vec())
}

/// What a successful join gave the node.
#[derive(Clone, Debug)]
pub struct Joined {
    /// The node id its certificate names.
    pub node_id: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// Its certificate then the CA, PEM.
    pub chain_pem: String,
    /// The cluster CA, PEM.
    pub ca_pem: String,
    /// The answer's expiry.
    pub not_after: Option<std::time::SystemTime>,
}

impl Joined {
    /// The certificate as a client identity to connect with.
    pub fn identity(&self) -> Arc<ClientIdentity> {
        ClientIdentity::from_pem(&self.chain_pem, &self.key_pem).expect("a usable identity")
    }
}

/// A `Join` client to the address in `token`, trusting only its CA pin,
/// presenting no certificate.
async fn join_client(token: &JoinToken) -> NodeServiceClient<Channel> {
    let address = CoordinatorAddr::parse(&token.address).expect("the token's address parses");
    let trust = token.trust().expect("the token's pin parses");
    let (dial, connector) =
        weft_proto::tls::dial_plan_as(&address, Some(&trust), None).expect("a dial plan");
    let endpoint = tonic::transport::Endpoint::from_shared(dial)
        .expect("an endpoint")
        .connect_timeout(Duration::from_secs(3));
    let channel = match connector {
        Some(connector) => endpoint.connect_with_connector(connector).await,
        None => endpoint.connect().await,
    }
    .unwrap_or_else(|e| panic!("dialing {} for Join: {e}", token.address));
    NodeServiceClient::new(channel)
}

/// Joins with `token` (a `weftjoin_...` string) as `name` with a CSR
/// from `csr_der` signed by `key_pem`: the coordinator's answer, or its
/// refusal.
pub async fn join_with(
    token: &str,
    name: &str,
    key_pem: String,
    csr_der: Vec<u8>,
) -> Result<Joined, Status> {
    let token = JoinToken::parse(token).expect("a join token");
    let mut client = join_client(&token).await;
    let answer = client
        .join(pb::JoinRequest {
            token: token.credential.clone(),
            name: name.to_owned(),
            csr_der: csr_der.into(),
        })
        .await?
        .into_inner();
    Ok(Joined {
        node_id: answer.node_id,
        key_pem,
        chain_pem: answer.certificate_chain_pem,
        ca_pem: answer.ca_pem,
        not_after: answer
            .not_after
            .as_ref()
            .map(weft_proto::convert::system_time),
    })
}

/// Joins with `token` as `name` with a fresh key (see [`join_with`]).
pub async fn join(token: &str, name: &str) -> Result<Joined, Status> {
    let (key_pem, csr_der) = key_and_csr();
    join_with(token, name, key_pem, csr_der).await
}

/// A `Channel` to `url` presenting `identity` (trusting the cluster CA
/// registered for `url`), or the dial error.
pub async fn channel_as(url: &str, identity: Arc<ClientIdentity>) -> Result<Channel, String> {
    let address = CoordinatorAddr::parse(url).map_err(|e| e.to_string())?;
    let trust = crate::trust::for_url(&address.url());
    let (dial, connector) = weft_proto::tls::dial_plan_as(&address, trust.as_ref(), Some(identity))
        .map_err(|e| e.to_string())?;
    let endpoint = tonic::transport::Endpoint::from_shared(dial)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3));
    match connector {
        Some(connector) => endpoint.connect_with_connector(connector).await,
        None => endpoint.connect().await,
    }
    .map_err(|e| e.to_string())
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
    open_on(channel(url).await, first).await
}

/// [`open_raw`] presenting `identity` as the TLS client certificate. A
/// refused handshake is an error status too.
pub async fn open_raw_as(
    url: &str,
    identity: Arc<ClientIdentity>,
    first: ToCoordinator,
) -> Result<
    (
        mpsc::Sender<pb::NodeMessage>,
        Streaming<pb::CoordinatorMessage>,
        pb::CoordinatorMessage,
    ),
    Status,
> {
    let channel = channel_as(url, identity)
        .await
        .map_err(|e| Status::unavailable(format!("dialing: {e}")))?;
    open_on(channel, first).await
}

async fn open_on(
    channel: Channel,
    first: ToCoordinator,
) -> Result<
    (
        mpsc::Sender<pb::NodeMessage>,
        Streaming<pb::CoordinatorMessage>,
        pb::CoordinatorMessage,
    ),
    Status,
> {
    open_with(channel, first, false).await
}

/// [`open_on`], each message in its own HTTP/2 DATA frame when
/// `frame_each` (else the gRPC stack packs what is ready into one frame).
async fn open_with(
    channel: Channel,
    first: ToCoordinator,
    frame_each: bool,
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
    let mut client = NodeServiceClient::new(channel);
    let outgoing = FramePerMessage {
        inner: ReceiverStream::new(rx),
        split: frame_each,
        yielded: false,
    };
    let mut inbound = client.connect(outgoing).await?.into_inner();
    let reply = tokio::time::timeout(Duration::from_secs(10), inbound.next())
        .await
        .map_err(|_| Status::deadline_exceeded("no first message from the coordinator in 10 s"))?;
    match reply {
        Some(Ok(msg)) => Ok((tx, inbound, msg)),
        Some(Err(status)) => Err(status),
        None => Err(Status::unknown("stream ended before the first message")),
    }
}

/// The messages of `inner`; with `split`, it looks empty once after each
/// message (and wakes itself at once), so the gRPC encoder sends every
/// message as its own HTTP/2 DATA frame, as a node sending one message at
/// a time does, instead of packing what is ready into one frame.
struct FramePerMessage<S> {
    inner: S,
    split: bool,
    yielded: bool,
}

impl<S: Stream + Unpin> Stream for FramePerMessage<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.split && self.yielded {
            self.yielded = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(_)) = next {
            self.yielded = true;
        }
        next
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
        let opened = open_raw(url, ToCoordinator::Register(register)).await;
        FakeNode::registered(
            opened.unwrap_or_else(|s| panic!("fake node registration refused: {s}")),
        )
    }

    /// Connects presenting `identity` (a joined node's certificate) and
    /// registers with `register`: the session, or the coordinator's
    /// refusal.
    pub async fn connect_as(
        url: &str,
        identity: Arc<ClientIdentity>,
        register: pb::Register,
    ) -> Result<FakeNode, Status> {
        let opened = open_raw_as(url, identity, ToCoordinator::Register(register)).await?;
        Ok(FakeNode::registered(opened))
    }

    /// Connects on `channel` (which other rpcs may share) and registers
    /// with `register`, sending every message as its own HTTP/2 DATA frame
    /// (see [`FakeNode::send`]); fails the test unless it registers.
    pub async fn connect_framed(channel: Channel, register: pb::Register) -> FakeNode {
        let opened = open_with(channel, ToCoordinator::Register(register), true).await;
        FakeNode::registered(
            opened.unwrap_or_else(|s| panic!("fake node registration refused: {s}")),
        )
    }

    fn registered(
        (tx, inbound, first): (
            mpsc::Sender<pb::NodeMessage>,
            Streaming<pb::CoordinatorMessage>,
            pb::CoordinatorMessage,
        ),
    ) -> FakeNode {
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

    /// Asks for a new certificate for the key of `csr_der` and waits for
    /// the answer (`None`: none within `timeout`, or the stream ended).
    pub async fn renew(
        &mut self,
        csr_der: Vec<u8>,
        timeout: Duration,
    ) -> Option<pb::NodeCertificate> {
        let renew = pb::RenewCertificate {
            csr_der: csr_der.into(),
        };
        if !self.send(ToCoordinator::RenewCertificate(renew)).await {
            return None;
        }
        loop {
            match self.recv(timeout).await? {
                FromCoordinator::Certificate(cert) => return Some(cert),
                _ => continue,
            }
        }
    }

    /// Waits until the stream ends or fails (the coordinator closed it):
    /// true if it did within `timeout`. Other messages are skipped.
    pub async fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.inbound.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Waits until the stream ends: `None` if it did not within `timeout`,
    /// else the status it ended with (`None` inside: it ended cleanly).
    /// Other messages are skipped.
    pub async fn wait_end(&mut self, timeout: Duration) -> Option<Option<Status>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.inbound.next()).await {
                Err(_) => return None,
                Ok(None) => return Some(None),
                Ok(Some(Err(status))) => return Some(Some(status)),
                Ok(Some(Ok(_))) => continue,
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
