//! A job's page (`GET /api/jobs/{id}`): a page of its tasks through
//! `TaskService.List`, and every task of it counted per state.
//!
//! The counts are read from the store's range of the job's ids (a job's
//! tasks are one contiguous range), keeping only each task's state: no
//! wire form is built and the driver is not asked for pending reasons
//! (what `List` adds to a page it shows), the records are read a few MiB
//! at a time in one blocking call. The job page polls this every few
//! seconds per open tab, so it must cost about one read of the job.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::json;

use weft_proto::TaskId;
use weft_proto::pb::task_service_server::TaskService;

use super::api::{job_request, ok};
use super::{ApiError, App, PathId, grpc_request, json as to_json};
use crate::scheduler::graph::job_end;
use crate::store::{ListQuery, Store, StoreError, blocking};

/// Most tasks of a job counted by state on its page; a bigger job says
/// its counts are partial.
pub(super) const MAX_JOB_COUNTED: usize = 20_000;

/// Bytes of task records one store read of the counting holds at most
/// (and one record more): a job of large outputs is counted in pieces.
const COUNT_PAGE_BYTES: usize = 4 << 20;

/// A job's tasks per state, as far as they were counted.
#[derive(Debug, Default, PartialEq)]
pub(super) struct JobCounts {
    /// Tasks per state name (`to_json::state_name`).
    pub per_state: BTreeMap<&'static str, u64>,
    /// Tasks counted.
    pub counted: usize,
    /// Every task of the job was counted (not cut at the bound).
    pub complete: bool,
}

/// Counts the tasks of `job` per state, at most `max` of them, reading
/// only the job's range of ids.
pub(super) fn count_job(
    store: &dyn Store,
    job: TaskId,
    max: usize,
) -> Result<JobCounts, StoreError> {
    let end = TaskId::from_u128(job_end(job).as_u128().saturating_add(1));
    let mut counts = JobCounts::default();
    let mut from = job;
    loop {
        let query = ListQuery {
            from: Some(from),
            before: Some(end),
            limit: max - counts.counted,
            budget: COUNT_PAGE_BYTES,
            ascending: true,
            ..ListQuery::default()
        };
        let page = store.list_page(&query)?;
        for task in &page.tasks {
            *counts
                .per_state
                .entry(to_json::state_name(i32::from(task.state)))
                .or_default() += 1;
        }
        counts.counted += page.tasks.len();
        match page.resume {
            None => {
                counts.complete = true;
                return Ok(counts);
            }
            Some(_) if counts.counted >= max => return Ok(counts),
            Some(last) => from = TaskId::from_u128(last.as_u128().saturating_add(1)),
        }
    }
}

/// `GET /api/jobs/{id}?limit=&page_token=`: the job's tasks (a page, oldest
/// first) through `TaskService.List` with `job`, and their counts per
/// state ([`count_job`]); 404 for an unknown job (no task).
pub(super) async fn job(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    PathId(id): PathId,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    // `List` checks the scope and the job id before anything is counted.
    let request = job_request(&id, query.as_deref())?;
    let page = app
        .tasks
        .list(grpc_request(&caller, request))
        .await?
        .into_inner();
    if page.tasks.is_empty() && page.next_page_token.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job {id:?} (no task has that job id)"),
        ));
    }
    let job: TaskId = id
        .parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("{id:?} is not a job id")))?;
    let counts = blocking(
        &app.tasks.handle.store,
        "counting a job's tasks",
        move |store| count_job(store, job, MAX_JOB_COUNTED),
    )
    .await
    .map_err(|err| ApiError::from(tonic::Status::from(crate::error::Error::from(err))))?;
    Ok(ok(json!({
        "job_id": id,
        "counts": counts.per_state,
        "counted": counts.counted,
        "counts_complete": counts.complete,
        "tasks": page.tasks.iter().map(to_json::task).collect::<Vec<_>>(),
        "next_page_token": page.next_page_token,
    })))
}

/// Proof that the counting ends at its bound and says so.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, Record, TaskRecord};

    #[test]
    fn counting_stops_at_its_bound_and_says_it_is_partial() {
        let store = MemoryStore::new();
        let job = crate::scheduler::graph::job_of(TaskId::new());
        let spec = Arc::new(weft_proto::TaskSpec::call("noop", ""));
        let records: Vec<Record> = (0..5u128)
            .map(|i| {
                Record::Task(TaskRecord::for_test(
                    TaskId::from_u128(job.as_u128() + i),
                    Arc::clone(&spec),
                    weft_proto::TaskState::Queued,
                    std::time::SystemTime::now(),
                ))
            })
            .collect();
        store.commit(&records).unwrap();
        let all = count_job(&store, job, 10).unwrap();
        assert_eq!((all.counted, all.complete), (5, true));
        assert_eq!(all.per_state.get("queued"), Some(&5));
        let part = count_job(&store, job, 3).unwrap();
        assert_eq!((part.counted, part.complete), (3, false));
        let exact = count_job(&store, job, 5).unwrap();
        assert_eq!((exact.counted, exact.complete), (5, true));
    }
}
