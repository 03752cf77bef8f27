//! The tonic server: services, health, and serve-with-shutdown over the
//! listener the caller already bound.
//!
//! Client authentication is one interceptor per client service (see
//! `crate::auth`). No tower layer wraps the services on purpose: `Connect` and `Watch`
//! streams live for hours, so a timeout or concurrency limit counting
//! in-flight requests would count every connected node and watcher.
//! Deadlines on unary calls are the client's to set. The one layer there
//! is rewrites a status code and counts nothing (see [`client_codes`]).
//!
//! Every service decodes messages up to `--max-message-size` (tonic's
//! default would be 4 MiB whatever the flag says). Connections reach tonic
//! through `crate::listener` (caps, handshake deadline); streams per
//! connection are capped here (`--max-streams-per-connection`).

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use weft_proto::pb::admin_service_server::AdminServiceServer;
use weft_proto::pb::schedule_service_server::ScheduleServiceServer;
use weft_proto::pb::task_service_server::TaskServiceServer;
use weft_proto::wire::node_service::node_service_server::NodeServiceServer;

use std::sync::Arc;

use crate::auth::{Authenticator, TokenIndex};
use crate::driver::Handle;
use crate::identity::Identities;
use crate::listener::Limits;
use crate::service::admin::AdminApi;
use crate::service::node::NodeApi;
use crate::service::schedule::ScheduleApi;
use crate::service::task::TaskApi;
use crate::tls::ServerTls;

/// How often the coordinator PINGs each connection.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a PING may go unanswered before its connection is closed.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Marks every service serving in `grpc.health.v1`; called once the store
/// is open and the driver runs.
pub(crate) async fn mark_serving(reporter: &HealthReporter) {
    reporter.set_serving::<NodeServiceServer<NodeApi>>().await;
    reporter.set_serving::<TaskServiceServer<TaskApi>>().await;
    reporter.set_serving::<AdminServiceServer<AdminApi>>().await;
    reporter
        .set_serving::<ScheduleServiceServer<ScheduleApi>>()
        .await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
}

/// Serves until `cancel` fires, then stops accepting and lets open streams
/// end: over TLS when `tls` is given (handshakes done by the listener with
/// [`ServerTls::acceptor`], so tonic sees finished TLS streams and
/// `Request::peer_certs()` works), plaintext otherwise.
pub(crate) async fn serve(
    (listener, tls, tasks): (TcpListener, Option<Arc<ServerTls>>, &TaskTracker),
    handle: Handle,
    (tokens, identities): (Arc<TokenIndex>, Arc<Identities>),
    (task_api, admin_api): (Arc<TaskApi>, Arc<AdminApi>),
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
    let config = Arc::clone(&handle.config);
    let max = config.max_message_size;
    // gRPC server reflection (v1, and v1alpha for older tools), so grpcurl
    // and the like list and call the API without the .proto files. It
    // answers with the API's schema only, yet behind a client token like
    // the API itself (any valid token; none with --no-auth).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(weft_proto::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the descriptor set compiled into weft-proto decodes");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the descriptor set compiled into weft-proto decodes");
    let router = Server::builder()
        // Set, because tonic's default is no limit at all (hyper's 200
        // applies only when nothing is set, and tonic always sets it): a
        // peer may not open streams without end on one connection. A
        // client past it waits for a stream to end (HTTP/2 clients queue).
        .max_concurrent_streams(config.max_streams_per_connection)
        // Room for bursts of small node messages: see CONNECTION_WINDOW.
        .initial_connection_window_size(crate::service::node::CONNECTION_WINDOW)
        // A peer that went away without closing (a cut cable, a host that
        // died) answers no PING: its connection is closed instead of being
        // held, and counted against the caps, for good. Live peers answer
        // in their HTTP/2 layer, idle or not.
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        // Outermost, so it sees every answer: a request past
        // --max-message-size is refused by tonic's decoder as OUT_OF_RANGE,
        // and bytes that are not the message as INTERNAL, before any
        // handler runs; a client acts on RESOURCE_EXHAUSTED ("too large",
        // as a spec too large is) and INVALID_ARGUMENT (malformed).
        .layer(tower::util::MapResponseLayer::new(
            client_codes as fn(_) -> _,
        ))
        .add_service(health)
        .add_service(InterceptedService::new(
            reflection_v1,
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            reflection_v1alpha,
            authenticator.clone(),
        ))
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
        // The same instances the HTTP listener calls (`crate::http`), so
        // both share their state (the stream places per client).
        .add_service(InterceptedService::new(
            TaskServiceServer::from_arc(task_api).max_decoding_message_size(max),
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            ScheduleServiceServer::new(ScheduleApi {
                handle: handle.clone(),
            })
            .max_decoding_message_size(max),
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            AdminServiceServer::from_arc(admin_api).max_decoding_message_size(max),
            authenticator,
        ));
    // Both paths share the one accept loop (caps, the handshake and
    // preface deadline, backoff on accept errors): see `crate::listener`.
    let limits = Limits::of(&config);
    match tls.as_deref() {
        Some(tls) => {
            let acceptor = tls.acceptor();
            let incoming = crate::listener::incoming(
                listener,
                (
                    move |tcp| acceptor.accept(tcp),
                    crate::listener::Greeting::Http2Preface,
                ),
                limits,
                cancel.clone(),
                tasks,
            );
            router
                .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
                .await
        }
        None => {
            let incoming = crate::listener::incoming(
                listener,
                (
                    |tcp| std::future::ready(Ok(tcp)),
                    crate::listener::Greeting::Http2Preface,
                ),
                limits,
                cancel.clone(),
                tasks,
            );
            router
                .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
                .await
        }
    }
}

