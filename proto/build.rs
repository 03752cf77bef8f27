//! Compiles `weft/v1/*.proto` with protox (pure Rust), so no system `protoc`
//! is needed to build Weft, and keeps the encoded descriptor set for gRPC
//! server reflection (`weft_proto::FILE_DESCRIPTOR_SET`).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "weft/v1/common.proto",
        "weft/v1/node.proto",
        "weft/v1/task.proto",
        "weft/v1/admin.proto",
        "weft/v1/schedule.proto",
    ];
    println!("cargo:rerun-if-changed=weft");
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("weft_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".")
        // Maps as BTreeMap: no hasher to seed or hash with per message (a
        // task's labels, env and resources are a few entries), and a
        // message encodes the same way every time.
        .btree_map(".")
        // `NodeService.Connect` would clash with the generated `connect`
        // constructor; clients build their `Channel` explicitly instead.
        .build_transport(false)
        // Its Debug is written by hand (spec.rs) so that `secret_env` values
        // never reach a log through a stray `{:?}`.
        .skip_debug(["weft.v1.TaskSpec"])
        .compile_fds(fds)?;
    encoded_node_service();
    Ok(())
}

/// `weft.v1.NodeService` once more, for the coordinator: the same routes
/// and messages, but `Connect`'s outgoing messages are their wire bytes
/// (`crate::wire::ConnectCodec`), so `Assign`s are written straight from
/// the coordinator's own values. Clients and nodes use the generated
/// service above.
fn encoded_node_service() {
    use tonic_build::manual::{Builder, Method, Service};
    let connect = Method::builder()
        .name("connect")
        .route_name("Connect")
        .input_type("crate::pb::NodeMessage")
        .output_type("bytes::Bytes")
        .codec_path("crate::wire::ConnectCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let join = Method::builder()
        .name("join")
        .route_name("Join")
        .input_type("crate::pb::JoinRequest")
        .output_type("crate::pb::JoinResponse")
        .codec_path("tonic_prost::ProstCodec")
        .build();
    let service = Service::builder()
        .name("NodeService")
        .package("weft.v1")
        .method(connect)
        .method(join)
        .build();
    Builder::new()
        .build_client(false)
        .build_transport(false)
        .compile(&[service]);
}
