//! Joining: trading a join token for the node's certificate
//! (`NodeService.Join`, see proto/README.md, "Joining").
//!
//! The node dials the coordinator over TLS trusting only the token's CA
//! pin and presenting no certificate, makes its own key (ECDSA P-256; it
//! never leaves the node) and a certificate request signed with it, and
//! sends both with the token's credential and its name. The answer is
//! checked (the CA is the pinned one, the certificate is for this key)
//! and saved in the state dir before the node goes on to its sessions.
//!
//! With several coordinator addresses they are tried in order, the next
//! at once, as sessions do (`reconnect::Rotation`). A coordinator that
//! cannot be reached (not started yet, restarting, closing the connection
//! mid-handshake, a certificate outside its dates here) is tried again
//! with the sessions' backoff; a refusal, or a chain that is not the
//! token's CA, is final, with a message that says what to do
//! ([`Error::JoinRefused`], `untrusted_is_final`).

use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use weft_proto::pb::node_service_client::NodeServiceClient;
use weft_proto::tls::{HandshakeError, HandshakeFailure, Trust, ca_pin};
use weft_proto::{CoordinatorAddr, JoinToken, NodeId, pb};

use crate::error::Error;
use crate::identity::{StateDir, Stored, Validity, leaf_validity};
use crate::reconnect::{Backoff, Rotation};
use crate::renewal::Credentials;
use crate::session::{self, NodeCtx};

/// How long the coordinator may take to answer `Join`.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A dial whose TLS handshake found the coordinator's chain is not the
/// token's CA ([`HandshakeFailure::Untrusted`]) as a final error: the
/// token names another cluster, or something else answers at its
/// address, and asking again would only get the same chain. Every other
/// failure (unreachable, closed during the handshake, a certificate
/// outside its dates, not TLS yet) stays retryable.
fn untrusted_is_final(error: Error) -> Error {
    match &error {
        Error::Connect {
            url,
            reason,
            source,
        } if HandshakeError::find(source)
            .is_some_and(|found| found.failure == HandshakeFailure::Untrusted) =>
        {
            Error::Identity(format!(
                "not joining {url}: {reason} (the join token's CA pin is not this coordinator's; check the token and its address)"
            ))
        }
        _ => error,
    }
}

