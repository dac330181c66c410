//! depth service: monocular relative depth with MiDaS DPT-hybrid (`Intel/dpt-hybrid-midas`, the
//! `depth_estimator` of stabilityai/stable-diffusion-2-depth), as transformers'
//! `DPTForDepthEstimation` + `DPTImageProcessor` compute it.
//!
//! The model folder is either a diffusers pipeline folder (`depth_estimator/` +
//! `feature_extractor/`) or a transformers folder (`config.json`, `model.safetensors`,
//! `preprocessor_config.json` at its root).

pub mod dpt;
pub mod preprocess;

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use dpt::{DptConfig, DptDepth};
use preprocess::{Preprocessor, PreprocessorConfig};
use sdmesh_core::client::unary;
use sdmesh_core::model_dir::{read_json, ComponentDir, ModelDirError};
use sdmesh_core::serve::{serve_while_loading, Health};
use sdmesh_core::{images, Error, ModelWorker, Result};
use sdmesh_proto::v1;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;

/// Images per Estimate call.
pub const MAX_IMAGES: usize = 16;
/// Pixels of one input image (checked from its header before decoding).
pub const MAX_IMAGE_PIXELS: usize = 4096 * 4096;
/// Encoded bytes of all images of one call.
pub const MAX_ENCODED_BYTES: usize = 64 << 20;
/// Longest side of the model input after preprocessing (keep_aspect_ratio can enlarge an
/// elongated image's long side well beyond the configured size).
pub const MAX_MODEL_SIDE: usize = 2048;
/// Bytes of tensors and PNGs one Estimate response may carry (see [`response_bytes`]).
pub const MAX_RESPONSE_PAYLOAD: usize = 128 << 20;
/// Largest legitimate request: the encoded images.
pub const MAX_REQUEST_BYTES: usize = sdmesh_core::message_limit(MAX_ENCODED_BYTES);
/// Largest legitimate response.
pub const MAX_RESPONSE_BYTES: usize = sdmesh_core::message_limit(MAX_RESPONSE_PAYLOAD);
/// Images run through the model together (same preprocessed size).
const MAX_IMAGES_PER_PASS: usize = 4;

#[derive(Debug, Clone)]
pub struct DepthOptions {
    /// A diffusers pipeline folder (uses depth_estimator/ and feature_extractor/) or a
    /// transformers DPT folder.
    pub model: PathBuf,
    pub device: Device,
    /// Weights and activations (depth maps are returned as f32).
    pub dtype: DType,
    pub queue_capacity: usize,
}

impl DepthOptions {
    /// f32, a queue of 64 requests.
    pub fn new(model: PathBuf, device: Device) -> Self {
        Self { model, device, dtype: DType::F32, queue_capacity: 64 }
    }
}

/// What to return besides the depth at the model's resolution.
#[derive(Debug, Clone, Copy, Default)]
pub struct EstimateOptions {
    /// Also resize each map (bicubic, as `post_process_depth_estimation`) to its image's size.
    pub resize_to_input: bool,
    /// Also encode each map (the resized one when there is one) as a 16-bit greyscale PNG.
    pub return_png: bool,
}

/// One image's depth.
#[derive(Debug, Clone)]
pub struct DepthMap {
    /// predicted_depth f32 [h, w] at the model's input resolution, on the CPU.
    pub depth: Tensor,
    /// f32 [image height, image width], when asked for.
    pub resized: Option<Tensor>,
    /// 16-bit greyscale PNG (min..max -> 0..65535) of `resized` if set, else of `depth`.
    pub png: Option<Vec<u8>>,
}

