//! Node identity on a coordinator that requires node certificates: join
//! tokens and their refusals, certificates as the only identity, events
//! only from the node an attempt is leased to, revocation, renewal over
//! the session. Played by fake nodes that join as `weft-node` does (real
//! TLS, real sockets), in both harness modes.

use std::time::{Duration, Instant};

use tonic::Code;
use x509_parser::prelude::{FromDer, X509Certificate};

use weft_client::{TaskSpec, TaskState};
use weft_proto::pb::node_message::Body as ToCoordinator;
use weft_proto::tls::ClientIdentity;
use weft_proto::{JoinToken, NodeId, Outcome, pb};
use weft_tests::fake_node::{
    Joined, join, join_with, key_and_csr, open_raw, open_raw_as, register,
};
use weft_tests::{FakeNode, RawAdmin, TestCluster, default_timeout};

async fn secure_cluster() -> TestCluster {
    TestCluster::builder().nodes(0).start().await
}

async fn admin(cluster: &TestCluster) -> RawAdmin {
    cluster.raw_admin(Some(&cluster.admin_token())).await
}

/// A join token for `uses` joins (0: any) valid for `ttl`.
async fn join_token(
    admin: &mut RawAdmin,
    uses: u32,
    ttl: Option<Duration>,
) -> (String, pb::TokenInfo) {
    let answer = admin
        .create_token(pb::CreateTokenRequest {
            name: "test-join".into(),
            role: "node".into(),
            uses,
            ttl: ttl.map(weft_proto::convert::duration_to_pb),
            ..pb::CreateTokenRequest::default()
        })
        .await
        .expect("create a join token")
        .into_inner();
    (answer.token, answer.info.expect("token info"))
}

async fn info(admin: &mut RawAdmin) -> pb::ClusterInfoResponse {
    admin
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .expect("cluster info")
        .into_inner()
}

/// Joins as `name` and connects with the certificate, serving `echo`.
async fn joined_node(cluster: &TestCluster, token: &str, name: &str) -> (FakeNode, Joined) {
    let joined = join(token, name).await.expect("join");
    let node = FakeNode::connect_as(
        &cluster.url(),
        joined.identity(),
        register(name, 1, &["echo"]),
    )
    .await
    .expect("a joined node connects");
    (node, joined)
}

fn leaf_of(chain_pem: &str) -> Vec<u8> {
    let body: String = chain_pem
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|b| b.split("-----END CERTIFICATE-----").next())
        .expect("a PEM certificate")
        .split_whitespace()
        .collect();
    base64_decode(&body)
}

