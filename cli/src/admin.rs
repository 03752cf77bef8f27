//! The operator commands: `nodes`, `nodes revoke`, `drain`, `info`. Thin: call the
//! [`Client`], print the answer.

use std::time::Duration;

use anyhow::Context;

use weft_client::Client;

use crate::exit;
use crate::output::{OutputFormat, cluster_json, cluster_text, node_json, nodes_table};

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
        OutputFormat::Text => println!(
            "node {} ({}) {}, {} running",
            info.name,
            info.id,
            info.state,
            info.running.len()
        ),
        OutputFormat::Json => println!("{}", node_json(&info)),
    }
    Ok(exit::SUCCESS)
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
            answer.name,
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
