// Fused bias + ReLU for NCHW activations, forward and backward (the convolution epilogue of
// both nets). Loaded by crates/gz-model/src/cudnn/fused.rs; the math is f32 whatever the storage
// type (f32, bf16, f16), as cuDNN's and PyTorch's epilogues do.
//
// Forward:  y[n,c,i] = max(x[n,c,i] + b[c], 0)
// Backward: dz[n,c,i] = y[n,c,i] > 0 ? dy[n,c,i] : 0   (the gradient of x)
//           db[c]     = sum over n, i of dz[n,c,i]      (the gradient of b, f32 accumulation)
// The backward is two launches: one pass over (y, dy) writing dz and per-(channel, split)
// partial sums, then one tiny kernel adding the partials of each channel in a fixed order, so
// the bias gradient is deterministic (no atomics).

#include "common.cuh"

// Grid: x over planes (n * channels + c), y over chunks of one plane; block: 256 threads.
template <typename T>
__device__ __forceinline__ void bias_relu_fwd(const T *__restrict__ x, const T *__restrict__ b, T *__restrict__ y,
                                              uint32_t channels, uint32_t hw) {
    const uint32_t plane = blockIdx.x;
    const float bias = load_f<T>(b[plane % channels]);
    const size_t base = (size_t)plane * hw;
    for (uint32_t i = blockIdx.y * blockDim.x + threadIdx.x; i < hw; i += gridDim.y * blockDim.x) {
        const float v = load_f<T>(x[base + i]) + bias;
        y[base + i] = store_f<T>(v > 0.0f ? v : 0.0f);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Grid: x over channels, y over `splits` groups of images; block: 256 threads (8 warps).
// Block (c, s) handles images n = s, s + splits, ... of channel c and writes its partial sum to
// partial[c * splits + s].
template <typename T>
__device__ __forceinline__ void bias_relu_bwd(const T *__restrict__ y, const T *__restrict__ dy, T *__restrict__ dz,
                                              float *__restrict__ partial, uint32_t batch, uint32_t channels,
                                              uint32_t hw) {
    const uint32_t c = blockIdx.x;
    const uint32_t splits = gridDim.y;
    float acc = 0.0f;
    for (uint32_t n = blockIdx.y; n < batch; n += splits) {
        const size_t base = ((size_t)n * channels + c) * hw;
        for (uint32_t i = threadIdx.x; i < hw; i += blockDim.x) {
            const float g = load_f<T>(y[base + i]) > 0.0f ? load_f<T>(dy[base + i]) : 0.0f;
            const T gs = store_f<T>(g);
            dz[base + i] = gs;
            acc += load_f<T>(gs);
        }
    }
    __shared__ float warps[32];
    acc = warp_sum(acc);
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warps[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        float v = lane < (blockDim.x + 31) / 32 ? warps[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) partial[(size_t)c * splits + blockIdx.y] = v;
    }
}

// One thread per channel: db[c] = sum of its `splits` partials, in order.
template <typename T>
__device__ __forceinline__ void bias_grad_finish(const float *__restrict__ partial, T *__restrict__ db,
                                                 uint32_t channels, uint32_t splits) {
    const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    float s = 0.0f;
    for (uint32_t k = 0; k < splits; ++k) s += partial[(size_t)c * splits + k];
    db[c] = store_f<T>(s);
}

// Channels-last (NHWC) variants: the tensor is a (rows x channels) matrix, rows = N*H*W.

// Grid-stride over all elements; the channel is the fastest index.
template <typename T>
__device__ __forceinline__ void bias_relu_fwd_nhwc(const T *__restrict__ x, const T *__restrict__ b,
                                                   T *__restrict__ y, uint32_t total, uint32_t channels) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const float v = load_f<T>(x[i]) + load_f<T>(b[i % channels]);
        y[i] = store_f<T>(v > 0.0f ? v : 0.0f);
    }
}

