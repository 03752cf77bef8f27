//! The node stream's messages, both directions: `pb::NodeMessage` in,
//! decoded to scheduler values (a validated [`NodeRegistration`], attempt
//! events), and [`ToNode`] out, as the wire bytes of a
//! `pb::CoordinatorMessage` (the stream's codec,
//! `weft_proto::wire::ConnectCodec`, sends them as they are). An `Assign`,
//! the one message sent per task, is written straight from the
//! assignments, spec fields from a borrow (`TaskSpec::encode_fields`), so
//! no generated message is built, encoded and dropped per task; the others
//! are generated messages encoded here. The tests hold an `Assign`'s bytes
//! equal to the generated encoder's.
//!
//! The one place that knows how the `Connect` stream looks on the wire;
//! the driver hands domain values and never builds a `pb` message. Pure
//! functions: no channels, no state.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message;
use tonic::Status;

use weft_proto::convert::{duration_to_pb, timestamp};
use weft_proto::limits::truncate_node_text;
use weft_proto::{
    Attempt, ExecPolicy, NodeId, Outcome, OutputStream, PROTOCOL_VERSION, TaskId, pb,
};

use crate::driver::ToNode;
use crate::error::Error;
use crate::scheduler::{Assignment, CancelOrder, NodeEventBody, NodeRegistration, NodeTaskEvent};

/// A node's `Register`, validated; `max_node_slots` (`--max-node-slots`)
/// bounds how many attempts it may list as running.
pub(super) fn registration(
    register: pb::Register,
    max_node_slots: u32,
) -> Result<NodeRegistration, Error> {
    if register.protocol_version != PROTOCOL_VERSION as i32 {
        return Err(Error::ProtocolVersion(register.protocol_version));
    }
    if register.slots == 0 {
        return Err(Error::BadRegistration("slots must be at least 1"));
    }
    weft_proto::limits::check_register(&register)?;
    weft_proto::limits::check_register_running(&register, max_node_slots)?;
    let node_id = register
        .previous_node_id
        .parse::<NodeId>()
        .unwrap_or_else(|_| NodeId::new());
    let exec = ExecPolicy::from_pb(register.exec, register.exec_allow)?;
    let name = if register.name.trim().is_empty() {
        node_id.to_string()
    } else {
        register.name
    };
    let mut bad = 0;
    let running = register
        .running
        .iter()
        .filter_map(|r| match r.task_id.parse::<TaskId>() {
            Ok(id) => Some((id, Attempt(r.attempt))),
            Err(_) => {
                bad += 1;
                None
            }
        })
        .collect();
    if bad > 0 {
        // A node may reconnect in a loop: logged at most every 10 s, with
        // how many came meanwhile.
        let due = BAD_RUNNING_IDS
            .lock()
            .ok()
            .and_then(|mut throttle| throttle.hit_by(std::time::Instant::now(), bad));
        if let Some(ignored) = due {
            tracing::warn!(node_name = %name, ignored, "ignoring running attempts with a bad task id");
        }
    }
    let resources = weft_proto::policy::check_resources("resources", register.resources)?;
    Ok(NodeRegistration {
        node_id,
        name,
        labels: register.labels.into_iter().collect::<BTreeMap<_, _>>(),
        slots: register.slots,
        prefetch: register.prefetch,
        handlers: register.handlers,
        exec,
        running,
        resources,
    })
}

/// What a node's message after `Register` says.
pub(super) enum FromNode {
    /// More slots granted.
    Credits(u32),
    /// Alive (also an empty message).
    Heartbeat,
    /// Attempt events, in order.
    Events(Vec<NodeTaskEvent>),
    /// The node drains.
    Draining,
    /// A second `Register`: a protocol error.
    RegisterAgain,
    /// The node asks for a new certificate (PKCS#10 request, DER).
    RenewCertificate(Vec<u8>),
}

/// Decodes a message the node sent after `Register`.
pub(super) fn from_node(message: pb::NodeMessage) -> FromNode {
    use pb::node_message::Body;
    match message.body {
        Some(Body::Credits(c)) => FromNode::Credits(c.grant),
        Some(Body::Heartbeat(_)) | None => FromNode::Heartbeat,
        Some(Body::Events(events)) => FromNode::Events(node_events(events)),
        Some(Body::Draining(_)) => FromNode::Draining,
        Some(Body::Register(_)) => FromNode::RegisterAgain,
        Some(Body::RenewCertificate(renew)) => FromNode::RenewCertificate(renew.csr_der.to_vec()),
    }
}

