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
//! - [`spec`]: the validated domain `TaskSpec` and its builders (and, in
//!   `spec_wire`, its wire bytes written from a borrow).
//! - [`policy`]: scheduling policy: priorities, fair keys, concurrency
//!   keys, rate limits, resources, dependencies, named limits.
//! - [`exec_policy`]: `ExecPolicy`, which exec tasks a node runs.
//! - [`tls`]: client-side TLS (trust by CA file or pin; a node's own
//!   certificate, [`tls::ClientIdentity`]).
//! - [`trace`]: `TraceContext`, the W3C trace context a task runs under.
//! - [`state`]: `TaskState`, `Outcome`, `OutputStream`, `NodeState` enums.
//! - [`convert`]: `ConversionError` and time/duration helpers.
//! - [`wire`]: a codec for messages encoded before they reach gRPC (a
//!   client's `Submit`, the coordinator's `Assign`s written from borrows).

pub mod address;
pub mod convert;
pub mod exec_policy;
pub mod ids;
pub mod join;
pub mod limits;
pub mod node;
pub mod policy;
pub mod spec;
mod spec_wire;
pub mod state;
pub mod tls;
pub mod trace;
pub mod wire;

/// The encoded `FileDescriptorSet` of `weft.v1` (and what it imports), for
/// gRPC server reflection: tools like `grpcurl` list and call the API
/// without the `.proto` files.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weft_descriptor.bin"));

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
pub use policy::{
    ConcurrencyLimit, Dependency, DependencyRule, Limit, LimitKind, OverLimit, RateLimit,
    RateLimitUse, Resources,
};
pub use spec::{CallSpec, ExecSpec, SecretEnv, TaskKind, TaskSpec};
pub use spec_wire::SpecFields;
pub use state::{NodeState, Outcome, OutputStream, TASK_STATES, TaskState};
pub use trace::TraceContext;

/// Protocol version spoken by this build (`Register.protocol_version`).
pub const PROTOCOL_VERSION: pb::ProtocolVersion = pb::ProtocolVersion::ProtocolVersion1;

#[cfg(test)]
mod tests {
    use prost::Message;

    /// The coordinator builds its reflection service from this set and
    /// relies on it decoding (an `expect` in `server.rs`).
    #[test]
    fn the_descriptor_set_decodes_and_holds_every_service_and_its_imports() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let names: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
        for name in [
            "weft/v1/common.proto",
            "weft/v1/node.proto",
            "weft/v1/task.proto",
            "weft/v1/admin.proto",
            "weft/v1/schedule.proto",
            "google/protobuf/timestamp.proto",
            "google/protobuf/duration.proto",
        ] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
    }
}
