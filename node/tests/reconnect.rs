//! Reconnects against a fake coordinator (`fake/`): running attempts
//! survive and are listed in the next `Register`, a silent coordinator is
//! dropped, the node redials until one appears, and sent results are sent
//! again after a reconnect until the coordinator cancels them.

mod common;
mod fake;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

use weft_proto::pb::coordinator_message::Body as Inbound;
use weft_proto::pb::node_message::Body as Outbound;
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_proto::{Outcome, TaskSpec, pb};

use fake::*;

#[tokio::test]
async fn running_attempts_survive_a_reconnect_and_are_reported() {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, 3);
    let mut conn = next_conn(&mut conns).await;
    let (_, first_id) = conn.accept(SECOND, 5 * SECOND).await;
    conn.credits().await;
    let ids = conn
        .assign(vec![TaskSpec::call("sleep", "1s").slots(2)])
        .await;
    // Wait for Started, then the coordinator goes away.
    assert!(matches!(conn.next().await, Some(Outbound::Events(_))));
    drop(conn);
    let mut conn = next_conn(&mut conns).await;
    let (register, second_id) = conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(register.previous_node_id, first_id.to_string());
    assert_eq!(
        register.running,
        vec![pb::AttemptRef {
            task_id: ids[0].to_string(),
            attempt: 1
        }]
    );
    assert_eq!(
        conn.started_again().await,
        [(ids[0].to_string(), 0)],
        "its Started is sent again: the coordinator may have lost it"
    );
    assert_eq!(conn.credits().await, 1, "only the free slot is granted");
    assert_eq!(node.registered(WAIT).await, Some(second_id));
    let (_, done) = conn.until_finished(ids[0]).await;
    assert_eq!(
        outcome(&done),
        Outcome::Succeeded,
        "the attempt carried on and reports to the new session"
    );
    assert_eq!(conn.credits().await, 2);
    node.kill().await;
}

#[tokio::test]
async fn silent_coordinator_is_dropped_and_the_node_reconnects_with_heartbeats_meanwhile() {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, 1);
    let mut conn = next_conn(&mut conns).await;
    conn.accept(Duration::from_millis(50), Duration::from_millis(400))
        .await;
    conn.credits().await;
    let mut heartbeats = 0;
    while heartbeats < 3 {
        let message = tokio::time::timeout(WAIT, conn.inbound.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(Outbound::Heartbeat(_)) = message.body {
            heartbeats += 1;
        }
    }
    // The fake never sends anything: the node gives up on it and redials.
    let mut again = next_conn(&mut conns).await;
    let (register, _) = again.accept(SECOND, 5 * SECOND).await;
    assert!(!register.previous_node_id.is_empty());
    drop(conn);
    node.kill().await;
}

#[tokio::test]
async fn node_keeps_redialing_until_a_coordinator_appears() {
    // At first something that is no coordinator holds the port: it accepts
    // each dial and hangs up at once, counting them.
    let refuser = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = refuser.local_addr().unwrap();
    let (dialed, mut dials) = mpsc::unbounded_channel();
    let refuser = tokio::spawn(async move {
        loop {
            let (socket, _) = refuser.accept().await.unwrap();
            drop(socket);
            let _ = dialed.send(());
        }
    });
    let node = start(&format!("http://{addr}"), 1);
    for _ in 0..3 {
        tokio::time::timeout(WAIT, dials.recv())
            .await
            .expect("the node dials again")
            .unwrap();
    }
    assert_eq!(node.node_id(), None);
    refuser.abort();
    let _ = refuser.await; // the listener is closed once the task is gone
    let (server, mut conns) = FakeServer::start(addr).await;
    let mut conn = next_conn(&mut conns).await;
    let (_, node_id) = conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(node.registered(WAIT).await, Some(node_id));
    node.kill().await;
    drop(conn);
    server.stop().await;
}

#[tokio::test]
async fn sent_results_are_sent_again_after_a_reconnect_until_the_coordinator_cancels_them() {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, 2);
    let mut conn = next_conn(&mut conns).await;
    conn.accept(SECOND, 20 * SECOND).await;
    conn.credits().await;
    let ids = conn.assign(vec![TaskSpec::call("echo", "result")]).await;
    let (_, done) = conn.until_finished(ids[0]).await;
    assert_eq!(done.output.as_ref(), b"result");
    // The coordinator crashes before it recorded the result.
    drop(conn);
    let mut conn = next_conn(&mut conns).await;
    let (register, _) = conn.accept(SECOND, 20 * SECOND).await;
    let attempt = pb::AttemptRef {
        task_id: ids[0].to_string(),
        attempt: 1,
    };
    assert_eq!(
        register.running,
        vec![attempt.clone()],
        "listed so the coordinator keeps it"
    );
    // First the output the old stream took (the echo's one chunk): the
    // coordinator may have died before recording it too, and drops a
    // chunk it has by seq.
    match conn.next().await {
        Some(Outbound::Events(batch)) => {
            let chunks: Vec<(u64, Vec<u8>)> = batch
                .events
                .iter()
                .map(|event| match &event.body {
                    Some(EventBody::Output(chunk)) => (chunk.seq, chunk.data.to_vec()),
                    other => panic!("expected output, got {other:?}"),
                })
                .collect();
            assert_eq!(chunks, [(0, b"result".to_vec())]);
        }
        other => panic!("expected the output again right after Registered, got {other:?}"),
    }
    // The result again, before the credits: until it is in, the listed
    // attempt counts against the slots.
    match conn.next().await {
        Some(Outbound::Events(batch)) => {
            assert_eq!(batch.events.len(), 1);
            let event = &batch.events[0];
            assert_eq!((&event.task_id, event.attempt), (&attempt.task_id, 1));
            assert_eq!(event.body, Some(EventBody::Finished(done.clone())));
        }
        other => panic!("expected the Finished again right after Registered, got {other:?}"),
    }
    assert_eq!(conn.credits().await, 2);
    // A coordinator that no longer wants it (stale) says Cancel: dropped.
    // The node reads in order, so once the probe assigned after the Cancel
    // has finished, the Cancel was handled.
    conn.send(Inbound::Cancel(pb::Cancel {
        task_id: ids[0].to_string(),
        attempt: 1,
        reason: "stale".into(),
    }))
    .await;
    let probe = conn.assign(vec![TaskSpec::call("noop", "")]).await;
    conn.until_finished(probe[0]).await;
    drop(conn);
    let mut conn = next_conn(&mut conns).await;
    let (register, _) = conn.accept(SECOND, 20 * SECOND).await;
    let probe_ref = pb::AttemptRef {
        task_id: probe[0].to_string(),
        attempt: 1,
    };
    assert_eq!(
        register.running,
        vec![probe_ref],
        "the cancelled one is gone"
    );
    node.kill().await;
}

