//! Many simulated nodes from one process: `n` `NodeService.Connect`
//! streams spread over a handful of channels (HTTP/2 multiplexes them; a
//! server allows about 200 streams per connection), each registering with
//! one slot and the `noop` handler, granting its slot, and heartbeating at
//! the interval the coordinator asks for. They never run anything: the
//! point is what idle nodes cost the coordinator.

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

/// Streams per channel (below the server's default of 200 per connection).
const STREAMS_PER_CHANNEL: usize = 100;

/// Registrations in flight at once while the swarm connects.
const CONNECTING_AT_ONCE: usize = 64;

/// A running swarm; dropping it closes every stream.
pub struct Swarm {
    sessions: JoinSet<()>,
}

impl Swarm {
    /// Opens `n` node sessions against `url` and returns once every one got
    /// its `Registered`.
    pub async fn connect(
        url: &str,
        n: usize,
        trust: Option<&weft_proto::tls::Trust>,
    ) -> anyhow::Result<Swarm> {
        let address = weft_proto::CoordinatorAddr::parse(url)?;
        let (dial, connector) = weft_proto::tls::dial_plan(&address, trust)?;
        let mut channels = Vec::new();
        for _ in 0..n.div_ceil(STREAMS_PER_CHANNEL).max(1) {
            let endpoint = Endpoint::from_shared(dial.clone())?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(3));
            let channel = match connector.clone() {
                Some(connector) => endpoint.connect_with_connector(connector).await,
                None => endpoint.connect().await,
            }
            .with_context(|| format!("connecting to {url}"))?;
            channels.push(channel);
        }
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

async fn register(channel: Channel, i: usize) -> anyhow::Result<Session> {
    let (tx, rx) = mpsc::channel(8);
    let register = pb::Register {
        name: format!("sim-{i:04}"),
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
