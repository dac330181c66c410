//! safety service: the Stable Diffusion safety checker (diffusers' `StableDiffusionSafetyChecker`,
//! e.g. CompVis/stable-diffusion-safety-checker: CLIP ViT-L/14 vision + projection, 17 concept and
//! 3 special-care embeddings with their thresholds), with transformers' `CLIPImageProcessor`
//! preprocessing, exactly as a diffusers pipeline runs it (`run_safety_checker`).
//!
//! Inputs are encoded images (PNG/JPEG) or decoded float images (NHWC in [0, 1], what the VAE
//! returns; quantised to 8 bits as diffusers' `numpy_to_pil` does). Each image gets a
//! [`SafetyVerdict`]: flagged or not, and the rounded scores diffusers computes. A flagged image is
//! what the pipeline replaces by a black one.
//!
//! The model folder is either a diffusers pipeline folder (`safety_checker/` + `feature_extractor/`)
//! or a checker folder (`config.json`, `model.safetensors`, `preprocessor_config.json` at its root).

pub mod checker;
pub mod preprocess;

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use checker::{CheckerConfig, SafetyModel};
use image::RgbImage;
use preprocess::{Preprocessor, PreprocessorConfig, Resize};
use sdmesh_core::client::unary;
use sdmesh_core::model_dir::{read_json, ComponentDir, ModelDirError};
use sdmesh_core::serve::{serve_while_loading, Health};
use sdmesh_core::{Error, ModelWorker, Result, SafetyVerdict};
use sdmesh_proto::v1;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;

/// Images per Check call.
pub const MAX_IMAGES: usize = 16;
/// Pixels of one input image (encoded: checked from its header before decoding; decoded: h x w).
pub const MAX_IMAGE_PIXELS: usize = 4096 * 4096;
/// Encoded bytes of all images of one call.
pub const MAX_ENCODED_BYTES: usize = 64 << 20;
/// Bytes of the float32 `pixels` tensor of one call (one image of [`MAX_IMAGE_PIXELS`], or e.g. 16 of
/// 1024 x 1024).
pub const MAX_PIXELS_BYTES: usize = 3 * 4 * MAX_IMAGE_PIXELS;
/// Largest legitimate request: the encoded images or the pixels.
pub const MAX_REQUEST_BYTES: usize =
    sdmesh_core::message_limit(if MAX_ENCODED_BYTES > MAX_PIXELS_BYTES { MAX_ENCODED_BYTES } else { MAX_PIXELS_BYTES });
/// Largest legitimate response: a few dozen floats per image.
pub const MAX_RESPONSE_BYTES: usize = sdmesh_core::message_limit(64 << 10);
/// Images run through the model together.
const MAX_IMAGES_PER_PASS: usize = 8;

#[derive(Debug, Clone)]
pub struct SafetyOptions {
    /// A diffusers pipeline folder (uses safety_checker/ and feature_extractor/) or a checker folder.
    pub model: PathBuf,
    pub device: Device,
    /// Weights and activations (scores are computed in f32).
    pub dtype: DType,
    pub queue_capacity: usize,
}

impl SafetyOptions {
    /// f32, a queue of 64 requests.
    pub fn new(model: PathBuf, device: Device) -> Self {
        Self { model, device, dtype: DType::F32, queue_capacity: 64 }
    }
}

enum SafetyJob {
    Encoded(Vec<Bytes>),
    /// f32 NHWC [n, h, w, 3], shape checked.
    Pixels(Tensor),
}

struct Model {
    checker: SafetyModel,
    pre: Preprocessor,
    device: Device,
}

/// Decodes one encoded image for the checker (PIL's open + transformers' convert_to_rgb).
pub fn decode_image(i: usize, bytes: &[u8]) -> Result<RgbImage> {
    preprocess::decode_rgb_over_white(bytes, MAX_IMAGE_PIXELS as u64).map_err(|e| match e {
        Error::InvalidArgument(m) => Error::invalid(format!("images[{i}]: {m}")),
        other => other,
    })
}

