//! The crate's one error enum and its one mapping to gRPC status codes.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// The node declares more slots than this coordinator accepts from one
    /// node. Not retryable: the same Register is refused the same way.
    #[error(
        "node declares {slots} slots; this coordinator accepts at most {max} (--max-node-slots)"
    )]
    TooManySlots {
        /// What the node declared.
        slots: u32,
        /// The configured limit.
        max: u32,
    },
    /// The node speaks a protocol version this coordinator does not.
    #[error("unsupported protocol version {0}; this coordinator speaks 1")]
    ProtocolVersion(i32),
    /// No such task. Not retryable.
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    /// No task has this job id (or it expired). Not retryable.
    #[error("job {0} not found")]
    JobNotFound(TaskId),
    /// The task finished longer ago than the retention and was removed.
    #[error("task {id} expired: finished tasks are removed after {} (--retention)", short_duration(*.retention))]
    TaskExpired {
        /// The task.
        id: TaskId,
        /// The configured retention.
        retention: Duration,
    },
    /// No connected node with that id or name.
    #[error("node {} not found", quoted(.0))]
    NodeNotFound(String),
    /// No limit of that name (and kind).
    #[error("limit {} not found", quoted(.0))]
    LimitNotFound(String),
    /// The node was revoked by an admin (`weft nodes revoke`). Final: it
    /// must not reconnect.
    #[error(
        "node {0} was revoked by an admin; it may not connect again (join as a new node with a new token)"
    )]
    NodeRevoked(weft_proto::NodeId),
    /// Another connected node holds the name. Not retryable while it is
    /// connected.
    #[error(
        "node name '{name}' is held by another connected node ({holder}); give this node another --name"
    )]
    NodeNameTaken {
        /// The name asked for.
        name: String,
        /// The node holding it.
        holder: weft_proto::NodeId,
    },
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
    /// No cron schedule by that name. Not retryable.
    #[error("schedule {} not found", quoted(.0))]
    ScheduleNotFound(String),
    /// A cron schedule by that name exists already.
    #[error("schedule {} exists already; delete it first or choose another name", quoted(.0))]
    ScheduleExists(String),
    /// As many schedules as the coordinator keeps exist already.
    #[error("too many schedules: at most {max}")]
    TooManySchedules {
        /// The limit.
        max: usize,
    },
    /// The coordinator is stopping.
    #[error("coordinator is shutting down")]
    ShuttingDown,
    /// A task a Submit runs after ended while the Submit was checked (the
    /// Submit path reads the store again; retryable: nothing committed).
    #[error("a task this Submit runs after ended meanwhile; retry")]
    ParentsMoved,
    /// The store failed (or could not be opened: see [`StoreError`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration breaks a rule between its values (see
    /// [`CoordinatorConfig::check`](crate::config::CoordinatorConfig::check)).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The listener could not report its address.
    #[error("listener address: {0}")]
    Listener(#[source] std::io::Error),
    /// The cluster CA or the serving certificate could not be set up.
    #[error("setting up TLS: {0}")]
    Tls(String),
    /// The HTTP listener (`--http-listen`) could not be bound, or may not
    /// serve plaintext where it was asked to.
    #[error("the HTTP listener (--http-listen {addr}): {message}")]
    HttpListen {
        /// The address asked for.
        addr: SocketAddr,
        /// What went wrong and what to do.
        message: String,
    },
    /// `--no-auth` on an address other hosts can reach.
    #[error(
        "refusing --no-auth on {0}, which is not a loopback address: anyone who reaches it could run commands on every node; listen on 127.0.0.1 or use client tokens"
    )]
    NoAuthNotLoopback(SocketAddr),
    /// The admin token could not be made or written on first start.
    #[error("writing the admin token to {}: {message}", path.display())]
    AdminToken {
        /// Where it was to go.
        path: std::path::PathBuf,
        /// Why.
        message: String,
    },
    /// The OTLP trace exporter could not be set up (`--otlp-endpoint`).
    #[error("trace export: {0}")]
    TraceExport(String),
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
            // Too large is not malformed: the client may act on it (split
            // the work, raise --max-message-size).
            Error::InvalidSpec {
                source: ConversionError::TooLarge { .. },
                ..
            }
            | Error::InvalidArgument(ConversionError::TooLarge { .. }) => {
                Status::resource_exhausted(err.to_string())
            }
            Error::InvalidSpec { .. }
            | Error::InvalidArgument(_)
            | Error::BadRegistration(_)
            | Error::TooManySlots { .. } => Status::invalid_argument(err.to_string()),
            Error::ProtocolVersion(_) | Error::TaskFinal { .. } => {
                Status::failed_precondition(err.to_string())
            }
            Error::TaskNotFound(_)
            | Error::JobNotFound(_)
            | Error::TaskExpired { .. }
            | Error::NodeNotFound(_)
            | Error::ScheduleNotFound(_)
            | Error::LimitNotFound(_) => Status::not_found(err.to_string()),
            Error::QueueFull { .. } | Error::TooManySchedules { .. } => {
                Status::resource_exhausted(err.to_string())
            }
            Error::ScheduleExists(_) => Status::already_exists(err.to_string()),
            Error::NodeRevoked(_) => Status::permission_denied(err.to_string()),
            Error::NodeNameTaken { .. } => Status::already_exists(err.to_string()),
            Error::ShuttingDown | Error::ParentsMoved => Status::unavailable(err.to_string()),
            Error::Store(store) => store_status(store),
            Error::Listener(_)
            | Error::Config(_)
            | Error::Tls(_)
            | Error::HttpListen { .. }
            | Error::NoAuthNotLoopback(_)
            | Error::AddrFile { .. }
            | Error::TraceExport(_)
            | Error::AdminToken { .. } => {
                tracing::error!(error = %err, "internal failure");
                Status::internal("internal coordinator error")
            }
        }
    }
}

