//! The follower's spans from hand-made commits: names, parents, times, and
//! what a restart or a client's "not sampled" changes.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::SpanId;
use opentelemetry_sdk::trace::SpanData;

use weft_proto::{Attempt, NodeId, Outcome, TaskId, TaskSpec, TaskState, TraceContext};

use super::follow::{CommittedBatch, Follower};
use super::ids::{SpanOf, span_id};
use super::{attempt_context, ids};
use crate::store::{EventBody, Record, TaskEvent, TaskRecord};

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_000_000 + ms)
}

fn record(id: TaskId, spec: &Arc<TaskSpec>, state: TaskState, attempt: u32) -> TaskRecord {
    TaskRecord {
        attempt: Attempt(attempt),
        exit_code: state.is_final().then_some(0),
        last_outcome: state.is_final().then_some(Outcome::Succeeded),
        ..TaskRecord::for_test(id, Arc::clone(spec), state, at(0))
    }
}

fn state(id: TaskId, seq: u64, attempt: u32, ms: u64, state: TaskState) -> Record {
    Record::Event(TaskEvent {
        task_id: id,
        seq,
        attempt: Attempt(attempt),
        time: at(ms),
        body: EventBody::State {
            state,
            node_id: Some(NodeId::new()),
            node_name: Some(Arc::from("n1")),
            reason: String::new(),
        },
    })
}

fn finished(id: TaskId, spec: &Arc<TaskSpec>, seq: u64, ms: u64) -> Vec<Record> {
    let done = record(id, spec, TaskState::Succeeded, 1);
    vec![
        Record::Task(done.clone()),
        Record::Event(TaskEvent {
            task_id: id,
            seq,
            attempt: Attempt(1),
            time: at(ms),
            body: EventBody::Finished(Arc::new(done)),
        }),
    ]
}

fn batch(records: Vec<Record>, released: u64) -> CommittedBatch {
    CommittedBatch {
        records,
        commit: Some((at(released - 1), at(released))),
        released: at(released),
    }
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} span"))
}

/// Submitted, assigned, running, finished: one commit each.
fn life(follower: &mut Follower, id: TaskId, spec: &Arc<TaskSpec>) -> Vec<SpanData> {
    let mut spans = Vec::new();
    let queued = record(id, spec, TaskState::Queued, 0);
    follower.commit(
        batch(
            vec![Record::Task(queued), state(id, 0, 0, 0, TaskState::Queued)],
            2,
        ),
        &mut spans,
    );
    let assigned = record(id, spec, TaskState::Assigned, 1);
    follower.commit(
        batch(
            vec![
                Record::Task(assigned),
                state(id, 1, 1, 10, TaskState::Assigned),
            ],
            11,
        ),
        &mut spans,
    );
    follower.commit(
        batch(vec![state(id, 2, 1, 12, TaskState::Running)], 13),
        &mut spans,
    );
    follower.commit(batch(finished(id, spec, 3, 50), 52), &mut spans);
    spans
}

#[test]
fn a_task_life_makes_its_spans_under_its_root() {
    let mut follower = Follower::default();
    let id = TaskId::new();
    let spec = Arc::new(TaskSpec::call("noop", ""));
    let mut spans = Vec::new();
    follower.submitted(&[(id, None)], at(0), at(3), &mut spans);
    spans.extend(life(&mut follower, id, &spec));
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
    assert_eq!(
        names,
        ["submit", "commit", "queued", "attempt 1", "result", "task"]
    );
    let root = named(&spans, "task");
    assert_eq!(root.parent_span_id, SpanId::INVALID);
    assert_eq!(
        root.span_context.trace_id().to_bytes(),
        ids::trace_id(id),
        "a trace of the task's own"
    );
    assert_eq!((root.start_time, root.end_time), (at(0), at(52)));
    let root_id = SpanId::from_bytes(span_id(id, SpanOf::Task));
    for name in ["submit", "queued", "attempt 1", "result"] {
        assert_eq!(named(&spans, name).parent_span_id, root_id, "{name}");
    }
    let attempt = named(&spans, "attempt 1");
    assert_eq!((attempt.start_time, attempt.end_time), (at(10), at(50)));
    assert_eq!(
        attempt.span_context.span_id().to_bytes(),
        attempt_context(id, Attempt(1), None, true)
            .expect("a context")
            .parent_id,
        "the attempt's span is what its Assign names"
    );
    assert_eq!(
        named(&spans, "commit").parent_span_id,
        SpanId::from_bytes(span_id(id, SpanOf::Submit))
    );
    let queued = named(&spans, "queued");
    assert_eq!((queued.start_time, queued.end_time), (at(0), at(10)));
    assert_eq!(follower.live(), 0, "a final task is forgotten");
}

