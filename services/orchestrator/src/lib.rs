//! orchestrator: the public API. It owns each job — validation, prompt embeddings, initial
//! noise, the scheduler loop, decoding, PNG encoding — and calls the model services (or local
//! models: the components are traits) for the heavy work. It needs no GPU.

pub mod admission;
pub mod api_keys;
pub mod embedding_cache;
pub mod fleet_quota;
pub mod http_api;
pub mod image_job;
pub mod image_out;
pub mod models;
pub mod noise;
pub mod openapi;
pub mod pipeline;
pub mod preview;
pub mod redis_link;
pub mod redis_store;
pub mod safety;
pub mod scheduler;
pub mod server;
pub use sdmesh_core::torch_rng;
pub mod upscale;
pub mod usage;

use pipeline::{Limits, Pipeline};
use sdmesh_core::model_dir::{ComponentDir, ModelDirError};
use sdmesh_core::serve::{serve, Health, ServingStatus};
use sdmesh_core::{Denoiser, TextEncoder, Vae};
use sdmesh_proto::v1;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// scheduler/scheduler_config.json of a diffusers model folder.
pub fn load_scheduler_config(model: &Path) -> Result<scheduler::SchedulerConfig, ModelDirError> {
    let dir = ComponentDir::open(model, "scheduler")?;
    let path = dir.file("scheduler_config.json")?;
    let json: serde_json::Value = dir.json("scheduler_config.json")?;
    scheduler::SchedulerConfig::from_json(&json).map_err(|message| ModelDirError::Malformed { path, message })
}

/// The model's display name: its folder name.
pub fn model_name(model: &Path) -> String {
    model
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .or_else(|| model.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| model.display().to_string())
}

#[derive(Debug, Clone)]
pub struct OrchestratorOptions {
    /// Diffusers-layout model folder (the orchestrator reads scheduler/ only).
    pub model: PathBuf,
    pub text_encoder_url: String,
    pub unet_url: String,
    pub vae_url: String,
    /// The depth service, for depth2img without a caller-supplied depth map.
    pub depth_url: Option<String>,
    /// An x4 upscaler that jobs can chain after themselves (GenerateRequest.upscale).
    pub upscaler: Option<UpscalerServices>,
    /// Models served besides `model`, which requests name (GenerateRequest.model).
    pub more_models: Vec<models::ModelServices>,
    /// The safety-checker service, and what to do with flagged images.
    pub safety_url: Option<String>,
    pub safety: safety::SafetySettings,
    pub limits: Limits,
    /// How many jobs run and wait, and per tenant.
    pub jobs: admission::JobLimits,
    /// Each tenant's bound across every orchestrator sharing `redis` (which it needs).
    pub fleet_quota: Option<fleet_quota::QuotaOptions>,
    /// How long to wait at start-up for the model services to report their info.
    pub startup_timeout: Duration,
    /// Bytes of prompt embeddings kept in the in-process cache (0 turns it off); unused with Redis.
    pub embedding_cache_bytes: usize,
    /// Keep prompt embeddings in Redis instead of in this process.
    pub redis: Option<redis_store::RedisOptions>,
    /// The API keys file: every call needs a key it lists (see [`api_keys`]).
    pub api_keys: Option<PathBuf>,
}

/// The chained upscaler: its model folder (the orchestrator reads scheduler/,
/// low_res_scheduler/ and model_index.json) and its services.
#[derive(Debug, Clone)]
pub struct UpscalerServices {
    pub model: PathBuf,
    pub text_encoder_url: String,
    pub unet_url: String,
    pub vae_url: String,
}

/// Flags of the chained upscaler.
#[derive(clap::Args, Debug, Clone)]
pub struct UpscalerArgs {
    /// An x4 upscaler (stable-diffusion-x4-upscaler) folder: jobs may then ask to be upscaled
    /// x4 after they run (GenerateRequest.upscale). Needs --upscaler-unet-url and --upscaler-vae-url.
    #[arg(long, env = "SDMESH_UPSCALER_MODEL", requires_all = ["upscaler_unet_url", "upscaler_vae_url"])]
    pub upscaler_model: Option<PathBuf>,
    /// The upscaler's unet service (URLs as --text-encoder-url).
    #[arg(long, env = "SDMESH_UPSCALER_UNET_URL")]
    pub upscaler_unet_url: Option<String>,
    /// The upscaler's vae service (URLs as --text-encoder-url).
    #[arg(long, env = "SDMESH_UPSCALER_VAE_URL")]
    pub upscaler_vae_url: Option<String>,
    /// The upscaler's text-encoder service (unset = --text-encoder-url: SD 2.x and the x4
    /// upscaler use the same OpenCLIP ViT-H text encoder).
    #[arg(long, env = "SDMESH_UPSCALER_TEXT_ENCODER_URL")]
    pub upscaler_text_encoder_url: Option<String>,
}

