use clap::Parser;
use sdmesh_core::serve::{init_logging, shutdown_signal, ServiceArgs};
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
    init_logging();
    let Args { service } = Args::parse();
    let device = service.device().map_err(anyhow::Error::msg)?;
    let listener = service.bind("127.0.0.1:50053").await?;
    let opts = VaeOptions { model: service.model, device, queue_capacity: service.queue_capacity };
    run(opts, listener, shutdown_signal()).await
}
