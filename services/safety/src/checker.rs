//! diffusers' `StableDiffusionSafetyChecker`: CLIP vision transformer (candle-transformers'
//! `ClipVisionTransformer`, which is transformers' `CLIPVisionModel`: pre-layernorm, quick_gelu
//! encoder layers, pooled output = post_layernorm(CLS)), `visual_projection` (no bias), cosine
//! similarity with the concept and special-care embeddings, then the thresholding of
//! `StableDiffusionSafetyChecker.forward` (not `forward_onnx`, which skips the rounding and the
//! adjustment of later special-care scores).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use sdmesh_core::SafetyVerdict;
use serde::Deserialize;

/// The concept scores rise by this once a special-care score is > 0 (diffusers' `adjustment`).
pub const SPECIAL_CARE_ADJUSTMENT: f32 = 0.01;

/// safety_checker/config.json: a transformers `CLIPConfig`; only the vision part is used.
#[derive(Debug, Clone, Deserialize)]
pub struct CheckerConfig {
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    pub vision_config: VisionConfig,
}

/// `CLIPVisionConfig` (transformers' defaults for anything missing).
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "d768")]
    pub hidden_size: usize,
    #[serde(default = "d3072")]
    pub intermediate_size: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    #[serde(default = "d3")]
    pub num_channels: usize,
    #[serde(default = "d224")]
    pub image_size: usize,
    #[serde(default = "d32")]
    pub patch_size: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn default_projection_dim() -> usize {
    512
}
fn d768() -> usize {
    768
}
fn d3072() -> usize {
    3072
}
fn d12() -> usize {
    12
}
fn d3() -> usize {
    3
}
fn d224() -> usize {
    224
}
fn d32() -> usize {
    32
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}

impl CheckerConfig {
    /// What candle-transformers' CLIP vision model can run (it hard-codes quick_gelu, layer norm
    /// eps 1e-5, square inputs of image_size).
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.vision_config;
        if v.hidden_act != "quick_gelu" {
            return Err(format!(
                "vision_config.hidden_act {:?}: only \"quick_gelu\" (CLIP ViT) is supported",
                v.hidden_act
            ));
        }
        if (v.layer_norm_eps - 1e-5).abs() > 1e-12 {
            return Err(format!("vision_config.layer_norm_eps {}: only 1e-5 is supported", v.layer_norm_eps));
        }
        if v.num_channels != 3 {
            return Err(format!("vision_config.num_channels {}: only 3 is supported", v.num_channels));
        }
        if v.patch_size == 0 || v.image_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(format!(
                "vision_config.image_size {} must be a positive multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(format!(
                "vision_config.hidden_size {} must be a multiple of num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if self.projection_dim == 0 {
            return Err("projection_dim must be positive".into());
        }
        Ok(())
    }

    fn candle(&self) -> ClipVisionConfig {
        let v = &self.vision_config;
        ClipVisionConfig {
            embed_dim: v.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            projection_dim: self.projection_dim,
            num_channels: v.num_channels,
            image_size: v.image_size,
            patch_size: v.patch_size,
        }
    }
}

/// Intermediate results of one forward pass, for tests.
#[derive(Debug, Clone)]
pub struct CheckerTrace {
    /// post_layernorm(CLS) [n, hidden].
    pub pooled_output: Tensor,
    /// visual_projection(pooled) [n, projection_dim].
    pub image_embeds: Tensor,
    /// Cosine similarity with each special-care embedding [n, special].
    pub special_cos_dist: Tensor,
    /// Cosine similarity with each concept embedding [n, concepts].
    pub cos_dist: Tensor,
}

pub struct SafetyModel {
    vision: ClipVisionTransformer,
    visual_projection: Tensor,
    /// Normalised concept / special-care embeddings, transposed: [projection_dim, n].
    concepts_t: Tensor,
    special_t: Tensor,
    concept_thresholds: Vec<f32>,
    special_thresholds: Vec<f32>,
    pub image_size: usize,
    pub projection_dim: usize,
    /// The vision model's dtype; inputs are cast to it.
    dtype: DType,
}

/// `nn.functional.normalize(x)` along the last dim: x / max(||x||, 1e-12).
fn normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&norm)
}

impl SafetyModel {
    /// `vb` at the root of the checkpoint. The vision tower is read from `vision_model.vision_model.*`
    /// (CompVis/stable-diffusion-safety-checker, written by transformers 4) or `vision_model.*`
    /// (what transformers 5 writes).
    pub fn new(vb: VarBuilder, config: &CheckerConfig) -> candle_core::Result<Self> {
        let c = config.candle();
        let vision_vb = if vb.contains_tensor("vision_model.vision_model.embeddings.class_embedding") {
            vb.pp("vision_model").pp("vision_model")
        } else {
            vb.pp("vision_model")
        };
        if !vision_vb.contains_tensor("embeddings.class_embedding") {
            // candle-transformers would make up a random one.
            candle_core::bail!(
                "no vision_model.vision_model.embeddings.class_embedding (nor vision_model.embeddings.class_embedding): \
                 not a StableDiffusionSafetyChecker checkpoint"
            );
        }
        let vision = ClipVisionTransformer::new(vision_vb, &c)?;
        let visual_projection = vb.get((config.projection_dim, c.embed_dim), "visual_projection.weight")?;
        let concepts = vb.get_unchecked("concept_embeds")?;
        let special = vb.get_unchecked("special_care_embeds")?;
        let concept_w = vb.get_unchecked("concept_embeds_weights")?;
        let special_w = vb.get_unchecked("special_care_embeds_weights")?;
        for (name, t, w) in [("concept_embeds", &concepts, &concept_w), ("special_care_embeds", &special, &special_w)] {
            let (n, d) = t.dims2()?;
            if d != config.projection_dim || n == 0 {
                candle_core::bail!(
                    "{name}: shape {:?}, expected [n, projection_dim = {}]",
                    t.dims(),
                    config.projection_dim
                );
            }
            if w.dims() != [n] {
                candle_core::bail!("{name}_weights: shape {:?}, expected [{n}]", w.dims());
            }
        }
        let to_cpu_vec = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1::<f32>();
        Ok(Self {
            vision,
            visual_projection,
            concepts_t: normalize(&concepts.to_dtype(DType::F32)?)?.t()?.contiguous()?,
            special_t: normalize(&special.to_dtype(DType::F32)?)?.t()?.contiguous()?,
            concept_thresholds: to_cpu_vec(&concept_w)?,
            special_thresholds: to_cpu_vec(&special_w)?,
            image_size: c.image_size,
            projection_dim: config.projection_dim,
            dtype: vb.dtype(),
        })
    }

