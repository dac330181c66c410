//! unet service: one denoising step per request, classifier-free guidance inside.
//!
//! A request carries the latents, the timestep, the conditional and unconditional
//! embeddings and the guidance scale; the service runs the doubled forward pass when guidance
//! is on and returns the guided model output (epsilon or v, whatever the checkpoint predicts).

mod attention;
mod blocks;
pub mod config;
mod unet_2d;

use candle_core::{DType, Device, Tensor, D};
use sdmesh_core::batch::{BatchOptions, BatchWorker, Batchable};
use sdmesh_core::client::{call_with_retries, unary, BACKPRESSURE_PATIENCE};
use sdmesh_core::model_dir::{ComponentDir, ModelDirError};
use sdmesh_core::serve::{serve_while_loading, Health};
use sdmesh_core::telemetry::traced;
use sdmesh_core::{DenoiseInput, Error, Result};
use sdmesh_proto::v1;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;
use unet_2d::UNet2DConditionModel;

/// Images per step (each doubled under guidance).
pub const MAX_BATCH: usize = 16;
/// Latent side: 256 latents = 2048 pixels.
pub const MAX_LATENT_SIDE: usize = 256;
/// Conditioning tokens per sample: four 77-token CLIP windows (long-prompt schemes concatenate
/// them).
pub const MAX_CONTEXT: usize = 4 * 77;
/// Widest conditioning the limits allow for (SD 2.x: 1024).
pub const MAX_CROSS_ATTENTION_DIM: usize = 1024;
/// Most latent channels in (9: the inpainting UNet) and out.
pub const MAX_IN_CHANNELS: usize = 9;

const LATENTS_ELEMENTS: usize = MAX_BATCH * MAX_IN_CHANNELS * MAX_LATENT_SIDE * MAX_LATENT_SIDE;
/// Largest legitimate Denoise request: latents plus cond and uncond, all at their limits.
pub const MAX_REQUEST_BYTES: usize = sdmesh_core::message_limit(sdmesh_core::f32_bytes(
    LATENTS_ELEMENTS + 2 * MAX_BATCH * MAX_CONTEXT * MAX_CROSS_ATTENTION_DIM,
));
/// Largest legitimate Denoise response: a model output the size of the largest latents.
pub const MAX_RESPONSE_BYTES: usize = sdmesh_core::message_limit(sdmesh_core::f32_bytes(LATENTS_ELEMENTS));

#[derive(Debug, Clone)]
pub struct UnetOptions {
    /// Diffusers-layout model folder (uses unet/).
    pub model: PathBuf,
    pub device: Device,
    /// Weights and activations (model outputs are returned as f32).
    pub dtype: DType,
    pub queue_capacity: usize,
    /// Most rows (images; two per image under guidance) in one forward pass over steps of
    /// concurrent jobs.
    pub max_batch_rows: usize,
    /// How long a step may wait for others to share its forward pass (0: never waits; steps
    /// that queued while the model was busy still run together).
    pub batch_max_wait: Duration,
    /// Bytes of conditioning tensors kept by digest (a job's prompt embeddings, sent once).
    pub conditioning_cache_bytes: usize,
}

impl UnetOptions {
    /// Defaults: f32, a queue of 64 requests, batches of up to 16 rows, no waiting, 256 MiB of
    /// conditioning.
    pub fn new(model: PathBuf, device: Device) -> Self {
        let BatchingArgs { max_batch_rows, batch_max_wait_ms, conditioning_cache_bytes } = BatchingArgs::default();
        Self {
            model,
            device,
            dtype: DType::F32,
            queue_capacity: 64,
            max_batch_rows,
            batch_max_wait: Duration::from_millis(batch_max_wait_ms),
            conditioning_cache_bytes,
        }
    }
}

