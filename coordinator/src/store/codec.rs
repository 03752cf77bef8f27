//! Records <-> protobuf: the one place that knows how a [`TaskRecord`] or a
//! [`TaskEvent`] looks as bytes. The wire messages (`pb::Task`,
//! `pb::TaskEvent`) are reused as the stored form, so the services and the
//! durable store share one translation and the file format inherits
//! protobuf's rules for adding fields.
//!
//! Stored forms are made compact where the key already says it: the task id
//! is left out of stored tasks and events, and a stored `finished` event
//! leaves out the spec (its task record has it).

use std::sync::Arc;
use std::time::SystemTime;

use prost::Message;

use weft_proto::convert::{system_time, timestamp};
use weft_proto::{
    Attempt, NodeId, Outcome, OutputStream, SecretEnv, TaskId, TaskSpec, TaskState, pb,
};

mod size;
mod wire;

pub(crate) use size::task_wire_bytes;

use super::engine::StoreError;
use super::record::{AttemptRecord, EventBody, NodeIdentityRecord, TaskEvent, TaskRecord};
use crate::auth::{Scopes, TokenKind, TokenRecord};

/// A task as the wire shows it.
pub(crate) fn task_to_pb(record: &TaskRecord) -> pb::Task {
    task_view_pb(record, true)
}

/// A task as the wire shows it without its spec (`TASK_VIEW_RESULT`).
pub(crate) fn task_result_pb(record: &TaskRecord) -> pb::Task {
    task_view_pb(record, false)
}

fn task_view_pb(record: &TaskRecord, with_spec: bool) -> pb::Task {
    let mut task = stored_task_pb(record, with_spec, false);
    task.id = record.id.to_string();
    task.pending_reason.clone_from(&record.pending_reason);
    task.next_seq = record.next_seq;
    task.job_id = record.job_id.unwrap_or(record.id).to_string();
    task.waiting_for = record.waiting_for.iter().map(TaskId::to_string).collect();
    task
}

/// The stored part of a task's wire form: no id, pending reason or
/// `next_seq` (the key and the event log say them), and the spec only
/// when `with_spec`. Builds no string it would throw away. `compact` (what
/// the store writes) leaves out the node of the attempt on the record's
/// own node (the latest), which the record's `node_id`/`node_name` already
/// say; [`record_from_pb`] puts it back.
fn stored_task_pb(record: &TaskRecord, with_spec: bool, compact: bool) -> pb::Task {
    pb::Task {
        id: String::new(),
        spec: with_spec.then(|| {
            let mut spec = pb::TaskSpec::from(&*record.spec);
            // The scheduler takes secrets out of a spec at submit, so a
            // record never holds them; this is also what every reader
            // gets, so make sure of it here (an empty map costs nothing).
            spec.secret_env.clear();
            spec
        }),
        state: i32::from(record.state),
        attempt: record.attempt.0,
        node_id: record.node_id.map(|n| n.to_string()).unwrap_or_default(),
        node_name: record.node_name.as_deref().unwrap_or_default().to_owned(),
        exit_code: record.exit_code,
        output: record.output.clone(),
        error: record.error.clone(),
        pending_reason: String::new(),
        created_at: Some(timestamp(record.created_at)),
        updated_at: Some(timestamp(record.updated_at)),
        failures: record.failures,
        node_losses: record.node_losses,
        next_seq: 0,
        // Stored only when another task's: most tasks are their own job.
        job_id: record.job_id.map(|j| j.to_string()).unwrap_or_default(),
        waiting_for: Vec::new(),
        last_outcome: record.last_outcome.map_or(0, i32::from),
        attempts: record
            .attempts
            .iter()
            .map(|attempt| {
                let own_node = compact
                    && attempt.number == record.attempt
                    && Some(attempt.node_id) == record.node_id;
                attempt_to_pb(attempt, !own_node)
            })
            .collect(),
    }
}

/// One attempt as the wire (and the store) shows it; without its node's
/// id and name unless `with_node`.
fn attempt_to_pb(attempt: &AttemptRecord, with_node: bool) -> pb::Attempt {
    let (node_id, node_name) = if with_node {
        (attempt.node_id.to_string(), attempt.node_name.to_string())
    } else {
        (String::new(), String::new())
    };
    pb::Attempt {
        number: attempt.number.0,
        node_id,
        node_name,
        assigned_at: Some(timestamp(attempt.assigned_at)),
        started_at: attempt.started_at.map(timestamp),
        ended_at: attempt.ended_at.map(timestamp),
        outcome: attempt.outcome.map_or(0, i32::from),
        exit_code: attempt.exit_code,
        reason: attempt.reason.clone(),
    }
}

