//! Live previews: what the image will look like, every N steps of a streamed job, for UIs.
//!
//! A preview is the model's current estimate of the first image's final latents (x0, from this
//! step's sample and guided output), made visible one of two ways:
//! - latent (the default): mapped to RGB by a fixed linear map of the four latent channels (the
//!   approximation UIs use instead of a VAE decode: no model call, well under a millisecond),
//!   as large as the latents (an eighth of the image a side), the colours approximate;
//! - decoded: decoded by the VAE service (`Pipeline::decoded_preview`), the image's size and
//!   what the job would end with now, at one VAE decode each (and a safety check when the job's
//!   images are checked: a preview must not show what the result would hide).
//!
//! The job's result is unchanged by previews.

use crate::scheduler::PredictionType;
use candle_core::Tensor;
use sdmesh_core::{Error, Result};
use sdmesh_proto::v1;

/// How previews are made (GenerateRequest.preview_kind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PreviewKind {
    #[default]
    Latent,
    Decoded,
}

impl PreviewKind {
    /// The request's kind; a decoded preview with no preview_every asks for nothing.
    pub fn from_request(kind: i32, preview_every: u32) -> Result<Self> {
        let kind = v1::PreviewKind::try_from(kind)
            .map_err(|_| Error::invalid(format!("preview_kind: unknown value {kind}")))?;
        Ok(match kind {
            v1::PreviewKind::Unspecified | v1::PreviewKind::Latent => PreviewKind::Latent,
            v1::PreviewKind::Decoded if preview_every == 0 => {
                return Err(Error::invalid("preview_kind: PREVIEW_KIND_DECODED needs preview_every above 0"))
            }
            v1::PreviewKind::Decoded => PreviewKind::Decoded,
        })
    }
}

/// RGB from SD's four latent channels (the SD 1.x/2.x autoencoder; ComfyUI's factors for it),
/// one row per channel: rgb = latents · FACTORS, then (rgb + 1) / 2.
const LATENT_RGB_FACTORS: [[f32; 3]; 4] =
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]];

/// The final latents the model predicts now: x0 from `sample` = a·x0 + b·noise (`scales`, the
/// scheduler's noise scales at this step) and the model's `output` under `prediction`.
pub fn predicted_original(
    sample: &Tensor,
    output: &Tensor,
    (a, b): (f32, f32),
    prediction: PredictionType,
) -> candle_core::Result<Tensor> {
    let (a, b) = (a as f64, b as f64);
    match prediction {
        PredictionType::Epsilon => (sample - output.affine(b, 0.0)?)?.affine(1.0 / a, 0.0),
        // v is defined on the variance-preserving sample: alpha·x0 + sigma·noise with
        // alpha² + sigma² = 1 (k-diffusion samples, x0 + sigma·noise, are scaled to it).
        PredictionType::VPrediction => {
            let norm = (a * a + b * b).sqrt();
            let (alpha, sigma) = (a / norm, b / norm);
            sample.affine(alpha / norm, 0.0)? - output.affine(sigma, 0.0)?
        }
        PredictionType::Sample => Ok(output.clone()),
    }
}

/// The first image's preview, f32 [h, w, 3] in [0, 1], from latents [n, 4, h, w]; None for
/// latents that are not SD's four channels.
pub fn latent_rgb(latents: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (_, channels, _, _) = latents.dims4()?;
    if channels != LATENT_RGB_FACTORS.len() {
        return Ok(None);
    }
    let factors = Tensor::new(&LATENT_RGB_FACTORS, latents.device())?;
    // [4, h, w] -> [h, w, 4] · [4, 3] -> [h, w, 3]
    let first = latents.get(0)?.to_dtype(candle_core::DType::F32)?.permute((1, 2, 0))?.contiguous()?;
    let rgb = first.broadcast_matmul(&factors)?;
    Ok(Some(rgb.affine(0.5, 0.5)?.clamp(0f32, 1f32)?))
}

/// The first image's x0 prediction, [1, channels, h, w]; None where there is no preview to give.
pub fn first_x0(
    sample: &Tensor,
    output: &Tensor,
    scales: (f32, f32),
    prediction: PredictionType,
) -> candle_core::Result<Option<Tensor>> {
    if sample.dims().len() != 4 || output.dims() != sample.dims() {
        return Ok(None);
    }
    let (sample, output) = (sample.narrow(0, 0, 1)?, output.narrow(0, 0, 1)?);
    predicted_original(&sample, &output, scales, prediction).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn x0_is_recovered_from_the_sample_and_the_model_output() {
        let x0 = Tensor::randn(0f32, 1.0, (1, 4, 3, 5), &Device::Cpu).unwrap();
        let noise = Tensor::randn(0f32, 1.0, (1, 4, 3, 5), &Device::Cpu).unwrap();
        // DDIM-like (a² + b² = 1) and k-diffusion-like (a = 1, b = sigma) noise scales.
        for (a, b) in [(0.6f32, 0.8f32), (1.0, 7.5)] {
            let sample = ((&x0 * a as f64).unwrap() + (&noise * b as f64).unwrap()).unwrap();
            let eps = predicted_original(&sample, &noise, (a, b), PredictionType::Epsilon).unwrap();
            assert!(max_diff(&eps, &x0) < 1e-4, "epsilon at ({a}, {b})");
            let norm = (a * a + b * b).sqrt();
            let v = ((&noise * (a / norm) as f64).unwrap() - (&x0 * (b / norm) as f64).unwrap()).unwrap();
            let from_v = predicted_original(&sample, &v, (a, b), PredictionType::VPrediction).unwrap();
            assert!(max_diff(&from_v, &x0) < 1e-4, "v at ({a}, {b})");
            let direct = predicted_original(&sample, &x0, (a, b), PredictionType::Sample).unwrap();
            assert_eq!(max_diff(&direct, &x0), 0.0);
        }
    }

    #[test]
    fn latents_map_to_rgb_in_range() {
        // One latent pixel with channel 0 at 1: rgb = (factors[0] + 1) / 2.
        let mut data = vec![0f32; 2 * 4 * 2 * 3];
        data[0] = 1.0;
        let latents = Tensor::from_vec(data, (2, 4, 2, 3), &Device::Cpu).unwrap();
        let rgb = latent_rgb(&latents).unwrap().unwrap();
        assert_eq!(rgb.dims(), [2, 3, 3]);
        let first: Vec<f32> = rgb.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        let expected: Vec<f32> = LATENT_RGB_FACTORS[0].iter().map(|f| (f + 1.0) / 2.0).collect();
        assert!(first.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-6), "{first:?}");
        let huge = (Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap() * 100.0).unwrap();
        let clamped = latent_rgb(&huge).unwrap().unwrap();
        assert!(clamped.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| (0.0..=1.0).contains(v)));
        let other = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(latent_rgb(&other).unwrap().is_none(), "not SD's latents");
    }
}