#[test]
fn a_clients_context_is_the_roots_parent_and_not_sampled_exports_nothing() {
    let client = TraceContext::parse(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "",
    )
    .expect("valid");
    let mut follower = Follower::default();
    let id = TaskId::new();
    let spec = Arc::new(TaskSpec::call("noop", "").trace(client.clone()));
    let spans = life(&mut follower, id, &spec);
    let root = named(&spans, "task");
    assert_eq!(root.span_context.trace_id().to_bytes(), client.trace_id);
    assert_eq!(root.parent_span_id, SpanId::from_bytes(client.parent_id));
    assert!(root.parent_span_is_remote);

    let mut unsampled = client.clone();
    unsampled.flags = 0;
    let spec = Arc::new(TaskSpec::call("noop", "").trace(unsampled.clone()));
    assert!(life(&mut follower, TaskId::new(), &spec).is_empty());
    assert_eq!(
        attempt_context(id, Attempt(1), Some(&unsampled), true),
        Some(unsampled),
        "an unsampled context is passed on unchanged"
    );
    assert_eq!(follower.live(), 0);
}

#[test]
fn an_attempt_assigned_before_a_restart_keeps_its_span_id() {
    let mut follower = Follower::default();
    let id = TaskId::new();
    let spec = Arc::new(TaskSpec::call("noop", ""));
    let mut spans = Vec::new();
    // This coordinator sees the task first when it finishes.
    follower.commit(batch(finished(id, &spec, 3, 50), 52), &mut spans);
    let attempt = named(&spans, "attempt 1");
    assert_eq!(
        attempt.span_context.span_id().to_bytes(),
        span_id(id, SpanOf::Attempt(Attempt(1)))
    );
    assert!(
        attempt
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "weft.start_unknown")
    );
}

#[test]
fn without_export_an_attempt_runs_under_the_clients_context_or_none() {
    let id = TaskId::new();
    let client = TraceContext::new([7; 16], [9; 8]);
    assert_eq!(
        attempt_context(id, Attempt(1), Some(&client), false),
        Some(client.clone())
    );
    assert_eq!(attempt_context(id, Attempt(1), None, false), None);
    let exported = attempt_context(id, Attempt(2), Some(&client), true).expect("a context");
    assert_eq!(exported.trace_id, client.trace_id);
    assert_eq!(exported.parent_id, span_id(id, SpanOf::Attempt(Attempt(2))));
}

#[test]
fn a_pending_tasks_queued_time_starts_at_its_queued_event() {
    let mut follower = Follower::default();
    let id = TaskId::new();
    let spec = Arc::new(TaskSpec::call("noop", ""));
    let mut spans = Vec::new();
    // Submitted PENDING (it runs after another task), queued at 100 ms.
    let pending = record(id, &spec, TaskState::Pending, 0);
    follower.commit(
        batch(
            vec![
                Record::Task(pending),
                state(id, 0, 0, 0, TaskState::Pending),
            ],
            2,
        ),
        &mut spans,
    );
    let queued = record(id, &spec, TaskState::Queued, 0);
    follower.commit(
        batch(
            vec![
                Record::Task(queued),
                state(id, 1, 0, 100, TaskState::Queued),
            ],
            101,
        ),
        &mut spans,
    );
    let assigned = record(id, &spec, TaskState::Assigned, 1);
    follower.commit(
        batch(
            vec![
                Record::Task(assigned),
                state(id, 2, 1, 110, TaskState::Assigned),
            ],
            111,
        ),
        &mut spans,
    );
    follower.commit(batch(finished(id, &spec, 3, 150), 152), &mut spans);
    let queued = named(&spans, "queued");
    assert_eq!((queued.start_time, queued.end_time), (at(100), at(110)));
    assert_eq!(follower.live(), 0);
}

#[test]
fn the_commit_span_is_under_the_submit_span_whichever_arrives_first() {
    let spec = Arc::new(TaskSpec::call("noop", ""));
    for submit_first in [false, true] {
        let mut follower = Follower::default();
        let id = TaskId::new();
        let mut spans = Vec::new();
        if submit_first {
            follower.submitted(&[(id, None)], at(0), at(3), &mut spans);
        }
        let queued = record(id, &spec, TaskState::Queued, 0);
        follower.commit(
            batch(
                vec![Record::Task(queued), state(id, 0, 0, 0, TaskState::Queued)],
                2,
            ),
            &mut spans,
        );
        if !submit_first {
            follower.submitted(&[(id, None)], at(0), at(3), &mut spans);
        }
        follower.commit(batch(finished(id, &spec, 1, 50), 52), &mut spans);
        let submit = named(&spans, "submit");
        assert_eq!(
            submit.parent_span_id,
            SpanId::from_bytes(span_id(id, SpanOf::Task))
        );
        assert_eq!(
            named(&spans, "commit").parent_span_id,
            submit.span_context.span_id(),
            "submit first: {submit_first}"
        );
    }
}

#[test]
fn a_task_without_a_submit_has_its_commit_span_under_its_root() {
    // A cron fire: the scheduler submits it, no Submit request times it.
    let mut follower = Follower::default();
    let id = TaskId::new();
    let spec = Arc::new(TaskSpec::call("noop", ""));
    let spans = life(&mut follower, id, &spec);
    assert!(spans.iter().all(|s| s.name != "submit"));
    assert_eq!(
        named(&spans, "commit").parent_span_id,
        SpanId::from_bytes(span_id(id, SpanOf::Task))
    );
}
