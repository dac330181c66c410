use clap::Parser;
use sdmesh_core::serve::{model_service_main, ServiceArgs};
use sdmesh_vae::{run, DecodeArgs, VaeOptions};

/// sdmesh vae service: latents to images (decode) and images to latents (encode) over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    decode: DecodeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { service, decode } = Args::parse();
    let options = |model, device, dtype, queue_capacity| VaeOptions {
        dtype,
        queue_capacity,
        decode_tile_latents: decode.decode_tile_latents,
        ..VaeOptions::new(model, device)
    };
    model_service_main("sdmesh-vae", "127.0.0.1:50053", service, options, run).await
}
