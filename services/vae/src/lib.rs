//! vae service: diffusion latents -> images.
//!
//! The service owns the whole AutoencoderKL (encoder included), so image-to-latent encoding
//! (img2img, inpainting) is one more RPC on the same loaded model.

mod autoencoder;
mod blocks;

use autoencoder::{AutoEncoderKL, AutoEncoderKLConfig};
use candle_core::{DType, Device, Tensor};
use sdmesh_core::batch::{BatchOptions, BatchWorker, Batchable};
use sdmesh_core::client::unary;
use sdmesh_core::model_dir::{ComponentDir, ModelDirError};
use sdmesh_core::serve::{serve_while_loading, Health};
use sdmesh_core::{EncodedImages, Error, Result};
use sdmesh_proto::v1;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;

/// Images per decode.
pub const MAX_BATCH: usize = 16;
/// Largest image side in pixels (2048 = 256 latents at SD's scale factor 8, 512 at the x4
/// upscaler's 4).
pub const MAX_IMAGE_SIDE: usize = 2048;
/// Latent channels the limits allow for (SD: 4).
pub const MAX_LATENT_CHANNELS: usize = 16;
/// Pixels one Decode may return (8 images of 1024x1024, or 2 of 2048x2048): bounds the
/// response; [`VaeClient`] splits larger batches.
pub const MAX_DECODED_PIXELS: usize = 8 << 20;
/// Largest legitimate request: an Encode of the most pixels (RGB f32) with its noise (latents
/// at scale factor 8), larger than any Decode's latents.
pub const MAX_REQUEST_BYTES: usize = sdmesh_core::message_limit(sdmesh_core::f32_bytes(
    3 * MAX_DECODED_PIXELS + MAX_LATENT_CHANNELS * MAX_DECODED_PIXELS / 64,
));
/// Largest legitimate Decode response: the most pixels, RGB f32.
pub const MAX_RESPONSE_BYTES: usize = sdmesh_core::message_limit(sdmesh_core::f32_bytes(3 * MAX_DECODED_PIXELS));

#[derive(Debug, Clone, Deserialize)]
struct VaeConfigJson {
    #[serde(default = "three")]
    in_channels: usize,
    #[serde(default = "three")]
    out_channels: usize,
    block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    layers_per_block: usize,
    #[serde(default = "four")]
    latent_channels: usize,
    #[serde(default = "thirty_two")]
    norm_num_groups: usize,
    #[serde(default = "sd_scaling")]
    scaling_factor: f64,
    shift_factor: Option<f64>,
    #[serde(default = "yes")]
    use_quant_conv: bool,
    #[serde(default = "yes")]
    use_post_quant_conv: bool,
    #[serde(default = "yes")]
    mid_block_add_attention: bool,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sd_scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone)]
pub struct VaeOptions {
    /// Diffusers-layout model folder (uses vae/).
    pub model: PathBuf,
    pub device: Device,
    /// Weights and activations (images and latents are returned as f32).
    pub dtype: DType,
    pub queue_capacity: usize,
    /// Decodes with a latent side above this run tile by tile (diffusers' tiled_decode with
    /// tiles of this many latents); 0 = never.
    pub decode_tile_latents: usize,
}

impl VaeOptions {
    pub fn new(model: PathBuf, device: Device) -> Self {
        Self { model, device, dtype: DType::F32, queue_capacity: 64, decode_tile_latents: DEFAULT_DECODE_TILE_LATENTS }
    }
}

/// What a service with `opts` serves ([`v1::VaeInfo::fingerprint`]), without loading the
/// model: folders with the same one can share one service.
pub fn fingerprint(opts: &VaeOptions) -> std::result::Result<String, ModelDirError> {
    ComponentDir::open(&opts.model, "vae")?.fingerprint(&["diffusion_pytorch_model"], &[], &opts.device, opts.dtype)
}

/// Default decode tile: 128 latents (1024 px for SD's VAE, 512 px for the x4 upscaler's), so
/// SD decodes up to 1024x1024 are never tiled and larger ones stay within one tile's memory.
pub const DEFAULT_DECODE_TILE_LATENTS: usize = 128;

/// The vae service's own flags.
#[derive(clap::Args, Debug, Clone)]
pub struct DecodeArgs {
    /// Decodes whose latent height or width exceeds this run in overlapping tiles of this many
    /// latents, blended (diffusers' `enable_tiling()`): memory stays that of one tile. 0 = never.
    #[arg(long, env = "SDMESH_DECODE_TILE_LATENTS", default_value_t = DEFAULT_DECODE_TILE_LATENTS)]
    pub decode_tile_latents: usize,
}

