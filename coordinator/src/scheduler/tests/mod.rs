//! Deterministic tests of the scheduler rules: no runtime, time passed in.
//! This file is the harness; the tests sit in one file per concern.

mod attempts;
mod cron;
mod dispatch;
mod dispatch_cost;
mod exec_policy;
mod graph;
mod history;
mod identity;
mod membership;
mod policy;
mod policy_gauges;
mod reconnect;
mod restart;
mod secrets;
mod start;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use weft_proto::{Attempt, NodeId, Outcome, OutputStream, TaskId, TaskSpec, TaskState};

use super::*;
use crate::store::{EventBody, Record, TaskEvent};

/// How a test restart reads a restored task's parent from the store.
type ParentRead<'a> =
    &'a mut dyn FnMut(
        &crate::store::MemoryStore,
        TaskId,
    ) -> Result<Option<crate::store::TaskRecord>, crate::store::StoreError>;

struct Harness {
    s: Scheduler,
    now: Now,
    records: Vec<Record>,
    ids: ulid::Generator,
    /// The latest job's id: each Submit's ids follow it, as the service's
    /// do (two Submits within a millisecond must not share ids).
    last_job: u128,
}

const S1: SessionId = SessionId(1);
const S2: SessionId = SessionId(2);

fn config() -> SchedulerConfig {
    SchedulerConfig {
        heartbeat_timeout: Duration::from_secs(5),
        retry_backoff_base: Duration::from_millis(100),
        retry_backoff_max: Duration::from_secs(10),
        max_queued: 10_000,
        restart_grace: Duration::from_secs(10),
        reconnect_grace: Duration::from_secs(1),
        max_node_losses: 2,
        max_node_slots: 1024,
        start_timeout: Duration::from_secs(30),
        schedule_timeout: Duration::from_secs(60),
        priority_aging: Duration::ZERO,
        max_message_size: weft_proto::limits::DEFAULT_MAX_MESSAGE_BYTES,
    }
}

fn reg(name: &str, slots: u32) -> NodeRegistration {
    NodeRegistration {
        node_id: NodeId::new(),
        name: name.into(),
        labels: BTreeMap::new(),
        slots,
        prefetch: 0,
        handlers: vec!["noop".into(), "sleep".into()],
        exec: weft_proto::ExecPolicy::Allow,
        running: Vec::new(),
        resources: BTreeMap::new(),
    }
}

impl Harness {
    fn new() -> Self {
        Self::with(config())
    }

    fn with(config: SchedulerConfig) -> Self {
        let t0 = Instant::now();
        Harness {
            s: Scheduler::new(config),
            now: Now {
                instant: t0,
                wall: SystemTime::UNIX_EPOCH,
            },
            records: Vec::new(),
            ids: ulid::Generator::new(),
            last_job: 0,
        }
    }

    /// A coordinator restart: everything written so far goes through a
    /// store and is loaded into a fresh scheduler, `downtime` later.
    fn restart(&self, downtime: Duration) -> Harness {
        self.restart_reading(downtime, &mut |store, id| {
            crate::store::Store::task(store, id)
        })
        .expect("restart")
    }

    /// [`restart`](Self::restart), with the parents of restored pending
    /// tasks read through `read`.
    fn restart_reading(
        &self,
        downtime: Duration,
        read: ParentRead<'_>,
    ) -> Result<Harness, crate::store::StoreError> {
        let store = crate::store::MemoryStore::new();
        crate::store::Store::commit(&store, &self.records).expect("records commit");
        let loaded =
            crate::store::Store::load(&store, SystemTime::UNIX_EPOCH).expect("store loads");
        let mut h = Harness::with(self.s.config.clone());
        h.last_job = self.last_job;
        h.now.instant = self.now.instant + downtime;
        h.now.wall = self.now.wall + downtime;
        h.s.restore(loaded, h.now);
        let mut lookup = |id| {
            read(&store, id).map(|record| {
                record
                    .as_ref()
                    .and_then(crate::scheduler::graph::ParentResult::of_final)
            })
        };
        h.s.finish_restore(&mut lookup, h.now)?;
        h.records = self.records.clone();
        Ok(h)
    }

    /// The node on `session` is lost: its stream ends and it does not
    /// come back within the reconnect grace.
    fn lose(&mut self, session: SessionId) {
        self.s.node_gone(session, self.now);
        let grace = self.s.config.reconnect_grace;
        self.advance(grace + Duration::from_millis(1));
    }

    fn advance(&mut self, by: Duration) {
        self.now.instant += by;
        self.now.wall += by;
        self.s.tick(self.now);
    }

