//! Linear layers (`y = x W^T + b`, W as stored: [out, in]) with a fast CPU f32 path.
//!
//! candle's `Linear` multiplies by `W^T` as a transposed view of W. `gemm`'s AVX-512 kernels
//! stream a transposed right-hand side poorly when the left one has few rows: the text
//! encoder's 154 x 1024 x 4096 product ran at 88 GFLOP/s that way and 188 with W^T stored
//! row-major (`cargo run --release -p sdmesh-unet --example gemm_shapes`). On the CPU in f32
//! the weight is therefore kept transposed, once, at load, and the bias is the GEMM's starting
//! value instead of a second pass. Other devices and dtypes keep candle's `Linear` (cuBLAS
//! takes either layout at full speed).
//!
//! An output row depends on its input row alone, not on how many rows share the call, for
//! calls of at least two rows (`cpu_gemm::gemm` sums each element the same way whatever m and
//! n are; one row goes through `gemm`'s matrix-vector path, so callers whose row count can be
//! one use [`crate::blocks::per_row`]).

use candle_core::{Device, Module, Result, Tensor};
use candle_nn as nn;

use crate::cpu_gemm::{cpu_f32, gemm, is_cpu_f32, View};

#[derive(Debug, Clone)]
pub struct Linear {
    weights: Weights,
    in_features: usize,
    out_features: usize,
}

#[derive(Debug, Clone)]
enum Weights {
    /// `weight_t`: W^T, [in, out] row-major.
    CpuF32 {
        weight_t: Vec<f32>,
        bias: Option<Vec<f32>>,
    },
    Candle(nn::Linear),
}

/// Loads `weight` [out, in] and `bias` [out] from `vs`.
pub fn linear(in_features: usize, out_features: usize, vs: nn::VarBuilder) -> Result<Linear> {
    Linear::from_linear(nn::linear(in_features, out_features, vs)?)
}

/// Loads `weight` [out, in] from `vs`; no bias.
pub fn linear_no_bias(in_features: usize, out_features: usize, vs: nn::VarBuilder) -> Result<Linear> {
    Linear::from_linear(nn::linear_no_bias(in_features, out_features, vs)?)
}

/// [`linear`] or [`linear_no_bias`], as `bias` says.
pub fn linear_b(in_features: usize, out_features: usize, bias: bool, vs: nn::VarBuilder) -> Result<Linear> {
    Linear::from_linear(nn::linear_b(in_features, out_features, bias, vs)?)
}

