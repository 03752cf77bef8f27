//! Fake nodes (see `crate::fake_node`) on a test cluster, joined the way
//! the cluster wants: with TLS (the default) a fake node joins with a join
//! token of its own and connects presenting its certificate, as any worker
//! must; with `.insecure()` it connects plainly.

use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use weft_proto::pb;
use weft_proto::pb::node_message::Body as ToCoordinator;

use super::TestCluster;
use crate::fake_node::{self, FakeNode, Joined};

/// An opened `Connect` stream: the sender, the coordinator's messages, and
/// its first message.
pub type Opened = (
    mpsc::Sender<pb::NodeMessage>,
    Streaming<pb::CoordinatorMessage>,
    pb::CoordinatorMessage,
);

impl TestCluster {
    /// The identity of a fake node named `name`, joined with a join token
    /// of its own; `None` on an `--insecure` cluster (nodes do not join).
    pub async fn join_fake(&self, name: &str) -> Option<Joined> {
        if self.settings.insecure {
            return None;
        }
        let token = self.join_token(name).await;
        Some(
            fake_node::join(&token, name)
                .await
                .unwrap_or_else(|s| panic!("fake node {name} could not join: {s}")),
        )
    }

    /// Connects a fake node as `identity` (`None`: no certificate) and
    /// registers it with `register`; fails the test unless it registers.
    pub async fn connect_fake(
        &self,
        identity: Option<&Joined>,
        register: pb::Register,
    ) -> FakeNode {
        match identity {
            Some(joined) => FakeNode::connect_as(&self.url(), joined.identity(), register)
                .await
                .unwrap_or_else(|s| panic!("fake node registration refused: {s}")),
            None => FakeNode::connect(&self.url(), register).await,
        }
    }

    /// A fake node registered with `register`, joined first under its
    /// name when the cluster needs it.
    pub async fn fake_node(&self, register: pb::Register) -> FakeNode {
        let joined = self.join_fake(&register.name).await;
        self.connect_fake(joined.as_ref(), register).await
    }

    /// Opens a `Connect` stream as a node joined under `name` (plainly on
    /// an `--insecure` cluster) whose first message is `first`: the
    /// coordinator's first message, or the status it refused with.
    pub async fn open_raw(&self, name: &str, first: ToCoordinator) -> Result<Opened, Status> {
        match self.join_fake(name).await {
            Some(joined) => fake_node::open_raw_as(&self.url(), joined.identity(), first).await,
            None => fake_node::open_raw(&self.url(), first).await,
        }
    }
}