/// When "ignoring running attempts with a bad task id" was last logged.
static BAD_RUNNING_IDS: std::sync::LazyLock<std::sync::Mutex<crate::listener::backoff::Throttle>> =
    std::sync::LazyLock::new(|| {
        std::sync::Mutex::new(crate::listener::backoff::Throttle::new(
            std::time::Duration::from_secs(10),
        ))
    });

/// When "dropping node events with a bad task id" was last logged.
static BAD_TASK_IDS: std::sync::LazyLock<std::sync::Mutex<crate::listener::backoff::Throttle>> =
    std::sync::LazyLock::new(|| {
        std::sync::Mutex::new(crate::listener::backoff::Throttle::new(
            std::time::Duration::from_secs(10),
        ))
    });

/// A node's event batch as domain events. One whose task id cannot be read
/// goes on as [`NodeTaskEvent::unreadable`], for the scheduler to refuse and
/// count as stale (no `Cancel` can name it); one without a body is dropped.
fn node_events(events: pb::TaskEvents) -> Vec<NodeTaskEvent> {
    use pb::node_task_event::Body;
    events
        .events
        .into_iter()
        .filter_map(|event| {
            let Ok(task_id) = event.task_id.parse::<TaskId>() else {
                // A node may send these in a loop: logged at most every 10 s,
                // with how many came meanwhile.
                let due = BAD_TASK_IDS
                    .lock()
                    .ok()
                    .and_then(|mut throttle| throttle.hit(std::time::Instant::now()));
                if let Some(refused) = due {
                    let task_id = event.task_id.chars().take(64).collect::<String>();
                    tracing::warn!(%task_id, refused, "refusing node events with a bad task id");
                }
                return Some(NodeTaskEvent::unreadable(Attempt(event.attempt)));
            };
            let body = match event.body? {
                Body::Started(_) => NodeEventBody::Started,
                Body::Output(chunk) => NodeEventBody::Output {
                    stream: OutputStream::try_from(chunk.stream).unwrap_or(OutputStream::Stdout),
                    data: chunk.data,
                    seq: chunk.seq,
                },
                Body::Progress(mut p) => {
                    truncate_node_text(&mut p.message);
                    NodeEventBody::Progress {
                        fraction: progress_fraction(p.fraction),
                        message: p.message,
                    }
                }
                Body::Finished(mut f) => match Outcome::try_from(f.outcome) {
                    Ok(outcome) => NodeEventBody::Finished {
                        outcome,
                        exit_code: f.exit_code,
                        output: f.output,
                        // What is stored from a node is capped: a runaway
                        // error string must not bloat the store.
                        error: {
                            truncate_node_text(&mut f.error);
                            f.error
                        },
                    },
                    Err(_) => NodeEventBody::Finished {
                        outcome: Outcome::Failed,
                        exit_code: f.exit_code,
                        output: f.output,
                        error: format!("node reported no outcome ({})", f.outcome),
                    },
                },
            };
            Some(NodeTaskEvent {
                task_id,
                attempt: Attempt(event.attempt),
                body,
            })
        })
        .collect()
}

/// A node's `Progress.fraction` as watchers get it: 0 to 1, or -1 when
/// unknown (any negative). Past 1 (infinity too) is 1; NaN is unknown
/// (JSON has no NaN).
fn progress_fraction(fraction: f64) -> f64 {
    match fraction {
        f if f.is_nan() || f < 0.0 => -1.0,
        f => f.min(1.0),
    }
}

/// Encodes a message for the node as it leaves on the stream, as its wire
/// bytes: one message, except an `Assign`, which is split into as many as
/// keep each within `max_message_size` (the node decodes up to
/// `weft_proto::limits::MAX_MESSAGE_BYTES_CEILING`, at least that).
///
/// `traced`: trace export is on, so each attempt's trace context names the
/// attempt's own span as its parent (see `crate::trace::attempt_context`).
pub(super) fn encode(message: ToNode, max_message_size: usize, traced: bool) -> Encoded {
    match message {
        ToNode::Assign(assignments) => {
            Encoded::Many(split_assign(&assignments, max_message_size, traced).into_iter())
        }
        // Each attempt its own `Cancel` (a reason is at most a few hundred
        // bytes, so each fits any limit).
        ToNode::Cancel(batch) => {
            let cancels: Vec<Bytes> = batch
                .orders
                .iter()
                .map(|order| cancel_to_pb(order).encode_to_vec().into())
                .collect();
            Encoded::Many(cancels.into_iter())
        }
        other => Encoded::One(Some(to_node(other))),
    }
}

/// What one [`ToNode`] becomes on the wire: `CoordinatorMessage`s' bytes.
pub(super) enum Encoded {
    /// Any message but an `Assign` or `Cancel`.
    One(Option<Result<Bytes, Status>>),
    /// The `Assign` (or `Cancel`) messages of one batch.
    Many(std::vec::IntoIter<Bytes>),
}