/// An upper bound on the bytes one image adds to a response: the f32 maps and the PNG
/// (2 bytes a pixel + a filter byte a row, incompressible worst case + zlib/PNG framing).
pub fn response_bytes(model_hw: (usize, usize), image_hw: (usize, usize), opts: EstimateOptions) -> usize {
    let model = model_hw.0 * model_hw.1;
    let image = image_hw.0 * image_hw.1;
    let mut n = 4 * model + 64;
    if opts.resize_to_input {
        n += 4 * image + 64;
    }
    if opts.return_png {
        let (h, w) = if opts.resize_to_input { image_hw } else { model_hw };
        let raw = h * (2 * w + 1);
        n += raw + raw / 1000 + 4096;
    }
    n
}

struct DepthJob {
    images: Vec<Bytes>,
    opts: EstimateOptions,
}

struct Model {
    dpt: DptDepth,
    pre: Preprocessor,
    device: Device,
}

impl Model {
    fn run(&self, job: DepthJob) -> Result<Vec<DepthMap>> {
        // Decode and preprocess every image first (a bad one fails the call before any compute).
        let mut inputs = Vec::with_capacity(job.images.len());
        for (i, bytes) in job.images.iter().enumerate() {
            let rgb = images::decode_rgb_limited(bytes, MAX_IMAGE_PIXELS as u64).map_err(|e| match e {
                Error::InvalidArgument(m) => Error::invalid(format!("images[{i}]: {m}")),
                other => other,
            })?;
            let image_hw = (rgb.height() as usize, rgb.width() as usize);
            inputs.push((image_hw, self.pre.pixel_values(&rgb, &self.device)?));
        }
        // Same-size inputs share a forward pass.
        let mut by_size: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
        for (i, (_, pv)) in inputs.iter().enumerate() {
            by_size.entry(pv.dims().to_vec()).or_default().push(i);
        }
        let mut depths: Vec<Option<Tensor>> = vec![None; inputs.len()];
        for indices in by_size.values() {
            for chunk in indices.chunks(MAX_IMAGES_PER_PASS) {
                let batch = Tensor::cat(&chunk.iter().map(|&i| inputs[i].1.clone()).collect::<Vec<_>>(), 0)?;
                let out = self.dpt.forward(&batch)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                for (k, &i) in chunk.iter().enumerate() {
                    depths[i] = Some(out.get(k)?);
                }
            }
        }
        inputs
            .iter()
            .zip(depths)
            .map(|(&((h, w), _), depth)| {
                let depth = depth.ok_or_else(|| Error::internal("an image was not run"))?;
                let resized = if job.opts.resize_to_input {
                    // post_process_depth_estimation: F.interpolate(depth[None, None], size, "bicubic").
                    let (dh, dw) = depth.dims2()?;
                    let up = if (dh, dw) == (h, w) {
                        depth.clone()
                    } else {
                        images::interpolate_bicubic(&depth.unsqueeze(0)?.unsqueeze(0)?, h as _, w as _)?
                            .squeeze(0)?
                            .squeeze(0)?
                    };
                    Some(up)
                } else {
                    None
                };
                let png =
                    if job.opts.return_png { Some(images::png16(resized.as_ref().unwrap_or(&depth))?) } else { None };
                Ok(DepthMap { depth, resized, png })
            })
            .collect()
    }
}

pub struct LocalDepth {
    worker: ModelWorker<DepthJob, Vec<DepthMap>>,
    pre: Preprocessor,
    patch: usize,
    info: v1::DepthInfo,
}

/// Loads the model and its preprocessing from a pipeline or transformers folder (see
/// [`DepthOptions::model`]), checking that the configuration is one this crate runs.
pub fn load_model(
    model: &Path,
    device: &Device,
    dtype: DType,
) -> std::result::Result<(DptDepth, Preprocessor), ModelDirError> {
    let (dir, pre_path) = ComponentDir::open_with_preprocessor(model, "depth_estimator")?;
    load_located(&dir, &pre_path, device, dtype)
}

