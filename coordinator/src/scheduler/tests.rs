//! Deterministic tests of the scheduler rules: no runtime, time passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use weft_proto::{Attempt, NodeId, Outcome, OutputStream, TaskId, TaskSpec, TaskState};

use super::*;
use crate::store::{EventBody, Record, TaskEvent};

struct Harness {
    s: Scheduler,
    now: Now,
    records: Vec<Record>,
    ids: ulid::Generator,
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
        max_node_losses: 2,
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
        running: Vec::new(),
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
        }
    }

    /// A coordinator restart: everything written so far goes through a
    /// store and is loaded into a fresh scheduler, `downtime` later.
    fn restart(&self, downtime: Duration) -> Harness {
        let store = crate::store::MemoryStore::new();
        crate::store::Store::commit(&store, &self.records).expect("records commit");
        let loaded =
            crate::store::Store::load(&store, SystemTime::UNIX_EPOCH).expect("store loads");
        let mut h = Harness::with(self.s.config.clone());
        h.now.instant = self.now.instant + downtime;
        h.now.wall = self.now.wall + downtime;
        h.s.restore(loaded, h.now);
        h.records = self.records.clone();
        h
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

#[test]
fn assignments_never_exceed_granted_credits() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 4), 2);
    h.submit((0..5).map(|_| TaskSpec::call("noop", "")).collect());
    let e = h.effects();
    assert_eq!(assigned(&e, S1).len(), 2);
    // Nothing more until the node grants again.
    assert!(assigned(&h.effects(), S1).is_empty());
    h.s.credits(S1, 1, h.now);
    assert_eq!(assigned(&h.effects(), S1).len(), 1);
    // Grants past the free slots are capped at the slots not in use.
    h.s.credits(S1, 100, h.now);
    assert_eq!(assigned(&h.effects(), S1).len(), 1);
    let info = &h.s.nodes(h.now.instant)[0];
    assert_eq!((info.slots_used, info.slots_free), (4, 0));
}

#[test]
fn multi_slot_tasks_use_that_many_credits() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 4), 3);
    let ids = h.submit(vec![
        TaskSpec::call("noop", "").slots(2),
        TaskSpec::call("noop", "").slots(2),
    ]);
    let e = h.effects();
    assert_eq!(assigned(&e, S1), [(ids[0], Attempt(1))]);
    assert_eq!(h.s.nodes(h.now.instant)[0].slots_free, 1);
}

#[test]
fn work_is_spread_round_robin_over_nodes() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 4), 4);
    h.node(S2, reg("n2", 4), 4);
    h.submit((0..4).map(|_| TaskSpec::call("noop", "")).collect());
    let e = h.effects();
    assert_eq!((assigned(&e, S1).len(), assigned(&e, S2).len()), (2, 2));
}

#[test]
fn tasks_go_only_to_nodes_with_their_labels_and_handlers() {
    let mut h = Harness::new();
    h.node(S1, reg("plain", 4), 4);
    let mut gpu = reg("gpu", 4);
    gpu.labels.insert("gpu".into(), "1".into());
    gpu.handlers = vec!["train".into()];
    h.node(S2, gpu, 4);
    let ids = h.submit(vec![
        TaskSpec::call("noop", "").label("gpu", "1"),
        TaskSpec::call("train", ""),
        TaskSpec::exec(["true"]).label("gpu", "1"),
    ]);
    let e = h.effects();
    assert!(assigned(&e, S1).is_empty());
    let on_gpu: Vec<TaskId> = assigned(&e, S2).iter().map(|(t, _)| *t).collect();
    assert_eq!(on_gpu, [ids[1], ids[2]]);
    // noop+gpu=1: the gpu node has the label but not the handler.
    assert_eq!(
        h.s.pending_reason(ids[0]).unwrap(),
        "no connected node has all of the labels gpu=1"
    );
}