/// An attempt from its stored form; one stored without its node (see
/// [`stored_task_pb`]) was on `own_node`, the record's.
fn attempt_from_pb(
    attempt: pb::Attempt,
    own_node: Option<(NodeId, &Arc<str>)>,
) -> Result<AttemptRecord, StoreError> {
    let (node_id, node_name) = match (attempt.node_id.as_str(), own_node) {
        ("", Some((id, name))) => (id, Arc::clone(name)),
        (text, _) => (
            text.parse::<NodeId>()
                .map_err(|e| corrupt("attempt node id", e))?,
            Arc::from(attempt.node_name),
        ),
    };
    Ok(AttemptRecord {
        number: Attempt(attempt.number),
        node_id,
        node_name,
        assigned_at: attempt
            .assigned_at
            .as_ref()
            .map_or(std::time::UNIX_EPOCH, system_time),
        started_at: attempt.started_at.as_ref().map(system_time),
        ended_at: attempt.ended_at.as_ref().map(system_time),
        outcome: Outcome::try_from(attempt.outcome).ok(),
        exit_code: attempt.exit_code,
        reason: attempt.reason,
    })
}

/// An event as the wire shows it.
pub(crate) fn event_to_pb(event: &TaskEvent) -> pb::TaskEvent {
    let mut message = event_pb(event, false);
    message.task_id = event.task_id.to_string();
    message
}

/// An event's wire form without its task id; `stored` also leaves the
/// spec out of a `finished` event's record (the task record has it).
fn event_pb(event: &TaskEvent, stored: bool) -> pb::TaskEvent {
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
        EventBody::Output { stream, data, .. } => Body::Output(pb::TaskOutput {
            stream: i32::from(*stream),
            data: data.clone(),
        }),
        EventBody::Progress { fraction, message } => Body::Progress(pb::TaskProgress {
            fraction: *fraction,
            message: message.clone(),
        }),
        EventBody::Finished(record) if stored => {
            // The record as the watcher saw it, less id and spec.
            let mut task = stored_task_pb(record, false, true);
            task.pending_reason.clone_from(&record.pending_reason);
            task.next_seq = record.next_seq;
            Body::Finished(task)
        }
        EventBody::Finished(record) => Body::Finished(task_to_pb(record)),
    };
    pb::TaskEvent {
        task_id: String::new(),
        seq: event.seq,
        attempt: event.attempt.0,
        time: Some(timestamp(event.time)),
        body: Some(body),
    }
}

/// The stored form of a task: the wire record plus what only the
/// coordinator needs.
#[derive(Clone, PartialEq, Message)]
struct StoredTask {
    #[prost(message, optional, tag = "1")]
    task: Option<pb::Task>,
    #[prost(message, repeated, tag = "2")]
    lost_nodes: Vec<StoredNode>,
    /// `TaskRecord::cancel_requested` (empty: none; a cancel's reason is
    /// never empty).
    #[prost(string, tag = "3")]
    cancel_requested: String,
}

#[derive(Clone, PartialEq, Message)]
struct StoredNode {
    #[prost(string, tag = "1")]
    node_id: String,
    #[prost(string, tag = "2")]
    node_name: String,
}

/// The part of a stored task the store's indexes need when the task is
/// rewritten: prost skips every other field, so no spec, string or node
/// id is decoded.
#[derive(Clone, PartialEq, Message)]
struct StoredHead {
    #[prost(message, optional, tag = "1")]
    task: Option<TaskHead>,
}

#[derive(Clone, PartialEq, Message)]
struct TaskHead {
    #[prost(int32, tag = "3")]
    state: i32,
    #[prost(message, optional, tag = "12")]
    updated_at: Option<prost_types::Timestamp>,
}

/// A stored task's state and last change, without decoding the rest.
pub(crate) fn decode_task_head(bytes: &[u8]) -> Result<(TaskState, SystemTime), StoreError> {
    let head = StoredHead::decode(bytes).map_err(|e| corrupt("task", e))?;
    let task = head.task.ok_or_else(|| corrupt("task", "no task"))?;
    let state = TaskState::try_from(task.state).map_err(|e| corrupt("task state", e))?;
    let updated_at = task
        .updated_at
        .as_ref()
        .map_or(std::time::UNIX_EPOCH, system_time);
    Ok((state, updated_at))
}

