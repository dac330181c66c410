//! GroupNorm, optionally followed by SiLU (every ResNet block's `silu(norm(x))`), fused into
//! two passes on the CPU.
//!
//! candle 0.11's GroupNorm is eight tensor ops, each a pass over the activations with a fresh
//! allocation, and the SiLU after it two more: 90 ms for one 128-channel 256x256 map on 2 cores,
//! a third of the VAE decode at 256 px. The fused path reads each group twice (mean, then
//! variance) and writes the output once, with the affine and the SiLU applied as it writes.
//! Statistics accumulate in f64. Each (image, group) is computed on its own, so an image's
//! output does not depend on its batch. On CUDA (any dtype) two kernels do the same
//! (kernels/group_norm.cu; statistics in f32), unless SDMESH_CUDA_GROUP_NORM=0. Other
//! devices and dtypes use candle's ops.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn as nn;

use crate::fast_math::lane_fold;

#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: nn::GroupNorm,
    /// [channels] each, in the model's dtype (for the CUDA kernel).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    affine: (Tensor, Tensor),
    /// (weight, bias) per channel, when the model is f32 on the CPU.
    affine_f32: Option<(Vec<f32>, Vec<f32>)>,
    groups: usize,
    channels: usize,
    eps: f64,
    span: tracing::Span,
}

impl GroupNorm {
    /// Loads `weight` and `bias` [channels] from `vs`, as `candle_nn::group_norm`.
    pub fn new(groups: usize, channels: usize, eps: f64, vs: nn::VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {channels} channels do not divide into {groups} groups");
        }
        let weight = vs.get_with_hints(channels, "weight", nn::Init::Const(1.))?;
        let bias = vs.get_with_hints(channels, "bias", nn::Init::Const(0.))?;
        let affine_f32 = if crate::cpu_gemm::is_cpu_f32(&weight) {
            Some((weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?))
        } else {
            None
        };
        let affine = (weight.clone(), bias.clone());
        let inner = nn::GroupNorm::new(weight, bias, channels, groups, eps)?;
        let span = tracing::span!(tracing::Level::TRACE, "group-norm");
        Ok(Self { inner, affine, affine_f32, groups, channels, eps, span })
    }

    /// `silu(norm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        match self.fused(x, true)? {
            Some(y) => Ok(y),
            None => nn::ops::silu(&self.inner.forward(x)?),
        }
    }

    /// The fused CPU f32 or CUDA path, or None where candle's ops run instead.
    fn fused(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && cuda_kernel_enabled() && x.rank() >= 3 && x.dim(1)? == self.channels {
            let (weight, bias) = &self.affine;
            let op = cuda::GroupNormOp { groups: self.groups, eps: self.eps as f32, silu };
            return Ok(Some(x.contiguous()?.apply_op3_no_bwd(weight, bias, &op)?));
        }
        let Some((weight, bias)) = &self.affine_f32 else { return Ok(None) };
        if !crate::cpu_gemm::is_cpu_f32(x) || x.rank() < 3 || x.dim(1)? != self.channels {
            return Ok(None);
        }
        let dims = x.dims().to_vec();
        let spatial: usize = dims[2..].iter().product();
        let x = x.contiguous()?;
        let out = group_norm_f32(
            &crate::cpu_gemm::cpu_f32(&x)?,
            (self.channels, spatial),
            self.groups,
            self.eps,
            (weight, bias),
            silu,
        );
        Ok(Some(Tensor::from_vec(out, dims, &Device::Cpu)?))
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        match self.fused(x, false)? {
            Some(y) => Ok(y),
            None => self.inner.forward(x),
        }
    }
}

