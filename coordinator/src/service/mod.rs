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

use weft_proto::{TaskId, TaskState};

use crate::error::Error;
pub(crate) use crate::store::codec::{event_to_pb, task_result_pb, task_to_pb};

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
