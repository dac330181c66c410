//! transformers' `DPTImageProcessor` (the PIL backend, `DPTImageProcessorPil`, which is what
//! transformers 5 uses when torchvision is not installed, and what the reference fixtures use):
//! resize the 8-bit RGB image with PIL's filter to the size `get_resize_output_image_size` gives,
//! then `x * rescale_factor`, then `(x - mean) / std`, as float32 NCHW.

use candle_core::{Device, Tensor};
use image::RgbImage;
use sdmesh_core::images::{self, Filter};
use serde::Deserialize;

/// preprocessor_config.json (transformers' defaults for anything missing).
#[derive(Debug, Clone, Deserialize)]
pub struct PreprocessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    #[serde(default = "default_size")]
    pub size: SizeSpec,
    #[serde(default)]
    pub keep_aspect_ratio: bool,
    #[serde(default = "one")]
    pub ensure_multiple_of: usize,
    /// PIL resampling filter number (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic).
    #[serde(default = "bicubic")]
    pub resample: u32,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "rescale")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "half3")]
    pub image_mean: Vec<f64>,
    #[serde(default = "half3")]
    pub image_std: Vec<f64>,
    #[serde(default)]
    pub do_pad: bool,
}

/// `size`: `{"height", "width"}` (transformers 4.2x+) or a bare int (old DPTFeatureExtractor files).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    HeightWidth { height: usize, width: usize },
    Square(usize),
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn bicubic() -> u32 {
    3
}
fn rescale() -> f64 {
    1.0 / 255.0
}
fn half3() -> Vec<f64> {
    // transformers' IMAGENET_STANDARD_MEAN / _STD.
    vec![0.5; 3]
}
fn default_size() -> SizeSpec {
    SizeSpec::HeightWidth { height: 384, width: 384 }
}

/// The preprocessing, validated.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    pub config: PreprocessorConfig,
    /// (height, width) of `size`.
    pub size: (usize, usize),
    filter: Filter,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Preprocessor {
    /// Errors say what is unsupported.
    pub fn new(config: PreprocessorConfig) -> Result<Self, String> {
        let size = match config.size {
            SizeSpec::HeightWidth { height, width } => (height, width),
            SizeSpec::Square(s) => (s, s),
        };
        if size.0 == 0 || size.1 == 0 {
            return Err(format!("size {size:?} must be positive"));
        }
        if config.ensure_multiple_of == 0 {
            return Err("ensure_multiple_of must be at least 1".into());
        }
        if config.do_pad {
            return Err("do_pad (size_divisor padding) is not supported".into());
        }
        let filter = Filter::from_pil(config.resample)?;
        let mean = images::per_channel(&config.image_mean, "image_mean")?;
        let std = images::per_channel(&config.image_std, "image_std")?;
        if std.contains(&0.0) {
            return Err("image_std must not contain 0".into());
        }
        Ok(Self { filter, mean, std, size, config })
    }

    /// The (height, width) an image of `height` x `width` is resized to.
    pub fn target_size(&self, height: usize, width: usize) -> (usize, usize) {
        if !self.config.do_resize {
            return (height, width);
        }
        target_size(height, width, self.size, self.config.keep_aspect_ratio, self.config.ensure_multiple_of)
    }

    /// An 8-bit RGB image -> pixel_values [1, 3, h, w] f32 at its [`Self::target_size`]
    /// (which must be non-zero: check first).
    pub fn pixel_values(&self, image: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
        let (h0, w0) = (image.height() as usize, image.width() as usize);
        let (h, w) = self.target_size(h0, w0);
        let resized;
        let image = if (h, w) != (h0, w0) {
            resized = images::resize_rgb(image, w as _, h as _, self.filter);
            &resized
        } else {
            image
        };
        let scale = if self.config.do_rescale { self.config.rescale_factor as f32 } else { 1.0 };
        let mut out = vec![0f32; 3 * h * w];
        for (i, px) in image.pixels().enumerate() {
            for c in 0..3 {
                let mut v = px.0[c] as f32 * scale;
                if self.config.do_normalize {
                    v = (v - self.mean[c]) / self.std[c];
                }
                out[c * h * w + i] = v;
            }
        }
        Tensor::from_vec(out, (1, 3, h, w), device)
    }
}

/// transformers' `get_resize_output_image_size` for DPT: scale each side to `size`; with
/// `keep_aspect_ratio`, both by the factor closer to 1; then each side to the nearest multiple
/// (Python's `round`: ties to even), falling back to floor/ceil as transformers does.
pub fn target_size(
    height: usize,
    width: usize,
    size: (usize, usize),
    keep_aspect_ratio: bool,
    multiple: usize,
) -> (usize, usize) {
    let mut scale_h = size.0 as f64 / height as f64;
    let mut scale_w = size.1 as f64 / width as f64;
    if keep_aspect_ratio {
        if (1.0 - scale_w).abs() < (1.0 - scale_h).abs() {
            scale_h = scale_w;
        } else {
            scale_w = scale_h;
        }
    }
    let constrain = |val: f64| -> usize {
        let m = multiple as f64;
        // max_val is None in DPT; min_val 0.
        let x = (val / m).round_ties_even() * m;
        let x = if x < 0.0 { (val / m).ceil() * m } else { x };
        x as usize
    };
    (constrain(scale_h * height as f64), constrain(scale_w * width as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_size_matches_transformers() {
        // Fixed size.
        assert_eq!(target_size(60, 100, (64, 64), false, 1), (64, 64));
        // Keep aspect: the side closer to its target wins, then multiples of 32.
        assert_eq!(target_size(60, 100, (64, 64), true, 32), (64, 96));
        assert_eq!(target_size(70, 45, (64, 64), true, 32), (64, 32));
        assert_eq!(target_size(480, 640, (384, 384), true, 32), (384, 512));
        // Python round: 1.5 -> 2, 2.5 -> 2.
        assert_eq!(target_size(48, 48, (48, 48), true, 32), (64, 64));
        assert_eq!(target_size(80, 80, (80, 80), true, 32), (64, 64));
        // Very elongated images collapse to 0 on the short side.
        assert_eq!(target_size(10, 1000, (384, 384), true, 32).0, 0);
    }
}