impl UpscalerArgs {
    pub fn services(&self, text_encoder_url: &str) -> Option<UpscalerServices> {
        Some(UpscalerServices {
            model: self.upscaler_model.clone()?,
            text_encoder_url: self.upscaler_text_encoder_url.clone().unwrap_or_else(|| text_encoder_url.to_string()),
            unet_url: self.upscaler_unet_url.clone()?,
            vae_url: self.upscaler_vae_url.clone()?,
        })
    }
}

/// Where prompt embeddings are cached.
#[derive(clap::Args, Debug)]
pub struct CacheArgs {
    /// Bytes of prompt embeddings cached in this process when no Redis is set (0 = no cache).
    /// SD 2.x: 308 KiB each.
    #[arg(long, env = "SDMESH_EMBEDDING_CACHE_BYTES", default_value_t = 256 << 20)]
    pub embedding_cache_bytes: usize,
    /// Cache prompt embeddings in Redis, shared by every orchestrator using it:
    /// redis://[user:password@]host:port/db. Its memory bound is Redis' maxmemory (use an
    /// allkeys-lru policy).
    #[arg(long, env = "SDMESH_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Milliseconds any Redis operation may take before the job goes on without the cache.
    #[arg(long, env = "SDMESH_REDIS_TIMEOUT_MS", default_value_t = 250)]
    pub redis_timeout_ms: u64,
    /// Seconds a cached embedding lives in Redis (0 = until Redis evicts it).
    #[arg(long, env = "SDMESH_EMBEDDING_CACHE_TTL", default_value_t = 7 * 24 * 3600)]
    pub embedding_cache_ttl: u64,
    /// Seconds between reconnection attempts while Redis is unreachable.
    #[arg(long, env = "SDMESH_REDIS_RETRY_INTERVAL", default_value_t = 1.0)]
    pub redis_retry_interval: f64,
}

impl CacheArgs {
    /// The Redis store's settings, when --redis-url is set.
    pub fn redis_options(&self) -> Option<redis_store::RedisOptions> {
        Some(redis_store::RedisOptions {
            url: self.redis_url.clone()?,
            timeout: Duration::from_millis(self.redis_timeout_ms),
            ttl: (self.embedding_cache_ttl > 0).then(|| Duration::from_secs(self.embedding_cache_ttl)),
            retry_interval: Duration::from_secs_f64(self.redis_retry_interval.max(0.0)),
        })
    }
}

/// How big a request may be.
#[derive(clap::Args, Debug, Clone)]
pub struct LimitsArgs {
    /// Largest height or width a request may ask for, in pixels.
    #[arg(long, env = "SDMESH_MAX_SIDE", default_value_t = 2048)]
    pub max_side: u32,
    /// Most images one request may ask for.
    #[arg(long, env = "SDMESH_MAX_IMAGES", default_value_t = 8)]
    pub max_images: u32,
    /// Upscaling: the largest latent side (= low-resolution pixels) one UNet call gets; larger
    /// inputs are denoised in overlapping tiles of this size, blended. Bounds the UNet's memory.
    #[arg(long, env = "SDMESH_UPSCALE_TILE_LATENTS", default_value_t = upscale::DEFAULT_TILE_LATENTS)]
    pub upscale_tile_latents: usize,
    /// Jobs of a model that run at once; more wait for a place (a freed place goes to the job
    /// of the highest x-sdmesh-priority, then to the tenant running the fewest jobs).
    #[arg(long, env = "SDMESH_MAX_JOBS", default_value_t = admission::JobLimits::default().max_running)]
    pub max_jobs: usize,
    /// Jobs of a model that may wait for a place. When the line is full, a new job is refused
    /// with RESOURCE_EXHAUSTED and a retry hint, unless a job of lower priority waits, or
    /// another tenant has at least two more jobs of its priority waiting than the new job's:
    /// then that job, or that tenant's latest, is refused instead.
    #[arg(long, env = "SDMESH_MAX_WAITING_JOBS", default_value_t = admission::JobLimits::default().max_waiting)]
    pub max_waiting_jobs: usize,
    /// Jobs of a model one tenant (x-sdmesh-tenant metadata) may run at once (0 = up to
    /// --max-jobs).
    #[arg(long, env = "SDMESH_MAX_JOBS_PER_TENANT", default_value_t = 0)]
    pub max_jobs_per_tenant: usize,
    /// Jobs one tenant may have running or waiting across every orchestrator that shares
    /// --redis-url (0 = no such bound). Beyond it a job is refused at once with
    /// RESOURCE_EXHAUSTED and a retry hint.
    #[arg(long, env = "SDMESH_FLEET_MAX_JOBS_PER_TENANT", default_value_t = 0)]
    pub fleet_max_jobs_per_tenant: usize,
    /// Seconds a job's lease in the fleet-wide quota lives unless renewed (every third of it):
    /// how long the jobs of an orchestrator that died still count.
    #[arg(long, env = "SDMESH_FLEET_QUOTA_LEASE", default_value_t = 30.0)]
    pub fleet_quota_lease: f64,
    /// While Redis is out of reach: admit jobs without the fleet-wide quota, or refuse them with
    /// UNAVAILABLE.
    #[arg(long, env = "SDMESH_FLEET_QUOTA_ON_REDIS_ERROR", value_enum, default_value_t = fleet_quota::OnRedisError::Admit)]
    pub fleet_quota_on_redis_error: fleet_quota::OnRedisError,
}