fn base64_decode(text: &str) -> Vec<u8> {
    // Tiny standard-alphabet decoder (the tests crate has no base64 dep).
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text.bytes().filter(|b| *b != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= u32::from(value(*c)) << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    out
}

fn common_name(cert_der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(cert_der).expect("a certificate");
    let cn = cert.subject().iter_common_name().next().expect("a CN");
    cn.as_str().expect("a text CN").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_refuses_used_up_expired_revoked_and_client_tokens_and_bad_names() {
    let cluster = secure_cluster().await;
    let mut admin = admin(&cluster).await;

    // One use: the first join works, the second is refused.
    let (once, info) = join_token(&mut admin, 1, None).await;
    assert_eq!((info.role.as_str(), info.uses, info.used), ("node", 1, 0));
    let first = join(&once, "first").await.expect("the first join");
    assert!(first.node_id.parse::<NodeId>().is_ok());
    assert_eq!(common_name(&leaf_of(&first.chain_pem)), first.node_id);
    let used_up = join(&once, "second").await.unwrap_err();
    assert_eq!(used_up.code(), Code::Unauthenticated, "{used_up:?}");
    assert!(
        used_up.message().contains("used up"),
        "{}",
        used_up.message()
    );
    assert!(used_up.message().contains("weft token create --role node"));
    let tokens = admin
        .list_tokens(pb::ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    let listed = tokens.iter().find(|t| t.id == info.id).expect("listed");
    assert_eq!((listed.uses, listed.used), (1, 1));

    // Expired.
    let (short, _) = join_token(&mut admin, 0, Some(Duration::from_secs(1))).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await; // the token's lifetime itself
    let expired = join(&short, "late").await.unwrap_err();
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert!(
        expired.message().contains("expired"),
        "{}",
        expired.message()
    );

    // Revoked.
    let (revoked, revoked_info) = join_token(&mut admin, 0, None).await;
    admin
        .revoke_token(pb::RevokeTokenRequest {
            id: revoked_info.id.clone(),
        })
        .await
        .expect("revoke the token");
    let err = join(&revoked, "revoked").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{}", err.message());

    // A client token (even the admin's) is not a join token.
    let (good, _) = join_token(&mut admin, 0, None).await;
    let parsed = JoinToken::parse(&good).unwrap();
    let client_credential = cluster
        .admin_token()
        .trim()
        .strip_prefix("weft_")
        .expect("a client token")
        .to_owned();
    let forged = JoinToken {
        credential: client_credential,
        ..parsed
    };
    let err = join(&forged.encode(), "client").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // A bad name, a bad request.
    let err = join(&good, "no spaces").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("name"), "{}", err.message());
    // Another node's id as a name: selectors would find that node.
    let err = join(&good, &first.node_id).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("is a node id"), "{}", err.message());
    let (key, _) = key_and_csr();
    let err = join_with(&good, "ok-name", key, b"not a csr".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("csr_der"), "{}", err.message());

    // A join token is never a bearer token.
    let bearer = format!("weft_{}", JoinToken::parse(&good).unwrap().credential);
    let mut as_client = cluster.raw_admin(Some(&bearer)).await;
    let err = as_client
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_join_name_is_refused_until_its_holder_is_revoked() {
    let cluster = secure_cluster().await;
    let mut admin = admin(&cluster).await;
    let (token, _) = join_token(&mut admin, 0, None).await;
    let holder = join(&token, "gpu-1").await.expect("join");
    let err = join(&token, "gpu-1").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains(&holder.node_id), "{}", err.message());
    assert!(
        err.message().contains("weft nodes revoke gpu-1"),
        "{}",
        err.message()
    );
    let revoked = admin
        .revoke_node(pb::RevokeNodeRequest {
            node: "gpu-1".into(),
        })
        .await
        .expect("revoke by name")
        .into_inner();
    assert_eq!(revoked.node_id, holder.node_id);
    assert!(!revoked.was_connected);
    let again = join(&token, "gpu-1").await.expect("the name is free again");
    assert_ne!(again.node_id, holder.node_id);
    let err = admin
        .revoke_node(pb::RevokeNodeRequest {
            node: "no-such-node".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_asked_again_with_the_same_key_gets_the_same_node_id_and_no_second_use() {
    let cluster = TestCluster::builder().nodes(0).durable().start().await;
    let mut admin = admin(&cluster).await;
    // One use: the answer to the first join was lost (the node timed
    // out, the connection dropped, it crashed before saving it).
    let (once, _) = join_token(&mut admin, 1, None).await;
    let (key_pem, csr_der) = key_and_csr();
    let first = join_with(&once, "retry-1", key_pem.clone(), csr_der.clone())
        .await
        .expect("the first join");
    let again = join_with(&once, "retry-1", key_pem.clone(), csr_der.clone())
        .await
        .expect("the same join asked again");
    assert_eq!(again.node_id, first.node_id);
    assert_eq!(common_name(&leaf_of(&again.chain_pem)), first.node_id);
    let tokens = admin
        .list_tokens(pb::ListTokensRequest {})
        .await
        .expect("list tokens")
        .into_inner()
        .tokens;
    let used: Vec<_> = tokens
        .iter()
        .filter(|t| t.role == "node")
        .map(|t| (t.uses, t.used))
        .collect();
    assert_eq!(used, [(1, 1)], "one use counted");
    // Its certificate works.
    let node = FakeNode::connect_as(
        &cluster.url(),
        again.identity(),
        register("retry-1", 1, &[]),
    )
    .await
    .expect("the repeated join's certificate connects");
    assert_eq!(node.node_id, first.node_id);
    // Once its node connected, the join is not repeated any more: the
    // used-up token is refused.
    let err = join_with(&once, "retry-1", key_pem.clone(), csr_der.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // Another key may not take the name with the same token, nor ask a
    // new name with a used-up token.
    let err = join(&once, "retry-1").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let (many, _) = join_token(&mut admin, 0, None).await;
    let err = join(&many, "retry-1").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // The same key with another token: not a repeat.
    let err = join_with(&many, "retry-1", key_pem.clone(), csr_der.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // Still a repeat after a coordinator restart; not once revoked.
    drop(node);
    cluster.restart_coordinator().await;
    let after = join_with(&once, "retry-1", key_pem.clone(), csr_der.clone())
        .await
        .expect("asked again after a restart");
    assert_eq!(after.node_id, first.node_id);
    let mut admin = self::admin(&cluster).await;
    admin
        .revoke_node(pb::RevokeNodeRequest {
            node: "retry-1".into(),
        })
        .await
        .expect("revoke");
    let err = join_with(&once, "retry-1", key_pem, csr_der)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_certificate_or_with_another_cas_is_refused() {
    let cluster = secure_cluster().await;
    let err = open_raw(
        &cluster.url(),
        ToCoordinator::Register(register("anon", 1, &[])),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("weft token create --role node")
            && err.message().contains("weft-node --join TOKEN"),
        "{}",
        err.message()
    );

    // A certificate naming a node id, for client auth, from another CA.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca_cert = ca_params.self_signed(&other_key).unwrap();
    let other_ca = rcgen::Issuer::new(ca_params, other_key);
    let node_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, NodeId::new().to_string());
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&node_key, &other_ca).unwrap();
    let chain = format!("{}{}", cert.pem(), other_ca_cert.pem());
    let identity = ClientIdentity::from_pem(&chain, &node_key.serialize_pem()).unwrap();
    let err = open_raw_as(
        &cluster.url(),
        identity,
        ToCoordinator::Register(register("forger", 1, &[])),
    )
    .await
    .unwrap_err();
    // Refused by the TLS handshake, before any rpc logic.
    assert_ne!(err.code(), Code::Ok);
    assert_ne!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut admin = admin(&cluster).await;
    assert_eq!(info(&mut admin).await.nodes, 0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_may_not_claim_another_nodes_id_or_name_and_the_real_nodes_work_is_untouched() {
    let cluster = secure_cluster().await;
    let mut admin = admin(&cluster).await;
    let client = cluster.client().await;
    let (token, _) = join_token(&mut admin, 0, None).await;
    let (mut real, real_joined) = joined_node(&cluster, &token, "real").await;
    assert_eq!(real.node_id, real_joined.node_id, "the certificate's id");
    let beats = real.keep_alive(Duration::from_millis(100));
    real.grant(1).await;
    let id = client.submit(TaskSpec::call("echo", "in")).await.unwrap();
    let assignment = real.next_assignment(default_timeout()).await;
    assert_eq!(
        (assignment.task_id.clone(), assignment.attempt),
        (id.to_string(), 1)
    );
    real.started(id, 1).await;
    cluster.wait_for_state(id, TaskState::Running).await;

    // Another joined node presents the real node's id: refused.
    let thief = join(&token, "thief").await.expect("join");
    let mut stolen = register("thief", 1, &["echo"]);
    stolen.previous_node_id = real_joined.node_id.clone();
    stolen.running = vec![pb::AttemptRef {
        task_id: id.to_string(),
        attempt: 1,
    }];
    let err = FakeNode::connect_as(&cluster.url(), thief.identity(), stolen)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Its own certificate with another name: refused too.
    let err = FakeNode::connect_as(&cluster.url(), thief.identity(), register("real", 1, &[]))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // The real node still holds the attempt and its result counts.
    real.finished(id, 1, Outcome::Succeeded, None, b"real")
        .await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.attempt, weft_client::Attempt(1));
    assert_eq!(done.node_name.as_deref(), Some("real"));
    assert_eq!(&done.output[..], b"real");
    beats.abort();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_for_an_attempt_leased_to_another_node_is_refused_and_counted() {
    let cluster = secure_cluster().await;
    let mut admin = admin(&cluster).await;
    let client = cluster.client().await;
    let (token, _) = join_token(&mut admin, 0, None).await;
    let (mut real, _) = joined_node(&cluster, &token, "real").await;
    let (mut forger, _) = joined_node(&cluster, &token, "forger").await;
    let beats = [
        real.keep_alive(Duration::from_millis(100)),
        forger.keep_alive(Duration::from_millis(100)),
    ];
    real.grant(1).await;
    let id = client.submit(TaskSpec::call("echo", "in")).await.unwrap();
    real.next_assignment(default_timeout()).await;
    real.started(id, 1).await;
    cluster.wait_for_state(id, TaskState::Running).await;

    forger
        .finished(id, 1, Outcome::Succeeded, None, b"forged")
        .await;
    let cancel = forger
        .next_cancel(default_timeout())
        .await
        .expect("the forger is told to stop");
    assert_eq!(
        (cancel.task_id.clone(), cancel.attempt),
        (id.to_string(), 1)
    );
    let counters = info(&mut admin).await;
    assert_eq!(counters.foreign_events_refused, 1, "{counters:?}");
    assert_eq!(
        client.get(id).await.unwrap().state,
        TaskState::Running,
        "the forged result was not recorded"
    );

    real.finished(id, 1, Outcome::Succeeded, None, b"real")
        .await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(&done.output[..], b"real");
    assert_eq!(done.node_name.as_deref(), Some("real"));
    for beat in beats {
        beat.abort();
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_cut_off_at_once_its_attempt_finishes_elsewhere_and_it_may_not_return() {
    let cluster = secure_cluster().await;
    let mut admin = admin(&cluster).await;
    let client = cluster.client().await;
    let (token, _) = join_token(&mut admin, 0, None).await;
    let (mut victim, victim_joined) = joined_node(&cluster, &token, "victim").await;
    let victim_beats = victim.keep_alive(Duration::from_millis(100));
    victim.grant(1).await;
    let id = client
        .submit(TaskSpec::call("echo", "in").max_attempts(3))
        .await
        .unwrap();
    victim.next_assignment(default_timeout()).await;
    victim.started(id, 1).await;
    cluster.wait_for_state(id, TaskState::Running).await;
    let (mut rescuer, _) = joined_node(&cluster, &token, "rescuer").await;
    let rescuer_beats = rescuer.keep_alive(Duration::from_millis(100));

    let asked = Instant::now();
    let revoked = admin
        .revoke_node(pb::RevokeNodeRequest {
            node: victim_joined.node_id.clone(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(
        (
            revoked.name.as_str(),
            revoked.was_connected,
            revoked.requeued
        ),
        ("victim", true, 1)
    );
    // Its stream ends at once, saying why, so it stops without
    // reconnecting to hear it.
    let ended = victim
        .wait_end(Duration::from_secs(1))
        .await
        .expect("the revoked node's stream is still open");
    let status = ended.expect("the stream ends with a status, not cleanly");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    victim_beats.abort();

    // Its attempt runs again on the other node.
    rescuer.grant(1).await;
    let retry = rescuer.next_assignment(default_timeout()).await;
    assert_eq!((retry.task_id.clone(), retry.attempt), (id.to_string(), 2));
    rescuer.started(id, 2).await;
    rescuer
        .finished(id, 2, Outcome::Succeeded, None, b"rescued")
        .await;
    let done = cluster.wait_for_final(id).await;
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.attempt, weft_client::Attempt(2));
    assert_eq!(&done.output[..], b"rescued");

    // Its certificate is refused from now on, and that is counted.
    let before = info(&mut admin).await.revoked_node_refusals;
    let err = FakeNode::connect_as(
        &cluster.url(),
        victim_joined.identity(),
        register("victim", 1, &["echo"]),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(info(&mut admin).await.revoked_node_refusals, before + 1);
    rescuer_beats.abort();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_renews_its_certificate_over_its_session() {
    let cluster = TestCluster::builder()
        .nodes(0)
        .node_cert_lifetime(Duration::from_secs(3600))
        .start()
        .await;
    let mut admin = admin(&cluster).await;
    let (token, _) = join_token(&mut admin, 0, None).await;
    let (mut node, joined) = joined_node(&cluster, &token, "renewer").await;
    let beats = node.keep_alive(Duration::from_millis(100));

    let (key_pem, csr) = key_and_csr();
    let renewed = node
        .renew(csr, default_timeout())
        .await
        .expect("an answer to RenewCertificate");
    assert!(renewed.error.is_empty(), "{}", renewed.error);
    let leaf = leaf_of(&renewed.certificate_chain_pem);
    assert_eq!(common_name(&leaf), joined.node_id, "the same node");
    assert_ne!(leaf, leaf_of(&joined.chain_pem), "a new certificate");
    let not_after = weft_proto::convert::system_time(&renewed.not_after.expect("not_after"));
    assert!(not_after > joined.not_after.expect("joined not_after"));

    // The new certificate is the node's next identity.
    let renewed_identity =
        ClientIdentity::from_pem(&renewed.certificate_chain_pem, &key_pem).unwrap();
    beats.abort();
    drop(node);
    let again = FakeNode::connect_as(
        &cluster.url(),
        renewed_identity,
        register("renewer", 1, &[]),
    )
    .await
    .expect("connects with the renewed certificate");
    assert_eq!(again.node_id, joined.node_id);

    // A bad request gets an error, not a certificate.
    let mut again = again;
    let answer = again
        .renew(b"garbage".to_vec(), default_timeout())
        .await
        .expect("an answer");
    assert!(answer.certificate_chain_pem.is_empty());
    assert!(answer.error.contains("csr_der"), "{}", answer.error);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reconnecting_with_its_certificate_replaces_its_old_session() {
    let cluster = secure_cluster().await;
    let mut admin = admin(&cluster).await;
    let (token, _) = join_token(&mut admin, 0, None).await;
    let (mut first, joined) = joined_node(&cluster, &token, "twice").await;
    let second = FakeNode::connect_as(&cluster.url(), joined.identity(), register("twice", 1, &[]))
        .await
        .expect("reconnects");
    assert_eq!(second.node_id, joined.node_id);
    assert!(
        first.wait_closed(default_timeout()).await,
        "the old session is closed"
    );
    let nodes = cluster.wait_for_nodes(1).await;
    assert_eq!(nodes[0].name, "twice");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_node_authentication_there_are_no_join_tokens_and_names_stay_unique() {
    let cluster = TestCluster::builder().nodes(0).insecure().start().await;
    let mut admin = admin(&cluster).await;
    let err = admin
        .create_token(pb::CreateTokenRequest {
            role: "node".into(),
            ..pb::CreateTokenRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("--insecure"), "{}", err.message());

    let first = FakeNode::connect(&cluster.url(), register("same", 1, &[])).await;
    let err = open_raw(
        &cluster.url(),
        ToCoordinator::Register(register("same", 1, &[])),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // Revoking an unauthenticated node bars its id too.
    let revoked = admin
        .revoke_node(pb::RevokeNodeRequest {
            node: "same".into(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(
        (revoked.node_id.as_str(), revoked.was_connected),
        (first.node_id.as_str(), true)
    );
    let mut back = register("same", 1, &[]);
    back.previous_node_id = first.node_id.clone();
    let err = open_raw(&cluster.url(), ToCoordinator::Register(back))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(info(&mut admin).await.revoked_node_refusals >= 1);
    cluster.shutdown().await;
}

/// Joins "kept" and "gone" with one two-use token, revokes "gone", then
/// restarts the coordinator: the token and both identities.
async fn join_two_revoke_one_and_restart(cluster: &TestCluster) -> (String, Joined, Joined) {
    let mut admin = admin(cluster).await;
    let (token, _) = join_token(&mut admin, 2, None).await;
    let kept = join(&token, "kept").await.expect("join");
    let gone = join(&token, "gone").await.expect("join");
    admin
        .revoke_node(pb::RevokeNodeRequest {
            node: "gone".into(),
        })
        .await
        .expect("revoke");
    cluster.restart_coordinator().await;
    (token, kept, gone)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_and_token_uses_survive_a_coordinator_restart() {
    let cluster = TestCluster::builder().nodes(0).durable().start().await;
    let (token, kept, gone) = join_two_revoke_one_and_restart(&cluster).await;

    // The joined node connects with the certificate it has; the revoked
    // one stays refused; the token's two uses stay used.
    let node = FakeNode::connect_as(&cluster.url(), kept.identity(), register("kept", 1, &[]))
        .await
        .expect("a joined node connects after a restart");
    assert_eq!(node.node_id, kept.node_id);
    let err = FakeNode::connect_as(&cluster.url(), gone.identity(), register("gone", 1, &[]))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = join(&token, "third").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("used up"), "{}", err.message());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_lost_its_store_but_kept_its_ca_still_refuses_revoked_nodes() {
    // No durable store: a restart forgets every identity, token and
    // revocation the store held; the CA (and the revocations kept beside
    // it) stays.
    let cluster = TestCluster::builder().nodes(0).start().await;
    let (_, kept, gone) = join_two_revoke_one_and_restart(&cluster).await;

    // The revoked node stays refused; the other one's certificate, signed
    // by the same CA, is accepted under the id and name it names.
    let err = FakeNode::connect_as(&cluster.url(), gone.identity(), register("gone", 1, &[]))
        .await
        .err()
        .expect("a revoked node is refused after the store was lost");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let node = FakeNode::connect_as(&cluster.url(), kept.identity(), register("kept", 1, &[]))
        .await
        .expect("a joined node connects after its record was lost");
    assert_eq!(node.node_id, kept.node_id);
    let nodes = cluster.wait_for_nodes(1).await;
    assert_eq!(nodes[0].name, "kept");
    cluster.shutdown().await;
}

/// `csr_der` with every copy of the public key `from` (DER
/// SubjectPublicKeyInfo) replaced by `to` (as long): a request naming
/// `to`'s key whose signature is still `from`'s key's.
fn with_public_key(csr_der: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len(), "keys of one kind");
    let at = csr_der
        .windows(from.len())
        .position(|window| window == from)
        .expect("the request holds its key");
    let mut forged = csr_der.to_vec();
    forged[at..at + to.len()].copy_from_slice(to);
    forged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_join_needs_the_key_the_token_still_trusted_and_gets_no_certificate_otherwise() {
    use rcgen::PublicKeyData;
    let cluster = secure_cluster().await;
    let mut admin = admin(&cluster).await;

    // The holder's public key, signed by another key: a bad request, no
    // certificate, however much it looks like a repeat.
    let (once, _) = join_token(&mut admin, 1, None).await;
    let (key_pem, csr_der) = key_and_csr();
    let first = join_with(&once, "rep-1", key_pem.clone(), csr_der.clone())
        .await
        .expect("the first join");
    let holder_key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let (other_pem, other_csr) = key_and_csr();
    let other_key = rcgen::KeyPair::from_pem(&other_pem).unwrap();
    let forged = with_public_key(
        &other_csr,
        &other_key.subject_public_key_info(),
        &holder_key.subject_public_key_info(),
    );
    let err = join_with(&once, "rep-1", other_pem, forged)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // The true repeat is still answered.
    let again = join_with(&once, "rep-1", key_pem, csr_der)
        .await
        .expect("the repeat");
    assert_eq!(again.node_id, first.node_id);

    // A revoked token repeats nothing, though the identity it made stands.
    let (revoked, revoked_info) = join_token(&mut admin, 1, None).await;
    let (key_pem, csr_der) = key_and_csr();
    join_with(&revoked, "rep-2", key_pem.clone(), csr_der.clone())
        .await
        .expect("the first join");
    admin
        .revoke_token(pb::RevokeTokenRequest {
            id: revoked_info.id.clone(),
        })
        .await
        .expect("revoke the token");
    let err = join_with(&revoked, "rep-2", key_pem, csr_der)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("revoked"), "{}", err.message());

    // Nor does an expired one.
    let (short, _) = join_token(&mut admin, 1, Some(Duration::from_secs(1))).await;
    let (key_pem, csr_der) = key_and_csr();
    join_with(&short, "rep-3", key_pem.clone(), csr_der.clone())
        .await
        .expect("the first join");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let err = join_with(&short, "rep-3", key_pem, csr_der)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{}", err.message());

    // Both identities stand: their names are still held.
    let (many, _) = join_token(&mut admin, 0, None).await;
    for name in ["rep-2", "rep-3"] {
        let err = join(&many, name).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{name}: {err:?}");
    }
    cluster.shutdown().await;
}
