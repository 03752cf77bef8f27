//! The power-cut tests' workload: the batches a coordinator commits
//! (submissions with and without secrets, assignments, starts, output,
//! final results, schedules and limits set and deleted), token writes and
//! retention sweeps, made by a seeded [`Writer`] together with the
//! [`Model`] of what the store holds once each is acknowledged, and
//! [`holds`], the check of a store against it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use weft_proto::policy::{Limit, LimitKind};
use weft_proto::{Attempt, NodeId, Outcome, OutputStream, SecretEnv, TaskId, TaskSpec, TaskState};

use crate::auth::{Scopes, TokenKind, TokenRecord};
use crate::store::power_cut::Rng;
use crate::store::{EventBody, Record, ScheduleRecord, Store, StoreError, TaskEvent, TaskRecord};

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

/// One task as the commits so far made it.
#[derive(Clone, Debug)]
pub(crate) struct ModelTask {
    pub record: TaskRecord,
    pub events: Vec<TaskEvent>,
    pub secret: bool,
}

/// What the store must hold after a set of commits.
#[derive(Clone, Debug, Default)]
pub(crate) struct Model {
    pub tasks: BTreeMap<TaskId, ModelTask>,
    /// Token records by id (written in transactions of their own).
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Cron schedules by name, with their fire count (set and deleted in
    /// batches, as fires and `DeleteSchedule` write them).
    pub schedules: BTreeMap<String, u64>,
    /// Concurrency limits by name, with their bound.
    pub limits: BTreeMap<String, u32>,
}

/// Makes the batches, with ids in time order and a clock that moves.
pub(crate) struct Writer {
    /// Its choices; the replay draws its own from it too.
    pub(crate) rng: Rng,
    ids: ulid::Generator,
    clock: u64,
    node: NodeId,
}

impl Writer {
    /// A writer whose choices follow `seed`.
    pub(crate) fn new(seed: u64) -> Writer {
        Writer {
            rng: Rng::new(seed),
            ids: ulid::Generator::new(),
            clock: 0,
            node: NodeId::new(),
        }
    }

    fn tick(&mut self) -> SystemTime {
        self.clock += 1 + self.rng.below(5);
        at(self.clock)
    }

    /// Bytes of output: mostly small, sometimes several pages.
    fn blob(&mut self, what: &str, id: TaskId) -> Bytes {
        let len = if self.rng.one_in(6) {
            4096 + self.rng.below(12_000)
        } else {
            self.rng.below(200)
        };
        let mut text = format!("{what} of {id}:");
        while (text.len() as u64) < len {
            text.push_str(&format!(" {:x}", self.rng.next_u64()));
        }
        Bytes::from(text)
    }

    pub(crate) fn event(&mut self, task: &ModelTask, body: EventBody) -> TaskEvent {
        TaskEvent {
            task_id: task.record.id,
            seq: task.events.len() as u64,
            attempt: task.record.attempt,
            time: task.record.updated_at,
            body,
        }
    }

    fn state_event(&mut self, task: &ModelTask, reason: &str) -> TaskEvent {
        let body = EventBody::State {
            state: task.record.state,
            node_id: task.record.node_id,
            node_name: task.record.node_name.clone(),
            reason: reason.to_owned(),
        };
        self.event(task, body)
    }

    pub(crate) fn submit(&mut self, next: &mut Model, records: &mut Vec<Record>) {
        let id = TaskId::from_ulid(self.ids.generate().expect("ulid"));
        let now = self.tick();
        let input = self.blob("input", id);
        let spec = Arc::new(TaskSpec::call("noop", input));
        let record = TaskRecord::for_test(id, spec, TaskState::Queued, now);
        let mut task = ModelTask {
            record,
            events: Vec::new(),
            secret: false,
        };
        records.push(Record::Task(task.record.clone()));
        let event = self.state_event(&task, "submitted");
        task.events.push(event.clone());
        records.push(Record::Event(event));
        if self.rng.one_in(4) {
            let env: SecretEnv = [("API_KEY".to_owned(), format!("key-{id}"))]
                .into_iter()
                .collect();
            records.push(Record::Secrets(id, Arc::new(env)));
            task.secret = true;
        }
        next.tasks.insert(id, task);
    }

