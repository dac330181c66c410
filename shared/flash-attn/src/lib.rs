//! Flash-attention 2 forward (Tri Dao's kernels, from the candle-flash-attn crate's sources,
//! built by build.rs) as a candle op: softmax(q kᵀ · scale) v over [batch, tokens, heads,
//! head_dim] tensors in f16 or bf16 on a CUDA device, without materialising the scores. The
//! scores and the softmax are in f32 inside the kernel, so it is also what diffusers'
//! `upcast_attention` asks for. Without the `cuda` feature, [`supports`] is always false.

use candle_core::{DType, Result, Tensor};

/// Whether [`flash_attention`] can run on tensors like `q`: a build with the kernels, a CUDA
/// tensor in f16 or bf16, and a head dim (the last dim) that is a multiple of 8, at most 512.
pub fn supports(q: &Tensor) -> bool {
    let head_dim = q.dims().last().copied().unwrap_or(0);
    cfg!(feature = "cuda")
        && q.device().is_cuda()
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && q.rank() == 4
        && head_dim.is_multiple_of(8)
        && (8..=512).contains(&head_dim)
}

/// softmax(q kᵀ · softmax_scale) v; q: [batch, q_tokens, heads, head_dim], k and v: [batch,
/// kv_tokens, heads, head_dim], any strides with a contiguous last dim. Returns a contiguous
/// [batch, q_tokens, heads, head_dim] tensor. Queued on the device's stream, no host sync.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, softmax_scale: f32) -> Result<Tensor> {
    if !supports(q) {
        candle_core::bail!(
            "flash attention does not support {:?} {:?} on {:?} (or this build has no kernels)",
            q.dims(),
            q.dtype(),
            q.device().location()
        );
    }
    #[cfg(feature = "cuda")]
    return q.apply_op3_no_bwd(k, v, &imp::FlashAttention { softmax_scale });
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (k, v, softmax_scale);
        unreachable!("supports() is false without the kernels")
    }
}

