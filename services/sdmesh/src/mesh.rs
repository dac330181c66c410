//! The whole mesh in one process: each model service (and the depth service, for a depth
//! checkpoint) on its own loopback port, the orchestrator reaching them over gRPC exactly as
//! across machines. More models (`also_models`) each get their own unet (and depth) services,
//! and share the text-encoder and vae services of an earlier folder with the same weights
//! (every SD 2.x checkpoint but the upscaler has the same OpenCLIP ViT-H and autoencoder); the
//! one orchestrator serves them all (GenerateRequest.model picks one).

use sdmesh_core::serve::Shutdown;
use sdmesh_orchestrator::pipeline::Limits;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
    /// More models served beside `model`: (name, default the folder's; folder).
    pub also_models: Vec<(Option<String>, PathBuf)>,
    /// The x4 upscaler jobs can chain after themselves.
    pub upscaler_model: Option<PathBuf>,
    /// The API keys file: every call needs a key it lists.
    pub api_keys: Option<PathBuf>,
    /// The safety checker's folder (default: `model`, when it has safety_checker/).
    pub safety_model: Option<PathBuf>,
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
            also_models: Vec::new(),
            upscaler_model: None,
            api_keys: None,
            safety_model: None,
        }
    }
}

/// `[NAME=]DIR`: a model served beside the first, named NAME (default the folder's name).
pub fn parse_also_model(arg: &str) -> Result<(Option<String>, PathBuf), String> {
    let (name, dir) = match arg.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !name.contains('/') => (Some(name.to_string()), dir),
        _ => (None, arg),
    };
    Ok((name, parse_model_dir(dir)?))
}

/// A diffusers-layout model folder (one with model_index.json).
pub fn parse_model_dir(dir: &str) -> Result<PathBuf, String> {
    let dir = PathBuf::from(dir);
    if !dir.join("model_index.json").is_file() {
        return Err(format!("{} is not a diffusers-layout model folder (no model_index.json)", dir.display()));
    }
    Ok(dir)
}

/// The safety checker's folder: `given` (--safety-model), else `model` when it has one.
pub fn safety_model(model: &Path, given: Option<&Path>) -> Option<PathBuf> {
    given.map(Path::to_path_buf).or_else(|| model.join("safety_checker").is_dir().then(|| model.to_path_buf()))
}

/// Where one model folder's services listen.
struct ModelUrls {
    text_encoder: String,
    unet: String,
    vae: String,
    depth: Option<String>,
}

/// The text-encoder and vae services started so far, by what each serves (its fingerprint).
#[derive(Default)]
struct SharedServices {
    text_encoders: HashMap<String, String>,
    vaes: HashMap<String, String>,
}

