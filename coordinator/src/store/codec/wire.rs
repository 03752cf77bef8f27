//! The stored forms written most often, field by field from a borrow: a
//! task's record (written again at each of its changes) and its state and
//! `finished` events. The bytes are the generated encoder's for the
//! messages [`super`] builds (`StoredTask`, `pb::TaskEvent`), fields in tag
//! order, a proto3 field at its default left out; the tests hold them
//! equal. What is skipped: building each message with its node ids
//! formatted into strings of their own and its names and texts copied,
//! walking its lengths once to size it and again to write it, and copying
//! the result out of a vector of its own.

use std::time::SystemTime;

use prost::encoding::{WireType, encode_key, encode_varint, int32, int64, uint32, uint64};

use weft_proto::convert::timestamp;

use crate::store::record::{AttemptRecord, EventBody, TaskEvent, TaskRecord};

/// A length-delimited field whose body `write` appends: its length is
/// written in one byte and moved over when the body turns out longer
/// (rare: most bodies here are under 128 bytes).
fn nested(buf: &mut Vec<u8>, tag: u32, write: impl FnOnce(&mut Vec<u8>)) {
    encode_key(tag, WireType::LengthDelimited, buf);
    let at = buf.len();
    buf.push(0);
    write(buf);
    let len = buf.len() - at - 1;
    match u8::try_from(len) {
        Ok(short) if short < 0x80 => buf[at] = short,
        _ => {
            let mut prefix = Vec::with_capacity(10);
            encode_varint(len as u64, &mut prefix);
            buf.splice(at..=at, prefix);
        }
    }
}

/// A string or bytes field (nothing when empty).
fn text(buf: &mut Vec<u8>, tag: u32, value: &[u8]) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.extend_from_slice(value);
    }
}

/// A uint32 field (nothing when zero).
fn u32_field(buf: &mut Vec<u8>, tag: u32, value: u32) {
    if value != 0 {
        uint32::encode(tag, &value, buf);
    }
}

/// An int32 or enum field (nothing when zero).
fn i32_field(buf: &mut Vec<u8>, tag: u32, value: i32) {
    if value != 0 {
        int32::encode(tag, &value, buf);
    }
}

/// An `optional int32` field: written when set, zero included.
fn optional_i32(buf: &mut Vec<u8>, tag: u32, value: Option<i32>) {
    if let Some(value) = value {
        int32::encode(tag, &value, buf);
    }
}

/// A `google.protobuf.Timestamp` field (always written: the message is set).
fn time_field(buf: &mut Vec<u8>, tag: u32, at: SystemTime) {
    let time = timestamp(at);
    nested(buf, tag, |buf| {
        if time.seconds != 0 {
            int64::encode(1, &time.seconds, buf);
        }
        if time.nanos != 0 {
            int32::encode(2, &time.nanos, buf);
        }
    });
}

/// A 128-bit id as its 26 characters, formatted on the stack.
fn id_field(buf: &mut Vec<u8>, tag: u32, id: u128) {
    let mut chars = [0; ulid::ULID_LEN];
    text(buf, tag, ulid::Ulid(id).array_to_str(&mut chars).as_bytes());
}

/// The fields of a stored `pb::Task` (without id or spec; the latest
/// attempt without its node when that is the record's own), with
/// `pending_reason` and `next_seq` as given: what `stored_task_pb` builds.
fn task_fields(buf: &mut Vec<u8>, record: &TaskRecord, pending_reason: &str, next_seq: u64) {
    i32_field(buf, 3, i32::from(record.state));
    u32_field(buf, 4, record.attempt.0);
    if let Some(node) = record.node_id {
        id_field(buf, 5, node.as_u128());
    }
    text(
        buf,
        6,
        record.node_name.as_deref().unwrap_or_default().as_bytes(),
    );
    optional_i32(buf, 7, record.exit_code);
    text(buf, 8, &record.output);
    text(buf, 9, record.error.as_bytes());
    text(buf, 10, pending_reason.as_bytes());
    time_field(buf, 11, record.created_at);
    time_field(buf, 12, record.updated_at);
    u32_field(buf, 13, record.failures);
    u32_field(buf, 14, record.node_losses);
    if next_seq != 0 {
        uint64::encode(15, &next_seq, buf);
    }
    i32_field(buf, 16, record.last_outcome.map_or(0, i32::from));
    for attempt in &record.attempts {
        let own_node = attempt.number == record.attempt && Some(attempt.node_id) == record.node_id;
        nested(buf, 17, |buf| attempt_fields(buf, attempt, !own_node));
    }
    if let Some(job) = record.job_id {
        id_field(buf, 18, job.as_u128());
    }
}

/// The fields of a `pb::Attempt`, without its node unless `with_node`.
fn attempt_fields(buf: &mut Vec<u8>, attempt: &AttemptRecord, with_node: bool) {
    u32_field(buf, 1, attempt.number.0);
    if with_node {
        id_field(buf, 2, attempt.node_id.as_u128());
        text(buf, 3, attempt.node_name.as_bytes());
    }
    time_field(buf, 4, attempt.assigned_at);
    if let Some(at) = attempt.started_at {
        time_field(buf, 5, at);
    }
    if let Some(at) = attempt.ended_at {
        time_field(buf, 6, at);
    }
    i32_field(buf, 7, attempt.outcome.map_or(0, i32::from));
    optional_i32(buf, 8, attempt.exit_code);
    text(buf, 9, attempt.reason.as_bytes());
}

/// Appends a task record as stored without its spec: a `StoredTask`.
pub(super) fn stored_task(buf: &mut Vec<u8>, record: &TaskRecord) {
    nested(buf, 1, |buf| task_fields(buf, record, "", 0));
    for (node, name) in &record.lost_nodes {
        nested(buf, 2, |buf| {
            id_field(buf, 1, node.as_u128());
            text(buf, 2, name.as_bytes());
        });
    }
    text(
        buf,
        3,
        record
            .cancel_requested
            .as_deref()
            .unwrap_or_default()
            .as_bytes(),
    );
}

/// Appends a state or `finished` event as stored (no task id; a finished
/// record without its spec); `false`, writing nothing, for any other
/// event, which is left to the generated encoder.
pub(super) fn event(buf: &mut Vec<u8>, event: &TaskEvent) -> bool {
    if !matches!(event.body, EventBody::State { .. } | EventBody::Finished(_)) {
        return false;
    }
    // Field 1, the task id, is the record's key: left out.
    if event.seq != 0 {
        uint64::encode(2, &event.seq, buf);
    }
    u32_field(buf, 3, event.attempt.0);
    time_field(buf, 4, event.time);
    match &event.body {
        EventBody::State {
            state,
            node_id,
            node_name,
            reason,
        } => nested(buf, 5, |buf| {
            i32_field(buf, 1, i32::from(*state));
            if let Some(node) = node_id {
                id_field(buf, 2, node.as_u128());
            }
            text(buf, 3, node_name.as_deref().unwrap_or_default().as_bytes());
            text(buf, 4, reason.as_bytes());
        }),
        EventBody::Finished(record) => nested(buf, 8, |buf| {
            task_fields(buf, record, &record.pending_reason, record.next_seq);
        }),
        EventBody::Output { .. } | EventBody::Progress { .. } => {}
    }
    true
}
