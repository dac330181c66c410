use clap::Parser;
use sdmesh_core::serve::{bind, Shutdown, ShutdownArgs};
use sdmesh_core::telemetry::TelemetryArgs;
use sdmesh_orchestrator::{run_with_http, OrchestratorOptions};
use std::path::PathBuf;
use std::time::Duration;

/// sdmesh orchestrator: the public Generate API over the text-encoder, unet and vae services.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Diffusers-layout model folder (reads scheduler/scheduler_config.json).
    #[arg(long, env = "SDMESH_MODEL")]
    model: PathBuf,
    /// Address to listen on; port 0 picks a free port (printed as `listening on ADDR`).
    #[arg(long, env = "SDMESH_LISTEN", default_value = "127.0.0.1:50050")]
    listen: String,
    /// Also serve the API as HTTP/JSON on this address (POST /v1/generate, POST
    /// /v1/generate/stream as Server-Sent Events, GET /v1/models; printed as `http api on
    /// ADDR`). Unset: gRPC only.
    #[arg(long, env = "SDMESH_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// text-encoder service: its URL; or its replicas' URLs, comma-separated; or
    /// dns:///NAME:PORT for every address NAME resolves to (e.g. a Kubernetes headless Service).
    /// Calls go to the least busy replica; one that fails rests, and its calls go elsewhere.
    #[arg(long, env = "SDMESH_TEXT_ENCODER_URL", default_value = "http://127.0.0.1:50051")]
    text_encoder_url: String,
    /// unet service (one URL, several, or dns:///NAME:PORT, as --text-encoder-url).
    #[arg(long, env = "SDMESH_UNET_URL", default_value = "http://127.0.0.1:50052")]
    unet_url: String,
    /// vae service (one URL, several, or dns:///NAME:PORT, as --text-encoder-url).
    #[arg(long, env = "SDMESH_VAE_URL", default_value = "http://127.0.0.1:50053")]
    vae_url: String,
    /// depth service (URLs as --text-encoder-url), for depth2img without a caller-supplied depth map (unset: depth2img
    /// needs the request's depth_map).
    #[arg(long, env = "SDMESH_DEPTH_URL")]
    depth_url: Option<String>,
    /// More models to serve besides --model, which requests name (GenerateRequest.model): a
    /// TOML file of [[models]] tables with name, model, unet_url, vae_url and optionally
    /// text_encoder_url (default --text-encoder-url) and depth_url.
    #[arg(long, env = "SDMESH_MODELS_FILE")]
    models_file: Option<PathBuf>,
    #[command(flatten)]
    upscaler: sdmesh_orchestrator::UpscalerArgs,
    #[command(flatten)]
    safety: sdmesh_orchestrator::safety::SafetyArgs,
    #[command(flatten)]
    limits: sdmesh_orchestrator::LimitsArgs,
    /// Seconds to wait at start-up for the model services.
    #[arg(long, env = "SDMESH_STARTUP_TIMEOUT", default_value_t = 300)]
    startup_timeout: u64,
    #[command(flatten)]
    cache: sdmesh_orchestrator::CacheArgs,
    #[command(flatten)]
    api_keys: sdmesh_orchestrator::api_keys::ApiKeysArgs,
    #[command(flatten)]
    shutdown: ShutdownArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let telemetry = sdmesh_core::telemetry::init("sdmesh-orchestrator", &a.telemetry).await?;
    let http = sdmesh_orchestrator::bind_http(a.http_listen.as_deref()).await?;
    let listener = bind(&a.listen).await?;
    let upscaler = a.upscaler.services(&a.text_encoder_url);
    let more_models = match &a.models_file {
        Some(path) => sdmesh_orchestrator::models::read_models_file(path)?,
        None => Vec::new(),
    };
    let opts = OrchestratorOptions {
        model: a.model,
        text_encoder_url: a.text_encoder_url,
        unet_url: a.unet_url,
        vae_url: a.vae_url,
        depth_url: a.depth_url,
        upscaler,
        more_models,
        safety_url: a.safety.safety_url.clone(),
        safety: a.safety.settings()?,
        limits: a.limits.limits(),
        jobs: a.limits.jobs(),
        fleet_quota: a.limits.fleet_quota(),
        startup_timeout: Duration::from_secs(a.startup_timeout),
        embedding_cache_bytes: a.cache.embedding_cache_bytes,
        redis: a.cache.redis_options(),
        api_keys: a.api_keys.api_keys_file,
    };
    let result = run_with_http(opts, listener, http, Shutdown::on_signal(a.shutdown.grace())).await;
    telemetry.shutdown().await;
    result
}
