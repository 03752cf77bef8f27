//! Refusals a node must take as final: revoked (`PERMISSION_DENIED`) or
//! not joined (`UNAUTHENTICATED`). The node stops its tasks (process
//! groups killed), does not reconnect, and `wait` answers the error that
//! says what to do (`weft-node` exits 1 with it).

mod common;
mod fake;

use std::time::Instant;

use tonic::Status;

use weft_node::Error;
use weft_proto::TaskSpec;
use weft_proto::pb::node_message::Body as Outbound;

use fake::*;

fn sleeper() -> TaskSpec {
    TaskSpec::exec(["sh", "-c", "sleep 100 & echo $!; wait"])
}

#[tokio::test]
async fn a_revoked_node_stops_its_tasks_and_exits_with_an_error_within_seconds() {
    let (url, mut conns) = fake_coordinator().await;
    let mut node = start(&url, 1);
    let mut conn = next_conn(&mut conns).await;
    let (_, node_id) = conn.accept(SECOND, 5 * SECOND).await;
    conn.credits().await;
    conn.assign(vec![sleeper()]).await;
    let grandchild: u32 = conn.first_output().await.trim().parse().unwrap();

    // Revoked: the coordinator closes the stream, then refuses the node.
    let revoked = Instant::now();
    drop(conn);
    let mut again = next_conn(&mut conns).await;
    let Some(Outbound::Register(register)) = again.next().await else {
        panic!("Register first");
    };
    assert_eq!(register.previous_node_id, node_id.to_string());
    again
        .refuse(Status::permission_denied("node test-node was revoked"))
        .await;
    let err = tokio::time::timeout(WAIT, node.wait())
        .await
        .expect("the node stops")
        .unwrap_err();
    assert!(matches!(err, Error::Revoked(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("this node was revoked by an admin"),
        "{err}"
    );
    assert_gone_soon(grandchild).await;
    assert!(
        revoked.elapsed() < 3 * SECOND,
        "took {:?}",
        revoked.elapsed()
    );
    assert!(conns.try_recv().is_err(), "no reconnect after the refusal");
}

#[tokio::test]
async fn a_stream_ended_as_permission_denied_stops_the_node_without_reconnecting() {
    let (url, mut conns) = fake_coordinator().await;
    let mut node = start(&url, 1);
    let mut conn = next_conn(&mut conns).await;
    conn.accept(SECOND, 5 * SECOND).await;
    conn.credits().await;
    conn.assign(vec![sleeper()]).await;
    let grandchild: u32 = conn.first_output().await.trim().parse().unwrap();
    conn.refuse(Status::permission_denied("revoked")).await;
    let err = tokio::time::timeout(WAIT, node.wait())
        .await
        .expect("the node stops")
        .unwrap_err();
    assert!(matches!(err, Error::Revoked(_)), "{err:?}");
    assert_gone_soon(grandchild).await;
    assert!(conns.try_recv().is_err(), "no reconnect after the refusal");
}

#[tokio::test]
async fn a_node_refused_for_want_of_a_certificate_exits_saying_how_to_join() {
    let (url, mut conns) = fake_coordinator().await;
    let mut node = start(&url, 1);
    let mut conn = next_conn(&mut conns).await;
    let Some(Outbound::Register(_)) = conn.next().await else {
        panic!("Register first");
    };
    conn.refuse(Status::unauthenticated(
        "this coordinator needs a node certificate",
    ))
    .await;
    let err = tokio::time::timeout(WAIT, node.wait())
        .await
        .expect("the node stops")
        .unwrap_err();
    assert!(err.is_fatal());
    let message = err.to_string();
    assert!(
        message.contains("needs a node certificate")
            && message.contains(
                "join with a join token: weft token create --role node, then weft-node --join TOKEN"
            ),
        "{message}"
    );
    assert!(conns.try_recv().is_err(), "no reconnect after the refusal");
}
