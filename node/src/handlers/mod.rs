//! The [`HandlerRegistry`]: call handlers by name, each a `tower::Service`
//! from a [`HandlerRequest`] to the task's output bytes.
//!
//! Because handlers are services, timeouts, concurrency limits and tracing
//! are tower layers (`register_service`). Two helpers cover the common kinds:
//! `register_async` (I/O-bound: polled in its attempt's task, then a tokio
//! task of its own if it waits) and `register_blocking`
//! (CPU-bound or blocking code: `spawn_blocking` on a pool bounded by the
//! node's `blocking_threads`). Built-ins live in [`builtin`].
//! This module runs handlers; it does not know about attempts, slots or
//! timeouts (`slots.rs`, `attempt.rs` and the executor do).

pub mod builtin;

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceExt};

use weft_proto::{Attempt, SecretEnv, TaskId, TraceContext};

use crate::config::cpu_count;
use crate::events::Emitter;

/// A registered handler: a cloneable, boxed tower service.
pub type HandlerService = BoxCloneSyncService<HandlerRequest, Bytes, HandlerError>;

/// One call of a handler.
#[derive(Clone, Debug)]
pub struct HandlerRequest {
    /// The task being run.
    pub task_id: TaskId,
    /// Its attempt.
    pub attempt: Attempt,
    /// The task's input bytes.
    pub input: Bytes,
    /// The task's secret environment (`--secret-env`): for this handler to
    /// read, never to log or return. Its `Debug` shows the names only.
    pub secret_env: SecretEnv,
    /// The W3C trace context the attempt runs under (`Assignment.trace`):
    /// a handler's own spans made with it as their parent join the task's
    /// trace. `None`: the task has no trace.
    pub trace: Option<TraceContext>,
    /// Cancelled when the attempt is cancelled, times out or the node stops.
    /// Async handlers are also dropped then; blocking ones must check it.
    pub cancel: CancellationToken,
    /// Streams output chunks and progress to whoever watches the task.
    pub emit: Emitter,
    /// The results of the tasks this one runs after (`TaskSpec.after`),
    /// in the order the spec names them; empty for most tasks.
    pub parents: Arc<[ParentResult]>,
}

/// One parent's result, given to a task that runs after it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentResult {
    /// The parent.
    pub task_id: TaskId,
    /// Its ref in its Submit ("" when it had none).
    pub ref_name: String,
    /// How it ended (or, under ANY_FAILED/ANY_SUCCEEDED, where it stands).
    pub state: weft_proto::TaskState,
    /// Its output: a call's return value, an exec task's `$WEFT_OUTPUT`.
    pub output: Bytes,
}

impl HandlerRequest {
    /// A request for calling a handler directly (tests, benchmarks): fresh
    /// ids, a token nobody cancels, events that go nowhere.
    pub fn detached(input: impl Into<Bytes>) -> Self {
        let task_id = TaskId::new();
        HandlerRequest {
            task_id,
            attempt: Attempt::FIRST,
            input: input.into(),
            secret_env: SecretEnv::new(),
            trace: None,
            cancel: CancellationToken::new(),
            emit: Emitter::detached(task_id, Attempt::FIRST),
            parents: Arc::from([]),
        }
    }
}

/// Why a handler failed. The attempt is reported FAILED with this text as
/// its error (and retried under the task's `max_attempts`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The handler failed, in its own words.
    #[error("{0}")]
    Failed(String),
    /// The input was not what the handler accepts.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The handler stopped because its request was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The handler panicked.
    #[error("handler panicked: {0}")]
    Panicked(String),
}

impl HandlerError {
    /// A failure with `message`.
    pub fn failed(message: impl Into<String>) -> Self {
        HandlerError::Failed(message.into())
    }

    /// Bad input, described by `message`.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        HandlerError::InvalidInput(message.into())
    }

    /// Any service error: a `HandlerError` stays itself, anything else (a
    /// tower timeout, say) becomes `Failed` with its text.
    pub fn from_service_error(err: impl Into<BoxError>) -> Self {
        match err.into().downcast::<HandlerError>() {
            Ok(err) => *err,
            Err(other) => HandlerError::Failed(other.to_string()),
        }
    }
}

/// Handlers by name.
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    handlers: BTreeMap<String, HandlerService>,
    pool: BlockingPool,
}

impl fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerRegistry")
            .field("handlers", &self.names())
            .finish()
    }
}