impl Iterator for Encoded {
    type Item = Result<Bytes, Status>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Encoded::One(one) => one.take(),
            Encoded::Many(many) => many.next().map(Ok),
        }
    }
}

/// Room kept at the front of an `Assign` message for its own tag and
/// length (`CoordinatorMessage.assign`): one byte of tag, at most five of
/// length.
const ASSIGN_HEAD: usize = 6;

/// One batch of assignments as `Assign` messages of at most `max` bytes
/// each, in order, written straight from the assignments (the bytes the
/// generated encoder writes for `pb::CoordinatorMessage`s built of them,
/// without building those). Submit refuses a spec that could not fit
/// alone (see `SpecLimits`), and a child whose spec and parents' results
/// together could not ends FAILED instead of being released
/// (`scheduler/graph.rs`), so every message holds at least one
/// assignment within the limit; one from a store written under a larger
/// limit is sent alone.
fn split_assign(assignments: &[Assignment], max: usize, traced: bool) -> Vec<Bytes> {
    // Room for the CoordinatorMessage's own tag and length around the Assign.
    let budget = max.saturating_sub(16);
    let mut messages = Vec::new();
    let mut frame = AssignFrame::new();
    let mut spec = Vec::new();
    let mut assignment = Vec::new();
    for a in assignments {
        assignment.clear();
        write_assignment(a, traced, &mut spec, &mut assignment);
        let len = weft_proto::wire::message_len(1, assignment.len());
        if frame.count > 0 && frame.len() + len > budget {
            messages.push(std::mem::replace(&mut frame, AssignFrame::new()).finish());
        }
        weft_proto::wire::put_message(1, &assignment, &mut frame.bytes);
        frame.count += 1;
    }
    if frame.count > 0 {
        messages.push(frame.finish());
    }
    messages
}

/// An `Assign` message being written: its assignments after
/// [`ASSIGN_HEAD`] bytes of room for its head.
struct AssignFrame {
    bytes: Vec<u8>,
    count: usize,
}

impl AssignFrame {
    fn new() -> AssignFrame {
        AssignFrame {
            bytes: vec![0; ASSIGN_HEAD],
            count: 0,
        }
    }

    /// Bytes of the `Assign` written so far.
    fn len(&self) -> usize {
        self.bytes.len() - ASSIGN_HEAD
    }

    /// The whole `CoordinatorMessage`: its head written right before the
    /// assignments, the room it did not need left off the front.
    fn finish(mut self) -> Bytes {
        let mut head = Vec::with_capacity(ASSIGN_HEAD);
        prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut head);
        prost::encoding::encode_varint(self.len() as u64, &mut head);
        let start = ASSIGN_HEAD - head.len();
        self.bytes[start..ASSIGN_HEAD].copy_from_slice(&head);
        Bytes::from(self.bytes).slice(start..)
    }
}

/// Writes one `Assignment`'s fields (without its own tag and length) into
/// `out`; `spec` is room for its spec's bytes.
fn write_assignment(a: &Assignment, traced: bool, spec: &mut Vec<u8>, out: &mut Vec<u8>) {
    use prost::encoding::{message, uint32};
    let mut id = [0; weft_proto::ids::ID_LEN];
    // A string field is written as a message field is: tag, length, bytes.
    weft_proto::wire::put_message(1, a.task_id.to_str(&mut id).as_bytes(), out);
    if a.attempt.0 != 0 {
        uint32::encode(2, &a.attempt.0, out);
    }
    spec.clear();
    a.spec.encode_fields(
        weft_proto::SpecFields::Assigned(a.secret_env.as_deref()),
        spec,
    );
    weft_proto::wire::put_message(3, spec, out);
    let trace = crate::trace::attempt_context(a.task_id, a.attempt, a.spec.trace.as_ref(), traced);
    if let Some(trace) = trace {
        message::encode(4, &trace.to_pb(), out);
    }
    for p in &a.parents {
        write_parent(p, out);
    }
}

