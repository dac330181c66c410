//! The whole mesh in one process: each model service (and the depth service, for a depth
//! checkpoint) on its own loopback port, the orchestrator reaching them over gRPC exactly as
//! across machines.

use sdmesh_core::serve::Shutdown;
use sdmesh_orchestrator::pipeline::Limits;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub model: PathBuf,
    pub device: candle_core::Device,
    /// The model services' weights and activations.
    pub dtype: candle_core::DType,
    pub limits: Limits,
    /// Jobs the orchestrator runs and keeps waiting.
    pub jobs: sdmesh_orchestrator::admission::JobLimits,
    /// Each tenant's bound across every orchestrator sharing `redis`.
    pub fleet_quota: Option<sdmesh_orchestrator::fleet_quota::QuotaOptions>,
    /// Requests waiting for each model beyond which new ones get RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    pub embedding_cache_bytes: usize,
    pub redis: Option<sdmesh_orchestrator::redis_store::RedisOptions>,
    /// The unet service's batching and conditioning cache.
    pub batching: sdmesh_unet::BatchingArgs,
}

impl MeshOptions {
    pub fn new(model: PathBuf, device: candle_core::Device) -> Self {
        let queue_capacity = sdmesh_unet::UnetOptions::new(model.clone(), device.clone()).queue_capacity;
        Self {
            model,
            device,
            dtype: candle_core::DType::F32,
            limits: Limits::default(),
            jobs: Default::default(),
            fleet_quota: None,
            queue_capacity,
            embedding_cache_bytes: 256 << 20,
            redis: None,
            batching: Default::default(),
        }
    }
}

/// Serves the mesh, the orchestrator on `listener` (and its HTTP/JSON API on `http`), until
/// `shutdown`. The orchestrator drains first (its jobs still need the model services), then
/// the model services stop. The first service to fail (e.g. a model that does not load) ends
/// the mesh.
pub async fn serve_mesh(
    opts: MeshOptions,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let grace = shutdown.grace;
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
    let loopback = || TcpListener::bind("127.0.0.1:0");
    let (te, unet, vae) = (loopback().await?, loopback().await?, loopback().await?);
    // A depth checkpoint (depth_estimator/ in the folder) gets the depth service too.
    let depth = if sdmesh_orchestrator::has_depth_estimator(&opts.model) { Some(loopback().await?) } else { None };
    // A folder with safety_checker/ gets the safety service, flagged images replaced by default.
    let safety = if opts.model.join("safety_checker").is_dir() { Some(loopback().await?) } else { None };
    let url = |l: &TcpListener| l.local_addr().map(|a| format!("http://{a}"));
    let orchestrator_opts = sdmesh_orchestrator::OrchestratorOptions {
        model: opts.model.clone(),
        text_encoder_url: url(&te)?,
        unet_url: url(&unet)?,
        vae_url: url(&vae)?,
        depth_url: depth.as_ref().map(url).transpose()?,
        upscaler: None,
        more_models: Vec::new(),
        safety_url: safety.as_ref().map(url).transpose()?,
        // With a safety service, flagged images are replaced unless a request says otherwise.
        safety: Default::default(),
        limits: opts.limits,
        jobs: opts.jobs,
        fleet_quota: opts.fleet_quota.clone(),
        startup_timeout: Duration::from_secs(600),
        embedding_cache_bytes: opts.embedding_cache_bytes,
        redis: opts.redis.clone(),
    };
    tracing::info!(
        text_encoder = %orchestrator_opts.text_encoder_url,
        unet = %orchestrator_opts.unet_url,
        vae = %orchestrator_opts.vae_url,
        "model services"
    );
    let (model, device, dtype, queue_capacity) =
        (opts.model.clone(), opts.device.clone(), opts.dtype, opts.queue_capacity);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(sdmesh_text_encoder::run(
        sdmesh_text_encoder::TextEncoderOptions {
            dtype,
            queue_capacity,
            ..sdmesh_text_encoder::TextEncoderOptions::new(model.clone(), device.clone())
        },
        te,
        after_orchestrator(),
    ));
    tasks.spawn(sdmesh_unet::run(
        opts.batching.apply(sdmesh_unet::UnetOptions {
            dtype,
            queue_capacity,
            ..sdmesh_unet::UnetOptions::new(model.clone(), device.clone())
        }),
        unet,
        after_orchestrator(),
    ));
    if let Some(listener) = safety {
        let safety_opts = sdmesh_safety::SafetyOptions {
            dtype,
            queue_capacity,
            ..sdmesh_safety::SafetyOptions::new(model.clone(), device.clone())
        };
        tasks.spawn(sdmesh_safety::run(safety_opts, listener, after_orchestrator()));
    }
    if let Some(listener) = depth {
        let depth_opts = sdmesh_depth::DepthOptions {
            dtype,
            queue_capacity,
            ..sdmesh_depth::DepthOptions::new(model.clone(), device.clone())
        };
        tasks.spawn(sdmesh_depth::run(depth_opts, listener, after_orchestrator()));
    }
    let vae_opts = sdmesh_vae::VaeOptions { dtype, queue_capacity, ..sdmesh_vae::VaeOptions::new(model, device) };
    tasks.spawn(sdmesh_vae::run(vae_opts, vae, after_orchestrator()));
    let orchestrator = sdmesh_orchestrator::run_with_http(orchestrator_opts, listener, http, shutdown);
    tasks.spawn(async move {
        let result = orchestrator.await;
        let _ = orchestrator_done_tx.send(true);
        result
    });
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
