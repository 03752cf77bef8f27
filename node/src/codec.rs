//! The node stream's wire format, both ways, in one place: what the
//! coordinator sends (`Registered`, `Assign`, `Cancel`, `Drain`,
//! `NodeCertificate`) is decoded here into domain types once, at the
//! session's edge; every message the node sends (`Register`, `TaskEvents`,
//! `Credits`, `Draining`, `Heartbeat`, `RenewCertificate`) is built here,
//! in its `NodeMessage` envelope, from domain values: events are [`Event`]s with a domain [`EventBody`] until
//! [`events`] encodes them as they go out.
//!
//! Pure functions: no state, no I/O, no decisions (a decoded message is
//! acted on by the session and the executor; the outbox decides what goes
//! into a batch and when). Past this module, task ids are [`TaskId`]s and
//! attempts [`Attempt`]s, never strings. The coordinator's envelope
//! (`CoordinatorMessage`) is still matched by the session, which then
//! decodes each body here.

use std::time::Duration;

use weft_proto::convert::{ConversionError, duration_from_pb};
use weft_proto::pb::node_message::Body as Outbound;
use weft_proto::pb::node_task_event::Body as WireBody;
use weft_proto::{Attempt, NodeId, PROTOCOL_VERSION, TaskId, TaskSpec, TaskState, limits, pb};

use crate::attempt::{Assignment, InvalidSpec};
use crate::config::NodeConfig;
use crate::error::Error;
use crate::events::{AttemptKey, Event, EventBody, Finished};
use crate::handlers::ParentResult;

/// Heartbeat settings used when `Registered` leaves them unset.
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most either heartbeat setting is taken to be: far past any sane
/// one, and small enough to add to the clock (a coordinator's mistake
/// must not panic the node).
const MAX_HEARTBEAT_SETTING: Duration = Duration::from_secs(24 * 3600);

/// What `Registered` settles for the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Registered {
    /// The id the coordinator gave this session.
    pub(crate) node_id: NodeId,
    /// How often to send heartbeats.
    pub(crate) heartbeat_interval: Duration,
    /// Silence after which the coordinator counts as gone.
    pub(crate) heartbeat_timeout: Duration,
    /// The largest message the coordinator takes on this stream (unset:
    /// gRPC's default, 4 MiB).
    pub(crate) max_message_size: usize,
}

/// Encodes `Register`: the node as configured, the handlers it serves, the
/// attempts it lists as its own (`running`, sorted), and the node id of
/// its previous session, if any.
pub(crate) fn register(
    config: &NodeConfig,
    handlers: Vec<String>,
    running: &[AttemptKey],
    previous: Option<NodeId>,
) -> pb::NodeMessage {
    let (exec, exec_allow) = config.exec.to_pb();
    message(Outbound::Register(pb::Register {
        name: config.name.clone(),
        labels: config.labels.clone().into_iter().collect(),
        slots: config.slots.max(1),
        prefetch: config.prefetch,
        handlers,
        protocol_version: PROTOCOL_VERSION.into(),
        running: running.iter().copied().map(attempt_ref).collect(),
        previous_node_id: previous.map(|id| id.to_string()).unwrap_or_default(),
        exec: exec.into(),
        exec_allow,
        resources: config
            .resources
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
    }))
}

/// Decodes `Registered`; unset (or zero) heartbeat settings take their
/// defaults, and ones over a day are held to a day.
pub(crate) fn registered(wire: pb::Registered) -> Result<Registered, Error> {
    let node_id = wire
        .node_id
        .parse::<NodeId>()
        .map_err(|err| Error::Protocol(format!("Registered.node_id: {err}")))?;
    Ok(Registered {
        node_id,
        heartbeat_interval: heartbeat_setting(
            wire.heartbeat_interval.as_ref(),
            DEFAULT_HEARTBEAT_INTERVAL,
        ),
        heartbeat_timeout: heartbeat_setting(
            wire.heartbeat_timeout.as_ref(),
            DEFAULT_HEARTBEAT_TIMEOUT,
        ),
        max_message_size: match wire.max_message_size {
            0 => limits::LEGACY_MAX_MESSAGE_BYTES,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        },
    })
}

