//! The in-memory store: what tests and `--in-memory` use. Nothing survives
//! the process.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use weft_proto::{NodeId, SecretEnv, TaskId, TaskState};

use super::engine::{ListPage, ListQuery, Store, StoreError, scan_page};
use super::record::{
    FinalAttempt, Loaded, MAX_RECENTLY_FINAL, NodeIdentityRecord, Record, TaskEvent, TaskRecord,
    next_chunk,
};
use crate::auth::TokenRecord;

/// Tasks in a `BTreeMap` keyed by id; ULIDs sort by creation time, so
/// "newest first" is a reverse range scan.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tasks: BTreeMap<TaskId, Entry>,
    /// Task ids by state: a state-filtered list walks only its state's
    /// tasks, so only they count against its scan bound (as in the
    /// durable stores' state indexes).
    by_state: HashMap<TaskState, BTreeSet<TaskId>>,
    /// Final tasks by when they became final, for retention.
    final_by_time: BTreeSet<(SystemTime, TaskId)>,
    /// Secret environments of tasks not yet final, apart from the records
    /// that readers get.
    secrets: HashMap<TaskId, Arc<SecretEnv>>,
    /// Token records by id.
    tokens: HashMap<String, TokenRecord>,
    /// Node identities by node id.
    identities: HashMap<NodeId, NodeIdentityRecord>,
    /// Cron schedules by name.
    schedules: BTreeMap<String, super::ScheduleRecord>,
    /// Named limits by kind and name.
    limits: BTreeMap<(&'static str, String), weft_proto::policy::Limit>,
}

#[derive(Debug)]
struct Entry {
    record: TaskRecord,
    events: Vec<TaskEvent>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn with_seq(entry: &Entry) -> TaskRecord {
    let mut record = entry.record.clone();
    record.next_seq = entry.events.len() as u64;
    record
}

impl Store for MemoryStore {
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let inner = self.inner.read().map_err(|_| StoreError::Poisoned)?;
        Ok(inner.tokens.values().cloned().collect())
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let mut inner = self.inner.write().map_err(|_| StoreError::Poisoned)?;
        inner.tokens.insert(token.id.clone(), token.clone());
        Ok(())
    }

    fn node_identities(&self) -> Result<Vec<NodeIdentityRecord>, StoreError> {
        let inner = self.inner.read().map_err(|_| StoreError::Poisoned)?;
        Ok(inner.identities.values().cloned().collect())
    }

    fn put_node_identity(
        &self,
        identity: &NodeIdentityRecord,
        token: Option<&TokenRecord>,
    ) -> Result<(), StoreError> {
        let mut inner = self.inner.write().map_err(|_| StoreError::Poisoned)?;
        inner.identities.insert(identity.id, identity.clone());
        if let Some(token) = token {
            inner.tokens.insert(token.id.clone(), token.clone());
        }
        Ok(())
    }