/// f32 NHWC [n, h, w, 3] in [0, 1] -> 8-bit images as diffusers' `numpy_to_pil` makes them.
/// Values outside [0, 1] (or not finite) are INVALID_ARGUMENT: numpy's cast to uint8 would wrap them.
pub fn pixels_to_images(pixels: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, h, w, c) = pixels.dims4().map_err(|_| shape_error(pixels.dims()))?;
    if c != 3 {
        return Err(shape_error(pixels.dims()));
    }
    if pixels.dtype() != DType::F32 {
        return Err(Error::invalid(format!("pixels: dtype {:?}; expected F32", pixels.dtype())));
    }
    let data = pixels.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(at) = data.iter().position(|v| !(0.0..=1.0).contains(v)) {
        let (img, rest) = (at / (h * w * 3), at % (h * w * 3));
        return Err(Error::invalid(format!(
            "pixels[{img}, {}, {}, {}] = {}: values must be in [0, 1] (decoded images, denormalised and clamped)",
            rest / (w * 3),
            rest / 3 % w,
            rest % 3,
            data[at]
        )));
    }
    Ok((0..n)
        .map(|i| sdmesh_core::images::quantize_like_numpy_to_pil(&data[i * h * w * 3..(i + 1) * h * w * 3], h, w))
        .collect())
}

fn shape_error(dims: &[usize]) -> Error {
    Error::invalid(format!("pixels: shape {dims:?}; expected [n, height, width, 3] (NHWC RGB in [0, 1])"))
}

/// Checks the shape of a `pixels` input against the limits (before it is queued or decoded).
pub fn check_pixels_shape(dims: &[usize]) -> Result<()> {
    let [n, h, w, c] = *dims else { return Err(shape_error(dims)) };
    if c != 3 {
        return Err(shape_error(dims));
    }
    if n == 0 || n > MAX_IMAGES {
        return Err(Error::invalid(format!("pixels: {n} images given; expected 1..={MAX_IMAGES} per call")));
    }
    if h == 0 || w == 0 || h.saturating_mul(w) > MAX_IMAGE_PIXELS {
        return Err(Error::invalid(format!(
            "pixels: images of {w}x{h} pixels; expected 1..={MAX_IMAGE_PIXELS} pixels each"
        )));
    }
    let bytes = n * h * w * c * 4;
    if bytes > MAX_PIXELS_BYTES {
        return Err(Error::invalid(format!(
            "pixels: {bytes} bytes; one call takes at most {MAX_PIXELS_BYTES} (send fewer images per call)"
        )));
    }
    Ok(())
}