// Grid: x over `splits` contiguous row ranges; block: 256 threads. With channels <= 256,
// thread t handles channel t % channels of rows t / channels, t / channels + lanes, ... (lanes =
// 256 / channels row groups, consecutive threads read consecutive channels: coalesced), then the
// lanes of each channel are added in a fixed order in shared memory. With more channels, each
// thread loops over channels t, t + 256, ... Block s writes partial[c * splits + s].
template <typename T>
__device__ __forceinline__ void bias_relu_bwd_nhwc(const T *__restrict__ y, const T *__restrict__ dy,
                                                   T *__restrict__ dz, float *__restrict__ partial, uint32_t rows,
                                                   uint32_t channels) {
    const uint32_t splits = gridDim.x;
    const uint32_t per = (rows + splits - 1) / splits;
    const uint32_t r0 = blockIdx.x * per;
    const uint32_t r1 = min(rows, r0 + per);
    __shared__ float lane_sums[256];
    if (channels <= blockDim.x) {
        const uint32_t lanes = blockDim.x / channels;
        const uint32_t c = threadIdx.x % channels, g = threadIdx.x / channels;
        float acc = 0.0f;
        if (g < lanes) {
            for (uint32_t r = r0 + g; r < r1; r += lanes) {
                const size_t i = (size_t)r * channels + c;
                const float v = load_f<T>(y[i]) > 0.0f ? load_f<T>(dy[i]) : 0.0f;
                const T vs = store_f<T>(v);
                dz[i] = vs;
                acc += load_f<T>(vs);
            }
        }
        lane_sums[threadIdx.x] = acc;
        __syncthreads();
        if (threadIdx.x < channels) {
            float s = 0.0f;
            for (uint32_t k = 0; k < lanes; ++k) s += lane_sums[k * channels + threadIdx.x];
            partial[(size_t)threadIdx.x * splits + blockIdx.x] = s;
        }
    } else {
        for (uint32_t c = threadIdx.x; c < channels; c += blockDim.x) {
            float acc = 0.0f;
            for (uint32_t r = r0; r < r1; ++r) {
                const size_t i = (size_t)r * channels + c;
                const float v = load_f<T>(y[i]) > 0.0f ? load_f<T>(dy[i]) : 0.0f;
                const T vs = store_f<T>(v);
                dz[i] = vs;
                acc += load_f<T>(vs);
            }
            partial[(size_t)c * splits + blockIdx.x] = acc;
        }
    }
}

#define INSTANTIATE_NHWC(NAME, T)                                                                                 \
    extern "C" __global__ void bias_relu_fwd_nhwc_##NAME(const T *x, const T *b, T *y, uint32_t total,            \
                                                         uint32_t channels) {                                     \
        bias_relu_fwd_nhwc<T>(x, b, y, total, channels);                                                          \
    }                                                                                                             \
    extern "C" __global__ void bias_relu_bwd_nhwc_##NAME(const T *y, const T *dy, T *dz, float *partial,          \
                                                         uint32_t rows, uint32_t channels) {                      \
        bias_relu_bwd_nhwc<T>(y, dy, dz, partial, rows, channels);                                                \
    }

INSTANTIATE_NHWC(f32, float)
INSTANTIATE_NHWC(f16, __half)
INSTANTIATE_NHWC(bf16, __nv_bfloat16)

#define INSTANTIATE(NAME, T)                                                                                      \
    extern "C" __global__ void bias_relu_fwd_##NAME(const T *x, const T *b, T *y, uint32_t channels, uint32_t hw) { \
        bias_relu_fwd<T>(x, b, y, channels, hw);                                                                  \
    }                                                                                                             \
    extern "C" __global__ void bias_relu_bwd_##NAME(const T *y, const T *dy, T *dz, float *partial, uint32_t batch, \
                                                    uint32_t channels, uint32_t hw) {                             \
        bias_relu_bwd<T>(y, dy, dz, partial, batch, channels, hw);                                                \
    }                                                                                                             \
    extern "C" __global__ void bias_grad_finish_##NAME(const float *partial, T *db, uint32_t channels,            \
                                                       uint32_t splits) {                                         \
        bias_grad_finish<T>(partial, db, channels, splits);                                                       \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
