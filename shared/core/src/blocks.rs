//! The building blocks the SD UNet and VAE share: a fork of candle-transformers 0.11.1
//! `stable_diffusion::{resnet, unet_2d_blocks}` (MIT/Apache-2.0, by the candle authors): the
//! ResNet block and the up/down samplers. Changes: 3x3 convolutions are [`Conv3x3`] and
//! GroupNorm + SiLU is [`GroupNorm::forward_silu`] (fast CPU paths; the samplers' stride-2
//! convolutions too), the block's additions and the upsampling happen inside the convolutions'
//! passes, 1x1 convolutions are matrix products ([`Conv2d`]), and the time-embedding projection
//! runs one row at a time (see [`per_row`]).

use crate::conv::Conv3x3;
use crate::cpu_gemm::{cpu_f32, gemm_row_bias, is_cpu_f32, View};
use crate::linear::{linear, Linear};
use crate::norm::GroupNorm;
use candle_core::{Device, Module, Result, Tensor, D};
use candle_nn as nn;

/// A convolution of any shape on the fastest path this crate has for it, with a `conv2d`
/// tracing span as candle-transformers' `with_tracing` wraps them (the benchmark's profile
/// reads the spans).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weights: ConvWeights,
    span: tracing::Span,
}

#[derive(Debug, Clone)]
enum ConvWeights {
    /// A 1x1 convolution (stride 1, no padding, one group) of an f32 CPU model: `weight`
    /// [c_out, c_in], one matrix product per image, `W @ x [c_in, h * w]`, the bias its
    /// starting value. candle's convolution kernel spends an im2col pass on it and ran it at
    /// 40 GFLOP/s (the VAE's 512 -> 256 and 256 -> 128 shortcuts at 128 and 256 px took 213 ms
    /// of a 256 px decode). Every image is its own product of one shape, so its result does not
    /// depend on the batch.
    OneByOneCpuF32 { weight: Vec<f32>, bias: Option<Vec<f32>>, c_in: usize, c_out: usize },
    /// A 3x3 convolution [`Conv3x3`] takes.
    ThreeByThree(Conv3x3),
    /// Any other convolution: candle's.
    Candle(nn::Conv2d),
}

impl Conv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: nn::Conv2dConfig,
        vs: nn::VarBuilder,
    ) -> Result<Self> {
        Self::from_conv(nn::conv2d(in_channels, out_channels, kernel, config, vs)?)
    }

    /// Wraps a loaded convolution: a 1x1 one of an f32 CPU model takes the matrix-product
    /// path (and drops candle's copy of the weights), a 3x3 one [`Conv3x3`]'s.
    pub fn from_conv(conv: nn::Conv2d) -> Result<Self> {
        if Conv3x3::supports(&conv) {
            let weights = ConvWeights::ThreeByThree(Conv3x3::from_conv(conv)?);
            return Ok(Self { weights, span: tracing::span!(tracing::Level::TRACE, "conv2d") });
        }
        let (c_out, c_in, kh, kw) = conv.weight().dims4()?;
        let config = conv.config();
        let one_by_one = (kh, kw) == (1, 1) && config.padding == 0 && config.stride == 1 && config.groups == 1;
        let weights = if one_by_one && is_cpu_f32(conv.weight()) {
            let weight = conv.weight().flatten_all()?.to_vec1::<f32>()?;
            let bias = conv.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
            ConvWeights::OneByOneCpuF32 { weight, bias, c_in, c_out }
        } else {
            ConvWeights::Candle(conv)
        };
        Ok(Self { weights, span: tracing::span!(tracing::Level::TRACE, "conv2d") })
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (weight, bias, c_in, c_out) = match &self.weights {
            ConvWeights::Candle(conv) => return crate::cudnn::conv2d(conv, xs),
            ConvWeights::ThreeByThree(conv) => return conv.forward(xs),
            ConvWeights::OneByOneCpuF32 { weight, bias, c_in, c_out } => (weight, bias, *c_in, *c_out),
        };
        let (b, c, h, w) = xs.dims4()?;
        if c != c_in {
            candle_core::bail!("Conv2d: input has {c} channels, the weights {c_in}");
        }
        if !is_cpu_f32(xs) {
            candle_core::bail!("Conv2d: f32 CPU weights, a {:?} input on {:?}", xs.dtype(), xs.device())
        }
        let xs = xs.contiguous()?;
        let input = cpu_f32(&xs)?;
        let pixels = h * w;
        let mut out = vec![0f32; b * c_out * pixels];
        for (image, out) in input.chunks(c_in * pixels).zip(out.chunks_mut(c_out * pixels)) {
            let (lhs, rhs) = (View::rows(weight, c_in), View::rows(image, pixels));
            gemm_row_bias(out, lhs, rhs, (c_out, pixels, c_in), bias.as_deref());
        }
        Tensor::from_vec(out, (b, c_out, h, w), &Device::Cpu)
    }
}

