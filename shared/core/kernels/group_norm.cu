// GroupNorm (+ SiLU) for NCHW activations on the GPU in two kernels, where candle's composite
// GroupNorm is eight tensor ops plus two for the SiLU, each a pass over memory.
//
// A "row" is one (image, group): channels_per_group x spatial contiguous elements. Both kernels
// run one block per (channel of the group, row):
//   gn_stats: the block's channel -> (mean, M2, count) by Welford, merged across the block in a
//             fixed order, written to partial[row][channel].
//   gn_apply: every thread merges its row's partials in channel order (the same result in every
//             block), then writes y = (x - mean) / sqrt(var + eps) * w[c] + b[c], SiLU'd if asked.
// Statistics are f32 whatever the dtype; no atomics, so results are the same on every run and an
// image's output does not depend on its batch.

#include "dtypes.cuh"

struct Stat {
    float mean, m2, n;
};

__device__ __forceinline__ Stat merge(Stat a, Stat b) {
    float n = a.n + b.n;
    if (n == 0.f) return a;
    float d = b.mean - a.mean;
    float f = b.n / n;
    return {a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f, n};
}

// Merges the block's per-thread stats in a fixed order; thread 0 gets the result.
__device__ Stat block_merge(Stat s) {
    __shared__ Stat warps[32];
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int offset = 16; offset > 0; offset /= 2) {
        Stat o = {__shfl_down_sync(0xffffffff, s.mean, offset), __shfl_down_sync(0xffffffff, s.m2, offset),
                  __shfl_down_sync(0xffffffff, s.n, offset)};
        s = merge(s, o);
    }
    if (lane == 0) warps[warp] = s;
    __syncthreads();
    if (warp == 0) {
        const unsigned n_warps = (blockDim.x + 31) / 32;
        s = lane < n_warps ? warps[lane] : Stat{0.f, 0.f, 0.f};
        for (int offset = 16; offset > 0; offset /= 2) {
            Stat o = {__shfl_down_sync(0xffffffff, s.mean, offset), __shfl_down_sync(0xffffffff, s.m2, offset),
                      __shfl_down_sync(0xffffffff, s.n, offset)};
            s = merge(s, o);
        }
    }
    return s;
}

// grid (channels_per_group, images * groups), blockDim a multiple of 32.
template <typename T>
__device__ void stats(const T *__restrict__ x, Stat *__restrict__ partial, int spatial) {
    const long row = blockIdx.y, c = blockIdx.x, cpg = gridDim.x;
    const T *p = x + (row * cpg + c) * spatial;
    Stat s = {0.f, 0.f, 0.f};
    for (int i = threadIdx.x; i < spatial; i += blockDim.x) {
        float v = to_f32(p[i]);
        s.n += 1.f;
        float d = v - s.mean;
        s.mean += d / s.n;
        s.m2 += d * (v - s.mean);
    }
    s = block_merge(s);
    if (threadIdx.x == 0) partial[row * cpg + c] = s;
}

template <typename T>
__device__ void apply(const T *__restrict__ x, T *__restrict__ y, const Stat *__restrict__ partial,
                      const T *__restrict__ weight, const T *__restrict__ bias, int groups, int spatial,
                      float eps, int silu) {
    const long row = blockIdx.y, c = blockIdx.x, cpg = gridDim.x;
    Stat s = partial[row * cpg];
    for (int i = 1; i < cpg; ++i) s = merge(s, partial[row * cpg + i]);
    const float inv_std = rsqrtf(s.m2 / s.n + eps);
    const long channel = (row % groups) * cpg + c;
    const float scale = inv_std * to_f32(weight[channel]);
    const float shift = to_f32(bias[channel]) - s.mean * scale;
    const long base = (row * cpg + c) * spatial;
    for (int i = threadIdx.x; i < spatial; i += blockDim.x) {
        float v = to_f32(x[base + i]) * scale + shift;
        if (silu) v = v / (1.f + __expf(-v));
        y[base + i] = from_f32<T>(v);
    }
}

#define GROUP_NORM(NAME, T)                                                                           \
    extern "C" __global__ void gn_stats_##NAME(const T *x, Stat *partial, int spatial) {             \
        stats<T>(x, partial, spatial);                                                                \
    }                                                                                                 \
    extern "C" __global__ void gn_apply_##NAME(const T *x, T *y, const Stat *partial, const T *weight, \
                                               const T *bias, int groups, int spatial, float eps,     \
                                               int silu) {                                            \
        apply<T>(x, y, partial, weight, bias, groups, spatial, eps, silu);                            \
    }

GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
GROUP_NORM(bf16, __nv_bfloat16)
