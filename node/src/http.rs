//! The node's own HTTP listener (`--http-listen`, off by default): only
//! `/metrics` (OpenMetrics text, see `metrics.rs`) and `/healthz`, over
//! plaintext HTTP/1.1.
//!
//! There is no token check: the node keeps no token database (clients'
//! tokens live in the coordinator's store), so it cannot tell a
//! Prometheus server from anyone else. That is why the binary serves it on
//! a loopback address unless `--http-listen-any` says otherwise, and why
//! nothing here reveals more than counts (no task ids, inputs or names
//! beyond the version).
//!
//! Serves until the node is killed or its drain is done; a scrape reads
//! what the node keeps as it is (slots under their lock, briefly).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::warn;

use crate::metrics::Snapshot;
use crate::session::NodeCtx;

/// What Prometheus asks for and gets: OpenMetrics text.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics` and `/healthz` on `listener`, on the node's task
/// tracker, until it is killed or drained.
pub(crate) fn spawn(ctx: Arc<NodeCtx>, listener: TcpListener) {
    let kill = ctx.kill.clone();
    let done = ctx.drain.done().clone();
    let tasks = ctx.tasks.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(ctx);
    tasks.spawn(async move {
        let stop = async move {
            tokio::select! {
                () = kill.cancelled() => {}
                () = done.cancelled() => {}
            }
        };
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            warn!(%error, "the node's HTTP listener stopped");
        }
    });
}

/// `GET /metrics`.
async fn metrics(State(ctx): State<Arc<NodeCtx>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], scrape(&ctx))
}

/// `GET /healthz`: the node's process answers (whether it is connected
/// is `weft_node_connected` in `/metrics`).
async fn healthz() -> &'static str {
    "ok\n"
}

/// The metrics text with what the node keeps read now.
fn scrape(ctx: &NodeCtx) -> String {
    let (slots_used, running, queued, draining) = ctx.executor.gauges();
    ctx.metrics.encode(&Snapshot {
        slots: ctx.config.slots,
        slots_used,
        prefetch: ctx.config.prefetch,
        running,
        queued,
        connected: ctx.node_id.borrow().is_some(),
        draining,
        unsent: ctx.outbox.unsent_len(),
    })
}
