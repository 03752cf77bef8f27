//! `AdminService`: ListNodes, DrainNode, ClusterInfo.

use tonic::{Request, Response, Status};

use weft_proto::convert::{duration_from_pb, duration_to_pb};
use weft_proto::pb;

use crate::driver::{Command, Handle};
use crate::error::Error;

/// The operator API.
pub(crate) struct AdminApi {
    pub handle: Handle,
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
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
        _request: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
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
        }))
    }
}
