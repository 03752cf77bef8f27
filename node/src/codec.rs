//! The node stream's wire format, both ways, in one place: what the
//! coordinator sends (`Registered`, `Assign`, `Cancel`, `Drain`) is decoded
//! here into domain types once, at the session's edge; what the node sends
//! (`Register`, its events, the envelope) is encoded here.
//!
//! Pure functions: no state, no I/O, no decisions (a decoded message is
//! acted on by the session and the executor). Past this module, task ids
//! are [`TaskId`]s and attempts [`Attempt`]s, never strings.

use std::time::Duration;

use weft_proto::convert::{ConversionError, duration_from_pb};
use weft_proto::pb::node_message::Body as Outbound;
use weft_proto::{Attempt, NodeId, PROTOCOL_VERSION, TaskId, TaskSpec, pb};

use crate::attempt::{Assignment, InvalidSpec};
use crate::config::NodeConfig;
use crate::error::Error;
use crate::events::{AttemptKey, Event};

/// Heartbeat settings used when `Registered` leaves them unset.
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// What `Registered` settles for the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Registered {
    /// The id the coordinator gave this session.
    pub(crate) node_id: NodeId,
    /// How often to send heartbeats.
    pub(crate) heartbeat_interval: Duration,
    /// Silence after which the coordinator counts as gone.
    pub(crate) heartbeat_timeout: Duration,
}

/// Encodes `Register`: the node as configured, the handlers it serves, the
/// attempts it lists as its own (`running`, sorted), and the node id of
/// its previous session, if any.
pub(crate) fn register(
    config: &NodeConfig,
    handlers: Vec<String>,
    running: &[AttemptKey],
    previous: Option<NodeId>,
) -> pb::Register {
    let (exec, exec_allow) = config.exec.to_pb();
    pb::Register {
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
    }
}

/// Decodes `Registered`; unset (or zero) heartbeat settings take their
/// defaults.
pub(crate) fn registered(wire: pb::Registered) -> Result<Registered, Error> {
    let node_id = wire
        .node_id
        .parse::<NodeId>()
        .map_err(|err| Error::Protocol(format!("Registered.node_id: {err}")))?;
    Ok(Registered {
        node_id,
        heartbeat_interval: heartbeat(wire.heartbeat_interval.as_ref(), DEFAULT_HEARTBEAT_INTERVAL),
        heartbeat_timeout: heartbeat(wire.heartbeat_timeout.as_ref(), DEFAULT_HEARTBEAT_TIMEOUT),
    })
}

fn heartbeat(value: Option<&prost_types::Duration>, default: Duration) -> Duration {
    value
        .and_then(|d| duration_from_pb("heartbeat", d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(default)
}

/// Decodes one assignment. Only an invalid task id fails (nothing can be
/// reported for it); an invalid spec decodes to an [`InvalidSpec`], which
/// the node reports `START_FAILED`.
pub(crate) fn assignment(wire: pb::Assignment) -> Result<Assignment, ConversionError> {
    let task_id = wire.task_id.parse::<TaskId>()?;
    let key = (task_id, Attempt(wire.attempt));
    let slots = wire.spec.as_ref().map_or(1, |spec| spec.slots.max(1));
    let spec = match wire.spec.map(TaskSpec::try_from) {
        Some(Ok(spec)) => Ok(spec),
        Some(Err(err)) => Err(InvalidSpec {
            slots,
            error: format!("invalid task spec: {err}"),
        }),
        None => Err(InvalidSpec {
            slots,
            error: "assignment without a spec".into(),
        }),
    };
    Ok(Assignment { key, spec })
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

/// Encodes one event.
pub(crate) fn event(event: Event) -> pb::NodeTaskEvent {
    pb::NodeTaskEvent {
        task_id: event.task_id.to_string(),
        attempt: event.attempt.0,
        body: Some(event.body),
    }
}

/// Encodes `events` as one `TaskEvents` message.
pub(crate) fn events(events: Vec<Event>) -> pb::NodeMessage {
    let events = events.into_iter().map(event).collect();
    message(Outbound::Events(pb::TaskEvents { events }))
}

/// Encodes an attempt as listed in `Register.running`.
pub(crate) fn attempt_ref((task_id, attempt): AttemptKey) -> pb::AttemptRef {
    pb::AttemptRef {
        task_id: task_id.to_string(),
        attempt: attempt.0,
    }
}

/// Wraps a body in the node's stream envelope.
pub(crate) fn message(body: Outbound) -> pb::NodeMessage {
    pb::NodeMessage { body: Some(body) }
}

#[cfg(test)]
mod tests {
    use weft_proto::convert::duration_to_pb;

    use super::*;

    #[test]
    fn an_assignment_decodes_to_typed_ids_and_a_validated_spec() {
        let task_id = TaskId::new();
        let decoded = assignment(pb::Assignment {
            task_id: task_id.to_string(),
            attempt: 2,
            spec: Some(TaskSpec::call("noop", "").slots(2).into()),
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
        })
        .unwrap();
        assert_eq!(
            terms,
            Registered {
                node_id,
                heartbeat_interval: Duration::from_millis(250),
                heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            }
        );
        assert!(registered(pb::Registered::default()).is_err());
    }

    #[test]
    fn events_and_attempt_refs_encode_the_ids_as_strings() {
        let task_id = TaskId::new();
        let wire = event(Event {
            task_id,
            attempt: Attempt(3),
            body: pb::node_task_event::Body::Started(pb::Started { pid: 7 }),
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
}
