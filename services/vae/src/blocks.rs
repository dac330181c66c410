//! The VAE's blocks: a fork of candle-transformers 0.11.1 `stable_diffusion::{unet_2d_blocks::
//! {UNetMidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D}, attention::AttentionBlock}`
//! (MIT/Apache-2.0, by the candle authors). Changes: the ResNet blocks and samplers are
//! `sdmesh_core::blocks` (fast CPU 3x3 convolutions), and the attention block makes its
//! normalised input contiguous before the q/k/v projections; candle's `Linear` gives wrong
//! results on the transposed layout when the batch has more than one image, so candle's VAE
//! could only decode one image at a time.
#![allow(dead_code)] // configs are kept as candle keeps them

use candle_core::{Module, Result, Tensor};
use candle_nn as nn;
use sdmesh_core::attention::multi_head_attention;
use sdmesh_core::blocks::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use sdmesh_core::linear::{linear, Linear};

#[derive(Debug, Clone, Copy)]
pub struct UNetMidBlock2DConfig {
    pub num_layers: usize,
    pub resnet_eps: f64,
    pub resnet_groups: Option<usize>,
    pub attn_num_head_channels: Option<usize>,
    // attention_type "default"
    pub output_scale_factor: f64,
}

impl Default for UNetMidBlock2DConfig {
    fn default() -> Self {
        Self {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_groups: Some(32),
            attn_num_head_channels: Some(1),
            output_scale_factor: 1.,
        }
    }
}

#[derive(Debug)]
pub struct UNetMidBlock2D {
    resnet: ResnetBlock2D,
    attn_resnets: Vec<(AttentionBlock, ResnetBlock2D)>,
    span: tracing::Span,
    pub config: UNetMidBlock2DConfig,
}

