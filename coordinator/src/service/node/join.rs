//! `NodeService.Join`: a join token traded for a node certificate.
//!
//! Checks, in order: the coordinator authenticates nodes at all (TLS and
//! auth), the credential (a node join token, not revoked, not expired,
//! with a use left), the name (`identity::rules`) and that no node holding
//! it is still trusted, the certificate request. Then it assigns a node id
//! (`identity::join_node_id`: it records the token, name and key that
//! made it), issues the certificate, and stores the identity and the
//! token's use in one transaction BEFORE answering. Joins hold the
//! identity index's and the token index's writer locks throughout, so
//! concurrent joins never exceed a token's uses or share a name.
//!
//! A join is idempotent for a while: one repeating an earlier join (same
//! token, same name, same key; `identity::repeats_join`) within
//! `identity::REPEAT_WINDOW` (10 minutes) of it, whose identity is still
//! trusted and whose node has not connected with its certificate yet
//! (`Identities::connected`), is answered with a fresh certificate for
//! the node id it got, counting no use, even when the token's uses are
//! all taken. A node whose answer was lost (its timeout, a dropped
//! connection, a crash before it saved it) asks again with the same key
//! and is not locked out; another key asking for the name is still
//! refused. After the window, or once the node connected, the token and
//! the key it joined with get nothing more: the node renews its
//! certificate over its session, or an admin revokes it and it joins
//! anew.

use std::time::SystemTime;

use tonic::Status;

use weft_proto::convert::timestamp;
use weft_proto::{NodeId, pb};

use super::NodeApi;
use crate::auth::{JoinRefused, TokenRecord};
use crate::error::Error;
use crate::identity::{join_node_id, repeats_join, validate_name};
use crate::store::{NodeIdentityRecord, blocking};
use crate::tls::node_cert::{NodeCertError, request_key_der};

/// Why a coordinator that does not authenticate nodes refuses `Join`
/// (and join tokens), with what to do instead.
pub(crate) fn no_node_auth(config: &crate::CoordinatorConfig) -> Option<Status> {
    if config.tls.is_none() {
        return Some(Status::failed_precondition(
            "this coordinator does not authenticate nodes (--insecure): start nodes with --coordinator http://HOST:PORT and no join token",
        ));
    }
    if !config.auth {
        return Some(Status::failed_precondition(
            "this coordinator does not authenticate nodes (--no-auth): start nodes with --coordinator https://HOST:PORT and --ca-file, without a join token",
        ));
    }
    None
}

/// See the module docs. Runs to its end even if the node goes away (its
/// join timeout, a dropped connection): a join stored is also in memory,
/// so the name is held and the token's use counted, and the node asking
/// again with the same key is answered as a repeat.
pub(super) async fn join(
    api: &NodeApi,
    request: pb::JoinRequest,
) -> Result<pb::JoinResponse, Status> {
    let api = api.clone();
    crate::service::to_completion(async move { join_now(&api, request).await }).await
}

