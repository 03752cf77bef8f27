//! An in-process OTLP/gRPC trace receiver (the collector's `TraceService`)
//! on loopback, for tests that point a coordinator's `--otlp-endpoint` at it
//! and assert the spans it exported.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::wait::{default_timeout, wait_for};

/// One span as the receiver got it, ids in lowercase hex.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; empty for a root span.
    pub parent_span_id: String,
    /// The span's name.
    pub name: String,
    /// Attributes, each value as text.
    pub attributes: BTreeMap<String, String>,
    /// Start, nanoseconds since the epoch.
    pub start: u64,
    /// End, nanoseconds since the epoch.
    pub end: u64,
    /// The resource's `service.name`.
    pub service_name: String,
}

impl ReceivedSpan {
    /// The attribute `key` as text, if set.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    stop: CancellationToken,
}

impl OtlpReceiver {
    /// Starts a receiver on a free loopback port.
    pub async fn start() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the OTLP receiver");
        let addr = listener.local_addr().expect("receiver address");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let service = TraceServiceServer::new(Collector {
            spans: Arc::clone(&spans),
        });
        let until = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    until,
                )
                .await;
        });
        OtlpReceiver { addr, spans, stop }
    }

    /// What `--otlp-endpoint` takes: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many spans arrived so far.
    pub fn count(&self) -> usize {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first span for which `matches` holds, once one arrived.
    pub async fn wait_for_span(&self, matches: impl Fn(&ReceivedSpan) -> bool) -> ReceivedSpan {
        let found = wait_for(default_timeout(), || {
            let found = self.spans().into_iter().find(|s| matches(s));
            async move { found }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no such span; received: {:#?}", self.spans()))
    }

    /// The spans of trace `trace_id` once `done` holds for them; panics
    /// with what arrived after the default timeout.
    pub async fn wait_for_trace(
        &self,
        trace_id: &str,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let found = wait_for(default_timeout(), || {
            let spans: Vec<ReceivedSpan> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            let ready = done(&spans);
            async move { ready.then_some(spans) }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "trace {trace_id}: spans still incomplete; received: {:#?}",
                self.spans()
            )
        })
    }

    /// The spans of task `task_id` (its root `task` span, which names it in
    /// `weft.task.id`, and the spans under it), once that root and the `submit` span arrived (the
    /// root is made after every other span of the coordinator's but
    /// `submit`, which the Submit's service sends on its own).
    pub async fn wait_for_task(&self, task_id: &str) -> Vec<ReceivedSpan> {
        let found = wait_for(default_timeout(), || {
            let spans = self.spans();
            let found = spans
                .iter()
                .find(|s| s.name == "task" && s.attr("weft.task.id") == Some(task_id))
                .and_then(|root| {
                    // The root, its children, and theirs (`commit`): a
                    // client's trace may hold other tasks too.
                    let mut of_task = vec![root.clone()];
                    for _ in 0..2 {
                        let parents: Vec<String> =
                            of_task.iter().map(|s| s.span_id.clone()).collect();
                        of_task = spans
                            .iter()
                            .filter(|s| {
                                s.trace_id == root.trace_id
                                    && (s.span_id == root.span_id
                                        || parents.contains(&s.parent_span_id))
                            })
                            .cloned()
                            .collect();
                    }
                    of_task
                        .iter()
                        .any(|s| s.name == "submit" && s.attr("weft.task.id") == Some(task_id))
                        .then_some(of_task)
                });
            async move { found }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no complete trace for task {task_id}; received: {:#?}",
                self.spans()
            )
        })
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = Vec::new();
        for resource in request.into_inner().resource_spans {
            let service_name = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    got.push(ReceivedSpan {
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                                )
                            })
                            .collect(),
                        start: span.start_time_unix_nano,
                        end: span.end_time_unix_nano,
                        service_name: service_name.clone(),
                    });
                }
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(got);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
