#![allow(dead_code)]
//! The SD VAE: a fork of candle-transformers 0.11.1 `stable_diffusion::vae` (MIT/Apache-2.0,
//! by the candle authors), unchanged but for using this crate's blocks (see [`crate::blocks`]) and
//! `sdmesh_core::conv::Conv3x3` for the 3x3 convolutions.
//!
//! # Variational Auto-Encoder (VAE) Models.
//!
//! Auto-encoder models compress their input to a usually smaller latent space
//! before expanding it back to its original shape. This results in the latent values
//! compressing the original information.
use crate::blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig, UpDecoderBlock2D,
    UpDecoderBlock2DConfig,
};
use candle_core::{Result, Tensor};
use candle_nn as nn;
use candle_nn::Module;
use sdmesh_core::blocks::Conv2d;
use sdmesh_core::conv::Conv3x3;
use sdmesh_core::norm::GroupNorm;

#[derive(Debug, Clone)]
struct EncoderConfig {
    // down_block_types: DownEncoderBlock2D
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    norm_num_groups: usize,
    double_z: bool,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self { block_out_channels: vec![64], layers_per_block: 2, norm_num_groups: 32, double_z: true }
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv3x3,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv3x3,
    #[allow(dead_code)]
    config: EncoderConfig,
}

impl Encoder {
    fn new(vs: nn::VarBuilder, in_channels: usize, out_channels: usize, config: EncoderConfig) -> Result<Self> {
        let conv_in = Conv3x3::new(in_channels, config.block_out_channels[0], vs.pp("conv_in"))?;
        let mut down_blocks = vec![];
        let vs_down_blocks = vs.pp("down_blocks");
        for index in 0..config.block_out_channels.len() {
            let out_channels = config.block_out_channels[index];
            let in_channels =
                if index > 0 { config.block_out_channels[index - 1] } else { config.block_out_channels[0] };
            let is_final = index + 1 == config.block_out_channels.len();
            let cfg = DownEncoderBlock2DConfig {
                num_layers: config.layers_per_block,
                resnet_eps: 1e-6,
                resnet_groups: config.norm_num_groups,
                add_downsample: !is_final,
                downsample_padding: 0,
                ..Default::default()
            };
            let down_block =
                DownEncoderBlock2D::new(vs_down_blocks.pp(index.to_string()), in_channels, out_channels, cfg)?;
            down_blocks.push(down_block)
        }
        let last_block_out_channels = *config.block_out_channels.last().unwrap();
        let mid_cfg = UNetMidBlock2DConfig {
            resnet_eps: 1e-6,
            output_scale_factor: 1.,
            attn_num_head_channels: None,
            resnet_groups: Some(config.norm_num_groups),
            ..Default::default()
        };
        let mid_block = UNetMidBlock2D::new(vs.pp("mid_block"), last_block_out_channels, None, mid_cfg)?;
        let conv_norm_out =
            GroupNorm::new(config.norm_num_groups, last_block_out_channels, 1e-6, vs.pp("conv_norm_out"))?;
        let conv_out_channels = if config.double_z { 2 * out_channels } else { out_channels };
        let conv_out = Conv3x3::new(last_block_out_channels, conv_out_channels, vs.pp("conv_out"))?;
        Ok(Self { conv_in, down_blocks, mid_block, conv_norm_out, conv_out, config })
    }
}

impl Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.apply(&self.conv_in)?;
        for down_block in self.down_blocks.iter() {
            xs = xs.apply(down_block)?
        }
        let xs = self.mid_block.forward(&xs, None)?;
        self.conv_norm_out.forward_silu(&xs)?.apply(&self.conv_out)
    }
}

#[derive(Debug, Clone)]
struct DecoderConfig {
    // up_block_types: UpDecoderBlock2D
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    norm_num_groups: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self { block_out_channels: vec![64], layers_per_block: 2, norm_num_groups: 32 }
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv3x3,
    up_blocks: Vec<UpDecoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv3x3,
    #[allow(dead_code)]
    config: DecoderConfig,
}