/// The unet service's flags for batching and the conditioning cache (`sdmesh-unet` and
/// `sdmesh serve` take them).
#[derive(clap::Args, Debug, Clone)]
pub struct BatchingArgs {
    /// Most rows (images; two per image under guidance) in one forward pass over the steps of
    /// concurrent jobs (1 turns batching off).
    #[arg(long, env = "SDMESH_MAX_BATCH_ROWS", default_value_t = BatchingArgs::default().max_batch_rows)]
    pub max_batch_rows: usize,
    /// Milliseconds a step may wait for others to share its forward pass (0: never waits;
    /// steps that queued while the model was busy still run together).
    #[arg(long, env = "SDMESH_BATCH_MAX_WAIT_MS", default_value_t = BatchingArgs::default().batch_max_wait_ms)]
    pub batch_max_wait_ms: u64,
    /// Bytes of conditioning tensors (jobs' prompt embeddings) kept by digest, so each job
    /// sends them once. SD 2.x: 308 KiB per prompt.
    #[arg(
        long,
        env = "SDMESH_CONDITIONING_CACHE_BYTES",
        default_value_t = BatchingArgs::default().conditioning_cache_bytes
    )]
    pub conditioning_cache_bytes: usize,
}

impl Default for BatchingArgs {
    /// Batches of up to 16 rows, no waiting, 256 MiB of conditioning.
    fn default() -> Self {
        Self { max_batch_rows: 16, batch_max_wait_ms: 0, conditioning_cache_bytes: 256 << 20 }
    }
}

impl BatchingArgs {
    /// `opts` with these settings.
    pub fn apply(&self, opts: UnetOptions) -> UnetOptions {
        UnetOptions {
            max_batch_rows: self.max_batch_rows,
            batch_max_wait: Duration::from_millis(self.batch_max_wait_ms),
            conditioning_cache_bytes: self.conditioning_cache_bytes,
            ..opts
        }
    }
}

/// One step's output alone against the same step's output in a shared forward pass
/// ([`LocalUnet::alone_vs_batched`]).
#[derive(Debug, Clone, Copy)]
pub struct AloneVsBatched {
    /// Largest |alone - batched| (infinite where only one of them is NaN).
    pub max_abs_diff: f32,
    /// Largest |alone|: the scale the difference is judged against.
    pub max_abs: f32,
    /// Non-finite values in the output alone.
    pub nonfinite: usize,
    /// Bit-for-bit identical.
    pub same_bits: bool,
}

/// One job's step, as the batcher sees it.
struct Step(DenoiseInput);

impl Batchable for Step {
    /// Latent channels, height, width; conditioning length and width.
    type Key = (Vec<usize>, Vec<usize>);

    fn batch_key(&self) -> Self::Key {
        (self.0.latents.dims()[1..].to_vec(), self.0.cond.dims()[1..].to_vec())
    }

    fn rows(&self) -> usize {
        self.0.rows()
    }
}

struct Model {
    unet: UNet2DConditionModel,
    device: Device,
    dtype: DType,
}

pub struct LocalUnet {
    worker: BatchWorker<Step, Tensor>,
    info: v1::UnetInfo,
}

impl sdmesh_core::serve::ModelIdentity for LocalUnet {
    fn fingerprint(&self) -> &str {
        &self.info.fingerprint
    }
}

/// The prediction type in the folder's scheduler/scheduler_config.json (diffusers' default,
/// "epsilon", when the key is absent); empty without the file.
fn prediction_type(model: &std::path::Path) -> std::result::Result<String, ModelDirError> {
    let path = model.join("scheduler").join("scheduler_config.json");
    match sdmesh_core::model_dir::read_json::<serde_json::Value>(&path) {
        Ok(json) => Ok(json.get("prediction_type").and_then(|v| v.as_str()).unwrap_or("epsilon").to_string()),
        Err(ModelDirError::Missing { .. }) => Ok(String::new()),
        Err(e) => Err(e),
    }
}