impl LimitsArgs {
    pub fn limits(&self) -> Limits {
        Limits { max_side: self.max_side, max_images: self.max_images, upscale_tile_latents: self.upscale_tile_latents }
    }

    pub fn jobs(&self) -> admission::JobLimits {
        admission::JobLimits {
            max_running: self.max_jobs,
            max_waiting: self.max_waiting_jobs,
            max_running_per_tenant: self.max_jobs_per_tenant,
        }
    }

    /// The fleet-wide tenant quota, when --fleet-max-jobs-per-tenant is set.
    pub fn fleet_quota(&self) -> Option<fleet_quota::QuotaOptions> {
        (self.fleet_max_jobs_per_tenant > 0).then(|| fleet_quota::QuotaOptions {
            max_jobs_per_tenant: self.fleet_max_jobs_per_tenant,
            lease: Duration::from_secs_f64(self.fleet_quota_lease.clamp(0.1, 3600.0)),
            on_redis_error: self.fleet_quota_on_redis_error,
        })
    }
}

/// Puts a prompt-embedding cache in front of the pipeline's text encoder.
pub fn with_embedding_cache(mut pipeline: Pipeline, store: Arc<dyn embedding_cache::EmbeddingStore>) -> Pipeline {
    pipeline.text_encoder = Arc::new(embedding_cache::CachedTextEncoder::new(pipeline.text_encoder.clone(), store));
    pipeline
}

/// The whole pipeline in this process: local text encoder, UNet and VAE, no gRPC.
pub async fn local_pipeline(
    model: &Path,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    queue_capacity: usize,
    limits: Limits,
) -> anyhow::Result<Pipeline> {
    let (dir, dev) = (model.to_path_buf(), device.clone());
    let text_encoder = tokio::task::spawn_blocking(move || {
        sdmesh_text_encoder::LocalTextEncoder::load(&sdmesh_text_encoder::TextEncoderOptions {
            dtype,
            queue_capacity,
            ..sdmesh_text_encoder::TextEncoderOptions::new(dir, dev)
        })
    });
    let (dir, dev) = (model.to_path_buf(), device.clone());
    let unet = tokio::task::spawn_blocking(move || {
        sdmesh_unet::LocalUnet::load(&sdmesh_unet::UnetOptions {
            dtype,
            queue_capacity,
            ..sdmesh_unet::UnetOptions::new(dir, dev)
        })
    });
    let (dir, dev) = (model.to_path_buf(), device.clone());
    let vae = tokio::task::spawn_blocking(move || {
        sdmesh_vae::LocalVae::load(&sdmesh_vae::VaeOptions {
            dtype,
            queue_capacity,
            ..sdmesh_vae::VaeOptions::new(dir, dev)
        })
    });
    // A depth checkpoint's folder has the depth estimator too.
    let depth = if has_depth_estimator(model) {
        let (dir, dev) = (model.to_path_buf(), device.clone());
        let depth = tokio::task::spawn_blocking(move || {
            sdmesh_depth::LocalDepth::load(&sdmesh_depth::DepthOptions {
                dtype,
                queue_capacity,
                ..sdmesh_depth::DepthOptions::new(dir, dev)
            })
        });
        Some(depth.await??)
    } else {
        None
    };
    let (text_encoder, unet, vae) = (text_encoder.await??, unet.await??, vae.await??);
    let mut pipeline =
        pipeline_over(model, Arc::new(text_encoder), Arc::new(unet), Arc::new(vae), limits, Duration::from_secs(1))
            .await?;
    pipeline.depth = depth.map(|d| Arc::new(d) as Arc<dyn sdmesh_core::DepthEstimator>);
    // A folder with the safety checker gets it (flagged images replaced unless a request says).
    if model.join("safety_checker").is_dir() {
        let (dir, dev) = (model.to_path_buf(), device.clone());
        let safety = tokio::task::spawn_blocking(move || {
            sdmesh_safety::LocalSafety::load(&sdmesh_safety::SafetyOptions {
                dtype,
                queue_capacity,
                ..sdmesh_safety::SafetyOptions::new(dir, dev)
            })
        })
        .await??;
        pipeline.safety = Some(Arc::new(safety));
    }
    Ok(pipeline)
}

