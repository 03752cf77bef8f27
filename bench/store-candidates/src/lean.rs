//! What the sketched stores (b, c, d) write, from the driver's records.
//!
//! A task's spec is written once, at submit; each later transition writes a
//! small head (state, attempt, node, times, output, where its events are)
//! instead of the whole record; a commit that touches a task several times
//! writes its head once (the last). Events are small (a state event is a
//! state, an attempt, a time and a node); the `finished` event is a marker,
//! since the final head and the spec are the record it would repeat. Every
//! value ends in a crc32c of its key and bytes, as the real store seals its
//! values.

use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use weft_coordinator::store::{EventBody, Record, TaskRecord};

pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Appends a crc32c of `key` and `value` to `value`.
pub fn seal(key: &[u8], mut value: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(key), &value);
    value.extend_from_slice(&crc.to_le_bytes());
    value
}

/// A task's spec as written at submit.
pub fn spec_bytes(record: &TaskRecord) -> Vec<u8> {
    let spec: weft_proto::pb::TaskSpec = (&*record.spec).into();
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&millis(record.created_at).to_le_bytes());
    spec.encode(&mut out).expect("a Vec grows");
    out
}

/// A task's head: what changes as it moves. `event_commits` are the
/// commits (log positions) its events are in, for candidates that keep
/// events by commit.
pub fn head_bytes(record: &TaskRecord, event_commits: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(state_byte(record));
    out.extend_from_slice(&record.attempt.0.to_le_bytes());
    out.extend_from_slice(&millis(record.updated_at).to_le_bytes());
    out.extend_from_slice(&record.next_seq.to_le_bytes());
    match &record.node_id {
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.as_u128().to_le_bytes());
        }
        None => out.push(0),
    }
    put_bytes(
        &mut out,
        record.node_name.as_deref().unwrap_or("").as_bytes(),
    );
    put_bytes(&mut out, &record.output);
    put_bytes(&mut out, record.error.as_bytes());
    out.push(event_commits.len() as u8);
    for c in event_commits {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out
}

/// An event as written.
pub fn event_bytes(event: &weft_coordinator::store::TaskEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    out.extend_from_slice(&event.attempt.0.to_le_bytes());
    out.extend_from_slice(&millis(event.time).to_le_bytes());
    match &event.body {
        EventBody::State {
            state,
            node_id,
            reason,
            ..
        } => {
            out.push(1);
            out.push(i32::from(*state) as u8);
            out.extend_from_slice(&node_id.map_or(0, |n| n.as_u128()).to_le_bytes());
            put_bytes(&mut out, reason.as_bytes());
        }
        EventBody::Output { data, chunk, .. } => {
            out.push(2);
            out.extend_from_slice(&chunk.unwrap_or(0).to_le_bytes());
            put_bytes(&mut out, data);
        }
        EventBody::Progress { fraction, message } => {
            out.push(3);
            out.extend_from_slice(&fraction.to_le_bytes());
            put_bytes(&mut out, message.as_bytes());
        }
        EventBody::Finished(_) => out.push(4),
    }
    out
}

fn state_byte(record: &TaskRecord) -> u8 {
    i32::from(record.state) as u8
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A commit's writes, coalesced: per task touched, whether it is new (its
/// spec is written), its last record, and its events in order.
pub struct Touched<'a> {
    pub id: u128,
    pub new: bool,
    pub record: Option<&'a TaskRecord>,
    pub events: Vec<&'a weft_coordinator::store::TaskEvent>,
}

/// Groups `records` by task, in first-touched order; the last task record
/// of each task wins.
pub fn coalesce(records: &[Record]) -> Vec<Touched<'_>> {
    let mut order: Vec<Touched<'_>> = Vec::new();
    let mut at: std::collections::HashMap<u128, usize> = std::collections::HashMap::new();
    for record in records {
        let (id, task, event) = match record {
            Record::Task(t) => (t.id.as_u128(), Some(t), None),
            Record::Event(e) => (e.task_id.as_u128(), None, Some(e)),
            _ => continue,
        };
        let slot = *at.entry(id).or_insert_with(|| {
            order.push(Touched {
                id,
                new: false,
                record: None,
                events: Vec::new(),
            });
            order.len() - 1
        });
        let touched = &mut order[slot];
        if let Some(t) = task {
            touched.record = Some(t);
        }
        if let Some(e) = event {
            // A task's first event is written in the commit that submits it.
            touched.new |= e.seq == 0;
            touched.events.push(e);
        }
    }
    order
}
