//! Compiles `proto/tidings/v1/tidings.proto` with protox (pure Rust, no system `protoc`) and
//! generates the tonic server and client, the serde impls of the canonical proto3 JSON
//! mapping (pbjson), plus the descriptor set that server reflection and the OpenAPI document
//! are made from.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tidings/v1/tidings.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor = fds.encode_to_vec();
    std::fs::write(out.join("tidings_descriptor.bin"), &descriptor)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    // JSON (HTTP, `tidings batch` output) is the proto3 JSON mapping: lowerCamelCase names,
    // enums as names, 64-bit integers as strings. Fields are emitted even when they hold
    // their default value (as grpc-gateway does), so clients need not know the defaults;
    // unknown fields are refused.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor)?
        .emit_fields()
        .build(&[".tidings.v1"])?;
    Ok(())
}
