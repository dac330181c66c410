//! x4 upscaling as diffusers' StableDiffusionUpscalePipeline runs it, and the tiling that keeps
//! a large input within a memory bound.
//!
//! The upscaler's UNet denoises latents of the low-resolution image's size with the image
//! itself as 3 extra input channels, noised in pixel space by the `low_res_scheduler` (a DDPM
//! schedule) at `noise_level`, which is also the UNet's class label; its VAE decodes x4.
//! Draws: the low-resolution image's noise (its shape), then the starting latents.
//!
//! Tiling: when the latents are larger than `tile` on a side, each step runs the UNet on
//! overlapping `tile` x `tile` windows (all of one size, so the unet service batches them) and
//! blends their outputs with weights that ramp linearly across each overlap. Inside one tile
//! the result is the untiled one; diffusers has no tiled UNet, so tiled jobs are not
//! bit-comparable with it (the VAE side tiles exactly as diffusers' `enable_tiling()`).

use crate::noise::NoiseSource;
use crate::scheduler::SchedulerConfig;
use candle_core::{DType, Device, Tensor};
use sdmesh_core::model_dir::{ComponentDir, ModelDirError};
use sdmesh_core::{DenoiseInput, Denoiser, Error, Result};
use std::path::Path;

pub const DEFAULT_NOISE_LEVEL: u32 = 20;
pub const DEFAULT_STEPS: u32 = 75;
pub const DEFAULT_GUIDANCE: f32 = 9.0;
/// diffusers' StableDiffusionUpscalePipeline default when model_index.json does not say.
const DEFAULT_MAX_NOISE_LEVEL: u32 = 350;
/// Default largest latent side one UNet call gets (orchestrator --upscale-tile-latents).
pub const DEFAULT_TILE_LATENTS: usize = 128;
/// Latents shared by neighbouring tiles.
pub const TILE_OVERLAP: usize = 32;
/// Windows of one step in flight at once: enough to fill a unet batch (16 rows = 8 guided
/// tiles), few enough not to flood its queue (a 512 input has 36 tiles a step).
const TILES_IN_FLIGHT: usize = 8;

/// What makes a checkpoint an upscaler: its low-resolution noise schedule and bound.
#[derive(Debug, Clone)]
pub struct Upscaler {
    /// float32 alphas_cumprod of low_res_scheduler/ (DDPM add_noise uses them).
    pub low_res_alphas_cumprod: Vec<f32>,
    pub max_noise_level: u32,
}

impl Upscaler {
    /// The model folder's upscaler parts, or None when it has no low_res_scheduler/.
    pub fn load(model: &Path) -> std::result::Result<Option<Self>, ModelDirError> {
        if !model.join("low_res_scheduler").is_dir() {
            return Ok(None);
        }
        let dir = ComponentDir::open(model, "low_res_scheduler")?;
        let path = dir.file("scheduler_config.json")?;
        let json: serde_json::Value = dir.json("scheduler_config.json")?;
        let malformed = |message: String| ModelDirError::Malformed { path: path.clone(), message };
        let config = SchedulerConfig::from_json(&json).map_err(malformed)?;
        let low_res_alphas_cumprod = config.ddpm().map_err(malformed)?.betas.alphas_cumprod();
        let index: serde_json::Value = sdmesh_core::model_dir::read_json(&model.join("model_index.json"))?;
        let max_noise_level = index
            .get("max_noise_level")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32)
            .unwrap_or(DEFAULT_MAX_NOISE_LEVEL)
            .min(low_res_alphas_cumprod.len().saturating_sub(1) as u32);
        Ok(Some(Self { low_res_alphas_cumprod, max_noise_level }))
    }

    pub fn check_noise_level(&self, noise_level: u32) -> Result<()> {
        if noise_level > self.max_noise_level {
            return Err(Error::invalid(format!(
                "noise_level: {noise_level} is not allowed; use 0 to {} (this upscaler's max_noise_level)",
                self.max_noise_level
            )));
        }
        Ok(())
    }

    /// The image noised to `noise_level` (DDPM add_noise: sqrt(a) x + sqrt(1 - a) noise), with
    /// the noise drawn in the image's shape, as the pipeline draws it.
    pub fn noised_image(&self, image: &Tensor, noise_level: u32, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let eps = noise.randn(image.dims())?;
        let alpha = self.low_res_alphas_cumprod[noise_level as usize];
        Ok(((image * f64::from(alpha.sqrt()))? + (eps * f64::from((1.0 - alpha).sqrt()))?)?)
    }
}

