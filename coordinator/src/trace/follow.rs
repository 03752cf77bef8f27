//! Turns what the driver committed into finished spans: one trace per
//! task, from the records and events each commit wrote.
//!
//! Plain state, no runtime and no I/O: [`Follower::commit`] takes one
//! committed batch and appends the spans it ended; the caller hands them to
//! the exporter. It runs on the trace task, never on the driver's, which
//! only moves each committed batch's records here.
//!
//! The spans of a task (all in its trace, see `super::trace_of`):
//! - `task` (the root): submitted until its result was durable;
//! - `submit` (made by the service, `Follower::submitted`) and its child
//!   `commit`, the store commit that made the submit durable; a task no
//!   Submit made (a cron fire) has no `submit`, and its `commit` is the
//!   root's child;
//! - `queued` per attempt: queued until assigned;
//! - `attempt N`: assigned until it ended (node, outcome, exit code);
//! - `result`: the final state recorded until that commit returned.
//!
//! Times a coordinator did not see (an attempt assigned before a restart)
//! start when this coordinator first saw the task, marked so.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use weft_proto::{Attempt, NodeId, Outcome, TaskId, TaskState, TraceContext};

use super::ids::{SpanOf, span_id};
use super::trace_of;
use crate::store::{EventBody, Record, TaskRecord};

/// One commit that returned, as the trace task gets it.
pub(crate) struct CommittedBatch {
    /// What was written, in order.
    pub records: Vec<Record>,
    /// When the store commit ran (`None`: nothing was written).
    pub commit: Option<(SystemTime, SystemTime)>,
    /// When its effects were released (replies answered).
    pub released: SystemTime,
}

/// A live task as the spans need it.
struct Followed {
    trace: [u8; 16],
    /// The root span's parent: the client's span, if it sent one.
    parent: Option<[u8; 8]>,
    /// False when the client's context says "not sampled": nothing is
    /// exported for the task.
    sampled: bool,
    created: SystemTime,
    /// First seen by this coordinator (stands in for times it missed).
    seen: SystemTime,
    queued_since: Option<SystemTime>,
    /// Its Submit's timing arrived: its `commit` span is the `submit`
    /// span's child.
    submitted: bool,
    /// The commit that made it durable, while no Submit's timing has
    /// arrived for it: exported under `submit` when one does, else under
    /// the root when the task ends.
    commit: Option<Commit>,
    attempt: Option<Running>,
    last_outcome: Option<Outcome>,
    exit_code: Option<i32>,
}

/// When the store commit that wrote a task first ran, and how many records
/// it wrote.
#[derive(Clone, Copy)]
struct Commit {
    times: (SystemTime, SystemTime),
    records: usize,
}

/// How many Submit timings that came before their task's first batch are
/// kept. A task that ended before its Submit's timing came, or whose batch
/// the trace task dropped, never takes its id out: past this the set is
/// cleared (the tasks still waiting get their `commit` under their root).
const EARLY_SUBMITS: usize = 1 << 16;

/// The attempt on a node.
struct Running {
    number: Attempt,
    assigned: Option<SystemTime>,
    started: Option<SystemTime>,
    node_id: Option<NodeId>,
    node_name: Option<Arc<str>>,
}

/// Per-task span state of live tasks, and the scope spans are made under.
pub(crate) struct Follower {
    tasks: HashMap<TaskId, Followed>,
    /// Tasks whose Submit's timing came before the batch that wrote them
    /// (the driver answers a Submit before it hands the batch here).
    early: HashSet<TaskId>,
    scope: InstrumentationScope,
}

impl Default for Follower {
    fn default() -> Self {
        Follower {
            tasks: HashMap::new(),
            early: HashSet::new(),
            scope: InstrumentationScope::builder("weft-coordinator")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }
    }
}

impl Follower {
    /// The `submit` spans of one Submit request: `received` until the
    /// commit was acknowledged (`acked`), one per task, and the `commit`
    /// spans under them of the tasks whose batch came already.
    pub fn submitted(
        &mut self,
        tasks: &[(TaskId, Option<TraceContext>)],
        received: SystemTime,
        acked: SystemTime,
        out: &mut Vec<SpanData>,
    ) {
        for (id, ctx) in tasks {
            if ctx.as_ref().is_some_and(|c| !c.sampled()) {
                continue;
            }
            let (trace, _) = trace_of(*id, ctx.as_ref());
            out.push(self.span(
                trace,
                span_id(*id, SpanOf::Submit),
                Some(span_id(*id, SpanOf::Task)),
                "submit",
                (received, acked),
                vec![
                    KeyValue::new("weft.task.id", id.to_string()),
                    KeyValue::new("weft.submit.tasks", tasks.len() as i64),
                ],
                Status::Unset,
            ));
            match self.tasks.get_mut(id) {
                Some(f) => {
                    f.submitted = true;
                    if let Some(commit) = f.commit.take() {
                        out.push(self.commit_span(*id, SpanOf::Submit, commit));
                    }
                }
                None => {
                    if self.early.len() >= EARLY_SUBMITS {
                        self.early.clear();
                    }
                    self.early.insert(*id);
                }
            }
        }
    }

