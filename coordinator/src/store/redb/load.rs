//! What a restart reads from the redb store: the summary (final counts,
//! recent results), the secrets, and the live tasks one at a time in id
//! order. Read-only.

use std::sync::Arc;
use std::time::SystemTime;

use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata};

use weft_proto::{SecretEnv, TaskId, TaskState};

use super::super::codec::{decode_secrets, decode_task};
use super::super::engine::StoreError;
use super::super::record::{FinalAttempt, Loaded, MAX_RECENTLY_FINAL, TaskRecord};
use super::super::seal::{SealKey, open as unseal};
use super::super::{ScheduleRecord, decode_schedule};
use super::{
    BY_STATE, COUNTS, EVENTS, FINAL_BY_TIME, LIVE_STATES, OrBackend, RedbStore, SCHEDULES, SECRETS,
    TASKS, millis, state_key,
};

impl RedbStore {
    /// What a restart reads besides live tasks and secrets: final counts
    /// and recent results.
    pub(super) fn load_summary(
        &self,
        txn: &ReadTransaction,
        final_since: SystemTime,
    ) -> Result<Loaded, StoreError> {
        let op = "loading";
        let tasks = txn.open_table(TASKS).or_backend(op)?;
        let mut loaded = Loaded {
            schedules: read_schedules(txn)?,
            ..Loaded::default()
        };
        let counts = txn.open_table(COUNTS).or_backend(op)?;
        for state in TaskState::ALL.iter().filter(|s| s.is_final()) {
            let count = counts
                .get(state_key(*state))
                .or_backend(op)?
                .map_or(0, |v| v.value());
            if count > 0 {
                loaded.final_counts.push((*state, count));
            }
        }
        let by_time = txn.open_table(FINAL_BY_TIME).or_backend(op)?;
        for entry in by_time
            .range((millis(final_since), 0)..)
            .or_backend(op)?
            .rev()
            .take(MAX_RECENTLY_FINAL)
        {
            let (key, _) = entry.or_backend(op)?;
            let id = TaskId::from_u128(key.value().1);
            if let Some(bytes) = tasks.get(id.as_u128()).or_backend(op)? {
                let key = SealKey::Id(id.as_u128());
                let record = decode_task(id, unseal("tasks", key, bytes.value())?)?;
                loaded.recently_final.push(FinalAttempt {
                    task_id: id,
                    attempt: record.attempt,
                    outcome: record.last_outcome,
                });
            }
        }
        loaded.limits = read_limits(txn)?;
        tracing::debug!(
            path = %self.path.display(),
            tasks = tasks.len().unwrap_or(0),
            "store summary loaded"
        );
        Ok(loaded)
    }
}

/// Every secret environment the store holds.
pub(super) fn read_secrets(
    txn: &ReadTransaction,
) -> Result<Vec<(TaskId, Arc<SecretEnv>)>, StoreError> {
    let op = "loading";
    let secrets = txn.open_table(SECRETS).or_backend(op)?;
    let mut all = Vec::new();
    for entry in secrets.iter().or_backend(op)? {
        let (key, value) = entry.or_backend(op)?;
        let seal_key = SealKey::Id(key.value());
        let env = decode_secrets(unseal("secrets", seal_key, value.value())?)?;
        all.push((TaskId::from_u128(key.value()), Arc::new(env)));
    }
    Ok(all)
}

/// Every cron schedule, by name; none when the table was never made.
fn read_schedules(txn: &ReadTransaction) -> Result<Vec<ScheduleRecord>, StoreError> {
    let op = "loading";
    let table = match txn.open_table(SCHEDULES) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(err) => return Err(err).or_backend(op),
    };
    let mut all = Vec::new();
    for entry in table.iter().or_backend(op)? {
        let (key, value) = entry.or_backend(op)?;
        let bytes = unseal("schedules", SealKey::Name(key.value()), value.value())?;
        all.push(decode_schedule(bytes)?);
    }
    Ok(all)
}

