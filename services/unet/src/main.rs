use clap::Parser;
use sdmesh_core::serve::{model_service_main, ServiceArgs};
use sdmesh_unet::{run, BatchingArgs, UnetOptions};

/// sdmesh unet service: guided denoising steps over gRPC, concurrent jobs' steps batched.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    batching: BatchingArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { service, batching } = Args::parse();
    let options = |model, device, dtype, queue_capacity| {
        batching.apply(UnetOptions { dtype, queue_capacity, ..UnetOptions::new(model, device) })
    };
    model_service_main("sdmesh-unet", "127.0.0.1:50052", service, options, run).await
}