/// A message's stored bytes, with room left for the checksum the store
/// appends (`seal.rs`), so sealing never moves them.
trait Stored: Message + Sized {
    fn stored(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.encoded_len() + super::seal::CHECKSUM_LEN);
        self.encode_raw(&mut bytes);
        bytes
    }
}

impl<M: Message> Stored for M {}

fn corrupt(what: &'static str, message: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        message: message.to_string(),
    }
}

/// A task record as stored bytes.
pub(crate) fn encode_task(record: &TaskRecord) -> Vec<u8> {
    encode_stored_task(record, true)
}

/// A task's secret environment as stored: in a table of its own, never
/// inside the task record that readers decode.
#[derive(Clone, PartialEq, Message)]
struct StoredSecrets {
    #[prost(btree_map = "string, string", tag = "1")]
    env: std::collections::BTreeMap<String, String>,
}

/// A task's secret environment as stored bytes.
pub(crate) fn encode_secrets(env: &SecretEnv) -> Vec<u8> {
    StoredSecrets { env: env.to_pb() }.stored()
}

/// A task's secret environment from stored bytes.
pub(crate) fn decode_secrets(bytes: &[u8]) -> Result<SecretEnv, StoreError> {
    let stored = StoredSecrets::decode(bytes).map_err(|e| corrupt("secrets", e))?;
    Ok(stored.env.into_iter().collect())
}

/// A task record from stored bytes (`next_seq` is left 0 for the caller).
pub(crate) fn decode_task(id: TaskId, bytes: &[u8]) -> Result<TaskRecord, StoreError> {
    decode_stored_task(id, bytes, None)
}

/// A task record as stored bytes without its spec, for a store that keeps
/// each task's spec once, apart ([`encode_spec`]): a spec never changes
/// after submit, while the record is written again at every change.
pub(crate) fn encode_task_without_spec(record: &TaskRecord) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(128 + super::seal::CHECKSUM_LEN);
    encode_task_without_spec_into(record, &mut bytes);
    bytes
}

/// Appends what [`encode_task_without_spec`] answers to `buf`, written
/// field by field ([`wire`]).
pub(crate) fn encode_task_without_spec_into(record: &TaskRecord, buf: &mut Vec<u8>) {
    wire::stored_task(buf, record);
}

fn encode_stored_task(record: &TaskRecord, with_spec: bool) -> Vec<u8> {
    StoredTask {
        task: Some(stored_task_pb(record, with_spec, true)),
        lost_nodes: record
            .lost_nodes
            .iter()
            .map(|(id, name)| StoredNode {
                node_id: id.to_string(),
                node_name: name.to_string(),
            })
            .collect(),
        cancel_requested: record.cancel_requested.clone().unwrap_or_default(),
    }
    .stored()
}

/// A task record from bytes of [`encode_task_without_spec`], with `spec`.
pub(crate) fn decode_task_with_spec(
    id: TaskId,
    bytes: &[u8],
    spec: Arc<TaskSpec>,
) -> Result<TaskRecord, StoreError> {
    decode_stored_task(id, bytes, Some(spec))
}

/// A task's spec as stored bytes (never its secrets).
pub(crate) fn encode_spec(spec: &TaskSpec) -> Vec<u8> {
    spec.to_bytes_without_secrets(super::seal::CHECKSUM_LEN)
}

/// A task's spec from bytes of [`encode_spec`].
pub(crate) fn decode_spec(bytes: &[u8]) -> Result<Arc<TaskSpec>, StoreError> {
    let pb = pb::TaskSpec::decode(bytes).map_err(|e| corrupt("task spec", e))?;
    Ok(Arc::new(
        TaskSpec::try_from(pb).map_err(|e| corrupt("task spec", e))?,
    ))
}

/// A task record from stored bytes; its spec is `spec`, or the one the
/// bytes hold.
fn decode_stored_task(
    id: TaskId,
    bytes: &[u8],
    spec: Option<Arc<TaskSpec>>,
) -> Result<TaskRecord, StoreError> {
    let stored = StoredTask::decode(bytes).map_err(|e| corrupt("task", e))?;
    let mut task = stored.task.ok_or_else(|| corrupt("task", "no task"))?;
    let spec = match spec {
        Some(spec) => spec,
        None => {
            let spec = task.spec.take().ok_or_else(|| corrupt("task", "no spec"))?;
            Arc::new(TaskSpec::try_from(spec).map_err(|e| corrupt("task spec", e))?)
        }
    };
    let mut record = record_from_pb(id, task, spec)?;
    record.lost_nodes = stored
        .lost_nodes
        .into_iter()
        .map(|n| {
            let id = n
                .node_id
                .parse::<NodeId>()
                .map_err(|e| corrupt("node", e))?;
            Ok((id, Arc::from(n.node_name)))
        })
        .collect::<Result<_, StoreError>>()?;
    record.cancel_requested = Some(stored.cancel_requested).filter(|r| !r.is_empty());
    Ok(record)
}