    fn effects(&mut self) -> Effects {
        let effects = self.s.take_effects(self.now);
        self.records.extend(effects.records.iter().cloned());
        effects
    }

    fn node(&mut self, session: SessionId, reg: NodeRegistration, credits: u32) -> NodeId {
        let id = reg.node_id;
        self.s.register_node(session, reg, self.now);
        if credits > 0 {
            self.s.credits(session, credits, self.now);
        }
        id
    }

    fn submit(&mut self, specs: Vec<TaskSpec>) -> Vec<TaskId> {
        let batch: Vec<(TaskId, TaskSpec)> = specs
            .into_iter()
            .map(|s| (TaskId::from_ulid(self.ids.generate().expect("ulid")), s))
            .collect();
        let ids = batch.iter().map(|(id, _)| *id).collect();
        self.s.submit(batch, self.now).expect("submit");
        ids
    }

    fn event(&mut self, session: SessionId, id: TaskId, attempt: u32, body: NodeEventBody) {
        self.s.node_events(
            session,
            vec![NodeTaskEvent {
                task_id: id,
                attempt: Attempt(attempt),
                body,
            }],
            self.now,
        );
    }

    fn finish(&mut self, session: SessionId, id: TaskId, attempt: u32, outcome: Outcome) {
        self.event(
            session,
            id,
            attempt,
            NodeEventBody::Finished {
                outcome,
                exit_code: None,
                output: Bytes::from_static(b"out"),
                error: if outcome == Outcome::Succeeded {
                    String::new()
                } else {
                    "boom".into()
                },
            },
        );
    }

    /// The task's latest record written so far.
    fn record(&self, id: TaskId) -> crate::store::TaskRecord {
        self.records
            .iter()
            .rev()
            .find_map(|r| match r {
                Record::Task(t) if t.id == id => Some(t.clone()),
                _ => None,
            })
            .expect("task record")
    }

    fn events(&self, id: TaskId) -> Vec<TaskEvent> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Event(e) if e.task_id == id => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    fn states(&self, id: TaskId) -> Vec<TaskState> {
        self.events(id)
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::State { state, .. } => Some(*state),
                _ => None,
            })
            .collect()
    }
}

fn assigned(effects: &Effects, session: SessionId) -> Vec<(TaskId, Attempt)> {
    effects
        .nodes
        .get(&session)
        .map(|o| o.assign.iter().map(|a| (a.task_id, a.attempt)).collect())
        .unwrap_or_default()
}

fn cancels(effects: &Effects, session: SessionId) -> Vec<(TaskId, Attempt)> {
    effects
        .nodes
        .get(&session)
        .map(|o| o.cancel.iter().map(|c| (c.task_id, c.attempt)).collect())
        .unwrap_or_default()
}

fn task_record(id: TaskId, state: TaskState) -> crate::store::TaskRecord {
    let spec = std::sync::Arc::new(TaskSpec::call("noop", "in"));
    crate::store::TaskRecord {
        attempt: Attempt(1),
        ..crate::store::TaskRecord::for_test(id, spec, state, std::time::UNIX_EPOCH)
    }
}

fn state_event(id: TaskId, seq: u64, state: TaskState) -> Record {
    Record::Event(TaskEvent {
        task_id: id,
        seq,
        attempt: Attempt(1),
        time: std::time::UNIX_EPOCH,
        body: EventBody::State {
            state,
            node_id: None,
            node_name: None,
            reason: String::new(),
        },
    })
}

#[test]
fn a_batch_writes_each_task_once_with_its_latest_state_before_its_events() {
    let (a, b) = (TaskId::new(), TaskId::new());
    let mut out = Effects::default();
    out.write_task(task_record(a, TaskState::Queued));
    out.records.push(state_event(a, 0, TaskState::Queued));
    out.write_task(task_record(b, TaskState::Running));
    out.write_task(task_record(a, TaskState::Assigned));
    out.records.push(state_event(a, 1, TaskState::Assigned));
    out.records.push(state_event(b, 3, TaskState::Succeeded));
    out.write_task(task_record(a, TaskState::Running));
    out.records.push(state_event(a, 2, TaskState::Running));
    out.write_task(task_record(b, TaskState::Succeeded));
    let expected = vec![
        Record::Task(task_record(a, TaskState::Running)),
        state_event(a, 0, TaskState::Queued),
        Record::Task(task_record(b, TaskState::Succeeded)),
        state_event(a, 1, TaskState::Assigned),
        state_event(b, 3, TaskState::Succeeded),
        state_event(a, 2, TaskState::Running),
    ];
    assert_eq!(out.records, expected);
}