/// Images decoded in one pass at most (several jobs' decodes of one latent size share it).
pub const MAX_IMAGES_PER_PASS: usize = 8;

/// One request, as the batcher sees it: several jobs' requests of one kind and size share a pass.
enum VaeJob {
    Decode(Tensor),
    Encode { images: Tensor, noise: Option<Tensor> },
}

enum VaeOutput {
    Images(Tensor),
    Encoded(EncodedImages),
}

impl Batchable for VaeJob {
    /// Encode or decode, then channels, height, width.
    type Key = (bool, Vec<usize>);
    fn batch_key(&self) -> Self::Key {
        match self {
            Self::Decode(latents) => (false, latents.dims()[1..].to_vec()),
            Self::Encode { images, .. } => (true, images.dims()[1..].to_vec()),
        }
    }
    fn rows(&self) -> usize {
        let t = match self {
            Self::Decode(t) | Self::Encode { images: t, .. } => t,
        };
        t.dims().first().copied().unwrap_or(1)
    }
}

struct Model {
    vae: AutoEncoderKL,
    scaling_factor: f64,
    scale_factor: usize,
    decode_tile_latents: usize,
    device: Device,
    dtype: DType,
}

impl Model {
    /// Scaled latents -> f32 NHWC in [0, 1], as diffusers' pipeline postprocesses them.
    fn decode(&self, latents: Tensor) -> Result<Tensor> {
        let z = (latents.to_device(&self.device)?.to_dtype(self.dtype)? / self.scaling_factor)?;
        // The whole batch in one pass (this crate's VAE fork fixes candle's, which was wrong
        // for every image but the first of a batch).
        let (_, _, h, w) = z.dims4()?;
        let tile = self.decode_tile_latents;
        let image = if tile > 0 && (h > tile || w > tile) {
            self.vae.decode_tiled(&z, tile, self.scale_factor)?
        } else {
            self.vae.decode(&z)?
        };
        let image = image.to_dtype(DType::F32)?;
        let image = ((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        Ok(image.permute((0, 2, 3, 1))?.contiguous()?.to_device(&Device::Cpu)?)
    }

    /// NCHW images in [-1, 1] -> the latent distribution's (mean, std), scaled, f32 on the CPU.
    fn encode(&self, images: Tensor) -> Result<(Tensor, Tensor)> {
        let x = images.to_device(&self.device)?.to_dtype(self.dtype)?;
        let dist = self.vae.encode(&x)?;
        let cpu = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
        Ok((cpu(dist.mean)?, cpu(dist.std)?))
    }

    /// One pass for a batch of same-kind, same-size requests, split back per request.
    fn run(&self, requests: Vec<VaeJob>) -> Result<Vec<VaeOutput>> {
        let sizes: Vec<usize> = requests.iter().map(|r| r.rows()).collect();
        let split = |t: &Tensor| -> Result<Vec<Tensor>> {
            let mut start = 0;
            sizes
                .iter()
                .map(|&n| {
                    start += n;
                    Ok(t.narrow(0, start - n, n)?)
                })
                .collect()
        };
        if let Some(VaeJob::Decode(_)) = requests.first() {
            let latents: Vec<Tensor> = requests
                .into_iter()
                .map(|r| if let VaeJob::Decode(t) = r { t } else { unreachable!("keyed apart") })
                .collect();
            let images = self.decode(Tensor::cat(&latents, 0)?)?;
            return Ok(split(&images)?.into_iter().map(VaeOutput::Images).collect());
        }
        let (images, noises): (Vec<Tensor>, Vec<Option<Tensor>>) =
            requests
                .into_iter()
                .map(|r| {
                    if let VaeJob::Encode { images, noise } = r {
                        (images, noise)
                    } else {
                        unreachable!("keyed apart")
                    }
                })
                .unzip();
        let (mean, std) = self.encode(Tensor::cat(&images, 0)?)?;
        split(&mean)?
            .into_iter()
            .zip(split(&std)?)
            .zip(noises)
            .map(|((mean, std), noise)| {
                // diffusers: sample = mean + std * noise, then * scaling_factor; mode = mean * it.
                let sample = match noise {
                    Some(noise) => Some(((&mean + (&std * noise)?)? * self.scaling_factor)?),
                    None => None,
                };
                Ok(VaeOutput::Encoded(EncodedImages { mode: (mean * self.scaling_factor)?, sample }))
            })
            .collect()
    }
}

pub struct LocalVae {
    worker: BatchWorker<VaeJob, VaeOutput>,
    info: v1::VaeInfo,
}

impl sdmesh_core::serve::ModelIdentity for LocalVae {
    fn fingerprint(&self) -> &str {
        &self.info.fingerprint
    }
}

impl LocalVae {
    pub fn load(opts: &VaeOptions) -> std::result::Result<Self, ModelDirError> {
        let dir = ComponentDir::open(&opts.model, "vae")?;
        let json: VaeConfigJson = dir.json("config.json")?;
        let malformed = |message: String| ModelDirError::Malformed { path: dir.path.join("config.json"), message };
        if json.shift_factor.is_some_and(|s| s != 0.0) || !json.mid_block_add_attention {
            return Err(malformed("shift_factor / mid_block_add_attention false are not supported by this VAE".into()));
        }
        if json.block_out_channels.is_empty() || json.block_out_channels.iter().any(|c| c % json.norm_num_groups != 0) {
            return Err(malformed(format!(
                "block_out_channels {:?} must be non-empty multiples of norm_num_groups {}",
                json.block_out_channels, json.norm_num_groups
            )));
        }
        let config = AutoEncoderKLConfig {
            block_out_channels: json.block_out_channels.clone(),
            layers_per_block: json.layers_per_block,
            latent_channels: json.latent_channels,
            norm_num_groups: json.norm_num_groups,
            use_quant_conv: json.use_quant_conv,
            use_post_quant_conv: json.use_post_quant_conv,
        };
        let dtype = opts.dtype;
        sdmesh_core::attention::tf32_for_upcast_attention(&opts.device, dtype);
        let vb = dir.var_builder(&["diffusion_pytorch_model"], dtype, &opts.device)?;
        let vae = AutoEncoderKL::new(vb, json.in_channels, json.out_channels, config)
            .map_err(|e| ModelDirError::Malformed { path: dir.path.clone(), message: e.to_string() })?;
        let info = v1::VaeInfo {
            latent_channels: json.latent_channels as u32,
            scale_factor: 1 << (json.block_out_channels.len() - 1),
            scaling_factor: json.scaling_factor,
            fingerprint: fingerprint(opts)?,
        };
        let model = Model {
            vae,
            scaling_factor: json.scaling_factor,
            scale_factor: info.scale_factor as usize,
            decode_tile_latents: opts.decode_tile_latents,
            device: opts.device.clone(),
            dtype,
        };
        let warm_up = || -> Result<Tensor> {
            model.decode(Tensor::zeros((1, json.latent_channels, 8, 8), DType::F32, &Device::Cpu)?)
        };
        warm_up().map_err(|e| ModelDirError::Malformed {
            path: dir.path.clone(),
            message: format!("warm-up failed: {e}"),
        })?;
        let batching = BatchOptions {
            queue_capacity: opts.queue_capacity,
            max_rows: MAX_IMAGES_PER_PASS,
            max_wait: Duration::ZERO,
        };
        // Concurrent jobs' requests of one kind and size run in one pass.
        let worker = BatchWorker::spawn("vae", batching, move |requests: Vec<VaeJob>| model.run(requests));
        Ok(Self { worker, info })
    }

    /// Decode passes run so far (each may serve several requests).
    pub fn batches_run(&self) -> u64 {
        self.worker.batches_run()
    }
}

#[async_trait::async_trait]
impl sdmesh_core::Vae for LocalVae {
    async fn decode(&self, latents: Tensor) -> Result<Tensor> {
        let c = self.info.latent_channels as usize;
        let f = self.info.scale_factor as usize;
        let max_latent_side = MAX_IMAGE_SIDE / f;
        match latents.dims() {
            &[n, ch, h, w]
                if ch == c
                    && (1..=MAX_BATCH).contains(&n)
                    && (1..=max_latent_side).contains(&h)
                    && (1..=max_latent_side).contains(&w) => {}
            dims => {
                return Err(Error::invalid(format!(
                    "latents: shape {dims:?}; expected [1..={MAX_BATCH}, {c}, 1..={max_latent_side}, 1..={max_latent_side}]"
                )))
            }
        }
        let pixels = latents.dims().iter().skip(2).product::<usize>() * latents.dim(0)? * f * f;
        if pixels > MAX_DECODED_PIXELS {
            return Err(Error::invalid(format!(
                "latents: shape {:?} decodes to {pixels} pixels; one call returns at most {MAX_DECODED_PIXELS} \
                 (send fewer images per call)",
                latents.dims()
            )));
        }
        match self.worker.call(VaeJob::Decode(latents.to_dtype(DType::F32)?)).await? {
            VaeOutput::Images(images) => Ok(images),
            VaeOutput::Encoded(_) => Err(Error::internal("vae worker answered a decode with latents")),
        }
    }

    async fn encode(&self, images: Tensor, noise: Option<Tensor>) -> Result<EncodedImages> {
        let f = self.info.scale_factor as usize;
        let (n, h, w) = match images.dims() {
            &[n, 3, h, w]
                if (1..=MAX_BATCH).contains(&n)
                    && h > 0
                    && w > 0
                    && h % f == 0
                    && w % f == 0
                    && h <= MAX_IMAGE_SIDE
                    && w <= MAX_IMAGE_SIDE =>
            {
                (n, h, w)
            }
            dims => {
                return Err(Error::invalid(format!(
                    "images: shape {dims:?}; expected [1..={MAX_BATCH}, 3, height, width] with height and width \
                     multiples of {f} up to {}",
                    MAX_IMAGE_SIDE
                )))
            }
        };
        if n * h * w > MAX_DECODED_PIXELS {
            return Err(Error::invalid(format!(
                "images: {n} images of {w}x{h} are {} pixels; one call takes at most {MAX_DECODED_PIXELS} \
                 (send fewer images per call)",
                n * h * w
            )));
        }
        let latent_shape = [n, self.info.latent_channels as usize, h / f, w / f];
        if let Some(noise) = &noise {
            if noise.dims() != latent_shape {
                return Err(Error::invalid(format!(
                    "noise: shape {:?}, expected {latent_shape:?} (the latents' shape)",
                    noise.dims()
                )));
            }
        }
        let noise = noise.map(|t| t.to_dtype(DType::F32)).transpose()?;
        match self.worker.call(VaeJob::Encode { images: images.to_dtype(DType::F32)?, noise }).await? {
            VaeOutput::Encoded(encoded) => Ok(encoded),
            VaeOutput::Images(_) => Err(Error::internal("vae worker answered an encode with images")),
        }
    }

    async fn info(&self) -> Result<v1::VaeInfo> {
        Ok(self.info.clone())
    }
}

#[derive(Clone)]
pub struct VaeService {
    local: Arc<OnceCell<LocalVae>>,
}

impl VaeService {
    /// A service over an already loaded VAE (in-process use and tests).
    pub fn ready(local: LocalVae) -> Self {
        Self { local: Arc::new(OnceCell::new_with(Some(local))) }
    }
}

#[tonic::async_trait]
impl v1::vae_server::Vae for VaeService {
    async fn decode(
        &self,
        request: tonic::Request<v1::DecodeRequest>,
    ) -> std::result::Result<tonic::Response<v1::DecodeResponse>, tonic::Status> {
        let local = self.local.get().ok_or_else(sdmesh_core::loading)?;
        let latents =
            sdmesh_proto::required(&request.get_ref().latents, "latents")?.to_candle("latents", &Device::Cpu)?;
        let images = sdmesh_core::Vae::decode(local, latents).await?;
        Ok(tonic::Response::new(v1::DecodeResponse { images: Some(v1::Tensor::from_candle(&images)?) }))
    }

    async fn encode(
        &self,
        request: tonic::Request<v1::EncodeImagesRequest>,
    ) -> std::result::Result<tonic::Response<v1::EncodeImagesResponse>, tonic::Status> {
        let local = self.local.get().ok_or_else(sdmesh_core::loading)?;
        let r = request.get_ref();
        let images = sdmesh_proto::required(&r.images, "images")?.to_candle("images", &Device::Cpu)?;
        let noise = match (&r.noise, r.seed) {
            (Some(t), None) => Some(t.to_candle("noise", &Device::Cpu)?),
            (Some(_), Some(_)) => return Err(Error::invalid("give noise or seed, not both").into()),
            (None, Some(seed)) => {
                // Drawn as diffusers' latent_dist.sample(generator) draws it.
                let (n, _, h, w) = images.dims4().map_err(|_| Error::invalid("images: expected [n, 3, h, w]"))?;
                let f = local.info.scale_factor as usize;
                let shape = [n, local.info.latent_channels as usize, h / f, w / f];
                Some(sdmesh_core::torch_rng::randn_tensor(seed, &shape, &Device::Cpu).map_err(Error::from)?)
            }
            (None, None) => None,
        };
        let encoded = sdmesh_core::Vae::encode(local, images, noise).await?;
        Ok(tonic::Response::new(v1::EncodeImagesResponse {
            mode: Some(v1::Tensor::from_candle(&encoded.mode)?),
            sample: encoded.sample.as_ref().map(v1::Tensor::from_candle).transpose()?,
        }))
    }

    async fn info(
        &self,
        _: tonic::Request<v1::InfoRequest>,
    ) -> std::result::Result<tonic::Response<v1::VaeInfo>, tonic::Status> {
        Ok(tonic::Response::new(self.local.get().ok_or_else(sdmesh_core::loading)?.info.clone()))
    }
}

/// Serves the VAE on `listener` until `shutdown` (NOT_SERVING while loading).
pub async fn run(
    opts: VaeOptions,
    listener: TcpListener,
    shutdown: sdmesh_core::serve::Shutdown,
) -> anyhow::Result<()> {
    let health = Health::new(&[v1::vae_server::SERVICE_NAME]).await;
    let service = VaeService { local: Arc::new(OnceCell::new()) };
    let routes = health.routes().add_service(
        v1::vae_server::VaeServer::new(service.clone())
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES),
    );
    let load = move || LocalVae::load(&opts);
    serve_while_loading("vae", listener, health, routes, shutdown, load, |local| {
        let _ = service.local.set(local);
    })
    .await
}

/// Images of `h` x `w` latents one Decode call may carry (scale factor 8).
pub fn images_per_call(h: usize, w: usize) -> usize {
    (MAX_DECODED_PIXELS / (h * 8 * w * 8).max(1)).clamp(1, MAX_BATCH)
}

/// A remote vae service.
#[derive(Clone)]
pub struct VaeClient {
    inner: v1::vae_client::VaeClient<sdmesh_core::client::ReplicaSet>,
}

impl VaeClient {
    pub fn new(url: &str) -> Result<Self> {
        let inner = v1::vae_client::VaeClient::new(sdmesh_core::client::lazy_channel(url)?)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES);
        Ok(Self { inner })
    }
}

