// sdmesh's entry point into the flash-attention forward kernels: fills Flash_fwd_params for
// non-causal attention without dropout (what the UNet's and the VAE's attention are) and picks
// the kernel by dtype and head dim among those build.rs compiles (HEAD_DIMS there).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <cuda_runtime_api.h>

#include <cutlass/numeric_types.h>

#include "flash.h"

// Codes returned to Rust (src/lib.rs, FfiError).
enum { OK = 0, UNSUPPORTED_HEAD_DIM = 1, LAUNCH_FAILED = 2 };

template <typename T>
static int dispatch(Flash_fwd_params &params, cudaStream_t stream) {
    if (params.d <= 64) {
        run_mha_fwd_<T, 64, false>(params, stream);
    } else if (params.d <= 128) {
        run_mha_fwd_<T, 128, false>(params, stream);
    } else if (params.d <= 512) {
        run_mha_fwd_<T, 512, false>(params, stream);
    } else {
        return UNSUPPORTED_HEAD_DIM;
    }
    return OK;
}

// q, k, v, o: [b, seqlen, h, d] with the given element strides (the last dim contiguous);
// softmax_lse: b * h * seqlen_q floats of scratch. d is a multiple of 8. Runs on `stream` and
// returns without waiting for it; a launch error (cudaGetLastError) is LAUNCH_FAILED, and
// *cuda_error receives its code.
extern "C" int sdmesh_flash_attn_fwd(
    const void *q, const void *k, const void *v, void *o, float *softmax_lse,
    int64_t q_batch_stride, int64_t q_row_stride, int64_t q_head_stride,
    int64_t k_batch_stride, int64_t k_row_stride, int64_t k_head_stride,
    int64_t v_batch_stride, int64_t v_row_stride, int64_t v_head_stride,
    int64_t o_batch_stride, int64_t o_row_stride, int64_t o_head_stride,
    int b, int h, int d, int seqlen_q, int seqlen_k, float softmax_scale, int is_bf16,
    void *stream_ptr, int *cuda_error) {
    Flash_fwd_params params;
    std::memset(&params, 0, sizeof(params));
    params.q_ptr = const_cast<void *>(q);
    params.k_ptr = const_cast<void *>(k);
    params.v_ptr = const_cast<void *>(v);
    params.o_ptr = o;
    params.softmax_lse_ptr = softmax_lse;
    params.q_batch_stride = q_batch_stride;
    params.q_row_stride = q_row_stride;
    params.q_head_stride = q_head_stride;
    params.k_batch_stride = k_batch_stride;
    params.k_row_stride = k_row_stride;
    params.k_head_stride = k_head_stride;
    params.v_batch_stride = v_batch_stride;
    params.v_row_stride = v_row_stride;
    params.v_head_stride = v_head_stride;
    params.o_batch_stride = o_batch_stride;
    params.o_row_stride = o_row_stride;
    params.o_head_stride = o_head_stride;
    auto round_up = [](int x, int m) { return (x + m - 1) / m * m; };
    params.b = b;
    params.h = h;
    params.h_k = h;
    params.h_h_k_ratio = 1;
    params.seqlen_q = seqlen_q;
    params.seqlen_k = seqlen_k;
    params.seqlen_q_rounded = round_up(seqlen_q, 128);
    params.seqlen_k_rounded = round_up(seqlen_k, 128);
    params.total_q = b * seqlen_q;
    params.d = d;
    params.d_rounded = round_up(d, 32);
    params.scale_softmax = softmax_scale;
    params.scale_softmax_log2 = softmax_scale * float(M_LOG2E);
    params.softcap = 0.0f;
    // No dropout: the probability of keeping is 1.
    params.p_dropout = 1.0f;
    params.p_dropout_in_uint8_t = uint8_t(255);
    params.rp_dropout = 1.0f;
    params.scale_softmax_rp_dropout = softmax_scale;
    params.is_bf16 = is_bf16 != 0;
    params.is_causal = false;
    params.window_size_left = -1;
    params.window_size_right = -1;
    params.is_seqlens_k_cumulative = true;
    params.num_splits = 1;

    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
    int status = is_bf16 ? dispatch<cutlass::bfloat16_t>(params, stream) : dispatch<cutlass::half_t>(params, stream);
    if (status != OK) return status;
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
        *cuda_error = int(err);
        return LAUNCH_FAILED;
    }
    return OK;
}
