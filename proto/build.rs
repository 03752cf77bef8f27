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
    Ok(())
}