fn record_from_pb(
    id: TaskId,
    task: pb::Task,
    spec: Arc<TaskSpec>,
) -> Result<TaskRecord, StoreError> {
    let state = TaskState::try_from(task.state).map_err(|e| corrupt("task state", e))?;
    let node_id = match task.node_id.as_str() {
        "" => None,
        text => Some(text.parse::<NodeId>().map_err(|e| corrupt("node id", e))?),
    };
    let node_name: Option<Arc<str>> =
        (!task.node_name.is_empty()).then(|| Arc::from(task.node_name));
    let own_node = node_id.zip(node_name.as_ref());
    let attempts = task
        .attempts
        .into_iter()
        .map(|attempt| attempt_from_pb(attempt, own_node))
        .collect::<Result<_, _>>()?;
    Ok(TaskRecord {
        id,
        spec,
        state,
        attempt: Attempt(task.attempt),
        node_id,
        node_name,
        exit_code: task.exit_code,
        output: task.output,
        error: task.error,
        pending_reason: String::new(),
        waiting_for: Vec::new(),
        job_id: match task.job_id.as_str() {
            "" => None,
            text => Some(text.parse::<TaskId>().map_err(|e| corrupt("job id", e))?),
        },
        failures: task.failures,
        node_losses: task.node_losses,
        created_at: task
            .created_at
            .as_ref()
            .map_or(std::time::UNIX_EPOCH, system_time),
        updated_at: task
            .updated_at
            .as_ref()
            .map_or(std::time::UNIX_EPOCH, system_time),
        next_seq: task.next_seq,
        last_outcome: Outcome::try_from(task.last_outcome).ok(),
        lost_nodes: Vec::new(),
        cancel_requested: None,
        attempts,
    })
}

/// An event as stored bytes.
pub(crate) fn encode_event(event: &TaskEvent) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64 + super::seal::CHECKSUM_LEN);
    encode_event_into(event, &mut bytes);
    bytes
}

/// Appends an event's stored bytes (what [`encode_event`] answers) to
/// `buf`. A state change or a `finished` event, four of every task's five
/// events, is written field by field ([`wire`]).
pub(crate) fn encode_event_into(event: &TaskEvent, buf: &mut Vec<u8>) {
    if wire::event(buf, event) {
        return;
    }
    event_pb(event, true).encode_raw(buf);
    if let EventBody::Output {
        chunk: Some(chunk), ..
    } = event.body
    {
        // Appended as a field `pb::TaskEvent` does not have: protobuf
        // merges concatenated messages, and older readers skip it.
        StoredChunk { chunk: Some(chunk) }.encode_raw(buf);
    }
}

/// The stored-only part of an output event: the node's chunk number, in a
/// field number `pb::TaskEvent` will never use, so the wire form stays the
/// stored form and stores written before it stay readable.
#[derive(Clone, PartialEq, Message)]
struct StoredChunk {
    #[prost(uint64, optional, tag = "1000")]
    chunk: Option<u64>,
}

