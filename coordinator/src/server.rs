//! The tonic server: services, health, and serve-with-shutdown over the
//! listener the caller already bound.
//!
//! Client authentication is one interceptor per client service (see
//! `crate::auth`). No tower layer wraps the services on purpose: `Connect` and `Watch`
//! streams live for hours, so a timeout or concurrency limit counting
//! in-flight requests would count every connected node and watcher.
//! Deadlines on unary calls are the client's to set.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use weft_proto::pb::admin_service_server::AdminServiceServer;
use weft_proto::pb::node_service_server::NodeServiceServer;
use weft_proto::pb::task_service_server::TaskServiceServer;

use std::sync::Arc;

use crate::auth::{Authenticator, TokenIndex};
use crate::driver::Handle;
use crate::identity::Identities;
use crate::service::admin::AdminApi;
use crate::service::node::NodeApi;
use crate::service::task::TaskApi;
use crate::tls::ServerTls;

/// Marks every service serving in `grpc.health.v1`; called once the store
/// is open and the driver runs.
pub(crate) async fn mark_serving(reporter: &HealthReporter) {
    reporter.set_serving::<NodeServiceServer<NodeApi>>().await;
    reporter.set_serving::<TaskServiceServer<TaskApi>>().await;
    reporter.set_serving::<AdminServiceServer<AdminApi>>().await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
}

/// Serves until `cancel` fires, then stops accepting and lets open streams
/// end: over TLS when `tls` is given (handshakes done by
/// [`ServerTls::incoming`], so tonic sees finished TLS streams and
/// `Request::peer_certs()` works), plaintext otherwise.
pub(crate) async fn serve(
    (listener, listen, tls, tasks): (
        TcpListener,
        std::net::SocketAddr,
        Option<Arc<ServerTls>>,
        &TaskTracker,
    ),
    handle: Handle,
    (tokens, identities): (Arc<TokenIndex>, Arc<Identities>),
    auth: bool,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    // The edge for clients: every TaskService and AdminService call passes
    // the Authenticator, which puts the caller's token scopes into the
    // request; each method then requires its one scope. Health stays open.
    let authenticator = Authenticator {
        index: auth.then(|| Arc::clone(&tokens)),
    };
    let router = Server::builder()
        .add_service(health)
        // NOT checked by client tokens: nodes authenticate with their
        // certificates (`Connect`) or a join token (`Join`).
        .add_service(NodeServiceServer::new(NodeApi {
            handle: handle.clone(),
            tokens: Arc::clone(&tokens),
            identities: Arc::clone(&identities),
            tls: tls.clone(),
        }))
        .add_service(TaskServiceServer::with_interceptor(
            TaskApi {
                handle: handle.clone(),
            },
            authenticator.clone(),
        ))
        .add_service(AdminServiceServer::with_interceptor(
            AdminApi {
                handle,
                tokens,
                identities,
                tls: tls.clone(),
                listen,
            },
            authenticator,
        ));
    match tls.as_deref() {
        Some(tls) => {
            let incoming = tls.incoming(listener, cancel.clone(), tasks);
            router
                .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
                .await
        }
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
                .await
        }
    }
}
