//! Fault scenarios on real hosts: the real `weft-coordinator` and
//! `weft-node` binaries on separate network namespaces built by
//! `netns-lab.sh` (`../shared/netns-lab.sh` beside the workspace, or
//! `WEFT_NETNS_LAB`), with crashes, partitions and frozen processes.
//!
//! Needs root and `cargo build --bins` first; where it is not root or the
//! lab cannot be built, each scenario prints `skipped: ...` on stderr and
//! passes. Each scenario prints its figures as one `fault-figures:` line
//! on stderr and asserts them:
//!
//! ```text
//! cargo build --bins && cargo test -p weft-tests --test faults -- --nocapture
//! ```
//!
//! Layout:
//! - [`lab`]: the lab hosts, the lab lock, running a scenario inside `fab-h5`.
//! - [`hosts`]: `LabCluster` (coordinator on h1, nodes on h2..h4), marker
//!   tasks that count their executions, event-history checks.
//! - [`isolation`]: the shared partition / pause scenario.
//! - [`node_kill`]: SIGKILL one of three nodes with 2,000 tasks in flight.
//! - [`coordinator_crash`]: SIGKILL and restart the coordinator five times
//!   during a 5,000-task run.
//! - [`ha`]: `HaCluster` (PostgreSQL on h6, coordinators on h1, h7 and
//!   h8, one active and two standbys; nodes on h2..h4 given all three).
//! - [`coordinator_failover`]: the active coordinator killed three times
//!   during a 5,000-task run, cut off from the database, and killed during
//!   a cron schedule.
//! - [`partition`]: one node cut off for 3 × the lease, then healed.
//! - [`pause`]: one node SIGSTOPped past the lease, then SIGCONT.

mod coordinator_crash;
mod coordinator_failover;
mod ha;
mod hosts;
mod isolation;
mod lab;
mod node_kill;
mod partition;
mod pause;
