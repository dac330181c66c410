use clap::Parser;
use sdmesh_core::serve::{model_service_main, ServiceArgs};
use sdmesh_unet::{run, UnetOptions};

/// sdmesh unet service: one guided denoising step per request over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = |model, device, queue_capacity| UnetOptions { model, device, queue_capacity };
    model_service_main("sdmesh-unet", "127.0.0.1:50052", Args::parse().service, options, run).await
}