    fn commit(&self, records: &[Record]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut inner = self.inner.write().map_err(|_| StoreError::Poisoned)?;
        let Inner {
            tasks,
            by_state,
            final_by_time,
            secrets,
            schedules,
            limits,
            ..
        } = &mut *inner;
        // Check first so that a bad commit changes nothing.
        let mut pending: BTreeMap<TaskId, u64> = BTreeMap::new();
        for record in records {
            match record {
                Record::Task(task) => {
                    let len = tasks.get(&task.id).map_or(0, |e| e.events.len() as u64);
                    pending.entry(task.id).or_insert(len);
                }
                Record::Event(event) => {
                    let next = match pending.get_mut(&event.task_id) {
                        Some(next) => next,
                        None => match tasks.get(&event.task_id) {
                            Some(entry) => pending
                                .entry(event.task_id)
                                .or_insert(entry.events.len() as u64),
                            None => {
                                return Err(StoreError::Inconsistent(format!(
                                    "event for unknown task {}",
                                    event.task_id
                                )));
                            }
                        },
                    };
                    if event.seq != *next {
                        return Err(StoreError::Inconsistent(format!(
                            "task {} event seq {} where {} was next",
                            event.task_id, event.seq, next
                        )));
                    }
                    *next += 1;
                }
                // A task's secrets come with or after its first record.
                Record::Secrets(id, _) => {
                    if !pending.contains_key(id) && !tasks.contains_key(id) {
                        return Err(StoreError::Inconsistent(format!(
                            "secrets for unknown task {id}"
                        )));
                    }
                }
                Record::ForgetSecrets(_)
                | Record::Schedule(_)
                | Record::DeleteSchedule(_)
                | Record::Limit(_)
                | Record::DeleteLimit { .. } => {}
            }
        }
        for record in records {
            match record {
                Record::Task(task) => {
                    // The old record's index entries go before the new
                    // one's are made: they may be the same (a final task
                    // written again unchanged).
                    match tasks.get_mut(&task.id) {
                        Some(entry) => {
                            let old = &entry.record;
                            if old.state.is_final() {
                                final_by_time.remove(&(old.updated_at, task.id));
                            }
                            if let Some(ids) = by_state.get_mut(&old.state) {
                                ids.remove(&task.id);
                            }
                            entry.record = task.clone();
                        }
                        None => {
                            tasks.insert(
                                task.id,
                                Entry {
                                    record: task.clone(),
                                    events: Vec::new(),
                                },
                            );
                        }
                    }
                    if task.state.is_final() {
                        final_by_time.insert((task.updated_at, task.id));
                    }
                    by_state.entry(task.state).or_default().insert(task.id);
                }
                Record::Event(event) => {
                    if let Some(entry) = tasks.get_mut(&event.task_id) {
                        entry.events.push(event.clone());
                    }
                }
                Record::Secrets(id, env) => {
                    secrets.insert(*id, Arc::clone(env));
                }
                Record::ForgetSecrets(id) => {
                    secrets.remove(id);
                }
                Record::Schedule(schedule) => {
                    schedules.insert(schedule.name().to_owned(), (**schedule).clone());
                }
                Record::DeleteSchedule(name) => {
                    schedules.remove(name);
                }
                Record::Limit(limit) => {
                    limits.insert((limit.kind.as_str(), limit.name.clone()), limit.clone());
                }
                Record::DeleteLimit { name, kind } => {
                    limits.retain(|(k, n), _| !(*k == kind.as_str() && n == name));
                }
            }
        }
        Ok(())
    }

    fn task(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let inner = self.inner.read().map_err(|_| StoreError::Poisoned)?;
        let tasks = &inner.tasks;
        Ok(tasks.get(&id).map(with_seq))
    }

    fn has_tasks(&self, ids: &[TaskId]) -> Result<Vec<bool>, StoreError> {
        let inner = self.inner.read().map_err(|_| StoreError::Poisoned)?;
        Ok(ids.iter().map(|id| inner.tasks.contains_key(id)).collect())
    }

    fn list_page(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let inner = self.inner.read().map_err(|_| StoreError::Poisoned)?;
        let tasks = &inner.tasks;
        let from = query.from.map_or(Bound::Unbounded, Bound::Included);
        let before = query.before.map_or(Bound::Unbounded, Bound::Excluded);
        if let (Some(from), Some(before)) = (query.from, query.before)
            && from >= before
        {
            return Ok(ListPage::default());
        }
        let range: Box<dyn DoubleEndedIterator<Item = TaskId>> = match query.state {
            Some(state) => match inner.by_state.get(&state) {
                Some(ids) => Box::new(ids.range((from, before)).copied()),
                None => return Ok(ListPage::default()),
            },
            None => Box::new(tasks.range((from, before)).map(|(id, _)| *id)),
        };
        let ids: Box<dyn Iterator<Item = Result<TaskId, StoreError>>> = match query.ascending {
            true => Box::new(range.map(Ok)),
            false => Box::new(range.rev().map(Ok)),
        };
        scan_page(ids, query, |id| {
            Ok(tasks
                .get(&id)
                .filter(|e| query.matches(&e.record))
                .map(with_seq))
        })
    }