/// A store failure as a client is told it: a failed commit (full disk,
/// I/O error) is `UNAVAILABLE` with the reason (nothing of the request was
/// acknowledged; the coordinator stops and is restarted), and so is a
/// database that cannot be reached for now; damage is `DATA_LOSS` naming
/// the record; the rest is internal.
fn store_status(err: &StoreError) -> Status {
    match err {
        StoreError::DiskFull { op, message } => {
            tracing::error!(error = %err, "store write failed: disk full");
            Status::unavailable(format!(
                "the coordinator's disk is full ({op}: {message}); this request was not acknowledged; retry once there is room (a coordinator whose commit failed exits, to be restarted)"
            ))
        }
        StoreError::LostDatabase { .. } => {
            tracing::error!(error = %err, "store failure");
            Status::unavailable(format!(
                "{err}; this request was not acknowledged; this coordinator is stopping: retry on another one"
            ))
        }
        StoreError::Unreachable { .. } => {
            tracing::error!(error = %err, "store failure");
            Status::unavailable(format!(
                "{err}; this request was not acknowledged; retry later"
            ))
        }
        StoreError::Backend { .. } => {
            tracing::error!(error = %err, "store failure");
            Status::unavailable(format!(
                "the coordinator's store failed ({err}); this request was not acknowledged; retry later"
            ))
        }
        StoreError::Damaged { .. } | StoreError::Corrupt { .. } | StoreError::Panicked { .. } => {
            tracing::error!(error = %err, "store damage");
            Status::data_loss(err.to_string())
        }
        StoreError::Poisoned
        | StoreError::Inconsistent(_)
        | StoreError::Locked(_)
        | StoreError::Open { .. }
        | StoreError::Database { .. }
        | StoreError::Unreadable { .. }
        | StoreError::Missing { .. } => {
            tracing::error!(error = %err, "internal failure");
            Status::internal("internal coordinator error")
        }
    }
}

impl Error {
    /// The error for a task id the store does not have: expired when the
    /// id (a ULID, so it carries its creation time) is older than the
    /// retention, else not found.
    pub fn missing_task(id: TaskId, retention: Duration, now: SystemTime) -> Error {
        let created = UNIX_EPOCH + Duration::from_millis(id.timestamp_ms());
        let age = now.duration_since(created).unwrap_or_default();
        if !retention.is_zero() && age > retention {
            Error::TaskExpired { id, retention }
        } else {
            Error::TaskNotFound(id)
        }
    }
}

/// Most characters of a name a caller sent that an error echoes back.
pub(crate) const ECHO_CHARS: usize = 64;

