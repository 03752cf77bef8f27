//! The gRPC services: thin adapters between tonic and the driver's inbox.
//! They translate (`pb` <-> domain, [`Error`](crate::Error) -> `Status`) and
//! forward; no state transitions happen here.

pub(crate) mod admin;
pub(crate) mod node;
pub(crate) mod task;

use weft_proto::convert::timestamp;
use weft_proto::{TaskId, TaskState, pb};

use crate::error::Error;
use crate::store::{EventBody, TaskEvent, TaskRecord};

/// Parses a task id from a request field.
pub(crate) fn parse_task_id(text: &str) -> Result<TaskId, Error> {
    text.parse::<TaskId>().map_err(Error::from)
}

/// A stored task as the wire shows it.
pub(crate) fn task_to_pb(record: &TaskRecord) -> pb::Task {
    pb::Task {
        id: record.id.to_string(),
        spec: Some(pb::TaskSpec::from(weft_proto::TaskSpec::clone(
            &record.spec,
        ))),
        state: i32::from(record.state),
        attempt: record.attempt.0,
        node_id: record.node_id.map(|n| n.to_string()).unwrap_or_default(),
        node_name: record.node_name.as_deref().unwrap_or_default().to_owned(),
        exit_code: record.exit_code,
        output: record.output.clone(),
        error: record.error.clone(),
        pending_reason: record.pending_reason.clone(),
        created_at: Some(timestamp(record.created_at)),
        updated_at: Some(timestamp(record.updated_at)),
        failures: record.failures,
        node_losses: record.node_losses,
        next_seq: record.next_seq,
    }
}

/// A stored event as the wire shows it.
pub(crate) fn event_to_pb(event: &TaskEvent) -> pb::TaskEvent {
    use pb::task_event::Body;
    let body = match &event.body {
        EventBody::State {
            state,
            node_id,
            node_name,
            reason,
        } => Body::State(pb::StateChanged {
            state: i32::from(*state),
            node_id: node_id.map(|n| n.to_string()).unwrap_or_default(),
            node_name: node_name.as_deref().unwrap_or_default().to_owned(),
            reason: reason.clone(),
        }),
        EventBody::Output { stream, data } => Body::Output(pb::TaskOutput {
            stream: i32::from(*stream),
            data: data.clone(),
        }),
        EventBody::Progress { fraction, message } => Body::Progress(pb::TaskProgress {
            fraction: *fraction,
            message: message.clone(),
        }),
        EventBody::Finished(record) => Body::Finished(task_to_pb(record)),
    };
    pb::TaskEvent {
        task_id: event.task_id.to_string(),
        seq: event.seq,
        attempt: event.attempt.0,
        time: Some(timestamp(event.time)),
        body: Some(body),
    }
}

/// `UNSPECIFIED` means "any state".
pub(crate) fn state_filter(value: i32) -> Result<Option<TaskState>, Error> {
    if value == 0 {
        return Ok(None);
    }
    TaskState::try_from(value).map(Some).map_err(Error::from)
}
