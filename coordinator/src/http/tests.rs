//! The routes over a running driver on a memory store (no node, no
//! socket): each request goes through the whole router, layers included.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use weft_proto::pb::task_service_server::TaskService;
use weft_proto::{TaskId, TaskSpec, TaskState, pb};

use super::*;
use crate::store::{
    ListPage, ListQuery, Loaded, MemoryStore, Record, Store, StoreError, TaskEvent, TaskRecord,
};

/// The memory store, counting its `list_page` calls.
#[derive(Default)]
struct CountingStore {
    memory: MemoryStore,
    list_pages: AtomicUsize,
}

impl Store for CountingStore {
    fn commit(&self, records: &[Record]) -> Result<(), StoreError> {
        self.memory.commit(records)
    }
    fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.memory.task(id)
    }
    fn list_page(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        self.list_pages.fetch_add(1, Ordering::Relaxed);
        self.memory.list_page(query)
    }
    fn events(&self, id: TaskId, from: u64, limit: usize) -> Result<Vec<TaskEvent>, StoreError> {
        self.memory.events(id, from, limit)
    }
    fn load(&self, since: SystemTime) -> Result<Loaded, StoreError> {
        self.memory.load(since)
    }
    fn expire(
        &self,
        before: SystemTime,
        limit: usize,
        keep: &[TaskId],
    ) -> Result<Vec<TaskState>, StoreError> {
        self.memory.expire(before, limit, keep)
    }
    fn tokens(&self) -> Result<Vec<crate::auth::TokenRecord>, StoreError> {
        self.memory.tokens()
    }
    fn put_token(&self, token: &crate::auth::TokenRecord) -> Result<(), StoreError> {
        self.memory.put_token(token)
    }
    fn node_identities(&self) -> Result<Vec<crate::store::NodeIdentityRecord>, StoreError> {
        self.memory.node_identities()
    }
    fn put_node_identity(
        &self,
        identity: &crate::store::NodeIdentityRecord,
        token: Option<&crate::auth::TokenRecord>,
    ) -> Result<(), StoreError> {
        self.memory.put_node_identity(identity, token)
    }
}

/// A dashboard over a running driver; `stop` ends it.
struct Dashboard {
    app: Arc<App>,
    store: Arc<CountingStore>,
    cancel: CancellationToken,
    run: tokio::task::JoinHandle<()>,
}

impl Dashboard {
    /// With `tokens` (`None`: `--no-auth`).
    fn start(tokens: Option<Arc<TokenIndex>>) -> Dashboard {
        let config = crate::config::CoordinatorConfig::default();
        let mut scheduler = crate::scheduler::Scheduler::new((&config).into());
        let metrics = Arc::new(crate::metrics::Metrics::default());
        scheduler.set_metrics(Arc::clone(metrics.tasks()));
        let cancel = CancellationToken::new();
        let store = Arc::new(CountingStore::default());
        let (driver, handle) = crate::driver::new(
            scheduler,
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::new(config),
            metrics,
            cancel.clone(),
            TaskTracker::new(),
        );
        let run = tokio::spawn(driver.run());
        let app = Arc::new(App {
            tasks: Arc::new(TaskApi::new(handle.clone())),
            admin: Arc::new(AdminApi {
                handle: handle.clone(),
                tokens: tokens.clone().unwrap_or_default(),
                identities: Arc::default(),
                tls: None,
                listen: "127.0.0.1:7070".parse().expect("an address"),
            }),
            schedules: crate::service::schedule::ScheduleApi { handle },
            tokens,
            sessions: Sessions::new(session::MAX_SESSIONS, session::SESSION_IDLE),
            series: Arc::default(),
            secure: false,
            cookie: session::cookie_name(7080),
            cancel: cancel.clone(),
            metrics: None,
        });
        Dashboard {
            app,
            store,
            cancel,
            run,
        }
    }

    /// Submits `specs` in one Submit: its task ids (the first is the job).
    async fn submit(&self, specs: Vec<TaskSpec>) -> Vec<String> {
        let admin = Caller {
            token_id: None,
            scopes: Scopes::ADMIN,
        };
        let request = pb::SubmitRequest {
            tasks: specs.into_iter().map(pb::TaskSpec::from).collect(),
        };
        self.app
            .tasks
            .submit(grpc_request(&admin, request))
            .await
            .unwrap_or_else(|err| panic!("{err}"))
            .into_inner()
            .task_ids
    }

    /// `method path` with `headers` and `body`: the status and the body.
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:7080{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Body::from(body)).expect("a request");
        let response = router(Arc::clone(&self.app))
            .oneshot(request)
            .await
            .unwrap_or_else(|err| match err {});
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a body").to_bytes().to_vec();
        (parts.status, parts.headers, body)
    }

    /// `GET path` as JSON, expecting 200.
    async fn get(&self, path: &str) -> Value {
        let (status, _, body) = self.send("GET", path, &[], Vec::new()).await;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, StatusCode::OK, "{path}: {text}");
        serde_json::from_slice(&body).unwrap_or_else(|err| panic!("{path}: {err}: {text}"))
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.run.await.unwrap_or_else(|err| panic!("{err}"));
    }
}

