use clap::Parser;
use sdmesh_core::serve::{model_service_main, ServiceArgs};
use sdmesh_depth::{run, DepthOptions};

/// sdmesh depth service: relative depth maps (MiDaS DPT-hybrid) over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = |model, device, dtype, queue_capacity| DepthOptions { model, device, dtype, queue_capacity };
    model_service_main("sdmesh-depth", "127.0.0.1:50054", Args::parse().service, options, run).await
}
