//! `AdminService`: ListNodes, DrainNode, ClusterInfo, and the token rpcs;
//! join tokens and `RevokeNode` are in `service/node_admin.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};

use weft_proto::convert::{duration_from_pb, duration_to_pb, timestamp};
use weft_proto::pb;

use crate::auth::{self, Scope, Scopes, TokenIndex, TokenKind, TokenRecord};
use crate::driver::{Command, Handle};
use crate::error::Error;
use crate::identity::Identities;
use crate::store::blocking;
use crate::tls::ServerTls;

/// The operator API.
#[derive(Clone)]
pub(crate) struct AdminApi {
    pub handle: Handle,
    /// The tokens the edge checks; the token rpcs write through it.
    pub tokens: Arc<TokenIndex>,
    /// Joined nodes (`RevokeNode` writes through it).
    pub identities: Arc<Identities>,
    /// The cluster CA (its pin goes into join tokens); `None`: plaintext.
    pub tls: Option<Arc<ServerTls>>,
    /// The listen address (its port goes into join tokens).
    pub listen: SocketAddr,
}

/// A token's record as `TokenInfo`.
pub(super) fn token_info(record: &TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: record.id.clone(),
        name: record.name.clone(),
        scopes: record.scopes.names(),
        created: Some(timestamp(record.created)),
        expires: record.expires.map(timestamp),
        revoked: record.revoked.map(timestamp),
        role: match record.kind {
            TokenKind::Client => "client",
            TokenKind::NodeJoin => "node",
            TokenKind::Unknown(_) => "unknown",
        }
        .to_owned(),
        uses: record.uses,
        used: record.used,
    }
}