#[tokio::test]
async fn errors_are_json() {
    let dashboard = Dashboard::start(None);
    let ids = dashboard.submit(vec![TaskSpec::call("noop", "")]).await;
    let cancel = format!("/api/tasks/{}/cancel", ids[0]);
    let csrf = [(CSRF_HEADER, "1")];
    let (status, _, _) = dashboard.send("POST", &cancel, &csrf, Vec::new()).await;
    assert_eq!(status, StatusCode::OK, "the first cancel");
    let cases: [(&str, &str, Vec<u8>, StatusCode); 4] = [
        (
            "GET",
            "/api/login",
            Vec::new(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "POST",
            "/api/login",
            vec![b' '; MAX_BODY + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        ("GET", "/api/tasks/%C0", Vec::new(), StatusCode::BAD_REQUEST),
        ("POST", &cancel, Vec::new(), StatusCode::CONFLICT),
    ];
    for (method, path, body, want) in cases {
        let (status, headers, body) = dashboard.send(method, path, &csrf, body).await;
        let text = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, want, "{method} {path}: {text}");
        assert_eq!(
            headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes()),
            Some(&b"application/json"[..]),
            "{method} {path}"
        );
        let value: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|err| panic!("{method} {path}: {err}: {text:?}"));
        assert!(
            value["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {path}: {value}"
        );
    }
    dashboard.stop().await;
}

#[tokio::test]
async fn job_route_ignores_list_filters() {
    let dashboard = Dashboard::start(None);
    let ids = dashboard
        .submit(vec![TaskSpec::call("noop", ""), TaskSpec::call("noop", "")])
        .await;
    let job = dashboard
        .get(&format!(
            "/api/jobs/{}?name=zzz&node=n9&label=k=v&state=running&limit=1",
            ids[0]
        ))
        .await;
    assert_eq!(job["tasks"][0]["id"], ids[0].as_str(), "{job}");
    assert_eq!(job["counts"]["queued"], 2, "{job}");
    assert!(!job["next_page_token"].as_str().unwrap_or("").is_empty());
    dashboard.stop().await;
}

#[tokio::test]
async fn a_job_page_counts_every_state_with_one_store_read() {
    let dashboard = Dashboard::start(None);
    // 600 tasks: the first a parent, the second pending on it, the rest
    // queued (no node); one is cancelled.
    let mut specs = vec![
        TaskSpec::call("noop", "").ref_name("parent"),
        TaskSpec::call("noop", "").after_ref("parent"),
    ];
    specs.extend((2..600).map(|_| TaskSpec::call("noop", "")));
    let ids = dashboard.submit(specs).await;
    let csrf = [(CSRF_HEADER, "1")];
    let cancel = format!("/api/tasks/{}/cancel", ids[599]);
    let (status, _, _) = dashboard.send("POST", &cancel, &csrf, Vec::new()).await;
    assert_eq!(status, StatusCode::OK);

    let before = dashboard.store.list_pages.load(Ordering::Relaxed);
    let job = dashboard
        .get(&format!("/api/jobs/{}?limit=1", ids[0]))
        .await;
    let reads = dashboard.store.list_pages.load(Ordering::Relaxed) - before;
    assert_eq!(
        job["counts"],
        serde_json::json!({ "pending": 1, "queued": 598, "cancelled": 1 })
    );
    assert_eq!(
        (job["counted"].as_u64(), job["counts_complete"].as_bool()),
        (Some(600), Some(true))
    );
    assert_eq!(job["tasks"].as_array().map(Vec::len), Some(1));
    // One read for the page shown, one for all the counts: not a `List`
    // of 500 (with its pending reasons from the driver) per 500 tasks.
    assert_eq!(reads, 2, "store reads for one job page");
    dashboard.stop().await;
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive() {
    let now = SystemTime::now();
    let (record, token) =
        crate::auth::new_token("reader", Scopes::of([crate::auth::Scope::Read]), None, now)
            .expect("a token");
    let index = Arc::new(TokenIndex::new(vec![record]));
    let dashboard = Dashboard::start(Some(Arc::clone(&index)));
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let value = format!("{scheme} {token}");
        // HTTP.
        let (status, _, body) = dashboard
            .send("GET", "/api/me", &[("authorization", &value)], Vec::new())
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{scheme}: {}",
            String::from_utf8_lossy(&body)
        );
        // gRPC's interceptor.
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("authorization", value.parse().expect("ASCII"));
        let mut edge = crate::auth::Authenticator {
            index: Some(Arc::clone(&index)),
        };
        let request = tonic::service::Interceptor::call(&mut edge, request)
            .unwrap_or_else(|err| panic!("{scheme}: {err}"));
        assert!(request.extensions().get::<Caller>().is_some(), "{scheme}");
    }
    for wrong in [
        format!("Basic {token}"),
        format!("Bearer{token}"),
        token.clone(),
    ] {
        let (status, _, _) = dashboard
            .send("GET", "/api/me", &[("authorization", &wrong)], Vec::new())
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}");
    }
    dashboard.stop().await;
}