impl LocalUnet {
    pub fn load(opts: &UnetOptions) -> std::result::Result<Self, ModelDirError> {
        let dir = ComponentDir::open(&opts.model, "unet")?;
        let json: config::UnetConfigJson = dir.json("config.json")?;
        let malformed = |message: String| ModelDirError::Malformed { path: dir.path.join("config.json"), message };
        let (cfg, extras) = json.to_candle().map_err(malformed)?;
        let dtype = opts.dtype;
        sdmesh_core::attention::tf32_for_upcast_attention(&opts.device, dtype);
        let vb = dir.var_builder(&["diffusion_pytorch_model"], dtype, &opts.device)?;
        let unet = UNet2DConditionModel::new(vb, json.in_channels, json.out_channels, cfg, &extras)
            .map_err(|e| ModelDirError::Malformed { path: dir.path.clone(), message: e.to_string() })?;
        if json.cross_attention_dim > MAX_CROSS_ATTENTION_DIM || json.in_channels > MAX_IN_CHANNELS {
            return Err(malformed(format!(
                "cross_attention_dim {} / in_channels {}: this build serves up to {MAX_CROSS_ATTENTION_DIM} / \
                 {MAX_IN_CHANNELS} (its gRPC message limits are sized for them)",
                json.cross_attention_dim, json.in_channels
            )));
        }
        let info = v1::UnetInfo {
            in_channels: json.in_channels as u32,
            out_channels: json.out_channels as u32,
            cross_attention_dim: json.cross_attention_dim as u32,
            sample_size: json.sample_size.unwrap_or(64) as u32,
            num_class_embeds: json.num_class_embeds.unwrap_or(0) as u32,
            fingerprint: dir.fingerprint(&["diffusion_pytorch_model"], &[], &opts.device, dtype)?,
            prediction_type: prediction_type(&opts.model)?,
        };
        let model = Model { unet, device: opts.device.clone(), dtype };
        // Warm-up with a small guided step before reporting SERVING.
        let warm_up = || -> Result<Vec<Tensor>> {
            let context = Tensor::zeros((1, 77, json.cross_attention_dim), DType::F32, &Device::Cpu)?;
            model.denoise(vec![Step(DenoiseInput {
                latents: Tensor::zeros((1, json.in_channels, 8, 8), DType::F32, &Device::Cpu)?,
                extra: None,
                timestep: 1.0,
                cond: context.clone(),
                uncond: Some(context),
                guidance_scale: 2.0,
                guidance_rescale: 0.5,
                class_label: json.num_class_embeds.map(|_| 0),
            })])
        };
        warm_up().map_err(|e| ModelDirError::Malformed {
            path: dir.path.clone(),
            message: format!("warm-up failed: {e}"),
        })?;
        let batching = BatchOptions {
            queue_capacity: opts.queue_capacity,
            max_rows: opts.max_batch_rows.max(1),
            max_wait: opts.batch_max_wait,
        };
        let worker = BatchWorker::spawn("unet", batching, move |steps| model.denoise(steps));
        Ok(Self { worker, info })
    }

    /// Forward passes run so far (each may serve several requests).
    pub fn batches_run(&self) -> u64 {
        self.worker.batches_run()
    }

    /// Step-level batching's promise, checked on this model's device and dtype: runs each step
    /// alone, then all of them at once, and compares each step's two outputs. Fails if the
    /// steps did not share one forward pass (this model's `max_batch_rows` or
    /// `batch_max_wait` too small for them). The batching tests and `sdmesh-bench invariance`
    /// (on a GPU) use it.
    pub async fn alone_vs_batched(&self, steps: &[DenoiseInput]) -> Result<Vec<AloneVsBatched>> {
        use sdmesh_core::Denoiser;
        let mut alone = Vec::with_capacity(steps.len());
        for step in steps {
            alone.push(self.denoise(step.clone()).await?);
        }
        let before = self.batches_run();
        let together = futures::future::join_all(steps.iter().map(|s| self.denoise(s.clone()))).await;
        let passes = self.batches_run() - before;
        if passes != 1 {
            return Err(Error::internal(format!("{} steps ran in {passes} forward passes, not one", steps.len())));
        }
        let values = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        alone
            .iter()
            .zip(together)
            .map(|(alone, together)| {
                let (a, b) = (values(alone)?, values(&together?)?);
                if a.len() != b.len() {
                    return Err(Error::internal(format!("outputs of {} and {} values", a.len(), b.len())));
                }
                let nan_mismatch = a.iter().zip(&b).any(|(x, y)| x.is_nan() != y.is_nan());
                let max_abs_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                Ok(AloneVsBatched {
                    max_abs_diff: if nan_mismatch { f32::INFINITY } else { max_abs_diff },
                    max_abs: a.iter().map(|x| x.abs()).fold(0f32, f32::max),
                    nonfinite: a.iter().filter(|x| !x.is_finite()).count(),
                    same_bits: a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                })
            })
            .collect()
    }