/// [`load_model`] from the folder and preprocessor file it found.
fn load_located(
    dir: &ComponentDir,
    pre_path: &Path,
    device: &Device,
    dtype: DType,
) -> std::result::Result<(DptDepth, Preprocessor), ModelDirError> {
    let config: DptConfig = dir.json("config.json")?;
    config.validate().map_err(|message| ModelDirError::Malformed { path: dir.path.join("config.json"), message })?;
    let pre_config: PreprocessorConfig = read_json(pre_path)?;
    let pre = Preprocessor::new(pre_config)
        .map_err(|message| ModelDirError::Malformed { path: pre_path.to_path_buf(), message })?;
    let patch = config.patch();
    let c = &pre.config;
    let runnable = if !c.do_resize {
        true // checked per image
    } else if c.keep_aspect_ratio {
        c.ensure_multiple_of % patch == 0
    } else {
        let (h, w) = pre.target_size(pre.size.0, pre.size.1);
        h > 0 && w > 0 && h % patch == 0 && w % patch == 0
    };
    if !runnable {
        return Err(ModelDirError::Malformed {
            path: pre_path.to_path_buf(),
            message: format!(
                "size {:?} / ensure_multiple_of {} do not give sides that are multiples of the model's patch size {patch}",
                pre.size, c.ensure_multiple_of
            ),
        });
    }
    let vb = dir.var_builder(&["model"], dtype, device)?;
    let dpt = DptDepth::new(vb, &config)
        .map_err(|e| ModelDirError::Malformed { path: dir.path.clone(), message: e.to_string() })?;
    Ok((dpt, pre))
}

impl sdmesh_core::serve::ModelIdentity for LocalDepth {
    fn fingerprint(&self) -> &str {
        &self.info.fingerprint
    }
}

impl LocalDepth {
    pub fn load(opts: &DepthOptions) -> std::result::Result<Self, ModelDirError> {
        let (dir, pre_path) = ComponentDir::open_with_preprocessor(&opts.model, "depth_estimator")?;
        let (dpt, pre) = load_located(&dir, &pre_path, &opts.device, opts.dtype)?;
        let patch = dpt.patch_size();
        let c = &pre.config;
        let info = v1::DepthInfo {
            height: pre.size.0 as u32,
            width: pre.size.1 as u32,
            ensure_multiple_of: c.ensure_multiple_of as u32,
            keep_aspect_ratio: c.keep_aspect_ratio,
            fingerprint: dir.fingerprint(&["model"], &[pre_path], &opts.device, opts.dtype)?,
        };
        let model = Model { dpt, pre: pre.clone(), device: opts.device.clone() };
        let warm = Tensor::zeros((1, 3, 2 * patch, 2 * patch), DType::F32, &opts.device)
            .and_then(|x| model.dpt.forward(&x))
            .map_err(|e| ModelDirError::Malformed {
                path: opts.model.clone(),
                message: format!("warm-up failed: {e}"),
            })?;
        drop(warm);
        let worker = ModelWorker::spawn("depth", opts.queue_capacity, move |job| model.run(job));
        Ok(Self { worker, pre, patch, info })
    }

