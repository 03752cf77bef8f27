//! A node as the admin API shows it, shared by the coordinator (which fills
//! it from its registry) and clients (which read it from `ListNodes`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::convert::{ConversionError, duration_from_pb, duration_to_pb};
use crate::ids::{Attempt, NodeId, TaskId};
use crate::pb;
use crate::state::NodeState;

/// One node as the coordinator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeInfo {
    /// The node's id.
    pub id: NodeId,
    /// The node's name.
    pub name: String,
    /// Labels tasks can require.
    pub labels: BTreeMap<String, String>,
    /// Total slots it offers.
    pub slots: u32,
    /// Slots taken by attempts assigned to it and not finished.
    pub slots_used: u32,
    /// Slots it granted that are not used.
    pub slots_free: u32,
    /// Attempts assigned to it and not finished.
    pub running: Vec<(TaskId, Attempt)>,
    /// Time since it was last heard from.
    pub last_heartbeat_age: Duration,
    /// Ready or draining.
    pub state: NodeState,
    /// Handlers it serves.
    pub handlers: Vec<String>,
    /// Attempts it finished since it connected.
    pub finished: u64,
    /// Resources it declared (`--resource`).
    pub resources: BTreeMap<String, u64>,
    /// Of those, what its assigned attempts do not hold.
    pub resources_free: BTreeMap<String, u64>,
}

impl From<NodeInfo> for pb::NodeInfo {
    fn from(node: NodeInfo) -> Self {
        pb::NodeInfo {
            node_id: node.id.to_string(),
            name: node.name,
            labels: node.labels.into_iter().collect(),
            slots: node.slots,
            slots_used: node.slots_used,
            slots_free: node.slots_free,
            running: node
                .running
                .into_iter()
                .map(|(task_id, attempt)| pb::AttemptRef {
                    task_id: task_id.to_string(),
                    attempt: attempt.0,
                })
                .collect(),
            last_heartbeat_age: Some(duration_to_pb(node.last_heartbeat_age)),
            state: i32::from(node.state),
            handlers: node.handlers,
            finished: node.finished,
            resources: node.resources.into_iter().collect(),
            resources_free: node.resources_free.into_iter().collect(),
        }
    }
}

impl TryFrom<pb::NodeInfo> for NodeInfo {
    type Error = ConversionError;

    fn try_from(node: pb::NodeInfo) -> Result<Self, Self::Error> {
        let running = node
            .running
            .into_iter()
            .map(|r| Ok((r.task_id.parse()?, Attempt(r.attempt))))
            .collect::<Result<Vec<_>, ConversionError>>()?;
        let last_heartbeat_age = match &node.last_heartbeat_age {
            Some(d) => duration_from_pb("last_heartbeat_age", d)?,
            None => Duration::ZERO,
        };
        let mut handlers = node.handlers;
        handlers.sort();
        Ok(NodeInfo {
            id: node.node_id.parse()?,
            name: node.name,
            labels: node.labels.into_iter().collect(),
            slots: node.slots,
            slots_used: node.slots_used,
            slots_free: node.slots_free,
            running,
            last_heartbeat_age,
            state: NodeState::try_from(node.state)?,
            handlers,
            finished: node.finished,
            resources: node.resources.into_iter().collect(),
            resources_free: node.resources_free.into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_info_round_trips_through_the_wire_form() {
        let node = NodeInfo {
            id: NodeId::new(),
            name: "n1".into(),
            labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
            slots: 4,
            slots_used: 1,
            slots_free: 3,
            running: vec![(TaskId::new(), Attempt(2))],
            last_heartbeat_age: Duration::from_millis(250),
            state: NodeState::Draining,
            handlers: vec!["echo".into(), "noop".into()],
            finished: 7,
            resources: BTreeMap::from([("gpu".to_owned(), 2)]),
            resources_free: BTreeMap::from([("gpu".to_owned(), 1)]),
        };
        let back = NodeInfo::try_from(pb::NodeInfo::from(node.clone())).unwrap();
        assert_eq!(back, node);
    }

    #[test]
    fn node_info_with_a_bad_running_id_is_refused() {
        let wire = pb::NodeInfo {
            node_id: NodeId::new().to_string(),
            running: vec![pb::AttemptRef {
                task_id: "nope".into(),
                attempt: 1,
            }],
            state: i32::from(NodeState::Ready),
            ..Default::default()
        };
        assert!(NodeInfo::try_from(wire).is_err());
    }
}