    fn validate(&self, x: &DenoiseInput) -> Result<()> {
        let info = &self.info;
        let (n, c, h, w) = x.latents.dims4().map_err(|_| {
            Error::invalid(format!("latents: shape {:?}, expected [batch, channels, height, width]", x.latents.dims()))
        })?;
        let extra_channels = match &x.extra {
            None => 0,
            Some(e) => match e.dims() {
                &[en, k, eh, ew] if (en, eh, ew) == (n, h, w) && c + k == info.in_channels as usize => k,
                dims => {
                    return Err(Error::invalid(format!(
                        "extra: shape {dims:?}; expected [{n}, {}, {h}, {w}] (the UNet's {} input channels after the \
                         latents' {c})",
                        (info.in_channels as usize).saturating_sub(c),
                        info.in_channels
                    )))
                }
            },
        };
        if c + extra_channels != info.in_channels as usize
            || n == 0
            || n > MAX_BATCH
            || h == 0
            || w == 0
            || h > MAX_LATENT_SIDE
            || w > MAX_LATENT_SIDE
        {
            return Err(Error::invalid(format!(
                "latents: shape {:?}; expected [1..={MAX_BATCH}, {} (with extra's {extra_channels}), 1..={MAX_LATENT_SIDE}, \
                 1..={MAX_LATENT_SIDE}]",
                x.latents.dims(),
                info.in_channels as usize - extra_channels
            )));
        }
        match (info.num_class_embeds, x.class_label) {
            (0, None) => {}
            (0, Some(_)) => return Err(Error::invalid("class_label: this UNet has no class embedding")),
            (n, Some(c)) if c < n => {}
            (n, c) => {
                return Err(Error::invalid(format!(
                "class_label: {c:?}; this UNet's class embedding needs one from 0 to {} (the upscaler's noise level)",
                n - 1
            )))
            }
        }
        if !x.timestep.is_finite() || x.timestep < 0.0 {
            return Err(Error::invalid(format!("timestep: {} is not a finite value >= 0", x.timestep)));
        }
        if !x.guidance_scale.is_finite() || x.guidance_scale < 0.0 {
            return Err(Error::invalid(format!("guidance_scale: {} is not a finite value >= 0", x.guidance_scale)));
        }
        if !(0.0..=1.0).contains(&x.guidance_rescale) {
            return Err(Error::invalid(format!("guidance_rescale: {} is outside [0, 1]", x.guidance_rescale)));
        }
        let check_cond = |name: &str, t: &Tensor| -> Result<()> {
            match t.dims() {
                &[b, s, d]
                    if (b == 1 || b == n)
                        && (1..=MAX_CONTEXT).contains(&s)
                        && d == info.cross_attention_dim as usize =>
                {
                    Ok(())
                }
                dims => Err(Error::invalid(format!(
                    "{name}: shape {dims:?}; expected [1 or {n}, 1..={MAX_CONTEXT}, {}]",
                    info.cross_attention_dim
                ))),
            }
        };
        check_cond("cond", &x.cond)?;
        if x.uses_guidance() {
            let uncond = x.uncond.as_ref().ok_or_else(|| Error::invalid("uncond: required when guidance_scale > 1"))?;
            check_cond("uncond", uncond)?;
            if uncond.dims() != x.cond.dims() {
                return Err(Error::invalid(format!(
                    "uncond: shape {:?} differs from cond {:?}",
                    uncond.dims(),
                    x.cond.dims()
                )));
            }
        }
        Ok(())
    }
}