impl Model {
    fn run(&self, job: SafetyJob) -> Result<Vec<SafetyVerdict>> {
        // Decode and preprocess every image first (a bad one fails the call before any compute).
        let images = match job {
            SafetyJob::Encoded(encoded) => {
                encoded.iter().enumerate().map(|(i, b)| decode_image(i, b)).collect::<Result<Vec<_>>>()?
            }
            SafetyJob::Pixels(pixels) => pixels_to_images(&pixels)?,
        };
        let inputs = images
            .iter()
            .map(|img| self.pre.pixel_values(img, &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut verdicts = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(MAX_IMAGES_PER_PASS) {
            verdicts.extend(self.checker.forward(&Tensor::cat(chunk, 0)?)?);
        }
        Ok(verdicts)
    }
}

/// Loads the checker and its preprocessing from a pipeline or checker folder (see
/// [`SafetyOptions::model`]), checking that the configuration is one this crate runs.
pub fn load_model(
    model: &Path,
    device: &Device,
    dtype: DType,
) -> std::result::Result<(SafetyModel, Preprocessor), ModelDirError> {
    let (dir, pre_path) = ComponentDir::open_with_preprocessor(model, "safety_checker")?;
    load_located(&dir, &pre_path, device, dtype)
}

/// [`load_model`] from the folder and preprocessor file it found.
fn load_located(
    dir: &ComponentDir,
    pre_path: &Path,
    device: &Device,
    dtype: DType,
) -> std::result::Result<(SafetyModel, Preprocessor), ModelDirError> {
    let config_path = dir.path.join("config.json");
    let config: CheckerConfig = dir.json("config.json")?;
    config.validate().map_err(|message| ModelDirError::Malformed { path: config_path.clone(), message })?;
    let pre_config: PreprocessorConfig = read_json(pre_path)?;
    let pre = Preprocessor::new(pre_config)
        .map_err(|message| ModelDirError::Malformed { path: pre_path.to_path_buf(), message })?;
    let size = config.vision_config.image_size;
    if pre.fixed_output_size() != Some((size, size)) {
        return Err(ModelDirError::Malformed {
            path: pre_path.to_path_buf(),
            message: format!(
                "the preprocessing gives {} but the model takes {size}x{size} inputs (crop_size must be the \
                 vision_config.image_size)",
                match pre.fixed_output_size() {
                    Some((h, w)) => format!("{w}x{h} inputs"),
                    None => "inputs of each image's own size".into(),
                }
            ),
        });
    }
    let vb = dir.var_builder(&["model"], dtype, device)?;
    let checker = SafetyModel::new(vb, &config)
        .map_err(|e| ModelDirError::Malformed { path: dir.path.clone(), message: e.to_string() })?;
    Ok((checker, pre))
}

pub struct LocalSafety {
    worker: ModelWorker<SafetyJob, Vec<SafetyVerdict>>,
    info: v1::SafetyInfo,
}

impl sdmesh_core::serve::ModelIdentity for LocalSafety {
    fn fingerprint(&self) -> &str {
        &self.info.fingerprint
    }
}

impl LocalSafety {
    pub fn load(opts: &SafetyOptions) -> std::result::Result<Self, ModelDirError> {
        let (dir, pre_path) = ComponentDir::open_with_preprocessor(&opts.model, "safety_checker")?;
        let (checker, pre) = load_located(&dir, &pre_path, &opts.device, opts.dtype)?;
        let s = checker.image_size;
        let info = v1::SafetyInfo {
            height: s as u32,
            width: s as u32,
            shortest_edge: match pre.resize {
                Resize::ShortestEdge(e) => e as u32,
                _ => 0,
            },
            concepts: checker.concepts() as u32,
            special_care_concepts: checker.special_care_concepts() as u32,
            projection_dim: checker.projection_dim as u32,
            max_images: MAX_IMAGES as u32,
            fingerprint: dir.fingerprint(&["model"], &[pre_path], &opts.device, opts.dtype)?,
        };
        let model = Model { checker, pre, device: opts.device.clone() };
        Tensor::zeros((1, 3, s, s), DType::F32, &opts.device).and_then(|x| model.checker.forward(&x)).map_err(|e| {
            ModelDirError::Malformed { path: opts.model.clone(), message: format!("warm-up failed: {e}") }
        })?;
        let worker = ModelWorker::spawn("safety", opts.queue_capacity, move |job| model.run(job));
        Ok(Self { worker, info })
    }

    /// Checks encoded images against the limits before they are queued (from the headers only).
    fn check_encoded(images: &[Bytes]) -> Result<()> {
        if images.is_empty() || images.len() > MAX_IMAGES {
            return Err(Error::invalid(format!("images: {} given; expected 1..={MAX_IMAGES} per call", images.len())));
        }
        let total: usize = images.iter().map(Bytes::len).sum();
        if total > MAX_ENCODED_BYTES {
            return Err(Error::invalid(format!(
                "images: {total} encoded bytes; one call takes at most {MAX_ENCODED_BYTES} (send fewer images per call)"
            )));
        }
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
        }
        Ok(())
    }

    /// One verdict per encoded image (PNG/JPEG).
    pub async fn check_images(&self, images: Vec<Bytes>) -> Result<Vec<SafetyVerdict>> {
        Self::check_encoded(&images)?;
        self.worker.call(SafetyJob::Encoded(images)).await
    }

    /// One verdict per decoded image (f32 NHWC [n, h, w, 3] in [0, 1]).
    pub async fn check_pixels(&self, pixels: Tensor) -> Result<Vec<SafetyVerdict>> {
        check_pixels_shape(pixels.dims())?;
        if pixels.dtype() != DType::F32 {
            return Err(Error::invalid(format!("pixels: dtype {:?}; expected F32", pixels.dtype())));
        }
        self.worker.call(SafetyJob::Pixels(pixels)).await
    }

    pub fn info(&self) -> v1::SafetyInfo {
        self.info.clone()
    }
}

#[async_trait::async_trait]
impl sdmesh_core::SafetyChecker for LocalSafety {
    async fn check(&self, images: Tensor) -> Result<Vec<SafetyVerdict>> {
        self.check_pixels(images).await
    }
}

fn to_proto(v: &SafetyVerdict) -> v1::ImageVerdict {
    v1::ImageVerdict {
        flagged: v.flagged,
        concept_scores: v.concept_scores.clone(),
        special_scores: v.special_scores.clone(),
        special_care: v.special_care(),
    }
}

fn from_proto(v: v1::ImageVerdict) -> SafetyVerdict {
    SafetyVerdict { flagged: v.flagged, concept_scores: v.concept_scores, special_scores: v.special_scores }
}

#[derive(Clone)]
pub struct SafetyService {
    local: Arc<OnceCell<LocalSafety>>,
}

impl SafetyService {
    /// A service over an already loaded model (tests, in-process use).
    pub fn new(local: LocalSafety) -> Self {
        Self { local: Arc::new(OnceCell::new_with(Some(local))) }
    }