/// Reads the node's `Register` on `conn` and answers it with `status`.
async fn refuse(conn: &mut Conn, status: tonic::Status) {
    let register = conn.next().await;
    assert!(
        matches!(register, Some(Outbound::Register(_))),
        "{register:?}"
    );
    conn.out.send(Err(status)).await.unwrap();
}

#[tokio::test]
async fn a_register_refused_as_invalid_stops_the_node_instead_of_retrying() {
    let (url, mut conns) = fake_coordinator().await;
    let mut node = start(&url, 3);
    let mut conn = next_conn(&mut conns).await;
    let why = "node declares 3 slots; this coordinator accepts at most 2 (--max-node-slots)";
    refuse(&mut conn, tonic::Status::invalid_argument(why)).await;
    let stopped = tokio::time::timeout(WAIT, node.wait())
        .await
        .expect("the node stops by itself");
    let err = stopped.expect_err("a refused node stops with the refusal");
    assert!(err.is_fatal());
    assert_eq!(
        err.to_string(),
        format!("coordinator refused to register this node: {why}")
    );
    assert!(
        conns.try_recv().is_err(),
        "the node dialed again after a refusal that cannot pass"
    );
}

#[tokio::test]
async fn a_register_refused_as_unavailable_is_retried() {
    let (url, mut conns) = fake_coordinator().await;
    let node = start(&url, 1);
    let mut conn = next_conn(&mut conns).await;
    refuse(&mut conn, tonic::Status::unavailable("shutting down")).await;
    let mut again = next_conn(&mut conns).await;
    again.accept(SECOND, 5 * SECOND).await;
    assert!(node.registered(WAIT).await.is_some());
    node.kill().await;
}

#[tokio::test]
async fn a_node_with_several_coordinators_moves_to_the_next_at_once_with_its_attempt() {
    let (first, mut first_conns) = FakeServer::start("127.0.0.1:0".parse().unwrap()).await;
    let (second, mut second_conns) = FakeServer::start("127.0.0.1:0".parse().unwrap()).await;
    let mut config = config(&first.url(), 2);
    config.coordinators = vec![first.url(), second.url()];
    // Far longer than the test may take: any wait would be a backoff.
    config.reconnect_min = Duration::from_secs(30);
    config.reconnect_max = Duration::from_secs(30);
    let node = weft_node::start(config, weft_node::HandlerRegistry::with_builtins());
    let mut conn = next_conn(&mut first_conns).await;
    conn.accept(SECOND, 5 * SECOND).await;
    conn.credits().await;
    let ids = conn.assign(vec![TaskSpec::call("sleep", "1s")]).await;
    assert!(matches!(conn.next().await, Some(Outbound::Events(_))));
    // The first coordinator's stream ends: the second is dialed at once.
    drop(conn);
    let mut conn = next_conn(&mut second_conns).await;
    let (register, _) = conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(
        register.running,
        vec![pb::AttemptRef {
            task_id: ids[0].to_string(),
            attempt: 1
        }],
        "the running attempt is listed to the coordinator that took over"
    );
    assert_eq!(
        conn.started_again().await,
        [(ids[0].to_string(), 0)],
        "and its Started is sent to it"
    );
    conn.credits().await;
    let (_, done) = conn.until_finished(ids[0]).await;
    assert_eq!(outcome(&done), Outcome::Succeeded);
    node.kill().await;
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_node_given_a_refusing_address_first_registers_with_the_next() {
    let refusing = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", refusing.local_addr().unwrap());
    drop(refusing);
    let (live, mut conns) = fake_coordinator().await;
    let mut config = config(&dead, 1);
    config.coordinators = vec![dead, live];
    config.reconnect_min = Duration::from_secs(30);
    config.reconnect_max = Duration::from_secs(30);
    let node = weft_node::start(config, weft_node::HandlerRegistry::with_builtins());
    let mut conn = next_conn(&mut conns).await;
    let (_, node_id) = conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(node.registered(WAIT).await, Some(node_id));
    node.kill().await;
}
