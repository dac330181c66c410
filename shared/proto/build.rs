//! Compiles proto/ with protox (pure Rust, no system protoc) into OUT_DIR, keeps the file
//! descriptor set for gRPC reflection, and generates the messages' JSON mapping (pbjson).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["sd/v1/tensor.proto", "sd/v1/models.proto", "sd/v1/orchestrator.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("sd_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    // Tensor and image bytes as `Bytes`: decoding slices the received buffer instead of copying it.
    tonic_prost_build::configure()
        .bytes(".sd.v1.Tensor.data")
        .bytes(".sd.v1.GenerateRequest.image")
        .bytes(".sd.v1.GenerateRequest.mask")
        .bytes(".sd.v1.EstimateDepthRequest.images")
        .compile_fds(fds.clone())?;
    // serde for every message in the protobuf JSON mapping (what grpcurl speaks): the
    // orchestrator's HTTP/JSON API.
    pbjson_build::Builder::new().register_descriptors(&prost::Message::encode_to_vec(&fds))?.build(&[".sd.v1"])?;
    Ok(())
}
