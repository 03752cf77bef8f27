//! The dashboard's JSON API (README "Dashboard", the HTTP contract): each
//! handler authenticates, then calls the gRPC service method that answers
//! the same question (`TaskApi`, `AdminApi`) with the caller in the
//! request, and turns its answer into JSON. Scopes, validation and limits
//! are therefore the gRPC API's.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use weft_proto::pb;
use weft_proto::pb::admin_service_server::AdminService;
use weft_proto::pb::task_service_server::TaskService;

use super::{ApiError, App, PathId, grpc_request, json as to_json};
use crate::auth::{Caller, Scopes};

/// A task list page's size when none is asked for.
const DEFAULT_PAGE: u32 = 50;
/// The largest task list page the dashboard asks for.
const MAX_PAGE: u32 = 500;
/// Most running attempts listed on a node's page (each is one read of
/// its task): far above any node's slots in practice.
const MAX_NODE_RUNNING: usize = 1024;

/// A 200 answer with `value` as JSON, never cached.
pub(super) fn ok(value: Value) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        value.to_string(),
    )
        .into_response()
}

/// The caller's token name and scopes, as `/api/me` and login answer.
fn me_json(app: &App, caller: &Caller) -> Value {
    let name = match (&app.tokens, &caller.token_id) {
        (Some(index), Some(id)) => index.get(id).map(|r| r.name).unwrap_or_default(),
        _ => "no-auth".to_owned(),
    };
    // "admin" implies every scope: list them all, so a page checks one.
    let scopes = if caller.scopes.allows(crate::auth::Scope::Admin) {
        Scopes::ADMIN.names()
    } else {
        caller.scopes.names()
    };
    json!({ "name": name, "scopes": scopes })
}

/// `POST /api/login` `{"token": "..."}`: a session cookie for a working
/// client token.
pub(super) async fn login(
    State(app): State<Arc<App>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    #[derive(serde::Deserialize)]
    struct Login {
        token: String,
    }
    let body = body?;
    let login: Login = serde_json::from_slice(&body).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"token\": \"weft_...\"}}: {err}"),
        )
    })?;
    let Some(index) = &app.tokens else {
        // --no-auth: every caller is admin, no session needed.
        let caller = app.caller(&HeaderMap::new())?;
        return Ok(ok(me_json(&app, &caller)));
    };
    let caller = index.authenticate(&login.token, std::time::SystemTime::now())?;
    let id = app
        .sessions
        .open(
            caller.token_id.as_deref().unwrap_or_default(),
            login.token.trim(),
            Instant::now(),
        )
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no randomness for a session id; try again",
            )
        })?;
    let mut response = ok(me_json(&app, &caller));
    if let Ok(value) = app.session_cookie(Some(&id)).parse() {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// `POST /api/logout`: ends the session and clears its cookie.
pub(super) async fn logout(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Some(id) = app.session_id(&headers) {
        app.sessions.close(id);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(value) = app.session_cookie(None).parse() {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `GET /metrics` (`read` scope): the coordinator's metrics, OpenMetrics
/// text; 404 when none are registered.
pub(super) async fn metrics(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    caller.require(crate::auth::Scope::Read)?;
    let render = app
        .metrics
        .as_ref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no metrics on this coordinator"))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(),
    )
        .into_response())
}

/// `GET /api/me`.
pub(super) async fn me(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    Ok(ok(me_json(&app, &caller)))
}

/// `GET /api/overview`: ClusterInfo and ListNodes, and the charts.
pub(super) async fn overview(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    let info = app
        .admin
        .cluster_info(grpc_request(&caller, pb::ClusterInfoRequest {}))
        .await?
        .into_inner();
    let nodes = app
        .admin
        .list_nodes(grpc_request(&caller, pb::ListNodesRequest {}))
        .await?
        .into_inner()
        .nodes;
    let tasks_by_state: serde_json::Map<String, Value> = info
        .tasks
        .iter()
        .map(|count| {
            (
                to_json::state_name(count.state).to_owned(),
                json!(count.count),
            )
        })
        .collect();
    let (queue_depth, throughput) = app.series.read();
    Ok(ok(json!({
        "version": info.version,
        "uptime_seconds": info.uptime.map(|d| d.seconds).unwrap_or(0),
        "slots": info.slots,
        "slots_free": info.slots_free,
        "nodes": nodes.iter().map(to_json::node).collect::<Vec<_>>(),
        "tasks_by_state": tasks_by_state,
        "series": {
            "interval_seconds": super::series::INTERVAL.as_secs(),
            "queue_depth": queue_depth,
            "throughput": throughput,
        },
    })))
}

/// The connected node `id` (its id or its name), or 404.
async fn find_node(app: &App, caller: &Caller, id: &str) -> Result<pb::NodeInfo, ApiError> {
    let nodes = app
        .admin
        .list_nodes(grpc_request(caller, pb::ListNodesRequest {}))
        .await?
        .into_inner()
        .nodes;
    nodes
        .into_iter()
        .find(|node| node.node_id == id || node.name == id)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no connected node with id or name {id:?}"),
            )
        })
}