    /// The tonic server with this service's message limits.
    pub fn server(self) -> v1::safety_server::SafetyServer<Self> {
        v1::safety_server::SafetyServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES)
    }
}

#[tonic::async_trait]
impl v1::safety_server::Safety for SafetyService {
    async fn check(
        &self,
        request: tonic::Request<v1::CheckImagesRequest>,
    ) -> std::result::Result<tonic::Response<v1::CheckImagesResponse>, tonic::Status> {
        let local = self.local.get().ok_or_else(sdmesh_core::loading)?;
        let r = request.into_inner();
        let verdicts = match (r.images.is_empty(), r.pixels) {
            (false, None) => local.check_images(r.images.into_iter().map(Bytes::from).collect()).await?,
            (true, Some(pixels)) => {
                let dims: Vec<usize> = pixels.shape.iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect();
                check_pixels_shape(&dims)?;
                if pixels.dtype != v1::Dtype::F32 as i32 {
                    return Err(Error::invalid(format!(
                        "pixels: dtype {}; expected DTYPE_F32",
                        v1::Dtype::try_from(pixels.dtype)
                            .map(|d| d.as_str_name().to_string())
                            .unwrap_or(pixels.dtype.to_string())
                    ))
                    .into());
                }
                let tensor = pixels.to_candle("pixels", &Device::Cpu).map_err(Error::from)?;
                local.check_pixels(tensor).await?
            }
            (false, Some(_)) => {
                return Err(Error::invalid("both images and pixels given; send exactly one of them").into());
            }
            (true, None) => {
                return Err(Error::invalid(format!(
                    "no input: send 1..={MAX_IMAGES} encoded images, or pixels (f32 NHWC in [0, 1])"
                ))
                .into());
            }
        };
        Ok(tonic::Response::new(v1::CheckImagesResponse { verdicts: verdicts.iter().map(to_proto).collect() }))
    }

    async fn info(
        &self,
        _: tonic::Request<v1::InfoRequest>,
    ) -> std::result::Result<tonic::Response<v1::SafetyInfo>, tonic::Status> {
        Ok(tonic::Response::new(self.local.get().ok_or_else(sdmesh_core::loading)?.info.clone()))
    }
}

