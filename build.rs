//! Compiles `proto/tidings/v1/tidings.proto` with protox (pure Rust, no system `protoc`) and
//! generates the tonic server and client, plus the descriptor set that server reflection serves.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tidings/v1/tidings.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tidings_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // JSON output of `tidings analyze`/`batch` is the protobuf messages themselves.
        .type_attribute(".tidings.v1", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
