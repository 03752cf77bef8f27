//! The coordinator's HTTP listener (`--http-listen`): the dashboard's
//! pages and JSON API, `/healthz`, and `/metrics` (`read` scope; it renders
//! whatever [`App::metrics`] is given: the metrics registry's text).
//!
//! Connections come through the same accept loop as gRPC's
//! (`crate::listener`: the connection caps, the deadline for the TLS
//! handshake and the first bytes of a request, backoff on accept errors),
//! with its own caps of the same sizes; TLS with the same serving
//! certificate whenever gRPC serves TLS (no client certificate asked for,
//! HTTP/1.1 or HTTP/2 by ALPN). Plaintext only where gRPC may serve it:
//! loopback, or `--insecure`.
//!
//! Every API route calls the gRPC services' own methods (`TaskApi`,
//! `AdminApi`) with the caller's [`Caller`] in the request, so validation,
//! limits (streams per client, page sizes, message sizes) and scopes are
//! those of the gRPC API by construction; this module only authenticates
//! (a bearer token or a session cookie, see [`session`]), checks the CSRF
//! header, and translates to JSON ([`json`]). Nothing here decides about
//! tasks or nodes.
//!
//! Layout: [`api`] (the routes' handlers), [`jobs`] (a job's page and its
//! counts per state), [`events`] (a task's events as Server-Sent Events),
//! [`assets`] (the embedded pages, security headers), [`json`] (the
//! contract's objects), [`series`] (the overview's charts), [`session`]
//! (login sessions); `tests` (the routes over a running driver).

mod api;
mod assets;
mod events;
mod jobs;
pub(crate) mod json;
pub(crate) mod series;
pub(crate) mod session;
#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Caller, Scopes, TokenIndex};
use crate::listener::{Greeting, Limits};
use crate::service::admin::AdminApi;
use crate::service::task::TaskApi;
use crate::tls::ServerTls;

pub(crate) use series::Series;
use session::Sessions;

/// The header every POST must carry (`X-Weft-Csrf: 1`): a page of another
/// origin cannot send it without a CORS preflight, which is never granted.
pub(crate) const CSRF_HEADER: &str = "x-weft-csrf";

/// Largest request body (a login's JSON is what there is).
const MAX_BODY: usize = 64 << 10;

/// How often HTTP/2 connections are PINGed, and how long a PING may go
/// unanswered (as on the gRPC listener).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long open connections get to finish their requests at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What every handler reads: the gRPC services it calls, the tokens and
/// sessions it authenticates with, the overview's samples.
pub(crate) struct App {
    /// The client API, the very instance gRPC serves (its stream places
    /// per client are shared).
    pub tasks: Arc<TaskApi>,
    /// The operator API, the very instance gRPC serves.
    pub admin: Arc<AdminApi>,
    /// The cron schedules' API (stateless: the driver's handle).
    pub schedules: crate::service::schedule::ScheduleApi,
    /// The tokens; `None`: `--no-auth` (every caller is admin).
    pub tokens: Option<Arc<TokenIndex>>,
    /// Login sessions.
    pub sessions: Sessions,
    /// The overview's charts.
    pub series: Arc<Series>,
    /// Served over TLS: the session cookie is `Secure`.
    pub secure: bool,
    /// The session cookie's name ([`session::cookie_name`]): one per port,
    /// since browsers share a host's cookies between its ports.
    pub cookie: String,
    /// Ends event streams at shutdown.
    pub cancel: CancellationToken,
    /// What `GET /metrics` answers (OpenMetrics text), `read` scope;
    /// `None`: 404. The metrics registry's `encode` goes here.
    pub metrics: Option<MetricsText>,
}

/// Renders the metrics as OpenMetrics text, at each scrape.
pub(crate) type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// An answer other than success: `{"error": "..."}` with its status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message }).to_string();
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

/// A request axum's own extractors refused (a path segment that is not
/// UTF-8 once decoded, a body past [`MAX_BODY`]): its status, as JSON.
impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::PathRejection) -> ApiError {
        ApiError::new(rejection.status(), rejection.body_text())
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
        ApiError::new(rejection.status(), rejection.body_text())
    }
}