#[test]
fn pending_reason_says_why_a_task_waits() {
    let mut h = Harness::new();
    let ids = h.submit(vec![
        TaskSpec::call("noop", ""),
        TaskSpec::call("noop", "").label("gpu", "1"),
        TaskSpec::call("noop", "").slots(4),
        TaskSpec::call("noop", ""),
    ]);
    h.effects();
    assert_eq!(h.s.pending_reason(ids[0]).unwrap(), "no nodes connected");
    h.node(S1, reg("n1", 2), 1);
    h.effects();
    assert_eq!(
        h.s.pending_reason(ids[1]).unwrap(),
        "no connected node has label gpu=1"
    );
    assert_eq!(
        h.s.pending_reason(ids[2]).unwrap(),
        "needs 4 slots; largest node has 2"
    );
    assert_eq!(
        h.s.pending_reason(ids[3]).unwrap(),
        "waiting for a free slot"
    );
    assert_eq!(
        h.s.pending_reason(ids[0]),
        None,
        "assigned tasks have no pending reason"
    );
}

#[test]
fn unknown_handler_with_nodes_connected_fails_at_once() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 2), 2);
    let ids = h.submit(vec![TaskSpec::call("nope", "")]);
    h.effects();
    let record = h.record(ids[0]);
    assert_eq!(record.state, TaskState::Failed);
    assert_eq!(
        record.error,
        "unknown handler 'nope': no connected node serves it (known: noop, sleep)"
    );
    assert!(!h.s.is_live(ids[0]));
    let events = h.events(ids[0]);
    assert!(events.last().unwrap().body.is_finished());
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1, 2]);
}

#[test]
fn unknown_handler_without_nodes_stays_queued() {
    let mut h = Harness::new();
    let ids = h.submit(vec![TaskSpec::call("nope", "")]);
    h.effects();
    assert_eq!(h.record(ids[0]).state, TaskState::Queued);
    h.node(S1, reg("n1", 2), 2);
    h.effects();
    assert_eq!(
        h.s.pending_reason(ids[0]).unwrap(),
        "no connected node serves handler 'nope'"
    );
}

#[test]
fn a_task_runs_through_its_states_with_gapless_seqs() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.event(S1, id, 1, NodeEventBody::Started);
    for seq in [0, 1, 1, 2] {
        h.event(
            S1,
            id,
            1,
            NodeEventBody::Output {
                stream: OutputStream::Stdout,
                data: Bytes::from(format!("chunk{seq}")),
                seq,
            },
        );
    }
    h.finish(S1, id, 1, Outcome::Succeeded);
    h.effects();
    assert_eq!(
        h.states(id),
        [
            TaskState::Queued,
            TaskState::Assigned,
            TaskState::Running,
            TaskState::Succeeded
        ]
    );
    let events = h.events(id);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
    let outputs = events
        .iter()
        .filter(|e| matches!(e.body, EventBody::Output { .. }))
        .count();
    assert_eq!(outputs, 3, "the duplicate chunk is dropped");
    let EventBody::Finished(task) = &events.last().unwrap().body else {
        panic!("last event is finished");
    };
    assert_eq!(
        (task.state, task.attempt, task.output.as_ref()),
        (TaskState::Succeeded, Attempt(1), &b"out"[..])
    );
    assert_eq!(task.node_name.as_deref(), Some("n1"));
    assert_eq!(task.next_seq, events.len() as u64);
    assert_eq!(h.s.nodes(h.now.instant)[0].finished, 1);
}

#[test]
fn failures_retry_with_exponential_backoff_until_attempts_run_out() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(3)])[0];
    h.effects();
    h.finish(S1, id, 1, Outcome::Failed);
    h.s.credits(S1, 1, h.now);
    assert!(assigned(&h.effects(), S1).is_empty(), "backoff first");
    assert!(h.s.pending_reason(id).unwrap().contains("retry backoff"));
    assert_eq!(
        h.s.next_wakeup().map(|w| w - h.now.instant),
        Some(Duration::from_millis(100))
    );
    h.advance(Duration::from_millis(99));
    assert!(assigned(&h.effects(), S1).is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(assigned(&h.effects(), S1), [(id, Attempt(2))]);
    h.finish(S1, id, 2, Outcome::Failed);
    h.s.credits(S1, 1, h.now);
    h.advance(Duration::from_millis(199));
    assert!(assigned(&h.effects(), S1).is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(assigned(&h.effects(), S1), [(id, Attempt(3))]);
    h.finish(S1, id, 3, Outcome::Failed);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.failures, record.attempt),
        (TaskState::Failed, 3, Attempt(3))
    );
    assert!(record.error.contains("boom"), "{}", record.error);
}