/// Writes one `ParentResult` as `Assignment.parents` (field 5), tag and
/// length first.
fn write_parent(p: &crate::scheduler::graph::ParentResult, out: &mut Vec<u8>) {
    use prost::encoding::{bytes, int32};
    use weft_proto::wire::{message_len, put_message, str_field_len};
    let state = i32::from(p.state);
    let len = message_len(1, weft_proto::ids::ID_LEN)
        + str_field_len(2, p.ref_name.as_bytes())
        + match state {
            0 => 0,
            state => int32::encoded_len(3, &state),
        }
        + str_field_len(4, &p.output);
    prost::encoding::encode_key(5, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(len as u64, out);
    let mut id = [0; weft_proto::ids::ID_LEN];
    put_message(1, p.task_id.to_str(&mut id).as_bytes(), out);
    if !p.ref_name.is_empty() {
        put_message(2, p.ref_name.as_bytes(), out);
    }
    if state != 0 {
        int32::encode(3, &state, out);
    }
    if !p.output.is_empty() {
        bytes::encode(4, &p.output, out);
    }
}

fn cancel_to_pb(cancel: &CancelOrder) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage {
        body: Some(pb::coordinator_message::Body::Cancel(pb::Cancel {
            task_id: cancel.task_id.to_string(),
            attempt: cancel.attempt.0,
            reason: cancel.reason.clone(),
        })),
    }
}