    /// Appends the spans that `batch` ended.
    pub fn commit(&mut self, batch: CommittedBatch, out: &mut Vec<SpanData>) {
        let records = batch.records.len();
        for record in batch.records {
            match record {
                Record::Task(task) => self.record(&task, batch.released),
                Record::Event(event) => {
                    let Some(followed) = self.tasks.get_mut(&event.task_id) else {
                        continue;
                    };
                    let id = event.task_id;
                    match event.body {
                        EventBody::State { state, .. } if event.seq == 0 => {
                            // First seen: queued, or pending (its later
                            // Queued event starts its queued time).
                            followed.queued_since =
                                (state == TaskState::Queued).then_some(event.time);
                            if let (Some(times), true) = (batch.commit, followed.sampled) {
                                let commit = Commit { times, records };
                                match followed.submitted {
                                    true => out.push(self.commit_span(id, SpanOf::Submit, commit)),
                                    false => followed.commit = Some(commit),
                                }
                            }
                        }
                        EventBody::State {
                            state: TaskState::Queued,
                            reason,
                            ..
                        } => {
                            // Requeued: the attempt before ended (why is
                            // in the reason; its exit code is not kept).
                            self.end_attempt(id, event.time, Some(reason), out);
                            if let Some(f) = self.tasks.get_mut(&id) {
                                f.queued_since = Some(event.time);
                            }
                        }
                        EventBody::State {
                            state: TaskState::Assigned,
                            node_id,
                            node_name,
                            ..
                        } => {
                            let since = followed.queued_since.take().unwrap_or(followed.seen);
                            followed.attempt = Some(Running {
                                number: event.attempt,
                                assigned: Some(event.time),
                                started: None,
                                node_id,
                                node_name,
                            });
                            if followed.sampled {
                                let attrs =
                                    vec![KeyValue::new("weft.attempt", i64::from(event.attempt.0))];
                                out.push(self.span_of(
                                    id,
                                    SpanOf::Queued(event.attempt),
                                    SpanOf::Task,
                                    "queued",
                                    (since, event.time),
                                    attrs,
                                ));
                            }
                        }
                        EventBody::State {
                            state: TaskState::Running,
                            node_id,
                            node_name,
                            ..
                        } => {
                            let running = followed.attempt.get_or_insert(Running {
                                number: event.attempt,
                                assigned: None,
                                started: None,
                                node_id,
                                node_name,
                            });
                            running.started = Some(event.time);
                        }
                        EventBody::Finished(task) => {
                            self.finish(&task, event.time, batch.released, out);
                        }
                        EventBody::State { .. }
                        | EventBody::Output { .. }
                        | EventBody::Progress { .. } => {}
                    }
                }
                Record::Secrets(..)
                | Record::ForgetSecrets(_)
                | Record::Schedule(_)
                | Record::DeleteSchedule(_)
                | Record::Limit(_)
                | Record::DeleteLimit { .. } => {}
            }
        }
    }

    /// How many live tasks it follows.
    #[cfg(test)]
    pub fn live(&self) -> usize {
        self.tasks.len()
    }

    /// Notes a task record: a task first seen starts being followed; a
    /// later one updates how its attempt ended.
    fn record(&mut self, task: &TaskRecord, now: SystemTime) {
        let followed = self.tasks.entry(task.id).or_insert_with(|| {
            let (trace, parent) = trace_of(task.id, task.spec.trace.as_ref());
            Followed {
                trace,
                parent,
                sampled: task.spec.trace.as_ref().is_none_or(TraceContext::sampled),
                created: task.created_at,
                seen: now,
                queued_since: None,
                submitted: self.early.remove(&task.id),
                commit: None,
                attempt: None,
                last_outcome: None,
                exit_code: None,
            }
        });
        followed.last_outcome = task.last_outcome;
        followed.exit_code = task.exit_code;
    }

