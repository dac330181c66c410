//! GEGLU, the gate of the UNet transformers' feed-forward layers.

use candle_core::{DType, Device, Result, Tensor, D};

/// `hidden · GELU(gate)` for `projected = [hidden | gate]` along the last dimension, with the
/// exact (erf) GELU as diffusers has it.
///
/// f32 on the CPU: one pass in parallel over rows with a vectorised GELU (within a few ulp,
/// `fast_math::gelu_erf`). candle's ops copy both halves out, then call an f64 `erf` per
/// element. Other devices and dtypes use candle's ops.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let width = projected.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("geglu: the projection's last dimension ({width}) is odd");
    }
    let half = width / 2;
    if projected.dtype() != DType::F32 || !projected.device().is_cpu() {
        let hidden = projected.narrow(D::Minus1, 0, half)?.contiguous()?;
        let gate = projected.narrow(D::Minus1, half, half)?.contiguous()?;
        return hidden * gate.gelu_erf()?;
    }
    use rayon::prelude::*;
    let projected = projected.contiguous()?;
    let mut out_dims = projected.dims().to_vec();
    *out_dims.last_mut().expect("a last dimension") = half;
    let mut out = vec![0f32; projected.elem_count() / 2];
    if half > 0 {
        let input = crate::cpu_gemm::cpu_f32(&projected)?;
        out.par_chunks_mut(half).zip(input.par_chunks(width)).for_each(|(out, row)| geglu_row(out, row));
    }
    Tensor::from_vec(out, out_dims, &Device::Cpu)
}

crate::fast_math::simd_kernel! {
    /// hidden · GELU(gate) for one row, [hidden | gate] -> out.
    fn geglu_row(out: &mut [f32], row: &[f32]) {
        let (hidden, gate) = row.split_at(out.len());
        for ((o, h), g) in out.iter_mut().zip(hidden).zip(gate) {
            *o = h * crate::fast_math::gelu_erf(*g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_abs, max_diff, randn};

    /// The fused pass against candle's ops (exact erf GELU) on contiguous and strided inputs,
    /// at activation scales; odd widths are refused.
    #[test]
    fn geglu_matches_candles_ops() {
        let draw = |seed, shape: &[usize]| (randn(seed, shape) * 3.0).unwrap();
        for projected in [draw(1, &[2, 37, 2 * 40]), draw(2, &[3, 80, 5]).transpose(1, 2).unwrap(), draw(3, &[1, 2])] {
            let half = projected.dim(D::Minus1).unwrap() / 2;
            let hidden = projected.narrow(D::Minus1, 0, half).unwrap();
            let gate = projected.narrow(D::Minus1, half, half).unwrap();
            let expected = (hidden * gate.gelu_erf().unwrap()).unwrap();
            let actual = geglu(&projected).unwrap();
            assert_eq!(actual.dims(), expected.dims());
            let diff = max_diff(&actual, &expected);
            let scale = max_abs(&expected);
            assert!(diff <= 1e-6 * scale, "{:?}: {diff:e} at scale {scale}", projected.dims());
        }
        assert!(geglu(&draw(4, &[2, 3])).is_err());
    }
}
