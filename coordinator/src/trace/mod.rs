//! OpenTelemetry trace export (`--otlp-endpoint`): one trace per task,
//! sent over OTLP/gRPC to a collector.
//!
//! Off by default, and then it costs nothing per task: no [`Export`]
//! exists, the driver and services skip their one `if let`, and a client's
//! trace context still travels to the node unchanged (the user's own spans
//! still join the client's trace).
//!
//! On, the driver moves each committed batch's records to the trace task
//! (one channel send per batch, no per-task work on its thread); the
//! services send each Submit's timing. The trace task turns them into
//! spans with explicit start and end times ([`follow`]) and hands them to
//! the SDK's batch processor, which exports them from a thread of its own.
//! When the trace task falls behind, batches are dropped (and said so in a
//! rate-limited warning), never the coordinator slowed.
//!
//! Layout:
//! - `ids` — trace and span ids derived from the task id (a restart names
//!   the same spans again).
//! - `follow` — committed records in, finished spans out; no I/O.
//! - this file — the config, the exporter, the trace task, and what the
//!   node codec asks: the trace context an attempt runs under.

mod follow;
mod ids;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanProcessor};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use weft_proto::{Attempt, TaskId, TraceContext};

pub(crate) use follow::CommittedBatch;
use follow::Follower;
use ids::{SpanOf, span_id};

/// Where and as what the coordinator exports its traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, `http://HOST:4317`.
    pub endpoint: String,
    /// `service.name` of the exported spans (`OTEL_SERVICE_NAME`).
    pub service_name: String,
}

/// Default `service.name`.
pub const DEFAULT_SERVICE_NAME: &str = "weft-coordinator";

/// Committed batches and Submit timings waiting for the trace task.
const QUEUE: usize = 4096;