    /// The final event: the last attempt's span, `result`, and the root.
    fn finish(
        &mut self,
        task: &TaskRecord,
        at: SystemTime,
        released: SystemTime,
        out: &mut Vec<SpanData>,
    ) {
        if task.attempt.0 > 0
            && let Some(f) = self.tasks.get_mut(&task.id)
            && f.attempt.is_none()
        {
            // Assigned before this coordinator started: its span is still
            // the one the node parented its own spans on.
            f.attempt = Some(Running {
                number: task.attempt,
                assigned: None,
                started: None,
                node_id: task.node_id,
                node_name: task.node_name.clone(),
            });
        }
        self.end_attempt(task.id, at, None, out);
        if let Some(commit) = self.tasks.get_mut(&task.id).and_then(|f| f.commit.take()) {
            // No Submit timed it (a cron fire, or its timing was dropped).
            out.push(self.commit_span(task.id, SpanOf::Task, commit));
        }
        let Some(f) = self.tasks.remove(&task.id) else {
            return;
        };
        if !f.sampled {
            return;
        }
        let status = match task.state {
            TaskState::Succeeded => Status::Ok,
            _ => Status::error(task.error.clone()),
        };
        let state = KeyValue::new("weft.task.state", task.state.to_string());
        out.push(self.span(
            f.trace,
            span_id(task.id, SpanOf::Result),
            Some(span_id(task.id, SpanOf::Task)),
            "result",
            (at, released.max(at)),
            vec![state.clone()],
            Status::Unset,
        ));
        let mut attrs = vec![
            KeyValue::new("weft.task.id", task.id.to_string()),
            state,
            KeyValue::new("weft.attempts", i64::from(task.attempt.0)),
        ];
        if !task.spec.name.is_empty() {
            attrs.push(KeyValue::new("weft.task.name", task.spec.name.clone()));
        }
        let mut root = self.span(
            f.trace,
            span_id(task.id, SpanOf::Task),
            f.parent,
            "task",
            (f.created, released.max(f.created)),
            attrs,
            status,
        );
        root.span_kind = SpanKind::Server;
        root.parent_span_is_remote = f.parent.is_some();
        out.push(root);
    }

    /// Ends the task's current attempt (if any) at `at`; `requeued`: the
    /// reason the task was queued again.
    fn end_attempt(
        &mut self,
        id: TaskId,
        at: SystemTime,
        requeued: Option<String>,
        out: &mut Vec<SpanData>,
    ) {
        let Some(f) = self.tasks.get_mut(&id) else {
            return;
        };
        let Some(running) = f.attempt.take() else {
            return;
        };
        if !f.sampled {
            return;
        }
        let outcome = match f.last_outcome {
            Some(outcome) => outcome.to_string(),
            // Requeued without a report: lost with its node.
            None if requeued.is_some() => "lost".to_owned(),
            None => "none".to_owned(),
        };
        let failed = !matches!(f.last_outcome, Some(Outcome::Succeeded));
        let mut attrs = vec![
            KeyValue::new("weft.attempt", i64::from(running.number.0)),
            KeyValue::new("weft.outcome", outcome.clone()),
        ];
        if let Some(node_id) = running.node_id {
            attrs.push(KeyValue::new("weft.node.id", node_id.to_string()));
        }
        if let Some(name) = &running.node_name {
            attrs.push(KeyValue::new("weft.node.name", name.to_string()));
        }
        if let Some(code) = f.exit_code {
            attrs.push(KeyValue::new("process.exit.code", i64::from(code)));
        }
        if let Some(reason) = requeued {
            attrs.push(KeyValue::new("weft.requeued", reason));
        }
        if let Some(started) = running.started {
            attrs.push(KeyValue::new(
                "weft.attempt.start_wait_ms",
                started
                    .duration_since(running.assigned.unwrap_or(started))
                    .unwrap_or_default()
                    .as_millis() as i64,
            ));
        }
        let start = match running.assigned {
            Some(at) => at,
            None => {
                attrs.push(KeyValue::new("weft.start_unknown", true));
                f.seen
            }
        };
        let (trace, number) = (f.trace, running.number);
        out.push(self.span(
            trace,
            span_id(id, SpanOf::Attempt(number)),
            Some(span_id(id, SpanOf::Task)),
            format!("attempt {}", number.0),
            (start, at.max(start)),
            attrs,
            if failed {
                Status::error(outcome)
            } else {
                Status::Ok
            },
        ));
    }

    /// The `commit` span of task `id` under its `parent` span.
    fn commit_span(&self, id: TaskId, parent: SpanOf, commit: Commit) -> SpanData {
        self.span_of(
            id,
            SpanOf::Commit,
            parent,
            "commit",
            commit.times,
            vec![KeyValue::new("weft.commit.records", commit.records as i64)],
        )
    }

    /// A span of task `id` under its `parent` span.
    fn span_of(
        &self,
        id: TaskId,
        of: SpanOf,
        parent: SpanOf,
        name: &'static str,
        times: (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
    ) -> SpanData {
        let trace = self.tasks.get(&id).map_or([0; 16], |f| f.trace);
        self.span(
            trace,
            span_id(id, of),
            Some(span_id(id, parent)),
            name,
            times,
            attributes,
            Status::Unset,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn span(
        &self,
        trace: [u8; 16],
        id: [u8; 8],
        parent: Option<[u8; 8]>,
        name: impl Into<Cow<'static, str>>,
        (start, end): (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
        status: Status,
    ) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(trace),
                SpanId::from_bytes(id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: name.into(),
            start_time: start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }
}