/// Whether a diffusers model folder has a depth estimator (stable-diffusion-2-depth's
/// depth_estimator/).
pub fn has_depth_estimator(model: &Path) -> bool {
    model.join("depth_estimator").join("config.json").is_file()
}

/// Builds a pipeline over given components, asking each for its info; retries UNAVAILABLE
/// (services still loading) until `timeout`.
pub async fn pipeline_over(
    model: &Path,
    text_encoder: Arc<dyn TextEncoder>,
    denoiser: Arc<dyn Denoiser>,
    vae: Arc<dyn Vae>,
    limits: Limits,
    timeout: Duration,
) -> anyhow::Result<Pipeline> {
    let scheduler_config = load_scheduler_config(model)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let info = loop {
        match Pipeline::model_info(text_encoder.as_ref(), denoiser.as_ref(), vae.as_ref()).await {
            Ok(info) => break info,
            Err(e) if e.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tracing::debug!("waiting for model services: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => anyhow::bail!("model services did not come up: {e}"),
        }
    };
    pipeline::check_unet_fits(&info.unet, &info.unet, &scheduler_config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", model.display()))?;
    let upscaler = upscale::Upscaler::load(model)?;
    Ok(Pipeline {
        text_encoder,
        denoiser,
        vae,
        depth: None,
        upscaler,
        chained_upscaler: None,
        safety: None,
        safety_settings: Default::default(),
        scheduler_config,
        info,
        limits,
        model_name: model_name(model),
    })
}

/// Binds the HTTP/JSON API's address, when one is given, and prints `http api on ADDR` on
/// stdout (before `listening on`, which callers read last).
pub async fn bind_http(addr: Option<&str>) -> std::io::Result<Option<TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = TcpListener::bind(addr).await?;
    println!("http api on {}", listener.local_addr()?);
    Ok(Some(listener))
}

/// Serves the public API on `listener` until `shutdown`; NOT_SERVING (and UNAVAILABLE to
/// calls) until every model service has answered.
pub async fn run(
    opts: OrchestratorOptions,
    listener: TcpListener,
    shutdown: sdmesh_core::serve::Shutdown,
) -> anyhow::Result<()> {
    run_with_http(opts, listener, None, shutdown).await
}

/// [`run`], and the HTTP/JSON API ([`http_api`]) on `http` when given; it stops taking new
/// requests when the gRPC server starts draining, and its running jobs end as the gRPC ones do.
pub async fn run_with_http(
    opts: OrchestratorOptions,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: sdmesh_core::serve::Shutdown,
) -> anyhow::Result<()> {
    // The `--model` one (the default) and the others, each with its services.
    let default_model = models::ModelServices {
        name: None,
        model: opts.model.clone(),
        text_encoder_url: None,
        unet_url: opts.unet_url.clone(),
        vae_url: opts.vae_url.clone(),
        depth_url: opts.depth_url.clone(),
        max_jobs: None,
        max_waiting_jobs: None,
        max_jobs_per_tenant: None,
    };
    let all_models: Vec<_> = std::iter::once(default_model).chain(opts.more_models.iter().cloned()).collect();
    models::check_names(&all_models)?;
    let fleet_quota = match (&opts.fleet_quota, &opts.redis) {
        (None, _) => None,
        (Some(quota), Some(redis)) => {
            tracing::info!(max_jobs_per_tenant = quota.max_jobs_per_tenant, lease = ?quota.lease, "fleet-wide tenant quota in redis");
            Some(fleet_quota::FleetQuota::new(redis.clone(), quota.clone())?)
        }
        (Some(_), None) => anyhow::bail!("--fleet-max-jobs-per-tenant needs --redis-url (the orchestrators share it)"),
    };
    let health = Health::new(&[v1::orchestrator_server::SERVICE_NAME]).await;
    let api_keys = opts.api_keys.as_deref().map(api_keys::ApiKeys::load).transpose()?.map(Arc::new);
    if fleet_quota.is_none() && api_keys.as_ref().is_some_and(|keys| keys.any_fleet_bound()) {
        tracing::warn!("API keys carry fleet_max_jobs, which holds only with --fleet-max-jobs-per-tenant (and Redis)");
    }
    let service = server::OrchestratorService::served(health.clone(), fleet_quota, api_keys);
    let routes = health.routes().add_service(
        v1::orchestrator_server::OrchestratorServer::new(service.clone())
            .max_decoding_message_size(opts.limits.max_request_bytes())
            .max_encoding_message_size(opts.limits.max_response_bytes()),
    );
    let server = tokio::spawn(serve(listener, routes, health.clone(), shutdown));
    let http_server = http.map(|http| {
        let router = http_api::router(service.clone(), opts.limits.max_request_bytes() / 3 * 4 + (64 << 10));
        let draining = health.clone();
        tokio::spawn(async move {
            axum::serve(http, router).with_graceful_shutdown(async move { draining.draining().await }).await
        })
    });
    let store: Option<Arc<dyn embedding_cache::EmbeddingStore>> = match (opts.redis, opts.embedding_cache_bytes) {
        (Some(redis), _) => {
            tracing::info!(url = %sdmesh_core::redact_url(&redis.url), ttl = ?redis.ttl, "prompt embeddings cached in redis");
            Some(Arc::new(redis_store::RedisStore::new(redis)?))
        }
        (None, 0) => None,
        (None, bytes) => Some(Arc::new(embedding_cache::LruStore::new(bytes))),
    };
    // A pipeline over remote model services, its prompt embeddings cached in `store`.
    let remote = |model: PathBuf, text_encoder_url: String, unet_url: String, vae_url: String| {
        let store = store.clone();
        async move {
            let pipeline = pipeline_over(
                &model,
                Arc::new(sdmesh_text_encoder::TextEncoderClient::new(&text_encoder_url)?),
                Arc::new(sdmesh_unet::UnetClient::new(&unet_url)?),
                Arc::new(sdmesh_vae::VaeClient::new(&vae_url)?),
                opts.limits,
                opts.startup_timeout,
            )
            .await?;
            anyhow::Ok(match store {
                Some(store) => with_embedding_cache(pipeline, store),
                None => pipeline,
            })
        }
    };
    let chained_upscaler = match opts.upscaler.clone() {
        Some(up) => {
            let upscaler = remote(up.model.clone(), up.text_encoder_url, up.unet_url, up.vae_url).await?;
            anyhow::ensure!(
                upscaler.upscaler.is_some(),
                "{}: not an x4 upscaler (no low_res_scheduler/)",
                up.model.display()
            );
            Some(Arc::new(upscaler))
        }
        None => None,
    };
    let safety: Option<Arc<dyn sdmesh_core::SafetyChecker>> = match &opts.safety_url {
        Some(url) => Some(Arc::new(sdmesh_safety::SafetyClient::new(url)?)),
        None => None,
    };
    // A served model: its pipeline, with what every model shares.
    let (default_text_encoder, safety_settings) = (&opts.text_encoder_url, opts.safety);
    let served = |services: models::ModelServices| {
        let (remote, safety, chained_upscaler) = (&remote, safety.clone(), chained_upscaler.clone());
        async move {
            let text_encoder_url = services.text_encoder_url.clone().unwrap_or_else(|| default_text_encoder.clone());
            let mut pipeline =
                remote(services.model.clone(), text_encoder_url, services.unet_url.clone(), services.vae_url.clone())
                    .await?;
            pipeline.model_name = services.name();
            if let Some(url) = &services.depth_url {
                pipeline.depth = Some(Arc::new(sdmesh_depth::DepthClient::new(url)?));
            }
            pipeline.safety = safety;
            pipeline.safety_settings = safety_settings;
            pipeline.chained_upscaler = chained_upscaler;
            anyhow::Ok(pipeline)
        }
    };
    let mut served_models = Vec::with_capacity(all_models.len());
    for services in all_models {
        let limits = services.job_limits(opts.jobs);
        served_models.push(models::Served::new(served(services).await?, limits));
    }
    service.set_models(models::Models::new(served_models)?);
    health.set(ServingStatus::Serving).await;
    tracing::info!("orchestrator ready");
    server.await??;
    if let Some(http_server) = http_server {
        http_server.await??;
    }
    Ok(())
}