impl HandlerRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers any tower service under `name` (replacing one of the same
    /// name), so timeouts and limits can be layers.
    pub fn register_service<S>(&mut self, name: impl Into<String>, service: S) -> &mut Self
    where
        S: Service<HandlerRequest, Response = Bytes> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        let service = service.map_err(HandlerError::from_service_error);
        self.handlers
            .insert(name.into(), BoxCloneSyncService::new(service));
        self
    }

    /// Registers an async (I/O-bound) handler. Each call is polled first
    /// in its attempt's own task: a call done at once (most are) costs no
    /// task of its own to spawn, schedule and join. A call that waits goes
    /// on as a tokio task of its own, aborted when the attempt is
    /// cancelled, so the attempt's timeout, cancel and drain act on time
    /// while it runs, even if it later holds its thread without yielding.
    /// (Code that blocks belongs in
    /// [`register_blocking`](Self::register_blocking); a call that blocks
    /// before its first wait holds its attempt until it returns, and is
    /// then reported timed out if its timeout passed.) A panic fails the
    /// call either way.
    pub fn register_async<F, Fut>(&mut self, name: impl Into<String>, handler: F) -> &mut Self
    where
        F: Fn(HandlerRequest) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
    {
        let service =
            tower::service_fn(move |request: HandlerRequest| run_async_call(handler(request)));
        self.register_service(name, service)
    }

    /// Registers a blocking (CPU-bound) handler: each call runs on a
    /// blocking thread, at most `blocking_threads` at once across all
    /// blocking handlers. A cancelled call stops waiting at once, but the
    /// thread runs until the handler returns, so it should check
    /// `request.cancel`.
    pub fn register_blocking<F>(&mut self, name: impl Into<String>, handler: F) -> &mut Self
    where
        F: Fn(HandlerRequest) -> Result<Bytes, HandlerError> + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        let pool = self.pool.clone();
        let service = tower::service_fn(move |request: HandlerRequest| {
            let handler = handler.clone();
            let permits = pool.permits();
            async move {
                let cancel = request.cancel.clone();
                let permit = tokio::select! {
                    permit = permits.acquire_owned() => permit
                        .map_err(|_| HandlerError::failed("blocking handler pool is closed"))?,
                    () = cancel.cancelled() => return Err(HandlerError::Cancelled),
                };
                let task = AbortOnDrop(tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    handler(request)
                }));
                task.join().await
            }
        });
        self.register_service(name, service)
    }

    /// The service registered as `name`.
    pub fn get(&self, name: &str) -> Option<HandlerService> {
        self.handlers.get(name).cloned()
    }

    /// Registered handler names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }

    /// Sizes the blocking pool (at least 1 thread). `start` sets it from
    /// `NodeConfig::blocking_threads`.
    pub fn set_blocking_threads(&mut self, threads: usize) -> &mut Self {
        self.pool.resize(threads);
        self
    }
}

/// The semaphore bounding blocking handlers. Shared by every blocking
/// service of a registry and resizable until the node starts, because
/// handlers are registered before the config is known.
#[derive(Clone)]
struct BlockingPool(Arc<RwLock<Arc<Semaphore>>>);

impl Default for BlockingPool {
    fn default() -> Self {
        BlockingPool(Arc::new(RwLock::new(Arc::new(Semaphore::new(cpu_count())))))
    }
}

impl BlockingPool {
    fn resize(&self, threads: usize) {
        let mut slot = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = Arc::new(Semaphore::new(threads.max(1)));
    }

    fn permits(&self) -> Arc<Semaphore> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Runs an async handler's call: its first poll here, then, if it is not
/// done, the rest as a task of its own (see
/// [`HandlerRegistry::register_async`]).
async fn run_async_call<Fut>(call: Fut) -> Result<Bytes, HandlerError>
where
    Fut: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
{
    // Boxed, so that once polled here it can still move into a task.
    let mut call = Box::pin(call);
    let first = std::future::poll_fn(|cx| {
        // Unwind safety: a call that panicked is dropped at once, and
        // nothing it borrowed is used again.
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call.as_mut().poll(cx)));
        std::task::Poll::Ready(match polled {
            Ok(std::task::Poll::Ready(done)) => Some(done),
            Ok(std::task::Poll::Pending) => None,
            Err(payload) => Some(Err(HandlerError::Panicked(panic_message(payload)))),
        })
    })
    .await;
    match first {
        Some(done) => done,
        None => AbortOnDrop(tokio::spawn(call)).join().await,
    }
}

