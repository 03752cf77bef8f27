//! A live task's compact in-memory state, the states of its machine
//! (QUEUED -> ASSIGNED -> RUNNING -> final, and back to QUEUED with
//! attempt + 1 on a retry or a node loss) and the fencing check
//! ([`LiveTask::is_current`]). The transitions themselves, which write the
//! task's record and events, are `transitions.rs`'s.
//!
//! A million tasks may wait at once, so a [`LiveTask`] keeps only what
//! differs per task: the spec's shared part (handler, labels, slots, ...)
//! lives once in its queue class's example, and what only a placed task
//! needs sits behind one optional box ([`Extra`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use weft_proto::{Attempt, NodeId, Outcome, TaskId, TaskKind, TaskSpec, TaskState};

use super::queue::ClassId;
use super::registry::SessionId;
use crate::store::{AttemptRecord, MAX_ATTEMPT_HISTORY, TaskRecord};

/// Where the current attempt runs.
#[derive(Clone, Debug)]
pub(crate) struct Placement {
    pub session: SessionId,
    pub node_id: NodeId,
    pub node_name: Arc<str>,
}

/// Inputs up to this many bytes are kept inside the [`LiveSpec`] itself.
pub(crate) const INLINE_INPUT: usize = 22;

/// The per-task part of a live task's spec. Most tasks are calls that
/// differ from their class's example (see `queue::Class`) only in their
/// input, so only the input is kept; the whole spec is rebuilt when it is
/// needed (a record to write, an assignment), which is rare next to waiting.
///
/// Inputs are always copies: a spec decoded from a `Submit` slices the
/// request's buffer, and one long-lived task would otherwise keep the whole
/// buffer (thousands of specs) alive.
#[derive(Debug)]
pub(crate) enum LiveSpec {
    /// A call like its class's example but for this input, held inline.
    Inline { len: u8, data: [u8; INLINE_INPUT] },
    /// A call like its class's example but for this larger input.
    Input(Box<[u8]>),
    /// Any other spec, whole (its bytes its own).
    Full(Arc<TaskSpec>),
}

impl LiveSpec {
    /// Only the input of `spec`, when `example` (its class's example) has
    /// everything else.
    pub fn compact(spec: &TaskSpec, example: &TaskSpec) -> Option<LiveSpec> {
        let (TaskKind::Call(call), TaskKind::Call(like)) = (&spec.kind, &example.kind) else {
            return None;
        };
        let alike = call.handler == like.handler
            && spec.slots == example.slots
            && spec.timeout == example.timeout
            && spec.schedule_timeout == example.schedule_timeout
            && spec.max_attempts == example.max_attempts
            && spec.name == example.name
            && spec.labels == example.labels
            // A client's trace context is per request (usually one span
            // for a whole map, so still shared).
            && spec.trace == example.trace
            // Dependencies and start times are per task (`graph.rs`).
            && spec.after.is_empty()
            && spec.not_before.is_none()
            && spec.ref_name == example.ref_name;
        if !alike {
            return None;
        }
        let input = &call.input[..];
        Some(match u8::try_from(input.len()) {
            Ok(len) if input.len() <= INLINE_INPUT => {
                let mut data = [0; INLINE_INPUT];
                data[..input.len()].copy_from_slice(input);
                LiveSpec::Inline { len, data }
            }
            _ => LiveSpec::Input(input.into()),
        })
    }

    /// `spec` whole, with its bytes copied out of whatever buffer they
    /// share (see the type's docs).
    pub fn full(mut spec: TaskSpec) -> (LiveSpec, Arc<TaskSpec>) {
        own_input(&mut spec);
        let spec = Arc::new(spec);
        (LiveSpec::Full(Arc::clone(&spec)), spec)
    }

    /// The spec as far as scheduling goes: right in everything but
    /// possibly the input (handler, labels, slots, timeout, attempts).
    pub fn template<'a>(&'a self, example: &'a TaskSpec) -> &'a TaskSpec {
        match self {
            LiveSpec::Full(spec) => spec,
            LiveSpec::Inline { .. } | LiveSpec::Input(_) => example,
        }
    }

    /// The whole spec, rebuilt from `example` unless kept whole.
    pub fn to_spec(&self, example: &TaskSpec) -> Arc<TaskSpec> {
        let input = match self {
            LiveSpec::Full(spec) => return Arc::clone(spec),
            LiveSpec::Inline { len, data } => &data[..usize::from(*len)],
            LiveSpec::Input(input) => &input[..],
        };
        let mut spec = example.clone();
        if let TaskKind::Call(call) = &mut spec.kind {
            call.input = Bytes::copy_from_slice(input);
        }
        Arc::new(spec)
    }
}

