// Inverted dropout with a counter-based mask, forward and backward in one kernel (the op is
// linear, so its backward is the same kernel on the gradient with the same seed). Loaded by
// crates/gz-model/src/dropout.rs, whose CPU path computes the same mask with the same integer
// hash, so both devices drop the same elements for a seed.
//
//   keep(i) = top 24 bits of mix64(seed + (i + 1) * 0x9e3779b97f4a7c15) < threshold
//   y[i]    = x[i] * (keep(i) ? scale : 0)     (f32 multiply, one rounding to the storage type)
//
// mix64 is splitmix64's finaliser; threshold = round(keep_probability * 2^24) and
// scale = 1 / keep_probability come from the host. Nothing is stored between forward and
// backward, and there is no generator state on the device.
//
// Launch: 1-D grid-stride loop, any grid/block size.

#include "common.cuh"

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ __forceinline__ void dropout(const T *__restrict__ x, T *__restrict__ y, uint64_t n, uint64_t seed,
                                        uint32_t threshold, float scale) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)blockDim.x * gridDim.x) {
        const uint32_t u = (uint32_t)(mix64(seed + (i + 1) * 0x9e3779b97f4a7c15ull) >> 40);
        // a product even where dropped, so a NaN or infinity there still shows (as x * mask)
        y[i] = store_f<T>(load_f<T>(x[i]) * (u < threshold ? scale : 0.0f));
    }
}

#define INSTANTIATE(NAME, T)                                                                                      \
    extern "C" __global__ void gz_dropout_##NAME(const T *x, T *y, uint64_t n, uint64_t seed, uint32_t threshold, \
                                                 float scale) {                                                   \
        dropout<T>(x, y, n, seed, threshold, scale);                                                              \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