impl Linear {
    /// `weight` [out, in], `bias` [out].
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::from_linear(nn::Linear::new(weight, bias))
    }

    /// Takes over a loaded candle `Linear` (on the CPU in f32, as its transposed copy).
    pub fn from_linear(inner: nn::Linear) -> Result<Self> {
        let (out_features, in_features) = inner.weight().dims2()?;
        if let Some(bias) = inner.bias() {
            if bias.dims() != [out_features] {
                candle_core::bail!("Linear: bias {:?} for {out_features} outputs", bias.dims());
            }
        }
        let weight = inner.weight();
        let weights = if is_cpu_f32(weight) {
            let weight_t = weight.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let bias = inner.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
            Weights::CpuF32 { weight_t, bias }
        } else {
            Weights::Candle(inner)
        };
        Ok(Self { weights, in_features, out_features })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    fn forward_cpu_f32(&self, x: &Tensor, weight_t: &[f32], bias: Option<&[f32]>) -> Result<Tensor> {
        let (k, n) = (self.in_features, self.out_features);
        let rows = x.elem_count() / k;
        let x = x.contiguous()?;
        let mut out = match bias {
            Some(bias) => bias.repeat(rows),
            None => vec![0f32; rows * n],
        };
        let input = cpu_f32(&x)?;
        gemm((&mut out, n), View::rows(&input, k), View::rows(weight_t, n), (rows, n, k), 1.0, bias.is_some(), true);
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("at least one dim") = n;
        Tensor::from_vec(out, dims, &Device::Cpu)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weights {
            Weights::CpuF32 { weight_t, bias } if is_cpu_f32(x) => {
                let features = x.dims().last().copied().unwrap_or(0);
                if x.rank() == 0 || features != self.in_features {
                    candle_core::bail!("Linear: input {:?} for {} input features", x.dims(), self.in_features);
                }
                self.forward_cpu_f32(x, weight_t, bias.as_deref())
            }
            Weights::CpuF32 { .. } => {
                candle_core::bail!("Linear: f32 CPU weights, input {:?} on {:?}", x.dtype(), x.device())
            }
            Weights::Candle(inner) => inner.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_abs, max_diff, randn};
    use candle_core::DType;

    fn layers(in_features: usize, out_features: usize) -> [(nn::Linear, Linear); 2] {
        let weight = (randn(1, &[out_features, in_features]) * 0.1).unwrap();
        let bias = (randn(2, &[out_features]) * 0.1).unwrap();
        [Some(bias), None].map(|bias| {
            let candle = nn::Linear::new(weight.clone(), bias);
            let ours = Linear::from_linear(candle.clone()).unwrap();
            (candle, ours)
        })
    }

    /// The transposed-weight product is candle's `Linear` up to f32 rounding, with and without
    /// bias, for 2-4 dim inputs, strided inputs, and sums longer than one `gemm` block.
    #[test]
    fn matches_candles_linear() {
        for (in_features, out_features) in [(24, 40), (600, 70), (5, 3)] {
            for (candle, ours) in layers(in_features, out_features) {
                for dims in [
                    vec![7, in_features],
                    vec![2, 77, in_features],
                    vec![1, 1, in_features],
                    vec![2, 3, 5, in_features],
                ] {
                    let x = randn(3, &dims);
                    let expected = candle.forward(&x).unwrap();
                    let actual = ours.forward(&x).unwrap();
                    assert_eq!(actual.dims(), expected.dims());
                    let scale = max_abs(&expected).max(1.0);
                    assert!(max_diff(&actual, &expected) <= 1e-5 * scale, "{dims:?}: {}", max_diff(&actual, &expected));
                }
                let strided = randn(4, &[in_features, 9]).t().unwrap();
                let diff = max_diff(&ours.forward(&strided).unwrap(), &candle.forward(&strided).unwrap());
                assert!(diff <= 1e-5 * max_abs(&candle.forward(&strided).unwrap()).max(1.0), "strided: {diff}");
            }
        }
    }

    /// A row's output is the same bits whatever other rows (two or more in all) share the call.
    #[test]
    fn a_rows_output_does_not_depend_on_the_other_rows() {
        let [(_, ours), _] = layers(600, 70);
        let x = randn(5, &[130, 600]);
        let together = ours.forward(&x).unwrap();
        for (first, rows) in [(0, 2), (3, 64), (64, 66), (100, 30)] {
            let part = ours.forward(&x.narrow(0, first, rows).unwrap()).unwrap();
            assert_eq!(max_diff(&part, &together.narrow(0, first, rows).unwrap()), 0.0, "rows {first}..+{rows}");
        }
    }

    /// Other dtypes keep candle's kernel; a wrong feature count is an error, not a panic.
    #[test]
    fn other_dtypes_and_bad_shapes() {
        let [(candle, ours), _] = layers(24, 40);
        let half = Linear::new(
            candle.weight().to_dtype(DType::F16).unwrap(),
            candle.bias().map(|b| b.to_dtype(DType::F16).unwrap()),
        )
        .unwrap();
        let x = randn(6, &[3, 24]);
        let out = half.forward(&x.to_dtype(DType::F16).unwrap()).unwrap();
        assert_eq!(out.dtype(), DType::F16);
        assert!(ours.forward(&randn(6, &[3, 23])).is_err());
    }
}