    /// Checks a request against the limits before it is queued (from the image headers only).
    fn check(&self, images: &[Bytes], opts: EstimateOptions) -> Result<()> {
        if images.is_empty() || images.len() > MAX_IMAGES {
            return Err(Error::invalid(format!("images: {} given; expected 1..={MAX_IMAGES} per call", images.len())));
        }
        let total: usize = images.iter().map(Bytes::len).sum();
        if total > MAX_ENCODED_BYTES {
            return Err(Error::invalid(format!(
                "images: {total} encoded bytes; one call takes at most {MAX_ENCODED_BYTES} (send fewer images per call)"
            )));
        }
        let mut response = 0usize;
        for (i, bytes) in images.iter().enumerate() {
            if bytes.is_empty() {
                return Err(Error::invalid(format!("images[{i}]: empty (expected a PNG or JPEG file)")));
            }
            let (w, h) = image::ImageReader::new(std::io::Cursor::new(bytes.as_ref()))
                .with_guessed_format()
                .ok()
                .filter(|r| matches!(r.format(), Some(image::ImageFormat::Png | image::ImageFormat::Jpeg)))
                .ok_or_else(|| Error::invalid(format!("images[{i}]: not a PNG or JPEG image")))?
                .into_dimensions()
                .map_err(|e| Error::invalid(format!("images[{i}]: unreadable image header: {e}")))?;
            let (h, w) = (h as usize, w as usize);
            if h == 0 || w == 0 || h * w > MAX_IMAGE_PIXELS {
                return Err(Error::invalid(format!(
                    "images[{i}]: {w}x{h} pixels; expected 1..={MAX_IMAGE_PIXELS} pixels"
                )));
            }
            let (th, tw) = self.pre.target_size(h, w);
            if th == 0 || tw == 0 {
                return Err(Error::invalid(format!(
                    "images[{i}]: {w}x{h} is too elongated: keeping its aspect ratio gives a {tw}x{th} model input"
                )));
            }
            if th > MAX_MODEL_SIDE || tw > MAX_MODEL_SIDE {
                return Err(Error::invalid(format!(
                    "images[{i}]: {w}x{h} would be a {tw}x{th} model input; sides are limited to {MAX_MODEL_SIDE} \
                     (keeping the aspect ratio enlarges elongated images)"
                )));
            }
            if th % self.patch != 0 || tw % self.patch != 0 {
                return Err(Error::invalid(format!(
                    "images[{i}]: {w}x{h} gives a {tw}x{th} model input; its sides must be multiples of {}",
                    self.patch
                )));
            }
            response += response_bytes((th, tw), (h, w), opts);
        }
        if response > MAX_RESPONSE_PAYLOAD {
            return Err(Error::invalid(format!(
                "the response would take up to {response} bytes; one call returns at most {MAX_RESPONSE_PAYLOAD} \
                 (send fewer images per call, or skip resize_to_input / return_png)"
            )));
        }
        Ok(())
    }

    /// Depth for each image, with the optional resized map and PNG.
    pub async fn estimate_maps(&self, images: Vec<Bytes>, opts: EstimateOptions) -> Result<Vec<DepthMap>> {
        self.check(&images, opts)?;
        self.worker.call(DepthJob { images, opts }).await
    }

    pub fn info(&self) -> v1::DepthInfo {
        self.info.clone()
    }
}

#[async_trait::async_trait]
impl sdmesh_core::DepthEstimator for LocalDepth {
    async fn estimate(&self, images: Vec<Bytes>) -> Result<Vec<Tensor>> {
        let maps = self.estimate_maps(images, EstimateOptions::default()).await?;
        Ok(maps.into_iter().map(|m| m.depth).collect())
    }

    async fn info(&self) -> Result<v1::DepthInfo> {
        Ok(self.info.clone())
    }
}

#[derive(Clone)]
pub struct DepthService {
    local: Arc<OnceCell<LocalDepth>>,
}

impl DepthService {
    /// A service over an already loaded model (tests, in-process use).
    pub fn new(local: LocalDepth) -> Self {
        Self { local: Arc::new(OnceCell::new_with(Some(local))) }
    }

    /// The tonic server with this service's message limits.
    pub fn server(self) -> v1::depth_server::DepthServer<Self> {
        v1::depth_server::DepthServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES)
    }
}