    /// One step of a live task's life, as the driver writes it.
    pub(crate) fn advance(&mut self, task: &mut ModelTask, records: &mut Vec<Record>) {
        let now = self.tick();
        let id = task.record.id;
        match task.record.state {
            TaskState::Queued if self.rng.one_in(8) => {
                self.finish(task, TaskState::Cancelled, now, records);
            }
            TaskState::Queued => {
                let r = &mut task.record;
                r.state = TaskState::Assigned;
                r.attempt = Attempt(r.attempt.0 + 1);
                r.node_id = Some(self.node);
                r.node_name = Some(Arc::from("n1"));
                r.updated_at = now;
                self.record_with_state_event(task, "assigned", records);
            }
            TaskState::Assigned => {
                task.record.state = TaskState::Running;
                task.record.updated_at = now;
                self.record_with_state_event(task, "started", records);
            }
            TaskState::Running if self.rng.one_in(2) => {
                // Output: events only, the record is not rewritten.
                for _ in 0..=self.rng.below(3) {
                    let chunk = task
                        .events
                        .iter()
                        .filter(|e| matches!(e.body, EventBody::Output { .. }))
                        .count() as u64;
                    let data = self.blob("output", id);
                    let body = EventBody::Output {
                        stream: OutputStream::Stdout,
                        data,
                        chunk: Some(chunk),
                    };
                    let event = self.event(task, body);
                    task.events.push(event.clone());
                    records.push(Record::Event(event));
                }
            }
            TaskState::Running => {
                let state = if self.rng.one_in(4) {
                    TaskState::Failed
                } else {
                    TaskState::Succeeded
                };
                self.finish(task, state, now, records);
            }
            _ => {}
        }
    }

    fn record_with_state_event(
        &mut self,
        task: &mut ModelTask,
        reason: &str,
        records: &mut Vec<Record>,
    ) {
        records.push(Record::Task(task.record.clone()));
        let event = self.state_event(task, reason);
        task.events.push(event.clone());
        records.push(Record::Event(event));
    }

    fn finish(
        &mut self,
        task: &mut ModelTask,
        state: TaskState,
        now: SystemTime,
        records: &mut Vec<Record>,
    ) {
        let id = task.record.id;
        let r = &mut task.record;
        r.state = state;
        r.updated_at = now;
        match state {
            TaskState::Succeeded => {
                r.output = self.blob("result", id);
                r.exit_code = Some(0);
                r.last_outcome = Some(Outcome::Succeeded);
            }
            TaskState::Failed => {
                r.error = format!("failure of {id}");
                r.exit_code = Some(1);
                r.failures += 1;
                r.last_outcome = Some(Outcome::Failed);
            }
            _ => r.error = "cancelled".into(),
        }
        r.next_seq = task.events.len() as u64 + 1;
        records.push(Record::Task(task.record.clone()));
        let body = EventBody::Finished(Arc::new(task.record.clone()));
        let event = self.event(task, body);
        task.events.push(event.clone());
        records.push(Record::Event(event));
        if task.secret {
            records.push(Record::ForgetSecrets(id));
            task.secret = false;
        }
    }

    /// A token record to write after `acked` (a new token, or one revoked),
    /// and what the store holds once it is written.
    pub(crate) fn token(&mut self, acked: &Model) -> (TokenRecord, Model) {
        let mut next = acked.clone();
        let now = self.tick();
        let live: Vec<&TokenRecord> = acked
            .tokens
            .values()
            .filter(|t| t.revoked.is_none())
            .collect();
        let token = if !live.is_empty() && self.rng.one_in(3) {
            let pick = live[usize::try_from(self.rng.below(live.len() as u64)).unwrap_or(0)];
            TokenRecord {
                revoked: Some(now),
                ..pick.clone()
            }
        } else {
            let id = format!("{:016x}", self.rng.next_u64());
            let mut secret_hash = [0u8; 32];
            for chunk in secret_hash.chunks_mut(8) {
                chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
            }
            TokenRecord {
                name: format!("token {id}"),
                id,
                kind: TokenKind::Client,
                scopes: Scopes::ADMIN,
                created: now,
                expires: None,
                revoked: None,
                secret_hash,
                uses: 0,
                used: 0,
            }
        };
        next.tokens.insert(token.id.clone(), token.clone());
        (token, next)
    }

    /// A retention sweep after `acked`: the time and limit to expire with,
    /// the states of the tasks it deletes (in state order), and what the
    /// store holds after it. Due are the final tasks last changed before
    /// the time, oldest first (ties by id), up to the limit.
    pub(crate) fn expire(&mut self, acked: &Model) -> (SystemTime, usize, Vec<TaskState>, Model) {
        let before = at(self.clock.saturating_sub(self.rng.below(60)));
        let limit = 1 + usize::try_from(self.rng.below(4)).unwrap_or(0);
        let mut due: Vec<(SystemTime, TaskId)> = acked
            .tasks
            .values()
            .filter(|t| t.record.state.is_final() && t.record.updated_at < before)
            .map(|t| (t.record.updated_at, t.record.id))
            .collect();
        due.sort();
        due.truncate(limit);
        let mut next = acked.clone();
        let mut states: Vec<TaskState> = due
            .iter()
            .filter_map(|(_, id)| next.tasks.remove(id))
            .map(|t| t.record.state)
            .collect();
        states.sort_by_key(|s| i32::from(*s));
        (before, limit, states, next)
    }