/// `linear` applied to each row of `xs` [rows, features] on its own. The CPU matmul picks its
/// kernel by the number of rows, so a row's result would otherwise depend on how many other
/// rows (other jobs' steps) share the batch; row by row, a step gives the same bits alone
/// and in any batch. These matmuls are tiny next to the convolutions.
pub fn per_row(linear: &Linear, xs: &Tensor) -> Result<Tensor> {
    let rows = xs.dim(0)?;
    if rows == 1 {
        return linear.forward(xs);
    }
    let outs = (0..rows).map(|r| linear.forward(&xs.narrow(0, r, 1)?)).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outs, 0)
}

/// Configuration for a ResNet block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetBlock2DConfig {
    /// The number of output channels, defaults to the number of input channels.
    pub out_channels: Option<usize>,
    pub temb_channels: Option<usize>,
    /// The number of groups to use in group normalization.
    pub groups: usize,
    pub groups_out: Option<usize>,
    /// The epsilon to be used in the group normalization operations.
    pub eps: f64,
    /// Whether to use a 2D convolution in the skip connection. When using None,
    /// such a convolution is used if the number of input channels is different from
    /// the number of output channels.
    pub use_in_shortcut: Option<bool>,
    // non_linearity: silu
    /// The final output is scaled by dividing by this value.
    pub output_scale_factor: f64,
}

impl Default for ResnetBlock2DConfig {
    fn default() -> Self {
        Self {
            out_channels: None,
            temb_channels: Some(512),
            groups: 32,
            groups_out: None,
            eps: 1e-6,
            use_in_shortcut: None,
            output_scale_factor: 1.,
        }
    }
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv3x3,
    norm2: GroupNorm,
    conv2: Conv3x3,
    time_emb_proj: Option<Linear>,
    conv_shortcut: Option<Conv2d>,
    span: tracing::Span,
    config: ResnetBlock2DConfig,
}

impl ResnetBlock2D {
    pub fn new(vs: nn::VarBuilder, in_channels: usize, config: ResnetBlock2DConfig) -> Result<Self> {
        let out_channels = config.out_channels.unwrap_or(in_channels);
        let norm1 = GroupNorm::new(config.groups, in_channels, config.eps, vs.pp("norm1"))?;
        let conv1 = Conv3x3::new(in_channels, out_channels, vs.pp("conv1"))?;
        let groups_out = config.groups_out.unwrap_or(config.groups);
        let norm2 = GroupNorm::new(groups_out, out_channels, config.eps, vs.pp("norm2"))?;
        let conv2 = Conv3x3::new(out_channels, out_channels, vs.pp("conv2"))?;
        let use_in_shortcut = config.use_in_shortcut.unwrap_or(in_channels != out_channels);
        let conv_shortcut = if use_in_shortcut {
            let conv_cfg = nn::Conv2dConfig { stride: 1, padding: 0, groups: 1, dilation: 1, cudnn_fwd_algo: None };
            Some(Conv2d::new(in_channels, out_channels, 1, conv_cfg, vs.pp("conv_shortcut"))?)
        } else {
            None
        };
        let time_emb_proj = match config.temb_channels {
            None => None,
            Some(temb_channels) => Some(linear(temb_channels, out_channels, vs.pp("time_emb_proj"))?),
        };
        let span = tracing::span!(tracing::Level::TRACE, "resnet2d");
        Ok(Self { norm1, conv1, norm2, conv2, time_emb_proj, span, config, conv_shortcut })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let shortcut_xs = match &self.conv_shortcut {
            Some(conv_shortcut) => conv_shortcut.forward(xs)?,
            None => xs.clone(),
        };
        // The time embedding and the skip connection are added in the convolutions' output
        // passes.
        let time = match (temb, &self.time_emb_proj) {
            (Some(temb), Some(time_emb_proj)) => Some(per_row(time_emb_proj, &nn::ops::silu(temb)?)?),
            _ => None,
        };
        let xs = self.conv1.forward_add(&self.norm1.forward_silu(xs)?, time.as_ref(), None)?;
        let xs = self.conv2.forward_add(&self.norm2.forward_silu(&xs)?, None, Some(&shortcut_xs))?;
        match self.config.output_scale_factor {
            1.0 => Ok(xs),
            scale => xs / scale,
        }
    }
}

/// A stride-2 3x3 convolution (diffusers pads right/bottom by one when `padding` is 0), or a
/// 2x2 average pool without a convolution.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Option<Conv3x3>,
    padding: usize,
    span: tracing::Span,
}