/// Serves the safety checker on `listener` until `shutdown` (NOT_SERVING while loading).
pub async fn run(
    opts: SafetyOptions,
    listener: TcpListener,
    shutdown: sdmesh_core::serve::Shutdown,
) -> anyhow::Result<()> {
    let health = Health::new(&[v1::safety_server::SERVICE_NAME]).await;
    let service = SafetyService { local: Arc::new(OnceCell::new()) };
    let routes = health.routes().add_service(service.clone().server());
    let load = move || LocalSafety::load(&opts);
    serve_while_loading("safety", listener, health, routes, shutdown, load, |local| {
        let _ = service.local.set(local);
    })
    .await
}

/// A remote safety service.
#[derive(Clone)]
pub struct SafetyClient {
    inner: v1::safety_client::SafetyClient<sdmesh_core::client::ReplicaSet>,
}

impl SafetyClient {
    pub fn new(url: &str) -> Result<Self> {
        let inner = v1::safety_client::SafetyClient::new(sdmesh_core::client::lazy_channel(url)?)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_REQUEST_BYTES);
        Ok(Self { inner })
    }

    async fn call(&self, request: v1::CheckImagesRequest, n: usize) -> Result<Vec<SafetyVerdict>> {
        let out = unary(&self.inner, &request, |mut c, r| async move { c.check(r).await }).await?;
        if out.verdicts.len() != n {
            return Err(Error::internal(format!(
                "safety service returned {} verdicts for {n} images",
                out.verdicts.len()
            )));
        }
        Ok(out.verdicts.into_iter().map(from_proto).collect())
    }

    /// One Check call with encoded images (at most [`MAX_IMAGES`], within the service's limits).
    pub async fn check_images(&self, images: Vec<Bytes>) -> Result<Vec<SafetyVerdict>> {
        let n = images.len();
        let request = v1::CheckImagesRequest { images: images.into_iter().map(Vec::from).collect(), pixels: None };
        self.call(request, n).await
    }

    /// One Check call with decoded images (f32 NHWC [n, h, w, 3] in [0, 1], within the limits).
    pub async fn check_pixels(&self, pixels: &Tensor) -> Result<Vec<SafetyVerdict>> {
        let n = pixels.dims().first().copied().unwrap_or(0);
        let request = v1::CheckImagesRequest { images: vec![], pixels: Some(v1::Tensor::from_candle(pixels)?) };
        self.call(request, n).await
    }

    pub async fn info(&self) -> Result<v1::SafetyInfo> {
        // Retried as every call is: within a job, a dead replica costs a retry.
        unary(&self.inner, &v1::InfoRequest {}, |mut c, r| async move { c.info(r).await }).await
    }
}

#[async_trait::async_trait]
impl sdmesh_core::SafetyChecker for SafetyClient {
    /// Sends the images in calls of at most [`MAX_IMAGES`] and [`MAX_PIXELS_BYTES`].
    async fn check(&self, images: Tensor) -> Result<Vec<SafetyVerdict>> {
        let dims = images.dims().to_vec();
        let [n, h, w, c] = dims[..] else { return Err(shape_error(&dims)) };
        // Check one image's shape here; the per-call count is ours to choose.
        check_pixels_shape(&[1, h, w, c])?;
        if n == 0 {
            return Err(Error::invalid(format!("pixels: 0 images given; expected 1..={MAX_IMAGES} per call")));
        }
        let per_call = (MAX_PIXELS_BYTES / (h * w * c * 4)).clamp(1, MAX_IMAGES);
        let mut out = Vec::with_capacity(n);
        let mut start = 0;
        while start < n {
            let len = per_call.min(n - start);
            out.extend(self.check_pixels(&images.narrow(0, start, len)?).await?);
            start += len;
        }
        Ok(out)
    }
}