#[test]
fn start_failed_and_timed_out_are_final_at_once() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 2), 2);
    let ids = h.submit(vec![TaskSpec::call("noop", ""), TaskSpec::call("noop", "")]);
    h.effects();
    h.finish(S1, ids[0], 1, Outcome::StartFailed);
    h.finish(S1, ids[1], 1, Outcome::TimedOut);
    h.effects();
    let (a, b) = (h.record(ids[0]), h.record(ids[1]));
    assert_eq!((a.state, a.attempt), (TaskState::Failed, Attempt(1)));
    assert!(a.error.starts_with("failed to start"), "{}", a.error);
    assert_eq!((b.state, b.attempt), (TaskState::TimedOut, Attempt(1)));
}

#[test]
fn lost_node_requeues_its_attempts_as_the_next_attempt() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.node(S2, reg("n2", 1), 1);
    h.s.node_gone(S1, h.now);
    let e = h.effects();
    assert_eq!(e.disconnect, [S1]);
    assert_eq!(assigned(&e, S2), [(id, Attempt(2))]);
    let requeued = h
        .events(id)
        .into_iter()
        .find_map(|e| match e.body {
            EventBody::State {
                state: TaskState::Queued,
                reason,
                ..
            } if e.seq > 0 => Some(reason),
            _ => None,
        })
        .unwrap();
    assert_eq!(requeued, "node n1 lost; retrying as attempt 2");
    assert_eq!(h.record(id).node_losses, 1);
    assert_eq!(h.s.stats().nodes_lost, 1);
}

#[test]
fn lost_attempts_go_before_the_backlog() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let first = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.submit((0..10).map(|_| TaskSpec::call("noop", "")).collect());
    h.node(S2, reg("n2", 1), 0);
    h.effects();
    h.s.node_gone(S1, h.now);
    h.effects();
    h.s.credits(S2, 1, h.now);
    assert_eq!(assigned(&h.effects(), S2), [(first, Attempt(2))]);
}

#[test]
fn node_losses_count_against_max_attempts() {
    let mut h = Harness::new();
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(2)])[0];
    for session in [S1, S2] {
        h.node(session, reg("n", 1), 1);
        h.effects();
        h.s.node_gone(session, h.now);
        h.effects();
    }
    let record = h.record(id);
    assert_eq!(
        (record.state, record.node_losses, record.attempt),
        (TaskState::Failed, 2, Attempt(2))
    );
    assert!(record.error.contains("lost"), "{}", record.error);
}

#[test]
fn silent_node_is_lost_after_the_heartbeat_timeout() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    h.node(S2, reg("n2", 1), 0);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    for _ in 0..6 {
        h.advance(Duration::from_secs(1));
        h.s.heartbeat(S2, h.now);
    }
    let e = h.effects();
    assert_eq!(e.disconnect, [S1]);
    assert_eq!(h.s.nodes(h.now.instant).len(), 1);
    assert_eq!(h.record(id).state, TaskState::Queued);
}

#[test]
fn events_for_a_stale_attempt_are_refused_counted_and_cancelled() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    // Wrong attempt from the right node.
    h.event(S1, id, 7, NodeEventBody::Started);
    // Right attempt from the wrong node.
    h.node(S2, reg("n2", 1), 0);
    h.finish(S2, id, 1, Outcome::Succeeded);
    let e = h.effects();
    assert_eq!(cancels(&e, S1), [(id, Attempt(7))]);
    assert_eq!(cancels(&e, S2), [(id, Attempt(1))]);
    assert_eq!(h.s.stats().stale_events_refused, 2);
    assert_eq!(h.record(id).state, TaskState::Assigned);
    // After a loss and requeue, the old node's result for attempt 1 is refused.
    h.s.credits(S2, 1, h.now);
    h.s.node_gone(S1, h.now);
    h.effects();
    h.finish(S1, id, 1, Outcome::Succeeded);
    h.effects();
    assert_eq!(h.s.stats().stale_events_refused, 3);
    assert_eq!(
        (h.record(id).state, h.record(id).attempt),
        (TaskState::Assigned, Attempt(2))
    );
}

