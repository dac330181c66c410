//! The components as the orchestrator sees them. Each has a local candle implementation
//! (in its service crate) and a gRPC client implementation of the same trait, so a job runs
//! the same code in one process or across the mesh.

use crate::Result;
use candle_core::Tensor;
use sdmesh_proto::v1::{DepthInfo, TextEncoderInfo, UnetInfo, VaeInfo};

/// Output of the text encoder for a batch of texts.
#[derive(Debug, Clone)]
pub struct TextEmbeddings {
    /// f32 [n_texts, context_length, hidden_size], on the CPU.
    pub embeddings: Tensor,
    /// Per text, how many tokens did not fit the context length.
    pub truncated_tokens: Vec<u32>,
}

#[async_trait::async_trait]
pub trait TextEncoder: Send + Sync {
    async fn encode(&self, texts: Vec<String>) -> Result<TextEmbeddings>;
    async fn info(&self) -> Result<TextEncoderInfo>;
}

/// One denoising step, classifier-free guidance included.
#[derive(Debug, Clone)]
pub struct DenoiseInput {
    /// Scheduler-scaled latents [batch, channels, h, w].
    pub latents: Tensor,
    /// A job's constant extra input channels [batch, k, h, w], concatenated after the latents
    /// (inpainting's mask and masked-image latents, depth2img's depth, the upscaler's image).
    pub extra: Option<Tensor>,
    pub timestep: f64,
    /// [1 or batch, context_length, dim].
    pub cond: Tensor,
    /// Same shape as `cond`; used when `guidance_scale > 1`.
    pub uncond: Option<Tensor>,
    pub guidance_scale: f32,
    pub guidance_rescale: f32,
    /// Every sample's class label, for a UNet with a class embedding (the x4 upscaler's noise
    /// level).
    pub class_label: Option<u32>,
}

impl DenoiseInput {
    /// Whether this step runs the doubled (unconditional + conditional) forward pass.
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// UNet rows this step takes in a forward pass: one per image, two under guidance.
    pub fn rows(&self) -> usize {
        let images = self.latents.dims().first().copied().unwrap_or(1);
        if self.uses_guidance() {
            2 * images
        } else {
            images
        }
    }
}

#[async_trait::async_trait]
pub trait Denoiser: Send + Sync {
    /// Returns the guided model output, f32 with the shape of `latents`, on the CPU.
    async fn denoise(&self, input: DenoiseInput) -> Result<Tensor>;
    async fn info(&self) -> Result<UnetInfo>;
}

#[async_trait::async_trait]
pub trait Vae: Send + Sync {
    /// Diffusion latents (scaled) -> f32 NHWC images in [0, 1], on the CPU.
    async fn decode(&self, latents: Tensor) -> Result<Tensor>;
    /// f32 NCHW images in [-1, 1] -> scaled latents; `noise` (standard normal, latent shape)
    /// also gives the sample mean + std * noise.
    async fn encode(&self, images: Tensor, noise: Option<Tensor>) -> Result<EncodedImages>;
    async fn info(&self) -> Result<VaeInfo>;
}

/// The VAE encoder's output, both multiplied by the scaling factor, f32 on the CPU.
#[derive(Debug, Clone)]
pub struct EncodedImages {
    /// The latent distribution's mean.
    pub mode: Tensor,
    /// mean + std * noise, when noise was given.
    pub sample: Option<Tensor>,
}

/// Monocular depth estimation (MiDaS DPT-hybrid).
#[async_trait::async_trait]
pub trait DepthEstimator: Send + Sync {
    /// Each encoded image (PNG/JPEG) -> predicted relative inverse depth, f32 [height, width] at
    /// the model's input resolution (what transformers' `predicted_depth` is), on the CPU.
    async fn estimate(&self, images: Vec<bytes::Bytes>) -> Result<Vec<Tensor>>;
    async fn info(&self) -> Result<DepthInfo>;
}

/// One image's verdict from the safety checker, as diffusers' `StableDiffusionSafetyChecker`
/// computes it.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyVerdict {
    /// Some concept score is > 0 (the pipeline returns a black image).
    pub flagged: bool,
    /// Per concept: `round(cosine - threshold + adjustment, 3)` (adjustment 0.01 once a
    /// special-care score is > 0).
    pub concept_scores: Vec<f32>,
    /// Per special-care concept, same rounding (the adjustment applies after the first > 0).
    pub special_scores: Vec<f32>,
}

impl SafetyVerdict {
    /// Some special-care score is > 0.
    pub fn special_care(&self) -> bool {
        self.special_scores.iter().any(|&s| s > 0.0)
    }
}

/// The Stable Diffusion safety checker.
#[async_trait::async_trait]
pub trait SafetyChecker: Send + Sync {
    /// `images`: f32 NHWC [n, h, w, 3] in [0, 1] on the CPU (what the VAE decodes); one verdict per image.
    async fn check(&self, images: Tensor) -> Result<Vec<SafetyVerdict>>;
}