/// Start offsets of tiles of `tile` covering `0..len` with at least `overlap` shared, the last
/// one flush with the end (so every tile has the same size).
fn tile_starts(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let stride = tile.saturating_sub(overlap).max(1);
    let mut starts: Vec<usize> = (0..).map(|k| k * stride).take_while(|&s| s + tile < len).collect();
    starts.push(len - tile);
    starts
}

/// Blend weights of a tile along one axis: ramps up over the overlap with the previous tile
/// and down over the overlap with the next one (1 elsewhere, and at the image's edges).
fn ramp(start: usize, tile: usize, prev_end: Option<usize>, next_start: Option<usize>) -> Vec<f32> {
    (0..tile)
        .map(|k| {
            let p = start + k;
            let mut w = 1.0f32;
            if let Some(prev_end) = prev_end.filter(|&e| p < e) {
                w = w.min((p - start + 1) as f32 / (prev_end - start + 1) as f32);
            }
            if let Some(next) = next_start.filter(|&n| p >= n) {
                let end = start + tile;
                w = w.min((end - p) as f32 / (end - next + 1) as f32);
            }
            w
        })
        .collect()
}

fn axis_weights(len: usize, tile: usize, overlap: usize) -> Vec<(usize, Vec<f32>)> {
    let starts = tile_starts(len, tile, overlap);
    let size = tile.min(len);
    (0..starts.len())
        .map(|i| {
            let prev_end = (i > 0).then(|| starts[i - 1] + size);
            let next_start = starts.get(i + 1).copied();
            (starts[i], ramp(starts[i], size, prev_end, next_start))
        })
        .collect()
}

/// A job's tiling of its latents into overlapping windows of at most `tile` a side, planned once
/// per job: the windows, their blend weights and the weights' sum, and each window of the
/// job's constant extra channels (the same tensors every step, so they cross the wire once).
pub struct Tiling {
    windows: Vec<Window>,
    /// [1, 1, h, w]: what the blended outputs are divided by.
    weight_sum: Tensor,
    /// Latent (height, width) and window (height, width).
    size: (usize, usize),
    window: (usize, usize),
}

struct Window {
    y: usize,
    x: usize,
    /// [1, 1, window h, window w]
    weight: Tensor,
    extra: Option<Tensor>,
}

impl Tiling {
    /// The plan for latents of `h` x `w` with `extra` channels ([n, k, h, w]); None when they
    /// fit one tile.
    pub fn plan(h: usize, w: usize, tile: usize, extra: Option<&Tensor>) -> Result<Option<Self>> {
        if h <= tile && w <= tile {
            return Ok(None);
        }
        let overlap = TILE_OVERLAP.min(tile / 2);
        let (rows, cols) = (axis_weights(h, tile, overlap), axis_weights(w, tile, overlap));
        let window = (tile.min(h), tile.min(w));
        let mut weight_sum = Tensor::zeros((1, 1, h, w), DType::F32, &Device::Cpu)?;
        let mut windows = Vec::with_capacity(rows.len() * cols.len());
        for (y, wy) in &rows {
            for (x, wx) in &cols {
                let wy_t = Tensor::from_vec(wy.clone(), (1, 1, window.0, 1), &Device::Cpu)?;
                let wx_t = Tensor::from_vec(wx.clone(), (1, 1, 1, window.1), &Device::Cpu)?;
                let weight = wy_t.broadcast_mul(&wx_t)?;
                let region = [0..1, 0..1, *y..y + window.0, *x..x + window.1];
                let summed = (weight_sum.narrow(2, *y, window.0)?.narrow(3, *x, window.1)? + &weight)?;
                weight_sum = weight_sum.slice_assign(&region, &summed)?;
                let extra = extra.map(|e| e.narrow(2, *y, window.0)?.narrow(3, *x, window.1)).transpose()?;
                windows.push(Window { y: *y, x: *x, weight, extra });
            }
        }
        Ok(Some(Self { windows, weight_sum, size: (h, w), window }))
    }

