//! A drain whose future is dropped part-way (`weft local`'s second
//! Ctrl-C): the node handle goes with it, and dropping it kills what
//! still runs rather than leaving it to its grace period.

mod common;
mod fake;

use std::time::{Duration, Instant};

use weft_proto::TaskSpec;
use weft_proto::pb::node_message::Body as Outbound;

use fake::*;

/// How soon a dropped drain's kill must have ended the attempt's processes.
const KILLED_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test]
async fn dropping_a_drain_part_way_kills_running_attempts() {
    let (_conns, node, mut conn) = registered(1).await;
    conn.assign(vec![TaskSpec::exec([
        "sh",
        "-c",
        "sleep 100 & echo $!; wait",
    ])])
    .await;
    let grandchild: u32 = conn.first_output().await.trim().parse().unwrap();
    // A grace far longer than the test: only a kill stops the attempt.
    // Boxed, so that dropping it below drops the future itself.
    let mut drain = Box::pin(node.drain(Duration::from_secs(60)));
    let draining = async {
        loop {
            match conn.next().await {
                Some(Outbound::Draining(_)) => return,
                Some(_) => {}
                None => panic!("the stream closed before Draining"),
            }
        }
    };
    tokio::select! {
        result = &mut drain => panic!("the drain ended early: {result:?}"),
        () = draining => {}
    }
    // Dropped part-way, as a second signal's select drops it: the kill is
    // at once (well before anything else would stop the attempt).
    drop(drain);
    let deadline = Instant::now() + KILLED_WITHIN;
    while !common::process_is_gone(grandchild) {
        assert!(Instant::now() < deadline, "process {grandchild} still runs");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