/// Makes `spec`'s input (a call's input, a command's stdin) a copy of its
/// own, so a spec that lives on (a live task's, an assignment's) does not
/// keep the buffer of the request it was decoded from.
pub(crate) fn own_input(spec: &mut TaskSpec) {
    let bytes = match &mut spec.kind {
        TaskKind::Call(call) => &mut call.input,
        TaskKind::Exec(exec) => &mut exec.stdin,
    };
    if !bytes.is_empty() {
        *bytes = Bytes::copy_from_slice(bytes);
    }
}

/// A task that is not final yet. Kept small: a million of these may wait
/// (the size is pinned by a test). Its id is kept by the table that holds it.
#[derive(Debug)]
pub(crate) struct LiveTask {
    /// The per-task part of the spec; the rest is the class's example.
    pub spec: LiveSpec,
    /// Submission time, in nanoseconds since the Unix epoch.
    created_at: u64,
    /// Seq the next event of this task gets.
    pub next_seq: u64,
    /// What placed or unlucky tasks need (the node of the current attempt,
    /// a pending cancel, lost nodes), boxed so a queued task pays one
    /// pointer for it.
    extra: Option<Box<Extra>>,
    pub class: ClassId,
    /// Latest attempt (0 before the first assignment).
    pub attempt: u32,
    pub failures: u32,
    pub node_losses: u32,
    pub state: TaskState,
    /// How the latest attempt ended (`None` while it runs or was lost).
    pub last_outcome: Option<Outcome>,
    /// Queued but waiting out a retry backoff (not in a ready queue).
    pub delayed: bool,
}

/// The rarely needed part of a [`LiveTask`].
#[derive(Debug, Default)]
pub(crate) struct Extra {
    /// Node of the current attempt; `None` while queued.
    placement: Option<Placement>,
    /// Next output chunk seq expected from the current attempt (dedupe).
    next_chunk: u64,
    /// Exit code of the attempt that just ended, for the final record.
    exit_code: Option<i32>,
    /// Set when a client cancelled a running task.
    cancel: Option<Box<str>>,
    /// Different nodes lost while this task ran on them (poison evidence).
    lost_nodes: Vec<NodeRef>,
    /// When the current attempt was assigned and started (nanoseconds
    /// since the Unix epoch; 0: not yet), kept inline so a task's first
    /// attempt costs no allocation of its own.
    assigned_at: u64,
    started_at: u64,
    /// The attempts that ended, oldest first, at most
    /// [`MAX_ATTEMPT_HISTORY`] (the record shows the latest that many,
    /// the current one included).
    ended: Vec<AttemptRecord>,
}

