//! The tonic server: services, health, and serve-with-shutdown over the
//! listener the caller already bound.
//!
//! Client authentication is one interceptor per client service (see
//! `crate::auth`). No tower layer wraps the services on purpose: `Connect` and `Watch`
//! streams live for hours, so a timeout or concurrency limit counting
//! in-flight requests would count every connected node and watcher.
//! Deadlines on unary calls are the client's to set. The one layer there
//! is rewrites a status code and counts nothing (see
//! [`too_large_is_resource_exhausted`]).
//!
//! Every service decodes messages up to `--max-message-size` (tonic's
//! default would be 4 MiB whatever the flag says).

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
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
    let max = handle.config.max_message_size;
    let router = Server::builder()
        // Outermost, so it sees every answer: a request past
        // --max-message-size is refused by tonic's decoder as OUT_OF_RANGE
        // before any handler runs; a client acts on "too large" when it is
        // RESOURCE_EXHAUSTED, as a spec too large is.
        .layer(tower::util::MapResponseLayer::new(
            too_large_is_resource_exhausted as fn(_) -> _,
        ))
        .add_service(health)
        // NOT checked by client tokens: nodes authenticate with their
        // certificates (`Connect`) or a join token (`Join`).
        .add_service(
            NodeServiceServer::new(NodeApi {
                handle: handle.clone(),
                tokens: Arc::clone(&tokens),
                identities: Arc::clone(&identities),
                tls: tls.clone(),
            })
            .max_decoding_message_size(max),
        )
        .add_service(InterceptedService::new(
            TaskServiceServer::new(TaskApi {
                handle: handle.clone(),
            })
            .max_decoding_message_size(max),
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            AdminServiceServer::new(AdminApi {
                handle,
                tokens,
                identities,
                tls: tls.clone(),
                listen,
            })
            .max_decoding_message_size(max),
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

/// OUT_OF_RANGE, which tonic answers for a request past its decode limit
/// (and which no Weft handler answers), as RESOURCE_EXHAUSTED; its message
/// (the size found and the limit) is kept. Unary answers carry the status
/// in their headers, which is where tonic puts a refused request's.
fn too_large_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11")
    {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}