/// `GET /api/nodes/{id}`: the node, and its running attempts (from the
/// scheduler's view of the node; each task read by id).
pub(super) async fn node(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    let node = find_node(&app, &caller, &id).await?;
    let mut running = Vec::with_capacity(node.running.len().min(MAX_NODE_RUNNING));
    for attempt in node.running.iter().take(MAX_NODE_RUNNING) {
        let request = pb::GetRequest {
            task_id: attempt.task_id.clone(),
        };
        // A task that ended (and was swept) meanwhile is simply not listed.
        let Ok(answer) = app.tasks.get(grpc_request(&caller, request)).await else {
            continue;
        };
        let Some(task) = answer.into_inner().task else {
            continue;
        };
        running.push(json!({
            "task_id": attempt.task_id,
            "name": task.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
            "attempt": attempt.attempt,
            "state": to_json::state_name(task.state),
            "started_at": attempt_started_at(&task, attempt.attempt),
        }));
    }
    Ok(ok(
        json!({ "node": to_json::node(&node), "running": running }),
    ))
}

/// When attempt `number` of `task` started (its history's entry of that
/// number); null while it has not (assigned, not yet started) or when the
/// record has no history of it.
fn attempt_started_at(task: &pb::Task, number: u32) -> Value {
    task.attempts
        .iter()
        .rev()
        .find(|a| a.number == number)
        .map_or(Value::Null, |a| to_json::time(a.started_at.as_ref()))
}

/// `POST /api/nodes/{id}/drain` (admin).
pub(super) async fn drain(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    let request = pb::DrainNodeRequest {
        node: id,
        grace: None,
    };
    let node = app
        .admin
        .drain_node(grpc_request(&caller, request))
        .await?
        .into_inner()
        .node
        .unwrap_or_default();
    Ok(ok(json!({ "node": to_json::node(&node) })))
}

/// `POST /api/nodes/{id}/revoke` (admin).
pub(super) async fn revoke(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    let answer = app
        .admin
        .revoke_node(grpc_request(&caller, pb::RevokeNodeRequest { node: id }))
        .await?
        .into_inner();
    Ok(ok(json!({
        "node_id": answer.node_id,
        "name": answer.name,
        "was_connected": answer.was_connected,
        "requeued": answer.requeued,
    })))
}

/// The query's `key=value` pairs, decoded (`+` is a space).
pub(super) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(&text.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) => (decode(key), decode(value)),
            None => (decode(pair), String::new()),
        })
        .collect()
}

