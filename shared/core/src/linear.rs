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

use crate::cpu_gemm::{cpu_f32, gemm, gemm_row_bias, is_cpu_f32, View};

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

    /// `self.forward` on each pixel of a map [batch, in, h, w] as a token: [batch, h·w, out], as
    /// a transformer's `proj_in` takes its input. On the CPU in f32 one GEMM per image reads the
    /// map where it lies, through its transpose, where candle copied it into token order first.
    pub fn forward_map_to_tokens(&self, map: &Tensor) -> Result<Tensor> {
        let (batch, c, h, w) = map.dims4()?;
        let (k, n, pixels) = (self.in_features, self.out_features, h * w);
        match &self.weights {
            Weights::CpuF32 { weight_t, bias } if is_cpu_f32(map) && c == k && map.elem_count() > 0 => {
                let map = map.contiguous()?;
                let input = cpu_f32(&map)?;
                let mut out = match bias {
                    Some(bias) => bias.repeat(batch * pixels),
                    None => vec![0f32; batch * pixels * n],
                };
                for (image, out) in input.chunks(k * pixels).zip(out.chunks_mut(pixels * n)) {
                    let (image, weight) = (View::transposed(image, pixels), View::rows(weight_t, n));
                    gemm((out, n), image, weight, (pixels, n, k), 1.0, bias.is_some(), true);
                }
                Tensor::from_vec(out, (batch, pixels, n), &Device::Cpu)
            }
            _ => self.forward(&map.transpose(1, 2)?.t()?.reshape((batch, pixels, c))?),
        }
    }

    /// `self.forward` on tokens [batch, h·w, in], given back as a map [batch, out, h, w], as a
    /// transformer's `proj_out` gives its result. On the CPU in f32 one GEMM per image, W ·
    /// tokensᵀ, writes the map's layout, where candle transposed the result in a copy.
    pub fn forward_tokens_to_map(&self, tokens: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        let (batch, pixels, c) = tokens.dims3()?;
        if pixels != h * w {
            candle_core::bail!("Linear: {pixels} tokens for a {h}x{w} map");
        }
        let (k, n) = (self.in_features, self.out_features);
        match &self.weights {
            Weights::CpuF32 { weight_t, bias } if is_cpu_f32(tokens) && c == k && tokens.elem_count() > 0 => {
                let tokens = tokens.contiguous()?;
                let input = cpu_f32(&tokens)?;
                let mut out = vec![0f32; batch * n * pixels];
                for (image, out) in input.chunks(pixels * k).zip(out.chunks_mut(n * pixels)) {
                    let (weight, image) = (View::transposed(weight_t, n), View::transposed(image, k));
                    gemm_row_bias(out, weight, image, (n, pixels, k), bias.as_deref());
                }
                Tensor::from_vec(out, (batch, n, h, w), &Device::Cpu)
            }
            _ => self.forward(tokens)?.reshape((batch, h, w, n))?.t()?.transpose(1, 2),
        }
    }

    /// `geglu(self.forward(x))`: GEGLU's projection and gate in one step, with the same bits as
    /// the two apart. On the CPU in f32, with enough rows to give each thread a block, the
    /// projection (twice GEGLU's output, 8x the transformer's width) is computed a block of
    /// rows and columns at a time into scratch that stays in cache, and gated from there:
    /// apart, it went to memory and back. The medium model's 8192 x 128 -> 1024 projection at
    /// 512 px took 70-78 ms apart and 27-31 fused, the full SD 2.1 UNet's 8192 x 320 -> 2560
    /// 236-244 ms and 140 (`cargo run --release -p sdmesh-unet --example linear_fusions`, 2 threads).
    pub fn forward_geglu(&self, x: &Tensor) -> Result<Tensor> {
        let (k, n) = (self.in_features, self.out_features);
        let rows = x.elem_count() / k.max(1);
        let enough_rows = rows >= 2 && rows.div_ceil(GEGLU_BLOCK_ROWS) >= crate::cpu_gemm::cpu_threads();
        match &self.weights {
            Weights::CpuF32 { weight_t, bias }
                if is_cpu_f32(x) && x.dims().last() == Some(&k) && n % 2 == 0 && enough_rows =>
            {
                let x = x.contiguous()?;
                let out = geglu_projection(&cpu_f32(&x)?, weight_t, bias.as_deref(), (rows, n, k), GEGLU_BLOCK_ROWS);
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("at least one dim") = n / 2;
                Tensor::from_vec(out, dims, &Device::Cpu)
            }
            _ => crate::activation::geglu(&self.forward(x)?),
        }
    }
}