/// An event from stored bytes. `spec` is the task's spec, put back into a
/// `finished` event's record.
pub(crate) fn decode_event(
    task_id: TaskId,
    bytes: &[u8],
    spec: &Arc<TaskSpec>,
) -> Result<TaskEvent, StoreError> {
    use pb::task_event::Body;
    let message = pb::TaskEvent::decode(bytes).map_err(|e| corrupt("event", e))?;
    let body = match message.body.ok_or_else(|| corrupt("event", "no body"))? {
        Body::State(s) => EventBody::State {
            state: TaskState::try_from(s.state).map_err(|e| corrupt("event state", e))?,
            node_id: match s.node_id.as_str() {
                "" => None,
                text => Some(text.parse::<NodeId>().map_err(|e| corrupt("node id", e))?),
            },
            node_name: (!s.node_name.is_empty()).then(|| Arc::from(s.node_name)),
            reason: s.reason,
        },
        Body::Output(o) => EventBody::Output {
            stream: OutputStream::try_from(o.stream).unwrap_or(OutputStream::Stdout),
            data: o.data,
            chunk: StoredChunk::decode(bytes)
                .map_err(|e| corrupt("event chunk", e))?
                .chunk,
        },
        Body::Progress(p) => EventBody::Progress {
            fraction: p.fraction,
            message: p.message,
        },
        Body::Finished(task) => {
            EventBody::Finished(Arc::new(record_from_pb(task_id, task, Arc::clone(spec))?))
        }
    };
    Ok(TaskEvent {
        task_id,
        seq: message.seq,
        attempt: Attempt(message.attempt),
        time: message
            .time
            .as_ref()
            .map_or(std::time::UNIX_EPOCH, system_time),
        body,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use bytes::Bytes;

    use super::*;

    fn record() -> TaskRecord {
        TaskRecord {
            id: TaskId::new(),
            spec: Arc::new(TaskSpec::exec(["echo", "hi"]).label("gpu", "1").slots(2)),
            state: TaskState::Failed,
            attempt: Attempt(2),
            node_id: Some(NodeId::new()),
            node_name: Some(Arc::from("n1")),
            exit_code: Some(3),
            output: Bytes::from_static(b"out"),
            error: "boom".into(),
            pending_reason: String::new(),
            waiting_for: Vec::new(),
            job_id: None,
            failures: 1,
            node_losses: 1,
            created_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            updated_at: UNIX_EPOCH + Duration::from_millis(1_700_000_001_456),
            next_seq: 0,
            last_outcome: Some(Outcome::Failed),
            lost_nodes: vec![(NodeId::new(), Arc::from("n0"))],
            cancel_requested: Some("not needed".into()),
            attempts: vec![
                AttemptRecord {
                    number: Attempt(1),
                    node_id: NodeId::new(),
                    node_name: Arc::from("n0"),
                    assigned_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_200),
                    started_at: None,
                    ended_at: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_300)),
                    outcome: None,
                    exit_code: None,
                    reason: "node n0 lost; retrying as attempt 2".into(),
                },
                AttemptRecord {
                    number: Attempt(2),
                    node_id: NodeId::new(),
                    node_name: Arc::from("n1"),
                    assigned_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_400),
                    started_at: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500)),
                    ended_at: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_001_456)),
                    outcome: Some(Outcome::Failed),
                    exit_code: Some(3),
                    reason: "boom".into(),
                },
            ],
        }
    }

    #[test]
    fn a_record_stored_before_attempt_history_loads_with_none() {
        // What an older coordinator stored: the same message without field 17.
        let mut record = record();
        let mut stored = StoredTask {
            task: Some(stored_task_pb(&record, true, true)),
            lost_nodes: Vec::new(),
            cancel_requested: String::new(),
        };
        if let Some(task) = &mut stored.task {
            task.attempts.clear();
        }
        let bytes = stored.encode_to_vec();
        let back = decode_task(record.id, &bytes).unwrap();
        record.attempts.clear();
        record.lost_nodes.clear();
        record.cancel_requested = None;
        assert_eq!(back, record);
    }

    #[test]
    fn a_task_record_survives_encoding() {
        let record = record();
        let back = decode_task(record.id, &encode_task(&record)).unwrap();
        assert_eq!(back, record);
    }

    #[test]
    fn the_latest_attempt_is_stored_without_the_node_its_record_names() {
        let mut record = record();
        let node = record.node_id.unwrap();
        record.attempts[1].node_id = node;
        let bytes = encode_task(&record);
        let stored = StoredTask::decode(bytes.as_slice()).unwrap().task.unwrap();
        assert_eq!(stored.attempts[1].node_id, "", "left to the record");
        assert_eq!(stored.attempts[1].node_name, "");
        assert_eq!(stored.attempts[0].node_name, "n0", "another node is kept");
        assert_eq!(decode_task(record.id, &bytes).unwrap(), record);
        // Readers get it whole.
        let wire = task_to_pb(&record);
        assert_eq!(wire.attempts[1].node_id, node.to_string());
        assert_eq!(wire.attempts[1].node_name, "n1");
    }

    #[test]
    fn a_finished_event_is_stored_without_its_spec_and_read_back_whole() {
        let record = record();
        let event = TaskEvent {
            task_id: record.id,
            seq: 7,
            attempt: Attempt(2),
            time: record.updated_at,
            body: EventBody::Finished(Arc::new(TaskRecord {
                lost_nodes: Vec::new(),
                cancel_requested: None,
                next_seq: 8,
                ..record.clone()
            })),
        };
        let bytes = encode_event(&event);
        assert!(!bytes.windows(4).any(|w| w == b"echo"), "spec stored twice");
        let back = decode_event(record.id, &bytes, &record.spec).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn an_output_events_chunk_seq_is_stored_apart_and_older_readers_skip_it() {
        let id = TaskId::new();
        let spec = Arc::new(TaskSpec::call("noop", ""));
        let output = |chunk| TaskEvent {
            task_id: id,
            seq: 4,
            attempt: Attempt(2),
            time: UNIX_EPOCH + Duration::from_secs(1),
            body: EventBody::Output {
                stream: OutputStream::Stderr,
                data: Bytes::from_static(b"line"),
                chunk,
            },
        };
        let numbered = output(Some(7));
        let bytes = encode_event(&numbered);
        assert_eq!(decode_event(id, &bytes, &spec).unwrap(), numbered);
        // An older coordinator reads the same event, without the number.
        let old = pb::TaskEvent::decode(&bytes[..]).unwrap();
        assert_eq!(old, event_pb(&numbered, true));
        // And what it wrote reads back without one.
        let unnumbered = output(None);
        let bytes = event_pb(&unnumbered, true).encode_to_vec();
        assert_eq!(decode_event(id, &bytes, &spec).unwrap(), unnumbered);
    }

    proptest::proptest! {
        /// A state change written field by field is byte for byte what the
        /// generated encoder writes for its message, and reads back whole.
        #[test]
        fn a_state_event_is_stored_as_the_generated_encoder_writes_it(
            state in 0..TaskState::ALL.len(),
            node in proptest::option::of(proptest::prelude::any::<u128>()),
            node_name in proptest::option::of("[a-z0-9.-]{0,40}"),
            reason in "(.{0,20}|.{120,300})",
            seq in proptest::prelude::any::<u64>(),
            attempt in proptest::prelude::any::<u32>(),
            nanos in proptest::prelude::any::<u64>(),
        ) {
            let id = TaskId::new();
            let event = TaskEvent {
                task_id: id,
                seq,
                attempt: Attempt(attempt),
                time: UNIX_EPOCH + Duration::from_nanos(nanos),
                body: EventBody::State {
                    state: TaskState::ALL[state],
                    node_id: node.map(NodeId::from_u128),
                    node_name: node_name.map(Arc::from),
                    reason,
                },
            };
            let bytes = encode_event(&event);
            proptest::prop_assert_eq!(&bytes, &event_pb(&event, true).encode_to_vec());
            let spec = Arc::new(TaskSpec::call("noop", ""));
            let back = decode_event(id, &bytes, &spec).unwrap();
            // A name is stored as text: an empty one reads back as none.
            let mut expected = event.clone();
            if let EventBody::State { node_name, .. } = &mut expected.body
                && node_name.as_deref() == Some("")
            {
                *node_name = None;
            }
            proptest::prop_assert_eq!(back, expected);
        }
    }

    /// A record with every field drawn: what the property tests below
    /// encode both ways.
    fn any_record() -> impl proptest::strategy::Strategy<Value = TaskRecord> {
        use proptest::prelude::*;
        let time = any::<u64>().prop_map(|n| UNIX_EPOCH + Duration::from_nanos(n));
        let text = "(.{0,12}|.{130,200})";
        let attempt = (
            1u32..4,
            any::<u128>(),
            "[a-z0-9]{0,8}",
            time.clone(),
            proptest::option::of(time.clone()),
            proptest::option::of(time.clone()),
            proptest::option::of(0..Outcome::ALL.len()),
            proptest::option::of(any::<i32>()),
            text,
        )
            .prop_map(
                |(number, node, name, assigned, started, ended, outcome, exit, reason)| {
                    AttemptRecord {
                        number: Attempt(number),
                        node_id: NodeId::from_u128(node),
                        node_name: Arc::from(name),
                        assigned_at: assigned,
                        started_at: started,
                        ended_at: ended,
                        outcome: outcome.map(|i| Outcome::ALL[i]),
                        exit_code: exit,
                        reason,
                    }
                },
            );
        (
            (
                0..TaskState::ALL.len(),
                0u32..4,
                proptest::option::of(any::<u128>()),
                proptest::option::of("[a-z0-9.-]{0,12}"),
                proptest::option::of(any::<i32>()),
                proptest::collection::vec(any::<u8>(), 0..300),
                text,
                text,
            ),
            (
                time.clone(),
                time,
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                proptest::option::of(0..Outcome::ALL.len()),
                proptest::collection::vec(attempt, 0..3),
                proptest::option::of(any::<u128>()),
                proptest::collection::vec((any::<u128>(), "[a-z0-9]{0,8}"), 0..3),
                proptest::option::of("(.{1,12}|.{130,200})"),
            ),
        )
            .prop_map(
                |(
                    (state, attempt, node, name, exit, output, error, pending),
                    (
                        created,
                        updated,
                        failures,
                        losses,
                        next_seq,
                        outcome,
                        attempts,
                        job,
                        lost,
                        cancel,
                    ),
                )| {
                    let mut attempts: Vec<AttemptRecord> = attempts;
                    // Now and then the latest attempt is the record's own,
                    // which is stored without its node.
                    if let (Some(node), Some(last)) = (node, attempts.last_mut())
                        && failures % 2 == 0
                    {
                        last.number = Attempt(attempt);
                        last.node_id = NodeId::from_u128(node);
                    }
                    TaskRecord {
                        id: TaskId::new(),
                        spec: Arc::new(TaskSpec::call("noop", "")),
                        state: TaskState::ALL[state],
                        attempt: Attempt(attempt),
                        node_id: node.map(NodeId::from_u128),
                        node_name: name.map(Arc::from),
                        exit_code: exit,
                        output: Bytes::from(output),
                        error,
                        pending_reason: pending,
                        waiting_for: Vec::new(),
                        job_id: job.map(TaskId::from_u128),
                        failures,
                        node_losses: losses,
                        created_at: created,
                        updated_at: updated,
                        next_seq,
                        last_outcome: outcome.map(|i| Outcome::ALL[i]),
                        lost_nodes: lost
                            .into_iter()
                            .map(|(id, name)| (NodeId::from_u128(id), Arc::from(name)))
                            .collect(),
                        cancel_requested: cancel,
                        attempts,
                    }
                },
            )
    }

    proptest::proptest! {
        /// A task record written field by field is byte for byte what the
        /// generated encoder writes for its stored message.
        #[test]
        fn a_task_record_is_stored_as_the_generated_encoder_writes_it(record in any_record()) {
            proptest::prop_assert_eq!(
                encode_task_without_spec(&record),
                encode_stored_task(&record, false)
            );
        }

        /// So is a `finished` event, and it reads back whole.
        #[test]
        fn a_finished_event_is_stored_as_the_generated_encoder_writes_it(
            record in any_record(),
            seq in proptest::prelude::any::<u64>(),
        ) {
            let event = TaskEvent {
                task_id: record.id,
                seq,
                attempt: record.attempt,
                time: record.updated_at,
                body: EventBody::Finished(Arc::new(TaskRecord {
                    lost_nodes: Vec::new(),
                    ..record.clone()
                })),
            };
            let bytes = encode_event(&event);
            proptest::prop_assert_eq!(&bytes, &event_pb(&event, true).encode_to_vec());
        }
    }

    #[test]
    fn an_event_appended_in_place_is_the_event_alone() {
        let id = TaskId::new();
        let event = TaskEvent {
            task_id: id,
            seq: 3,
            attempt: Attempt(1),
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            body: EventBody::State {
                state: TaskState::Running,
                node_id: Some(NodeId::new()),
                node_name: Some(Arc::from("n1")),
                reason: String::new(),
            },
        };
        let mut buf = b"before".to_vec();
        encode_event_into(&event, &mut buf);
        assert_eq!(&buf[..6], b"before");
        assert_eq!(&buf[6..], encode_event(&event).as_slice());
    }

    #[test]
    fn the_head_of_a_stored_task_is_its_state_and_last_change() {
        let record = record();
        let (state, updated_at) = decode_task_head(&encode_task(&record)).unwrap();
        assert_eq!((state, updated_at), (record.state, record.updated_at));
    }

    #[test]
    fn a_borrowed_spec_encodes_like_an_owned_one() {
        let exec = TaskSpec::exec(["sh", "-c", "cat"])
            .env("A", "1")
            .cwd("/tmp")
            .name("cat")
            .label("zone", "a")
            .timeout(Duration::from_secs(3))
            .slots(2);
        let call = TaskSpec::call("noop", Bytes::from_static(b"in")).label("gpu", "1");
        for spec in [exec, call] {
            assert_eq!(pb::TaskSpec::from(&spec), pb::TaskSpec::from(spec.clone()));
        }
    }

    #[test]
    fn garbage_is_a_corrupt_record_not_a_panic() {
        let err = decode_task(TaskId::new(), &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }
}

/// A token record as stored: never the secret, only its SHA-256. Times are
/// milliseconds since the epoch (0: unset).
#[derive(Clone, PartialEq, Message)]
struct StoredToken {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(uint32, tag = "3")]
    kind: u32,
    #[prost(uint32, tag = "4")]
    scopes: u32,
    #[prost(uint64, tag = "5")]
    created_ms: u64,
    #[prost(uint64, tag = "6")]
    expires_ms: u64,
    #[prost(uint64, tag = "7")]
    revoked_ms: u64,
    #[prost(bytes = "vec", tag = "8")]
    secret_hash: Vec<u8>,
    /// Join tokens: joins allowed (0: no limit). Absent in records from
    /// before join tokens, which read as 0.
    #[prost(uint32, tag = "9")]
    uses: u32,
    /// Join tokens: joins made.
    #[prost(uint32, tag = "10")]
    used: u32,
}

