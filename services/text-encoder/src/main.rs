use clap::Parser;
use sdmesh_text_encoder::{run, TextEncoderOptions};
use std::path::PathBuf;

/// sdmesh text-encoder service: CLIP tokenizer + text transformer over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Diffusers-layout model folder (reads text_encoder/ and tokenizer/).
    #[arg(long, env = "SDMESH_MODEL")]
    model: PathBuf,
    /// Address to listen on (port 0 picks a free port, printed at start-up).
    #[arg(long, env = "SDMESH_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// Device to run on: cpu.
    #[arg(long, env = "SDMESH_DEVICE", default_value = "cpu")]
    device: String,
    /// Requests waiting for the model beyond which new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SDMESH_QUEUE_CAPACITY", default_value_t = 64)]
    queue_capacity: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sdmesh_core::serve::init_logging();
    let args = Args::parse();
    let device = sdmesh_core::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let listener = sdmesh_core::serve::bind(&args.listen).await?;
    let opts = TextEncoderOptions { model: args.model, device, queue_capacity: args.queue_capacity };
    run(opts, listener, sdmesh_core::serve::shutdown_signal()).await
}