/// A route's `{id}`, percent-decoded: axum's `Path` with its refusal as
/// an [`ApiError`] (JSON, like every other error).
pub(crate) struct PathId(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<PathId, ApiError> {
        let axum::extract::Path(id) =
            axum::extract::Path::<String>::from_request_parts(parts, state).await?;
        Ok(PathId(id))
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, err.to_string())
    }
}

/// The gRPC services' refusals as HTTP statuses: the message is theirs.
impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> ApiError {
        use tonic::Code;
        let code = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Ok | Code::Unknown | Code::Internal | Code::Unimplemented | Code::DataLoss => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(code, status.message())
    }
}

impl App {
    /// Who makes this request: `Authorization: Bearer TOKEN`, else the
    /// session cookie; the token is checked against the index now, every
    /// time. 401 when neither is there or the token no longer works.
    pub(crate) fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let Some(index) = &self.tokens else {
            return Ok(Caller {
                token_id: None,
                scopes: Scopes::ADMIN,
            });
        };
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(crate::auth::bearer_token)
                .ok_or(AuthError::Invalid)?;
            return Ok(index.authenticate(token, SystemTime::now())?);
        }
        let session = self.session_id(headers).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "not logged in: log in with a client token (the page's login form, or POST /api/login), or send Authorization: Bearer TOKEN",
            )
        })?;
        let token = self.sessions.token(session, Instant::now()).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the session ended (logged out, idle too long, or the coordinator restarted): log in again",
            )
        })?;
        match index.authenticate(&token, SystemTime::now()) {
            Ok(caller) => Ok(caller),
            Err(err) => {
                // The token stopped working: so does every session on it.
                self.sessions.close(session);
                Err(err.into())
            }
        }
    }

    /// The session cookie's value, if the request has one.
    pub(crate) fn session_id<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| session::cookie(v, &self.cookie))
            .filter(|id| !id.is_empty())
    }

    /// The `Set-Cookie` value for session `id` (`None`: clear it).
    pub(crate) fn session_cookie(&self, id: Option<&str>) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        match id {
            Some(id) => format!(
                "{}={id}; HttpOnly; SameSite=Strict; Path=/{secure}",
                self.cookie
            ),
            None => format!(
                "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}",
                self.cookie
            ),
        }
    }
}

/// The caller's request to a gRPC service method: `message`, with the
/// caller in its extensions as the gRPC edge puts it.
pub(crate) fn grpc_request<T>(caller: &Caller, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(caller.clone());
    request
}

/// Every route.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/index.html", get(assets::index))
        .route("/assets/{file}", get(assets::asset))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(api::metrics))
        .route("/api/login", post(api::login))
        .route("/api/logout", post(api::logout))
        .route("/api/me", get(api::me))
        .route("/api/overview", get(api::overview))
        .route("/api/nodes/{id}", get(api::node))
        .route("/api/nodes/{id}/drain", post(api::drain))
        .route("/api/nodes/{id}/revoke", post(api::revoke))
        .route("/api/tasks", get(api::tasks))
        .route("/api/tasks/{id}", get(api::task))
        .route("/api/tasks/{id}/cancel", post(api::cancel))
        .route("/api/tasks/{id}/events", get(events::events))
        .route("/api/jobs/{id}", get(jobs::job))
        .route("/api/jobs/{id}/cancel", post(api::cancel_job))
        .route("/api/limits", get(api::limits))
        .route("/api/schedules", get(api::schedules))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such page or API route") })
        // After every route: it applies to the routes above it.
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("this route does not answer {method}"),
            )
        })
        .layer(axum::middleware::from_fn(csrf))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app),
            host_check,
        ))
        .layer(axum::middleware::map_response(assets::security_headers))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