fn heartbeat_setting(value: Option<&prost_types::Duration>, default: Duration) -> Duration {
    value
        .and_then(|d| duration_from_pb("heartbeat", d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(default)
        .min(MAX_HEARTBEAT_SETTING)
}

/// Decodes one assignment. Only an invalid task id fails (nothing can be
/// reported for it); an invalid spec decodes to an [`InvalidSpec`], which
/// the node reports `START_FAILED`.
pub(crate) fn assignment(wire: pb::Assignment) -> Result<Assignment, ConversionError> {
    let task_id = wire.task_id.parse::<TaskId>()?;
    let key = (task_id, Attempt(wire.attempt));
    let slots = wire.spec.as_ref().map_or(1, |spec| spec.slots.max(1));
    // The attempt runs under `Assignment.trace`, not `spec.trace` (see
    // node.proto): the spec carries it from here on. A malformed one (the
    // coordinator validated it) is dropped rather than failing the work.
    let trace = wire
        .trace
        .as_ref()
        .and_then(|t| weft_proto::TraceContext::try_from(t).ok());
    let spec = match wire.spec.map(TaskSpec::try_from) {
        Some(Ok(mut spec)) => {
            spec.trace = trace;
            Ok(Box::new(spec))
        }
        Some(Err(err)) => Err(InvalidSpec {
            slots,
            error: format!("invalid task spec: {err}"),
        }),
        None => Err(InvalidSpec {
            slots,
            error: "assignment without a spec".into(),
        }),
    };
    let parents = wire
        .parents
        .into_iter()
        .filter_map(|p| {
            Some(ParentResult {
                task_id: p.task_id.parse().ok()?,
                ref_name: p.r#ref,
                state: TaskState::try_from(p.state).ok()?,
                output: p.output,
            })
        })
        .collect();
    Ok(Assignment { key, spec, parents })
}

/// Decodes `Cancel`: the attempt, and the coordinator's reason.
pub(crate) fn cancel(wire: pb::Cancel) -> Result<(AttemptKey, String), ConversionError> {
    let task_id = wire.task_id.parse::<TaskId>()?;
    Ok(((task_id, Attempt(wire.attempt)), wire.reason))
}

/// The grace `Drain` asks for, if it says a valid one.
pub(crate) fn drain_grace(wire: &pb::Drain) -> Option<Duration> {
    wire.grace
        .as_ref()
        .and_then(|d| duration_from_pb("grace", d).ok())
}

/// Encodes one event. Output and results move into the message as the
/// `Bytes` they are (no copy).
pub(crate) fn event(event: Event) -> pb::NodeTaskEvent {
    let body = match event.body {
        EventBody::Started { pid } => WireBody::Started(pb::Started { pid }),
        EventBody::Output { stream, seq, data } => WireBody::Output(pb::OutputChunk {
            stream: stream.into(),
            data,
            seq,
        }),
        EventBody::Progress { fraction, message } => {
            WireBody::Progress(pb::Progress { fraction, message })
        }
        EventBody::Finished(done) => WireBody::Finished(finished(done)),
    };
    pb::NodeTaskEvent {
        task_id: event.task_id.to_string(),
        attempt: event.attempt.0,
        body: Some(body),
    }
}

fn finished(done: Finished) -> pb::Finished {
    pb::Finished {
        outcome: done.outcome.into(),
        exit_code: done.exit_code,
        output: done.output,
        error: done.error,
    }
}

/// Encodes `events` as one `TaskEvents` message.
pub(crate) fn events(events: Vec<Event>) -> pb::NodeMessage {
    let events = events.into_iter().map(event).collect();
    message(Outbound::Events(pb::TaskEvents { events }))
}

/// Encodes `Credits`: `grant` more slots' worth of assignments.
pub(crate) fn credits(grant: u32) -> pb::NodeMessage {
    message(Outbound::Credits(pb::Credits { grant }))
}

/// Encodes `Draining`: this node takes no more work.
pub(crate) fn draining() -> pb::NodeMessage {
    message(Outbound::Draining(pb::Draining {}))
}

/// Encodes the node's `Heartbeat`.
pub(crate) fn heartbeat() -> pb::NodeMessage {
    message(Outbound::Heartbeat(pb::Heartbeat {}))
}

/// Encodes `RenewCertificate`: a certificate request (DER) signed with
/// the node's new key.
pub(crate) fn renew_certificate(csr_der: Vec<u8>) -> pb::NodeMessage {
    message(Outbound::RenewCertificate(pb::RenewCertificate {
        csr_der: csr_der.into(),
    }))
}

/// Decodes `NodeCertificate`: the new chain (PEM), or why the coordinator
/// refused the request.
pub(crate) fn certificate(wire: pb::NodeCertificate) -> Result<String, String> {
    match (wire.certificate_chain_pem, wire.error) {
        (_, error) if !error.is_empty() => Err(error),
        (chain, _) if chain.trim().is_empty() => Err("an answer without a certificate".into()),
        (chain, _) => Ok(chain),
    }
}

/// Encodes an attempt as listed in `Register.running`.
fn attempt_ref((task_id, attempt): AttemptKey) -> pb::AttemptRef {
    pb::AttemptRef {
        task_id: task_id.to_string(),
        attempt: attempt.0,
    }
}

/// Wraps a body in the node's stream envelope.
fn message(body: Outbound) -> pb::NodeMessage {
    pb::NodeMessage { body: Some(body) }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use weft_proto::convert::duration_to_pb;
    use weft_proto::{Outcome, OutputStream};

    use super::*;

    #[test]
    fn an_assignment_decodes_to_typed_ids_and_a_validated_spec() {
        let task_id = TaskId::new();
        let decoded = assignment(pb::Assignment {
            task_id: task_id.to_string(),
            attempt: 2,
            spec: Some(TaskSpec::call("noop", "").slots(2).into()),
            trace: None,
            parents: Vec::new(),
        })
        .unwrap();
        assert_eq!(decoded.key, (task_id, Attempt(2)));
        assert_eq!(decoded.spec.unwrap().slots, 2);
    }

    #[test]
    fn a_bad_spec_still_decodes_with_its_slots_and_a_bad_id_does_not() {
        let task_id = TaskId::new().to_string();
        let bad = pb::TaskSpec {
            slots: 3,
            ..Default::default()
        };
        let decoded = assignment(pb::Assignment {
            task_id: task_id.clone(),
            attempt: 1,
            spec: Some(bad),
            trace: None,
            parents: Vec::new(),
        })
        .unwrap();
        let invalid = decoded.spec.unwrap_err();
        assert_eq!(invalid.slots, 3);
        assert!(
            invalid.error.starts_with("invalid task spec"),
            "{}",
            invalid.error
        );
        let missing = assignment(pb::Assignment {
            task_id,
            attempt: 1,
            spec: None,
            trace: None,
            parents: Vec::new(),
        })
        .unwrap();
        let invalid = missing.spec.unwrap_err();
        assert_eq!(
            (invalid.slots, invalid.error.as_str()),
            (1, "assignment without a spec")
        );
        let no_id = pb::Assignment {
            task_id: "nope".into(),
            ..Default::default()
        };
        assert!(assignment(no_id).is_err());
    }

    #[test]
    fn registered_fills_unset_heartbeats_with_defaults() {
        let node_id = NodeId::new();
        let terms = registered(pb::Registered {
            node_id: node_id.to_string(),
            heartbeat_interval: Some(duration_to_pb(Duration::from_millis(250))),
            heartbeat_timeout: Some(duration_to_pb(Duration::ZERO)),
            max_message_size: 0,
            start_timeout: None,
        })
        .unwrap();
        assert_eq!(
            terms,
            Registered {
                node_id,
                heartbeat_interval: Duration::from_millis(250),
                heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
                max_message_size: limits::LEGACY_MAX_MESSAGE_BYTES,
            }
        );
        assert!(registered(pb::Registered::default()).is_err());
    }

    /// Heartbeat settings past a day (a coordinator's mistake) are held to
    /// a day, and none, however large, keeps the node from adding them to
    /// its clock.
    #[test]
    fn registered_holds_huge_heartbeat_settings_to_a_day() {
        let day = Duration::from_secs(24 * 3600);
        let terms = |seconds| {
            let setting = prost_types::Duration {
                seconds,
                nanos: 999_999_999,
            };
            registered(pb::Registered {
                node_id: NodeId::new().to_string(),
                heartbeat_interval: Some(setting),
                heartbeat_timeout: Some(setting),
                ..pb::Registered::default()
            })
            .unwrap()
        };
        let ten_years = terms(10 * 365 * 24 * 3600);
        assert_eq!(
            (ten_years.heartbeat_interval, ten_years.heartbeat_timeout),
            (day, day)
        );
        let most = terms(i64::MAX);
        assert!(most.heartbeat_interval <= day && most.heartbeat_timeout <= day);
        let now = tokio::time::Instant::now();
        let lease = crate::lease::Lease::new(None);
        lease.begin(
            ten_years.heartbeat_timeout,
            ten_years.heartbeat_interval,
            now,
        );
        assert_eq!(lease.next_check(now), now + day);
    }

    #[test]
    fn registered_says_the_message_limit_to_keep() {
        let terms = registered(pb::Registered {
            node_id: NodeId::new().to_string(),
            max_message_size: 2 << 20,
            ..pb::Registered::default()
        })
        .unwrap();
        assert_eq!(terms.max_message_size, 2 << 20);
    }

    proptest::proptest! {
        /// Whatever bytes the coordinator sends, decoding them as its
        /// messages never panics.
        #[test]
        fn no_coordinator_message_panics_the_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            use prost::Message;
            use pb::coordinator_message::Body;
            if let Ok(message) = pb::CoordinatorMessage::decode(bytes.as_slice()) {
                match message.body {
                    Some(Body::Registered(wire)) => { let _ = registered(wire); }
                    Some(Body::Assign(assign)) => {
                        for wire in assign.tasks { let _ = assignment(wire); }
                    }
                    Some(Body::Cancel(wire)) => { let _ = cancel(wire); }
                    Some(Body::Drain(wire)) => { let _ = drain_grace(&wire); }
                    Some(Body::Certificate(wire)) => { let _ = certificate(wire); }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn events_and_attempt_refs_encode_the_ids_as_strings() {
        let task_id = TaskId::new();
        let wire = event(Event {
            task_id,
            attempt: Attempt(3),
            body: EventBody::Started { pid: 7 },
        });
        assert_eq!((wire.task_id, wire.attempt), (task_id.to_string(), 3));
        assert_eq!(
            attempt_ref((task_id, Attempt(3))),
            pb::AttemptRef {
                task_id: task_id.to_string(),
                attempt: 3
            }
        );
    }

    #[test]
    fn each_event_body_encodes_to_its_wire_body_and_output_moves_uncopied() {
        let key = (TaskId::new(), Attempt::FIRST);
        let encode = |body| {
            let (task_id, attempt) = key;
            event(Event {
                task_id,
                attempt,
                body,
            })
            .body
        };
        assert_eq!(
            encode(EventBody::Started { pid: 7 }),
            Some(WireBody::Started(pb::Started { pid: 7 }))
        );
        let data = Bytes::from(vec![b'x'; 64]);
        let output = encode(EventBody::Output {
            stream: OutputStream::Stderr,
            seq: 4,
            data: data.clone(),
        });
        let Some(WireBody::Output(chunk)) = output else {
            panic!("expected an output chunk, got {output:?}");
        };
        assert_eq!(
            (chunk.stream, chunk.seq, chunk.data.as_ptr()),
            (i32::from(OutputStream::Stderr), 4, data.as_ptr()),
            "the same bytes, not a copy"
        );
        assert_eq!(
            encode(EventBody::Progress {
                fraction: 0.5,
                message: "half".into()
            }),
            Some(WireBody::Progress(pb::Progress {
                fraction: 0.5,
                message: "half".into()
            }))
        );
        assert_eq!(
            encode(EventBody::Finished(Finished {
                outcome: Outcome::TimedOut,
                exit_code: Some(3),
                output: Bytes::from_static(b"out"),
                error: "late".into(),
            })),
            Some(WireBody::Finished(pb::Finished {
                outcome: pb::Outcome::TimedOut.into(),
                exit_code: Some(3),
                output: Bytes::from_static(b"out"),
                error: "late".into(),
            }))
        );
    }

    #[test]
    fn a_renewal_goes_out_as_its_csr_and_its_answer_is_the_chain_or_the_refusal() {
        assert_eq!(
            renew_certificate(vec![1, 2]).body,
            Some(Outbound::RenewCertificate(pb::RenewCertificate {
                csr_der: Bytes::from(vec![1, 2])
            }))
        );
        let chain = "-----BEGIN CERTIFICATE-----\n".to_owned();
        let answer = |chain: &str, error: &str| {
            certificate(pb::NodeCertificate {
                certificate_chain_pem: chain.into(),
                not_after: None,
                error: error.into(),
            })
        };
        assert_eq!(answer(&chain, ""), Ok(chain.clone()));
        assert_eq!(answer("", "bad CSR"), Err("bad CSR".into()));
        assert!(answer(" ", "").is_err());
    }

    #[test]
    fn credits_draining_and_heartbeats_come_in_the_node_envelope() {
        assert_eq!(
            credits(3).body,
            Some(Outbound::Credits(pb::Credits { grant: 3 }))
        );
        assert_eq!(draining().body, Some(Outbound::Draining(pb::Draining {})));
        assert_eq!(
            heartbeat().body,
            Some(Outbound::Heartbeat(pb::Heartbeat {}))
        );
    }
}