impl Downsample2D {
    pub fn new(
        vs: nn::VarBuilder,
        in_channels: usize,
        use_conv: bool,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let conv = if use_conv {
            let config = nn::Conv2dConfig { stride: 2, padding, ..Default::default() };
            Some(Conv3x3::from_conv(nn::conv2d(in_channels, out_channels, 3, config, vs.pp("conv"))?)?)
        } else {
            None
        };
        let span = tracing::span!(tracing::Level::TRACE, "downsample2d");
        Ok(Self { conv, padding, span })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        match &self.conv {
            None => xs.avg_pool2d(2),
            Some(conv) => {
                if self.padding == 0 {
                    let xs = xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?;
                    conv.forward(&xs)
                } else {
                    conv.forward(xs)
                }
            }
        }
    }
}

/// Nearest-neighbour 2x upsampling (or to a given size), then a 3x3 convolution (no
/// conv-transpose mode).
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv3x3,
    span: tracing::Span,
}

impl Upsample2D {
    pub fn new(vs: nn::VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        let conv = Conv3x3::new(in_channels, out_channels, vs.pp("conv"))?;
        let span = tracing::span!(tracing::Level::TRACE, "upsample2d");
        Ok(Self { conv, span })
    }
}

impl Upsample2D {
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (_, _, h, w) = xs.dims4()?;
        match size {
            None => self.conv.forward_upsampled(xs),
            Some(size) if size == (2 * h, 2 * w) => self.conv.forward_upsampled(xs),
            Some((h, w)) => self.conv.forward(&xs.upsample_nearest2d(h, w)?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_abs, max_diff, randn};
    use candle_core::DType;

    /// Ours and candle's convolution, with the same random weights.
    fn conv(c_in: usize, c_out: usize, kernel: usize, config: nn::Conv2dConfig, bias: bool) -> (Conv2d, nn::Conv2d) {
        let weight = randn(1, &[c_out, c_in, kernel, kernel]);
        let candle = nn::Conv2d::new(weight, bias.then(|| randn(2, &[c_out])), config);
        (Conv2d::from_conv(candle.clone()).unwrap(), candle)
    }

    /// A 1x1 convolution as matrix products gives candle's convolution up to f32 rounding,
    /// with and without bias, on contiguous and strided inputs; an image's result is the same
    /// bits alone or in a batch. 3x3 convolutions take `Conv3x3`; other convolutions, dtypes
    /// and devices keep candle's kernel; a wrong input is an error.
    #[test]
    fn one_by_one_convolutions_match_candles() {
        for (c_in, c_out, bias) in [(24, 40, true), (7, 3, false)] {
            let (conv, candle) = conv(c_in, c_out, 1, Default::default(), bias);
            assert!(matches!(conv.weights, ConvWeights::OneByOneCpuF32 { .. }));
            for (b, h, w) in [(1, 1, 1), (3, 5, 7), (2, 16, 16)] {
                let x = randn(3, &[b, c_in, h, w]);
                for x in [x.clone(), x.transpose(2, 3).unwrap()] {
                    let expected = candle.forward(&x).unwrap();
                    let actual = conv.forward(&x).unwrap();
                    assert_eq!(actual.dims(), expected.dims());
                    let scale = max_abs(&expected).max(1.0);
                    let diff = max_diff(&actual, &expected);
                    assert!(diff <= 1e-5 * scale, "{c_in}->{c_out} {b}x{h}x{w}: {diff:e}");
                    for i in 0..b {
                        let alone = conv.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
                        assert_eq!(max_diff(&alone, &actual.narrow(0, i, 1).unwrap()), 0.0, "image {i}");
                    }
                }
            }
            assert!(conv.forward(&randn(5, &[1, c_in + 1, 2, 2])).is_err());
            assert!(conv.forward(&randn(5, &[1, c_in, 2, 2]).to_dtype(DType::F16).unwrap()).is_err());
        }
        let (strided, _) = conv(4, 6, 1, nn::Conv2dConfig { stride: 2, ..Default::default() }, true);
        assert!(matches!(strided.weights, ConvWeights::Candle(_)));
        let (three, candle) = conv(4, 6, 3, nn::Conv2dConfig { padding: 1, ..Default::default() }, true);
        assert!(matches!(three.weights, ConvWeights::ThreeByThree(_)));
        let x = randn(7, &[2, 4, 6, 5]);
        assert!(max_diff(&three.forward(&x).unwrap(), &candle.forward(&x).unwrap()) < 1e-5);
        let (dilated, _) = conv(4, 6, 3, nn::Conv2dConfig { padding: 2, dilation: 2, ..Default::default() }, true);
        assert!(matches!(dilated.weights, ConvWeights::Candle(_)));
        let half = Conv2d::from_conv(nn::Conv2d::new(
            randn(6, &[6, 4, 1, 1]).to_dtype(DType::F16).unwrap(),
            None,
            Default::default(),
        ));
        assert!(matches!(half.unwrap().weights, ConvWeights::Candle(_)));
    }
}
