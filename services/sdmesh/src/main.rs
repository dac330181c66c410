//! `sdmesh serve`: the whole mesh in one process (see [`sdmesh::mesh`]); the orchestrator
//! listens on --listen. `sdmesh generate`: one job with the orchestrator and models in this
//! process, no gRPC.

use clap::{Parser, Subcommand};
use sdmesh::mesh::{serve_mesh, MeshOptions};
use sdmesh_core::serve::{bind, Shutdown, ShutdownArgs};
use sdmesh_core::telemetry::TelemetryArgs;
use sdmesh_orchestrator::pipeline::Limits;
use std::path::PathBuf;

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
        /// Device for the models: cpu, or cuda / cuda:N in a build with the `cuda` feature.
        #[arg(long, env = "SDMESH_DEVICE", default_value = "cpu")]
        device: String,
        /// The models' float type: f32, f16 or bf16.
        #[arg(long, env = "SDMESH_DTYPE", default_value = "f32", value_parser = sdmesh_core::parse_dtype)]
        dtype: candle_core::DType,
        /// An x4 upscaler folder (stable-diffusion-x4-upscaler), for --then-upscale.
        #[arg(long, env = "SDMESH_UPSCALER_MODEL")]
        upscaler_model: Option<PathBuf>,
        /// The safety checker (e.g. CompVis/stable-diffusion-safety-checker; default: --model's
        /// safety_checker/, when it has one): flagged images are replaced unless --safety says
        /// otherwise.
        #[arg(long, env = "SDMESH_SAFETY_MODEL")]
        safety_model: Option<PathBuf>,
        #[command(flatten)]
        job: Box<sdmesh::JobArgs>,
    },
    /// Start text-encoder, unet, vae and the orchestrator in this process (and more models'
    /// services, with --also-model).
    Serve {
        /// Diffusers-layout model folder (e.g. a local stabilityai/stable-diffusion-2-1).
        #[arg(long, env = "SDMESH_MODEL")]
        model: PathBuf,
        /// Another model to serve beside --model, as [NAME=]DIR (NAME defaults to the folder's
        /// name; requests pick it with GenerateRequest.model, sdctl --model-name). Each gets its
        /// own unet service (and depth, for a depth checkpoint), and shares the text-encoder
        /// and vae services of an earlier folder with the same files. Repeatable; in the
        /// environment, comma-separated.
        #[arg(long, env = "SDMESH_ALSO_MODELS", value_delimiter = ',', value_parser = sdmesh::mesh::parse_also_model)]
        also_model: Vec<(Option<String>, PathBuf)>,
        /// An x4 upscaler folder (stable-diffusion-x4-upscaler) that jobs can chain after
        /// themselves (GenerateRequest.upscale, sdctl --then-upscale); its services run here
        /// too (its text encoder shared with --model's when the same).
        #[arg(long, env = "SDMESH_UPSCALER_MODEL", value_parser = sdmesh::mesh::parse_model_dir)]
        upscaler_model: Option<PathBuf>,
        /// The safety checker (e.g. CompVis/stable-diffusion-safety-checker, or a pipeline
        /// folder with safety_checker/ and feature_extractor/; default: --model's, when it has
        /// one), as a service here: flagged images are replaced unless a request says otherwise.
        #[arg(long, env = "SDMESH_SAFETY_MODEL")]
        safety_model: Option<PathBuf>,
        /// Address of the public API (the orchestrator).
        #[arg(long, env = "SDMESH_LISTEN", default_value = "127.0.0.1:50050")]
        listen: String,
        /// Also serve the API as HTTP/JSON on this address (POST /v1/generate, POST
        /// /v1/generate/stream as Server-Sent Events, GET /v1/models). Unset: gRPC only.
        #[arg(long, env = "SDMESH_HTTP_LISTEN")]
        http_listen: Option<String>,
        /// Device for the model services: cpu, or cuda / cuda:N in a build with the `cuda` feature.
        #[arg(long, env = "SDMESH_DEVICE", default_value = "cpu")]
        device: String,
        /// The model services' float type: f32, f16 or bf16.
        #[arg(long, env = "SDMESH_DTYPE", default_value = "f32", value_parser = sdmesh_core::parse_dtype)]
        dtype: candle_core::DType,
        #[command(flatten)]
        limits: Box<sdmesh_orchestrator::LimitsArgs>,
        /// Requests waiting for each model beyond which new ones get RESOURCE_EXHAUSTED.
        #[arg(long, env = "SDMESH_QUEUE_CAPACITY", default_value_t = 64)]
        queue_capacity: usize,
        #[command(flatten)]
        batching: sdmesh_unet::BatchingArgs,
        #[command(flatten)]
        cache: Box<sdmesh_orchestrator::CacheArgs>,
        #[command(flatten)]
        api_keys: sdmesh_orchestrator::api_keys::ApiKeysArgs,
        #[command(flatten)]
        shutdown: ShutdownArgs,
        #[command(flatten)]
        telemetry: TelemetryArgs,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate { model, device, dtype, upscaler_model, safety_model, job } => {
            generate(model, device, dtype, upscaler_model, safety_model, *job).await
        }
        Command::Serve {
            model,
            also_model,
            upscaler_model,
            safety_model,
            listen,
            http_listen,
            device,
            dtype,
            limits,
            queue_capacity,
            batching,
            cache,
            api_keys,
            shutdown,
            telemetry,
        } => {
            let device = sdmesh_core::parse_device(&device).map_err(anyhow::Error::msg)?;
            let opts = MeshOptions {
                limits: limits.limits(),
                jobs: limits.jobs(),
                fleet_quota: limits.fleet_quota(),
                queue_capacity,
                embedding_cache_bytes: cache.embedding_cache_bytes,
                redis: cache.redis_options(),
                batching,
                dtype,
                also_models: also_model,
                upscaler_model,
                api_keys: api_keys.api_keys_file,
                safety_model,
                ..MeshOptions::new(model, device)
            };
            serve(opts, listen, http_listen, shutdown, telemetry).await
        }
    }
}

