//! What the CLI's unit tests share.

use weft_client::{Task, TaskState};
use weft_proto::{Attempt, TaskId};

/// A task in `state` on its first attempt, with nothing else set: tests
/// fill in what they look at (`Task { error, ..task(state) }`).
pub(crate) fn task(state: TaskState) -> Task {
    Task {
        id: TaskId::new(),
        spec: None,
        state,
        attempt: Attempt(1),
        node_id: None,
        node_name: None,
        exit_code: None,
        output: bytes::Bytes::new(),
        error: String::new(),
        pending_reason: String::new(),
        failures: 0,
        node_losses: 0,
        created_at: None,
        updated_at: None,
        next_seq: 0,
        last_outcome: None,
        attempts: Vec::new(),
        job_id: None,
        waiting_for: Vec::new(),
    }
}
