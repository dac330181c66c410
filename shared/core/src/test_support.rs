//! What this crate's kernel tests share: seeded inputs and error measures.

use candle_core::{DType, Device, Tensor};

/// torch's standard normal draws for `seed` (CPU, f32), so a failure reproduces.
pub(crate) fn randn(seed: u64, shape: &[usize]) -> Tensor {
    crate::torch_rng::randn_tensor(seed, shape, &Device::Cpu).unwrap()
}

/// The largest |x| in `t`, as f32 (any float dtype).
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().to_dtype(DType::F32).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// The largest |a - b|.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}
