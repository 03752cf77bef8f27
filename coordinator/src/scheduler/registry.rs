//! Connected nodes: what they offer, the credits they granted, the attempts
//! they run, and when they were last heard from. Plain data; the scheduler
//! decides what to do with it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use weft_proto::{Attempt, ExecPolicy, NodeId, NodeInfo, NodeState, TaskId, TaskKind, TaskSpec};

/// One Connect stream. A node that reconnects gets a new session but may
/// keep its [`NodeId`]; effects are addressed to sessions so a message for a
/// dead stream never reaches the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    /// Placeholder session of attempts restored from the store whose node
    /// has not reconnected yet. Real sessions start at 1.
    pub const RESTORED: SessionId = SessionId(0);

    /// Placeholder session of attempts whose node's stream ended: they
    /// wait for it to reconnect and claim them within the reconnect grace.
    /// Real sessions never reach it.
    pub const DISCONNECTED: SessionId = SessionId(u64::MAX);

    /// Whether this is a placeholder (no stream): the attempt waits for
    /// its node to come back.
    pub fn is_placeholder(self) -> bool {
        self == SessionId::RESTORED || self == SessionId::DISCONNECTED
    }
}

/// What a node said about itself in `Register`, validated.
#[derive(Clone, Debug)]
pub struct NodeRegistration {
    /// The id this node gets (its previous one after a reconnect).
    pub node_id: NodeId,
    /// Display name.
    pub name: String,
    /// Labels tasks can require.
    pub labels: BTreeMap<String, String>,
    /// Total slots, at least 1.
    pub slots: u32,
    /// Extra slots of work it holds queued beyond `slots` (its credits may
    /// reach `slots + prefetch`).
    pub prefetch: u32,
    /// Call handlers it serves.
    pub handlers: Vec<String>,
    /// Which exec tasks it runs.
    pub exec: ExecPolicy,
    /// Attempts it says it still runs (after a reconnect).
    pub running: Vec<(TaskId, Attempt)>,
    /// Numeric resources it offers (`--resource name=amount`), checked.
    pub resources: BTreeMap<String, u64>,
}

/// One connected node.
#[derive(Debug)]
pub(crate) struct NodeEntry {
    /// Private: the registry indexes nodes by it (see [`NodeEntry::id`]).
    id: NodeId,
    pub name: Arc<str>,
    pub labels: BTreeMap<String, String>,
    pub slots: u32,
    /// Slots of work it holds queued beyond `slots` (see `NodeRegistration`).
    pub prefetch: u32,
    pub handlers: BTreeSet<String>,
    /// Which exec tasks it runs: an exec task it refuses is never assigned
    /// here.
    pub exec: ExecPolicy,
    /// Slots granted and not yet used by an assignment.
    pub credits: u32,
    /// Slots taken by attempts assigned here and not finished.
    pub used: u32,
    pub running: crate::IdMap<TaskId, Attempt>,
    pub last_seen: Instant,
    pub draining: bool,
    pub finished: u64,
    /// Resources it offers, and what of them is not held by an attempt.
    pub resources: BTreeMap<String, u64>,
    pub resources_free: BTreeMap<String, u64>,
    /// Whether it could ever run each requirement class, by class index
    /// ([`NodeEntry::runs_class`]): [`UNCHECKED`], [`RUNS`] or
    /// [`NEVER`]. What decides it (handlers, exec policy, labels, slots,
    /// resource totals, and the class's example) never changes for the
    /// entry's life, so dispatch checks each pair once instead of at every
    /// assignment.
    class_fit: Vec<u8>,
}

/// [`NodeEntry::class_fit`]: not checked yet.
const UNCHECKED: u8 = 0;
/// [`NodeEntry::class_fit`]: the node could run the class.
const RUNS: u8 = 1;
/// [`NodeEntry::class_fit`]: the node could never run the class.
const NEVER: u8 = 2;

impl NodeEntry {
    pub fn new(reg: NodeRegistration, now: Instant) -> Self {
        NodeEntry {
            id: reg.node_id,
            name: Arc::from(reg.name),
            labels: reg.labels,
            slots: reg.slots,
            prefetch: reg.prefetch,
            handlers: reg.handlers.into_iter().collect(),
            exec: reg.exec,
            credits: 0,
            used: 0,
            running: crate::IdMap::default(),
            last_seen: now,
            draining: false,
            finished: 0,
            resources_free: reg.resources.clone(),
            resources: reg.resources,
            class_fit: Vec::new(),
        }
    }

