use clap::Parser;
use sdmesh_core::serve::{model_service_main, ServiceArgs};
use sdmesh_unet::{run, UnetOptions};
use std::time::Duration;

/// sdmesh unet service: guided denoising steps over gRPC, concurrent jobs' steps batched.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    /// Most rows (images; two per image under guidance) in one forward pass over the steps of
    /// concurrent jobs.
    #[arg(long, env = "SDMESH_MAX_BATCH_ROWS", default_value_t = 16)]
    max_batch_rows: usize,
    /// Milliseconds a step may wait for others to share its forward pass (0: never waits;
    /// steps that queued while the model was busy still run together).
    #[arg(long, env = "SDMESH_BATCH_MAX_WAIT_MS", default_value_t = 0)]
    batch_max_wait_ms: u64,
    /// Bytes of conditioning tensors (jobs' prompt embeddings) kept by digest, so each job
    /// sends them once. SD 2.x: 308 KiB per prompt.
    #[arg(long, env = "SDMESH_CONDITIONING_CACHE_BYTES", default_value_t = 256 << 20)]
    conditioning_cache_bytes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { service, max_batch_rows, batch_max_wait_ms, conditioning_cache_bytes } = Args::parse();
    let options = |model, device, queue_capacity| UnetOptions {
        model,
        device,
        queue_capacity,
        max_batch_rows,
        batch_max_wait: Duration::from_millis(batch_max_wait_ms),
        conditioning_cache_bytes,
    };
    model_service_main("sdmesh-unet", "127.0.0.1:50052", service, options, run).await
}
