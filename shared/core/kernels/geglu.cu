// GEGLU, the gate of the UNet transformers' feed-forward layers, in one pass on the GPU:
// out[r][j] = h[r][j] * GELU(g[r][j]) for each row r of the projection [h | g] (each `half`
// wide), with the exact (erf) GELU as diffusers has it, in f32 whatever the element type.
// candle's ops take five passes over memory for it (both halves copied out, the GELU, the
// product). Each output element depends on its own two inputs only, so an image's output does
// not depend on its batch.

#include "dtypes.cuh"

// grid (any number of blocks; they stride over the rows), blockDim a multiple of 32.
template <typename T>
__device__ void geglu(const T *__restrict__ projected, T *__restrict__ out, long rows, int half) {
    for (long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *h = projected + r * 2 * half;
        const T *g = h + half;
        T *o = out + r * half;
        for (int j = threadIdx.x; j < half; j += blockDim.x) {
            const float gate = to_f32(g[j]);
            const float gelu = 0.5f * gate * (1.f + erff(gate * 0.70710678118654752f));
            o[j] = from_f32<T>(to_f32(h[j]) * gelu);
        }
    }
}

#define GEGLU(NAME, T)                                                                     \
    extern "C" __global__ void geglu_##NAME(const T *projected, T *out, long rows, int half) { \
        geglu<T>(projected, out, rows, half);                                                 \
    }

GEGLU(f32, float)
GEGLU(f16, __half)
GEGLU(bf16, __nv_bfloat16)
