//! GEGLU, the gate of the UNet transformers' feed-forward layers, and the exact (erf) GELU of
//! OpenCLIP's and DPT's MLPs.

use candle_core::{Device, Result, Tensor, D};

/// `hidden · GELU(gate)` for `projected = [hidden | gate]` along the last dimension, with the
/// exact (erf) GELU as diffusers has it.
///
/// f32 on the CPU: one pass in parallel over rows with a vectorised GELU (within a few ulp,
/// `fast_math::gelu_erf`). candle's ops copy both halves out, then call an f64 `erf` per
/// element. On CUDA: one kernel (`kernels/geglu.cu`) unless SDMESH_CUDA_GEGLU=0. Other
/// devices and dtypes use candle's ops.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let width = projected.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("geglu: the projection's last dimension ({width}) is odd");
    }
    let half = width / 2;
    #[cfg(feature = "cuda")]
    if projected.device().is_cuda() && cuda_geglu_enabled() && half > 0 {
        return projected.contiguous()?.apply_op1_no_bwd(&cuda::GegluOp);
    }
    if !crate::cpu_gemm::is_cpu_f32(projected) {
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
        out.par_chunks_mut(half).zip(input.par_chunks(width)).for_each(|(out, row)| {
            let (hidden, gate) = row.split_at(half);
            geglu_halves(out, hidden, gate)
        });
    }
    Tensor::from_vec(out, out_dims, &Device::Cpu)
}

/// Whether CUDA tensors use this project's GEGLU kernel: a build with the `cuda` feature, and
/// SDMESH_CUDA_GEGLU not set to 0 (which falls back to candle's ops, for comparing). Read once.
pub fn cuda_geglu_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(feature = "cuda") && crate::switched_on(&ENABLED, "SDMESH_CUDA_GEGLU")
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // kernel launch
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{CpuStorage, DType, Layout, Result, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/geglu.ptx"));
    const THREADS: u32 = 256;
    /// Blocks stride over the rows past this many.
    const MAX_BLOCKS: usize = 1 << 16;

    pub(super) struct GegluOp;

    impl GegluOp {
        fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
            &self,
            suffix: &str,
            x: &CudaStorage,
            x_l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            if !x_l.is_contiguous() {
                candle_core::bail!("geglu kernel: a contiguous projection expected");
            }
            let mut dims = x_l.dims().to_vec();
            let width = *dims.last().unwrap_or(&0);
            let half = width / 2;
            if !width.is_multiple_of(2) || half == 0 {
                candle_core::bail!("geglu kernel: a last dimension of {width}");
            }
            let rows = x_l.shape().elem_count() / width;
            let half_i = i32::try_from(half).map_err(|_| candle_core::Error::Msg(format!("geglu: {half} too wide")))?;
            let dev = x.device().clone();
            let x_s = x.as_cuda_slice::<T>()?.slice(x_l.start_offset()..);
            // SAFETY: the kernel writes every output element (rows x half).
            let out = unsafe { dev.alloc::<T>(rows * half)? };
            if rows > 0 {
                let cfg = LaunchConfig {
                    grid_dim: (rows.min(MAX_BLOCKS) as u32, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let func = dev.get_or_load_custom_func(&format!("geglu_{suffix}"), "sdmesh_geglu", PTX)?;
                let rows_i = rows as i64;
                let mut launch = func.builder();
                launch.arg(&x_s).arg(&out).arg(&rows_i).arg(&half_i);
                // SAFETY: the arguments match geglu's signature (pointers, long rows, int half)
                // over buffers of rows x 2 half and rows x half elements.
                unsafe { launch.launch(cfg) }.map_err(candle_core::Error::wrap)?;
            }
            *dims.last_mut().expect("a last dimension") = half;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(dims)))
        }
    }

    impl candle_core::CustomOp1 for GegluOp {
        fn name(&self) -> &'static str {
            "geglu"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the geglu kernel runs on CUDA devices only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, x_l: &Layout) -> Result<(CudaStorage, Shape)> {
            match x.dtype() {
                DType::F32 => self.run::<f32>("f32", x, x_l),
                DType::F16 => self.run::<half::f16>("f16", x, x_l),
                DType::BF16 => self.run::<half::bf16>("bf16", x, x_l),
                dt => candle_core::bail!("geglu kernel: no {dt:?} version"),
            }
        }
    }
}

/// The exact (erf) GELU, `x · (1 + erf(x / √2)) / 2`. f32 on the CPU: in parallel, vectorised
/// (`fast_math::gelu_erf`, within a few ulp); candle's kernel calls a scalar `erff` per element,
/// which cost 3-5% of the SD 2.x text encoder (23 layers of 77 x 4096 per prompt).
/// Other devices and dtypes use candle's op.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if !crate::cpu_gemm::is_cpu_f32(xs) {
        return xs.gelu_erf();
    }
    use rayon::prelude::*;
    let xs = xs.contiguous()?;
    let input = crate::cpu_gemm::cpu_f32(&xs)?;
    let mut out = vec![0f32; input.len()];
    // Chunks of 16 Ki elements: enough work per task, and the same values whatever the split.
    out.par_chunks_mut(1 << 14).zip(input.par_chunks(1 << 14)).for_each(|(out, x)| gelu_chunk(out, x));
    Tensor::from_vec(out, xs.dims(), &Device::Cpu)
}

crate::fast_math::simd_kernel! {
    /// GELU(x) element by element.
    fn gelu_chunk(out: &mut [f32], xs: &[f32]) {
        for (o, x) in out.iter_mut().zip(xs) {
            *o = crate::fast_math::gelu_erf(*x);
        }
    }
}

crate::fast_math::simd_kernel! {
    /// hidden · GELU(gate), element by element.
    pub(crate) fn geglu_halves(out: &mut [f32], hidden: &[f32], gate: &[f32]) {
        for ((o, h), g) in out.iter_mut().zip(hidden).zip(gate) {
            *o = h * crate::fast_math::gelu_erf(*g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_abs, max_diff, randn};
    use candle_core::DType;

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

    /// The vectorised GELU against candle's, on a contiguous and a strided input over the
    /// range activations take (and far tails, where it must give x and 0); other dtypes keep
    /// candle's op.
    #[test]
    fn gelu_matches_candles_op() {
        let wide = (randn(5, &[3, 77, 300]) * 4.0).unwrap();
        let tails = Tensor::new(&[-40f32, -12.0, -6.0, 0.0, 6.0, 12.0, 40.0], &Device::Cpu).unwrap();
        for xs in [wide.clone(), wide.transpose(1, 2).unwrap(), tails] {
            let expected = xs.gelu_erf().unwrap();
            let actual = gelu_erf(&xs).unwrap();
            assert_eq!(actual.dims(), expected.dims());
            let diff = max_diff(&actual, &expected);
            assert!(diff <= 1e-6 * max_abs(&expected).max(1.0), "{:?}: {diff:e}", xs.dims());
        }
        let half = wide.to_dtype(DType::F16).unwrap();
        assert_eq!(gelu_erf(&half).unwrap().dtype(), DType::F16);
    }
}
