//! End-to-end scenarios against a real Weft cluster (see `weft_tests`).
//!
//! One test binary with one module per concern, so the suite links once.
//! In-process clusters need nothing else; process-mode and CLI tests need
//! the binaries: run `cargo build --bins` first.

mod addresses;
mod attempt_history;
mod cancel_and_timeout;
mod cli;
mod completions;
mod connections;
mod coordinator_failover;
mod dashboard;
mod demo_json;
mod disk;
mod drain;
mod exec_policy;
mod failover;
mod fencing;
mod field_limits;
mod handlers;
mod http_api;
mod list_filters;
mod local_json;
mod map_json;
mod message_limits;
mod metrics;
mod node_identity;
mod node_join;
mod node_limits;
mod node_protocol;
mod nodes_table;
mod output;
mod policy;
mod postgres;
mod reflection;
mod scale;
mod schedules;
mod scheduling;
mod secrets;
mod shutdown;
mod slots;
mod stream_flood;
mod stuck_nodes;
mod tls;
mod tokens;
mod top;
mod traces;
mod validation;
mod watch_limits;
mod workflows;