/// The URL of the service in `started` that serves what one with `opts` would (same
/// `fingerprint`), else of a new one on a loopback port, started by `run` into `tasks`.
async fn shared_or_started<O, F>(
    started: &mut HashMap<String, String>,
    opts: O,
    fingerprint: fn(&O) -> Result<String, sdmesh_core::model_dir::ModelDirError>,
    run: impl FnOnce(O, TcpListener) -> F,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<String>
where
    O: Clone + Send + 'static,
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    // Off the async threads: a real text encoder is over a GB to hash.
    let of_opts = opts.clone();
    let fingerprint = tokio::task::spawn_blocking(move || fingerprint(&of_opts)).await??;
    if let Some(url) = started.get(&fingerprint) {
        return Ok(url.clone());
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tasks.spawn(run(opts, listener));
    started.insert(fingerprint, url.clone());
    Ok(url)
}

/// Starts `model`'s unet (and, for a depth checkpoint, depth) services on loopback ports, into
/// `tasks`, each stopping on `stop()`; and its text-encoder and vae services, unless `shared`
/// has one that serves the same weights, config and tokenizer (same fingerprint), which it
/// then uses: the weights are in memory once, and the folders' encodes batch together.
async fn start_model_services(
    model: &Path,
    opts: &MeshOptions,
    shared: &mut SharedServices,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    stop: &impl Fn() -> Shutdown,
) -> anyhow::Result<ModelUrls> {
    let loopback = || TcpListener::bind("127.0.0.1:0");
    let url = |l: &TcpListener| l.local_addr().map(|a| format!("http://{a}"));
    let (model, device, dtype, queue_capacity) =
        (model.to_path_buf(), opts.device.clone(), opts.dtype, opts.queue_capacity);
    let te_opts = sdmesh_text_encoder::TextEncoderOptions {
        dtype,
        queue_capacity,
        ..sdmesh_text_encoder::TextEncoderOptions::new(model.clone(), device.clone())
    };
    let text_encoder = shared_or_started(
        &mut shared.text_encoders,
        te_opts,
        sdmesh_text_encoder::fingerprint,
        |opts, listener| sdmesh_text_encoder::run(opts, listener, stop()),
        tasks,
    )
    .await?;
    let vae_opts =
        sdmesh_vae::VaeOptions { dtype, queue_capacity, ..sdmesh_vae::VaeOptions::new(model.clone(), device.clone()) };
    let vae = shared_or_started(
        &mut shared.vaes,
        vae_opts,
        sdmesh_vae::fingerprint,
        |opts, listener| sdmesh_vae::run(opts, listener, stop()),
        tasks,
    )
    .await?;
    let unet = loopback().await?;
    // A depth checkpoint (depth_estimator/ in the folder) gets the depth service too.
    let depth = if sdmesh_orchestrator::has_depth_estimator(&model) { Some(loopback().await?) } else { None };
    let urls = ModelUrls { text_encoder, unet: url(&unet)?, vae, depth: depth.as_ref().map(url).transpose()? };
    tracing::info!(
        model = %model.display(),
        text_encoder = %urls.text_encoder,
        unet = %urls.unet,
        vae = %urls.vae,
        depth = urls.depth.as_deref().unwrap_or(""),
        "a model's services"
    );
    tasks.spawn(sdmesh_unet::run(
        opts.batching.clone().apply(sdmesh_unet::UnetOptions {
            dtype,
            queue_capacity,
            ..sdmesh_unet::UnetOptions::new(model.clone(), device.clone())
        }),
        unet,
        stop(),
    ));
    if let Some(listener) = depth {
        let depth_opts = sdmesh_depth::DepthOptions {
            dtype,
            queue_capacity,
            ..sdmesh_depth::DepthOptions::new(model.clone(), device.clone())
        };
        tasks.spawn(sdmesh_depth::run(depth_opts, listener, stop()));
    }
    Ok(urls)
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
    let mut tasks = tokio::task::JoinSet::new();
    let mut shared = SharedServices::default();
    let main = start_model_services(&opts.model, &opts, &mut shared, &mut tasks, &after_orchestrator).await?;
    let mut more_models = Vec::new();
    for (name, model) in &opts.also_models {
        let urls = start_model_services(model, &opts, &mut shared, &mut tasks, &after_orchestrator).await?;
        more_models.push(sdmesh_orchestrator::models::ModelServices {
            name: name.clone(),
            model: model.clone(),
            text_encoder_url: Some(urls.text_encoder),
            unet_url: urls.unet,
            vae_url: urls.vae,
            depth_url: urls.depth,
            max_jobs: None,
            max_waiting_jobs: None,
            max_jobs_per_tenant: None,
        });
    }
    let upscaler = match &opts.upscaler_model {
        Some(model) => {
            let urls = start_model_services(model, &opts, &mut shared, &mut tasks, &after_orchestrator).await?;
            Some(sdmesh_orchestrator::UpscalerServices {
                model: model.clone(),
                text_encoder_url: urls.text_encoder,
                unet_url: urls.unet,
                vae_url: urls.vae,
            })
        }
        None => None,
    };
    // A safety checker (--safety-model, or the model folder's safety_checker/) gets the safety
    // service, flagged images replaced by default.
    let safety = if let Some(checker) = safety_model(&opts.model, opts.safety_model.as_deref()) {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let safety_opts = sdmesh_safety::SafetyOptions {
            dtype: opts.dtype,
            queue_capacity: opts.queue_capacity,
            ..sdmesh_safety::SafetyOptions::new(checker, opts.device.clone())
        };
        tasks.spawn(sdmesh_safety::run(safety_opts, listener, after_orchestrator()));
        Some(url)
    } else {
        None
    };
    let orchestrator_opts = sdmesh_orchestrator::OrchestratorOptions {
        model: opts.model.clone(),
        text_encoder_url: main.text_encoder,
        unet_url: main.unet,
        vae_url: main.vae,
        depth_url: main.depth,
        upscaler,
        more_models,
        safety_url: safety,
        // With a safety service, flagged images are replaced unless a request says otherwise.
        safety: Default::default(),
        limits: opts.limits,
        jobs: opts.jobs,
        fleet_quota: opts.fleet_quota.clone(),
        startup_timeout: Duration::from_secs(600),
        embedding_cache_bytes: opts.embedding_cache_bytes,
        redis: opts.redis.clone(),
        api_keys: opts.api_keys.clone(),
    };
    tracing::info!(
        text_encoder = %orchestrator_opts.text_encoder_url,
        unet = %orchestrator_opts.unet_url,
        vae = %orchestrator_opts.vae_url,
        more_models = orchestrator_opts.more_models.len(),
        "model services"
    );
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