fn from_nanos(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

pub(crate) fn nanos(t: SystemTime) -> u64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

impl LiveTask {
    pub fn new(spec: LiveSpec, class: ClassId, created_at: SystemTime) -> Self {
        LiveTask {
            spec,
            created_at: nanos(created_at),
            next_seq: 0,
            extra: None,
            class,
            attempt: 0,
            failures: 0,
            node_losses: 0,
            state: TaskState::Queued,
            last_outcome: None,
            delayed: false,
        }
    }

    /// When it was submitted, in nanoseconds since the Unix epoch.
    pub fn created_nanos(&self) -> u64 {
        self.created_at
    }

    /// When it was submitted.
    pub fn created_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.created_at)
    }

    /// The record as the store keeps it, last changed at `updated_at`.
    pub fn record(&self, id: TaskId, spec: Arc<TaskSpec>, updated_at: SystemTime) -> TaskRecord {
        let placement = self.placement();
        TaskRecord {
            id,
            spec,
            state: self.state,
            attempt: Attempt(self.attempt),
            node_id: placement.map(|p| p.node_id),
            node_name: placement.map(|p| Arc::clone(&p.node_name)),
            exit_code: self.extra.as_ref().and_then(|e| e.exit_code),
            output: Bytes::new(),
            error: String::new(),
            pending_reason: String::new(),
            waiting_for: Vec::new(),
            job_id: Some(super::graph::job_of(id)).filter(|job| *job != id),
            failures: self.failures,
            node_losses: self.node_losses,
            created_at: self.created_at(),
            updated_at,
            next_seq: self.next_seq,
            last_outcome: self.last_outcome,
            lost_nodes: self.lost_nodes().to_vec(),
            // Only while it is out on a node: a final record has none.
            cancel_requested: matches!(self.state, TaskState::Assigned | TaskState::Running)
                .then(|| self.cancel_reason().map(str::to_owned))
                .flatten(),
            attempts: self.attempts(),
        }
    }

    /// The attempt history: the ended attempts, then the current one.
    fn attempts(&self) -> Vec<AttemptRecord> {
        let Some(extra) = &self.extra else {
            return Vec::new();
        };
        let current = self.current_attempt();
        let total = extra.ended.len() + usize::from(current.is_some());
        let skip = total.saturating_sub(MAX_ATTEMPT_HISTORY);
        let mut attempts = Vec::with_capacity(total - skip);
        attempts.extend(extra.ended.iter().skip(skip).cloned());
        attempts.extend(current);
        attempts
    }

    /// The current attempt as the record shows it, if it is on a node.
    fn current_attempt(&self) -> Option<AttemptRecord> {
        let extra = self.extra.as_ref()?;
        let placement = extra.placement.as_ref()?;
        (extra.assigned_at != 0).then(|| AttemptRecord {
            number: Attempt(self.attempt),
            node_id: placement.node_id,
            node_name: Arc::clone(&placement.node_name),
            assigned_at: from_nanos(extra.assigned_at),
            started_at: (extra.started_at != 0).then(|| from_nanos(extra.started_at)),
            ended_at: None,
            outcome: None,
            exit_code: None,
            reason: String::new(),
        })
    }

    /// The current attempt was assigned (at `at`) to its placement.
    pub fn attempt_assigned(&mut self, at: SystemTime) {
        let extra = self.extra.get_or_insert_default();
        extra.assigned_at = nanos(at).max(1);
        extra.started_at = 0;
    }

    /// The current attempt started (its node said so) at `at`.
    pub fn attempt_started(&mut self, at: SystemTime) {
        if let Some(extra) = &mut self.extra
            && extra.assigned_at != 0
            && extra.started_at == 0
        {
            extra.started_at = nanos(at).max(1);
        }
    }

    /// The current attempt ended at `at`, for `reason` (empty for a
    /// success), as its node reported it (`last_outcome`, exit code) or
    /// not: it joins the history, which keeps the latest
    /// [`MAX_ATTEMPT_HISTORY`]. Nothing happens for a task not on a node.
    pub fn attempt_ended(&mut self, at: SystemTime, reason: &str) {
        let Some(mut attempt) = self.current_attempt() else {
            return;
        };
        attempt.ended_at = Some(at);
        attempt.outcome = self.last_outcome;
        attempt.reason = reason.to_owned();
        let Some(extra) = &mut self.extra else {
            return;
        };
        attempt.exit_code = extra.exit_code;
        extra.assigned_at = 0;
        extra.started_at = 0;
        if extra.ended.len() >= MAX_ATTEMPT_HISTORY {
            let drop = extra.ended.len() + 1 - MAX_ATTEMPT_HISTORY;
            extra.ended.drain(..drop);
        }
        extra.ended.push(attempt);
    }

    /// Whether an earlier attempt started (its node said so). Also true
    /// when the history no longer holds attempt 1 (dropped past
    /// [`MAX_ATTEMPT_HISTORY`], or restored from a record written before
    /// history was kept): a start that cannot be told first is not.
    pub fn started_before(&self) -> bool {
        if self.attempt <= 1 {
            return false;
        }
        let Some(extra) = &self.extra else {
            return true;
        };
        extra.ended.first().is_none_or(|first| first.number.0 != 1)
            || extra.ended.iter().any(|a| a.started_at.is_some())
    }

    /// Puts back the attempt history of a restored record: its open last
    /// attempt (if the task is still on that node) as the current one.
    pub fn restore_attempts(&mut self, mut attempts: Vec<AttemptRecord>, on_node: bool) {
        if attempts.is_empty() {
            return;
        }
        let extra = self.extra.get_or_insert_default();
        if on_node
            && let Some(last) = attempts.last()
            && last.ended_at.is_none()
            && last.number.0 == self.attempt
        {
            extra.assigned_at = nanos(last.assigned_at).max(1);
            extra.started_at = last.started_at.map_or(0, |t| nanos(t).max(1));
            attempts.pop();
        }
        if attempts.len() > MAX_ATTEMPT_HISTORY {
            attempts.drain(..attempts.len() - MAX_ATTEMPT_HISTORY);
        }
        extra.ended = attempts;
    }

    /// Node of the current attempt; `None` while queued.
    pub fn placement(&self) -> Option<&Placement> {
        self.extra.as_ref()?.placement.as_ref()
    }

    /// The same, to change the session or name of a reclaimed attempt.
    pub fn placement_mut(&mut self) -> Option<&mut Placement> {
        self.extra.as_mut()?.placement.as_mut()
    }

    /// The current attempt now runs at `placement`; its output chunks
    /// start from 0.
    pub fn place(&mut self, placement: Placement) {
        let extra = self.extra.get_or_insert_default();
        extra.placement = Some(placement);
        extra.next_chunk = 0;
        extra.exit_code = None;
    }

    /// The attempt is over and the task waits again: forgets its node,
    /// chunk seq and exit code (and the box, when nothing else is in it).
    pub fn unplace(&mut self) {
        if let Some(extra) = &mut self.extra {
            extra.placement = None;
            extra.next_chunk = 0;
            extra.exit_code = None;
            extra.assigned_at = 0;
            extra.started_at = 0;
            if extra.cancel.is_none() && extra.lost_nodes.is_empty() && extra.ended.is_empty() {
                self.extra = None;
            }
        }
    }

    /// How long the current attempt has run by `now` (`None` before it
    /// started), for the run duration metric.
    pub fn run_time(&self, now: SystemTime) -> Option<Duration> {
        let started = self.extra.as_ref()?.started_at;
        (started > 0).then(|| Duration::from_nanos(nanos(now).saturating_sub(started)))
    }

    /// Next output chunk seq expected from the current attempt.
    pub fn next_chunk(&self) -> u64 {
        self.extra.as_ref().map_or(0, |e| e.next_chunk)
    }

    /// Notes that chunks before `next` arrived.
    pub fn set_next_chunk(&mut self, next: u64) {
        self.extra.get_or_insert_default().next_chunk = next;
    }

    /// Exit code of the attempt that just ended.
    pub fn set_exit_code(&mut self, code: Option<i32>) {
        match (&mut self.extra, code) {
            (Some(extra), code) => extra.exit_code = code,
            (None, None) => {}
            (None, Some(code)) => self.extra.get_or_insert_default().exit_code = Some(code),
        }
    }

    /// The reason a client gave when it cancelled this task while it ran;
    /// recorded as the error once the node reports or is lost.
    pub fn cancel_reason(&self) -> Option<&str> {
        self.extra.as_ref()?.cancel.as_deref()
    }

    /// Records a client's cancel of the running attempt.
    pub fn set_cancel(&mut self, reason: String) {
        self.extra.get_or_insert_default().cancel = Some(reason.into_boxed_str());
    }

    /// Different nodes lost while this task ran on them, oldest first.
    pub fn lost_nodes(&self) -> &[NodeRef] {
        self.extra.as_ref().map_or(&[], |e| &e.lost_nodes)
    }

    /// Notes that `node` was lost while this task ran on it (once per node).
    pub fn add_lost_node(&mut self, node: NodeRef) {
        if !self.lost_nodes().iter().any(|(id, _)| *id == node.0) {
            self.extra.get_or_insert_default().lost_nodes.push(node);
        }
    }

    /// True when `attempt` is this task's current attempt and it is running
    /// (or assigned) on `session`: the fencing rule.
    pub fn is_current(&self, attempt: Attempt, session: SessionId) -> bool {
        matches!(self.state, TaskState::Assigned | TaskState::Running)
            && self.attempt == attempt.0
            && self.placement().is_some_and(|p| p.session == session)
    }

    /// The node of the current attempt, as an event names it.
    pub fn node(&self) -> (Option<NodeId>, Option<Arc<str>>) {
        match self.placement() {
            Some(p) => (Some(p.node_id), Some(Arc::clone(&p.node_name))),
            None => (None, None),
        }
    }
}

/// Index of a state in the per-state counters.
pub(crate) fn state_index(state: TaskState) -> usize {
    TaskState::ALL.iter().position(|s| *s == state).unwrap_or(0)
}

/// A lost or previous node, named in a `StateChanged` event.
pub(crate) type NodeRef = (NodeId, Arc<str>);