/// `sdmesh serve`: the mesh until SIGTERM/SIGINT, then flush telemetry.
async fn serve(
    opts: MeshOptions,
    listen: String,
    http_listen: Option<String>,
    shutdown: ShutdownArgs,
    telemetry: TelemetryArgs,
) -> anyhow::Result<()> {
    let telemetry = sdmesh_core::telemetry::init("sdmesh", &telemetry).await?;
    let result = async {
        let http = sdmesh_orchestrator::bind_http(http_listen.as_deref()).await?;
        serve_mesh(opts, bind(&listen).await?, http, Shutdown::on_signal(shutdown.grace())).await
    }
    .await;
    telemetry.shutdown().await;
    result
}

/// One job through an in-process orchestrator (the same service code, called directly).
async fn generate(
    model: PathBuf,
    device: String,
    dtype: candle_core::DType,
    upscaler_model: Option<PathBuf>,
    safety_model: Option<PathBuf>,
    job: sdmesh::JobArgs,
) -> anyhow::Result<()> {
    use sdmesh_proto::v1::orchestrator_server::Orchestrator;
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let telemetry = sdmesh_core::telemetry::init("sdmesh", &TelemetryArgs::default()).await?;
    let device = sdmesh_core::parse_device(&device).map_err(anyhow::Error::msg)?;
    let mut pipeline = sdmesh_orchestrator::local_pipeline(&model, &device, dtype, 64, Limits::default()).await?;
    if let Some(upscaler) = upscaler_model {
        let upscaler = sdmesh_orchestrator::local_pipeline(&upscaler, &device, dtype, 64, Limits::default()).await?;
        anyhow::ensure!(upscaler.upscaler.is_some(), "--upscaler-model: not an x4 upscaler checkpoint");
        pipeline.chained_upscaler = Some(std::sync::Arc::new(upscaler));
    }
    if let Some(checker) = sdmesh::mesh::safety_model(&model, safety_model.as_deref()) {
        let opts = sdmesh_safety::SafetyOptions { dtype, ..sdmesh_safety::SafetyOptions::new(checker, device.clone()) };
        pipeline.safety = Some(std::sync::Arc::new(sdmesh_safety::LocalSafety::load(&opts)?));
    }
    let service = sdmesh_orchestrator::server::OrchestratorService::new(pipeline);
    let events = service.generate_stream(job.request()?).await.map_err(sdmesh::status_error)?.into_inner();
    let result = sdmesh::write_results(&job, events).await;
    telemetry.shutdown().await;
    result
}