/// Checks an `--otlp-endpoint`: an `http://HOST:PORT` URL. Plaintext
/// only: spans go to a collector (or agent) next to the coordinator, which
/// forwards them on; there are no collector trust roots to configure here.
pub fn parse_endpoint(text: &str) -> Result<String, String> {
    let uri: http::Uri = text
        .parse()
        .map_err(|err| format!("{text:?} is not a URL: {err}"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(text.to_owned()),
        Some("https") => Err(format!(
            "{text:?}: https is not supported; export to a collector or agent on this host or network over http://HOST:4317"
        )),
        _ => Err(format!(
            "{text:?}: give the collector's OTLP/gRPC URL, http://HOST:4317"
        )),
    }
}

/// The trace a task's spans are in, and its root span's parent: the
/// client's context when it sent one, else a trace derived from the id.
fn trace_of(id: TaskId, ctx: Option<&TraceContext>) -> ([u8; 16], Option<[u8; 8]>) {
    match ctx {
        Some(ctx) => (ctx.trace_id, Some(ctx.parent_id)),
        None => (ids::trace_id(id), None),
    }
}

/// The trace context attempt `attempt` of task `id` runs under (what its
/// Assign carries). With export on (`exporting`), the attempt's own span
/// is the parent, in the client's trace or the task's own; off, the
/// client's context unchanged (or none).
pub(crate) fn attempt_context(
    id: TaskId,
    attempt: Attempt,
    spec: Option<&TraceContext>,
    exporting: bool,
) -> Option<TraceContext> {
    if !exporting {
        return spec.cloned();
    }
    let parent = span_id(id, SpanOf::Attempt(attempt));
    match spec {
        Some(ctx) if !ctx.sampled() => Some(ctx.clone()),
        Some(ctx) => Some(ctx.with_parent(parent)),
        None => Some(TraceContext::new(ids::trace_id(id), parent)),
    }
}

/// What the trace task receives.
enum Message {
    Committed(CommittedBatch),
    Submitted {
        tasks: Vec<(TaskId, Option<TraceContext>)>,
        received: SystemTime,
        acked: SystemTime,
    },
}

/// The handle the driver and services send to; cheap to clone.
#[derive(Clone)]
pub(crate) struct Export {
    tx: mpsc::Sender<Message>,
    dropped: Arc<Dropped>,
}

/// Batches dropped because the trace task fell behind, and when that was
/// last said (seconds since the epoch).
#[derive(Default)]
struct Dropped {
    count: AtomicU64,
    warned_at: AtomicU64,
}

impl Export {
    /// Starts the exporter and the trace task (on `tasks`; it flushes and
    /// stops when `cancel` fires). Must run inside the tokio runtime: the
    /// gRPC channel to the collector lives on it.
    pub fn start(
        config: &OtlpConfig,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Export, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|err| format!("OTLP exporter to {}: {err}", config.endpoint))?;
        let mut batch = BatchConfigBuilder::default();
        // Unless the operator set them (OTEL_BSP_*): a deeper queue than
        // the SDK's 2048 (a burst of tasks ends thousands of spans at
        // once) and a shorter delay, so spans show up while one watches.
        if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
            batch = batch.with_max_queue_size(1 << 16);
        }
        if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
            batch = batch.with_scheduled_delay(Duration::from_millis(500));
        }
        let mut processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch.build())
            .build();
        processor.set_resource(
            &Resource::builder_empty()
                .with_service_name(config.service_name.clone())
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        let (tx, rx) = mpsc::channel(QUEUE);
        tasks.spawn(run(rx, processor, cancel));
        tracing::info!(endpoint = %config.endpoint, service_name = %config.service_name, "exporting traces (OTLP/gRPC)");
        Ok(Export {
            tx,
            dropped: Arc::default(),
        })
    }

    /// A batch whose commit returned (the driver's one call per batch).
    pub fn committed(&self, batch: CommittedBatch) {
        self.send(Message::Committed(batch));
    }

    /// One Submit's tasks, received at `received`, acknowledged now.
    pub fn submitted(&self, tasks: Vec<(TaskId, Option<TraceContext>)>, received: SystemTime) {
        self.send(Message::Submitted {
            tasks,
            received,
            acked: SystemTime::now(),
        });
    }

    fn send(&self, message: Message) {
        if self.tx.try_send(message).is_ok() {
            return;
        }
        let dropped = self.dropped.count.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let last = self.dropped.warned_at.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .dropped
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped,
                "trace export falls behind: spans of some tasks were dropped"
            );
        }
    }
}

/// The trace task: builds spans from what arrives and hands them to the
/// batch processor; on cancel, takes what still arrives (briefly), then
/// flushes.
async fn run(
    mut rx: mpsc::Receiver<Message>,
    processor: BatchSpanProcessor,
    cancel: CancellationToken,
) {
    let mut follower = Follower::default();
    let mut spans: Vec<SpanData> = Vec::new();
    let mut stopping = false;
    loop {
        let message = if stopping {
            // The driver's last commit is released just after the cancel:
            // take what comes soon after, then stop.
            tokio::time::timeout(Duration::from_millis(500), rx.recv())
                .await
                .ok()
                .flatten()
        } else {
            tokio::select! {
                message = rx.recv() => message,
                () = cancel.cancelled() => {
                    stopping = true;
                    continue;
                }
            }
        };
        let Some(message) = message else { break };
        handle(&mut follower, message, &mut spans);
        for span in spans.drain(..) {
            processor.on_end(span);
        }
    }
    // The processor's shutdown blocks until its last export returned.
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(err) = processor.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(error = %err, "flushing the last spans failed");
        }
    })
    .await;
}

fn handle(follower: &mut Follower, message: Message, spans: &mut Vec<SpanData>) {
    match message {
        Message::Committed(batch) => follower.commit(batch, spans),
        Message::Submitted {
            tasks,
            received,
            acked,
        } => follower.submitted(&tasks, received, acked, spans),
    }
}

#[cfg(test)]
mod tests;