/// The `ListRequest` a task list query asks for; 400 for a bad one.
fn list_request(query: Option<&str>) -> Result<pb::ListRequest, ApiError> {
    let mut request = pb::ListRequest {
        limit: DEFAULT_PAGE,
        ..Default::default()
    };
    for (key, value) in query_pairs(query) {
        match key.as_str() {
            "state" if value.is_empty() => {}
            "state" => {
                let state = to_json::state_from_name(&value).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("state: unknown state {value:?} (pending, queued, assigned, running, succeeded, failed, cancelled, timed_out, upstream_failed, skipped)"),
                    )
                })?;
                request.state = i32::from(state);
            }
            "limit" => request.limit = parse_limit(&value)?,
            "page_token" => request.page_token = value,
            "label" | "name" | "node" | "job" if value.is_empty() => {}
            // `label=k=v`, repeatable: every one must match.
            "label" => {
                let (k, v) = value.split_once('=').ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("label: {value:?} is not KEY=VALUE"),
                    )
                })?;
                if k.is_empty() {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("label: {value:?} has an empty key (write KEY=VALUE)"),
                    ));
                }
                request.labels.insert(k.to_owned(), v.to_owned());
            }
            "name" => request.name = value,
            "node" => request.node = value,
            "job" => request.job = value,
            // Unknown parameters (a cache buster, say) are ignored.
            _ => {}
        }
    }
    Ok(request)
}

/// The `ListRequest` of job `job`'s page: only `limit` and `page_token`
/// are read from the query; the task list's filters (state, label, name,
/// node) are not the job page's, so a link carrying them still finds the
/// job. 400 for a bad limit.
pub(super) fn job_request(job: &str, query: Option<&str>) -> Result<pb::ListRequest, ApiError> {
    let mut request = pb::ListRequest {
        job: job.to_owned(),
        limit: DEFAULT_PAGE,
        ..Default::default()
    };
    for (key, value) in query_pairs(query) {
        match key.as_str() {
            "limit" => request.limit = parse_limit(&value)?,
            "page_token" => request.page_token = value,
            _ => {}
        }
    }
    Ok(request)
}

/// A page size as asked for, within 1 to [`MAX_PAGE`]; 400 for no number.
fn parse_limit(value: &str) -> Result<u32, ApiError> {
    let limit: u32 = value.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit: {value:?} is not a number (1 to {MAX_PAGE})"),
        )
    })?;
    Ok(limit.clamp(1, MAX_PAGE))
}

/// `GET /api/tasks?state=&label=&name=&node=&job=&limit=&page_token=`: a
/// page, newest first (a job's tasks oldest first), through `TaskService.List`.
pub(super) async fn tasks(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    let request = list_request(query.as_deref())?;
    let page = app
        .tasks
        .list(grpc_request(&caller, request))
        .await?
        .into_inner();
    Ok(ok(json!({
        "tasks": page.tasks.iter().map(to_json::task).collect::<Vec<_>>(),
        "next_page_token": page.next_page_token,
    })))
}

/// `GET /api/tasks/{id}`.
pub(super) async fn task(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    let task = app
        .tasks
        .get(grpc_request(&caller, pb::GetRequest { task_id: id }))
        .await?
        .into_inner()
        .task
        .unwrap_or_default();
    Ok(ok(json!({ "task": to_json::task(&task) })))
}

/// `POST /api/tasks/{id}/cancel` (cancel scope).
pub(super) async fn cancel(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    let request = pb::CancelRequest {
        task_id: id,
        reason: "cancelled from the dashboard".to_owned(),
    };
    let task = app
        .tasks
        .cancel(grpc_request(&caller, request))
        .await?
        .into_inner()
        .task
        .unwrap_or_default();
    Ok(ok(json!({ "task": to_json::task(&task) })))
}

/// `POST /api/jobs/{id}/cancel` (cancel scope): `TaskService.CancelJob`.
pub(super) async fn cancel_job(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    let request = pb::CancelJobRequest {
        job_id: id.clone(),
        reason: "job cancelled from the dashboard".to_owned(),
    };
    let answer = app
        .tasks
        .cancel_job(grpc_request(&caller, request))
        .await?
        .into_inner();
    Ok(ok(json!({
        "job_id": id,
        "cancelled": answer.cancelled,
        "already_final": answer.already_final,
    })))
}