#[test]
fn cancelling_a_queued_task_is_final_at_once() {
    let mut h = Harness::new();
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    assert!(h.s.cancel(id, "", h.now));
    h.node(S1, reg("n1", 1), 1);
    let e = h.effects();
    assert!(
        assigned(&e, S1).is_empty(),
        "the stale queue entry is skipped"
    );
    let record = h.record(id);
    assert_eq!(
        (record.state, record.error.as_str()),
        (TaskState::Cancelled, "cancelled by client")
    );
    assert!(!h.s.cancel(id, "", h.now), "a final task is not live");
}

#[test]
fn cancelling_a_running_task_waits_for_the_node() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.event(S1, id, 1, NodeEventBody::Started);
    assert!(h.s.cancel(id, "changed my mind", h.now));
    let e = h.effects();
    assert_eq!(cancels(&e, S1), [(id, Attempt(1))]);
    assert_eq!(h.record(id).state, TaskState::Running);
    h.finish(S1, id, 1, Outcome::Cancelled);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.error.as_str()),
        (TaskState::Cancelled, "changed my mind")
    );
}

#[test]
fn cancelled_running_task_whose_node_is_lost_ends_cancelled() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.s.cancel(id, "", h.now);
    h.s.node_gone(S1, h.now);
    h.effects();
    assert_eq!(h.record(id).state, TaskState::Cancelled);
}

#[test]
fn node_cancelled_attempt_without_client_cancel_is_requeued() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.event(S1, id, 1, NodeEventBody::Started);
    h.finish(S1, id, 1, Outcome::Cancelled);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.attempt, record.node_losses),
        (TaskState::Queued, Attempt(2), 1)
    );
}

#[test]
fn an_attempt_handed_back_unstarted_is_requeued_without_spending_an_attempt() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(1)])[0];
    h.effects();
    // No Started: the node held it queued (prefetch), then drained.
    h.finish(S1, id, 1, Outcome::Cancelled);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (
            record.state,
            record.attempt,
            record.node_losses,
            record.failures
        ),
        (TaskState::Queued, Attempt(2), 0, 0)
    );
}

#[test]
fn drained_node_gets_no_new_work() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 4), 4);
    let info =
        h.s.drain_node("n1", Some(Duration::from_secs(3)), h.now.instant)
            .unwrap();
    assert_eq!(info.state, weft_proto::NodeState::Draining);
    h.submit(vec![TaskSpec::call("noop", "")]);
    let e = h.effects();
    assert!(assigned(&e, S1).is_empty());
    assert_eq!(e.nodes[&S1].drain, Some(Some(Duration::from_secs(3))));
    h.s.credits(S1, 4, h.now);
    assert!(assigned(&h.effects(), S1).is_empty());
    assert!(matches!(
        h.s.drain_node("nobody", None, h.now.instant),
        Err(Error::NodeNotFound(_))
    ));
    // A drained node that leaves with nothing running is not "lost".
    h.s.node_gone(S1, h.now);
    assert_eq!(h.s.stats().nodes_lost, 0);
}

#[test]
fn reconnecting_node_keeps_its_current_attempts_and_cancels_stale_ones() {
    let mut h = Harness::new();
    let first = reg("n1", 2);
    let node_id = h.node(S1, first.clone(), 2);
    let ids = h.submit(vec![TaskSpec::call("noop", ""), TaskSpec::call("noop", "")]);
    h.effects();
    let stale = TaskId::new();
    let mut again = first;
    again.running = vec![(ids[0], Attempt(1)), (stale, Attempt(1))];
    h.s.register_node(S2, again, h.now);
    let e = h.effects();
    assert_eq!(e.disconnect, [S1]);
    assert_eq!(cancels(&e, S2), [(stale, Attempt(1))]);
    // ids[0] carries on under the new session; ids[1] was lost and requeued.
    h.event(S2, ids[0], 1, NodeEventBody::Started);
    h.effects();
    assert_eq!(h.record(ids[0]).state, TaskState::Running);
    assert_eq!(h.record(ids[0]).node_id, Some(node_id));
    assert_eq!(
        (h.record(ids[1]).state, h.record(ids[1]).attempt),
        (TaskState::Queued, Attempt(2))
    );
    assert_eq!(h.s.nodes(h.now.instant)[0].slots_used, 1);
}