async fn join_now(api: &NodeApi, request: pb::JoinRequest) -> Result<pb::JoinResponse, Status> {
    let config = &api.handle.config;
    if let Some(refusal) = no_node_auth(config) {
        return Err(refusal);
    }
    let Some(tls) = api.tls.as_ref() else {
        return Err(Status::failed_precondition(
            "this coordinator serves no TLS",
        ));
    };
    let refused = |refusal: JoinRefused| {
        tracing::debug!(reason = %refusal, "refused a join");
        Status::from(refusal)
    };
    // The credential first, without the writers' locks: a caller without
    // one never queues ahead of a revocation. Checked again under them
    // (its uses may have run out meanwhile). A used-up token gets to the
    // locks only to repeat a join it made that may still be repeated.
    match api.tokens.check_join(&request.token, SystemTime::now()) {
        Ok(_) => {}
        Err(JoinRefused::UsedUp { ref id, .. })
            if api
                .identities
                .repeatable(&request.name, id, SystemTime::now())
                .is_some() => {}
        Err(refusal) => return Err(refused(refusal)),
    }
    let _joins = api.identities.write.lock().await;
    let _tokens = api.tokens.write.lock().await;
    let now = SystemTime::now();
    let (token, used_up) = match api.tokens.check_join(&request.token, now) {
        Ok(token) => (token, None),
        Err(JoinRefused::UsedUp { id, uses }) => {
            let refusal = JoinRefused::UsedUp {
                id: id.clone(),
                uses,
            };
            match api.tokens.get(&id) {
                Some(token) => (token, Some(refusal)),
                None => return Err(refused(refusal)),
            }
        }
        Err(refusal) => return Err(refused(refusal)),
    };
    // A repeat first: it is answered even when the token is used up.
    // Otherwise the refusals come in the order the module docs give.
    let name_ok = validate_name(&request.name);
    let public_key = requested_key(&request.csr_der);
    let holder = api.identities.holder(&request.name);
    if let (Ok(()), Ok(key), Some(holder)) = (&name_ok, &public_key, &holder)
        && repeats_join(holder, &token.id, &request.name, key, now)
        && !api.identities.connected(holder.id)
    {
        let cert = issue(api, tls, &request, holder.id)?;
        tracing::info!(node_id = %holder.id, node_name = %holder.name, token_id = %token.id, "node joined again with the same key: answered with its node id");
        return Ok(pb::JoinResponse {
            node_id: holder.id.to_string(),
            certificate_chain_pem: cert.chain_pem,
            ca_pem: tls.ca_pem(),
            not_after: Some(timestamp(cert.not_after)),
        });
    }
    if let Some(refusal) = used_up {
        return Err(refused(refusal));
    }
    name_ok.map_err(Status::invalid_argument)?;
    if let Some(holder) = holder {
        return Err(Status::already_exists(format!(
            "node name '{}' is held by node {}, which joined earlier; revoke it first with `weft nodes revoke {}`, or give this node another --name",
            request.name, holder.id, request.name
        )));
    }
    let public_key = public_key?;
    let at_ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        });
    // The same id again only for the same token, name and key within one
    // millisecond of a join of theirs since revoked: a later time then.
    let mut at = at_ms;
    let node_id = loop {
        let id = join_node_id(at, &token.id, &request.name, &public_key);
        if api.identities.get(id).is_none() {
            break id;
        }
        at = at.saturating_add(1);
    };
    let cert = issue(api, tls, &request, node_id)?;
    let identity = NodeIdentityRecord {
        id: node_id,
        name: request.name.clone(),
        created: now,
        token_id: token.id.clone(),
        revoked: None,
    };
    let used = TokenRecord {
        used: token.used.saturating_add(1),
        ..token
    };
    let (stored, stored_token) = (identity.clone(), used.clone());
    blocking(&api.handle.store, "recording a join", move |store| {
        store.put_node_identity(&stored, Some(&stored_token))
    })
    .await
    .map_err(Error::from)?;
    tracing::info!(node_id = %node_id, node_name = %identity.name, token_id = %used.id, used = used.used, uses = used.uses, "node joined");
    api.tokens.put(used);
    api.identities.put(identity);
    Ok(pb::JoinResponse {
        node_id: node_id.to_string(),
        certificate_chain_pem: cert.chain_pem,
        ca_pem: tls.ca_pem(),
        not_after: Some(timestamp(cert.not_after)),
    })
}

/// The public key (DER SubjectPublicKeyInfo) the certificate request
/// asks for: what tells a repeated join. Its signature is checked when
/// the certificate is issued, before any answer.
fn requested_key(csr_der: &[u8]) -> Result<Vec<u8>, Status> {
    request_key_der(csr_der).map_err(|err| Status::invalid_argument(err.to_string()))
}

/// The certificate of node `node_id` for the request's key.
fn issue(
    api: &NodeApi,
    tls: &crate::tls::ServerTls,
    request: &pb::JoinRequest,
    node_id: NodeId,
) -> Result<crate::tls::node_cert::NodeCert, Status> {
    tls.ca()
        .issue_node(
            &request.csr_der,
            (node_id, &request.name),
            api.handle.config.node_cert_lifetime,
        )
        .map_err(|err| match err {
            NodeCertError::BadRequest(_) => Status::invalid_argument(err.to_string()),
            NodeCertError::Pki(_) => {
                tracing::error!(error = %err, "issuing a node certificate failed");
                Status::internal("internal coordinator error")
            }
        })
}
