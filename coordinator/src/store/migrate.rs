//! Copying one store into another through the [`Store`] trait alone
//! ([`copy_store`]): what moves a data dir's redb store to the log.
//!
//! The copy never holds all tasks at once: tasks are read a page at a
//! time (oldest first), their events a page at a time, and written in
//! bounded batches, each one commit of the target. Within the copy a task's
//! record is committed before (or with) its events, and events in seq
//! order, so every batch is one the target accepts on its own.
//!
//! Nothing here knows an engine, a file or a data dir.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use weft_proto::{SecretEnv, TaskId, TaskKind};

use super::engine::{ListQuery, Store, StoreError};
use super::record::{EventBody, Record, TaskRecord};

/// Tasks read per list page.
const TASK_PAGE: usize = 512;
/// Events read per page of one task's history.
const EVENT_PAGE: usize = 1024;
/// A batch is committed once it holds this many records...
const BATCH_RECORDS: usize = 4096;
/// ...or about this many bytes of output and payloads.
const BATCH_BYTES: usize = 8 << 20;
/// How often progress is logged while copying.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What [`copy_store`] copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Task records (final ones too).
    pub tasks: u64,
    /// Events of those tasks.
    pub events: u64,
    /// Secret environments (of live tasks).
    pub secrets: u64,
    /// Token records (revoked ones too).
    pub tokens: u64,
    /// Node identities (revoked ones too).
    pub node_identities: u64,
    /// Cron schedules.
    pub schedules: u64,
    /// Named limits.
    pub limits: u64,
}

/// Copies everything `from` holds into `to` (which should be empty):
/// tokens, node identities, limits, schedules, every task with all its
/// events and, for live tasks, its secrets. Commits in bounded batches;
/// a failed read or commit stops the copy with its error, leaving `to`
/// partly written (the caller throws it away). Progress is logged at info.
pub fn copy_store(from: &dyn Store, to: &dyn Store) -> Result<Copied, StoreError> {
    let started = Instant::now();
    let mut copied = Copied::default();
    for token in from.tokens()? {
        to.put_token(&token)?;
        copied.tokens += 1;
    }
    for identity in from.node_identities()? {
        to.put_node_identity(&identity, None)?;
        copied.node_identities += 1;
    }

    // Secrets are handed out with live tasks only; they are few (only the
    // tasks that carry one) and are written right after their task's
    // record. The live records themselves are dropped here: the task pass
    // below reads every task again, a page at a time.
    let mut secrets: HashMap<TaskId, Arc<SecretEnv>> = HashMap::new();
    let loaded = from.load_each(SystemTime::now(), &mut |record, secret| {
        if let Some(secret) = secret {
            secrets.insert(record.id, secret);
        }
    })?;
    let mut batch = Batch::new(to);
    for limit in loaded.limits {
        batch.push(Record::Limit(limit))?;
        copied.limits += 1;
    }
    for schedule in loaded.schedules {
        batch.push(Record::Schedule(Arc::new(schedule)))?;
        copied.schedules += 1;
    }

    let mut last_log = Instant::now();
    let mut query = ListQuery {
        limit: TASK_PAGE,
        ascending: true,
        ..ListQuery::default()
    };
    loop {
        let page = from.list_page(&query)?;
        for task in page.tasks {
            let id = task.id;
            let final_ = task.state.is_final();
            batch.push(Record::Task(task))?;
            copied.tasks += 1;
            if let Some(secret) = secrets.remove(&id)
                && !final_
            {
                batch.push(Record::Secrets(id, secret))?;
                copied.secrets += 1;
            }
            let mut seq = 0;
            loop {
                let events = from.events(id, seq, EVENT_PAGE)?;
                let done = events.len() < EVENT_PAGE;
                for event in events {
                    seq = event.seq + 1;
                    batch.push(Record::Event(event))?;
                    copied.events += 1;
                }
                if done {
                    break;
                }
            }
        }
        if last_log.elapsed() >= PROGRESS_EVERY {
            last_log = Instant::now();
            tracing::info!(
                tasks = copied.tasks,
                events = copied.events,
                seconds = started.elapsed().as_secs(),
                "copying the store"
            );
        }
        // The next page starts after the last task of this one.
        match page.resume.and_then(|last| last.as_u128().checked_add(1)) {
            Some(next) => query.from = Some(TaskId::from_u128(next)),
            None => break,
        }
    }
    batch.flush()?;
    if !secrets.is_empty() {
        // load_each named a live task that the list did not: nothing to
        // attach these to.
        tracing::warn!(
            secrets = secrets.len(),
            "secret environments of tasks not found while copying were not copied"
        );
    }
    Ok(copied)
}

/// Records waiting to be committed to the target together.
struct Batch<'a> {
    to: &'a dyn Store,
    records: Vec<Record>,
    bytes: usize,
}

impl<'a> Batch<'a> {
    fn new(to: &'a dyn Store) -> Batch<'a> {
        Batch {
            to,
            records: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds `record`, committing the batch when it is full.
    fn push(&mut self, record: Record) -> Result<(), StoreError> {
        self.bytes += weight(&record);
        self.records.push(record);
        if self.records.len() >= BATCH_RECORDS || self.bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Commits what is waiting.
    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.records.is_empty() {
            self.to.commit(&self.records)?;
            self.records.clear();
            self.bytes = 0;
        }
        Ok(())
    }
}

/// A rough size of `record` once stored: a fixed part plus the payloads
/// that can be big (inputs, outputs, output chunks).
fn weight(record: &Record) -> usize {
    const FIXED: usize = 256;
    let task = |t: &TaskRecord| {
        let input = match &t.spec.kind {
            TaskKind::Exec(exec) => exec.stdin.len(),
            TaskKind::Call(call) => call.input.len(),
        };
        FIXED + t.output.len() + input
    };
    match record {
        Record::Task(t) => task(t),
        Record::Event(e) => match &e.body {
            EventBody::Output { data, .. } => FIXED + data.len(),
            EventBody::Finished(t) => task(t),
            EventBody::State { .. } | EventBody::Progress { .. } => FIXED,
        },
        Record::Secrets(..)
        | Record::ForgetSecrets(_)
        | Record::Schedule(_)
        | Record::DeleteSchedule(_)
        | Record::Limit(_)
        | Record::DeleteLimit { .. } => FIXED,
    }
}