impl AdminApi {
    /// Stores `record` durably, then makes it the one the edge checks.
    pub(super) async fn put_token(&self, record: TokenRecord) -> Result<(), Status> {
        let stored = record.clone();
        blocking(&self.handle.store, "writing a token", move |store| {
            store.put_token(&stored)
        })
        .await
        .map_err(Error::from)?;
        self.tokens.put(record);
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn set_limit(
        &self,
        request: Request<pb::SetLimitRequest>,
    ) -> Result<Response<pb::SetLimitResponse>, Status> {
        auth::require(&request, Scope::Admin)?;
        let limit = request
            .into_inner()
            .limit
            .ok_or(weft_proto::ConversionError::MissingField("limit"))
            .map_err(Error::from)?;
        let limit = weft_proto::policy::Limit::try_from(limit).map_err(Error::from)?;
        self.handle
            .call(|reply| Command::SetLimit { limit, reply })
            .await??;
        Ok(Response::new(pb::SetLimitResponse {}))
    }

    async fn list_limits(
        &self,
        request: Request<pb::ListLimitsRequest>,
    ) -> Result<Response<pb::ListLimitsResponse>, Status> {
        auth::require(&request, Scope::Read)?;
        let limits = self
            .handle
            .call(|reply| Command::ListLimits { reply })
            .await?;
        Ok(Response::new(pb::ListLimitsResponse {
            limits: limits
                .into_iter()
                .map(|l| pb::LimitInfo {
                    limit: Some(pb::Limit::from(&l.limit)),
                    available: l.available,
                    running: l.running,
                    waiting: l.waiting,
                })
                .collect(),
        }))
    }

    async fn delete_limit(
        &self,
        request: Request<pb::DeleteLimitRequest>,
    ) -> Result<Response<pb::DeleteLimitResponse>, Status> {
        auth::require(&request, Scope::Admin)?;
        let request = request.into_inner();
        weft_proto::policy::check_key("name", &request.name).map_err(Error::from)?;
        let (name, kind) = (request.name, request.kind);
        self.handle
            .call(|reply| Command::DeleteLimit { name, kind, reply })
            .await??;
        Ok(Response::new(pb::DeleteLimitResponse {}))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        auth::require(&request, Scope::Read)?;
        let nodes = self
            .handle
            .call(|reply| Command::ListNodes { reply })
            .await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.into_iter().map(pb::NodeInfo::from).collect(),
        }))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        auth::require(&request, Scope::Admin)?;
        let request = request.into_inner();
        let grace = request
            .grace
            .as_ref()
            .map(|g| duration_from_pb("grace", g))
            .transpose()
            .map_err(Error::from)?;
        let node = request.node;
        let info = self
            .handle
            .call(|reply| Command::DrainNode { node, grace, reply })
            .await??;
        Ok(Response::new(pb::DrainNodeResponse {
            node: Some(pb::NodeInfo::from(info)),
        }))
    }

    async fn cluster_info(
        &self,
        request: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        auth::require(&request, Scope::Read)?;
        let (stats, uptime) = self
            .handle
            .call(|reply| Command::ClusterInfo { reply })
            .await?;
        Ok(Response::new(pb::ClusterInfoResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            nodes: stats.nodes,
            slots: stats.slots,
            slots_free: stats.slots_free,
            tasks: stats
                .tasks
                .into_iter()
                .map(|(state, count)| pb::StateCount {
                    state: i32::from(state),
                    count,
                })
                .collect(),
            uptime: Some(duration_to_pb(uptime)),
            stale_events_refused: stats.stale_events_refused,
            nodes_lost: stats.nodes_lost,
            recovered_attempts: stats.recovered_attempts,
            revoked_node_refusals: stats.revoked_node_refusals + self.identities.refusals(),
            foreign_events_refused: stats.foreign_events_refused,
            attempts_not_started: stats.attempts_not_started,
            reclaimed_attempts: stats.reclaimed_attempts,
            tasks_finished: stats.tasks_finished,
        }))
    }

    async fn revoke_node(
        &self,
        request: Request<pb::RevokeNodeRequest>,
    ) -> Result<Response<pb::RevokeNodeResponse>, Status> {
        auth::require(&request, Scope::Admin)?;
        let node = request.into_inner().node;
        super::node_admin::revoke_node(self, &node)
            .await
            .map(Response::new)
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        auth::require(&request, Scope::Admin)?;
        let reached = request.local_addr();
        let request = request.into_inner();
        match request.role.as_str() {
            "" | "client" => {}
            "node" => {
                return super::node_admin::create_join_token(self, request, reached)
                    .await
                    .map(Response::new);
            }
            other => {
                return Err(Status::invalid_argument(format!(
                    "role: unknown role {} (known: client, node)",
                    crate::error::quoted(other)
                )));
            }
        }
        if request.uses != 0 || !request.join_address.is_empty() {
            return Err(Status::invalid_argument(
                "uses, join_address: only for join tokens (role node)",
            ));
        }
        let scopes = Scopes::parse_list(&request.scopes).map_err(|err| {
            Status::invalid_argument(format!("scopes: {}", crate::error::cut(&err)))
        })?;
        let ttl = request
            .ttl
            .as_ref()
            .map(|t| duration_from_pb("ttl", t))
            .transpose()
            .map_err(Error::from)?;
        if request.name.len() > 256 {
            return Err(Status::invalid_argument("name: longer than 256 bytes"));
        }
        let _writer = self.tokens.write.lock().await;
        let (record, token) = auth::new_token(&request.name, scopes, ttl, SystemTime::now())?;
        let info = token_info(&record);
        self.put_token(record).await?;
        tracing::info!(token_id = %info.id, name = %info.name, scopes = ?info.scopes, "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token,
            info: Some(info),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        auth::require(&request, Scope::Admin)?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: self.tokens.list().iter().map(token_info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        auth::require(&request, Scope::Admin)?;
        let id = request.into_inner().id;
        // To its end whatever the caller does: a revocation stored is also
        // refused by the edge at once, not only after a restart.
        let api = self.clone();
        super::to_completion(async move {
            let _writer = api.tokens.write.lock().await;
            let mut record = api.tokens.get(id.trim()).ok_or_else(|| {
                Status::not_found(format!("no token with id {}", crate::error::quoted(&id)))
            })?;
            if record.revoked.is_none() {
                record.revoked = Some(SystemTime::now());
                api.put_token(record.clone()).await?;
                tracing::info!(token_id = %record.id, "token revoked");
            }
            Ok(Response::new(pb::RevokeTokenResponse {
                info: Some(token_info(&record)),
            }))
        })
        .await
    }
}