// The one place this crate needs `unsafe`: the FFI call into the kernels and the device
// allocations they fill.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{CpuStorage, DType, Layout, Result, Shape};
    use std::ffi::{c_int, c_void};

    unsafe extern "C" {
        fn sdmesh_flash_attn_fwd(
            q: *const c_void,
            k: *const c_void,
            v: *const c_void,
            o: *mut c_void,
            softmax_lse: *mut f32,
            q_batch_stride: i64,
            q_row_stride: i64,
            q_head_stride: i64,
            k_batch_stride: i64,
            k_row_stride: i64,
            k_head_stride: i64,
            v_batch_stride: i64,
            v_row_stride: i64,
            v_head_stride: i64,
            o_batch_stride: i64,
            o_row_stride: i64,
            o_head_stride: i64,
            b: c_int,
            h: c_int,
            d: c_int,
            seqlen_q: c_int,
            seqlen_k: c_int,
            softmax_scale: f32,
            is_bf16: c_int,
            stream: *mut c_void,
            cuda_error: *mut c_int,
        ) -> c_int;
    }

    pub(crate) struct FlashAttention {
        pub softmax_scale: f32,
    }

    impl FlashAttention {
        fn run<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            &self,
            (q, q_l): (&CudaStorage, &Layout),
            (k, k_l): (&CudaStorage, &Layout),
            (v, v_l): (&CudaStorage, &Layout),
            is_bf16: bool,
        ) -> Result<(CudaStorage, Shape)> {
            let (b, q_len, heads, d) = q_l.shape().dims4()?;
            let (kb, kv_len, kh, kd) = k_l.shape().dims4()?;
            if (kb, kh, kd) != (b, heads, d) || v_l.shape() != k_l.shape() {
                candle_core::bail!(
                    "flash attention: q {:?}, k {:?}, v {:?} do not match",
                    q_l.shape(),
                    k_l.shape(),
                    v_l.shape()
                );
            }
            for (name, l) in [("q", q_l), ("k", k_l), ("v", v_l)] {
                let s = l.stride();
                // The kernels load rows 16 bytes at a time.
                if s[3] != 1 || s[..3].iter().any(|x| x % 8 != 0) || l.start_offset() % 8 != 0 {
                    candle_core::bail!(
                        "flash attention: {name} needs a contiguous last dim and 16-byte aligned rows ({:?})",
                        s
                    );
                }
            }
            let i32_of = |x: usize| {
                i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("flash attention: {x} too large")))
            };
            let dev = q.device().clone();
            let stream = dev.cuda_stream();
            let q_s = q.as_cuda_slice::<T>()?.slice(q_l.start_offset()..);
            let k_s = k.as_cuda_slice::<T>()?.slice(k_l.start_offset()..);
            let v_s = v.as_cuda_slice::<T>()?.slice(v_l.start_offset()..);
            let out_shape = q_l.shape().clone();
            let o_stride = Layout::contiguous(&out_shape).stride().to_vec();
            // SAFETY: the kernel writes every element of `out` and of `lse`.
            let mut out = unsafe { dev.alloc::<T>(out_shape.elem_count())? };
            let mut lse = unsafe { dev.alloc::<f32>(b * heads * q_len)? };
            let (qs, ks, vs) = (q_l.stride(), k_l.stride(), v_l.stride());
            let mut cuda_error: c_int = 0;
            let status = {
                let (q_ptr, _g1) = q_s.device_ptr(&stream);
                let (k_ptr, _g2) = k_s.device_ptr(&stream);
                let (v_ptr, _g3) = v_s.device_ptr(&stream);
                let (o_ptr, _g4) = out.device_ptr_mut(&stream);
                let (lse_ptr, _g5) = lse.device_ptr_mut(&stream);
                // SAFETY: the pointers are live device allocations on `stream`'s context, with
                // the shapes and element strides passed (checked above), and stay alive until
                // the guards drop after the launch is queued on `stream`.
                unsafe {
                    sdmesh_flash_attn_fwd(
                        q_ptr as *const c_void,
                        k_ptr as *const c_void,
                        v_ptr as *const c_void,
                        o_ptr as *mut c_void,
                        lse_ptr as *mut f32,
                        qs[0] as i64,
                        qs[1] as i64,
                        qs[2] as i64,
                        ks[0] as i64,
                        ks[1] as i64,
                        ks[2] as i64,
                        vs[0] as i64,
                        vs[1] as i64,
                        vs[2] as i64,
                        o_stride[0] as i64,
                        o_stride[1] as i64,
                        o_stride[2] as i64,
                        i32_of(b)?,
                        i32_of(heads)?,
                        i32_of(d)?,
                        i32_of(q_len)?,
                        i32_of(kv_len)?,
                        self.softmax_scale,
                        c_int::from(is_bf16),
                        stream.cu_stream() as *mut c_void,
                        &mut cuda_error,
                    )
                }
            };
            match status {
                0 => Ok((CudaStorage::wrap_cuda_slice(out, dev), out_shape)),
                1 => candle_core::bail!("flash attention: no kernel for head dim {d}"),
                _ => candle_core::bail!("flash attention: kernel launch failed (cudaError {cuda_error})"),
            }
        }
    }

    impl candle_core::CustomOp3 for FlashAttention {
        fn name(&self) -> &'static str {
            "flash-attention"
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
            candle_core::bail!("flash attention runs on CUDA devices only")
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            q_l: &Layout,
            k: &CudaStorage,
            k_l: &Layout,
            v: &CudaStorage,
            v_l: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            match q.dtype() {
                DType::F16 => self.run::<half::f16>((q, q_l), (k, k_l), (v, v_l), false),
                DType::BF16 => self.run::<half::bf16>((q, q_l), (k, k_l), (v, v_l), true),
                dt => candle_core::bail!("flash attention runs in f16 or bf16, not {dt:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Off CUDA (and in builds without the kernels) nothing is claimed, and a call is an error,
    /// never a wrong result.
    #[test]
    fn cpu_tensors_are_not_supported() {
        let q = Tensor::zeros((1, 4, 2, 64), DType::F16, &Device::Cpu).unwrap();
        assert!(!supports(&q));
        assert!(flash_attention(&q, &q, &q, 0.125).is_err());
    }
}
