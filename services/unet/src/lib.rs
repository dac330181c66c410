//! unet service: one denoising step per request, classifier-free guidance inside.
//!
//! A request carries the latents, the timestep, the conditional and unconditional
//! embeddings and the guidance scale; the service runs the doubled forward pass when guidance
//! is on and returns the guided model output (epsilon or v, whatever the checkpoint predicts).

pub mod config;

use candle_core::{DType, Device, Tensor, D};
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;
use sdmesh_core::model_dir::{ComponentDir, ModelDirError};
use sdmesh_core::serve::{serve, Health, ServingStatus};
use sdmesh_core::telemetry::traced;
use sdmesh_core::{DenoiseInput, Error, ModelWorker, Result};
use sdmesh_proto::v1;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;

/// Images per step (each doubled under guidance).
pub const MAX_BATCH: usize = 16;
/// Latent side: 256 latents = 2048 pixels.
pub const MAX_LATENT_SIDE: usize = 256;
/// Conditioning tokens per sample.
pub const MAX_CONTEXT: usize = 1024;

#[derive(Debug, Clone)]
pub struct UnetOptions {
    /// Diffusers-layout model folder (uses unet/).
    pub model: PathBuf,
    pub device: Device,
    pub queue_capacity: usize,
}

struct Model {
    unet: UNet2DConditionModel,
    device: Device,
    dtype: DType,
}

pub struct LocalUnet {
    worker: ModelWorker<DenoiseInput, Tensor>,
    info: v1::UnetInfo,
}

impl LocalUnet {
    pub fn load(opts: &UnetOptions) -> std::result::Result<Self, ModelDirError> {
        let dir = ComponentDir::open(&opts.model, "unet")?;
        let json: config::UnetConfigJson = dir.json("config.json")?;
        let malformed = |message: String| ModelDirError::Malformed { path: dir.path.join("config.json"), message };
        let cfg = json.to_candle().map_err(malformed)?;
        let dtype = DType::F32;
        let vb = dir.var_builder(&["diffusion_pytorch_model"], dtype, &opts.device)?;
        let unet = UNet2DConditionModel::new(vb, json.in_channels, json.out_channels, false, cfg)
            .map_err(|e| ModelDirError::Malformed { path: dir.path.clone(), message: e.to_string() })?;
        let info = v1::UnetInfo {
            in_channels: json.in_channels as u32,
            out_channels: json.out_channels as u32,
            cross_attention_dim: json.cross_attention_dim as u32,
            sample_size: json.sample_size.unwrap_or(64) as u32,
        };
        let model = Model { unet, device: opts.device.clone(), dtype };
        // Warm-up with a small guided step before reporting SERVING.
        let warm_up = || -> Result<Tensor> {
            let context = Tensor::zeros((1, 77, json.cross_attention_dim), DType::F32, &Device::Cpu)?;
            model.denoise(DenoiseInput {
                latents: Tensor::zeros((1, json.in_channels, 8, 8), DType::F32, &Device::Cpu)?,
                timestep: 1.0,
                cond: context.clone(),
                uncond: Some(context),
                guidance_scale: 2.0,
                guidance_rescale: 0.5,
            })
        };
        warm_up().map_err(|e| ModelDirError::Malformed {
            path: dir.path.clone(),
            message: format!("warm-up failed: {e}"),
        })?;
        let worker = ModelWorker::spawn("unet", opts.queue_capacity, move |input| model.denoise(input));
        Ok(Self { worker, info })
    }

    fn validate(&self, x: &DenoiseInput) -> Result<()> {
        let info = &self.info;
        let (n, c, h, w) = x.latents.dims4().map_err(|_| {
            Error::invalid(format!("latents: shape {:?}, expected [batch, channels, height, width]", x.latents.dims()))
        })?;
        if c != info.in_channels as usize
            || n == 0
            || n > MAX_BATCH
            || h == 0
            || w == 0
            || h > MAX_LATENT_SIDE
            || w > MAX_LATENT_SIDE
        {
            return Err(Error::invalid(format!(
                "latents: shape {:?}; expected [1..={MAX_BATCH}, {}, 1..={MAX_LATENT_SIDE}, 1..={MAX_LATENT_SIDE}]",
                x.latents.dims(),
                info.in_channels
            )));
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
    fn denoise(&self, x: DenoiseInput) -> Result<Tensor> {
        let n = x.latents.dim(0)?;
        let to_model = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?) };
        let per_sample = |t: &Tensor| -> Result<Tensor> {
            let t = to_model(t)?;
            Ok(if t.dim(0)? == n { t } else { t.repeat((n, 1, 1))? })
        };
        let latents = to_model(&x.latents)?;
        let cond = per_sample(&x.cond)?;
        let out = match (&x.uncond, x.uses_guidance()) {
            (Some(uncond), true) => {
                // One forward over [uncond; cond], as diffusers' pipeline batches it.
                let input = Tensor::cat(&[&latents, &latents], 0)?;
                let context = Tensor::cat(&[&per_sample(uncond)?, &cond], 0)?;
                let out = self.unet.forward(&input, x.timestep, &context)?.to_dtype(DType::F32)?;
                let (u, c) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
                let guided = (&u + ((&c - &u)? * x.guidance_scale as f64)?)?;
                if x.guidance_rescale > 0.0 {
                    rescale_noise_cfg(&guided, &c, x.guidance_rescale as f64)?
                } else {
                    guided
                }
            }
            _ => self.unet.forward(&latents, x.timestep, &cond)?.to_dtype(DType::F32)?,
        };
        Ok(out.to_device(&Device::Cpu)?)
    }
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
        self.worker.call(input).await
    }

    async fn info(&self) -> Result<v1::UnetInfo> {
        Ok(self.info)
    }
}