/// Rows and columns of GEGLU's projection [`Linear::forward_geglu`] computes at once: the
/// block's hidden and gate scratch, 2 x 256 x 128 f32, is 256 KiB (half of a Zen 3 core's L2).
/// Measured at the SD UNets' shapes on 2 threads: 64-128 rows were slower (each block re-packs
/// the weight); 128-512 columns measured alike.
const GEGLU_BLOCK_ROWS: usize = 256;
const GEGLU_BLOCK_COLS: usize = 128;

/// `hidden · GELU(gate)` for `[hidden | gate] = input [rows, k] @ weight_t [k, n] + bias`, by
/// blocks of about `block_rows` rows in parallel, `GEGLU_BLOCK_COLS` columns of each half at a
/// time. No block has one row: `gemm` sums a one-row product in another order.
fn geglu_projection(
    input: &[f32],
    weight_t: &[f32],
    bias: Option<&[f32]>,
    (rows, n, k): (usize, usize, usize),
    block_rows: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let half = n / 2;
    let mut block_rows = block_rows.max(2);
    while rows % block_rows == 1 {
        block_rows += 1;
    }
    let mut out = vec![0f32; rows * half];
    out.par_chunks_mut(block_rows * half).zip(input.par_chunks(block_rows * k)).for_each(|(out, x)| {
        let m = x.len() / k;
        let cols = GEGLU_BLOCK_COLS.min(half);
        let (mut hidden, mut gate) = (vec![0f32; m * cols], vec![0f32; m * cols]);
        for first in (0..half).step_by(cols) {
            let c = cols.min(half - first);
            for (scratch, column) in [(&mut hidden, first), (&mut gate, half + first)] {
                let scratch = &mut scratch[..m * c];
                if let Some(bias) = bias {
                    scratch.chunks_mut(c).for_each(|row| row.copy_from_slice(&bias[column..column + c]));
                }
                let weight = View::rows(&weight_t[column..], n);
                gemm((scratch, c), View::rows(x, k), weight, (m, c, k), 1.0, bias.is_some(), false);
            }
            for ((out, hidden), gate) in out.chunks_mut(half).zip(hidden.chunks(c)).zip(gate.chunks(c)) {
                crate::activation::geglu_halves(&mut out[first..first + c], hidden, gate);
            }
        }
    });
    out
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

    /// A map's pixels as tokens and tokens back to a map give the bits of the layer on
    /// transposed copies, with and without bias, for sums longer than one `gemm` block.
    #[test]
    fn map_layouts_have_the_bits_of_transposed_copies() {
        for (in_features, out_features) in [(24, 40), (600, 70)] {
            for (_, ours) in layers(in_features, out_features) {
                let map = randn(9, &[2, in_features, 3, 5]);
                let tokens = map.flatten_from(2).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
                let expected = ours.forward(&tokens).unwrap();
                assert_eq!(max_diff(&ours.forward_map_to_tokens(&map).unwrap(), &expected), 0.0);

                let tokens = randn(10, &[2, 15, in_features]);
                let map = ours.forward_tokens_to_map(&tokens, (3, 5)).unwrap();
                assert_eq!(map.dims(), &[2, out_features, 3, 5]);
                let expected = ours.forward(&tokens).unwrap().transpose(1, 2).unwrap().reshape(map.dims()).unwrap();
                assert_eq!(max_diff(&map, &expected), 0.0);
                assert!(ours.forward_tokens_to_map(&tokens, (4, 4)).is_err(), "15 tokens are not a 4x4 map");
            }
        }
    }

    /// GEGLU's fused projection gives the bits of the projection and the gate apart, with and
    /// without bias, where the blocks' rows and columns do not divide the matrix (a block of
    /// one row would be merged), and through `forward_geglu`'s own choice of path.
    #[test]
    fn fused_geglu_projection_has_the_bits_of_the_two_steps() {
        for (in_features, out_features) in [(24, 2 * 200), (600, 2 * 70)] {
            for (_, ours) in layers(in_features, out_features) {
                let Weights::CpuF32 { weight_t, bias } = &ours.weights else { panic!("f32 CPU weights") };
                for rows in [2, 17, 40] {
                    let x = randn(7, &[rows, in_features]);
                    let apart = crate::activation::geglu(&ours.forward(&x).unwrap()).unwrap();
                    let apart = apart.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let input = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    for block_rows in [2, 8, 16] {
                        let shape = (rows, out_features, in_features);
                        let fused = geglu_projection(&input, weight_t, bias.as_deref(), shape, block_rows);
                        assert!(fused == apart, "{in_features} -> {out_features}, {rows} rows by {block_rows}");
                    }
                }
                let x = randn(8, &[2, 300, in_features]);
                let apart = crate::activation::geglu(&ours.forward(&x).unwrap()).unwrap();
                assert_eq!(max_diff(&ours.forward_geglu(&x).unwrap(), &apart), 0.0);
            }
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