    /// [`NodeEntry::can_run`] for requirement class `class`, whose tasks
    /// all match `example` as it does: checked once per node and class,
    /// then remembered.
    pub fn runs_class(&mut self, class: u32, example: &TaskSpec) -> bool {
        let i = class as usize;
        if self.class_fit.len() <= i {
            self.class_fit.resize(i + 1, UNCHECKED);
        }
        match self.class_fit[i] {
            RUNS => true,
            NEVER => false,
            _ => {
                let runs = self.can_run(example);
                self.class_fit[i] = if runs { RUNS } else { NEVER };
                runs
            }
        }
    }

    /// Forgets what [`runs_class`](Self::runs_class) found for class
    /// number `class` (given to another class since).
    pub fn forget_class(&mut self, class: u32) {
        if let Some(fit) = self.class_fit.get_mut(class as usize) {
            *fit = UNCHECKED;
        }
    }

    /// The node's id; fixed for the entry's life, so the registry's index
    /// by id stays right.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Slots it may be assigned now: its credits, limited to its slots not
    /// in use (plus its prefetch when `prefetch`: queued work beyond its
    /// slots counts too).
    pub fn room(&self, prefetch: bool) -> u32 {
        let free = if prefetch {
            self.slots.saturating_add(self.prefetch)
        } else {
            self.slots
        };
        self.credits.min(free.saturating_sub(self.used))
    }

    /// Its free slots, as `ListNodes` and `ClusterInfo` report them: the
    /// credits it granted, up to its slots not in use. Never the credits
    /// beyond (its prefetch: work it holds queued, not a free slot).
    pub fn free_slots(&self) -> u32 {
        self.room(false)
    }

    /// True when this node could ever run `spec` (ignoring free slots).
    pub fn can_run(&self, spec: &TaskSpec) -> bool {
        self.serves(spec)
            && spec.matches_labels(&self.labels)
            && spec.slots <= self.slots
            && (spec.resources.is_empty()
                || spec
                    .resources
                    .iter()
                    .all(|(name, amount)| self.resources.get(name).is_some_and(|a| a >= amount)))
    }

    /// True when `spec`'s resources are free here now.
    pub fn resources_fit(&self, spec: &TaskSpec) -> bool {
        spec.resources
            .iter()
            .all(|(name, amount)| self.resources_free.get(name).is_some_and(|a| a >= amount))
    }

    /// An attempt holds `resources` here (from assignment to its end).
    pub fn hold_resources(&mut self, resources: &BTreeMap<String, u64>) {
        for (name, amount) in resources {
            if let Some(free) = self.resources_free.get_mut(name) {
                *free = free.saturating_sub(*amount);
            }
        }
    }

    /// An attempt that held `resources` here ended.
    pub fn release_resources(&mut self, resources: &BTreeMap<String, u64>) {
        for (name, amount) in resources {
            if let (Some(free), Some(total)) =
                (self.resources_free.get_mut(name), self.resources.get(name))
            {
                *free = free.saturating_add(*amount).min(*total);
            }
        }
    }

    /// True when the node has the handler a call task needs, or its exec
    /// policy allows an exec task's program.
    pub fn serves(&self, spec: &TaskSpec) -> bool {
        match &spec.kind {
            TaskKind::Exec(_) => self.exec.allows(spec),
            TaskKind::Call(call) => self.handlers.contains(&call.handler),
        }
    }

    /// Adds a grant. Credits are the node's count as much as ours, so none
    /// is ever dropped here: what is in use, and the prefetch this
    /// coordinator allows (capped at `--max-node-slots`, which the node does
    /// not know), are taken off when assigning ([`NodeEntry::room`]). A
    /// credit dropped here would be one the node counts as granted and
    /// never grants again: its window stays full while the coordinator
    /// holds none, and the node idles for good. A node that grants too much
    /// is still never sent more than its slots and prefetch allow.
    pub fn grant(&mut self, grant: u32) {
        self.credits = self.credits.saturating_add(grant);
    }

