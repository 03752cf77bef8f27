//! The node's error type.
//!
//! The node serves no gRPC itself, so there is no mapping to `Status` here;
//! these errors are what a session ends with (logged, then the node
//! reconnects) and what `RunningNode::drain` can answer.

use std::time::Duration;

/// What can go wrong in a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator URL does not parse as an endpoint.
    #[error("invalid coordinator url {url:?}: {source}")]
    InvalidUrl {
        /// The URL as configured.
        url: String,
        /// Why it was refused.
        source: tonic::transport::Error,
    },
    /// Dialing the coordinator failed (unreachable, refused, timed out).
    /// Retried with backoff.
    #[error("cannot reach coordinator at {url}: {source}")]
    Connect {
        /// The URL dialed.
        url: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The coordinator answered the session with an error status (e.g. a
    /// refused Register). Retried with backoff.
    #[error("coordinator refused the session: {0}")]
    Refused(tonic::Status),
    /// The coordinator broke a rule of the protocol (e.g. its first message
    /// was not `Registered`).
    #[error("protocol violation by the coordinator: {0}")]
    Protocol(String),
    /// The coordinator ended the stream.
    #[error("coordinator closed the stream")]
    StreamClosed,
    /// Nothing was heard from the coordinator for its heartbeat timeout.
    #[error("coordinator silent for {0:?}")]
    HeartbeatTimeout(Duration),
    /// Nothing was heard from the coordinator for this long, past the
    /// node's lease: its running attempts were stopped and the session is
    /// dropped (the coordinator has declared this node lost).
    #[error("coordinator silent for {0:?}, past the node's lease")]
    LeaseExpired(Duration),
    /// A drain did not finish within its grace period plus a margin; the
    /// node was killed instead.
    #[error("node did not stop within {0:?} of the drain; killed it")]
    DrainTimedOut(Duration),
    /// The node's background task panicked.
    #[error("node task panicked: {0}")]
    Panicked(String),
}
