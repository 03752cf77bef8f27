//! The Submit path's part of dependencies and jobs: reading the existing
//! tasks a Submit runs after from the store (the scheduler re-checks them),
//! and `CancelJob`'s listing of a job's tasks. Translation only: what a
//! dependency does is `scheduler/graph.rs`'s.

use std::time::Duration;

use weft_proto::{TaskId, TaskSpec, TaskState};

use crate::driver::{Command, Handle};
use crate::error::Error;
use crate::scheduler::graph::{self, KnownParents, ParentResult};
use crate::store::{ListQuery, blocking};

/// How many times a Submit reads its parents again when one of them ended
/// between the read and the scheduler's check (each time a commit later).
const REREADS: usize = 20;

/// Submits `specs`, at least one of which runs after other tasks or waits
/// for a start time.
pub(crate) async fn submit_graph(
    handle: &Handle,
    specs: Vec<TaskSpec>,
) -> Result<Vec<TaskId>, Error> {
    let external = graph::external_parents(&specs);
    let mut tries = 0;
    loop {
        let known = read_parents(handle, external.clone()).await?;
        let specs = specs.clone();
        match handle
            .call(|reply| Command::SubmitGraph {
                specs,
                known,
                reply,
            })
            .await?
        {
            Err(Error::ParentsMoved) if tries < REREADS => {
                // The parent's final record is in a commit in flight.
                tries += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            result => return result,
        }
    }
}

/// Per id, its result when final, `None` when not final; ids the store
/// does not have are left out.
async fn read_parents(handle: &Handle, ids: Vec<TaskId>) -> Result<KnownParents, Error> {
    if ids.is_empty() {
        return Ok(KnownParents::new());
    }
    let known = blocking(
        &handle.store,
        "reading the tasks a Submit runs after",
        move |store| {
            let mut known = KnownParents::with_capacity(ids.len());
            for id in ids {
                if let Some(record) = store.task(id)? {
                    let result = record.state.is_final().then(|| ParentResult {
                        task_id: id,
                        ref_name: record.spec.ref_name.clone(),
                        state: record.state,
                        output: record.output.clone(),
                    });
                    known.insert(id, result);
                }
            }
            Ok(known)
        },
    )
    .await?;
    Ok(known)
}

/// Bytes of task records one page of [`job_tasks`] reads at most (and
/// one record more).
const JOB_PAGE_BYTES: usize = 4 << 20;

/// Every task id of `job` with its state, oldest first (paged through the
/// store: a job's ids are one contiguous range).
pub(crate) async fn job_tasks(
    handle: &Handle,
    job: TaskId,
) -> Result<Vec<(TaskId, TaskState)>, Error> {
    let mut out = Vec::new();
    let mut from = job;
    loop {
        let query = ListQuery {
            from: Some(from),
            before: Some(TaskId::from_u128(
                graph::job_end(job).as_u128().saturating_add(1),
            )),
            limit: 10_000,
            // Only ids and states are kept: whole records are read a few
            // MiB at a time, however large their outputs.
            budget: JOB_PAGE_BYTES,
            ascending: true,
            ..ListQuery::default()
        };
        let page = blocking(&handle.store, "listing a job's tasks", move |store| {
            store.list_page(&query)
        })
        .await?;
        out.extend(page.tasks.iter().map(|t| (t.id, t.state)));
        match page.resume {
            Some(last) => from = TaskId::from_u128(last.as_u128().saturating_add(1)),
            None => return Ok(out),
        }
    }
}