/// A name a caller sent, quoted, cut to [`ECHO_CHARS`] characters (`...`
/// after the quotes when cut): an error never echoes a request's field
/// whole, however long it is.
pub(crate) fn quoted(name: &str) -> String {
    let cut = name.chars().take(ECHO_CHARS).collect::<String>();
    if cut.len() < name.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

/// Most characters of a message built from a caller's input that is
/// passed on whole (one that quotes what it refuses).
const MESSAGE_CHARS: usize = 256;

/// `message` cut to [`MESSAGE_CHARS`] characters, ending in `...` when cut.
pub(crate) fn cut(message: &str) -> String {
    let mut cut = message.chars().take(MESSAGE_CHARS).collect::<String>();
    if cut.len() < message.len() {
        cut.push_str("...");
    }
    cut
}

/// `24h`, `90m`, `30s`, `250ms`: the largest whole unit, as flags are written.
fn short_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        format!("{}ms", d.as_millis())
    } else if secs.is_multiple_of(86_400) && secs >= 86_400 * 2 {
        format!("{}d", secs / 86_400)
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_unavailable_naming_the_disk_and_damage_is_data_loss() {
        let full = Status::from(Error::Store(StoreError::DiskFull {
            op: "committing",
            message: "No space left on device (os error 28)".into(),
        }));
        assert_eq!(full.code(), tonic::Code::Unavailable);
        assert!(
            full.message().contains("disk is full") && full.message().contains("not acknowledged"),
            "{}",
            full.message()
        );
        let damaged = Status::from(Error::Store(StoreError::Damaged {
            table: "tasks",
            key: "01J".into(),
            reason: "checksum mismatch",
        }));
        assert_eq!(damaged.code(), tonic::Code::DataLoss);
        assert!(
            damaged.message().contains("table tasks, key 01J"),
            "{}",
            damaged.message()
        );
    }

    #[test]
    fn a_long_name_not_found_is_echoed_cut() {
        let long = "é".repeat(1024 * 1024);
        for err in [
            Error::ScheduleNotFound(long.clone()),
            Error::ScheduleExists(long.clone()),
            Error::NodeNotFound(long.clone()),
            Error::LimitNotFound(long.clone()),
        ] {
            let message = err.to_string();
            assert!(message.len() < 200, "{} bytes", message.len());
            assert!(message.contains(&format!("{:?}...", "é".repeat(ECHO_CHARS))));
        }
        assert_eq!(
            Error::ScheduleNotFound("nightly".into()).to_string(),
            "schedule \"nightly\" not found"
        );
    }

    #[test]
    fn a_missing_old_task_is_expired_and_a_missing_new_one_not_found() {
        let day = Duration::from_secs(86_400);
        let id = TaskId::new();
        let later = SystemTime::now() + day + Duration::from_secs(60);
        let expired = Error::missing_task(id, day, later);
        assert_eq!(
            expired.to_string(),
            format!("task {id} expired: finished tasks are removed after 24h (--retention)")
        );
        assert_eq!(Status::from(expired).code(), tonic::Code::NotFound);
        let fresh = Error::missing_task(id, day, SystemTime::now());
        assert_eq!(fresh.to_string(), format!("task {id} not found"));
        assert!(matches!(
            Error::missing_task(id, Duration::ZERO, later),
            Error::TaskNotFound(_)
        ));
    }

    #[test]
    fn an_unreachable_database_is_unavailable_and_a_refused_one_internal() {
        let unreachable = Status::from(Error::Store(StoreError::Unreachable {
            target: "postgresql://weft@127.0.0.1:5432/weft".into(),
            message: "error connecting to server: Connection refused (os error 111)".into(),
        }));
        assert_eq!(unreachable.code(), tonic::Code::Unavailable);
        assert!(
            unreachable.message().contains("cannot be reached")
                && unreachable.message().contains("retry later"),
            "{}",
            unreachable.message()
        );
        let refused = Status::from(Error::Store(StoreError::Database {
            target: "postgresql://weft@127.0.0.1:5432/weft".into(),
            message: "FATAL (28P01): password authentication failed".into(),
        }));
        assert_eq!(refused.code(), tonic::Code::Internal);
    }
}