/// `GET /api/limits`: `AdminService.ListLimits` (read-only here).
pub(super) async fn limits(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    let limits = app
        .admin
        .list_limits(grpc_request(&caller, pb::ListLimitsRequest {}))
        .await?
        .into_inner()
        .limits;
    Ok(ok(json!({
        "limits": limits.iter().map(to_json::limit).collect::<Vec<_>>(),
    })))
}

/// `GET /api/schedules`: `ScheduleService.ListSchedules` (read-only here),
/// every schedule: the pages are followed here, each turned into JSON (which
/// leaves out the task spec) before the next is read, up to
/// `MAX_SCHEDULES`, so the dashboard needs no paging.
pub(super) async fn schedules(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    use pb::schedule_service_server::ScheduleService;
    let caller = app.caller(&headers)?;
    let mut schedules = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListSchedulesRequest {
            page_token,
            ..Default::default()
        };
        let page = app
            .schedules
            .list_schedules(grpc_request(&caller, request))
            .await?
            .into_inner();
        schedules.extend(page.schedules.iter().map(to_json::schedule));
        if page.next_page_token.is_empty()
            || schedules.len() >= crate::scheduler::cron::MAX_SCHEDULES
        {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(ok(json!({ "schedules": schedules })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_list_query_becomes_a_list_request() {
        let request = list_request(Some("state=running&limit=9999&page_token=abc&x=1")).unwrap();
        assert_eq!(request.state, i32::from(pb::TaskState::Running));
        assert_eq!(request.limit, MAX_PAGE);
        assert_eq!(request.page_token, "abc");
        assert_eq!(list_request(None).unwrap().limit, DEFAULT_PAGE);
        let request = list_request(Some("job=J1&state=upstream_failed")).unwrap();
        assert_eq!(request.job, "J1");
        assert_eq!(request.state, i32::from(pb::TaskState::UpstreamFailed));
        for bad in ["state=sleeping", "limit=many"] {
            let err = list_request(Some(bad)).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn node_page_started_at_is_the_attempt_start() {
        let at = |seconds| prost_types::Timestamp { seconds, nanos: 0 };
        let task = pb::Task {
            attempt: 2,
            // Its last change came after the start (a progress update,
            // a cancel asked for): not the start.
            updated_at: Some(at(2_000)),
            attempts: vec![
                pb::Attempt {
                    number: 1,
                    started_at: Some(at(1_000)),
                    ended_at: Some(at(1_100)),
                    ..Default::default()
                },
                pb::Attempt {
                    number: 2,
                    started_at: Some(at(1_500)),
                    ..Default::default()
                },
                pb::Attempt {
                    number: 3,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            attempt_started_at(&task, 2),
            to_json::time(Some(&at(1_500)))
        );
        assert_eq!(attempt_started_at(&task, 3), Value::Null, "not started");
        assert_eq!(attempt_started_at(&task, 4), Value::Null, "no history");
    }

    #[test]
    fn a_job_request_reads_only_limit_and_page_token() {
        let request = job_request(
            "J1",
            Some("name=zzz&node=n9&label=k=v&state=running&limit=7&page_token=T"),
        )
        .unwrap();
        assert_eq!(
            request,
            pb::ListRequest {
                job: "J1".to_owned(),
                limit: 7,
                page_token: "T".to_owned(),
                ..Default::default()
            }
        );
        // Not even a filter the task list would refuse is read.
        assert!(job_request("J1", Some("state=sleeping&label=bad")).is_ok());
        assert!(job_request("J1", Some("limit=many")).is_err());
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_pairs(Some("name=a+b%3Dc&flag")),
            vec![
                ("name".to_owned(), "a b=c".to_owned()),
                ("flag".to_owned(), String::new())
            ]
        );
    }
}