/// Rewrites the codes tonic's decoder answers for a request it refused
/// (no Weft handler answers either): OUT_OF_RANGE (past the decode limit)
/// becomes RESOURCE_EXHAUSTED, and INTERNAL for bytes that do not decode
/// as the message becomes INVALID_ARGUMENT. The message (the size found
/// and the limit; what did not decode) is kept; to a request too large it
/// adds that the limit is `--max-message-size`, so every too-large answer
/// names the flag, as a spec too large does. Unary answers carry the
/// status in their headers, which is where tonic puts a refused request's.
fn client_codes<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let code = match headers.get("grpc-status").map(|code| code.as_bytes()) {
        Some(b"11") => {
            if let Some(status) = tonic::Status::from_header_map(headers)
                && status
                    .message()
                    .starts_with("Error, decoded message length too large")
            {
                let named = tonic::Status::resource_exhausted(format!(
                    "{} (the coordinator's --max-message-size)",
                    status.message()
                ));
                // Writes grpc-status and grpc-message only; a message of
                // tonic's and ours is a valid header value.
                if named.add_header(headers).is_ok() {
                    return response;
                }
            }
            "8"
        }
        Some(b"13")
            if headers.get("grpc-message").is_some_and(|message| {
                message
                    .as_bytes()
                    .starts_with(b"failed%20to%20decode%20Protobuf%20message")
            }) =>
        {
            "3"
        }
        _ => return response,
    };
    headers.insert("grpc-status", http::HeaderValue::from_static(code));
    response
}

#[cfg(test)]
mod tests {
    use tonic::{Code, Status};

    use super::client_codes;

    fn rewritten(status: Status) -> (Code, String) {
        let response = client_codes(status.into_http::<()>());
        let status = Status::from_header_map(response.headers()).expect("a status");
        (status.code(), status.message().to_owned())
    }

    #[test]
    fn decoder_refusals_answer_codes_a_client_acts_on() {
        let too_large =
            "Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes";
        assert_eq!(
            rewritten(Status::out_of_range(too_large)),
            (
                Code::ResourceExhausted,
                format!("{too_large} (the coordinator's --max-message-size)")
            )
        );
        let garbage = "failed to decode Protobuf message: invalid wire type value: 7";
        assert_eq!(
            rewritten(Status::internal(garbage)),
            (Code::InvalidArgument, garbage.to_owned())
        );
        // Anything else passes as it is.
        let store = "internal coordinator error";
        assert_eq!(
            rewritten(Status::internal(store)),
            (Code::Internal, store.to_owned())
        );
        assert_eq!(rewritten(Status::not_found("x")).0, Code::NotFound);
    }
}