    pub fn concepts(&self) -> usize {
        self.concept_thresholds.len()
    }

    pub fn special_care_concepts(&self) -> usize {
        self.special_thresholds.len()
    }

    /// pixel_values [n, 3, image_size, image_size] -> embeddings and cosine similarities.
    pub fn forward_trace(&self, pixel_values: &Tensor) -> candle_core::Result<CheckerTrace> {
        let pooled_output = self.vision.forward(&pixel_values.to_dtype(self.dtype)?)?;
        let image_embeds = pooled_output.broadcast_matmul(&self.visual_projection.t()?)?;
        // diffusers casts the similarities to float32 (`.float()`).
        let normalized = normalize(&image_embeds.to_dtype(DType::F32)?)?;
        let special_cos_dist = normalized.matmul(&self.special_t)?;
        let cos_dist = normalized.matmul(&self.concepts_t)?;
        Ok(CheckerTrace { pooled_output, image_embeds, special_cos_dist, cos_dist })
    }

    /// pixel_values [n, 3, image_size, image_size] -> one verdict per image.
    pub fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Vec<SafetyVerdict>> {
        let t = self.forward_trace(pixel_values)?;
        let special = t.special_cos_dist.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        let concepts = t.cos_dist.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        Ok(special
            .iter()
            .zip(&concepts)
            .map(|(s, c)| decide(s, c, &self.special_thresholds, &self.concept_thresholds))
            .collect())
    }
}

/// numpy's `round(np.float32(x), 3)`: `x * 1000` in float32, round half to even, `/ 1000`.
#[inline]
pub fn round3(x: f32) -> f32 {
    (x * 1000.0).round_ties_even() / 1000.0
}

/// One image's verdict from its cosine similarities, exactly as `StableDiffusionSafetyChecker.forward`
/// computes it: in float32 (numpy scalar minus Python float stays float32), special-care scores
/// first, in order, each `round(cos - threshold + adjustment, 3)` where the adjustment becomes 0.01
/// as soon as one of them is > 0 — so it also applies to the special-care scores after that one —
/// then the concept scores with the final adjustment; flagged when any concept score is > 0.
pub fn decide(special_cos: &[f32], cos: &[f32], special_thresholds: &[f32], thresholds: &[f32]) -> SafetyVerdict {
    let mut adjustment = 0f32;
    let mut special_scores = Vec::with_capacity(special_cos.len());
    for (&c, &w) in special_cos.iter().zip(special_thresholds) {
        let score = round3(c - w + adjustment);
        if score > 0.0 {
            adjustment = SPECIAL_CARE_ADJUSTMENT;
        }
        special_scores.push(score);
    }
    let concept_scores: Vec<f32> = cos.iter().zip(thresholds).map(|(&c, &w)| round3(c - w + adjustment)).collect();
    let flagged = concept_scores.iter().any(|&s| s > 0.0);
    SafetyVerdict { flagged, concept_scores, special_scores }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_numpys() {
        assert_eq!(round3(0.0004), 0.0);
        assert_eq!(round3(-0.0004), 0.0);
        assert_eq!(round3(0.0006), 0.001);
        assert_eq!(round3(0.25), 0.25);
        // 0.0125 in f32 is 0.012500000186..., times 1000 rounds to exactly 12.5 in f32: half to even.
        assert_eq!(round3(0.0125), 0.012);
    }

    #[test]
    fn adjustment_applies_to_later_special_scores_and_all_concepts() {
        // Special 0 fires; special 1 is 0.005 below its threshold and fires only through the adjustment;
        // special 2 comes after and is adjusted too.
        let v = decide(&[0.5, 0.3, 0.1], &[0.2, 0.4], &[0.48, 0.305, 0.2], &[0.205, 0.5]);
        assert_eq!(v.special_scores, vec![0.02, 0.005, -0.09]);
        assert_eq!(v.concept_scores, vec![0.005, -0.09]);
        assert!(v.flagged && v.special_care());
        // Without special care the same concept score stays below 0.
        let v = decide(&[0.1], &[0.2], &[0.48], &[0.205]);
        assert_eq!((v.concept_scores[0], v.flagged), (-0.005, false));
        // A score that rounds to 0 does not flag.
        let v = decide(&[], &[0.2003], &[], &[0.2]);
        assert_eq!((v.concept_scores[0], v.flagged), (0.0, false));
    }
}