/// Without tokens (`--no-auth`, loopback only) the dashboard has no login,
/// so a page the browser loads from anywhere could drive it by DNS
/// rebinding: a name of its own that resolves to 127.0.0.1 makes its
/// scripts same-origin with the dashboard. So without tokens only a request
/// naming the dashboard by an IP address or `localhost` is served (421
/// otherwise). With tokens a rebound page has no session, and any name is
/// served.
async fn host_check(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if app.tokens.is_none() {
        let named = request
            .uri()
            .authority()
            .map(|a| a.host().to_owned())
            .or_else(|| {
                let host = request.headers().get(header::HOST)?.to_str().ok()?;
                let authority: axum::http::uri::Authority = host.parse().ok()?;
                Some(authority.host().to_owned())
            });
        if !named.as_deref().is_some_and(local_name) {
            return ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "without tokens (--no-auth) the dashboard answers only to an IP address or localhost (open http://127.0.0.1:PORT/)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// A host as a request names it that cannot be someone else's DNS name.
fn local_name(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost") || bare.parse::<std::net::IpAddr>().is_ok()
}

/// Every POST carries `X-Weft-Csrf: 1`, else 403: a form or a script of
/// another origin cannot add that header (no CORS is ever allowed), so a
/// logged-in browser cannot be made to act for another page.
async fn csrf(request: Request, next: Next) -> Response {
    if request.method() == Method::POST
        && request
            .headers()
            .get(CSRF_HEADER)
            .is_none_or(|value| value.as_bytes() != b"1")
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "missing header X-Weft-Csrf: 1 (every POST needs it; the dashboard's pages send it)",
        )
        .into_response();
    }
    next.run(request).await
}

/// Where the listener of `addr` may serve plaintext: loopback, or with
/// `insecure` (the same rule as the gRPC listener's).
pub(crate) fn check_plaintext(addr: SocketAddr, tls: bool, insecure: bool) -> Result<(), String> {
    if tls || insecure || addr.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "refusing to serve the dashboard in plaintext on {addr}, which is not a loopback address: serve TLS (the default) or pass --insecure, or listen on 127.0.0.1 (--http-listen 127.0.0.1:7080), or turn it off (--http-listen off)"
    ))
}

/// Serves `app` on `listener` until `cancel`: TLS with `tls`'s HTTP
/// acceptor when given, plaintext otherwise; then lets open requests end
/// (event streams end with `cancel`).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    app: Arc<App>,
    limits: Limits,
    max_streams: u32,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let router = router(app);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The first bytes came within the handshake deadline (the
        // listener saw to it); the rest of the headers get as long.
        .header_read_timeout(limits.handshake_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(max_streams)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let builder = Arc::new(builder);
    match tls {
        Some(tls) => {
            let acceptor = tls.http_acceptor();
            let incoming = crate::listener::incoming(
                listener,
                (move |tcp| acceptor.accept(tcp), Greeting::AnyHttp),
                limits,
                cancel.clone(),
                &tasks,
            );
            serve_connections(incoming, router, builder, cancel, tasks).await;
        }
        None => {
            let incoming = crate::listener::incoming(
                listener,
                (|tcp| std::future::ready(Ok(tcp)), Greeting::AnyHttp),
                limits,
                cancel.clone(),
                &tasks,
            );
            serve_connections(incoming, router, builder, cancel, tasks).await;
        }
    }
}

/// Serves each connection `incoming` yields on its own task.
async fn serve_connections<S, IO>(
    incoming: S,
    router: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) where
    S: Stream<Item = io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::pin!(incoming);
    loop {
        let io = tokio::select! {
            _ = cancel.cancelled() => return,
            next = incoming.next() => match next {
                Some(Ok(io)) => io,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let builder = Arc::clone(&builder);
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await {
                        Ok(result) => result,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(err) = result {
                tracing::debug!(error = %err, "an HTTP connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod host_tests {
    use super::local_name;

    #[test]
    fn only_addresses_and_localhost_are_local_names() {
        for host in [
            "127.0.0.1",
            "[::1]",
            "::1",
            "localhost",
            "LOCALHOST",
            "10.0.0.7",
        ] {
            assert!(local_name(host), "{host}");
        }
        for host in [
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "",
        ] {
            assert!(!local_name(host), "{host}");
        }
    }
}
