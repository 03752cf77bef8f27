//! The client's error type: every failure of a [`Client`](crate::Client)
//! call, classified by what the caller can do about it.
//!
//! A `tonic::Status` is classified by its code (see [`Error::from_status`]);
//! transport failures that tonic reports as `UNKNOWN`/`INTERNAL` with an h2
//! or transport message (the coordinator went away mid-stream) count as
//! [`Error::Unavailable`], so callers only have to check one variant to know
//! "the connection is gone, try again later". A `RESOURCE_EXHAUSTED` or
//! `OUT_OF_RANGE` that refuses a message for its size is
//! [`Error::TooLarge`] (not retryable), not load.

use tonic::{Code, Status};

use weft_proto::{AddressError, ConversionError};

/// What went wrong talking to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The coordinator could not be reached, or the connection was lost.
    /// Retryable: a unary call may or may not have taken effect (a Submit
    /// retried after this may submit twice); reads and watches are safe.
    #[error("{0}")]
    Unavailable(String),
    /// The coordinator refused the request as malformed (a bad spec, a bad
    /// id). Not retryable: the same request fails the same way. Nothing was
    /// committed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The task or node does not exist. Not retryable.
    #[error("not found: {0}")]
    NotFound(String),
    /// The coordinator is at a limit of load: its queue is full, or this
    /// client has as many streams open as it may. Retryable after a pause:
    /// nothing was committed.
    #[error("coordinator is overloaded: {0}")]
    ResourceExhausted(String),
    /// A spec or request is larger than a message may be (the
    /// coordinator's `--max-message-size`, or this client's own limit).
    /// Not retryable: the same request is refused the same way; split the
    /// work or make it smaller. Nothing was committed.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The request does not fit the current state (e.g. cancelling a task
    /// that already finished). Not retryable as is.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The call's deadline passed before an answer came. Retryable, but the
    /// call may have taken effect.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The call was cancelled (by this side, or by the coordinator shutting
    /// the stream). Retryable.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The coordinator failed internally, or answered something this client
    /// does not understand. Not retryable.
    #[error("internal error: {0}")]
    Internal(String),
    /// The coordinator address is none of the accepted forms (`HOST:PORT`,
    /// `http(s)://HOST:PORT`). Not retryable.
    #[error(transparent)]
    InvalidAddress(#[from] AddressError),
    /// The TLS settings cannot be used: an `https://` coordinator with no
    /// CA file or pin, an unreadable CA file, a malformed pin.
    #[error("{0}")]
    Tls(String),
    /// The coordinator URL, though a valid address, was refused by the
    /// transport. Not retryable.
    #[error("invalid coordinator URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The coordinator answered a message this client cannot convert (a
    /// missing field, a bad id). Not retryable: a version mismatch or a bug.
    #[error("malformed answer from the coordinator: {0}")]
    Protocol(#[from] ConversionError),
    /// Any other gRPC status (unauthenticated, unimplemented, ...). Not
    /// retryable.
    #[error("{code:?}: {message}")]
    Other {
        /// The gRPC status code.
        code: Code,
        /// The status message.
        message: String,
    },
}

impl Error {
    /// Classifies a gRPC status by its code.
    pub fn from_status(status: &Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::Unavailable => Error::Unavailable(format!("coordinator unavailable: {message}")),
            Code::ResourceExhausted | Code::OutOfRange if is_too_large(&message) => {
                Error::TooLarge(message)
            }
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(message),
            Code::NotFound => Error::NotFound(message),
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => {
                Error::FailedPrecondition(message)
            }
            Code::DeadlineExceeded => Error::DeadlineExceeded(message),
            Code::Cancelled => Error::Cancelled(message),
            Code::Unknown | Code::Internal if is_transport_failure(&message) => {
                Error::Unavailable(format!("connection to the coordinator lost: {message}"))
            }
            Code::Internal | Code::Unknown | Code::DataLoss => Error::Internal(message),
            code => Error::Other { code, message },
        }
    }

    /// True when trying again later may succeed (see each variant for what
    /// a retry risks).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable(_)
            | Error::ResourceExhausted(_)
            | Error::DeadlineExceeded(_)
            | Error::Cancelled(_) => true,
            Error::InvalidArgument(_)
            | Error::NotFound(_)
            | Error::TooLarge(_)
            | Error::FailedPrecondition(_)
            | Error::Internal(_)
            | Error::InvalidAddress(_)
            | Error::Tls(_)
            | Error::InvalidUrl { .. }
            | Error::Protocol(_)
            | Error::Other { .. } => false,
        }
    }

    /// True when the coordinator could not be reached or the connection
    /// dropped (the CLI's exit code 69).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }

    /// The error for a connection that could not be made to `url`.
    pub(crate) fn unreachable(url: &str, cause: &(dyn std::error::Error + 'static)) -> Self {
        Error::Unavailable(format!(
            "cannot reach coordinator at {url}: {}",
            root_cause(cause)
        ))
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Error::from_status(&status)
    }
}