    /// One denoising step: the windows' requests go out [`TILES_IN_FLIGHT`] at a time (same
    /// size, so the unet batches them), and their outputs are blended. `input.extra` is
    /// replaced by each window's planned extra channels.
    pub async fn denoise(&self, denoiser: &dyn Denoiser, input: DenoiseInput) -> Result<Tensor> {
        use futures::{StreamExt, TryStreamExt};
        let ((h, w), (th, tw)) = (self.size, self.window);
        let calls = self
            .windows
            .iter()
            .map(|win| {
                let latents = input.latents.narrow(2, win.y, th)?.narrow(3, win.x, tw)?;
                Ok(denoiser.denoise(DenoiseInput { latents, extra: win.extra.clone(), ..input.clone() }))
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs: Vec<Tensor> = futures::stream::iter(calls).buffered(TILES_IN_FLIGHT).try_collect().await?;
        let (n, c) = (outputs[0].dim(0)?, outputs[0].dim(1)?);
        let mut sum = Tensor::zeros((n, c, h, w), DType::F32, &Device::Cpu)?;
        for (win, out) in self.windows.iter().zip(&outputs) {
            let weighted = out.to_dtype(DType::F32)?.broadcast_mul(&win.weight)?;
            let region = [0..n, 0..c, win.y..win.y + th, win.x..win.x + tw];
            sum = sum.slice_assign(&region, &(sum.narrow(2, win.y, th)?.narrow(3, win.x, tw)? + weighted)?)?;
        }
        Ok(sum.broadcast_div(&self.weight_sum)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_and_share_an_overlap() {
        assert_eq!(tile_starts(100, 128, 32), vec![0]);
        assert_eq!(tile_starts(200, 128, 32), vec![0, 72]);
        assert_eq!(tile_starts(300, 128, 32), vec![0, 96, 172]);
        for (len, tile) in [(200usize, 128usize), (300, 128), (129, 128), (512, 128), (40, 16)] {
            let overlap = TILE_OVERLAP.min(tile / 2);
            let starts = tile_starts(len, tile, overlap);
            assert_eq!(starts[0], 0);
            assert_eq!(starts.last().unwrap() + tile, len);
            for pair in starts.windows(2) {
                assert!(pair[0] + tile >= pair[1] + overlap.min(len - tile), "{len} {tile}: {starts:?}");
            }
        }
    }

    /// A denoiser whose output at a position depends only on its input there: tiling it must
    /// give the untiled output, whatever the tiles; every call stays within the tile.
    struct Pointwise {
        largest: std::sync::Mutex<(usize, usize)>,
    }

    #[async_trait::async_trait]
    impl Denoiser for Pointwise {
        async fn denoise(&self, x: DenoiseInput) -> Result<Tensor> {
            let (_, _, h, w) = x.latents.dims4()?;
            let mut largest = self.largest.lock().unwrap();
            *largest = (largest.0.max(h), largest.1.max(w));
            let extra = x.extra.as_ref().expect("extra channels");
            Ok(((x.latents * 1.5)?.sin()? + extra.sum_keepdim(1)?.broadcast_as((extra.dim(0)?, 4, h, w))?)?)
        }
        async fn info(&self) -> Result<sdmesh_proto::v1::UnetInfo> {
            Ok(Default::default())
        }
    }

    #[tokio::test]
    async fn tiled_steps_equal_untiled_ones_for_a_local_model() {
        let x = sdmesh_core::torch_rng::randn_tensor(1, &[2, 4, 45, 70], &Device::Cpu).unwrap();
        let extra = sdmesh_core::torch_rng::randn_tensor(2, &[2, 3, 45, 70], &Device::Cpu).unwrap();
        let cond = Tensor::zeros((1, 77, 8), DType::F32, &Device::Cpu).unwrap();
        let input = DenoiseInput {
            latents: x,
            extra: Some(extra),
            timestep: 10.0,
            cond,
            uncond: None,
            guidance_scale: 1.0,
            guidance_rescale: 0.0,
            class_label: Some(20),
        };
        let model = Pointwise { largest: Default::default() };
        let whole = model.denoise(input.clone()).await.unwrap();
        for tile in [16usize, 24, 40, 64] {
            let model = Pointwise { largest: Default::default() };
            let plan = Tiling::plan(45, 70, tile, input.extra.as_ref()).unwrap().expect("45 x 70 needs tiles");
            let tiled = plan.denoise(&model, input.clone()).await.unwrap();
            let diff = (&tiled - &whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "tile {tile}: {diff}");
            let (h, w) = *model.largest.lock().unwrap();
            assert!(h <= tile && w <= tile, "tile {tile}: a call got {h}x{w}");
        }
    }

    #[test]
    fn weights_are_positive_everywhere() {
        for (len, tile) in [(200usize, 128usize), (300, 128), (40, 16), (17, 16)] {
            let mut total = vec![0f32; len];
            for (start, w) in axis_weights(len, tile, TILE_OVERLAP.min(tile / 2)) {
                assert!(w.iter().all(|&v| v > 0.0 && v <= 1.0));
                for (k, v) in w.iter().enumerate() {
                    total[start + k] += v;
                }
            }
            assert!(total.iter().all(|&t| t > 0.0), "{len} {tile}");
        }
    }
}
