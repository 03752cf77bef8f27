//! [`Error`]: what can go wrong finding, starting, stopping or waiting on
//! the binaries and the in-process cluster. Variants carry the path, label
//! or status involved; callers add what they were doing.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// A failure of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A binary is not in the binary folder (see [`crate::bin_dir`]).
    #[error(
        "{} not found: run `cargo build --bins` first (or set WEFT_BIN_DIR)",
        path.display()
    )]
    BinaryNotFound {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The running executable's own path is unknown, so neither is the
    /// folder beside it.
    #[error("locating the running executable")]
    CurrentExe(#[source] std::io::Error),
    /// A child's log file could not be created or opened.
    #[error("creating log file {}", path.display())]
    LogFile {
        /// The log file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The OS refused to start a child.
    #[error("starting {} for {label}", program.display())]
    Spawn {
        /// The program run (the wrapper's, if there is one).
        program: PathBuf,
        /// The child's label.
        label: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for a child failed (the OS lost track of it).
    #[error("waiting for {label}")]
    Wait {
        /// The child's label.
        label: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A child exited while it was expected to run.
    #[error("{label} exited ({status}); log {}", log.display())]
    Exited {
        /// The child's label.
        label: String,
        /// How it exited.
        status: ExitStatus,
        /// Its log file, for the caller to show.
        log: PathBuf,
    },
    /// A coordinator wrote no address to its `--addr-file` in time.
    #[error("{label} wrote no address to {} within {waited:?}", path.display())]
    NoAddress {
        /// The child's label.
        label: String,
        /// The address file.
        path: PathBuf,
        /// How long it was polled.
        waited: Duration,
    },
    /// Fewer nodes than wanted were ready when the wait ran out.
    #[error("only {ready} of {wanted} nodes ready within {waited:?}")]
    NodesNotReady {
        /// Nodes ready at the last look.
        ready: usize,
        /// Nodes waited for.
        wanted: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// The coordinator could not be asked for its nodes.
    #[error("listing the coordinator's nodes")]
    ListNodes(#[source] weft_client::Error),
    /// The in-process coordinator did not start.
    #[error("starting the coordinator")]
    Coordinator(#[source] weft_coordinator::Error),
}