#[test]
fn submit_past_max_queued_is_refused_whole() {
    let mut h = Harness::with(SchedulerConfig {
        max_queued: 3,
        ..config()
    });
    h.submit(vec![TaskSpec::call("noop", ""); 2]);
    let batch = vec![
        (TaskId::new(), TaskSpec::call("noop", "")),
        (TaskId::new(), TaskSpec::call("noop", "")),
    ];
    let err = h.s.submit(batch, h.now).unwrap_err();
    assert!(matches!(err, Error::QueueFull { queued: 4, max: 3 }));
    assert_eq!(h.s.stats().tasks[0], (TaskState::Queued, 2));
}

#[test]
fn dispatch_skips_classes_no_node_can_run() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    // Many tasks no node can take, then one it can: it is found at once.
    h.submit(
        (0..1000)
            .map(|_| TaskSpec::call("noop", "").label("gpu", "1"))
            .collect(),
    );
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    let e = h.effects();
    assert_eq!(assigned(&e, S1), [(id, Attempt(1))]);
    assert_eq!(h.s.queue.classes.len(), 2);
}

#[test]
fn cluster_stats_count_tasks_by_state() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let ids = h.submit(vec![TaskSpec::call("noop", ""); 3]);
    h.effects();
    h.finish(S1, ids[0], 1, Outcome::Succeeded);
    h.s.cancel(ids[1], "", h.now);
    h.effects();
    let stats = h.s.stats();
    let count = |s: TaskState| stats.tasks.iter().find(|(t, _)| *t == s).map(|(_, c)| *c);
    assert_eq!(count(TaskState::Succeeded), Some(1));
    assert_eq!(count(TaskState::Cancelled), Some(1));
    assert_eq!(count(TaskState::Assigned), Some(0));
    assert_eq!(count(TaskState::Queued), Some(1));
    assert_eq!((stats.nodes, stats.slots, stats.slots_free), (1, 1, 0));
}

#[test]
fn a_queued_task_stays_small_in_the_scheduler() {
    // The queue entry is a bare TaskId; the live entry keeps only what its
    // spec does not share with its class (a small input inline), and its
    // slab slot adds the id. The scale bench's bytes per queued task rest
    // on these figures: grow them only on purpose.
    assert_eq!(std::mem::size_of::<TaskId>(), 16);
    let size = std::mem::size_of::<task::LiveTask>();
    assert!(size <= 72, "LiveTask is {size} bytes");
    assert!(std::mem::size_of::<task::LiveSpec>() <= 24);
}

#[test]
fn specs_kept_compact_come_back_whole_in_records_assignments_and_after_a_restart() {
    let mut h = Harness::new();
    let long = "an input too long to be kept inline: ".repeat(3);
    let specs = vec![
        TaskSpec::call("noop", "first"),
        TaskSpec::call("noop", "7"),
        TaskSpec::call("noop", long.clone()),
        TaskSpec::call("noop", "").name("named"),
        TaskSpec::call("noop", "t").timeout(Duration::from_secs(3)),
        TaskSpec::call("noop", "a").max_attempts(5),
        TaskSpec::exec(["echo", "hi"]).stdin("in"),
    ];
    let ids = h.submit(specs.clone());
    h.effects();
    for (id, spec) in ids.iter().zip(&specs) {
        assert_eq!(*h.record(*id).spec, *spec);
    }
    let mut h = h.restart(Duration::from_secs(1));
    h.node(S1, reg("n1", 10), 10);
    let effects = h.effects();
    let sent: Vec<(TaskId, TaskSpec)> = effects.nodes[&S1]
        .assign
        .iter()
        .map(|a| (a.task_id, TaskSpec::clone(&a.spec)))
        .collect();
    let expected: Vec<(TaskId, TaskSpec)> = ids.iter().copied().zip(specs.clone()).collect();
    assert_eq!(sent, expected);
    h.finish(S1, ids[2], 1, Outcome::Succeeded);
    h.effects();
    assert_eq!(*h.record(ids[2]).spec, specs[2]);
}

