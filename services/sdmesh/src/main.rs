//! `sdmesh serve`: the whole mesh in one process. Each model service listens on its own
//! loopback port and the orchestrator reaches them over gRPC, exactly as when they run as
//! separate processes; the orchestrator listens on --listen.

use clap::{Parser, Subcommand};
use sdmesh_core::serve::{bind, Shutdown, ShutdownArgs};
use sdmesh_core::telemetry::TelemetryArgs;
use sdmesh_orchestrator::pipeline::Limits;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(version, about = "Stable Diffusion 2.x as a mesh of gRPC services")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate images in this process: the same orchestrator with the models loaded here and
    /// no gRPC (the baseline the mesh is measured against; handy on one machine).
    Generate {
        /// Diffusers-layout model folder.
        #[arg(long, env = "SDMESH_MODEL")]
        model: PathBuf,
        /// Device for the models: cpu.
        #[arg(long, env = "SDMESH_DEVICE", default_value = "cpu")]
        device: String,
        #[command(flatten)]
        job: sdmesh::JobArgs,
    },
    /// Start text-encoder, unet, vae and the orchestrator in this process.
    Serve {
        /// Diffusers-layout model folder (e.g. a local stabilityai/stable-diffusion-2-1).
        #[arg(long, env = "SDMESH_MODEL")]
        model: PathBuf,
        /// Address of the public API (the orchestrator).
        #[arg(long, env = "SDMESH_LISTEN", default_value = "127.0.0.1:50050")]
        listen: String,
        /// Device for the model services: cpu.
        #[arg(long, env = "SDMESH_DEVICE", default_value = "cpu")]
        device: String,
        /// Largest height or width a request may ask for, in pixels.
        #[arg(long, env = "SDMESH_MAX_SIDE", default_value_t = 2048)]
        max_side: u32,
        /// Most images one request may ask for.
        #[arg(long, env = "SDMESH_MAX_IMAGES", default_value_t = 8)]
        max_images: u32,
        /// Requests waiting for each model beyond which new ones get RESOURCE_EXHAUSTED.
        #[arg(long, env = "SDMESH_QUEUE_CAPACITY", default_value_t = 64)]
        queue_capacity: usize,
        #[command(flatten)]
        cache: sdmesh_orchestrator::CacheArgs,
        #[command(flatten)]
        shutdown: ShutdownArgs,
        #[command(flatten)]
        telemetry: TelemetryArgs,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (model, listen, device, max_side, max_images, queue_capacity, cache, shutdown, telemetry) = match Cli::parse()
        .command
    {
        Command::Generate { model, device, job } => return generate(model, device, job).await,
        Command::Serve { model, listen, device, max_side, max_images, queue_capacity, cache, shutdown, telemetry } => {
            (model, listen, device, max_side, max_images, queue_capacity, cache, shutdown, telemetry)
        }
    };
    let telemetry = sdmesh_core::telemetry::init("sdmesh", &telemetry).await?;
    let result = serve(model, listen, device, Limits { max_side, max_images }, queue_capacity, cache, shutdown).await;
    telemetry.shutdown().await;
    result
}

/// One job through an in-process orchestrator (the same service code, called directly).
async fn generate(model: PathBuf, device: String, job: sdmesh::JobArgs) -> anyhow::Result<()> {
    use sdmesh_proto::v1::orchestrator_server::Orchestrator;
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let telemetry = sdmesh_core::telemetry::init("sdmesh", &TelemetryArgs::default()).await?;
    let device = sdmesh_core::parse_device(&device).map_err(anyhow::Error::msg)?;
    let pipeline = sdmesh_orchestrator::local_pipeline(&model, &device, 64, Limits::default()).await?;
    let service = sdmesh_orchestrator::server::OrchestratorService::new(pipeline);
    let events = service.generate_stream(job.request()?).await.map_err(sdmesh::status_error)?.into_inner();
    let result = sdmesh::write_results(&job, events).await;
    telemetry.shutdown().await;
    result
}

/// Runs the mesh until SIGTERM/SIGINT. The orchestrator drains first (its jobs still need
/// the model services), then the model services stop.
async fn serve(
    model: PathBuf,
    listen: String,
    device: String,
    limits: Limits,
    queue_capacity: usize,
    cache: sdmesh_orchestrator::CacheArgs,
    shutdown: ShutdownArgs,
) -> anyhow::Result<()> {
    let device = sdmesh_core::parse_device(&device).map_err(anyhow::Error::msg)?;
    let grace = shutdown.grace();
    let (orchestrator_done_tx, orchestrator_done) = tokio::sync::watch::channel(false);
    let after_orchestrator = move || {
        let mut done = orchestrator_done.clone();
        Shutdown::new(
            async move {
                let _ = done.wait_for(|d| *d).await;
            },
            grace,
        )
    };
    let loopback = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let (te, unet, vae) = (loopback().await?, loopback().await?, loopback().await?);
    let url = |l: &tokio::net::TcpListener| l.local_addr().map(|a| format!("http://{a}"));
    let opts = sdmesh_orchestrator::OrchestratorOptions {
        model: model.clone(),
        text_encoder_url: url(&te)?,
        unet_url: url(&unet)?,
        vae_url: url(&vae)?,
        limits,
        startup_timeout: Duration::from_secs(600),
        embedding_cache_bytes: cache.embedding_cache_bytes,
        redis: cache.redis_options(),
    };
    tracing::info!(text_encoder = %opts.text_encoder_url, unet = %opts.unet_url, vae = %opts.vae_url, "model services");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(sdmesh_text_encoder::run(
        sdmesh_text_encoder::TextEncoderOptions { model: model.clone(), device: device.clone(), queue_capacity },
        te,
        after_orchestrator(),
    ));
    tasks.spawn(sdmesh_unet::run(
        sdmesh_unet::UnetOptions { queue_capacity, ..sdmesh_unet::UnetOptions::new(model.clone(), device.clone()) },
        unet,
        after_orchestrator(),
    ));
    tasks.spawn(sdmesh_vae::run(
        sdmesh_vae::VaeOptions { model: model.clone(), device, queue_capacity },
        vae,
        after_orchestrator(),
    ));
    let orchestrator = sdmesh_orchestrator::run(opts, bind(&listen).await?, Shutdown::on_signal(grace));
    tasks.spawn(async move {
        let result = orchestrator.await;
        let _ = orchestrator_done_tx.send(true);
        result
    });
    // The first service to fail (e.g. a model that does not load) ends the mesh.
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.map_err(anyhow::Error::from).and_then(|r| r) {
            tracing::error!("{e:#}");
            if result.is_ok() {
                result = Err(e);
            }
            tasks.abort_all();
        }
    }
    result
}
