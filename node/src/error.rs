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
    /// The coordinator refused the node's certificate, or the node
    /// presented none where one is needed: `UNAUTHENTICATED` on
    /// `Connect`. Fatal: the node must join.
    #[error(
        "the coordinator refused this node ({}): it needs a node certificate; join with a join \
         token: weft token create --role node, then weft-node --join TOKEN",
        .0.message()
    )]
    NotJoined(tonic::Status),
    /// The coordinator refused the node's certificate for good:
    /// `PERMISSION_DENIED` on `Connect` (the node was revoked). Fatal.
    #[error(
        "this node was revoked by an admin (the coordinator said: {}); its tasks were stopped. \
         To serve again, move its state dir away and join with a new token: \
         weft token create --role node, then weft-node --join TOKEN",
        .0.message()
    )]
    Revoked(tonic::Status),
    /// `Join` was refused for a reason joining again would meet the same
    /// way. Fatal.
    #[error("{}", join_refusal(.0))]
    JoinRefused(tonic::Status),
    /// The node's certificate or key cannot be used, or `Join` answered
    /// something that does not fit the request. Fatal.
    #[error("the node's identity: {0}")]
    Identity(String),
    /// The state dir cannot be read or written. Fatal.
    #[error(transparent)]
    State(#[from] crate::identity::StateError),
    /// The name configured is not the one the node joined with. Fatal.
    #[error(
        "this node joined as '{joined}' (state dir {state_dir}), so it cannot register as \
         '{configured}': drop --name, or join again with a new --state-dir to take another name"
    )]
    NameMismatch {
        /// The name configured (`--name`).
        configured: String,
        /// The name in the state dir.
        joined: String,
        /// The state dir.
        state_dir: String,
    },
    /// The node's certificate expired (the node was away longer than its
    /// lifetime). Fatal: it must join again.
    #[error(
        "the node's certificate expired at {not_after} (the node was away longer than its \
         lifetime): move the state dir {state_dir} away and join again with a new token \
         (weft token create --role node, then weft-node --join TOKEN)"
    )]
    CertificateExpired {
        /// When it expired (RFC 3339).
        not_after: String,
        /// The state dir, or `(memory)`.
        state_dir: String,
    },
    /// The node's lease (`--lease`) is under twice the heartbeat interval
    /// the coordinator registered it with: it would run out between two
    /// heartbeats and stop every attempt. Fatal: registering again meets
    /// the same heartbeats.
    #[error(
        "--lease {lease:?} is too short for this coordinator, which sends a heartbeat every \
         {interval:?}: the lease would run out between heartbeats and stop every attempt as if \
         the coordinator were unreachable; use --lease {:?} or more (twice its heartbeat \
         interval), or leave --lease unset to use its heartbeat timeout",
        .interval.saturating_mul(2)
    )]
    LeaseTooShort {
        /// The lease configured.
        lease: Duration,
        /// The coordinator's heartbeat interval.
        interval: Duration,
    },
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
            | Error::RegisterRefused(_)
            | Error::NotJoined(_)
            | Error::Revoked(_)
            | Error::JoinRefused(_)
            | Error::Identity(_)
            | Error::State(_)
            | Error::NameMismatch { .. }
            | Error::CertificateExpired { .. }
            | Error::LeaseTooShort { .. } => true,
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
            _ => Error::stream_ended(status),
        }
    }

    /// The error for a status the coordinator ended a live stream with:
    /// a refused certificate ([`Error::NotJoined`], [`Error::Revoked`]) is
    /// final, anything else [`Error::Refused`] (retried).
    pub(crate) fn stream_ended(status: tonic::Status) -> Error {
        match status.code() {
            tonic::Code::Unauthenticated => Error::NotJoined(status),
            tonic::Code::PermissionDenied => Error::Revoked(status),
            _ => Error::Refused(status),
        }
    }
}

/// What a refused `Join` means, and what to do.
fn join_refusal(status: &tonic::Status) -> String {
    let said = status.message();
    match status.code() {
        tonic::Code::Unauthenticated => format!(
            "the coordinator refused the join token ({said}): it is wrong, expired, revoked or \
             used up; ask an admin for a new one (weft token create --role node)"
        ),
        tonic::Code::AlreadyExists => format!(
            "the coordinator refused the node's name ({said}): another node holds it; pick \
             another --name, or free it with weft nodes revoke NAME"
        ),
        tonic::Code::InvalidArgument => {
            format!("the coordinator refused to join this node: {said}")
        }
        tonic::Code::FailedPrecondition => format!(
            "the coordinator does not take join tokens ({said}): drop --join and connect with \
             --coordinator and --ca-pin (or http:// for a coordinator started with --insecure)"
        ),
        tonic::Code::Unimplemented => format!(
            "the coordinator cannot join nodes ({said}): it is older than this node; upgrade it"
        ),
        code => format!("the coordinator refused to join this node ({code:?}): {said}"),
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
    fn a_refused_certificate_is_final_and_says_what_to_do() {
        let must_join = Error::register_refused(tonic::Status::unauthenticated("no certificate"));
        assert!(must_join.is_fatal());
        let message = must_join.to_string();
        assert!(
            message.contains("no certificate")
                && message.contains(
                    "join with a join token: weft token create --role node, then weft-node --join TOKEN"
                ),
            "{message}"
        );
        let revoked = Error::stream_ended(tonic::Status::permission_denied("node was revoked"));
        assert!(revoked.is_fatal());
        assert!(
            revoked
                .to_string()
                .starts_with("this node was revoked by an admin"),
            "{revoked}"
        );
        assert!(matches!(
            Error::register_refused(tonic::Status::permission_denied("x")),
            Error::Revoked(_)
        ));
        let gone = Error::stream_ended(tonic::Status::unavailable("restarting"));
        assert!(!gone.is_fatal());
    }

    #[test]
    fn a_refused_join_names_the_cause_and_the_fix() {
        let token = Error::JoinRefused(tonic::Status::unauthenticated("unknown token"));
        assert!(token.is_fatal());
        let message = token.to_string();
        assert!(
            message.contains("wrong, expired, revoked or used up")
                && message.contains("weft token create --role node"),
            "{message}"
        );
        let taken = Error::JoinRefused(tonic::Status::already_exists("held by 01H")).to_string();
        assert!(
            taken.contains("held by 01H") && taken.contains("weft nodes revoke NAME"),
            "{taken}"
        );
    }

    #[test]
    fn a_malformed_address_is_fatal_and_a_lost_stream_is_not() {
        let address = weft_proto::CoordinatorAddr::parse("nope").unwrap_err();
        assert!(Error::from(address).is_fatal());
        assert!(!Error::StreamClosed.is_fatal());
    }
}
