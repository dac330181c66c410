//! 3x3 convolutions (stride 1, padding 1) that stay fast at the UNet's smallest sizes.
//!
//! candle's CPU convolution tiles each image's output pixels and runs one GEMM per tile; at
//! 4x4 and 2x2 (the two deepest levels of a 128-px or 256-px job) a tile is 16 or 4 pixels,
//! and a 512-channel convolution there took longer than at 8x8 (13 ms vs 8 ms for a batch of
//! 2, `examples/conv_fold.rs`). There the batch's im2col columns are built with tensor ops and
//! multiplied in one GEMM with every image side by side (3-9x faster); larger maps keep
//! candle's kernel, which wins once its tiles are full.

use candle_core::{Module, Result, Tensor, D};
use candle_nn as nn;

/// Feature maps of at most this many pixels take the one-GEMM path.
const ONE_GEMM_MAX_PIXELS: usize = 16;

#[derive(Debug, Clone)]
pub struct Conv3x3 {
    inner: nn::Conv2d,
    /// [c_out, c_in * 9], rows in the im2col column order (channel, then kernel row, column).
    weight_2d: Tensor,
    bias: Option<Tensor>,
}

impl Conv3x3 {
    pub fn new(in_channels: usize, out_channels: usize, vs: nn::VarBuilder) -> Result<Self> {
        let config = nn::Conv2dConfig { padding: 1, ..Default::default() };
        let inner = nn::conv2d(in_channels, out_channels, 3, config, vs)?;
        let weight_2d = inner.weight().reshape((out_channels, in_channels * 9))?;
        let bias = inner.bias().cloned();
        Ok(Self { inner, weight_2d, bias })
    }

    fn one_gemm(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let c_out = self.weight_2d.dim(0)?;
        let padded = x.pad_with_zeros(D::Minus1, 1, 1)?.pad_with_zeros(D::Minus2, 1, 1)?;
        let mut taps = Vec::with_capacity(9);
        for kh in 0..3 {
            for kw in 0..3 {
                taps.push(padded.narrow(2, kh, h)?.narrow(3, kw, w)?);
            }
        }
        // [B, C, 9, H, W] -> [C, 9, B, H, W] -> [C * 9, B * H * W]
        let columns = Tensor::stack(&taps, 2)?.permute((1, 2, 0, 3, 4))?.contiguous()?.reshape((c * 9, b * h * w))?;
        let out = self.weight_2d.matmul(&columns)?.reshape((c_out, b, h, w))?.permute((1, 0, 2, 3))?;
        match &self.bias {
            Some(bias) => out.broadcast_add(&bias.reshape((1, c_out, 1, 1))?),
            None => out.contiguous(),
        }
    }
}

impl Module for Conv3x3 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if h * w <= ONE_GEMM_MAX_PIXELS && x.device().is_cpu() {
            self.one_gemm(x)
        } else {
            self.inner.forward(x)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn one_gemm_matches_candles_convolution() {
        let varmap = nn::VarMap::new();
        let vb = nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let conv = Conv3x3::new(24, 40, vb).unwrap();
        for (b, h, w) in [(1, 4, 4), (3, 2, 2), (2, 1, 3), (5, 4, 2)] {
            let x = Tensor::randn(0f32, 1f32, (b, 24, h, w), &Device::Cpu).unwrap();
            let diff = (conv.one_gemm(&x).unwrap() - conv.inner.forward(&x).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{b}x{h}x{w}: {diff}");
        }
    }
}
