//! The operator commands: `nodes`, `nodes revoke`, `drain`, `info`. Thin: call the
//! [`Client`], print the answer.

use std::time::Duration;

use anyhow::Context;

use weft_client::Client;
use weft_proto::NodeInfo;

use crate::exit;
use crate::output::{OutputFormat, cluster_json, cluster_text, node_json, nodes_table, printable};

/// `weft nodes`.
pub async fn nodes(client: &Client, format: OutputFormat) -> anyhow::Result<u8> {
    let nodes = client.nodes().await?;
    match format {
        OutputFormat::Text if nodes.is_empty() => eprintln!("weft: no nodes connected"),
        OutputFormat::Text => println!("{}", nodes_table(&nodes)),
        OutputFormat::Json => {
            let all: Vec<_> = nodes.iter().map(node_json).collect();
            println!("{}", serde_json::Value::from(all));
        }
    }
    Ok(exit::SUCCESS)
}

/// `weft drain NODE [--grace D]`.
pub async fn drain(
    client: &Client,
    format: OutputFormat,
    node: &str,
    grace: Option<Duration>,
) -> anyhow::Result<u8> {
    let info = client
        .drain(node, grace)
        .await
        .with_context(|| format!("draining node {node}"))?;
    match format {
        OutputFormat::Text => println!("{}", drain_text(&info)),
        OutputFormat::Json => println!("{}", node_json(&info)),
    }
    Ok(exit::SUCCESS)
}

/// What `weft drain` says in text: the node's name [`printable`] (a node
/// names itself).
fn drain_text(info: &NodeInfo) -> String {
    format!(
        "node {} ({}) {}, {} running",
        printable(&info.name),
        info.id,
        info.state,
        info.running.len()
    )
}

/// `weft nodes revoke NODE`.
pub async fn revoke(client: &Client, format: OutputFormat, node: &str) -> anyhow::Result<u8> {
    let answer = client
        .revoke_node(node)
        .await
        .with_context(|| format!("revoking node {node}"))?;
    match format {
        OutputFormat::Text => println!(
            "node {} ({}) revoked{}; its certificate is refused from now on",
            printable(&answer.name),
            answer.node_id,
            if answer.was_connected {
                format!(
                    ": its stream is closed and {} task(s) went back to the queue",
                    answer.requeued
                )
            } else {
                String::new()
            }
        ),
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({
                "node_id": answer.node_id,
                "name": answer.name,
                "was_connected": answer.was_connected,
                "requeued": answer.requeued,
            })
        ),
    }
    Ok(exit::SUCCESS)
}

/// `weft info`.
pub async fn info(client: &Client, format: OutputFormat) -> anyhow::Result<u8> {
    let info = client.cluster_info().await?;
    match format {
        OutputFormat::Text => println!("{}", cluster_text(&info)),
        OutputFormat::Json => println!("{}", cluster_json(&info)),
    }
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use weft_proto::{NodeId, NodeState};

    use super::*;

    #[test]
    fn a_drained_node_name_is_shown_escaped() {
        let info = NodeInfo {
            resources: Default::default(),
            resources_free: Default::default(),
            id: NodeId::new(),
            name: "n\x1b]0;pwn\x07".into(),
            labels: Default::default(),
            slots: 4,
            slots_used: 0,
            slots_free: 4,
            running: Vec::new(),
            last_heartbeat_age: Duration::ZERO,
            state: NodeState::Draining,
            handlers: Vec::new(),
            finished: 0,
        };
        let text = drain_text(&info);
        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.starts_with("node n\\u{1b}]0;pwn\\u{7} ("), "{text}");
    }
}
