//! Joining against a fake coordinator over TLS (`fake/tls.rs`): the node
//! trades its join token for a certificate, keeps it in its state dir,
//! presents it on every connection, comes back from the state dir without
//! a token, keeps its name, waits for a coordinator that starts later,
//! stops on a refused token, and renews its certificate over the live
//! session (saved, and presented on the next connection) while its task
//! runs on.

mod common;
mod fake;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use weft_node::{HandlerRegistry, NodeConfig, RunningNode};
use weft_proto::pb::coordinator_message::Body as Inbound;
use weft_proto::pb::node_message::Body as Outbound;
use weft_proto::pb::node_task_event::Body as EventBody;
use weft_proto::{JoinToken, Outcome, TaskSpec, pb};

use fake::tls::{Ca, TlsServer, common_name, first_der};
use fake::*;

const HOUR: Duration = Duration::from_secs(3600);

fn any_port() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A node that takes its coordinator from its state dir or its token.
fn joining(state: &Path, token: Option<JoinToken>) -> NodeConfig {
    let mut config = fake::config("", 1);
    config.state_dir = Some(state.to_owned());
    config.join_token = token;
    config
}

fn start_node(config: NodeConfig) -> RunningNode {
    weft_node::start(config, HandlerRegistry::with_builtins())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_node_joins_with_a_token_and_restarts_from_its_state_dir_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut server = TlsServer::start(any_port(), Arc::new(Ca::new()), HOUR).await;
    let token = server.token();
    let node = start_node(joining(&state, Some(token.clone())));
    let mut conn = next_conn(&mut server.conns).await;
    let calls = server.joins.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].token.as_str(), calls[0].name.as_str()),
        (token.credential.as_str(), "test-node")
    );
    let node_id = calls[0].node_id;
    let presented = conn
        .peer
        .clone()
        .expect("the node presents its certificate");
    assert_eq!(common_name(&presented), node_id.to_string());
    let (register, _) = conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(register.previous_node_id, node_id.to_string());
    assert_eq!(register.name, "test-node");

    assert_eq!(mode(&state), 0o700);
    for file in ["node.key", "node.pem", "ca.pem", "node.conf"] {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }
    let conf = std::fs::read_to_string(state.join("node.conf")).unwrap();
    assert_eq!(
        conf,
        format!(
            "node_id={node_id}\nname=test-node\ncoordinator=https://{}\n",
            server.addr
        )
    );
    assert_eq!(
        std::fs::read_to_string(state.join("ca.pem")).unwrap(),
        server.ca.pem
    );
    node.kill().await;

    // Restarted without a token: the same identity, no second join.
    let node = start_node(joining(&state, None));
    let mut conn = next_conn(&mut server.conns).await;
    assert_eq!(conn.peer.as_deref(), Some(presented.as_slice()));
    let (register, _) = conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(register.previous_node_id, node_id.to_string());
    assert_eq!(server.joins.calls.lock().unwrap().len(), 1);
    node.kill().await;

    // A token given again is not needed: ignored, no join.
    let node = start_node(joining(&state, Some(token)));
    let mut conn = next_conn(&mut server.conns).await;
    conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(server.joins.calls.lock().unwrap().len(), 1);
    node.kill().await;

    // Another name is refused at start, saying how to take it.
    let mut renamed = joining(&state, None);
    renamed.name = "other".into();
    let mut node = start_node(renamed);
    let err = tokio::time::timeout(WAIT, node.wait())
        .await
        .expect("stops at once")
        .unwrap_err();
    assert!(
        err.to_string().contains("joined as 'test-node'")
            && err.to_string().contains("new --state-dir"),
        "{err}"
    );
}

#[tokio::test]
async fn a_refused_join_token_stops_the_node_saying_how_to_get_a_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let server = TlsServer::start(any_port(), Arc::new(Ca::new()), HOUR).await;
    *server.joins.refusal.lock().unwrap() =
        Some(Status::unauthenticated("unknown or used-up join token"));
    let mut node = start_node(joining(&state, Some(server.token())));
    let err = tokio::time::timeout(WAIT, node.wait())
        .await
        .expect("stops at once")
        .unwrap_err();
    assert!(err.is_fatal());
    let message = err.to_string();
    assert!(
        message.contains("used-up join token")
            && message.contains("ask an admin for a new one (weft token create --role node)"),
        "{message}"
    );
    assert!(!state.join("node.conf").exists(), "no identity kept");
}

#[tokio::test]
async fn a_node_joins_a_coordinator_that_starts_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let ca = Arc::new(Ca::new());
    let token = JoinToken {
        address: addr.to_string(),
        ca_pin: ca.pin(),
        credential: format!("0123456789abcdef_{}", "s".repeat(43)),
    };
    let node = start_node(joining(&state, Some(token)));
    // Nothing listens yet: the node keeps trying (backoff up to 200 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut server = TlsServer::start(addr, ca, HOUR).await;
    let mut conn = next_conn(&mut server.conns).await;
    conn.accept(SECOND, 5 * SECOND).await;
    assert_eq!(server.joins.calls.lock().unwrap().len(), 1);
    assert!(state.join("node.conf").exists());
    node.kill().await;
}

#[tokio::test]
async fn a_renewed_certificate_is_saved_and_presented_next_while_the_task_runs_on() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    // 3 s certificates, backdated 3 s: renewal is due a second after join.
    let mut server = TlsServer::start(any_port(), Arc::new(Ca::new()), 3 * SECOND).await;
    let node = start_node(joining(&state, Some(server.token())));
    let mut conn = next_conn(&mut server.conns).await;
    conn.accept(SECOND, 5 * SECOND).await;
    conn.credits().await;
    let node_id = server.joins.calls.lock().unwrap()[0].node_id;
    let first_chain = std::fs::read_to_string(state.join("node.pem")).unwrap();
    let ids = conn.assign(vec![TaskSpec::call("sleep", "3s")]).await;
    let mut finished = None;
    let csr = loop {
        match conn.next().await.expect("stream open") {
            Outbound::RenewCertificate(renew) => break renew.csr_der,
            Outbound::Events(batch) => {
                for event in batch.events {
                    if let Some(EventBody::Finished(done)) = event.body {
                        finished = Some(done);
                    }
                }
            }
            _ => {}
        }
    };
    let chain = server.ca.sign_csr(&csr, node_id, HOUR);
    conn.send(Inbound::Certificate(pb::NodeCertificate {
        certificate_chain_pem: chain.clone(),
        not_after: None,
        error: String::new(),
    }))
    .await;
    let saved = || std::fs::read_to_string(state.join("node.pem")).unwrap_or_default();
    wait_until("the new certificate is saved", || saved() == chain).await;
    assert_ne!(chain, first_chain);
    assert_eq!(mode(&state.join("node.key")), 0o600);
    let done = match finished {
        Some(done) => done,
        None => conn.until_finished(ids[0]).await.1,
    };
    assert_eq!(outcome(&done), Outcome::Succeeded, "the task ran on");

    // The next connection presents the new certificate.
    drop(conn);
    let conn = next_conn(&mut server.conns).await;
    assert_eq!(conn.peer, Some(first_der(&chain)));
    node.kill().await;
}