#[async_trait::async_trait]
impl sdmesh_core::Vae for VaeClient {
    /// Decodes in as few calls as the response limit allows (one image per call at worst).
    async fn decode(&self, latents: Tensor) -> Result<Tensor> {
        let (n, _, h, w) = latents.dims4()?;
        let per_call = images_per_call(h, w);
        let mut images = Vec::new();
        for start in (0..n).step_by(per_call) {
            let chunk = latents.narrow(0, start, per_call.min(n - start))?;
            let request = v1::DecodeRequest { latents: Some(v1::Tensor::from_candle(&chunk)?) };
            let out = unary(&self.inner, &request, |mut c, r| async move { c.decode(r).await }).await?;
            images.push(sdmesh_proto::required(&out.images, "images")?.to_candle("images", &Device::Cpu)?);
        }
        Ok(Tensor::cat(&images, 0)?)
    }

    /// Encodes in as few calls as the request limit allows.
    async fn encode(&self, images: Tensor, noise: Option<Tensor>) -> Result<EncodedImages> {
        let (n, _, h, w) = images.dims4()?;
        let per_call = (MAX_DECODED_PIXELS / (h * w).max(1)).clamp(1, MAX_BATCH);
        let (mut modes, mut samples) = (Vec::new(), Vec::new());
        for start in (0..n).step_by(per_call) {
            let len = per_call.min(n - start);
            let request = v1::EncodeImagesRequest {
                images: Some(v1::Tensor::from_candle(&images.narrow(0, start, len)?)?),
                noise: match &noise {
                    Some(t) => Some(v1::Tensor::from_candle(&t.narrow(0, start, len)?)?),
                    None => None,
                },
                seed: None,
            };
            let out = unary(&self.inner, &request, |mut c, r| async move { c.encode(r).await }).await?;
            modes.push(sdmesh_proto::required(&out.mode, "mode")?.to_candle("mode", &Device::Cpu)?);
            if noise.is_some() {
                samples.push(sdmesh_proto::required(&out.sample, "sample")?.to_candle("sample", &Device::Cpu)?);
            }
        }
        let sample = if noise.is_some() { Some(Tensor::cat(&samples, 0)?) } else { None };
        Ok(EncodedImages { mode: Tensor::cat(&modes, 0)?, sample })
    }

    async fn info(&self) -> Result<v1::VaeInfo> {
        // Retried as every call is: within a job, a dead replica costs a retry.
        unary(&self.inner, &v1::InfoRequest {}, |mut c, r| async move { c.info(r).await }).await
    }
}
