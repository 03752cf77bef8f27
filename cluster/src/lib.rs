//! A Weft cluster on this machine, the one way every tool starts one: the
//! `weft` CLI (`weft local`, `weft demo`), `weft bench` and the test
//! harness (`weft-tests`, its fault lab included).
//!
//! Two ways to run a cluster:
//! - as real processes: [`bin_path`] finds `weft-coordinator`, `weft-node`
//!   and `weft` (`WEFT_BIN_DIR`, else beside the running executable),
//!   [`Spawn`] starts one with its own log file, [`ChildProcess`] stops it
//!   (SIGTERM, then SIGKILL) and reads its log, [`wait_for_addr_file`]
//!   waits until a coordinator started with `--addr-file` listens;
//! - in this process: [`start_coordinator`] and [`start_node`] (the
//!   built-in handlers, this executable as reaper where it can be one),
//!   and [`LocalCluster`], a coordinator and its nodes as one handle.
//!
//! Either way, [`wait_nodes_ready`] waits until the coordinator lists the
//! nodes as ready.
//!
//! Errors are values ([`Error`]); the test harness turns them into panics.
//! Nothing here prints: saying what happened is the caller's job.
//!
//! Layout:
//! - [`error`]: [`Error`], what can go wrong finding, starting or waiting.
//! - [`bins`]: where the binaries are.
//! - [`child`]: [`Spawn`] and [`ChildProcess`]: one binary as a child with a log file.
//! - [`addr_file`]: waiting for a coordinator's `--addr-file`.
//! - [`procfs`]: `/proc` readings of processes and the host (CPU, memory).
//! - [`in_process`]: coordinator and nodes as libraries in this process.
//! - [`ready`]: waiting until the coordinator lists N ready nodes.

pub mod addr_file;
pub mod bins;
pub mod child;
pub mod error;
pub mod in_process;
pub mod procfs;
pub mod ready;

pub use addr_file::wait_for_addr_file;
pub use bins::{bin_dir, bin_path};
pub use child::{ChildProcess, Spawn};
pub use error::Error;
pub use in_process::{LocalCluster, start_coordinator, start_node};
pub use ready::wait_nodes_ready;
