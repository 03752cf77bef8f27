//! Node identities: who may hold a node session. A node that joined has a
//! [`NodeIdentityRecord`] (its node id, the name it joined with, the join
//! token it used, whether an admin revoked it); its certificate names the
//! id. [`Identities`] is the in-memory index `Join`, `Connect`, renewal and
//! `RevokeNode` check, built from the store at start and written through
//! (store first, then the index) by `Join` and `RevokeNode`, which hold
//! [`Identities::write`] so joins are serialized (a join token's uses are
//! never exceeded, two joins never take one name). It also notes, in
//! memory only, which nodes connected with their certificate since this
//! coordinator started: a join is repeated only for a node that has not
//! (`rules::REPEAT_WINDOW`).
//!
//! Layout:
//! - this file — the index.
//! - [`rules`] — the plain rules: node names, the node id a join gets
//!   (which tells a repeated join), and what a `Connect` with a
//!   certificate may claim.

pub mod rules;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use weft_proto::NodeId;

use crate::store::NodeIdentityRecord;
pub use rules::{
    ConnectRefusal, REPEAT_WINDOW, admit_connect, join_node_id, may_repeat, repeats_join,
    validate_name,
};

/// Every node identity by node id. See the module docs.
#[derive(Debug, Default)]
pub struct Identities {
    records: RwLock<HashMap<NodeId, NodeIdentityRecord>>,
    /// Serializes writers (`Join`, `RevokeNode`): check, store, index.
    pub(crate) write: tokio::sync::Mutex<()>,
    /// Connects and renewals of revoked nodes refused here, at the edge
    /// (the scheduler counts the rest of `revoked_node_refusals`).
    refusals: AtomicU64,
    /// Nodes that connected with their certificate since this coordinator
    /// started: their joins are no longer repeated. Not stored: after a
    /// restart [`REPEAT_WINDOW`] alone bounds repeats.
    connected: RwLock<HashSet<NodeId>>,
}

impl Identities {
    /// An index of `records`.
    pub fn new(records: Vec<NodeIdentityRecord>) -> Identities {
        Identities {
            records: RwLock::new(records.into_iter().map(|r| (r.id, r)).collect()),
            ..Identities::default()
        }
    }

    /// Adds or replaces a record (after the store has it).
    pub fn put(&self, record: NodeIdentityRecord) {
        match self.records.write() {
            Ok(mut records) => records.insert(record.id, record),
            Err(poisoned) => poisoned.into_inner().insert(record.id, record),
        };
    }

    /// One identity.
    pub fn get(&self, id: NodeId) -> Option<NodeIdentityRecord> {
        self.read(|records| records.get(&id).cloned())
    }

    /// The identity holding `name`: the one not revoked (there is at most
    /// one).
    pub fn holder(&self, name: &str) -> Option<NodeIdentityRecord> {
        self.read(|records| {
            records
                .values()
                .find(|r| r.revoked.is_none() && r.name == name)
                .cloned()
        })
    }

    /// The identity an admin means by `selector`: a node id, else the name
    /// of the one holding it, else the newest revoked one with that name.
    pub fn find(&self, selector: &str) -> Option<NodeIdentityRecord> {
        let selector = selector.trim();
        if let Ok(id) = selector.parse::<NodeId>()
            && let Some(record) = self.get(id)
        {
            return Some(record);
        }
        self.holder(selector).or_else(|| {
            self.read(|records| {
                records
                    .values()
                    .filter(|r| r.name == selector)
                    .max_by_key(|r| r.created)
                    .cloned()
            })
        })
    }

    /// Marks every id of `ids` revoked (the PKI dir's list, read at start),
    /// recording the ids the store does not know with an empty name.
    pub fn bar(&self, ids: &[NodeId], now: std::time::SystemTime) {
        for &id in ids {
            let record = match self.get(id) {
                Some(record) if record.revoked.is_some() => continue,
                Some(record) => NodeIdentityRecord {
                    revoked: Some(now),
                    ..record
                },
                None => NodeIdentityRecord {
                    id,
                    name: String::new(),
                    created: now,
                    token_id: String::new(),
                    revoked: Some(now),
                },
            };
            self.put(record);
        }
    }

    /// Every revoked node id (for the scheduler at start).
    pub fn revoked(&self) -> Vec<NodeId> {
        self.read(|records| {
            records
                .values()
                .filter(|r| r.revoked.is_some())
                .map(|r| r.id)
                .collect()
        })
    }

    /// Notes that node `id` connected with its certificate: its join is
    /// no longer repeated (see [`Identities::repeatable`]).
    pub fn note_connected(&self, id: NodeId) {
        match self.connected.write() {
            Ok(mut connected) => connected.insert(id),
            Err(poisoned) => poisoned.into_inner().insert(id),
        };
    }

    /// Whether node `id` connected since this coordinator started.
    pub fn connected(&self, id: NodeId) -> bool {
        match self.connected.read() {
            Ok(connected) => connected.contains(&id),
            Err(poisoned) => poisoned.into_inner().contains(&id),
        }
    }

    /// The holder of `name` whose join, with token `token_id`, may still
    /// be repeated at `now` (the key aside: [`repeats_join`] checks it):
    /// made by that token, not revoked, within [`REPEAT_WINDOW`] of its
    /// join, and not connected yet. Read-only: what lets a join with a
    /// used-up token wait for the writers' locks at all.
    pub fn repeatable(
        &self,
        name: &str,
        token_id: &str,
        now: SystemTime,
    ) -> Option<NodeIdentityRecord> {
        self.holder(name)
            .filter(|holder| may_repeat(holder, token_id, name, now) && !self.connected(holder.id))
    }

    /// Counts a refused Connect or renewal of a revoked node.
    pub fn count_refusal(&self) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals counted by [`count_refusal`](Self::count_refusal).
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    fn read<T>(&self, f: impl FnOnce(&HashMap<NodeId, NodeIdentityRecord>) -> T) -> T {
        match self.records.read() {
            Ok(records) => f(&records),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }
}
