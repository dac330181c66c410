//! transformers' `CLIPImageProcessor` as diffusers' pipelines get it (the PIL backend,
//! `CLIPImageProcessorPil`, which is what transformers 5 gives for `CLIPImageProcessor` when
//! torchvision is not installed, and what the reference fixtures use):
//!
//! 1. `convert_to_rgb`: an image with transparency is blended onto white (PIL's `alpha_composite`
//!    over an opaque white background, then `convert("RGB")`); others are `convert("RGB")`;
//! 2. resize with PIL's filter so the shortest edge is `size.shortest_edge` (the long edge
//!    `int(shortest_edge * long / short)`), or to a fixed `{height, width}`;
//! 3. center crop to `crop_size` (offsets `(in - crop) // 2`; zero padding, centred with
//!    `ceil((crop - in) / 2)`, on an axis shorter than the crop);
//! 4. `float32(x as f64 * rescale_factor)`, then `(x - mean) / std` in float32, as NCHW.
//!
//! Also the step before it in the pipeline: diffusers' `numpy_to_pil`, which quantises the decoded
//! float images with `(x * 255).round().astype("uint8")` — numpy's round, half to even.

use candle_core::{Device, Tensor};
use image::RgbImage;
use sdmesh_core::images::{self, Filter};
use sdmesh_core::Result;
use serde::Deserialize;

/// preprocessor_config.json (transformers' `CLIPImageProcessor` defaults for anything missing).
#[derive(Debug, Clone, Deserialize)]
pub struct PreprocessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    #[serde(default = "default_size")]
    pub size: SizeSpec,
    /// PIL resampling filter number (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic).
    #[serde(default = "bicubic")]
    pub resample: u32,
    #[serde(default = "yes")]
    pub do_center_crop: bool,
    #[serde(default = "default_crop")]
    pub crop_size: SizeSpec,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "rescale")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "clip_mean")]
    pub image_mean: Vec<f64>,
    #[serde(default = "clip_std")]
    pub image_std: Vec<f64>,
    #[serde(default = "yes")]
    pub do_convert_rgb: bool,
    #[serde(default)]
    pub do_pad: bool,
}

/// `size` / `crop_size`: a dict (transformers 4.2x+) or a bare int (older feature extractor files:
/// a shortest edge for `size`, a square for `crop_size`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    ShortestEdge { shortest_edge: usize },
    HeightWidth { height: usize, width: usize },
    Int(usize),
}

fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    3
}
fn rescale() -> f64 {
    1.0 / 255.0
}
fn default_size() -> SizeSpec {
    SizeSpec::ShortestEdge { shortest_edge: 224 }
}
fn default_crop() -> SizeSpec {
    SizeSpec::HeightWidth { height: 224, width: 224 }
}
/// transformers' OPENAI_CLIP_MEAN / _STD.
fn clip_mean() -> Vec<f64> {
    vec![0.48145466, 0.4578275, 0.40821073]
}
fn clip_std() -> Vec<f64> {
    vec![0.26862954, 0.26130258, 0.27577711]
}

/// How an image is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    None,
    ShortestEdge(usize),
    Fixed { height: usize, width: usize },
}

/// The preprocessing, validated.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    pub config: PreprocessorConfig,
    pub resize: Resize,
    /// (height, width) of the crop, when cropping.
    pub crop: Option<(usize, usize)>,
    filter: Filter,
    mean: [f32; 3],
    std: [f32; 3],
}

impl Preprocessor {
    /// Errors say what is unsupported.
    pub fn new(config: PreprocessorConfig) -> std::result::Result<Self, String> {
        let resize = if !config.do_resize {
            Resize::None
        } else {
            match config.size {
                SizeSpec::ShortestEdge { shortest_edge: s } | SizeSpec::Int(s) => Resize::ShortestEdge(s),
                SizeSpec::HeightWidth { height, width } => Resize::Fixed { height, width },
            }
        };
        if matches!(resize, Resize::ShortestEdge(0) | Resize::Fixed { height: 0, .. } | Resize::Fixed { width: 0, .. })
        {
            return Err(format!("size {:?} must be positive", config.size));
        }
        let crop = if config.do_center_crop {
            let c = match config.crop_size {
                SizeSpec::HeightWidth { height, width } => (height, width),
                SizeSpec::Int(s) => (s, s),
                SizeSpec::ShortestEdge { .. } => {
                    return Err("crop_size must be {\"height\", \"width\"} or an int".into());
                }
            };
            if c.0 == 0 || c.1 == 0 {
                return Err(format!("crop_size {c:?} must be positive"));
            }
            Some(c)
        } else {
            None
        };
        if config.do_pad {
            return Err("do_pad is not supported".into());
        }
        let filter = Filter::from_pil(config.resample)?;
        let mean = images::per_channel(&config.image_mean, "image_mean")?;
        let std = images::per_channel(&config.image_std, "image_std")?;
        if std.contains(&0.0) {
            return Err("image_std must not contain 0".into());
        }
        Ok(Self { resize, crop, filter, mean, std, config })
    }

    /// The (height, width) every image comes out at, when that does not depend on the image
    /// (a crop, or a fixed resize).
    pub fn fixed_output_size(&self) -> Option<(usize, usize)> {
        match (self.crop, self.resize) {
            (Some(c), _) => Some(c),
            (None, Resize::Fixed { height, width }) => Some((height, width)),
            _ => None,
        }
    }