/// Wire request -> domain input (tensors decoded and checked against their byte length).
pub fn decode_request(r: &v1::DenoiseRequest) -> Result<DenoiseInput> {
    let cpu = &Device::Cpu;
    Ok(DenoiseInput {
        latents: sdmesh_proto::required(&r.latents, "latents")?.to_candle("latents", cpu)?.to_dtype(DType::F32)?,
        timestep: r.timestep,
        cond: sdmesh_proto::required(&r.cond, "cond")?.to_candle("cond", cpu)?.to_dtype(DType::F32)?,
        uncond: match &r.uncond {
            Some(t) => Some(t.to_candle("uncond", cpu)?.to_dtype(DType::F32)?),
            None => None,
        },
        guidance_scale: r.guidance_scale,
        guidance_rescale: r.guidance_rescale,
    })
}

#[derive(Clone)]
pub struct UnetService {
    local: Arc<OnceCell<LocalUnet>>,
}

#[tonic::async_trait]
impl v1::unet_server::Unet for UnetService {
    async fn denoise(
        &self,
        request: tonic::Request<v1::DenoiseRequest>,
    ) -> std::result::Result<tonic::Response<v1::DenoiseResponse>, tonic::Status> {
        let local = self.local.get().ok_or_else(sdmesh_core::loading)?;
        let input = decode_request(request.get_ref())?;
        let out = sdmesh_core::Denoiser::denoise(local, input).await?;
        Ok(tonic::Response::new(v1::DenoiseResponse { model_output: Some(v1::Tensor::from_candle(&out)?) }))
    }

    async fn info(
        &self,
        _: tonic::Request<v1::InfoRequest>,
    ) -> std::result::Result<tonic::Response<v1::UnetInfo>, tonic::Status> {
        Ok(tonic::Response::new(self.local.get().ok_or_else(sdmesh_core::loading)?.info))
    }
}

/// Serves the UNet on `listener` until `shutdown` (NOT_SERVING while loading).
pub async fn run(
    opts: UnetOptions,
    listener: TcpListener,
    shutdown: sdmesh_core::serve::Shutdown,
) -> anyhow::Result<()> {
    let health = Health::new(&[v1::unet_server::SERVICE_NAME]).await;
    let service = UnetService { local: Arc::new(OnceCell::new()) };
    let routes = health.routes().add_service(
        v1::unet_server::UnetServer::new(service.clone())
            .max_decoding_message_size(sdmesh_core::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(sdmesh_core::MAX_MESSAGE_BYTES),
    );
    let server = tokio::spawn(serve(listener, routes, health.clone(), shutdown));
    let local = tokio::task::spawn_blocking(move || LocalUnet::load(&opts)).await??;
    let _ = service.local.set(local);
    health.set(ServingStatus::Serving).await;
    tracing::info!("unet ready");
    server.await??;
    Ok(())
}

/// A remote unet service.
#[derive(Clone)]
pub struct UnetClient {
    inner: v1::unet_client::UnetClient<tonic::transport::Channel>,
}

impl UnetClient {
    pub fn new(url: &str) -> Result<Self> {
        let inner = v1::unet_client::UnetClient::new(sdmesh_core::client::lazy_channel(url)?)
            .max_decoding_message_size(sdmesh_core::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(sdmesh_core::MAX_MESSAGE_BYTES);
        Ok(Self { inner })
    }
}

#[async_trait::async_trait]
impl sdmesh_core::Denoiser for UnetClient {
    async fn denoise(&self, x: DenoiseInput) -> Result<Tensor> {
        let request = v1::DenoiseRequest {
            latents: Some(v1::Tensor::from_candle(&x.latents)?),
            timestep: x.timestep,
            cond: Some(v1::Tensor::from_candle(&x.cond)?),
            uncond: match (&x.uncond, x.uses_guidance()) {
                (Some(u), true) => Some(v1::Tensor::from_candle(u)?),
                _ => None,
            },
            guidance_scale: x.guidance_scale,
            guidance_rescale: x.guidance_rescale,
        };
        let out = self.inner.clone().denoise(traced(request)).await?.into_inner();
        Ok(sdmesh_proto::required(&out.model_output, "model_output")?.to_candle("model_output", &Device::Cpu)?)
    }

    async fn info(&self) -> Result<v1::UnetInfo> {
        Ok(self.inner.clone().info(traced(v1::InfoRequest {})).await?.into_inner())
    }
}