/// Encodes one message for the node (an `Assign` unsplit: [`encode`]
/// splits; a batch of Cancels as its first: [`encode`] sends each).
fn to_node(message: ToNode) -> Result<Bytes, Status> {
    use pb::coordinator_message::Body;
    let body = match message {
        ToNode::Registered {
            node_id,
            heartbeat_interval,
            heartbeat_timeout,
            max_message_size,
            start_timeout,
        } => Body::Registered(pb::Registered {
            node_id: node_id.to_string(),
            heartbeat_interval: Some(duration_to_pb(heartbeat_interval)),
            heartbeat_timeout: Some(duration_to_pb(heartbeat_timeout)),
            max_message_size: max_message_size as u64,
            start_timeout: Some(duration_to_pb(start_timeout)),
        }),
        // Not reached from `encode`, which splits an Assign itself.
        ToNode::Assign(assignments) => {
            return Ok(split_assign(&assignments, usize::MAX, false)
                .into_iter()
                .next()
                .unwrap_or_else(|| AssignFrame::new().finish()));
        }
        ToNode::Cancel(batch) => match batch.orders.first().map(cancel_to_pb) {
            Some(pb::CoordinatorMessage { body: Some(body) }) => body,
            _ => Body::Heartbeat(pb::Heartbeat {}),
        },
        ToNode::Drain(grace) => Body::Drain(pb::Drain {
            grace: grace.map(duration_to_pb),
        }),
        ToNode::Heartbeat => Body::Heartbeat(pb::Heartbeat {}),
        ToNode::Certificate(Ok((chain_pem, not_after))) => Body::Certificate(pb::NodeCertificate {
            certificate_chain_pem: chain_pem,
            not_after: Some(timestamp(not_after)),
            error: String::new(),
        }),
        ToNode::Certificate(Err(error)) => Body::Certificate(pb::NodeCertificate {
            certificate_chain_pem: String::new(),
            not_after: None,
            error,
        }),
        ToNode::Revoked => {
            return Err(Status::permission_denied(
                "this node was revoked by an admin; it may not connect again (join as a new node with a new token)",
            ));
        }
    };
    Ok(pb::CoordinatorMessage { body: Some(body) }
        .encode_to_vec()
        .into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use prost::Message;

    use weft_proto::{TaskSpec, limits};

    use super::*;
    use crate::driver::CancelBatch;

    fn body(message: ToNode) -> pb::coordinator_message::Body {
        match encode(message, limits::DEFAULT_MAX_MESSAGE_BYTES, false).next() {
            Some(Ok(bytes)) => decoded(&bytes).body.expect("a body"),
            other => panic!("no message: {other:?}"),
        }
    }

    fn decoded(bytes: &[u8]) -> pb::CoordinatorMessage {
        pb::CoordinatorMessage::decode(bytes).expect("a CoordinatorMessage")
    }

    /// What an `Assign` of `assignments` is as the generated messages
    /// (the reference the written bytes are held to).
    fn generated(assignments: &[Assignment], traced: bool) -> pb::CoordinatorMessage {
        let tasks = assignments
            .iter()
            .map(|a| pb::Assignment {
                task_id: a.task_id.to_string(),
                attempt: a.attempt.0,
                spec: Some(pb::TaskSpec {
                    kind: Some(pb::task_spec::Kind::from(&a.spec.kind)),
                    slots: a.spec.slots,
                    timeout: a.spec.timeout.map(duration_to_pb),
                    max_attempts: a.spec.max_attempts,
                    name: a.spec.name.clone(),
                    secret_env: a
                        .secret_env
                        .as_deref()
                        .map(weft_proto::SecretEnv::to_pb)
                        .unwrap_or_default(),
                    resources: (*a.spec.resources).clone(),
                    ..pb::TaskSpec::default()
                }),
                trace: crate::trace::attempt_context(
                    a.task_id,
                    a.attempt,
                    a.spec.trace.as_ref(),
                    traced,
                )
                .map(|t| t.to_pb()),
                parents: a
                    .parents
                    .iter()
                    .map(|p| pb::ParentResult {
                        task_id: p.task_id.to_string(),
                        r#ref: p.ref_name.clone(),
                        state: i32::from(p.state),
                        output: p.output.clone(),
                    })
                    .collect(),
            })
            .collect();
        pb::CoordinatorMessage {
            body: Some(pb::coordinator_message::Body::Assign(pb::Assign { tasks })),
        }
    }

    #[test]
    fn an_assign_is_written_as_the_generated_encoder_writes_it() {
        use crate::scheduler::graph::ParentResult;
        let mut secrets = weft_proto::SecretEnv::new();
        secrets.insert("API_KEY", "s3cr3t");
        let mut traced_spec = TaskSpec::call("noop", "in").resource("gpu", 2);
        traced_spec.trace = Some(weft_proto::TraceContext::new([3; 16], [4; 8]));
        let every = Assignment {
            task_id: TaskId::new(),
            attempt: Attempt(3),
            spec: Arc::new(
                TaskSpec::exec(["sh", "-c", "true"])
                    .env("X", "1")
                    .slots(2)
                    .timeout(Duration::from_millis(1_500))
                    .max_attempts(5)
                    .name("step")
                    .label("zone", "eu")
                    .priority(9)
                    .fair_key("team-a", 2)
                    .resource("cpu", 4)
                    .resource("mem", 1 << 33),
            ),
            secret_env: Some(Arc::new(secrets)),
            parents: vec![
                ParentResult {
                    task_id: TaskId::new(),
                    ref_name: "a".into(),
                    state: weft_proto::TaskState::Succeeded,
                    output: bytes::Bytes::from_static(b"out"),
                },
                ParentResult {
                    task_id: TaskId::new(),
                    ref_name: String::new(),
                    state: weft_proto::TaskState::Failed,
                    output: bytes::Bytes::new(),
                },
            ],
        };
        let first = Assignment {
            attempt: Attempt(0),
            ..assignment(TaskSpec::call("noop", ""))
        };
        let batch = vec![
            first,
            every,
            assignment(traced_spec),
            assignment(call_of_size(300)),
        ];
        for traced in [false, true] {
            let sent: Vec<Bytes> = encode(
                ToNode::Assign(batch.clone()),
                limits::DEFAULT_MAX_MESSAGE_BYTES,
                traced,
            )
            .collect::<Result<_, _>>()
            .unwrap();
            assert_eq!(sent.len(), 1);
            assert_eq!(
                sent[0][..],
                generated(&batch, traced).encode_to_vec()[..],
                "traced: {traced}"
            );
        }
    }

    #[test]
    fn assignments_and_cancels_carry_task_id_and_attempt() {
        use pb::coordinator_message::Body;
        let id = TaskId::new();
        let spec = Arc::new(TaskSpec::call("noop", "in"));
        let assign = body(ToNode::Assign(vec![Assignment {
            task_id: id,
            attempt: Attempt(2),
            spec: Arc::clone(&spec),
            secret_env: None,
            parents: Vec::new(),
        }]));
        let Body::Assign(assign) = assign else {
            panic!("not an Assign: {assign:?}");
        };
        assert_eq!(assign.tasks.len(), 1);
        assert_eq!(
            (assign.tasks[0].task_id.as_str(), assign.tasks[0].attempt),
            (id.to_string().as_str(), 2)
        );
        let sent = assign.tasks[0].spec.clone().map(TaskSpec::try_from);
        assert_eq!(sent.and_then(Result::ok), Some(TaskSpec::clone(&spec)));
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let order = |attempt| CancelOrder {
            task_id: id,
            attempt: Attempt(attempt),
            reason: "why".into(),
        };
        let batch = CancelBatch::new(vec![order(2), order(3)], Arc::clone(&queued));
        assert_eq!(queued.load(std::sync::atomic::Ordering::Relaxed), 2);
        let sent: Vec<_> = encode(ToNode::Cancel(batch), 1 << 20, false).collect();
        // Each its own message; the session's count drops once encoded.
        assert_eq!(sent.len(), 2);
        assert_eq!(queued.load(std::sync::atomic::Ordering::Relaxed), 0);
        let cancel = body(ToNode::Cancel(CancelBatch::new(vec![order(2)], queued)));
        let Body::Cancel(cancel) = cancel else {
            panic!("not a Cancel: {cancel:?}");
        };
        assert_eq!(
            (cancel.task_id, cancel.attempt, cancel.reason.as_str()),
            (id.to_string(), 2, "why")
        );
        let drain = body(ToNode::Drain(Some(Duration::from_secs(2))));
        assert!(matches!(drain, Body::Drain(pb::Drain { grace: Some(_) })));
    }

    #[test]
    fn an_assignment_carries_its_secrets_in_its_spec() {
        use pb::coordinator_message::Body;
        let env = Arc::new(
            [("API_KEY".to_owned(), "s3cr3t".to_owned())]
                .into_iter()
                .collect(),
        );
        let assign = body(ToNode::Assign(vec![Assignment {
            task_id: TaskId::new(),
            attempt: Attempt(1),
            spec: Arc::new(TaskSpec::exec(["true"])),
            secret_env: Some(env),
            parents: Vec::new(),
        }]));
        let Body::Assign(assign) = assign else {
            panic!("not an Assign");
        };
        let spec = assign.tasks[0].spec.clone().map(TaskSpec::try_from);
        let spec = spec.and_then(Result::ok).expect("a valid spec");
        assert_eq!(spec.secret_env.get("API_KEY"), Some("s3cr3t"));
    }

    #[test]
    fn an_assignment_carries_what_runs_the_attempt_and_none_of_the_queue_fields() {
        use pb::coordinator_message::Body;
        let parent = TaskId::new();
        let spec = TaskSpec::call("noop", "in")
            .slots(2)
            .timeout(Duration::from_secs(9))
            .max_attempts(4)
            .name("job step")
            .label("gpu", "1")
            .resource("gpu", 1)
            .priority(9)
            .fair_key("team-a", 3)
            .concurrency("user-42", 2, weft_proto::OverLimit::Queue)
            .rate_limit("api", 2)
            .after(parent)
            .not_before(std::time::UNIX_EPOCH + Duration::from_secs(1_900_000_000))
            .fail_if_infeasible();
        let assign = body(ToNode::Assign(vec![Assignment {
            task_id: TaskId::new(),
            attempt: Attempt(1),
            spec: Arc::new(spec.clone()),
            secret_env: None,
            parents: Vec::new(),
        }]));
        let Body::Assign(assign) = assign else {
            panic!("not an Assign");
        };
        let sent = assign.tasks[0].spec.clone().expect("a spec");
        let runs = TaskSpec::try_from(sent.clone()).expect("a valid spec");
        assert_eq!(runs.kind, spec.kind);
        assert_eq!(
            (
                runs.slots,
                runs.timeout,
                runs.max_attempts,
                runs.name.as_str()
            ),
            (2, Some(Duration::from_secs(9)), 4, "job step")
        );
        assert_eq!(runs.resources, spec.resources);
        // What only placed it is not sent: the wire fields are empty.
        assert!(sent.labels.is_empty() && sent.fair_key.is_empty() && sent.r#ref.is_empty());
        assert_eq!((sent.priority, sent.fair_weight), (0, 0));
        assert!(sent.concurrency.is_none() && sent.rate_limits.is_empty());
        assert!(sent.after.is_empty() && sent.not_before.is_none());
        assert!(sent.trace.is_none() && !sent.fail_if_infeasible);
    }

    #[test]
    fn a_register_of_another_protocol_version_is_refused() {
        let register = pb::Register {
            protocol_version: PROTOCOL_VERSION as i32 + 1,
            slots: 1,
            ..pb::Register::default()
        };
        assert!(matches!(
            registration(register, 8),
            Err(Error::ProtocolVersion(_))
        ));
    }

    #[test]
    fn a_register_declares_its_exec_policy_and_an_old_node_allows_exec() {
        let register = |exec: pb::ExecPolicy, exec_allow: &[&str]| pb::Register {
            protocol_version: PROTOCOL_VERSION as i32,
            slots: 1,
            exec: exec as i32,
            exec_allow: exec_allow.iter().map(|p| (*p).to_owned()).collect(),
            ..pb::Register::default()
        };
        let old = registration(register(pb::ExecPolicy::Unspecified, &[]), 8).unwrap();
        assert_eq!(old.exec, ExecPolicy::Allow);
        let deny = registration(register(pb::ExecPolicy::Deny, &[]), 8).unwrap();
        assert_eq!(deny.exec, ExecPolicy::Deny);
        let listed = registration(register(pb::ExecPolicy::AllowList, &["echo"]), 8).unwrap();
        assert!(listed.exec.allows_program("echo") && !listed.exec.allows_program("sh"));
        for bad in [
            register(pb::ExecPolicy::AllowList, &[]),
            register(pb::ExecPolicy::AllowList, &["bin/x"]),
            register(pb::ExecPolicy::Deny, &["echo"]),
        ] {
            let err = registration(bad, 8).unwrap_err();
            assert!(err.to_string().contains("exec_allow"), "{err}");
            assert_eq!(
                tonic::Status::from(err).code(),
                tonic::Code::InvalidArgument
            );
        }
    }

    /// A node lists at most what it may hold and the results it keeps;
    /// more is refused naming the field, before any entry is read.
    #[test]
    fn a_register_listing_too_many_running_attempts_is_refused() {
        let max = 4;
        let register = |n: usize| pb::Register {
            protocol_version: PROTOCOL_VERSION as i32,
            slots: 1,
            running: vec![
                pb::AttemptRef {
                    task_id: "not a task id".into(),
                    attempt: 1,
                };
                n
            ],
            ..pb::Register::default()
        };
        let limit = limits::max_register_running(max);
        let fine = registration(register(limit), max).expect("at the limit");
        assert!(fine.running.is_empty(), "bad task ids are ignored");
        let err = registration(register(limit + 1), max).unwrap_err();
        assert!(err.to_string().contains("running"), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
    }

    /// Refused and counted as stale by the scheduler, not dropped unseen.
    #[test]
    fn an_event_with_a_bad_task_id_goes_on_as_unreadable_and_the_rest_are_kept() {
        let started = |task_id: String| pb::NodeTaskEvent {
            task_id,
            attempt: 1,
            body: Some(pb::node_task_event::Body::Started(pb::Started::default())),
        };
        let id = TaskId::new();
        let message = pb::NodeMessage {
            body: Some(pb::node_message::Body::Events(pb::TaskEvents {
                events: vec![started("nope".into()), started(id.to_string())],
            })),
        };
        let FromNode::Events(events) = from_node(message) else {
            panic!("not events");
        };
        assert_eq!(
            events,
            [
                NodeTaskEvent::unreadable(Attempt(1)),
                NodeTaskEvent {
                    task_id: id,
                    attempt: Attempt(1),
                    body: NodeEventBody::Started,
                }
            ]
        );
    }

    #[test]
    fn a_renewal_goes_in_and_its_certificate_or_refusal_comes_out() {
        use pb::coordinator_message::Body;
        let message = pb::NodeMessage {
            body: Some(pb::node_message::Body::RenewCertificate(
                pb::RenewCertificate {
                    csr_der: bytes::Bytes::from_static(b"csr"),
                },
            )),
        };
        let FromNode::RenewCertificate(csr) = from_node(message) else {
            panic!("not a renewal");
        };
        assert_eq!(csr, b"csr");
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let Body::Certificate(cert) = body(ToNode::Certificate(Ok(("PEM".into(), at)))) else {
            panic!("not a NodeCertificate");
        };
        assert_eq!(cert.certificate_chain_pem, "PEM");
        assert_eq!(cert.not_after.map(|t| t.seconds), Some(1_800_000_000));
        assert!(cert.error.is_empty());
        let Body::Certificate(refused) = body(ToNode::Certificate(Err("no".into()))) else {
            panic!("not a NodeCertificate");
        };
        assert_eq!(
            (
                refused.certificate_chain_pem.as_str(),
                refused.error.as_str()
            ),
            ("", "no")
        );
        assert!(refused.not_after.is_none());
    }

    fn call_of_size(total: usize) -> TaskSpec {
        sized(total, |n| TaskSpec::call("x", vec![0u8; n]))
    }

    /// `build(n)` with the largest `n` whose wire spec is at most `total`
    /// bytes, as Submit measures it.
    fn sized(total: usize, build: impl Fn(usize) -> TaskSpec) -> TaskSpec {
        let mut n = total;
        loop {
            let spec = build(n);
            match pb::TaskSpec::from(&spec).encoded_len() {
                len if len > total => n -= len - total,
                _ => return spec,
            }
        }
    }

    fn assignment(spec: TaskSpec) -> Assignment {
        Assignment {
            task_id: TaskId::new(),
            attempt: Attempt(u32::MAX),
            spec: Arc::new(spec),
            secret_env: None,
            parents: Vec::new(),
        }
    }

    #[test]
    fn an_assign_is_split_so_that_every_message_fits_the_limit() {
        let max = 64 * 1024;
        let batch: Vec<Assignment> = (0..5)
            .map(|_| assignment(call_of_size(max * 2 / 5)))
            .chain([assignment(TaskSpec::call("small", ""))])
            .collect();
        let ids: Vec<String> = batch.iter().map(|a| a.task_id.to_string()).collect();
        let messages: Vec<Bytes> = encode(ToNode::Assign(batch.clone()), max, false)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            messages.len(),
            3,
            "two per message, the small one with the last two"
        );
        let mut sent = Vec::new();
        for (message, part) in messages
            .iter()
            .zip([&batch[0..2], &batch[2..4], &batch[4..]])
        {
            assert!(message.len() <= max, "{} > {max}", message.len());
            assert_eq!(message[..], generated(part, false).encode_to_vec()[..]);
            let message = decoded(message);
            let Some(pb::coordinator_message::Body::Assign(assign)) = &message.body else {
                panic!("not an Assign");
            };
            sent.extend(assign.tasks.iter().map(|t| t.task_id.clone()));
        }
        assert_eq!(sent, ids, "every assignment once, in order");
    }

    #[test]
    fn the_largest_spec_submit_takes_fits_alone_in_an_assign() {
        for max in [
            limits::MIN_MAX_MESSAGE_BYTES,
            limits::DEFAULT_MAX_MESSAGE_BYTES,
        ] {
            let spec = sized(limits::max_spec_bytes(max), |n| {
                TaskSpec::call("x", vec![0u8; n])
                    .secret_env("K", "v")
                    .name("n")
            });
            let limits = limits::SpecLimits {
                max_slots: 1,
                max_spec_bytes: limits::max_spec_bytes(max),
            };
            assert_eq!(limits.check(&pb::TaskSpec::from(&spec)), Ok(()));
            let one = assignment(spec.clone());
            let mut messages = encode(ToNode::Assign(vec![one]), max, false);
            let message = messages.next().unwrap().unwrap();
            assert!(messages.next().is_none());
            assert!(message.len() <= max, "{} > {max}", message.len());
            assert_eq!(decoded(&message).encoded_len(), message.len());
        }
    }

    #[test]
    fn a_huge_error_or_progress_message_is_stored_cut() {
        let event = |body| pb::NodeTaskEvent {
            task_id: TaskId::new().to_string(),
            attempt: 1,
            body: Some(body),
        };
        let huge = "e".repeat(1024 * 1024);
        let message = pb::NodeMessage {
            body: Some(pb::node_message::Body::Events(pb::TaskEvents {
                events: vec![
                    event(pb::node_task_event::Body::Progress(pb::Progress {
                        fraction: 0.5,
                        message: huge.clone(),
                    })),
                    event(pb::node_task_event::Body::Finished(pb::Finished {
                        outcome: pb::Outcome::Failed as i32,
                        error: huge,
                        ..Default::default()
                    })),
                ],
            })),
        };
        let FromNode::Events(events) = from_node(message) else {
            panic!("not events");
        };
        for event in events {
            let text = match event.body {
                NodeEventBody::Progress { message, .. } => message,
                NodeEventBody::Finished { error, .. } => error,
                other => panic!("unexpected {other:?}"),
            };
            assert!(text.len() <= limits::MAX_NODE_TEXT_BYTES);
            assert!(text.ends_with(limits::TRUNCATED_MARKER));
        }
    }

    proptest::proptest! {
        /// Whatever bytes a node sends, decoding them as its messages
        /// never panics: a `Register` is accepted or refused, anything else
        /// becomes some `FromNode`.
        #[test]
        fn no_node_message_panics_the_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            if let Ok(message) = pb::NodeMessage::decode(bytes.as_slice()) {
                match message.body {
                    Some(pb::node_message::Body::Register(register)) => {
                        let _ = registration(register, 8);
                    }
                    _ => {
                        let _ = from_node(message);
                    }
                }
            }
            if let Ok(register) = pb::Register::decode(bytes.as_slice()) {
                let _ = registration(register, 8);
            }
            if let Ok(events) = pb::TaskEvents::decode(bytes.as_slice()) {
                let _ = node_events(events);
            }
        }
    }

    #[test]
    fn a_progress_fraction_past_its_range_reaches_watchers_within_it() {
        let id = TaskId::new();
        for (sent, seen) in [
            (0.0, 0.0),
            (0.25, 0.25),
            (1.0, 1.0),
            (1.5, 1.0),
            (f64::INFINITY, 1.0),
            (-1.0, -1.0),
            (-0.5, -1.0),
            (f64::NEG_INFINITY, -1.0),
            (f64::NAN, -1.0),
        ] {
            let message = pb::NodeMessage {
                body: Some(pb::node_message::Body::Events(pb::TaskEvents {
                    events: vec![pb::NodeTaskEvent {
                        task_id: id.to_string(),
                        attempt: 1,
                        body: Some(pb::node_task_event::Body::Progress(pb::Progress {
                            fraction: sent,
                            message: "half".into(),
                        })),
                    }],
                })),
            };
            let FromNode::Events(events) = from_node(message) else {
                panic!("not events");
            };
            let [
                NodeTaskEvent {
                    body: NodeEventBody::Progress { fraction, .. },
                    ..
                },
            ] = events.as_slice()
            else {
                panic!("not one progress event: {events:?}");
            };
            assert_eq!(*fraction, seen, "sent {sent}");
        }
    }
}