impl Decoder {
    fn new(vs: nn::VarBuilder, in_channels: usize, out_channels: usize, config: DecoderConfig) -> Result<Self> {
        let n_block_out_channels = config.block_out_channels.len();
        let last_block_out_channels = *config.block_out_channels.last().unwrap();
        let conv_in = Conv3x3::new(in_channels, last_block_out_channels, vs.pp("conv_in"))?;
        let mid_cfg = UNetMidBlock2DConfig {
            resnet_eps: 1e-6,
            output_scale_factor: 1.,
            attn_num_head_channels: None,
            resnet_groups: Some(config.norm_num_groups),
            ..Default::default()
        };
        let mid_block = UNetMidBlock2D::new(vs.pp("mid_block"), last_block_out_channels, None, mid_cfg)?;
        let mut up_blocks = vec![];
        let vs_up_blocks = vs.pp("up_blocks");
        let reversed_block_out_channels: Vec<_> = config.block_out_channels.iter().copied().rev().collect();
        for index in 0..n_block_out_channels {
            let out_channels = reversed_block_out_channels[index];
            let in_channels =
                if index > 0 { reversed_block_out_channels[index - 1] } else { reversed_block_out_channels[0] };
            let is_final = index + 1 == n_block_out_channels;
            let cfg = UpDecoderBlock2DConfig {
                num_layers: config.layers_per_block + 1,
                resnet_eps: 1e-6,
                resnet_groups: config.norm_num_groups,
                add_upsample: !is_final,
                ..Default::default()
            };
            let up_block = UpDecoderBlock2D::new(vs_up_blocks.pp(index.to_string()), in_channels, out_channels, cfg)?;
            up_blocks.push(up_block)
        }
        let conv_norm_out =
            GroupNorm::new(config.norm_num_groups, config.block_out_channels[0], 1e-6, vs.pp("conv_norm_out"))?;
        let conv_out = Conv3x3::new(config.block_out_channels[0], out_channels, vs.pp("conv_out"))?;
        Ok(Self { conv_in, up_blocks, mid_block, conv_norm_out, conv_out, config })
    }
}

impl Decoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.mid_block.forward(&self.conv_in.forward(xs)?, None)?;
        for up_block in self.up_blocks.iter() {
            xs = up_block.forward(&xs)?
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&xs)?)
    }
}