impl Model {
    /// One forward pass over the steps of several jobs: each contributes its rows ([uncond;
    /// cond] per image under guidance, as diffusers' pipeline batches them) with its own
    /// timestep and conditioning; guidance is then applied per job.
    fn denoise(&self, steps: Vec<Step>) -> Result<Vec<Tensor>> {
        let to_model = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?) };
        let (mut latents, mut contexts, mut timesteps) = (Vec::new(), Vec::new(), Vec::<f32>::new());
        let mut class_labels = Vec::<u32>::new();
        for Step(x) in &steps {
            let n = x.latents.dim(0)?;
            let per_sample = |t: &Tensor| -> Result<Tensor> {
                let t = to_model(t)?;
                Ok(if t.dim(0)? == n { t } else { t.repeat((n, 1, 1))? })
            };
            let l = match &x.extra {
                Some(extra) => to_model(&Tensor::cat(&[&x.latents, extra], 1)?)?,
                None => to_model(&x.latents)?,
            };
            match (&x.uncond, x.uses_guidance()) {
                (Some(uncond), true) => {
                    latents.extend([l.clone(), l]);
                    contexts.extend([per_sample(uncond)?, per_sample(&x.cond)?]);
                    timesteps.extend(std::iter::repeat_n(x.timestep as f32, 2 * n));
                    class_labels.extend(x.class_label.map(|c| std::iter::repeat_n(c, 2 * n)).into_iter().flatten());
                }
                _ => {
                    latents.push(l);
                    contexts.push(per_sample(&x.cond)?);
                    timesteps.extend(std::iter::repeat_n(x.timestep as f32, n));
                    class_labels.extend(x.class_label.map(|c| std::iter::repeat_n(c, n)).into_iter().flatten());
                }
            }
        }
        let rows = timesteps.len();
        let timesteps = Tensor::from_vec(timesteps, rows, &self.device)?;
        // Validation makes every request of a class-embedding UNet carry a label, and no other.
        let class_labels = match class_labels.len() {
            0 => None,
            n if n == rows => Some(Tensor::from_vec(class_labels, rows, &self.device)?),
            n => return Err(Error::invalid(format!("class_label: {n} of {rows} rows have one; all or none must"))),
        };
        let out = self.unet.forward(
            &Tensor::cat(&latents, 0)?,
            &timesteps,
            &Tensor::cat(&contexts, 0)?,
            class_labels.as_ref(),
        )?;
        let out = out.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let mut row = 0;
        let mut outputs = Vec::with_capacity(steps.len());
        for Step(x) in &steps {
            let n = x.latents.dim(0)?;
            let guided = if x.uses_guidance() && x.uncond.is_some() {
                let (u, c) = (out.narrow(0, row, n)?, out.narrow(0, row + n, n)?);
                row += 2 * n;
                let guided = (&u + ((&c - &u)? * x.guidance_scale as f64)?)?;
                if x.guidance_rescale > 0.0 {
                    rescale_noise_cfg(&guided, &c, x.guidance_rescale as f64)?
                } else {
                    guided
                }
            } else {
                row += n;
                out.narrow(0, row - n, n)?
            };
            outputs.push(guided);
        }
        Ok(outputs)
    }
}

/// Writes random weights (candle's default initialisation) for the UNet described by
/// `unet_dir/config.json` to `unet_dir/diffusion_pytorch_model.safetensors`: a stand-in for a
/// checkpoint when only the architecture matters (benchmarks, batching tests at real widths).
pub fn write_random_weights(unet_dir: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(unet_dir.join("config.json"))?;
    let json: config::UnetConfigJson = serde_json::from_str(&text)?;
    let (cfg, extras) = json.to_candle().map_err(anyhow::Error::msg)?;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    UNet2DConditionModel::new(vb, json.in_channels, json.out_channels, cfg, &extras)?;
    varmap.save(unet_dir.join("diffusion_pytorch_model.safetensors"))?;
    Ok(())
}

/// Per-sample standard deviation (unbiased, like torch.std) over all but the batch dim.
fn std_per_sample(t: &Tensor) -> candle_core::Result<Tensor> {
    let n = t.dim(0)?;
    let flat = t.reshape((n, ()))?;
    let m = flat.dim(1)? as f64;
    let centered = flat.broadcast_sub(&flat.mean_keepdim(D::Minus1)?)?;
    (centered.sqr()?.sum_keepdim(D::Minus1)? / (m - 1.0))?.sqrt()
}

