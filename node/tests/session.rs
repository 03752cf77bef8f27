//! The node's session against a fake coordinator (`fake/`): it registers
//! first, grants its free slots, batches events, gives slots back after the
//! `Finished` they answer, cancels exactly one attempt, and dies quietly
//! when killed. Drain, reconnects and the lease have their own files.

mod common;
mod fake;

use weft_proto::pb::coordinator_message::Body as Inbound;
use weft_proto::pb::node_message::Body as Outbound;
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_proto::{Outcome, TaskSpec, pb};

use fake::*;

#[tokio::test]
async fn node_registers_first_then_grants_its_free_slots() {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, 3);
    let mut conn = next_conn(&mut conns).await;
    let (register, node_id) = conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(register.name, "test-node");
    assert_eq!(register.slots, 3);
    assert_eq!(
        register.protocol_version,
        pb::ProtocolVersion::ProtocolVersion1 as i32
    );
    assert_eq!(register.labels.get("zone").map(String::as_str), Some("a"));
    assert!(
        register.handlers.contains(&"sleep".to_owned())
            && register.handlers.contains(&"spin".to_owned())
    );
    assert!(register.running.is_empty() && register.previous_node_id.is_empty());
    assert_eq!(conn.credits().await, 3);
    assert_eq!(node.registered(WAIT).await, Some(node_id));
    assert_eq!(node.node_id(), Some(node_id));
    node.kill().await;
}

#[tokio::test]
async fn finished_attempt_grants_its_slots_back_after_the_finished_event() {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, 2);
    let mut conn = next_conn(&mut conns).await;
    conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(conn.credits().await, 2);
    let ids = conn
        .assign(vec![TaskSpec::call("echo", "hi").slots(2)])
        .await;
    let (seen, done) = conn.until_finished(ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Succeeded);
    assert_eq!(done.output.as_ref(), b"hi");
    assert!(
        seen.iter().all(|m| !matches!(m, Outbound::Credits(_))),
        "no grant before Finished"
    );
    assert_eq!(
        conn.credits().await,
        2,
        "the slots come back after Finished"
    );
    node.kill().await;
}

#[tokio::test]
async fn events_travel_in_batches() {
    let (_conns, node, mut conn) = registered(64).await;
    let ids = conn.assign(vec![TaskSpec::call("noop", "x"); 64]).await;
    let (mut finished, mut messages, mut largest) = (0, 0, 0);
    while finished < ids.len() {
        match conn.next().await.expect("stream open") {
            Outbound::Events(batch) => {
                messages += 1;
                largest = largest.max(batch.events.len());
                finished += batch
                    .events
                    .iter()
                    .filter(|e| matches!(e.body, Some(EventBody::Finished(_))))
                    .count();
            }
            Outbound::Credits(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(largest > 1, "some batch carried several events");
    assert!(
        messages < 2 * ids.len(),
        "{messages} messages for {} events",
        2 * ids.len()
    );
    node.kill().await;
}

#[tokio::test]
async fn coordinator_cancel_stops_exactly_one_attempt() {
    let (_conns, node, mut conn) = registered(2).await;
    let ids = conn
        .assign(vec![
            TaskSpec::call("sleep", "1h"),
            TaskSpec::call("sleep", "300ms"),
        ])
        .await;
    conn.send(Inbound::Cancel(pb::Cancel {
        task_id: ids[0].to_string(),
        attempt: 1,
        reason: "client asked".into(),
    }))
    .await;
    let (_, done) = conn.until_finished(ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Cancelled);
    assert!(done.error.contains("client asked"), "{}", done.error);
    let (_, done) = conn.until_finished(ids[1]).await;
    assert_eq!(
        outcome(&done),
        Outcome::Succeeded,
        "the other attempt ran to its end"
    );
    node.kill().await;
}

#[tokio::test]
async fn kill_reports_nothing_and_leaves_no_process() {
    let (_conns, node, mut conn) = registered(1).await;
    conn.assign(vec![TaskSpec::exec([
        "sh",
        "-c",
        "sleep 100 & echo $!; wait",
    ])])
    .await;
    let grandchild: u32 = conn.first_output().await.trim().parse().unwrap();
    node.kill().await;
    while let Some(message) = conn.next().await {
        if let Outbound::Events(batch) = message {
            assert!(
                batch
                    .events
                    .iter()
                    .all(|e| !matches!(e.body, Some(EventBody::Finished(_)))),
                "a killed node reports nothing"
            );
        }
    }
    assert_gone_soon(grandchild).await;
}
