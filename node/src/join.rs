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
//! cannot be reached (not started yet, restarting) is tried again with
//! the sessions' backoff; a refusal is final, with a
//! message that says what to do ([`Error::JoinRefused`]).

use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use weft_proto::pb::node_service_client::NodeServiceClient;
use weft_proto::tls::{Trust, ca_pin};
use weft_proto::{CoordinatorAddr, JoinToken, NodeId, pb};

use crate::error::Error;
use crate::identity::{StateDir, Stored, Validity, leaf_validity};
use crate::reconnect::{Backoff, Rotation};
use crate::renewal::Credentials;
use crate::session::{self, NodeCtx};

/// How long the coordinator may take to answer `Join`.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Joins with `token` as `ctx.config.name`, at `ctx.config.coordinators`,
/// and saves the identity in the state dir (if any). `Ok(None)`: the node
/// was drained or killed before it could join.
/// A dial whose TLS handshake refused the coordinator (its chain does
/// not hold the token's CA, or it does not speak TLS) as a final error:
/// the token names another cluster, or something else answers at its
/// address, and asking again would only send the same. Unreachable
/// coordinators stay retryable.
fn untrusted_is_final(error: Error) -> Error {
    let Error::Connect {
        url,
        reason,
        source,
    } = error
    else {
        return error;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&source);
    while let Some(current) = cause {
        if current
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        {
            return Error::Identity(format!(
                "not joining {url}: {reason} (the join token's CA pin is not this coordinator's; check the token and its address)"
            ));
        }
        cause = current.source();
    }
    Error::Connect {
        url,
        reason,
        source,
    }
}

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
    let (key, csr_der) = key_and_request(&ctx.config.name)?;
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
    let made = rcgen::KeyPair::generate().and_then(|key| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let csr = params.serialize_request(&key)?;
        Ok((key, csr.der().to_vec()))
    });
    made.map_err(|err| Error::Identity(format!("making a key and a certificate request: {err}")))
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
    let (_, ca) = x509_parser::pem::parse_x509_pem(response.ca_pem.as_bytes())
        .map_err(|err| bad(format!("no CA certificate: {err}")))?;
    let sent = Trust::pin(&ca_pin(&ca.contents)).map_err(|err| bad(err.to_string()))?;
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
        ca_pem: response.ca_pem,
    };
    Ok((stored, validity))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(stored.ca_pem, ca_pem);
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
}
