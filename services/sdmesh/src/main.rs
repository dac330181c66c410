//! `sdmesh serve`: the whole mesh in one process. Each model service listens on its own
//! loopback port and the orchestrator reaches them over gRPC, exactly as when they run as
//! separate processes; the orchestrator listens on --listen.

use clap::{Parser, Subcommand};
use sdmesh_core::serve::{bind, init_logging, shutdown_signal};
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
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let Command::Serve { model, listen, device, max_side, max_images } = Cli::parse().command;
    let device = sdmesh_core::parse_device(&device).map_err(anyhow::Error::msg)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let queue_capacity = 64;
    let loopback = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let (te, unet, vae) = (loopback().await?, loopback().await?, loopback().await?);
    let url = |l: &tokio::net::TcpListener| l.local_addr().map(|a| format!("http://{a}"));
    let opts = sdmesh_orchestrator::OrchestratorOptions {
        model: model.clone(),
        text_encoder_url: url(&te)?,
        unet_url: url(&unet)?,
        vae_url: url(&vae)?,
        limits: Limits { max_side, max_images },
        startup_timeout: Duration::from_secs(600),
        embedding_cache_bytes: 256 << 20,
    };
    tracing::info!(text_encoder = %opts.text_encoder_url, unet = %opts.unet_url, vae = %opts.vae_url, "model services");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(sdmesh_text_encoder::run(
        sdmesh_text_encoder::TextEncoderOptions { model: model.clone(), device: device.clone(), queue_capacity },
        te,
        stopped(),
    ));
    tasks.spawn(sdmesh_unet::run(
        sdmesh_unet::UnetOptions { model: model.clone(), device: device.clone(), queue_capacity },
        unet,
        stopped(),
    ));
    tasks.spawn(sdmesh_vae::run(
        sdmesh_vae::VaeOptions { model: model.clone(), device, queue_capacity },
        vae,
        stopped(),
    ));
    tasks.spawn(sdmesh_orchestrator::run(opts, bind(&listen).await?, stopped()));
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // The first service to end (a failed model load, or shutdown) ends the mesh.
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