/// Joins with `token` as `ctx.config.name`, at `ctx.config.coordinators`,
/// and saves the identity in the state dir (if any). `Ok(None)`: the node
/// was drained or killed before it could join.
pub(crate) async fn join(ctx: &NodeCtx, token: &JoinToken) -> Result<Option<Credentials>, Error> {
    let store = ctx.config.state_dir.clone().map(StateDir::new);
    // A state dir that cannot be written fails now, not after the token
    // was spent.
    if let Some(store) = &store {
        store.check_writable()?;
    }
    let tls = |err: weft_proto::tls::TlsError| Error::Tls(err.to_string());
    let trust = token.trust().map_err(tls)?;
    let plans = ctx
        .config
        .coordinators
        .iter()
        .map(|coordinator| {
            let address = CoordinatorAddr::parse(coordinator)?;
            weft_proto::tls::dial_plan(&address, Some(&trust)).map_err(tls)
        })
        .collect::<Result<Vec<_>, Error>>()?;
    if plans.is_empty() {
        return Err(Error::from(weft_proto::AddressError(String::new())));
    }
    // One key for every try, and for a join asked again after a restart
    // with the same token and name: the coordinator answers a repeated
    // join (same token, name and key)
    // with the node id it gave the first time, so an answer that was lost
    // (a timeout, a dropped connection, a crash before `node.conf`) does
    // not lock the node out.
    let key = join_key(store.as_ref(), token.id(), &ctx.config.name)?;
    let csr_der = request_for(&key, &ctx.config.name)?;
    let request = pb::JoinRequest {
        token: token.credential.clone(),
        name: ctx.config.name.clone(),
        csr_der: csr_der.into(),
    };
    info!(
        coordinators = %ctx.config.coordinators_text(),
        node_name = %ctx.config.name,
        token = token.id(),
        "joining the cluster"
    );
    let mut backoff = Backoff::new(ctx.config.reconnect_min, ctx.config.reconnect_max);
    let mut rotation = Rotation::new(plans.len());
    let stop = ctx.drain.done();
    let response = loop {
        let (url, connector) = plans[rotation.current()].clone();
        let attempt = async {
            let channel = session::dial(url, connector)
                .await
                .map_err(untrusted_is_final)?;
            let mut client = NodeServiceClient::new(channel);
            match tokio::time::timeout(JOIN_TIMEOUT, client.join(request.clone())).await {
                Ok(Ok(response)) => Ok(response.into_inner()),
                Ok(Err(status)) => Err(refused(status)),
                Err(_) => Err(Error::Protocol(format!(
                    "no answer to Join within {JOIN_TIMEOUT:?}"
                ))),
            }
        };
        let result = tokio::select! {
            () = ctx.kill.cancelled() => return Ok(None),
            () = stop.cancelled() => return Ok(None),
            result = attempt => result,
        };
        match result {
            Ok(response) => break response,
            Err(error) if error.is_fatal() => return Err(error),
            Err(error) => warn!(%error, "cannot join yet; trying again"),
        }
        if !rotation.failed() {
            continue;
        }
        tokio::select! {
            () = ctx.kill.cancelled() => return Ok(None),
            () = stop.cancelled() => return Ok(None),
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    };
    let coordinator = ctx.config.coordinators_text();
    let (stored, validity) = accept(response, &key, &trust, &ctx.config.name, coordinator)?;
    if let Some(store) = &store {
        store.save(&stored)?;
    }
    info!(
        node_id = %stored.node_id,
        node_name = %stored.name,
        state_dir = %store.as_ref().map_or_else(|| "(none: kept in memory)".into(), |s| s.path().display().to_string()),
        not_after = %humantime::format_rfc3339_seconds(validity.not_after),
        "joined the cluster"
    );
    Credentials::new(&stored, validity, store).map(Some)
}

/// A new key and a certificate request signed with it (its subject names
/// `name`; the coordinator ignores it and names the node id).
pub(crate) fn key_and_request(name: &str) -> Result<(rcgen::KeyPair, Vec<u8>), Error> {
    let key = new_key()?;
    let csr = request_for(&key, name)?;
    Ok((key, csr))
}

fn new_key() -> Result<rcgen::KeyPair, Error> {
    rcgen::KeyPair::generate().map_err(|err| Error::Identity(format!("making a key: {err}")))
}

/// A certificate request signed with `key` (its subject names `name`).
fn request_for(key: &rcgen::KeyPair, name: &str) -> Result<Vec<u8>, Error> {
    let made = rcgen::CertificateParams::new(Vec::<String>::new()).and_then(|mut params| {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ok(params.serialize_request(key)?.der().to_vec())
    });
    made.map_err(|err| Error::Identity(format!("making a certificate request: {err}")))
}

/// The key to join with the token `token_id` as `name`: the one a join
/// with the same token and name that did not finish left in the state dir
/// (`node.join.key`, saved for them as `node.join` says: its answer was
/// lost, or it was refused), else a new one, saved there with what it is
/// for before it is sent (so that a node stopped while it waits for the
/// answer asks again with it). A key saved for another token or name is
/// never asked with (it is replaced). Never the key of an
/// identity there (expired or revoked: its key may have been exposed, and
/// is never certified again), and that identity is left as it is until
/// an answer replaces it: a refused join leaves the node the identity it
/// had. Without a state dir: a new one, kept for this process's tries.
fn join_key(store: Option<&StateDir>, token_id: &str, name: &str) -> Result<rcgen::KeyPair, Error> {
    let Some(store) = store else {
        return new_key();
    };
    if let Some(pem) = store.saved_key(token_id, name)? {
        return rcgen::KeyPair::from_pem(&pem).map_err(|err| {
            Error::Identity(format!(
                "the key {} left by an earlier join: {err}",
                store.path().join(crate::identity::JOIN_KEY_FILE).display()
            ))
        });
    }
    let key = new_key()?;
    store.save_join_key(&key.serialize_pem(), token_id, name)?;
    Ok(key)
}

/// The error for a status `Join` was answered with: retried when the
/// coordinator may answer otherwise later (it is starting or stopping),
/// else final ([`Error::JoinRefused`]).
fn refused(status: tonic::Status) -> Error {
    match status.code() {
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Internal
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded
        | tonic::Code::ResourceExhausted
        | tonic::Code::Aborted => Error::Refused(status),
        _ => Error::JoinRefused(status),
    }
}

/// Checks `Join`'s answer against what was asked: a node id, a CA that
/// is the one `trust` pins, a certificate for `key`. Answers the identity
/// to keep and its certificate's validity.
pub(crate) fn accept(
    response: pb::JoinResponse,
    key: &rcgen::KeyPair,
    trust: &Trust,
    name: &str,
    coordinator: String,
) -> Result<(Stored, Validity), Error> {
    let bad = |why: String| Error::Identity(format!("the coordinator's answer to Join: {why}"));
    let node_id = response
        .node_id
        .parse::<NodeId>()
        .map_err(|err| bad(format!("node id '{}': {err}", response.node_id)))?;
    // Exactly one certificate, the pinned one: whatever `ca.pem` holds is
    // trusted. It is saved re-encoded from its DER, so nothing else in the
    // text (another block, a header another parser would read otherwise)
    // reaches the file.
    let blocks = x509_parser::pem::Pem::iter_from_buffer(response.ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad(format!("its CA certificate does not parse: {err}")))?;
    let [block] = blocks.as_slice() else {
        return Err(bad(format!(
            "{} PEM blocks where the cluster CA's certificate alone was expected",
            blocks.len()
        )));
    };
    if block.label != "CERTIFICATE" {
        return Err(bad(format!(
            "a {} where the cluster CA's certificate was expected",
            block.label
        )));
    }
    let ca = &block.contents;
    let sent = Trust::pin(&ca_pin(ca)).map_err(|err| bad(err.to_string()))?;
    if &sent != trust {
        return Err(bad(format!(
            "its CA is not the one the join token pins ({})",
            trust.describe()
        )));
    }
    let validity =
        leaf_validity(&response.certificate_chain_pem, key.public_key_raw()).map_err(bad)?;
    if validity.not_after <= SystemTime::now() {
        return Err(bad("the certificate has already expired".into()));
    }
    let stored = Stored {
        node_id,
        name: name.to_owned(),
        coordinator,
        key_pem: key.serialize_pem(),
        chain_pem: response.certificate_chain_pem,
        ca_pem: pem_certificate(ca),
    };
    Ok((stored, validity))
}

/// `der` as a PEM certificate (standard base64, 64 characters a line).
fn pem_certificate(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
        for i in 0..4 {
            text.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i)) as usize & 63]
            } else {
                b'='
            });
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids of the join tokens the tests' joins are made with.
    const TOKEN: &str = "0123456789abcdef";
    const OTHER_TOKEN: &str = "fedcba9876543210";

    /// A CA; answers its PEM, its pin as a trust, and its issuer.
    fn ca() -> (String, Trust, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let trust = Trust::pin(&ca_pin(cert.der())).unwrap();
        (cert.pem(), trust, rcgen::Issuer::new(params, key))
    }

    fn response(
        node_id: &str,
        key: &rcgen::KeyPair,
        ca_pem: &str,
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    ) -> pb::JoinResponse {
        let leaf = crate::identity::tests::leaf(key, issuer, Duration::from_secs(600));
        pb::JoinResponse {
            node_id: node_id.into(),
            certificate_chain_pem: leaf + ca_pem,
            ca_pem: ca_pem.into(),
            not_after: None,
        }
    }

    #[test]
    fn an_answer_for_this_key_from_the_pinned_ca_is_kept_whole() {
        let (ca_pem, trust, issuer) = ca();
        let (key, csr) = key_and_request("n1").unwrap();
        assert!(!csr.is_empty());
        let node_id = NodeId::new();
        let answer = response(&node_id.to_string(), &key, &ca_pem, &issuer);
        let (stored, validity) =
            accept(answer.clone(), &key, &trust, "n1", "https://c:1".into()).unwrap();
        assert_eq!(stored.node_id, node_id);
        assert_eq!(
            (stored.name.as_str(), stored.coordinator.as_str()),
            ("n1", "https://c:1")
        );
        assert_eq!(stored.chain_pem, answer.certificate_chain_pem);
        let der = |pem: &str| {
            x509_parser::pem::parse_x509_pem(pem.as_bytes())
                .unwrap()
                .1
                .contents
        };
        assert_eq!(der(&stored.ca_pem), der(&ca_pem));
        assert_eq!(
            stored.ca_pem.replace("\r\n", "\n"),
            ca_pem.replace("\r\n", "\n")
        );
        assert_eq!(stored.key_pem, key.serialize_pem());
        assert!(validity.not_after > SystemTime::now());
    }

    #[test]
    fn an_answer_from_another_ca_or_for_another_key_is_refused() {
        let (ca_pem, trust, issuer) = ca();
        let (key, _) = key_and_request("n1").unwrap();
        let id = NodeId::new().to_string();
        let (other_pem, _, other_issuer) = ca();
        let foreign = response(&id, &key, &other_pem, &other_issuer);
        let err = accept(foreign, &key, &trust, "n1", "c".into()).unwrap_err();
        assert!(
            err.to_string().contains("not the one the join token pins"),
            "{err}"
        );

        let (other_key, _) = key_and_request("n1").unwrap();
        let stolen = response(&id, &other_key, &ca_pem, &issuer);
        let err = accept(stolen, &key, &trust, "n1", "c".into()).unwrap_err();
        assert!(err.to_string().contains("not for the node's key"), "{err}");

        let nameless = response("nope", &key, &ca_pem, &issuer);
        assert!(accept(nameless, &key, &trust, "n1", "c".into()).is_err());
    }

    #[test]
    fn an_answer_whose_ca_pem_holds_more_than_the_pinned_ca_is_refused() {
        let (ca_pem, trust, issuer) = ca();
        let (other_pem, _, _) = ca();
        let (key, _) = key_and_request("n1").unwrap();
        let id = NodeId::new().to_string();
        for extra in [
            format!("{ca_pem}{other_pem}"),
            format!("{other_pem}{ca_pem}"),
            format!("{ca_pem}{ca_pem}"),
            String::new(),
        ] {
            let mut answer = response(&id, &key, &ca_pem, &issuer);
            answer.ca_pem = extra;
            let err = accept(answer, &key, &trust, "n1", "c".into()).unwrap_err();
            assert!(
                err.to_string()
                    .contains("the cluster CA's certificate alone"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_join_asks_with_the_key_saved_in_the_state_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path().join("state"));
        // The first join saves its key before asking; asked again (a
        // restart while it waited), it asks with the same key.
        let first = join_key(Some(&store), TOKEN, "n1").unwrap();
        let again = join_key(Some(&store), TOKEN, "n1").unwrap();
        assert_eq!(first.public_key_raw(), again.public_key_raw());
        // Without a state dir, a new key.
        let none = join_key(None, TOKEN, "n1").unwrap();
        assert_ne!(none.public_key_raw(), first.public_key_raw());
        // Another token, or another name: a new key, saved for it; the
        // old one is never asked with again.
        let other_token = join_key(Some(&store), OTHER_TOKEN, "n1").unwrap();
        assert_ne!(other_token.public_key_raw(), first.public_key_raw());
        let other_name = join_key(Some(&store), OTHER_TOKEN, "n2").unwrap();
        assert_ne!(other_name.public_key_raw(), other_token.public_key_raw());
        let back = join_key(Some(&store), TOKEN, "n1").unwrap();
        assert_ne!(back.public_key_raw(), first.public_key_raw());
        assert_ne!(back.public_key_raw(), other_name.public_key_raw());
    }

    #[test]
    fn a_join_answer_whose_save_was_cut_between_its_renames_loads_the_new_identity() {
        use crate::identity::{CA_FILE, CHAIN_FILE, CONF_FILE, KEY_FILE};
        // Cut after node.conf: the key renamed but not the chain, or the
        // chain but not the CA; over an identity or as the first join.
        for renamed in [1, 2] {
            for over_identity in [false, true] {
                let point = format!("{renamed} renamed, over an identity: {over_identity}");
                let tmp = tempfile::tempdir().unwrap();
                let store = StateDir::new(tmp.path().join("state"));
                if over_identity {
                    store
                        .save(&crate::identity::tests::joined("gpu-1"))
                        .unwrap();
                }
                let key = join_key(Some(&store), TOKEN, "gpu-1").unwrap();
                let (ca_pem, trust, issuer) = ca();
                let answer = response(&NodeId::new().to_string(), &key, &ca_pem, &issuer);
                let (joined, _) =
                    accept(answer, &key, &trust, "gpu-1", "https://c:1".into()).unwrap();
                crate::identity::tests::save_cut_after(&store, &joined, renamed);
                let (loaded, validity) = store.load().unwrap().expect(&point);
                assert_eq!(loaded, joined, "{point}");
                assert_eq!(
                    leaf_validity(&loaded.chain_pem, key.public_key_raw()),
                    Ok(validity),
                    "{point}: the key and the certificate match"
                );
                let read = |name: &str| std::fs::read_to_string(store.path().join(name)).unwrap();
                assert_eq!(
                    [read(KEY_FILE), read(CHAIN_FILE), read(CA_FILE)],
                    [joined.key_pem, joined.chain_pem, joined.ca_pem],
                    "{point}: in place"
                );
                let mut names: Vec<_> = std::fs::read_dir(store.path())
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                names.sort();
                assert_eq!(
                    names,
                    [CA_FILE, CONF_FILE, KEY_FILE, CHAIN_FILE],
                    "{point}: no .new file or join key left"
                );
                let next = join_key(Some(&store), TOKEN, "gpu-1").unwrap();
                assert_ne!(next.public_key_raw(), key.public_key_raw(), "{point}");
            }
        }
    }

    #[test]
    fn a_join_over_an_identity_asks_with_a_new_key_saved_beside_it_and_an_answer_replaces_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path().join("state"));
        // An identity whose certificate looks expired (or was revoked).
        let (key_pem, chain_pem, ca_pem) = crate::identity::tests::issued(Duration::from_secs(60));
        let old = rcgen::KeyPair::from_pem(&key_pem).unwrap();
        let stored = crate::identity::Stored {
            node_id: weft_proto::NodeId::new(),
            name: "gpu-1".into(),
            coordinator: "https://127.0.0.1:7070".into(),
            key_pem,
            chain_pem,
            ca_pem,
        };
        store.save(&stored).unwrap();
        let read = |name: &str| std::fs::read_to_string(store.path().join(name)).unwrap();
        let (conf, key) = (
            read(crate::identity::CONF_FILE),
            read(crate::identity::KEY_FILE),
        );
        let fresh = join_key(Some(&store), TOKEN, "gpu-1").unwrap();
        assert_ne!(fresh.public_key_raw(), old.public_key_raw());
        assert_eq!(read(crate::identity::JOIN_KEY_FILE), fresh.serialize_pem());
        // Refused, or its answer lost: the identity is as it was (the
        // clock put right, the node goes on with it), and a join asked
        // again asks with the same new key.
        assert_eq!(read(crate::identity::CONF_FILE), conf);
        assert_eq!(read(crate::identity::KEY_FILE), key);
        assert_eq!(store.load().unwrap().unwrap().0, stored);
        let again = join_key(Some(&store), TOKEN, "gpu-1").unwrap();
        assert_eq!(again.public_key_raw(), fresh.public_key_raw());
        // The answer replaces the identity, and the join key goes.
        let (ca_pem, trust, issuer) = ca();
        let id = NodeId::new();
        let answer = response(&id.to_string(), &again, &ca_pem, &issuer);
        let (joined, _) = accept(answer, &again, &trust, "gpu-1", "https://c:1".into()).unwrap();
        store.save(&joined).unwrap();
        assert_eq!(store.load().unwrap().unwrap().0, joined);
        assert!(!store.path().join(crate::identity::JOIN_KEY_FILE).exists());
        let next = join_key(Some(&store), TOKEN, "gpu-1").unwrap();
        assert_ne!(next.public_key_raw(), again.public_key_raw());
    }

    #[test]
    fn a_coordinator_that_is_starting_is_asked_again_and_a_refusal_is_final() {
        assert!(!refused(tonic::Status::unavailable("starting")).is_fatal());
        for status in [
            tonic::Status::unauthenticated("used up"),
            tonic::Status::already_exists("name taken"),
            tonic::Status::invalid_argument("bad name"),
            tonic::Status::failed_precondition("--no-auth"),
            tonic::Status::unimplemented("old"),
        ] {
            assert!(refused(status).is_fatal());
        }
    }

    /// Dials `https://127.0.0.1:{port}` trusting `trust` as `join` does,
    /// and answers the error it ends with.
    async fn dial_error(port: u16, trust: &Trust) -> Error {
        let address = CoordinatorAddr::parse(&format!("https://127.0.0.1:{port}")).unwrap();
        let (url, connector) = weft_proto::tls::dial_plan(&address, Some(trust)).unwrap();
        session::dial(url, connector)
            .await
            .map_err(untrusted_is_final)
            .expect_err("the dial fails")
    }

    /// A local listener that reads one connection's ClientHello (one TLS
    /// record) and closes it: a coordinator stopping, a proxy dropping.
    async fn closes_during_the_handshake() -> (u16, tokio::task::JoinHandle<()>) {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut header = [0; 5];
            tcp.read_exact(&mut header).await.unwrap();
            assert_eq!(header[0], 22, "a handshake record");
            let mut hello = vec![0; usize::from(u16::from_be_bytes([header[3], header[4]]))];
            tcp.read_exact(&mut hello).await.unwrap();
        });
        (port, server)
    }

    /// A local TLS server for one connection presenting a leaf for
    /// 127.0.0.1 signed by `issuer`, valid from `not_before` for an hour.
    async fn serves_a_certificate(
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        ca_pem: &str,
        not_before: time::OffsetDateTime,
    ) -> (u16, tokio::task::JoinHandle<()>) {
        use rustls::pki_types::pem::PemObject;
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params.not_before = not_before;
        params.not_after = not_before + Duration::from_secs(3600);
        let leaf = params.signed_by(&key, issuer).unwrap();
        let chain = vec![
            leaf.der().clone(),
            rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap(),
        ];
        let private =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(weft_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _refused_by_the_client = acceptor.accept(tcp).await;
        });
        (port, server)
    }

    #[tokio::test]
    async fn a_coordinator_closing_during_the_handshake_is_dialed_again() {
        let (_, trust, _) = ca();
        let (port, server) = closes_during_the_handshake().await;
        let error = dial_error(port, &trust).await;
        server.await.unwrap();
        assert!(matches!(error, Error::Connect { .. }), "{error}");
        assert!(!error.is_fatal(), "{error}");
    }

    #[tokio::test]
    async fn a_coordinator_whose_certificate_is_not_valid_yet_is_dialed_again() {
        let (ca_pem, trust, issuer) = ca();
        let tomorrow = time::OffsetDateTime::now_utc() + Duration::from_secs(24 * 3600);
        let (port, server) = serves_a_certificate(&issuer, &ca_pem, tomorrow).await;
        let error = dial_error(port, &trust).await;
        server.await.unwrap();
        assert!(error.to_string().contains("not valid yet"), "{error}");
        assert!(!error.is_fatal(), "{error}");
    }

    #[tokio::test]
    async fn a_coordinator_of_another_ca_than_the_pinned_one_is_final() {
        let (_, trust, _) = ca();
        let (other_pem, _, other_issuer) = ca();
        let now = time::OffsetDateTime::now_utc() - Duration::from_secs(60);
        let (port, server) = serves_a_certificate(&other_issuer, &other_pem, now).await;
        let error = dial_error(port, &trust).await;
        server.await.unwrap();
        assert!(
            error
                .to_string()
                .contains("the join token's CA pin is not this coordinator's"),
            "{error}"
        );
        assert!(error.is_fatal(), "{error}");
    }
}
