use clap::Parser;
use sdmesh_core::serve::{model_service_main, ServiceArgs};
use sdmesh_text_encoder::{run, TextEncoderOptions};

/// sdmesh text-encoder service: CLIP tokenizer + text transformer over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = |model, device, dtype, queue_capacity| TextEncoderOptions { model, device, dtype, queue_capacity };
    model_service_main("sdmesh-text-encoder", "127.0.0.1:50051", Args::parse().service, options, run).await
}
