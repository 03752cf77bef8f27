//! Draining a node against a fake coordinator (`fake/`): running attempts
//! finish within the grace, the rest are cancelled and reported, then the
//! stream closes; from the coordinator's `Drain` or from the handle.

mod common;
mod fake;

use std::time::Duration;

use weft_proto::convert::duration_to_pb;
use weft_proto::pb::coordinator_message::Body as Inbound;
use weft_proto::pb::node_message::Body as Outbound;
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_proto::{Outcome, TaskSpec, pb};

use fake::*;

#[tokio::test]
async fn coordinator_drain_finishes_work_cancels_past_grace_and_closes() {
    let (_conns, mut node, mut conn) = registered(2).await;
    let ids = conn
        .assign(vec![
            TaskSpec::exec(["sh", "-c", "sleep 100 & echo $!; wait"]),
            TaskSpec::call("sleep", "50ms"),
        ])
        .await;
    let grandchild: u32 = conn.first_output().await.trim().parse().unwrap();
    conn.send(Inbound::Drain(pb::Drain {
        grace: Some(duration_to_pb(Duration::from_millis(400))),
    }))
    .await;
    let mut order = Vec::new();
    while let Some(message) = conn.next().await {
        match message {
            Outbound::Draining(_) => order.push("draining".to_owned()),
            Outbound::Credits(c) => panic!("granted {} credits while draining", c.grant),
            Outbound::Events(batch) => {
                for event in batch.events {
                    if let Some(EventBody::Finished(done)) = event.body {
                        let which = if event.task_id == ids[0].to_string() {
                            "exec"
                        } else {
                            "sleep"
                        };
                        order.push(format!("{which}:{}", outcome(&done).as_str()));
                    }
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(order, ["draining", "sleep:succeeded", "exec:cancelled"]);
    tokio::time::timeout(WAIT, node.wait())
        .await
        .expect("node stops after a drain")
        .expect("a drain is a clean stop");
    assert_gone_soon(grandchild).await;
}

#[tokio::test]
async fn drain_from_the_handle_lets_running_attempts_finish() {
    let (_conns, node, mut conn) = registered(1).await;
    let ids = conn.assign(vec![TaskSpec::call("sleep", "200ms")]).await;
    assert!(
        matches!(conn.next().await, Some(Outbound::Events(_))),
        "Started"
    );
    let drain = tokio::spawn(node.drain(Duration::from_secs(5)));
    assert!(matches!(conn.next().await, Some(Outbound::Draining(_))));
    let (_, done) = conn.until_finished(ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Succeeded);
    assert!(conn.next().await.is_none(), "stream closed after the drain");
    tokio::time::timeout(WAIT, drain)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
