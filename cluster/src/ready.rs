//! Waiting until a coordinator lists N ready nodes: what `weft local`,
//! `weft demo` and `weft bench` do before they send work, whether the
//! nodes run in this process or as processes of their own.
//!
//! Asks the coordinator (`ListNodes`) through a [`Client`] and polls; it
//! starts nothing and stops nothing.

use std::time::{Duration, Instant};

use weft_client::Client;
use weft_proto::NodeState;

use crate::error::Error;

/// How often the node list is read while waiting.
const POLL: Duration = Duration::from_millis(20);

/// Waits until the coordinator behind `client` lists at least `wanted`
/// nodes in state ready; fails with [`Error::NodesNotReady`] once
/// `timeout` has passed without that, or with [`Error::ListNodes`] when
/// the coordinator cannot be asked.
pub async fn wait_nodes_ready(
    client: &Client,
    wanted: usize,
    timeout: Duration,
) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = client
            .nodes()
            .await
            .map_err(Error::ListNodes)?
            .iter()
            .filter(|n| n.state == NodeState::Ready)
            .count();
        if ready >= wanted {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::NodesNotReady {
                ready,
                wanted,
                waited: timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use tokio::net::TcpListener;

    use weft_coordinator::CoordinatorConfig;

    use super::*;
    use crate::LocalCluster;

    #[tokio::test]
    async fn waits_for_the_nodes_and_names_the_count_when_they_are_not_all_there() {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .unwrap();
        let mut cluster = LocalCluster::start(CoordinatorConfig::default(), listener)
            .await
            .unwrap();
        let mut config = cluster.node_config();
        config.name = "ready-1".into();
        config.slots = 1;
        cluster.add_node(config);
        let client = Client::connect_with_token(&cluster.url(), cluster.admin_token().as_deref())
            .await
            .unwrap();

        wait_nodes_ready(&client, 1, Duration::from_secs(30))
            .await
            .unwrap();
        let err = wait_nodes_ready(&client, 2, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::NodesNotReady {
                    ready: 1,
                    wanted: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "only 1 of 2 nodes ready within 100ms",
            "the message names the count"
        );
        cluster.shutdown(Duration::from_secs(2)).await;
    }
}