/// Node `n1` on S1 runs `ids[0]` (started) of two submitted tasks; the
/// other stays queued. Returns the harness, the node's registration and ids.
fn one_running_one_queued() -> (Harness, NodeRegistration, Vec<TaskId>) {
    let mut h = Harness::new();
    let first = reg("n1", 1);
    h.node(S1, first.clone(), 1);
    let ids = h.submit(vec![TaskSpec::call("noop", ""), TaskSpec::call("noop", "")]);
    h.effects();
    h.event(S1, ids[0], 1, NodeEventBody::Started);
    h.effects();
    assert_eq!(h.record(ids[0]).state, TaskState::Running);
    (h, first, ids)
}

#[test]
fn after_a_restart_a_running_attempt_claimed_by_its_node_carries_on() {
    let (h, first, ids) = one_running_one_queued();
    let mut h = h.restart(Duration::from_secs(1));
    let mut again = first;
    again.running = vec![(ids[0], Attempt(1))];
    h.node(S2, again, 0);
    let e = h.effects();
    assert!(cancels(&e, S2).is_empty());
    assert_eq!(h.s.stats().recovered_attempts, 1);
    // Well past the grace: nothing is requeued, it still runs.
    for _ in 0..4 {
        h.advance(Duration::from_secs(4));
        h.s.heartbeat(S2, h.now);
        h.effects();
    }
    assert_eq!(h.record(ids[0]).state, TaskState::Running);
    h.finish(S2, ids[0], 1, Outcome::Succeeded);
    h.s.credits(S2, 1, h.now);
    let e = h.effects();
    let done = h.record(ids[0]);
    assert_eq!(
        (done.state, done.attempt, done.node_losses),
        (TaskState::Succeeded, Attempt(1), 0)
    );
    assert_eq!(done.last_outcome, Some(Outcome::Succeeded));
    assert_eq!(h.s.stats().stale_events_refused, 0);
    // The task that was queued before the restart is still there and runs.
    assert_eq!(assigned(&e, S2), [(ids[1], Attempt(1))]);
}

#[test]
fn after_a_restart_an_absent_nodes_attempts_are_requeued_only_after_the_grace() {
    let (h, _, ids) = one_running_one_queued();
    let mut h = h.restart(Duration::from_secs(1));
    h.effects();
    // Past the heartbeat timeout (5 s) but inside the restart grace (10 s).
    h.advance(Duration::from_secs(9));
    h.effects();
    assert_eq!(h.record(ids[0]).state, TaskState::Running);
    h.advance(Duration::from_secs(1));
    h.effects();
    let record = h.record(ids[0]);
    assert_eq!(
        (record.state, record.attempt, record.node_losses),
        (TaskState::Queued, Attempt(2), 1)
    );
}

#[test]
fn after_a_restart_a_node_that_does_not_list_its_attempt_has_it_requeued_at_once() {
    let (h, first, ids) = one_running_one_queued();
    let mut h = h.restart(Duration::from_secs(1));
    h.node(S2, first, 0);
    let e = h.effects();
    assert!(cancels(&e, S2).is_empty());
    let record = h.record(ids[0]);
    assert_eq!(
        (record.state, record.attempt, record.node_losses),
        (TaskState::Queued, Attempt(2), 1)
    );
    assert!(h.s.orphans.is_empty(), "no orphan left waiting");
}

#[test]
fn a_task_lost_with_two_different_nodes_while_running_fails_as_poison() {
    let mut h = Harness::new();
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(5)])[0];
    for (session, name) in [(S1, "node-a"), (S2, "node-b")] {
        h.node(session, reg(name, 1), 1);
        h.effects();
        h.event(session, id, h.record(id).attempt.0, NodeEventBody::Started);
        h.effects();
        h.s.node_gone(session, h.now);
        h.effects();
    }
    let record = h.record(id);
    assert_eq!(
        (record.state, record.failures, record.node_losses),
        (TaskState::Failed, 0, 2)
    );
    assert_eq!(
        record.error,
        "lost with 2 different nodes (node-a, node-b) while running; not retried to protect the cluster (--max-node-losses)"
    );
    assert_eq!(record.last_outcome, None);
    // A third node is never given it.
    h.node(SessionId(3), reg("node-c", 1), 1);
    assert!(assigned(&h.effects(), SessionId(3)).is_empty());
}