/// Aborts the task when dropped, so a dropped handler call (cancelled
/// attempt) does not leave its task running.
struct AbortOnDrop<T>(JoinHandle<Result<T, HandlerError>>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, HandlerError> {
        match (&mut self.0).await {
            Ok(result) => result,
            Err(err) => Err(join_error(err)),
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn join_error(err: JoinError) -> HandlerError {
    if err.is_panic() {
        HandlerError::Panicked(panic_message(err.into_panic()))
    } else {
        HandlerError::Cancelled
    }
}

pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "panic with a non-text payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    async fn call(
        registry: &HandlerRegistry,
        name: &str,
        input: &str,
    ) -> Result<Bytes, HandlerError> {
        let service = registry.get(name).expect("handler registered by the test");
        service
            .oneshot(HandlerRequest::detached(input.to_owned()))
            .await
    }

    #[test]
    fn builtins_are_registered_by_name() {
        let registry = HandlerRegistry::with_builtins();
        assert_eq!(
            registry.names(),
            ["echo", "fail", "noop", "sha256", "sleep", "spin"]
        );
        assert!(registry.get("nope").is_none());
    }

    #[tokio::test]
    async fn async_handler_result_comes_back() {
        let mut registry = HandlerRegistry::new();
        registry.register_async("upper", |req: HandlerRequest| async move {
            Ok(Bytes::from(req.input.to_ascii_uppercase()))
        });
        assert_eq!(call(&registry, "upper", "abc").await.unwrap(), "ABC");
    }

    #[tokio::test]
    async fn panicking_handler_is_a_handler_error() {
        let mut registry = HandlerRegistry::new();
        registry.register_async("boom", |_req: HandlerRequest| async move {
            if true {
                panic!("boom went the handler");
            }
            Ok(Bytes::new())
        });
        registry.register_blocking("boom-blocking", |_req| panic!("blocking boom"));
        let err = call(&registry, "boom", "").await.unwrap_err();
        assert_eq!(err, HandlerError::Panicked("boom went the handler".into()));
        let err = call(&registry, "boom-blocking", "").await.unwrap_err();
        assert_eq!(err, HandlerError::Panicked("blocking boom".into()));
    }

    #[tokio::test]
    async fn service_errors_become_handler_errors_so_timeouts_are_layers() {
        let mut registry = HandlerRegistry::new();
        let slow = tower::service_fn(|_req: HandlerRequest| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, HandlerError>(Bytes::new())
        });
        let limited = tower::ServiceBuilder::new()
            .timeout(Duration::from_millis(20))
            .service(slow);
        registry.register_service("slow", limited);
        let err = call(&registry, "slow", "").await.unwrap_err();
        assert!(
            matches!(&err, HandlerError::Failed(text) if text.contains("timed out")),
            "{err:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_handlers_never_exceed_the_pool_size() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut registry = HandlerRegistry::new();
        registry.set_blocking_threads(2);
        let (r, p) = (running.clone(), peak.clone());
        registry.register_blocking("work", move |_req| {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(30));
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(Bytes::new())
        });
        let calls = (0..6).map(|_| call(&registry, "work", ""));
        for result in futures::future::join_all(calls).await {
            result.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn cancelled_async_handler_task_is_aborted() {
        let mut registry = HandlerRegistry::new();
        let dropped = Arc::new(tokio::sync::Notify::new());
        let signal = dropped.clone();
        registry.register_async("hang", move |_req: HandlerRequest| {
            let signal = signal.clone();
            async move {
                struct NotifyOnDrop(Arc<tokio::sync::Notify>);
                impl Drop for NotifyOnDrop {
                    fn drop(&mut self) {
                        self.0.notify_one();
                    }
                }
                let _guard = NotifyOnDrop(signal);
                std::future::pending::<()>().await;
                Ok(Bytes::new())
            }
        });
        let service = registry.get("hang").unwrap();
        let call = tokio::spawn(service.oneshot(HandlerRequest::detached("")));
        tokio::task::yield_now().await;
        call.abort();
        tokio::time::timeout(Duration::from_secs(5), dropped.notified())
            .await
            .expect("the handler's task was aborted with the call");
    }
}
