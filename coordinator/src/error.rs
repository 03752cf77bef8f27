//! The crate's one error enum and its one mapping to gRPC status codes.

use std::net::SocketAddr;

use tonic::Status;

use weft_proto::{ConversionError, TaskId, TaskState};

use crate::store::StoreError;

/// Everything that can go wrong in the coordinator, as a client or node
/// would be told.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A task spec in a Submit is invalid; nothing of that Submit was kept.
    #[error("task {index}: {source}")]
    InvalidSpec {
        /// Position of the spec in the request.
        index: usize,
        /// What is wrong with it.
        source: ConversionError,
    },
    /// A field of a request is malformed (ids, enums, durations).
    #[error("{0}")]
    InvalidArgument(#[from] ConversionError),
    /// The node's first message was not Register, or Register was invalid.
    #[error("bad registration: {0}")]
    BadRegistration(&'static str),
    /// The node speaks a protocol version this coordinator does not.
    #[error("unsupported protocol version {0}; this coordinator speaks 1")]
    ProtocolVersion(i32),
    /// No such task. Not retryable.
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    /// No connected node with that id or name.
    #[error("node {0:?} not found")]
    NodeNotFound(String),
    /// The queue is full. Safe to retry later: nothing was committed.
    #[error("queue full: {queued} tasks not final, at most {max}")]
    QueueFull {
        /// Tasks not final now plus the ones asked for.
        queued: usize,
        /// The configured limit.
        max: usize,
    },
    /// The task is already final and cannot be cancelled.
    #[error("task {id} is already {state}")]
    TaskFinal {
        /// The task.
        id: TaskId,
        /// Its final state.
        state: TaskState,
    },
    /// The coordinator is stopping.
    #[error("coordinator is shutting down")]
    ShuttingDown,
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The listener could not report its address.
    #[error("listener address: {0}")]
    Listener(#[source] std::io::Error),
    /// The address file could not be written (binary only).
    #[error("writing address {addr} to file: {source}")]
    AddrFile {
        /// The bound address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match &err {
            Error::InvalidSpec { .. } | Error::InvalidArgument(_) | Error::BadRegistration(_) => {
                Status::invalid_argument(err.to_string())
            }
            Error::ProtocolVersion(_) | Error::TaskFinal { .. } => {
                Status::failed_precondition(err.to_string())
            }
            Error::TaskNotFound(_) | Error::NodeNotFound(_) => Status::not_found(err.to_string()),
            Error::QueueFull { .. } => Status::resource_exhausted(err.to_string()),
            Error::ShuttingDown => Status::unavailable(err.to_string()),
            Error::Store(_) | Error::Listener(_) | Error::AddrFile { .. } => {
                tracing::error!(error = %err, "internal failure");
                Status::internal("internal coordinator error")
            }
        }
    }
}
