//! A fake node for the coordinator's socket tests: it speaks the node
//! protocol with the generated client, so tests can play any node,
//! well-behaved or not. Each test binary uses a different part of it.
#![allow(dead_code)]

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use weft_proto::pb;
use weft_proto::pb::coordinator_message::Body as Out;
use weft_proto::pb::node_message::Body as In;
use weft_proto::pb::node_service_client::NodeServiceClient;

/// How long a test waits for the coordinator to say something.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A channel to `url` (the coordinator's `http://ADDR`).
pub async fn channel(url: String) -> Channel {
    Endpoint::from_shared(url)
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .unwrap()
}

/// One node session, after the coordinator's `Registered`.
pub struct FakeNode {
    pub tx: mpsc::Sender<pb::NodeMessage>,
    pub rx: Streaming<pb::CoordinatorMessage>,
    pub node_id: String,
}

/// Opens a session whose first message is `first` (normally a Register);
/// the coordinator's refusal comes back as the `Status`.
pub async fn connect(url: String, first: In) -> Result<FakeNode, tonic::Status> {
    let (tx, rx) = mpsc::channel(64);
    tx.send(pb::NodeMessage { body: Some(first) })
        .await
        .unwrap();
    let mut client = NodeServiceClient::new(channel(url).await);
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    let first = tokio::time::timeout(DEADLINE, inbound.message())
        .await
        .expect("Registered in time")?
        .expect("a first message");
    let Some(Out::Registered(registered)) = first.body else {
        panic!("first message must be Registered, got {first:?}");
    };
    Ok(FakeNode {
        tx,
        rx: inbound,
        node_id: registered.node_id,
    })
}

impl FakeNode {
    pub async fn send(&self, body: In) {
        self.tx
            .send(pb::NodeMessage { body: Some(body) })
            .await
            .unwrap();
    }

    pub async fn credits(&self, grant: u32) {
        self.send(In::Credits(pb::Credits { grant })).await;
    }

    pub async fn events(&self, events: Vec<pb::NodeTaskEvent>) {
        self.send(In::Events(pb::TaskEvents { events })).await;
    }

    pub async fn event(&self, task_id: &str, attempt: u32, body: pb::node_task_event::Body) {
        self.events(vec![pb::NodeTaskEvent {
            task_id: task_id.into(),
            attempt,
            body: Some(body),
        }])
        .await;
    }

    /// Reports the attempt succeeded with output `done`.
    pub async fn finished(&self, task_id: &str, attempt: u32) {
        let finished = pb::Finished {
            outcome: pb::Outcome::Succeeded as i32,
            output: "done".into(),
            ..Default::default()
        };
        self.event(
            task_id,
            attempt,
            pb::node_task_event::Body::Finished(finished),
        )
        .await;
    }

    /// The next message that is not a heartbeat.
    pub async fn next(&mut self) -> Out {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.rx.message())
                .await
                .expect("a message in time")
                .expect("stream ok")
                .expect("stream open");
            match message.body {
                Some(Out::Heartbeat(_)) => continue,
                Some(body) => return body,
                None => panic!("empty message"),
            }
        }
    }

    /// The next message, which must be an Assign.
    pub async fn assignments(&mut self) -> Vec<pb::Assignment> {
        match self.next().await {
            Out::Assign(assign) => assign.tasks,
            other => panic!("expected Assign, got {other:?}"),
        }
    }

    /// The next Assign's (task id, attempt) pairs.
    pub async fn assigned_ids(&mut self) -> Vec<(String, u32)> {
        self.assignments()
            .await
            .into_iter()
            .map(|a| (a.task_id, a.attempt))
            .collect()
    }
}