    pub fn info(&self, now: Instant) -> NodeInfo {
        let mut running: Vec<(TaskId, Attempt)> =
            self.running.iter().map(|(t, a)| (*t, *a)).collect();
        running.sort();
        NodeInfo {
            id: self.id,
            name: self.name.to_string(),
            labels: self.labels.clone(),
            slots: self.slots,
            slots_used: self.used.min(self.slots),
            slots_free: self.free_slots(),
            running,
            last_heartbeat_age: now.saturating_duration_since(self.last_seen),
            state: if self.draining {
                NodeState::Draining
            } else {
                NodeState::Ready
            },
            handlers: self.handlers.iter().cloned().collect(),
            finished: self.finished,
            resources: self.resources.clone(),
            resources_free: self.resources_free.clone(),
        }
    }
}

/// All connected nodes, by session, with an index by node id. The fields
/// are private so that every change goes through [`insert`](Self::insert)
/// and [`remove`](Self::remove), which keep the index right.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    nodes: BTreeMap<SessionId, NodeEntry>,
    by_id: HashMap<NodeId, SessionId>,
}

impl Registry {
    /// Adds the node on `session`; its id now finds that session.
    pub fn insert(&mut self, session: SessionId, entry: NodeEntry) {
        self.by_id.insert(entry.id, session);
        self.nodes.insert(session, entry);
    }

    /// Takes the node on `session` out; its id stops finding it (unless
    /// the id already moved to a newer session).
    pub fn remove(&mut self, session: SessionId) -> Option<NodeEntry> {
        let entry = self.nodes.remove(&session)?;
        if self.by_id.get(&entry.id) == Some(&session) {
            self.by_id.remove(&entry.id);
        }
        Some(entry)
    }

    /// The node on `session`.
    pub fn get(&self, session: SessionId) -> Option<&NodeEntry> {
        self.nodes.get(&session)
    }

    /// The node on `session`, to change (its id cannot be).
    pub fn get_mut(&mut self, session: SessionId) -> Option<&mut NodeEntry> {
        self.nodes.get_mut(&session)
    }

    /// The session of the node with this id.
    pub fn session_of(&self, id: NodeId) -> Option<SessionId> {
        self.by_id.get(&id).copied()
    }

    /// Every node with its session, in session order.
    pub fn iter(&self) -> impl Iterator<Item = (SessionId, &NodeEntry)> {
        self.nodes.iter().map(|(s, n)| (*s, n))
    }

    /// Every node, in session order.
    pub fn values(&self) -> impl Iterator<Item = &NodeEntry> {
        self.nodes.values()
    }

    /// Every node, to change (their ids cannot be), in session order.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut NodeEntry> {
        self.nodes.values_mut()
    }

    /// How many nodes are connected.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when no node is connected.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Finds a node by id text or by name.
    pub fn find(&self, selector: &str) -> Option<SessionId> {
        if let Ok(id) = selector.parse::<NodeId>()
            && let Some(session) = self.by_id.get(&id)
        {
            return Some(*session);
        }
        self.nodes
            .iter()
            .find(|(_, n)| &*n.name == selector)
            .map(|(s, _)| *s)
    }

    /// Sorted names of every handler some connected node serves.
    pub fn known_handlers(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.nodes.values().flat_map(|n| &n.handlers).collect();
        set.into_iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: NodeId, name: &str) -> NodeEntry {
        let reg = NodeRegistration {
            node_id: id,
            name: name.into(),
            labels: BTreeMap::new(),
            slots: 1,
            prefetch: 0,
            handlers: Vec::new(),
            exec: ExecPolicy::Allow,
            running: Vec::new(),
            resources: BTreeMap::new(),
        };
        NodeEntry::new(reg, Instant::now())
    }

    #[test]
    fn a_reconnected_node_is_found_on_its_new_session_after_the_old_one_goes() {
        let mut registry = Registry::default();
        let id = NodeId::new();
        registry.insert(SessionId(1), entry(id, "n1"));
        registry.insert(SessionId(2), entry(id, "n1"));
        assert!(registry.remove(SessionId(1)).is_some());
        assert_eq!(registry.session_of(id), Some(SessionId(2)));
        assert_eq!(registry.find(&id.to_string()), Some(SessionId(2)));
        assert!(registry.remove(SessionId(2)).is_some());
        assert_eq!(registry.session_of(id), None);
        assert!(registry.is_empty());
    }
}