/// The messages of a refusal for size: the coordinator's for a spec or
/// request over `--max-message-size` (it names the flag), and tonic's own
/// encoder's and decoder's (`OUT_OF_RANGE` where this client refuses,
/// `RESOURCE_EXHAUSTED` as the coordinator answers). Any other
/// `RESOURCE_EXHAUSTED` (a full queue, too many streams) is load.
fn is_too_large(message: &str) -> bool {
    message.contains("--max-message-size") || message.contains("message length too large")
}

/// Messages tonic gives a broken connection when it reports it as
/// UNKNOWN/INTERNAL rather than UNAVAILABLE.
fn is_transport_failure(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "transport error",
        "h2 protocol error",
        "connection reset",
        "broken pipe",
        "connection refused",
        "error reading a body",
        "connection closed",
        "stream closed",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

/// The innermost cause of a transport error, in short lower-case words
/// ("connection refused", "timed out").
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    let mut text = current.to_string();
    while let Some(source) = current.source() {
        current = source;
        text = current.to_string();
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            return match io.kind() {
                ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                ErrorKind::TimedOut => "timed out".to_owned(),
                ErrorKind::ConnectionReset => "connection reset".to_owned(),
                _ => strip_os_error(&io.to_string()),
            };
        }
    }
    let text = strip_os_error(&text);
    if text.contains("timed out") || text.contains("timeout") {
        return "timed out".to_owned();
    }
    text
}

fn strip_os_error(text: &str) -> String {
    let trimmed = match text.find(" (os error") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut chars = trimmed.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_their_variants() {
        let cases = [
            (Status::unavailable("down"), "Unavailable"),
            (Status::invalid_argument("bad"), "InvalidArgument"),
            (Status::not_found("gone"), "NotFound"),
            (Status::resource_exhausted("full"), "ResourceExhausted"),
            (Status::failed_precondition("done"), "FailedPrecondition"),
            (Status::deadline_exceeded("slow"), "DeadlineExceeded"),
            (Status::internal("oops"), "Internal"),
            (Status::unauthenticated("who"), "Other"),
        ];
        for (status, variant) in cases {
            let err = Error::from(status);
            assert!(
                format!("{err:?}").starts_with(variant),
                "{err:?} is not {variant}"
            );
        }
    }

    #[test]
    fn only_transient_errors_are_retryable() {
        assert!(Error::from(Status::unavailable("x")).is_retryable());
        assert!(Error::from(Status::resource_exhausted("x")).is_retryable());
        assert!(Error::from(Status::deadline_exceeded("x")).is_retryable());
        assert!(!Error::from(Status::invalid_argument("x")).is_retryable());
        assert!(!Error::from(Status::not_found("x")).is_retryable());
        assert!(!Error::from(Status::failed_precondition("x")).is_retryable());
        assert!(!Error::from(Status::internal("x")).is_retryable());
    }

    #[test]
    fn a_message_over_the_size_limit_is_too_large_and_not_retryable() {
        let cases = [
            // The coordinator's ConversionError::TooLarge.
            Status::resource_exhausted(
                "task 0: spec is 2000 bytes; this coordinator takes at most 1000 (--max-message-size)",
            ),
            // tonic's decoder on the coordinator, as the coordinator answers it.
            Status::resource_exhausted(
                "Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes",
            ),
            // tonic's encoder or decoder in this client.
            Status::out_of_range(
                "Error, encoded message length too large: found 9 bytes, the limit is: 8 bytes",
            ),
            Status::out_of_range(
                "Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes",
            ),
        ];
        for status in cases {
            let err = Error::from(status);
            assert!(matches!(err, Error::TooLarge(_)), "{err:?}");
            assert!(!err.is_retryable(), "{err:?}");
        }
        // Load is still load.
        let full = Error::from(Status::resource_exhausted(
            "queue full: 3 tasks not final, at most 3",
        ));
        assert!(matches!(full, Error::ResourceExhausted(_)), "{full:?}");
        assert!(full.is_retryable());
        let streams = Error::from(Status::resource_exhausted(
            "too many streams: token a1 already has 2 Watch, Run and WaitMany streams open, the most one client may (--max-streams-per-client 2)",
        ));
        assert!(
            matches!(streams, Error::ResourceExhausted(_)),
            "{streams:?}"
        );
    }

    #[test]
    fn a_broken_h2_stream_counts_as_unavailable() {
        let err = Error::from(Status::unknown("h2 protocol error: error reading a body"));
        assert!(err.is_unavailable(), "{err:?}");
        let err = Error::from(Status::internal("transport error"));
        assert!(err.is_unavailable(), "{err:?}");
    }

    #[test]
    fn connection_refused_is_reported_in_short_words() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Outer(#[source] std::io::Error);
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = Error::unreachable("http://127.0.0.1:1", &Outer(io));
        assert_eq!(
            err.to_string(),
            "cannot reach coordinator at http://127.0.0.1:1: connection refused"
        );
        assert!(err.is_unavailable());
    }
}