/// Guidance rescale (arXiv 2305.08891, section 3.4), as diffusers' `rescale_noise_cfg`.
fn rescale_noise_cfg(cfg: &Tensor, text: &Tensor, phi: f64) -> candle_core::Result<Tensor> {
    let ratio = (std_per_sample(text)? / std_per_sample(cfg)?)?;
    let shape: Vec<usize> = std::iter::once(cfg.dim(0)?).chain(std::iter::repeat_n(1, cfg.rank() - 1)).collect();
    let rescaled = cfg.broadcast_mul(&ratio.reshape(shape)?)?;
    (rescaled * phi)? + (cfg * (1.0 - phi))?
}

#[async_trait::async_trait]
impl sdmesh_core::Denoiser for LocalUnet {
    async fn denoise(&self, input: DenoiseInput) -> Result<Tensor> {
        self.validate(&input)?;
        self.worker.call(Step(input)).await
    }

    async fn info(&self) -> Result<v1::UnetInfo> {
        Ok(self.info.clone())
    }
}

/// The reason of the google.rpc.ErrorInfo on FAILED_PRECONDITION when a request names a
/// conditioning digest the service does not hold: send the tensor again.
pub const CONDITIONING_NOT_CACHED: &str = "CONDITIONING_NOT_CACHED";

fn not_cached(field: &str, digest: &str) -> Error {
    use tonic_types::{ErrorDetails, StatusExt};
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("field".to_string(), field.to_string());
    metadata.insert("digest".to_string(), digest.to_string());
    Error::Remote(tonic::Status::with_error_details(
        tonic::Code::FailedPrecondition,
        format!("{field}: no tensor with digest {digest} here; send the tensor"),
        ErrorDetails::with_error_info(CONDITIONING_NOT_CACHED, "sdmesh", metadata),
    ))
}

/// Whether `status` asks for the conditioning tensors to be sent again.
pub fn is_conditioning_miss(status: &tonic::Status) -> bool {
    use tonic_types::StatusExt;
    status.code() == tonic::Code::FailedPrecondition
        && status.get_details_error_info().is_some_and(|info| info.reason == CONDITIONING_NOT_CACHED)
}

/// Conditioning tensors by content digest, bounded in bytes: a job sends its prompt embeddings
/// once and names them by digest in every later step.
pub struct ConditioningCache {
    tensors: sdmesh_core::byte_lru::ByteLru<String, Tensor>,
}

impl ConditioningCache {
    pub fn new(max_bytes: usize) -> Self {
        Self { tensors: sdmesh_core::byte_lru::ByteLru::new(max_bytes) }
    }

    /// The tensor a request field stands for: sent (checked against its digest, then kept),
    /// named by digest (from the cache), or absent.
    fn resolve(&self, field: &str, tensor: &Option<v1::Tensor>, digest: &str) -> Result<Option<Tensor>> {
        let decode = |t: &v1::Tensor| -> Result<Tensor> { Ok(t.to_candle(field, &Device::Cpu)?.to_dtype(DType::F32)?) };
        match (tensor, digest) {
            (None, "") => Ok(None),
            (Some(t), "") => Ok(Some(decode(t)?)),
            (Some(t), digest) => {
                if t.digest() != digest {
                    return Err(Error::invalid(format!("{field}_digest {digest} does not match the {field} tensor")));
                }
                let decoded = decode(t)?;
                self.tensors.put(digest.to_string(), decoded.clone(), decoded.elem_count() * 4);
                metrics::counter!("sdmesh_conditioning_cache_requests_total", "result" => "stored").increment(1);
                Ok(Some(decoded))
            }
            (None, digest) => {
                let found = self.tensors.get(digest);
                let result = if found.is_some() { "hit" } else { "miss" };
                metrics::counter!("sdmesh_conditioning_cache_requests_total", "result" => result).increment(1);
                found.map(Some).ok_or_else(|| not_cached(field, digest))
            }
        }
    }

