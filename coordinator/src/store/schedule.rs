//! What the store keeps of a cron schedule ([`ScheduleRecord`]) and its
//! stored bytes. Written in the driver's batches like task records
//! ([`Record::Schedule`](super::Record::Schedule) and
//! [`Record::DeleteSchedule`](super::Record::DeleteSchedule)): a fire's
//! task and the schedule's new `last_fire` are in the same commit.

use std::time::SystemTime;

use prost::Message;

use weft_proto::convert::{system_time, timestamp};
use weft_proto::{TaskId, pb};

use super::engine::StoreError;

/// A schedule as stored: its spec as created and how it stands.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleRecord {
    /// As created (name, cron, zone, task, policies); validated then.
    pub spec: pb::ScheduleSpec,
    /// Paused schedules do not fire.
    pub paused: bool,
    /// When it was created.
    pub created_at: SystemTime,
    /// Fire times at or before this are never fired: its creation, or its
    /// last resume (what passed while paused is not caught up).
    pub since: SystemTime,
    /// The latest fire time handled (fired or skipped). A fire time at or
    /// before it is never fired again: this is what makes a fire happen
    /// exactly once across restarts.
    pub last_fire: Option<SystemTime>,
    /// The task the latest fire submitted (`None`: skipped, or none yet).
    pub last_task: Option<TaskId>,
    /// Fires that submitted a task.
    pub fired: u64,
    /// Fires skipped (overlap, a full queue).
    pub skipped: u64,
}

impl ScheduleRecord {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

#[derive(Clone, PartialEq, Message)]
struct StoredSchedule {
    #[prost(message, optional, tag = "1")]
    spec: Option<pb::ScheduleSpec>,
    #[prost(bool, tag = "2")]
    paused: bool,
    #[prost(message, optional, tag = "3")]
    created_at: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "4")]
    since: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "5")]
    last_fire: Option<prost_types::Timestamp>,
    #[prost(string, tag = "6")]
    last_task_id: String,
    #[prost(uint64, tag = "7")]
    fired: u64,
    #[prost(uint64, tag = "8")]
    skipped: u64,
}

/// A schedule record as stored bytes.
pub(crate) fn encode_schedule(record: &ScheduleRecord) -> Vec<u8> {
    StoredSchedule {
        spec: Some(record.spec.clone()),
        paused: record.paused,
        created_at: Some(timestamp(record.created_at)),
        since: Some(timestamp(record.since)),
        last_fire: record.last_fire.map(timestamp),
        last_task_id: record
            .last_task
            .map(|id| id.to_string())
            .unwrap_or_default(),
        fired: record.fired,
        skipped: record.skipped,
    }
    .encode_to_vec()
}

/// Stored bytes as a schedule record.
pub(crate) fn decode_schedule(bytes: &[u8]) -> Result<ScheduleRecord, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        what: "schedule",
        message,
    };
    let stored = StoredSchedule::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    let spec = stored.spec.ok_or_else(|| corrupt("no spec".into()))?;
    let created_at = stored
        .created_at
        .as_ref()
        .map_or(SystemTime::UNIX_EPOCH, system_time);
    let last_task = match stored.last_task_id.as_str() {
        "" => None,
        id => Some(
            id.parse::<TaskId>()
                .map_err(|e| corrupt(format!("last task id: {e}")))?,
        ),
    };
    Ok(ScheduleRecord {
        spec,
        paused: stored.paused,
        created_at,
        since: stored.since.as_ref().map_or(created_at, system_time),
        last_fire: stored.last_fire.as_ref().map(system_time),
        last_task,
        fired: stored.fired,
        skipped: stored.skipped,
    })
}