    /// The next batch after `acked`, and what the store holds once it is
    /// committed: new tasks, and steps of live ones (some two in one batch).
    pub(crate) fn batch(&mut self, acked: &Model) -> (Vec<Record>, Model) {
        let mut next = acked.clone();
        let mut records = Vec::new();
        for _ in 0..self.rng.below(7) {
            self.submit(&mut next, &mut records);
        }
        let live: Vec<TaskId> = acked
            .tasks
            .values()
            .filter(|t| !t.record.state.is_final())
            .map(|t| t.record.id)
            .collect();
        for id in live {
            if self.rng.one_in(2) {
                continue;
            }
            let Some(task) = next.tasks.get_mut(&id) else {
                continue;
            };
            for _ in 0..=self.rng.below(2) {
                self.advance(task, &mut records);
            }
        }
        if self.rng.one_in(3) {
            self.schedule(&mut next, &mut records);
        }
        if self.rng.one_in(4) {
            self.limit(&mut next, &mut records);
        }
        if records.is_empty() {
            self.submit(&mut next, &mut records);
        }
        (records, next)
    }

    /// Sets (fires) or deletes one of a few schedules: deletions that
    /// compaction must keep until the older records of what they deleted
    /// are gone.
    fn schedule(&mut self, next: &mut Model, records: &mut Vec<Record>) {
        let name = format!("cron-{}", self.rng.below(4));
        if next.schedules.contains_key(&name) && self.rng.one_in(3) {
            next.schedules.remove(&name);
            records.push(Record::DeleteSchedule(name));
            return;
        }
        let fired = next.schedules.get(&name).map_or(0, |n| n + 1);
        next.schedules.insert(name.clone(), fired);
        let now = self.tick();
        records.push(Record::Schedule(Arc::new(ScheduleRecord {
            spec: weft_proto::pb::ScheduleSpec {
                name,
                cron: "* * * * *".into(),
                ..Default::default()
            },
            paused: false,
            created_at: now,
            since: now,
            last_fire: Some(now),
            last_task: None,
            fired,
            skipped: 0,
        })));
    }

