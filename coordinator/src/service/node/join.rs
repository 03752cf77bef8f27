//! `NodeService.Join`: a join token traded for a node certificate.
//!
//! Checks, in order: the coordinator authenticates nodes at all (TLS and
//! auth), the credential (a node join token, not revoked, not expired,
//! with a use left), the name (`identity::rules`) and that no node holding
//! it is still trusted, the certificate request. Then it assigns a fresh
//! node id, issues the certificate, and stores the identity and the
//! token's use in one transaction BEFORE answering. Joins hold the
//! identity index's and the token index's writer locks throughout, so
//! concurrent joins never exceed a token's uses or share a name.

use std::time::SystemTime;

use tonic::Status;

use weft_proto::convert::timestamp;
use weft_proto::{NodeId, pb};

use super::NodeApi;
use crate::auth::TokenRecord;
use crate::error::Error;
use crate::identity::validate_name;
use crate::store::{NodeIdentityRecord, blocking};
use crate::tls::node_cert::NodeCertError;

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
/// so the name is held and the token's use counted.
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
    let refused = |refusal| {
        tracing::debug!(reason = %refusal, "refused a join");
        Status::from(refusal)
    };
    // The credential first, without the writers' locks: a caller without
    // one never queues ahead of a revocation. Checked again under them
    // (its uses may have run out meanwhile).
    api.tokens
        .check_join(&request.token, SystemTime::now())
        .map_err(refused)?;
    let _joins = api.identities.write.lock().await;
    let _tokens = api.tokens.write.lock().await;
    let now = SystemTime::now();
    let token = api
        .tokens
        .check_join(&request.token, now)
        .map_err(refused)?;
    validate_name(&request.name).map_err(Status::invalid_argument)?;
    if let Some(holder) = api.identities.holder(&request.name) {
        return Err(Status::already_exists(format!(
            "node name '{}' is held by node {}, which joined earlier; revoke it first with `weft nodes revoke {}`, or give this node another --name",
            request.name, holder.id, request.name
        )));
    }
    let node_id = NodeId::new();
    let cert = tls
        .ca()
        .issue_node(
            &request.csr_der,
            (node_id, &request.name),
            config.node_cert_lifetime,
        )
        .map_err(|err| match err {
            NodeCertError::BadRequest(_) => Status::invalid_argument(err.to_string()),
            NodeCertError::Pki(_) => {
                tracing::error!(error = %err, "issuing a node certificate failed");
                Status::internal("internal coordinator error")
            }
        })?;
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