/// Whether CUDA tensors use this project's GroupNorm kernel: a build with the `cuda` feature,
/// and SDMESH_CUDA_GROUP_NORM not set to 0 (which falls back to candle's ops, for comparing).
/// Read once.
pub fn cuda_kernel_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(feature = "cuda") && crate::switched_on(&ENABLED, "SDMESH_CUDA_GROUP_NORM")
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // kernel launches
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{CpuStorage, DType, Layout, Result, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
    const THREADS: u32 = 256;

    pub(super) struct GroupNormOp {
        pub groups: usize,
        pub eps: f32,
        pub silu: bool,
    }

    impl GroupNormOp {
        fn run<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
            &self,
            suffix: &str,
            (x, x_l): (&CudaStorage, &Layout),
            (w, w_l): (&CudaStorage, &Layout),
            (b, b_l): (&CudaStorage, &Layout),
        ) -> Result<(CudaStorage, Shape)> {
            let dims = x_l.dims();
            let (images, channels) = (dims[0], dims[1]);
            let spatial: usize = dims[2..].iter().product();
            let cpg = channels / self.groups;
            let contiguous = x_l.is_contiguous() && w_l.is_contiguous() && b_l.is_contiguous();
            if !contiguous || w_l.shape().elem_count() != channels || b_l.shape().elem_count() != channels {
                candle_core::bail!("group norm kernel: contiguous x and [channels] weight and bias expected");
            }
            let as_i32 =
                |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("group norm: {v} too large")));
            let dev = x.device().clone();
            let x_s = x.as_cuda_slice::<T>()?.slice(x_l.start_offset()..);
            let w_s = w.as_cuda_slice::<T>()?.slice(w_l.start_offset()..);
            let b_s = b.as_cuda_slice::<T>()?.slice(b_l.start_offset()..);
            // (mean, M2, count) per (image, channel), as f32 triples.
            // SAFETY: gn_stats writes every triple, gn_apply every output element.
            let partial = unsafe { dev.alloc::<f32>(images * channels * 3)? };
            let out = unsafe { dev.alloc::<T>(images * channels * spatial)? };
            let cfg = LaunchConfig {
                grid_dim: (cpg as u32, (images * self.groups) as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let spatial_i = as_i32(spatial)?;
            let stats = dev.get_or_load_custom_func(&format!("gn_stats_{suffix}"), "sdmesh_group_norm", PTX)?;
            let mut launch = stats.builder();
            launch.arg(&x_s).arg(&partial).arg(&spatial_i);
            // SAFETY: the argument list matches gn_stats's signature; the grid covers
            // images x groups x channels-per-group blocks over buffers of those sizes.
            unsafe { launch.launch(cfg) }.map_err(candle_core::Error::wrap)?;
            let apply = dev.get_or_load_custom_func(&format!("gn_apply_{suffix}"), "sdmesh_group_norm", PTX)?;
            let (groups, silu) = (as_i32(self.groups)?, i32::from(self.silu));
            let mut launch = apply.builder();
            launch
                .arg(&x_s)
                .arg(&out)
                .arg(&partial)
                .arg(&w_s)
                .arg(&b_s)
                .arg(&groups)
                .arg(&spatial_i)
                .arg(&self.eps)
                .arg(&silu);
            // SAFETY: as above, for gn_apply's signature.
            unsafe { launch.launch(cfg) }.map_err(candle_core::Error::wrap)?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), x_l.shape().clone()))
        }
    }

    impl candle_core::CustomOp3 for GroupNormOp {
        fn name(&self) -> &'static str {
            "group-norm"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("the group norm kernel runs on CUDA devices only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            x_l: &Layout,
            w: &CudaStorage,
            w_l: &Layout,
            b: &CudaStorage,
            b_l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            match x.dtype() {
                DType::F32 => self.run::<f32>("f32", (x, x_l), (w, w_l), (b, b_l)),
                DType::F16 => self.run::<half::f16>("f16", (x, x_l), (w, w_l), (b, b_l)),
                DType::BF16 => self.run::<half::bf16>("bf16", (x, x_l), (w, w_l), (b, b_l)),
                dt => candle_core::bail!("group norm kernel: no {dt:?} version"),
            }
        }
    }
}

/// GroupNorm over `input` (images of `channels` x `spatial`, contiguous), then the per-channel
/// affine, then SiLU if `silu`.
fn group_norm_f32(
    input: &[f32],
    (channels, spatial): (usize, usize),
    groups: usize,
    eps: f64,
    (weight, bias): (&[f32], &[f32]),
    silu: bool,
) -> Vec<f32> {
    use rayon::prelude::*;
    let per_group = channels / groups * spatial;
    let mut out = vec![0f32; input.len()];
    out.par_chunks_mut(per_group).zip(input.par_chunks(per_group)).enumerate().for_each(|(chunk, (out, x))| {
        let first_channel = chunk % groups * (channels / groups);
        let (weight, bias) = (&weight[first_channel..], &bias[first_channel..]);
        normalize_group(out, x, spatial, eps, (weight, bias), silu)
    });
    out
}