    /// The (height, width) an image of `height` x `width` is resized to (before the crop).
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.resize {
            Resize::None => (height, width),
            Resize::Fixed { height, width } => (height, width),
            Resize::ShortestEdge(s) => shortest_edge_size(height, width, s),
        }
    }

    /// An 8-bit RGB image -> pixel_values [1, 3, h, w] f32 (sides must be non-zero).
    pub fn pixel_values(&self, image: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
        let (h0, w0) = (image.height() as usize, image.width() as usize);
        let (rh, rw) = self.resized_size(h0, w0);
        let resized;
        let image = if (rh, rw) != (h0, w0) {
            resized = images::resize_rgb(image, rw as _, rh as _, self.filter);
            &resized
        } else {
            image
        };
        let (h, w) = self.crop.unwrap_or((rh, rw));
        // Per axis: the source offset of output index 0 (crop), or the destination offset of the
        // source's first index (padding), as transformers' center_crop computes them.
        let axis = |size: usize, crop: usize| -> (usize, usize) {
            if size >= crop {
                ((size - crop) / 2, 0)
            } else {
                (0, (crop - size).div_ceil(2))
            }
        };
        let (sy, py) = axis(rh, h);
        let (sx, px) = axis(rw, w);
        let scale = self.config.rescale_factor;
        // 0 (padding) goes through rescale and normalise like any pixel.
        let value = |v: u8, c: usize| -> f32 {
            let mut x = if self.config.do_rescale { (f64::from(v) * scale) as f32 } else { f32::from(v) };
            if self.config.do_normalize {
                x = (x - self.mean[c]) / self.std[c];
            }
            x
        };
        let pad: [f32; 3] = std::array::from_fn(|c| value(0, c));
        let mut out = vec![0f32; 3 * h * w];
        for y in 0..h {
            let src_y = (y + sy).checked_sub(py).filter(|&v| v < rh);
            for x in 0..w {
                let src_x = (x + sx).checked_sub(px).filter(|&v| v < rw);
                let i = y * w + x;
                match (src_y, src_x) {
                    (Some(yy), Some(xx)) => {
                        let p = image.get_pixel(xx as u32, yy as u32).0;
                        for c in 0..3 {
                            out[c * h * w + i] = value(p[c], c);
                        }
                    }
                    _ => {
                        for c in 0..3 {
                            out[c * h * w + i] = pad[c];
                        }
                    }
                }
            }
        }
        Tensor::from_vec(out, (1, 3, h, w), device)
    }
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the short side becomes
/// `size`, the long one `int(size * long / short)` (true division, truncated).
pub fn shortest_edge_size(height: usize, width: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let new_long = ((size * long) as f64 / short as f64) as usize;
    if width <= height {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// PIL's `Image.alpha_composite(white, rgba)` for one channel: `AlphaComposite.c` with an opaque
/// white destination (7-bit fixed point, division by 255 as `((x >> 8) + x) >> 8`).
#[inline]
pub fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    let (c, a) = (u32::from(c), u32::from(a));
    // coef1 = a * 255 * 255 * 128 / (255 * 255) = a * 128; coef2 = (255 - a) * 128.
    let tmp = c * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
    ((((tmp >> 8) + tmp) >> 8) >> 7) as u8
}

/// Decodes a PNG or JPEG as transformers' `convert_to_rgb` sees it after PIL's `Image.open`: RGB as
/// `convert("RGB")`, and where the image has transparency (an alpha channel, or a tRNS chunk),
/// every pixel blended onto white.
///
/// Not reproduced: PIL's handling of a tRNS chunk on 16-bit images (PIL compares the 8-bit pixels
/// with the 16-bit transparent colour); here the 16-bit comparison of the PNG decoder is used.
pub fn decode_rgb_over_white(bytes: &[u8], max_pixels: u64) -> Result<RgbImage> {
    let (mut rgb, alpha) = images::decode_rgb_and_alpha_limited(bytes, max_pixels)?;
    if let Some(alpha) = alpha {
        for (p, &a) in rgb.pixels_mut().zip(&alpha) {
            if a != 255 {
                for c in p.0.iter_mut() {
                    *c = over_white(*c, a);
                }
            }
        }
    }
    Ok(rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_matches_transformers() {
        assert_eq!(shortest_edge_size(64, 64, 56), (56, 56));
        assert_eq!(shortest_edge_size(60, 100, 56), (56, 93)); // int(56 * 100 / 60) = int(93.33)
        assert_eq!(shortest_edge_size(70, 45, 56), (87, 56)); // int(87.11)
        assert_eq!(shortest_edge_size(31, 90, 56), (56, 162)); // int(162.58)
        assert_eq!(shortest_edge_size(512, 768, 224), (224, 336));
    }

    #[test]
    fn quantization_is_half_to_even() {
        let img = images::quantize_like_numpy_to_pil(&[0.0, 1.0, 0.5, 126.5 / 255.0, 127.5 / 255.0, 0.2], 1, 2);
        let expected = [0u8, 255, 128, (126.5f32 / 255.0 * 255.0).round_ties_even() as u8, 128, 51];
        assert_eq!(img.as_raw().as_slice(), &expected);
    }

    #[test]
    fn over_white_extremes() {
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(17, 255), 17);
        assert_eq!(over_white(0, 128), 127);
    }
}
