//! The admin rpcs about nodes' identities: `CreateToken` with role `node`
//! (a join token) and `RevokeNode`. Translation and storage only: what a
//! revoked node may still do is the scheduler's and `Connect`'s business.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::Status;

use weft_proto::join::JoinToken;
use weft_proto::{CoordinatorAddr, NodeId, pb};

use super::admin::{AdminApi, token_info};
use crate::auth;
use crate::driver::Command;
use crate::error::Error;
use crate::service::node::no_node_auth;
use crate::store::{NodeIdentityRecord, blocking};

/// The address a join token names: `asked` if given (it must parse as a
/// coordinator address), else the first `--advertise` name with the
/// listen port, else the address the request reached (`reached`; on an
/// unspecified listen address that is the interface it came in on).
pub(crate) fn join_address(
    asked: &str,
    advertise: &[String],
    listen: SocketAddr,
    reached: Option<SocketAddr>,
) -> Result<String, Status> {
    let asked = asked.trim();
    if !asked.is_empty() {
        CoordinatorAddr::parse(asked)
            .map_err(|err| {
                Status::invalid_argument(format!(
                    "join_address: invalid coordinator address {}: expected HOST:PORT or http(s)://HOST:PORT",
                    crate::error::quoted(&err.0)
                ))
            })?;
        return Ok(asked.to_owned());
    }
    if let Some(name) = advertise.iter().map(|a| a.trim()).find(|a| !a.is_empty()) {
        let host = name.trim_start_matches('[').trim_end_matches(']');
        return Ok(match host.parse::<std::net::Ipv6Addr>() {
            Ok(ip) => format!("[{ip}]:{}", listen.port()),
            Err(_) => format!("{host}:{}", listen.port()),
        });
    }
    let mut addr = reached.unwrap_or(listen);
    addr.set_ip(addr.ip().to_canonical());
    Ok(addr.to_string())
}

/// `CreateToken` with role `node`: a join token (no scopes).
pub(super) async fn create_join_token(
    api: &AdminApi,
    request: pb::CreateTokenRequest,
    reached: Option<SocketAddr>,
) -> Result<pb::CreateTokenResponse, Status> {
    if let Some(refusal) = no_node_auth(&api.handle.config) {
        return Err(refusal);
    }
    let Some(tls) = api.tls.as_ref() else {
        return Err(Status::failed_precondition(
            "this coordinator serves no TLS",
        ));
    };
    if !request.scopes.is_empty() {
        return Err(Status::invalid_argument(
            "scopes: a join token (role node) has no scopes; it only lets a node join",
        ));
    }
    let ttl: Option<Duration> = request
        .ttl
        .as_ref()
        .map(|t| weft_proto::convert::duration_from_pb("ttl", t))
        .transpose()
        .map_err(Error::from)?;
    if request.name.len() > 256 {
        return Err(Status::invalid_argument("name: longer than 256 bytes"));
    }
    let advertise = api
        .handle
        .config
        .tls
        .as_ref()
        .map(|t| t.advertise.clone())
        .unwrap_or_default();
    let address = join_address(&request.join_address, &advertise, api.listen, reached)?;
    let _writer = api.tokens.write.lock().await;
    let (record, credential) =
        auth::new_join_token(&request.name, ttl, request.uses, SystemTime::now())?;
    let info = token_info(&record);
    api.put_token(record).await?;
    tracing::info!(token_id = %info.id, name = %info.name, uses = info.uses, %address, "join token created");
    let token = JoinToken {
        address,
        ca_pin: tls.ca_pin(),
        credential,
    };
    Ok(pb::CreateTokenResponse {
        token: token.encode(),
        info: Some(info),
    })
}

/// `RevokeNode`: finds the node (a joined identity, else a connected
/// node), stores it as revoked, then has the driver bar it, close its
/// session and requeue its attempts. Runs to its end even if the caller
/// goes away (Ctrl-C, its deadline): a revocation stored is also refused
/// in memory and by the driver.
pub(super) async fn revoke_node(
    api: &AdminApi,
    selector: &str,
) -> Result<pb::RevokeNodeResponse, Status> {
    let (api, selector) = (api.clone(), selector.to_owned());
    crate::service::to_completion(async move { revoke_now(&api, &selector).await }).await
}

async fn revoke_now(api: &AdminApi, selector: &str) -> Result<pb::RevokeNodeResponse, Status> {
    let selector = selector.trim();
    let _writer = api.identities.write.lock().await;
    let now = SystemTime::now();
    let record = match api.identities.find(selector) {
        Some(record) => record,
        None => {
            // Not a joined node (node authentication off): a connected
            // one, recorded so its id is refused from now on too.
            let owned = selector.to_owned();
            let found = api
                .handle
                .call(|reply| Command::FindNode {
                    selector: owned,
                    reply,
                })
                .await?;
            let (id, name): (NodeId, String) =
                found.ok_or_else(|| Error::NodeNotFound(selector.to_owned()))?;
            NodeIdentityRecord {
                id,
                name,
                created: now,
                token_id: String::new(),
                revoked: None,
            }
        }
    };
    let revoked = NodeIdentityRecord {
        revoked: Some(record.revoked.unwrap_or(now)),
        ..record
    };
    // Beside the CA first: it outlives a lost store.
    if let Some(tls) = &api.tls {
        let tls = Arc::clone(tls);
        let id = revoked.id;
        tokio::task::spawn_blocking(move || tls.record_revoked(id))
            .await
            .map_err(|err| Status::internal(format!("recording a revocation: {err}")))?
            .map_err(|err| {
                tracing::error!(error = %err, "recording a revocation beside the CA failed");
                Status::internal(format!("recording the revocation: {err}"))
            })?;
    }
    let stored = revoked.clone();
    blocking(&api.handle.store, "revoking a node", move |store| {
        store.put_node_identity(&stored, None)
    })
    .await
    .map_err(Error::from)?;
    api.identities.put(revoked.clone());
    let node_id = revoked.id;
    let (was_connected, requeued) = api
        .handle
        .call(|reply| Command::RevokeNode { node_id, reply })
        .await??;
    tracing::warn!(node_id = %node_id, node_name = %revoked.name, was_connected, requeued, "node revoked");
    Ok(pb::RevokeNodeResponse {
        node_id: node_id.to_string(),
        name: revoked.name,
        was_connected,
        requeued,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_token_names_the_asked_address_else_the_advertised_name_else_where_it_was_reached() {
        let listen: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let reached: SocketAddr = "10.1.2.3:7070".parse().unwrap();
        let at = |asked: &str, advertise: &[&str], reached| {
            let advertise: Vec<String> = advertise.iter().map(|a| a.to_string()).collect();
            join_address(asked, &advertise, listen, reached).unwrap()
        };
        assert_eq!(
            at("weft.example.com:443", &["a.example"], Some(reached)),
            "weft.example.com:443"
        );
        assert_eq!(at("", &["a.example", "b"], Some(reached)), "a.example:7070");
        assert_eq!(at("", &["fd00::1"], Some(reached)), "[fd00::1]:7070");
        assert_eq!(at("", &[], Some(reached)), "10.1.2.3:7070");
        let mapped: SocketAddr = "[::ffff:10.0.0.9]:7070".parse().unwrap();
        assert_eq!(at("", &[], Some(mapped)), "10.0.0.9:7070");
        let err = join_address("not an address", &[], listen, None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("join_address"));
    }
}
