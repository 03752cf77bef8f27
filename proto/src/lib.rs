//! The `weft.v1` protocol shared by the coordinator, nodes and clients.
//!
//! The `.proto` files under `weft/v1/` are the contract; this crate compiles
//! them (with protox, no system `protoc`) and adds the domain types every
//! other crate works with, so nobody unwraps an `Option` that proto3 forced
//! on a field.
//!
//! Layout:
//! - [`pb`]: the generated messages, clients and servers. Only here.
//! - [`address`]: `CoordinatorAddr`, the one parser of coordinator
//!   addresses (`HOST:PORT` or `http(s)://HOST:PORT`).
//! - [`ids`]: `TaskId`, `NodeId`, `Attempt` newtypes.
//! - [`join`]: `JoinToken`, the one string a new node joins with.
//! - [`limits`]: message sizes and field limits (`SpecLimits`), shared
//!   by the coordinator, nodes and clients.
//! - [`node`]: `NodeInfo`, a node as the admin API shows it.
//! - [`spec`]: the validated domain `TaskSpec` and its builders.
//! - [`exec_policy`]: `ExecPolicy`, which exec tasks a node runs.
//! - [`tls`]: client-side TLS (trust by CA file or pin; a node's own
//!   certificate, [`tls::ClientIdentity`]).
//! - [`state`]: `TaskState`, `Outcome`, `OutputStream`, `NodeState` enums.
//! - [`convert`]: `ConversionError` and time/duration helpers.

pub mod address;
pub mod convert;
pub mod exec_policy;
pub mod ids;
pub mod join;
pub mod limits;
pub mod node;
pub mod spec;
pub mod state;
pub mod tls;

/// Generated code for package `weft.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("weft.v1");
}

pub use address::{AddressError, CoordinatorAddr};
pub use convert::ConversionError;
pub use exec_policy::ExecPolicy;
pub use ids::{Attempt, NodeId, TaskId};
pub use join::{JoinToken, JoinTokenError};
pub use node::NodeInfo;
pub use spec::{CallSpec, ExecSpec, SecretEnv, TaskKind, TaskSpec};
pub use state::{NodeState, Outcome, OutputStream, TaskState};

/// Protocol version spoken by this build (`Register.protocol_version`).
pub const PROTOCOL_VERSION: pb::ProtocolVersion = pb::ProtocolVersion::ProtocolVersion1;
