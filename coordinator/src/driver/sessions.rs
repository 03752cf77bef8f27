//! The fan-out to node sessions: each connected node's outgoing channel and
//! the token that ends its session.
//!
//! Sends never wait: a session whose bounded channel is full (the node
//! stopped reading) or closed is ended instead, so one slow node never
//! slows the driver; its reader then reports it gone and its attempts are
//! requeued. What goes out is domain values ([`ToNode`]); the service
//! encodes them as they leave.

use std::collections::HashMap;

use tokio_util::sync::CancellationToken;

use weft_proto::NodeId;

use super::inbox::{NodeTx, ToNode};
use crate::config::CoordinatorConfig;
use crate::scheduler::{NodeOut, SessionId};

/// One node session as the driver holds it.
struct Session {
    tx: NodeTx,
    token: CancellationToken,
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
        };
        if tx.try_send(registered).is_err() {
            token.cancel();
            return false;
        }
        self.open.insert(session, Session { tx, token });
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
        let assign = (!assign.is_empty()).then_some(ToNode::Assign(assign));
        let cancels = cancel.into_iter().map(ToNode::Cancel);
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