crate::fast_math::simd_kernel! {
    /// One group of `spatial`-long channels, `x` -> `out`: its mean and variance, then each
    /// channel's affine (`weight`, `bias` from the group's first channel), then SiLU if `silu`.
    fn normalize_group(
        out: &mut [f32],
        x: &[f32],
        spatial: usize,
        eps: f64,
        (weight, bias): (&[f32], &[f32]),
        silu: bool,
    ) {
        let n = x.len() as f64;
        // f64 sums in lane_fold's eight lanes.
        let mean = lane_fold(x, 0.0, |a, v| a + f64::from(v), |a, b| a + b) / n;
        let var = lane_fold(x, 0.0, |a, v| a + (f64::from(v) - mean).powi(2), |a, b| a + b) / n;
        let inv_std = 1.0 / (var + eps).sqrt();
        for (c, (out, x)) in out.chunks_mut(spatial).zip(x.chunks(spatial)).enumerate() {
            // y = (x - mean) * inv_std * w + b = x * scale + shift
            let scale = inv_std * f64::from(weight[c]);
            let shift = f64::from(bias[c]) - mean * scale;
            let (scale, shift) = (scale as f32, shift as f32);
            if silu {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = crate::fast_math::silu(v * scale + shift);
                }
            } else {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = v * scale + shift;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_diff, randn};
    use candle_core::DType;

    fn norm(groups: usize, channels: usize) -> GroupNorm {
        let varmap = nn::VarMap::new();
        let vs = nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let g = GroupNorm::new(groups, channels, 1e-6, vs).unwrap();
        // Non-trivial affine weights.
        let weight = randn(1, &[channels]).affine(0.3, 1.0).unwrap();
        let bias = (randn(2, &[channels]) * 0.3).unwrap();
        let affine_f32 = Some((weight.to_vec1::<f32>().unwrap(), bias.to_vec1::<f32>().unwrap()));
        let inner = nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, 1e-6).unwrap();
        GroupNorm { inner, affine: (weight, bias), affine_f32, ..g }
    }

    /// The fused path gives candle's GroupNorm (and SiLU after it) up to f32 rounding, for
    /// 3D and 4D inputs, one or several groups, offset means and large scales.
    #[test]
    fn fused_matches_candles_ops() {
        for (groups, channels, dims) in [
            (32, 64, vec![2, 64, 9, 7]),
            (1, 5, vec![1, 5, 11]),
            (4, 8, vec![3, 8, 1, 1]),
            (16, 32, vec![1, 32, 40, 40]),
        ] {
            let g = norm(groups, channels);
            let x = randn(3, &dims).affine(3.0, 5.0).unwrap();
            let expected = g.inner.forward(&x).unwrap();
            let d = max_diff(&g.forward(&x).unwrap(), &expected);
            assert!(d < 1e-5, "{dims:?} norm: {d:e}");
            let d = max_diff(&g.forward_silu(&x).unwrap(), &nn::ops::silu(&expected).unwrap());
            assert!(d < 1e-5, "{dims:?} norm + silu: {d:e}");
        }
    }

    /// An image's output is the same bits alone or in a batch; strided inputs work; other
    /// dtypes use candle's ops.
    #[test]
    fn batch_independent_strided_and_other_dtypes() {
        let g = norm(4, 8);
        let x = randn(4, &[3, 8, 6, 5]);
        let together = g.forward_silu(&x).unwrap();
        for i in 0..3 {
            let alone = g.forward_silu(&x.narrow(0, i, 1).unwrap()).unwrap();
            assert_eq!(max_diff(&alone, &together.narrow(0, i, 1).unwrap()), 0.0, "image {i}");
        }
        let t = x.transpose(2, 3).unwrap();
        assert!(max_diff(&g.forward(&t).unwrap(), &g.inner.forward(&t.contiguous().unwrap()).unwrap()) < 1e-5);
        let varmap = nn::VarMap::new();
        let g16 = GroupNorm::new(4, 8, 1e-6, nn::VarBuilder::from_varmap(&varmap, DType::F16, &Device::Cpu)).unwrap();
        assert!(g16.affine_f32.is_none());
        assert_eq!(g16.forward_silu(&x.to_dtype(DType::F16).unwrap()).unwrap().dtype(), DType::F16);
    }
}