#[test]
fn the_same_node_lost_twice_or_a_loss_before_start_is_not_poison() {
    let mut h = Harness::new();
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(5)])[0];
    let node = reg("node-a", 1);
    // Lost twice with the same node id (it reconnects between losses).
    for session in [S1, S2] {
        h.node(session, node.clone(), 1);
        h.effects();
        h.event(session, id, h.record(id).attempt.0, NodeEventBody::Started);
        h.s.node_gone(session, h.now);
        h.effects();
    }
    // Lost with another node before it started there.
    h.node(SessionId(3), reg("node-b", 1), 1);
    h.effects();
    h.s.node_gone(SessionId(3), h.now);
    h.effects();
    let record = h.record(id);
    assert_eq!(
        (record.state, record.node_losses, record.attempt),
        (TaskState::Queued, 3, Attempt(4))
    );
    assert_eq!(record.lost_nodes.len(), 1);
}

#[test]
fn a_redelivered_result_is_ignored_quietly() {
    let mut h = Harness::new();
    let first = reg("n1", 2);
    h.node(S1, first.clone(), 2);
    let ids = h.submit(vec![
        TaskSpec::call("noop", ""),
        TaskSpec::call("noop", "").max_attempts(2),
    ]);
    h.effects();
    h.finish(S1, ids[0], 1, Outcome::Succeeded);
    h.finish(S1, ids[1], 1, Outcome::Failed);
    h.effects();
    // The node reconnects, lists both attempts and sends both results again.
    let mut again = first;
    again.running = vec![(ids[0], Attempt(1)), (ids[1], Attempt(1))];
    h.node(S2, again, 0);
    h.finish(S2, ids[0], 1, Outcome::Succeeded);
    h.finish(S2, ids[1], 1, Outcome::Failed);
    let e = h.effects();
    assert!(cancels(&e, S2).is_empty(), "{:?}", cancels(&e, S2));
    assert_eq!(h.s.stats().stale_events_refused, 0);
    assert_eq!(h.record(ids[0]).state, TaskState::Succeeded);
    assert_eq!(h.events(ids[0]).len(), 4, "no event added by the duplicate");
    assert_eq!(
        (h.record(ids[1]).state, h.record(ids[1]).attempt),
        (TaskState::Queued, Attempt(2))
    );
    // A different result for that attempt is not a duplicate: refused.
    h.finish(S2, ids[0], 1, Outcome::Failed);
    let e = h.effects();
    assert_eq!(cancels(&e, S2), [(ids[0], Attempt(1))]);
    assert_eq!(h.s.stats().stale_events_refused, 1);
}

#[test]
fn a_result_redelivered_after_a_restart_is_ignored_quietly() {
    let mut h = Harness::new();
    let first = reg("n1", 1);
    h.node(S1, first.clone(), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "")])[0];
    h.effects();
    h.finish(S1, id, 1, Outcome::Succeeded);
    h.effects();
    let mut h = h.restart(Duration::from_secs(1));
    let mut again = first;
    again.running = vec![(id, Attempt(1))];
    h.node(S2, again, 1);
    h.finish(S2, id, 1, Outcome::Succeeded);
    let e = h.effects();
    assert!(cancels(&e, S2).is_empty());
    assert_eq!(h.s.stats().stale_events_refused, 0);
}

#[test]
fn last_outcome_says_how_the_latest_attempt_ended() {
    let mut h = Harness::new();
    h.node(S1, reg("n1", 1), 1);
    let id = h.submit(vec![TaskSpec::call("noop", "").max_attempts(2)])[0];
    h.effects();
    assert_eq!(h.record(id).last_outcome, None);
    h.finish(S1, id, 1, Outcome::Failed);
    h.effects();
    assert_eq!(h.record(id).last_outcome, Some(Outcome::Failed));
    h.s.credits(S1, 1, h.now);
    h.advance(Duration::from_secs(1));
    h.effects();
    assert_eq!(h.record(id).state, TaskState::Assigned);
    assert_eq!(h.record(id).last_outcome, None);
    h.finish(S1, id, 2, Outcome::StartFailed);
    h.effects();
    assert_eq!(
        (h.record(id).state, h.record(id).last_outcome),
        (TaskState::Failed, Some(Outcome::StartFailed))
    );
}
