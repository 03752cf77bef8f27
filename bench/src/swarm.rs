//! Many simulated nodes from one process: `n` `NodeService.Connect`
//! streams spread over a handful of channels (HTTP/2 multiplexes them; a
//! server allows about 200 streams per connection), each registering with
//! one slot and the `noop` handler, granting its slot, and heartbeating at
//! the interval the coordinator asks for. They never run anything: the
//! point is what idle nodes cost the coordinator.
//!
//! Against a coordinator with TLS and auth (the bench's default) every
//! simulated node first joins as `weft-node` does (`NodeService.Join`
//! with a join token: its own key and certificate request, one identity
//! per node, since the coordinator takes a session's node id from its
//! certificate), then connects presenting its certificate. A client
//! certificate belongs to a TLS connection, so those nodes get one
//! connection each, as real nodes have.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt, stream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use weft_proto::convert::duration_from_pb;
use weft_proto::pb;
use weft_proto::pb::node_service_client::NodeServiceClient;
use weft_proto::tls::{ClientIdentity, TlsConnector, Trust};
use weft_proto::{CoordinatorAddr, JoinToken};

/// Streams per channel (below the server's default of 200 per connection).
const STREAMS_PER_CHANNEL: usize = 100;

/// Registrations (and joins) in flight at once while the swarm connects.
const CONNECTING_AT_ONCE: usize = 64;

/// A running swarm; dropping it closes every stream.
pub struct Swarm {
    sessions: JoinSet<()>,
}

impl Swarm {
    /// Opens `n` node sessions against `url` and returns once every one got
    /// its `Registered`. With `join` (a join token, for a coordinator that
    /// authenticates nodes) each node first joins and then connects with
    /// its own certificate; without, the nodes present none.
    pub async fn connect(
        url: &str,
        n: usize,
        trust: Option<&Trust>,
        join: Option<&str>,
    ) -> anyhow::Result<Swarm> {
        let address = CoordinatorAddr::parse(url)?;
        let channels = match join {
            None => {
                let (dial, connector) = weft_proto::tls::dial_plan(&address, trust)?;
                let mut channels = Vec::new();
                for _ in 0..n.div_ceil(STREAMS_PER_CHANNEL).max(1) {
                    channels.push(open(url, &dial, connector.clone()).await?);
                }
                channels
            }
            Some(token) => joined_channels(url, &address, n, trust, token).await?,
        };
        let mut sessions = JoinSet::new();
        let opened: Vec<_> = stream::iter(0..n)
            .map(|i| register(channels[i % channels.len()].clone(), i))
            .buffer_unordered(CONNECTING_AT_ONCE)
            .try_collect()
            .await?;
        for session in opened {
            sessions.spawn(session.run());
        }
        Ok(Swarm { sessions })
    }

    /// Sessions still running (a stream that ended is a lost node).
    pub fn alive(&mut self) -> usize {
        while self.sessions.try_join_next().is_some() {}
        self.sessions.len()
    }
}

/// One registered simulated node.
struct Session {
    tx: mpsc::Sender<pb::NodeMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    heartbeat: Duration,
}

/// The name of simulated node `i` (joined and registered under it).
fn node_name(i: usize) -> String {
    format!("sim-{i:04}")
}

/// One channel to `dial`, TLS through `connector` when there is one.
async fn open(url: &str, dial: &str, connector: Option<TlsConnector>) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(dial.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3));
    match connector {
        Some(connector) => endpoint.connect_with_connector(connector).await,
        None => endpoint.connect().await,
    }
    .with_context(|| format!("connecting to {url}"))
}

/// Joins `n` nodes with `token` (over one channel presenting no
/// certificate, as a joining node does), then opens one channel per node
/// presenting its new certificate: channel `i` is node `i`'s.
async fn joined_channels(
    url: &str,
    address: &CoordinatorAddr,
    n: usize,
    trust: Option<&Trust>,
    token: &str,
) -> anyhow::Result<Vec<Channel>> {
    let token = JoinToken::parse(token).context("reading the swarm's join token")?;
    let (dial, connector) = weft_proto::tls::dial_plan(address, trust)?;
    let joining = NodeServiceClient::new(open(url, &dial, connector).await?);
    let identities: Vec<Arc<ClientIdentity>> = stream::iter(0..n)
        .map(|i| join(joining.clone(), &token.credential, i))
        .buffered(CONNECTING_AT_ONCE)
        .try_collect()
        .await?;
    stream::iter(identities)
        .map(|identity| async move {
            let (dial, connector) = weft_proto::tls::dial_plan_as(address, trust, Some(identity))?;
            open(url, &dial, connector).await
        })
        .buffered(CONNECTING_AT_ONCE)
        .try_collect()
        .await
}

/// Joins simulated node `i`: a new key, a certificate request signed with
/// it, `Join` with the token's credential; answers the identity to
/// present on its connection.
async fn join(
    mut client: NodeServiceClient<Channel>,
    credential: &str,
    i: usize,
) -> anyhow::Result<Arc<ClientIdentity>> {
    let name = node_name(i);
    let (key, csr_der) = key_and_request(&name)?;
    let response = client
        .join(pb::JoinRequest {
            token: credential.to_owned(),
            name: name.clone(),
            csr_der: csr_der.into(),
        })
        .await
        .with_context(|| format!("joining simulated node {name}"))?
        .into_inner();
    let identity = ClientIdentity::from_pem(&response.certificate_chain_pem, &key.serialize_pem())
        .with_context(|| format!("the certificate simulated node {name} was given"))?;
    Ok(identity)
}

/// A new key (ECDSA P-256, rcgen's default) and a certificate request
/// signed with it, as `weft-node` makes them when it joins.
fn key_and_request(name: &str) -> anyhow::Result<(rcgen::KeyPair, Vec<u8>)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

async fn register(channel: Channel, i: usize) -> anyhow::Result<Session> {
    let (tx, rx) = mpsc::channel(8);
    let register = pb::Register {
        name: node_name(i),
        slots: 1,
        handlers: vec!["noop".to_owned()],
        protocol_version: pb::ProtocolVersion::ProtocolVersion1 as i32,
        ..Default::default()
    };
    tx.send(body(pb::node_message::Body::Register(register)))
        .await
        .context("queueing Register")?;
    let mut inbound = NodeServiceClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await
        .with_context(|| format!("opening Connect stream {i}"))?
        .into_inner();
    let heartbeat = match inbound.message().await? {
        Some(pb::CoordinatorMessage {
            body: Some(pb::coordinator_message::Body::Registered(registered)),
        }) => registered
            .heartbeat_interval
            .map(|d| duration_from_pb("Registered.heartbeat_interval", &d))
            .transpose()?
            .unwrap_or(Duration::from_secs(1)),
        other => bail!("simulated node {i}: expected Registered first, got {other:?}"),
    };
    tx.send(body(pb::node_message::Body::Credits(pb::Credits {
        grant: 1,
    })))
    .await
    .context("queueing Credits")?;
    Ok(Session {
        tx,
        inbound,
        heartbeat,
    })
}

impl Session {
    /// Heartbeats until the stream ends; ignores what the coordinator says.
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let beat = body(pb::node_message::Body::Heartbeat(pb::Heartbeat {}));
                    if self.tx.send(beat).await.is_err() {
                        return;
                    }
                }
                message = self.inbound.message() => match message {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return,
                },
            }
        }
    }
}

fn body(body: pb::node_message::Body) -> pb::NodeMessage {
    pb::NodeMessage { body: Some(body) }
}
