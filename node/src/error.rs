//! The node's error type.
//!
//! The node serves no gRPC itself, so there is no mapping to `Status` here;
//! these errors are what a session ends with (logged, then the node
//! reconnects, unless [`Error::is_fatal`]: then it stops) and what
//! `RunningNode::wait` and `RunningNode::drain` can answer.

use std::time::Duration;

/// What can go wrong in a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator address is none of the accepted forms (`HOST:PORT`,
    /// `http(s)://HOST:PORT`). Fatal.
    #[error(transparent)]
    InvalidAddress(#[from] weft_proto::AddressError),
    /// The coordinator URL does not parse as an endpoint. Fatal.
    #[error("invalid coordinator url {url:?}: {source}")]
    InvalidUrl {
        /// The URL as configured.
        url: String,
        /// Why it was refused.
        source: tonic::transport::Error,
    },
    /// Dialing the coordinator failed (unreachable, refused, timed out).
    /// Retried with backoff.
    #[error("cannot reach coordinator at {url}: {reason}")]
    Connect {
        /// The URL dialed.
        url: String,
        /// The innermost cause (e.g. that the certificate is not signed
        /// by the CA trusted), what a person can act on.
        reason: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The TLS settings cannot be used (an `https://` coordinator with no
    /// CA file or pin, an unreadable CA file). Fatal.
    #[error("{0}")]
    Tls(String),
    /// The coordinator answered the session with an error status that
    /// may pass (it is shutting down, say). Retried with backoff.
    #[error("coordinator refused the session: {0}")]
    Refused(tonic::Status),
    /// The coordinator refused this node's `Register` for a reason that
    /// registering again would meet the same way: `INVALID_ARGUMENT` (e.g.
    /// more slots than it accepts) or `FAILED_PRECONDITION` (another
    /// protocol version). Fatal: the node stops instead of reconnecting.
    #[error("coordinator refused to register this node: {}", .0.message())]
    RegisterRefused(tonic::Status),
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

impl Error {
    /// True when reconnecting cannot help, so the node stops: the address
    /// is wrong, or the coordinator refused the node's `Register` for good.
    pub fn is_fatal(&self) -> bool {
        match self {
            Error::InvalidAddress(_)
            | Error::InvalidUrl { .. }
            | Error::Tls(_)
            | Error::RegisterRefused(_) => true,
            Error::Connect { .. }
            | Error::Refused(_)
            | Error::Protocol(_)
            | Error::StreamClosed
            | Error::HeartbeatTimeout(_)
            | Error::LeaseExpired(_)
            | Error::DrainTimedOut(_)
            | Error::Panicked(_) => false,
        }
    }

    /// The error for a status the coordinator answered `Register` with:
    /// [`Error::RegisterRefused`] when the same `Register` would be
    /// refused again, else [`Error::Refused`] (retried).
    pub(crate) fn register_refused(status: tonic::Status) -> Error {
        match status.code() {
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                Error::RegisterRefused(status)
            }
            _ => Error::Refused(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_register_refused_as_invalid_is_fatal_and_an_unavailable_one_is_retried() {
        let too_big = Error::register_refused(tonic::Status::invalid_argument("too many slots"));
        assert!(too_big.is_fatal());
        assert_eq!(
            too_big.to_string(),
            "coordinator refused to register this node: too many slots"
        );
        let version = Error::register_refused(tonic::Status::failed_precondition("version 2"));
        assert!(version.is_fatal());
        let stopping = Error::register_refused(tonic::Status::unavailable("shutting down"));
        assert!(!stopping.is_fatal(), "{stopping}");
    }

    #[test]
    fn a_malformed_address_is_fatal_and_a_lost_stream_is_not() {
        let address = weft_proto::CoordinatorAddr::parse("nope").unwrap_err();
        assert!(Error::from(address).is_fatal());
        assert!(!Error::StreamClosed.is_fatal());
    }
}
