//! The gRPC services: thin adapters between tonic and the driver's inbox.
//! They translate (`pb` <-> domain, [`Error`](crate::Error) -> `Status`) and
//! forward; no state transitions happen here.

pub(crate) mod admin;
mod batches;
mod jobs;
pub(crate) mod node;
mod node_admin;
pub(crate) mod schedule;
pub(crate) mod task;

use weft_proto::{ConversionError, TaskId, TaskState, pb};

use crate::error::Error;
pub(crate) use crate::store::codec::{event_to_pb, task_result_pb, task_to_pb};

/// Runs `work` as a task of its own and waits for its answer. A caller that
/// goes away (a cancelled call, its deadline passed) drops only the wait:
/// `work` still runs to its end, so a write that reached the store is also
/// applied in memory and to the driver, never left half done.
pub(crate) async fn to_completion<T: Send + 'static>(
    work: impl Future<Output = Result<T, tonic::Status>> + Send + 'static,
) -> Result<T, tonic::Status> {
    tokio::spawn(work).await.unwrap_or_else(|err| {
        tracing::error!(error = %err, "a call's work ended without an answer");
        Err(tonic::Status::internal("internal coordinator error"))
    })
}

/// Parses a task id from a request field.
pub(crate) fn parse_task_id(text: &str) -> Result<TaskId, Error> {
    text.parse::<TaskId>().map_err(Error::from)
}

/// `UNSPECIFIED` means "any state".
pub(crate) fn state_filter(value: i32) -> Result<Option<TaskState>, Error> {
    if value == 0 {
        return Ok(None);
    }
    TaskState::try_from(value).map(Some).map_err(Error::from)
}

/// A `view`: one of `TaskView`'s values (`UNSPECIFIED` as `FULL`); a
/// number it does not have is refused, not read as the default.
pub(crate) fn task_view(value: i32) -> Result<pb::TaskView, Error> {
    pb::TaskView::try_from(value).map_err(|_| {
        Error::from(ConversionError::InvalidValue {
            what: "view",
            value: value.to_string(),
            expected: "TASK_VIEW_UNSPECIFIED (0), TASK_VIEW_FULL (1), TASK_VIEW_RESULT (2)".into(),
        })
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::sync::oneshot;

    use super::{task_view, to_completion};
    use weft_proto::pb;

    #[test]
    fn an_unknown_view_is_refused_and_unspecified_is_full() {
        assert_eq!(task_view(0).unwrap(), pb::TaskView::Unspecified);
        assert_eq!(task_view(2).unwrap(), pb::TaskView::Result);
        for bad in [3, -1, i32::MAX] {
            let status = tonic::Status::from(task_view(bad).unwrap_err());
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains("view"), "{}", status.message());
        }
    }

    #[tokio::test]
    async fn work_run_to_completion_finishes_when_its_caller_goes_away() {
        let (go, wait) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel();
        let finished = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&finished);
        let call = to_completion(async move {
            let _ = wait.await;
            flag.store(true, Ordering::SeqCst);
            let _ = done_tx.send(());
            Ok(())
        });
        // The caller polls once (the work is under way), then gives up.
        let mut call = Box::pin(call);
        assert!(futures::poll!(call.as_mut()).is_pending());
        drop(call);
        let _ = go.send(());
        done.await.expect("the work ran to its end");
        assert!(finished.load(Ordering::SeqCst));
    }
}