    /// Tensors held now.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

/// Wire request -> domain input (tensors decoded and checked against their byte length;
/// conditioning named by digest taken from `cache`).
pub fn decode_request(r: &v1::DenoiseRequest, cache: &ConditioningCache) -> Result<DenoiseInput> {
    let cond = cache.resolve("cond", &r.cond, &r.cond_digest)?.ok_or_else(|| Error::invalid("cond: required"))?;
    Ok(DenoiseInput {
        latents: sdmesh_proto::required(&r.latents, "latents")?
            .to_candle("latents", &Device::Cpu)?
            .to_dtype(DType::F32)?,
        timestep: r.timestep,
        cond,
        uncond: cache.resolve("uncond", &r.uncond, &r.uncond_digest)?,
        extra: cache.resolve("extra", &r.extra, &r.extra_digest)?,
        guidance_scale: r.guidance_scale,
        guidance_rescale: r.guidance_rescale,
        class_label: r.class_label,
    })
}

#[derive(Clone)]
pub struct UnetService {
    local: Arc<OnceCell<LocalUnet>>,
    conditioning: Arc<ConditioningCache>,
}

impl UnetService {
    /// A service whose model is set later (NOT_SERVING meanwhile).
    pub fn new(conditioning_cache_bytes: usize) -> Self {
        Self {
            local: Arc::new(OnceCell::new()),
            conditioning: Arc::new(ConditioningCache::new(conditioning_cache_bytes)),
        }
    }

    pub fn set_model(&self, local: LocalUnet) {
        let _ = self.local.set(local);
    }

    pub fn conditioning(&self) -> &ConditioningCache {
        &self.conditioning
    }
}

#[tonic::async_trait]
impl v1::unet_server::Unet for UnetService {
    async fn denoise(
        &self,
        request: tonic::Request<v1::DenoiseRequest>,
    ) -> std::result::Result<tonic::Response<v1::DenoiseResponse>, tonic::Status> {
        let local = self.local.get().ok_or_else(sdmesh_core::loading)?;
        let input = decode_request(request.get_ref(), &self.conditioning)?;
        let out = sdmesh_core::Denoiser::denoise(local, input).await?;
        Ok(tonic::Response::new(v1::DenoiseResponse { model_output: Some(v1::Tensor::from_candle(&out)?) }))
    }

    async fn info(
        &self,
        _: tonic::Request<v1::InfoRequest>,
    ) -> std::result::Result<tonic::Response<v1::UnetInfo>, tonic::Status> {
        Ok(tonic::Response::new(self.local.get().ok_or_else(sdmesh_core::loading)?.info.clone()))
    }
}

/// Serves the UNet on `listener` until `shutdown` (NOT_SERVING while loading).
pub async fn run(
    opts: UnetOptions,
    listener: TcpListener,
    shutdown: sdmesh_core::serve::Shutdown,
) -> anyhow::Result<()> {
    let health = Health::new(&[v1::unet_server::SERVICE_NAME]).await;
    let service = UnetService::new(opts.conditioning_cache_bytes);
    let routes = health.routes().add_service(
        v1::unet_server::UnetServer::new(service.clone())
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES),
    );
    let load = move || LocalUnet::load(&opts);
    serve_while_loading("unet", listener, health, routes, shutdown, load, |local| {
        service.set_model(local);
    })
    .await
}

/// A job's conditioning tensor as it goes on the wire, encoded and digested once.
struct WireConditioning {
    tensor: v1::Tensor,
    digest: String,
}

/// A remote unet service. Each conditioning tensor (a job's prompt embeddings) is encoded and
/// digested once; after the service has it, steps name it by digest only.
#[derive(Clone)]
pub struct UnetClient {
    inner: v1::unet_client::UnetClient<sdmesh_core::client::ReplicaSet>,
    /// Recent conditioning tensors by candle tensor id (a job reuses the same tensor every step).
    wire: Arc<std::sync::Mutex<lru::LruCache<candle_core::TensorId, Arc<WireConditioning>>>>,
    /// Digests this client has sent (the service probably holds them).
    sent: Arc<std::sync::Mutex<lru::LruCache<String, ()>>>,
}

impl UnetClient {
    pub fn new(url: &str) -> Result<Self> {
        Ok(Self::from_channel(sdmesh_core::client::lazy_channel(url)?))
    }