fn to_ms(t: SystemTime) -> u64 {
    u64::try_from(
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
    .max(1)
}

fn from_ms(ms: u64) -> Option<SystemTime> {
    (ms != 0).then(|| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// A token record as stored bytes.
pub(crate) fn encode_token(record: &TokenRecord) -> Vec<u8> {
    StoredToken {
        id: record.id.clone(),
        name: record.name.clone(),
        kind: u32::from(record.kind.to_u8()),
        scopes: u32::from(record.scopes.bits()),
        created_ms: to_ms(record.created),
        expires_ms: record.expires.map_or(0, to_ms),
        revoked_ms: record.revoked.map_or(0, to_ms),
        secret_hash: record.secret_hash.to_vec(),
        uses: record.uses,
        used: record.used,
    }
    .stored()
}

/// A token record from stored bytes.
pub(crate) fn decode_token(bytes: &[u8]) -> Result<TokenRecord, StoreError> {
    let stored = StoredToken::decode(bytes).map_err(|e| corrupt("token", e))?;
    let secret_hash: [u8; 32] = stored
        .secret_hash
        .as_slice()
        .try_into()
        .map_err(|_| corrupt("token", "hash is not 32 bytes"))?;
    Ok(TokenRecord {
        id: stored.id,
        name: stored.name,
        kind: TokenKind::from_u8(u8::try_from(stored.kind).unwrap_or(u8::MAX)),
        scopes: Scopes::from_bits(u8::try_from(stored.scopes).unwrap_or(0)),
        created: from_ms(stored.created_ms).unwrap_or(std::time::UNIX_EPOCH),
        expires: from_ms(stored.expires_ms),
        revoked: from_ms(stored.revoked_ms),
        secret_hash,
        uses: stored.uses,
        used: stored.used,
    })
}

/// A node identity as stored. Times as for tokens.
#[derive(Clone, PartialEq, Message)]
struct StoredNodeIdentity {
    #[prost(bytes = "vec", tag = "1")]
    id: Vec<u8>,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(uint64, tag = "3")]
    created_ms: u64,
    #[prost(string, tag = "4")]
    token_id: String,
    #[prost(uint64, tag = "5")]
    revoked_ms: u64,
}

/// A node identity as stored bytes.
pub(crate) fn encode_node_identity(record: &NodeIdentityRecord) -> Vec<u8> {
    StoredNodeIdentity {
        id: record.id.as_u128().to_be_bytes().to_vec(),
        name: record.name.clone(),
        created_ms: to_ms(record.created),
        token_id: record.token_id.clone(),
        revoked_ms: record.revoked.map_or(0, to_ms),
    }
    .stored()
}

/// A node identity from stored bytes.
pub(crate) fn decode_node_identity(bytes: &[u8]) -> Result<NodeIdentityRecord, StoreError> {
    let stored = StoredNodeIdentity::decode(bytes).map_err(|e| corrupt("node identity", e))?;
    let id: [u8; 16] = stored
        .id
        .as_slice()
        .try_into()
        .map_err(|_| corrupt("node identity", "id is not 16 bytes"))?;
    Ok(NodeIdentityRecord {
        id: NodeId::from_u128(u128::from_be_bytes(id)),
        name: stored.name,
        created: from_ms(stored.created_ms).unwrap_or(std::time::UNIX_EPOCH),
        token_id: stored.token_id,
        revoked: from_ms(stored.revoked_ms),
    })
}