#[tonic::async_trait]
impl v1::depth_server::Depth for DepthService {
    async fn estimate(
        &self,
        request: tonic::Request<v1::EstimateDepthRequest>,
    ) -> std::result::Result<tonic::Response<v1::EstimateDepthResponse>, tonic::Status> {
        let local = self.local.get().ok_or_else(sdmesh_core::loading)?;
        let r = request.into_inner();
        let opts = EstimateOptions { resize_to_input: r.resize_to_input, return_png: r.return_png };
        let maps = local.estimate_maps(r.images, opts).await?;
        let maps = maps
            .iter()
            .map(|m| {
                Ok(v1::DepthMap {
                    depth: Some(v1::Tensor::from_candle(&m.depth)?),
                    resized: m.resized.as_ref().map(v1::Tensor::from_candle).transpose()?,
                    png: m.png.clone().unwrap_or_default(),
                })
            })
            .collect::<std::result::Result<Vec<_>, sdmesh_proto::TensorError>>()
            .map_err(Error::from)?;
        Ok(tonic::Response::new(v1::EstimateDepthResponse { maps }))
    }

    async fn info(
        &self,
        _: tonic::Request<v1::InfoRequest>,
    ) -> std::result::Result<tonic::Response<v1::DepthInfo>, tonic::Status> {
        Ok(tonic::Response::new(self.local.get().ok_or_else(sdmesh_core::loading)?.info.clone()))
    }
}

/// Serves depth estimation on `listener` until `shutdown` (NOT_SERVING while loading).
pub async fn run(
    opts: DepthOptions,
    listener: TcpListener,
    shutdown: sdmesh_core::serve::Shutdown,
) -> anyhow::Result<()> {
    let health = Health::new(&[v1::depth_server::SERVICE_NAME]).await;
    let service = DepthService { local: Arc::new(OnceCell::new()) };
    let routes = health.routes().add_service(service.clone().server());
    let load = move || LocalDepth::load(&opts);
    serve_while_loading("depth", listener, health, routes, shutdown, load, |local| {
        let _ = service.local.set(local);
    })
    .await
}

/// A remote depth service.
#[derive(Clone)]
pub struct DepthClient {
    inner: v1::depth_client::DepthClient<sdmesh_core::client::ReplicaSet>,
}

impl DepthClient {
    pub fn new(url: &str) -> Result<Self> {
        let inner = v1::depth_client::DepthClient::new(sdmesh_core::client::lazy_channel(url)?)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES);
        Ok(Self { inner })
    }

    /// One Estimate call (the request must fit the service's limits).
    pub async fn estimate_maps(&self, images: Vec<Bytes>, opts: EstimateOptions) -> Result<Vec<DepthMap>> {
        let n = images.len();
        let request =
            v1::EstimateDepthRequest { images, resize_to_input: opts.resize_to_input, return_png: opts.return_png };
        let out = unary(&self.inner, &request, |mut c, r| async move { c.estimate(r).await }).await?;
        if out.maps.len() != n {
            return Err(Error::internal(format!("depth service returned {} maps for {n} images", out.maps.len())));
        }
        out.maps
            .into_iter()
            .map(|m| {
                let depth = sdmesh_proto::required(&m.depth, "depth")?.to_candle("depth", &Device::Cpu)?;
                let resized = m.resized.as_ref().map(|t| t.to_candle("resized", &Device::Cpu)).transpose()?;
                let png = if m.png.is_empty() { None } else { Some(m.png.to_vec()) };
                Ok(DepthMap { depth, resized, png })
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl sdmesh_core::DepthEstimator for DepthClient {
    /// Sends the images in calls of at most [`MAX_IMAGES`].
    async fn estimate(&self, images: Vec<Bytes>) -> Result<Vec<Tensor>> {
        if images.is_empty() {
            return Err(Error::invalid(format!("images: 0 given; expected 1..={MAX_IMAGES} per call")));
        }
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(MAX_IMAGES) {
            let maps = self.estimate_maps(chunk.to_vec(), EstimateOptions::default()).await?;
            out.extend(maps.into_iter().map(|m| m.depth));
        }
        Ok(out)
    }

    async fn info(&self) -> Result<v1::DepthInfo> {
        // Retried as every call is: within a job, a dead replica costs a retry.
        unary(&self.inner, &v1::InfoRequest {}, |mut c, r| async move { c.info(r).await }).await
    }
}
