use clap::Parser;
use sdmesh_core::serve::{model_service_main, ServiceArgs};
use sdmesh_safety::{run, SafetyOptions};

/// sdmesh safety service: the Stable Diffusion safety checker over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = |model, device, dtype, queue_capacity| SafetyOptions { model, device, dtype, queue_capacity };
    model_service_main("sdmesh-safety", "127.0.0.1:50055", Args::parse().service, options, run).await
}