    /// Sets or deletes one of a few concurrency limits.
    fn limit(&mut self, next: &mut Model, records: &mut Vec<Record>) {
        let name = format!("limit-{}", self.rng.below(3));
        if next.limits.contains_key(&name) && self.rng.one_in(3) {
            next.limits.remove(&name);
            records.push(Record::DeleteLimit {
                name,
                kind: "concurrency".into(),
            });
            return;
        }
        let bound = 1 + u32::try_from(self.rng.below(100)).unwrap_or(0);
        next.limits.insert(name.clone(), bound);
        records.push(Record::Limit(Limit {
            name,
            kind: LimitKind::MaxRunning(bound),
        }));
    }
}

/// What of a task the check compares: everything a client reads back.
pub(crate) fn task_view(r: &TaskRecord) -> String {
    format!(
        "{:?} attempt {} node {:?} exit {:?} output {:?} error {:?} updated {:?} outcome {:?} \
         failures {} input {:?}",
        r.state,
        r.attempt.0,
        r.node_id,
        r.exit_code,
        r.output,
        r.error,
        r.updated_at,
        r.last_outcome,
        r.failures,
        r.spec,
    )
}

fn event_view(e: &TaskEvent) -> String {
    let body = match &e.body {
        EventBody::State { state, reason, .. } => format!("state {state:?} {reason}"),
        EventBody::Output { data, chunk, .. } => format!("output {chunk:?} {data:?}"),
        EventBody::Progress { fraction, .. } => format!("progress {fraction}"),
        EventBody::Finished(r) => format!("finished {}", task_view(r)),
    };
    format!("{} attempt {} {body}", e.seq, e.attempt.0)
}

/// Whether `store` holds exactly `model` (for the tasks in `universe`, and
/// no other): records, events, the list, and what a restart loads.
pub(crate) fn holds(
    store: &dyn Store,
    model: &Model,
    universe: &BTreeSet<TaskId>,
) -> Result<(), String> {
    let read = |what: &str, err: StoreError| format!("{what}: {err}");
    for id in universe {
        let got = store.task(*id).map_err(|e| read("reading a task", e))?;
        let want = model.tasks.get(id);
        match (got, want) {
            (None, None) => continue,
            (Some(_), None) => return Err(format!("task {id} is there, but never committed")),
            (None, Some(_)) => return Err(format!("task {id} is missing")),
            (Some(got), Some(want)) => {
                if task_view(&got) != task_view(&want.record) {
                    return Err(format!(
                        "task {id} is\n  {}\nnot\n  {}",
                        task_view(&got),
                        task_view(&want.record)
                    ));
                }
                if got.next_seq != want.events.len() as u64 {
                    return Err(format!(
                        "task {id} has next seq {}, not {}",
                        got.next_seq,
                        want.events.len()
                    ));
                }
                let events = store
                    .events(*id, 0, usize::MAX)
                    .map_err(|e| read("reading events", e))?;
                let got: Vec<String> = events.iter().map(event_view).collect();
                let want: Vec<String> = want.events.iter().map(event_view).collect();
                if got != want {
                    return Err(format!("task {id} has events\n  {got:?}\nnot\n  {want:?}"));
                }
            }
        }
    }
    let listed: BTreeSet<TaskId> = store
        .list(None, None, usize::MAX)
        .map_err(|e| read("listing", e))?
        .iter()
        .map(|t| t.id)
        .collect();
    let ids: BTreeSet<TaskId> = model.tasks.keys().copied().collect();
    if listed != ids {
        return Err(format!(
            "the list has {} tasks, the commits made {}",
            listed.len(),
            ids.len()
        ));
    }
    let tokens = store.tokens().map_err(|e| read("reading tokens", e))?;
    let want_tokens: Vec<&TokenRecord> = model.tokens.values().collect();
    let mut got_tokens: Vec<&TokenRecord> = tokens.iter().collect();
    got_tokens.sort_by(|a, b| a.id.cmp(&b.id));
    if got_tokens != want_tokens {
        return Err(format!(
            "the tokens are\n  {got_tokens:?}\nnot\n  {want_tokens:?}"
        ));
    }
    let loaded = store.load(UNIX_EPOCH).map_err(|e| read("loading", e))?;
    let schedules: BTreeMap<String, u64> = loaded
        .schedules
        .iter()
        .map(|s| (s.name().to_owned(), s.fired))
        .collect();
    if schedules != model.schedules {
        return Err(format!(
            "load gives the schedules {schedules:?}, not {:?}",
            model.schedules
        ));
    }
    let limits: BTreeMap<String, u32> = loaded
        .limits
        .iter()
        .filter_map(|l| match l.kind {
            LimitKind::MaxRunning(n) => Some((l.name.clone(), n)),
            LimitKind::Rate(_) => None,
        })
        .collect();
    if limits != model.limits || loaded.limits.len() != limits.len() {
        return Err(format!(
            "load gives the limits {:?}, not {:?}",
            loaded.limits, model.limits
        ));
    }
    let live: BTreeSet<TaskId> = loaded.live.iter().map(|t| t.id).collect();
    let want_live: BTreeSet<TaskId> = model
        .tasks
        .values()
        .filter(|t| !t.record.state.is_final())
        .map(|t| t.record.id)
        .collect();
    if live != want_live {
        return Err(format!(
            "load gives {} live tasks, not {}",
            live.len(),
            want_live.len()
        ));
    }
    for task in &loaded.live {
        let want = &model.tasks[&task.id];
        if task_view(task) != task_view(&want.record) {
            return Err(format!(
                "load gives task {} as {}",
                task.id,
                task_view(task)
            ));
        }
    }
    let counts: BTreeMap<i32, u64> = loaded
        .final_counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| (i32::from(*s), *n))
        .collect();
    let mut want_counts = BTreeMap::new();
    for task in model.tasks.values() {
        if task.record.state.is_final() {
            *want_counts.entry(i32::from(task.record.state)).or_insert(0) += 1;
        }
    }
    if counts != want_counts {
        return Err(format!(
            "load counts {counts:?}, the commits made {want_counts:?}"
        ));
    }
    let secrets: BTreeSet<TaskId> = loaded.secrets.iter().map(|(id, _)| *id).collect();
    let want_secrets: BTreeSet<TaskId> = model
        .tasks
        .values()
        .filter(|t| t.secret)
        .map(|t| t.record.id)
        .collect();
    if secrets != want_secrets {
        return Err(format!(
            "load gives secrets of {} tasks, not {}",
            secrets.len(),
            want_secrets.len()
        ));
    }
    Ok(())
}