#[derive(Debug, Clone)]
pub struct AutoEncoderKLConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl Default for AutoEncoderKLConfig {
    fn default() -> Self {
        Self {
            block_out_channels: vec![64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }
}

/// The encoder's latent distribution (diffusers' `DiagonalGaussianDistribution`). Sampling is
/// the caller's: it draws the noise (from the job's seed, in diffusers' order).
pub struct DiagonalGaussianDistribution {
    pub mean: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussianDistribution {
    pub fn new(parameters: &Tensor) -> Result<Self> {
        let mut parameters = parameters.chunk(2, 1)?.into_iter();
        let mean = parameters.next().unwrap();
        // diffusers clamps the log-variance (candle does not).
        let logvar = parameters.next().unwrap().clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(DiagonalGaussianDistribution { mean, std })
    }
}

// https://github.com/huggingface/diffusers/blob/970e30606c2944e3286f56e8eb6d3dc6d1eb85f7/src/diffusers/models/vae.py#L485
// This implementation is specific to the config used in stable-diffusion-v1-5
// https://huggingface.co/runwayml/stable-diffusion-v1-5/blob/main/vae/config.json
#[derive(Debug)]
pub struct AutoEncoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    pub config: AutoEncoderKLConfig,
}

impl AutoEncoderKL {
    pub fn new(
        vs: nn::VarBuilder,
        in_channels: usize,
        out_channels: usize,
        config: AutoEncoderKLConfig,
    ) -> Result<Self> {
        let latent_channels = config.latent_channels;
        let encoder_cfg = EncoderConfig {
            block_out_channels: config.block_out_channels.clone(),
            layers_per_block: config.layers_per_block,
            norm_num_groups: config.norm_num_groups,
            double_z: true,
        };
        let encoder = Encoder::new(vs.pp("encoder"), in_channels, latent_channels, encoder_cfg)?;
        let decoder_cfg = DecoderConfig {
            block_out_channels: config.block_out_channels.clone(),
            layers_per_block: config.layers_per_block,
            norm_num_groups: config.norm_num_groups,
        };
        let decoder = Decoder::new(vs.pp("decoder"), latent_channels, out_channels, decoder_cfg)?;
        let conv_cfg = Default::default();

        let quant_conv = {
            if config.use_quant_conv {
                Some(Conv2d::new(2 * latent_channels, 2 * latent_channels, 1, conv_cfg, vs.pp("quant_conv"))?)
            } else {
                None
            }
        };
        let post_quant_conv = {
            if config.use_post_quant_conv {
                Some(Conv2d::new(latent_channels, latent_channels, 1, conv_cfg, vs.pp("post_quant_conv"))?)
            } else {
                None
            }
        };
        Ok(Self { encoder, decoder, quant_conv, post_quant_conv, config })
    }

    /// Returns the distribution in the latent space.
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussianDistribution> {
        let xs = self.encoder.forward(xs)?;
        let parameters = match &self.quant_conv {
            None => xs,
            Some(quant_conv) => quant_conv.forward(&xs)?,
        };
        DiagonalGaussianDistribution::new(&parameters)
    }

    /// diffusers' `AutoencoderKL.tiled_decode` (what `vae.enable_tiling()` runs): overlapping
    /// tiles of `tile` latents (stride 3/4 of a tile) decoded one by one, each blended with the
    /// tile above and to its left over a quarter of a decoded tile, then cropped and joined.
    /// Memory is bounded by one tile's decode whatever the image size.
    pub fn decode_tiled(&self, z: &Tensor, tile: usize, scale_factor: usize) -> Result<Tensor> {
        const OVERLAP_FACTOR: f64 = 0.25;
        let (_, _, h, w) = z.dims4()?;
        let stride = ((tile as f64 * (1.0 - OVERLAP_FACTOR)) as usize).max(1);
        let tile_sample = tile * scale_factor;
        let blend_extent = (tile_sample as f64 * OVERLAP_FACTOR) as usize;
        let row_limit = tile_sample - blend_extent;
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for i in (0..h).step_by(stride) {
            let mut row = Vec::new();
            for j in (0..w).step_by(stride) {
                let t = z.narrow(2, i, tile.min(h - i))?.narrow(3, j, tile.min(w - j))?;
                row.push(self.decode(&t)?);
            }
            rows.push(row);
        }
        // diffusers blends in place, in this order: a tile's neighbours above and to the left
        // are already blended (uncropped) when it is.
        let mut result_rows = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let mut result_row = Vec::with_capacity(rows[i].len());
            for j in 0..rows[i].len() {
                let mut t = rows[i][j].clone();
                if i > 0 {
                    t = blend(&rows[i - 1][j], &t, blend_extent, 2)?;
                }
                if j > 0 {
                    t = blend(&rows[i][j - 1], &t, blend_extent, 3)?;
                }
                rows[i][j] = t.clone();
                let (_, _, th, tw) = t.dims4()?;
                result_row.push(t.narrow(2, 0, row_limit.min(th))?.narrow(3, 0, row_limit.min(tw))?);
            }
            result_rows.push(Tensor::cat(&result_row, 3)?);
        }
        Tensor::cat(&result_rows, 2)
    }

    /// Takes as input some sampled values.
    pub fn decode(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = match &self.post_quant_conv {
            None => xs,
            Some(post_quant_conv) => &post_quant_conv.forward(xs)?,
        };
        self.decoder.forward(xs)
    }
}

/// diffusers' `blend_v` (dim 2) / `blend_h` (dim 3): the first `extent` rows (columns) of `b`
/// fade in from the last ones of `a`: a * (1 - k / extent) + b * (k / extent).
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let mut shape = vec![1usize; 4];
    shape[dim] = extent;
    let weights_b: Vec<f32> = (0..extent).map(|k| (k as f64 / extent as f64) as f32).collect();
    let weights_a: Vec<f32> = (0..extent).map(|k| (1.0 - k as f64 / extent as f64) as f32).collect();
    let wa = Tensor::from_vec(weights_a, shape.as_slice(), a.device())?.to_dtype(a.dtype())?;
    let wb = Tensor::from_vec(weights_b, shape.as_slice(), b.device())?.to_dtype(b.dtype())?;
    let a_end = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let blended = (a_end.broadcast_mul(&wa)? + b.narrow(dim, 0, extent)?.broadcast_mul(&wb)?)?;
    let rest = b.dim(dim)? - extent;
    if rest == 0 {
        return Ok(blended);
    }
    Tensor::cat(&[&blended, &b.narrow(dim, extent, rest)?], dim)
}
