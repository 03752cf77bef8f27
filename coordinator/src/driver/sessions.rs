//! The fan-out to node sessions: each connected node's outgoing channel and
//! the token that ends its session.
//!
//! Sends never wait: a session whose bounded channel is full (the node
//! stopped reading) or closed is ended instead, so one slow node never
//! slows the driver; its reader then reports it gone and its attempts are
//! requeued. What goes out is domain values ([`ToNode`]); the service
//! encodes them as they leave.
//!
//! What one session queues is bounded: its channel by messages, each
//! `Assign` by the credits the node granted (at most its slots plus
//! prefetch), and Cancels (one channel message per batch, each attempt
//! once) by [`MAX_QUEUED_CANCELS`] in all: a node can send events about any
//! number of attempts it does not hold, and each one earns it a Cancel.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;

use weft_proto::NodeId;

use super::inbox::{CancelBatch, NodeTx, ToNode};
use crate::config::CoordinatorConfig;
use crate::scheduler::{NodeOut, SessionId};

/// Cancels one session may have queued towards its node, not yet taken by
/// its stream. A node holds at most twice `--max-node-slots` attempts, so a
/// legitimate node (even one back from a long partition, reporting every
/// attempt it held) never comes near; one that does is ended.
pub(super) const MAX_QUEUED_CANCELS: usize = 65_536;

/// One node session as the driver holds it.
struct Session {
    tx: NodeTx,
    token: CancellationToken,
    /// Cancels queued on `tx` and not yet encoded.
    cancels: Arc<AtomicUsize>,
}

/// Open node sessions by id.
#[derive(Default)]
pub(super) struct Sessions {
    open: HashMap<SessionId, Session>,
}

impl Sessions {
    /// Opens `session`, putting `Registered` first on its stream (before
    /// any Cancel or Assign the registration leads to). False, with the
    /// session ended, when even that cannot be sent.
    pub fn open(
        &mut self,
        session: SessionId,
        node_id: NodeId,
        config: &CoordinatorConfig,
        tx: NodeTx,
        token: CancellationToken,
    ) -> bool {
        let registered = ToNode::Registered {
            node_id,
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.heartbeat_timeout,
            max_message_size: config.max_message_size,
            start_timeout: config.start_timeout,
        };
        if tx.try_send(registered).is_err() {
            token.cancel();
            return false;
        }
        let cancels = Arc::new(AtomicUsize::new(0));
        self.open.insert(session, Session { tx, token, cancels });
        true
    }

    /// Sends a committed batch's messages for `session`: one `Assign`,
    /// then each `Cancel`, then `Drain`.
    pub fn send(&self, session: SessionId, out: NodeOut) {
        let Some(target) = self.open.get(&session) else {
            return;
        };
        let NodeOut {
            assign,
            cancel,
            drain,
        } = out;
        let queued = target.cancels.load(Ordering::Relaxed);
        if queued.saturating_add(cancel.len()) > MAX_QUEUED_CANCELS {
            tracing::warn!(
                session = session.0,
                queued,
                more = cancel.len(),
                limit = MAX_QUEUED_CANCELS,
                "node session has too many cancels queued (it reports attempts it does not hold faster than it reads); closing it"
            );
            target.token.cancel();
            return;
        }
        let assign = (!assign.is_empty()).then_some(ToNode::Assign(assign));
        let cancels = (!cancel.is_empty())
            .then(|| ToNode::Cancel(CancelBatch::new(cancel, Arc::clone(&target.cancels))));
        let drain = drain.map(ToNode::Drain);
        for message in assign.into_iter().chain(cancels).chain(drain) {
            if let Err(err) = target.tx.try_send(message) {
                // A node this far behind (or gone) cannot be trusted with
                // work: end its session; the reader reports it gone and its
                // attempts are requeued.
                tracing::warn!(session = session.0, error = %err, "node session cannot keep up; closing it");
                target.token.cancel();
                break;
            }
        }
    }

    /// Ends `session` (lost or replaced).
    pub fn close(&mut self, session: SessionId) {
        if let Some(session) = self.open.remove(&session) {
            session.token.cancel();
        }
    }

    /// Ends `session` after a last message `last` (a revoked node's
    /// refusal), which the stream delivers before it ends.
    pub fn close_with(&mut self, session: SessionId, last: ToNode) {
        if let Some(session) = self.open.remove(&session) {
            let _ = session.tx.try_send(last);
            session.token.cancel();
        }
    }

    /// Ends every session (the driver stops).
    pub fn close_all(&self) {
        for session in self.open.values() {
            session.token.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use weft_proto::{Attempt, NodeId, TaskId};

    use super::*;
    use crate::scheduler::CancelOrder;

    fn cancels(n: usize) -> NodeOut {
        NodeOut {
            cancel: (0..n)
                .map(|_| CancelOrder {
                    task_id: TaskId::new(),
                    attempt: Attempt(1),
                    reason: "stale".into(),
                })
                .collect(),
            ..NodeOut::default()
        }
    }

    #[test]
    fn a_batch_of_cancels_is_one_message_and_queued_cancels_are_bounded() {
        let mut sessions = Sessions::default();
        let (tx, mut rx) = mpsc::channel(4);
        let token = CancellationToken::new();
        let session = SessionId(1);
        let config = CoordinatorConfig::default();
        assert!(sessions.open(session, NodeId::new(), &config, tx, token.clone()));
        assert!(matches!(rx.try_recv(), Ok(ToNode::Registered { .. })));
        // Far more Cancels than the channel holds messages: one message.
        sessions.send(session, cancels(1_000));
        let Ok(ToNode::Cancel(batch)) = rx.try_recv() else {
            panic!("one Cancel batch");
        };
        assert_eq!(batch.orders.len(), 1_000);
        assert!(!token.is_cancelled());
        // Taken by the stream: no longer counted.
        drop(batch);
        sessions.send(session, cancels(MAX_QUEUED_CANCELS));
        assert!(!token.is_cancelled());
        // Not taken, and one more: the session is ended.
        sessions.send(session, cancels(1));
        assert!(token.is_cancelled());
    }
}