/// Hands every live task (pending, queued, assigned, running) to `each` in
/// id order, one record at a time: the live states' ranges of
/// `tasks_by_state` merged by id, so nothing holds them all.
pub(super) fn each_live(
    txn: &ReadTransaction,
    each: &mut dyn FnMut(TaskRecord),
    next_chunks: &mut Vec<(TaskId, u64)>,
) -> Result<(), StoreError> {
    let op = "loading";
    let tasks = txn.open_table(TASKS).or_backend(op)?;
    let events = txn.open_table(EVENTS).or_backend(op)?;
    let by_state = txn.open_table(BY_STATE).or_backend(op)?;
    let mut ranges = Vec::with_capacity(LIVE_STATES.len());
    for state in LIVE_STATES {
        let s = state_key(state);
        ranges.push(by_state.range((s, 0)..=(s, u128::MAX)).or_backend(op)?);
    }
    let mut heads: Vec<Option<u128>> = Vec::with_capacity(ranges.len());
    for range in &mut ranges {
        heads.push(next_id(range)?);
    }
    // The index has no checksum of its own: each entry is checked against
    // the (sealed) record it names, and the entries per state against the
    // counts, so a changed index byte is reported, never a task lost.
    let damaged = |id: u128, reason: &'static str| StoreError::Damaged {
        table: "tasks_by_state",
        key: TaskId::from_u128(id).to_string(),
        reason,
    };
    let mut seen = [0u64; LIVE_STATES.len()];
    let mut last: Option<u128> = None;
    loop {
        let next = heads
            .iter()
            .enumerate()
            .filter_map(|(i, head)| head.map(|id| (id, i)))
            .min();
        let Some((id, from)) = next else {
            break;
        };
        if last.is_some_and(|last| last >= id) {
            return Err(damaged(id, "an index entry repeats a task"));
        }
        last = Some(id);
        heads[from] = next_id(&mut ranges[from])?;
        let Some(record) = RedbStore::read_task(&tasks, &events, TaskId::from_u128(id))? else {
            return Err(damaged(id, "an index entry names a task with no record"));
        };
        if record.state != LIVE_STATES[from] {
            return Err(damaged(id, "an index entry's state is not its task's"));
        }
        seen[from] += 1;
        // An attempt on a node: the chunks it sends again are dropped
        // by seq from where the store's output ends.
        if matches!(LIVE_STATES[from], TaskState::Assigned | TaskState::Running) {
            let next = super::stored_next_chunk(&events, &record)?;
            if next > 0 {
                next_chunks.push((record.id, next));
            }
        }
        each(record);
    }
    let counts = txn.open_table(COUNTS).or_backend(op)?;
    for (state, seen) in LIVE_STATES.iter().zip(seen) {
        let counted = counts
            .get(state_key(*state))
            .or_backend(op)?
            .map_or(0, |v| v.value());
        if counted != seen {
            return Err(StoreError::Damaged {
                table: "state_counts",
                key: state.to_string(),
                reason: "the tasks the index lists in a state are not as many as counted",
            });
        }
    }
    Ok(())
}

/// The next task id of a `tasks_by_state` range.
fn next_id(range: &mut redb::Range<'static, (u8, u128), ()>) -> Result<Option<u128>, StoreError> {
    match range.next() {
        Some(entry) => Ok(Some(entry.or_backend("loading")?.0.value().1)),
        None => Ok(None),
    }
}

/// Every named limit the store holds (a store made before limits were
/// kept has no such table: none).
pub(super) fn read_limits(
    txn: &ReadTransaction,
) -> Result<Vec<weft_proto::policy::Limit>, StoreError> {
    let op = "loading limits";
    let table = match txn.open_table(super::LIMITS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(err) => return Err::<Vec<_>, _>(err).or_backend(op),
    };
    let mut limits = Vec::new();
    for entry in table.iter().or_backend(op)? {
        let (key, value) = entry.or_backend(op)?;
        let key = key.value();
        let bytes = unseal("limits", SealKey::Name(key), value.value())?;
        let decoded = <weft_proto::pb::Limit as prost::Message>::decode(bytes)
            .ok()
            .and_then(|pb| weft_proto::policy::Limit::try_from(pb).ok());
        match decoded {
            Some(limit) => limits.push(limit),
            // Its checksum matched: written so by a coordinator, not
            // damaged on disk; still a record that cannot be served.
            None => {
                return Err(StoreError::Corrupt {
                    what: "limit",
                    message: format!("{key} cannot be read"),
                });
            }
        }
    }
    Ok(limits)
}
