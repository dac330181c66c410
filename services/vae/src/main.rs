use clap::Parser;
use sdmesh_core::serve::{model_service_main, ServiceArgs};
use sdmesh_vae::{run, VaeOptions};

/// sdmesh vae service: decodes latents to images over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = |model, device, queue_capacity| VaeOptions { model, device, queue_capacity };
    model_service_main("sdmesh-vae", "127.0.0.1:50053", Args::parse().service, options, run).await
}