    fn events(
        &self,
        id: TaskId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<TaskEvent>, StoreError> {
        let inner = self.inner.read().map_err(|_| StoreError::Poisoned)?;
        let tasks = &inner.tasks;
        let Some(entry) = tasks.get(&id) else {
            return Ok(Vec::new());
        };
        let from = usize::try_from(from_seq).unwrap_or(usize::MAX);
        Ok(entry
            .events
            .iter()
            .skip(from)
            .take(limit)
            .cloned()
            .collect())
    }

    fn load(&self, final_since: SystemTime) -> Result<Loaded, StoreError> {
        let inner = self.inner.read().map_err(|_| StoreError::Poisoned)?;
        let tasks = &inner.tasks;
        let mut loaded = Loaded::default();
        let mut counts: BTreeMap<&'static str, (TaskState, u64)> = BTreeMap::new();
        for entry in tasks.values() {
            if entry.record.state.is_final() {
                counts
                    .entry(entry.record.state.as_str())
                    .or_insert((entry.record.state, 0))
                    .1 += 1;
            } else {
                let record = &entry.record;
                if matches!(record.state, TaskState::Assigned | TaskState::Running) {
                    let events = entry.events.iter().rev().cloned();
                    let next = next_chunk(record.attempt, events);
                    if next > 0 {
                        loaded.next_chunks.push((record.id, next));
                    }
                }
                loaded.live.push(with_seq(entry));
            }
        }
        loaded.final_counts = counts.into_values().collect();
        loaded.schedules = inner.schedules.values().cloned().collect();
        loaded.secrets = inner
            .secrets
            .iter()
            .map(|(id, env)| (*id, Arc::clone(env)))
            .collect();
        loaded.recently_final = inner
            .final_by_time
            .range((final_since, TaskId::from_u128(0))..)
            .rev()
            .take(MAX_RECENTLY_FINAL)
            .filter_map(|(_, id)| tasks.get(id))
            .map(|e| FinalAttempt {
                task_id: e.record.id,
                attempt: e.record.attempt,
                outcome: e.record.last_outcome,
            })
            .collect();
        loaded.limits = inner.limits.values().cloned().collect();
        Ok(loaded)
    }

    fn expire(
        &self,
        finished_before: SystemTime,
        limit: usize,
        keep: &[TaskId],
    ) -> Result<Vec<TaskState>, StoreError> {
        let keep = super::KeepSet::new(keep);
        let mut inner = self.inner.write().map_err(|_| StoreError::Poisoned)?;
        let due: Vec<(SystemTime, TaskId)> = inner
            .final_by_time
            .range(..(finished_before, TaskId::from_u128(0)))
            .filter(|(_, id)| !keep.holds(*id))
            .take(limit)
            .copied()
            .collect();
        let mut removed = Vec::with_capacity(due.len());
        for key in due {
            inner.final_by_time.remove(&key);
            if let Some(entry) = inner.tasks.remove(&key.1) {
                if let Some(ids) = inner.by_state.get_mut(&entry.record.state) {
                    ids.remove(&key.1);
                }
                removed.push(entry.record.state);
            }
            // Gone when the task became final; never outlives it.
            inner.secrets.remove(&key.1);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use weft_proto::{Attempt, TaskSpec};

    use super::*;
    use crate::store::EventBody;

    fn record(id: TaskId, state: TaskState) -> TaskRecord {
        let spec = Arc::new(TaskSpec::call("noop", ""));
        TaskRecord::for_test(id, spec, state, SystemTime::UNIX_EPOCH)
    }

    fn event(id: TaskId, seq: u64) -> Record {
        Record::Event(TaskEvent {
            task_id: id,
            seq,
            attempt: Attempt(0),
            time: SystemTime::UNIX_EPOCH,
            body: EventBody::Progress {
                fraction: 0.5,
                message: String::new(),
            },
        })
    }

    #[test]
    fn events_are_appended_in_seq_order_and_counted_in_next_seq() {
        let store = MemoryStore::new();
        let id = TaskId::new();
        store
            .commit(&[
                Record::Task(record(id, TaskState::Queued)),
                event(id, 0),
                event(id, 1),
            ])
            .unwrap();
        store.commit(&[event(id, 2)]).unwrap();
        assert_eq!(store.task(id).unwrap().unwrap().next_seq, 3);
        let events = store.events(id, 1, 10).unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn a_commit_with_a_seq_gap_changes_nothing() {
        let store = MemoryStore::new();
        let id = TaskId::new();
        let err = store
            .commit(&[Record::Task(record(id, TaskState::Queued)), event(id, 1)])
            .unwrap_err();
        assert!(matches!(err, StoreError::Inconsistent(_)));
        assert!(store.task(id).unwrap().is_none());
    }

    #[test]
    fn list_is_newest_first_and_filters_by_state() {
        let store = MemoryStore::new();
        let mut ids_gen = ulid::Generator::new();
        let ids: Vec<TaskId> = (0..4)
            .map(|_| TaskId::from_ulid(ids_gen.generate().unwrap()))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let state = if i % 2 == 0 {
                TaskState::Queued
            } else {
                TaskState::Succeeded
            };
            store.commit(&[Record::Task(record(*id, state))]).unwrap();
        }
        let all: Vec<TaskId> = store
            .list(None, None, 10)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(all, [ids[3], ids[2], ids[1], ids[0]]);
        let queued: Vec<TaskId> = store
            .list(Some(TaskState::Queued), Some(ids[2]), 10)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(queued, [ids[0]]);
        let loaded = store.load(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(loaded.live.len(), 2);
        assert_eq!(loaded.final_counts, [(TaskState::Succeeded, 2)]);
    }
}