impl UNetMidBlock2D {
    pub fn new(
        vs: nn::VarBuilder,
        in_channels: usize,
        temb_channels: Option<usize>,
        config: UNetMidBlock2DConfig,
    ) -> Result<Self> {
        let vs_resnets = vs.pp("resnets");
        let vs_attns = vs.pp("attentions");
        let resnet_groups = config.resnet_groups.unwrap_or_else(|| usize::min(in_channels / 4, 32));
        let resnet_cfg = ResnetBlock2DConfig {
            eps: config.resnet_eps,
            groups: resnet_groups,
            output_scale_factor: config.output_scale_factor,
            temb_channels,
            ..Default::default()
        };
        let resnet = ResnetBlock2D::new(vs_resnets.pp("0"), in_channels, resnet_cfg)?;
        let attn_cfg = AttentionBlockConfig {
            num_head_channels: config.attn_num_head_channels,
            num_groups: resnet_groups,
            rescale_output_factor: config.output_scale_factor,
            eps: config.resnet_eps,
        };
        let mut attn_resnets = vec![];
        for index in 0..config.num_layers {
            let attn = AttentionBlock::new(vs_attns.pp(index.to_string()), in_channels, attn_cfg)?;
            let resnet = ResnetBlock2D::new(vs_resnets.pp((index + 1).to_string()), in_channels, resnet_cfg)?;
            attn_resnets.push((attn, resnet))
        }
        let span = tracing::span!(tracing::Level::TRACE, "mid2d");
        Ok(Self { resnet, attn_resnets, span, config })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let mut xs = self.resnet.forward(xs, temb)?;
        for (attn, resnet) in self.attn_resnets.iter() {
            xs = resnet.forward(&attn.forward(&xs)?, temb)?
        }
        Ok(xs)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AttentionBlockConfig {
    pub num_head_channels: Option<usize>,
    pub num_groups: usize,
    pub rescale_output_factor: f64,
    pub eps: f64,
}

impl Default for AttentionBlockConfig {
    fn default() -> Self {
        Self { num_head_channels: None, num_groups: 32, rescale_output_factor: 1., eps: 1e-5 }
    }
}

#[derive(Debug)]
pub struct AttentionBlock {
    group_norm: sdmesh_core::norm::GroupNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    proj_attn: Linear,
    channels: usize,
    num_heads: usize,
    span: tracing::Span,
    config: AttentionBlockConfig,
}

// In the .safetensor weights of official Stable Diffusion 3 Medium Huggingface repo
// https://huggingface.co/stabilityai/stable-diffusion-3-medium
// Linear layer may use a different dimension for the weight in the linear, which is
// incompatible with the current implementation of the nn::linear constructor.
// This is a workaround to handle the different dimensions.
fn get_qkv_linear(channels: usize, vs: nn::VarBuilder) -> Result<Linear> {
    match vs.get((channels, channels), "weight") {
        Ok(_) => linear(channels, channels, vs),
        Err(_) => {
            let weight = vs.get((channels, channels, 1, 1), "weight")?.reshape((channels, channels))?;
            let bias = vs.get((channels,), "bias")?;
            Linear::new(weight, Some(bias))
        }
    }
}

impl AttentionBlock {
    pub fn new(vs: nn::VarBuilder, channels: usize, config: AttentionBlockConfig) -> Result<Self> {
        let num_head_channels = config.num_head_channels.unwrap_or(channels);
        let num_heads = channels / num_head_channels;
        let group_norm =
            sdmesh_core::norm::GroupNorm::new(config.num_groups, channels, config.eps, vs.pp("group_norm"))?;
        let (q_path, k_path, v_path, out_path) = if vs.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        let query = get_qkv_linear(channels, vs.pp(q_path))?;
        let key = get_qkv_linear(channels, vs.pp(k_path))?;
        let value = get_qkv_linear(channels, vs.pp(v_path))?;
        let proj_attn = get_qkv_linear(channels, vs.pp(out_path))?;
        let span = tracing::span!(tracing::Level::TRACE, "attn-block");
        Ok(Self { group_norm, query, key, value, proj_attn, channels, num_heads, span, config })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let residual = xs;
        let (batch, channel, height, width) = xs.dims4()?;
        let xs = self
            .group_norm
            .forward(xs)?
            .reshape((batch, channel, height * width))?
            .transpose(1, 2)?
            // candle's Linear is wrong on this transposed layout when batch > 1.
            .contiguous()?;

        let query_proj = self.query.forward(&xs)?;
        let key_proj = self.key.forward(&xs)?;
        let value_proj = self.value.forward(&xs)?;

        // scale is applied twice, hence the -0.25 here rather than -0.5.
        // https://github.com/huggingface/diffusers/blob/d3d22ce5a894becb951eec03e663951b28d45135/src/diffusers/models/attention.py#L87
        let scale = f64::powf(self.channels as f64 / self.num_heads as f64, -0.25);
        // Scores in f32 whatever the dtype (candle's VAE upcast too), and bounded: a batch of
        // 1024x1024 decodes would otherwise hold 2^31 scores.
        let xs = multi_head_attention(&(query_proj * scale)?, &key_proj, &value_proj, self.num_heads, scale, true)?;
        let xs = self.proj_attn.forward(&xs)?.t()?.reshape((batch, channel, height, width))?;
        (xs + residual)? / self.config.rescale_output_factor
    }
}

#[derive(Debug, Clone, Copy)]
pub struct DownEncoderBlock2DConfig {
    pub num_layers: usize,
    pub resnet_eps: f64,
    pub resnet_groups: usize,
    pub output_scale_factor: f64,
    pub add_downsample: bool,
    pub downsample_padding: usize,
}

impl Default for DownEncoderBlock2DConfig {
    fn default() -> Self {
        Self {
            num_layers: 1,
            resnet_eps: 1e-6,
            resnet_groups: 32,
            output_scale_factor: 1.,
            add_downsample: true,
            downsample_padding: 1,
        }
    }
}

/// The encoder's ResNets, then (but for the last block) a stride-2 convolution.
#[derive(Debug)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
    span: tracing::Span,
    pub config: DownEncoderBlock2DConfig,
}

impl DownEncoderBlock2D {
    pub fn new(
        vs: nn::VarBuilder,
        in_channels: usize,
        out_channels: usize,
        config: DownEncoderBlock2DConfig,
    ) -> Result<Self> {
        let resnets = resnets(
            &vs,
            in_channels,
            out_channels,
            config.num_layers,
            config.resnet_eps,
            config.resnet_groups,
            config.output_scale_factor,
        )?;
        let downsampler = if config.add_downsample {
            let vs = vs.pp("downsamplers").pp("0");
            Some(Downsample2D::new(vs, out_channels, true, out_channels, config.downsample_padding)?)
        } else {
            None
        };
        let span = tracing::span!(tracing::Level::TRACE, "down-enc2d");
        Ok(Self { resnets, downsampler, span, config })
    }
}

impl Module for DownEncoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let xs = through(&self.resnets, xs)?;
        match &self.downsampler {
            Some(downsampler) => downsampler.forward(&xs),
            None => Ok(xs),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct UpDecoderBlock2DConfig {
    pub num_layers: usize,
    pub resnet_eps: f64,
    pub resnet_groups: usize,
    pub output_scale_factor: f64,
    pub add_upsample: bool,
}

impl Default for UpDecoderBlock2DConfig {
    fn default() -> Self {
        Self { num_layers: 1, resnet_eps: 1e-6, resnet_groups: 32, output_scale_factor: 1., add_upsample: true }
    }
}

/// The decoder's ResNets, then (but for the last block) a 2x upsampling.
#[derive(Debug)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
    span: tracing::Span,
    pub config: UpDecoderBlock2DConfig,
}

impl UpDecoderBlock2D {
    pub fn new(
        vs: nn::VarBuilder,
        in_channels: usize,
        out_channels: usize,
        config: UpDecoderBlock2DConfig,
    ) -> Result<Self> {
        let resnets = resnets(
            &vs,
            in_channels,
            out_channels,
            config.num_layers,
            config.resnet_eps,
            config.resnet_groups,
            config.output_scale_factor,
        )?;
        let upsampler = if config.add_upsample {
            Some(Upsample2D::new(vs.pp("upsamplers").pp("0"), out_channels, out_channels)?)
        } else {
            None
        };
        let span = tracing::span!(tracing::Level::TRACE, "up-dec2d");
        Ok(Self { resnets, upsampler, span, config })
    }
}

impl Module for UpDecoderBlock2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let xs = through(&self.resnets, xs)?;
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&xs, None),
            None => Ok(xs),
        }
    }
}

/// `xs` through `resnets` in turn (no time embedding).
fn through(resnets: &[ResnetBlock2D], xs: &Tensor) -> Result<Tensor> {
    resnets.iter().try_fold(xs.clone(), |xs, resnet| resnet.forward(&xs, None))
}

/// `count` ResNets without time embedding under `vs`/resnets/i, the first from `in_channels`.
fn resnets(
    vs: &nn::VarBuilder,
    in_channels: usize,
    out_channels: usize,
    count: usize,
    eps: f64,
    groups: usize,
    output_scale_factor: f64,
) -> Result<Vec<ResnetBlock2D>> {
    let vs = vs.pp("resnets");
    let config = ResnetBlock2DConfig {
        out_channels: Some(out_channels),
        eps,
        groups,
        output_scale_factor,
        temb_channels: None,
        ..Default::default()
    };
    (0..count)
        .map(|i| ResnetBlock2D::new(vs.pp(i.to_string()), if i == 0 { in_channels } else { out_channels }, config))
        .collect()
}