    /// Over any channel (e.g. one balanced across replicas).
    pub fn from_channel(channel: sdmesh_core::client::ReplicaSet) -> Self {
        let inner = v1::unet_client::UnetClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES);
        let entries = std::num::NonZeroUsize::new(256).expect("non-zero");
        Self {
            inner,
            wire: Arc::new(std::sync::Mutex::new(lru::LruCache::new(entries))),
            sent: Arc::new(std::sync::Mutex::new(lru::LruCache::new(entries))),
        }
    }

    fn wire(&self, t: &Tensor) -> Result<Arc<WireConditioning>> {
        let mut cache = self.wire.lock().map_err(|_| Error::internal("unet client cache poisoned"))?;
        if let Some(w) = cache.get(&t.id()) {
            return Ok(w.clone());
        }
        let tensor = v1::Tensor::from_candle(t)?;
        let w = Arc::new(WireConditioning { digest: tensor.digest(), tensor });
        cache.put(t.id(), w.clone());
        Ok(w)
    }

    fn was_sent(&self, digest: &str) -> bool {
        self.sent.lock().map(|mut s| s.get(digest).is_some()).unwrap_or(false)
    }

    fn mark_sent(&self, digests: &[&str]) {
        if let Ok(mut sent) = self.sent.lock() {
            for d in digests {
                sent.put(d.to_string(), ());
            }
        }
    }

    /// One Denoise call (retried on backpressure and on replicas going away); `replica`: the
    /// replica to send it to, if it is still up.
    async fn call(
        &self,
        request: v1::DenoiseRequest,
        replica: Option<&tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    ) -> Result<v1::DenoiseResponse> {
        call_with_retries(BACKPRESSURE_PATIENCE, || {
            let mut client = self.inner.clone();
            let mut request = traced(request.clone());
            if let Some(r) = replica {
                request.metadata_mut().insert(sdmesh_core::replicas::REPLICA_HEADER, r.clone());
            }
            async move { Ok(client.denoise(request).await?.into_inner()) }
        })
        .await
    }
}

#[async_trait::async_trait]
impl sdmesh_core::Denoiser for UnetClient {
    async fn denoise(&self, x: DenoiseInput) -> Result<Tensor> {
        let cond = self.wire(&x.cond)?;
        let uncond = match (&x.uncond, x.uses_guidance()) {
            (Some(u), true) => Some(self.wire(u)?),
            _ => None,
        };
        let uncond_digest = uncond.as_ref().map(|u| u.digest.clone()).unwrap_or_default();
        let extra = x.extra.as_ref().map(|e| self.wire(e)).transpose()?;
        let extra_digest = extra.as_ref().map(|e| e.digest.clone()).unwrap_or_default();
        let digests = [cond.digest.as_str(), uncond_digest.as_str(), extra_digest.as_str()];
        let with_tensors = |send: bool| v1::DenoiseRequest {
            latents: None,
            timestep: x.timestep,
            cond: send.then(|| cond.tensor.clone()),
            uncond: if send { uncond.as_ref().map(|u| u.tensor.clone()) } else { None },
            guidance_scale: x.guidance_scale,
            guidance_rescale: x.guidance_rescale,
            cond_digest: cond.digest.clone(),
            uncond_digest: uncond_digest.clone(),
            class_label: x.class_label,
            extra: if send { extra.as_ref().map(|e| e.tensor.clone()) } else { None },
            extra_digest: extra_digest.clone(),
        };
        let latents = Some(v1::Tensor::from_candle(&x.latents)?);
        let already_sent = digests.iter().all(|d| d.is_empty() || self.was_sent(d));
        let first =
            self.call(v1::DenoiseRequest { latents: latents.clone(), ..with_tensors(!already_sent) }, None).await;
        let out = match first {
            // Evicted, or a replica that never saw this job: send the tensors once more, to
            // the replica that asked.
            Err(Error::Remote(status)) if already_sent && is_conditioning_miss(&status) => {
                let asked = status.metadata().get(sdmesh_core::replicas::REPLICA_HEADER);
                self.call(v1::DenoiseRequest { latents, ..with_tensors(true) }, asked).await?
            }
            other => other?,
        };
        self.mark_sent(&digests);
        Ok(sdmesh_proto::required(&out.model_output, "model_output")?.to_candle("model_output", &Device::Cpu)?)
    }

    async fn info(&self) -> Result<v1::UnetInfo> {
        // Retried as every call is: within a job, a dead replica costs a retry.
        unary(&self.inner, &v1::InfoRequest {}, |mut c, r| async move { c.info(r).await }).await
    }
}
