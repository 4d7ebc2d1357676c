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

// For small planes: grid-stride over all elements, channel (i / hw) % channels.
template <typename T>
__device__ __forceinline__ void bias_relu_fwd_flat(const T *__restrict__ x, const T *__restrict__ b,
                                                   T *__restrict__ y, uint32_t total, uint32_t channels,
                                                   uint32_t hw) {
    // 32-bit indices (the host checks total < 2^31): the divide by hw is a 32-bit one
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const float v = load_f<T>(x[i]) + load_f<T>(b[(i / hw) % channels]);
        y[i] = store_f<T>(v > 0.0f ? v : 0.0f);
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Adds `acc` over the block in a fixed order (warps, then the warp sums) and writes the total
// to partial[at]. Every thread of the block must call it.
__device__ __forceinline__ void block_partial(float acc, float *__restrict__ partial, size_t at) {
    __shared__ float warps[32];
    acc = warp_sum(acc);
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warps[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        float v = lane < (blockDim.x + 31) / 32 ? warps[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) partial[at] = v;
    }
}

// The NCHW backward kernels' common walk. Grid: x over channels, y over `splits` groups of
// images; block: 256 threads (8 warps). Block (c, s) takes the (image, item) pairs of channel c
// for images n = s, s + splits, ... as one flat range, so that small planes (a 4x4 map has 16
// positions) still keep all 256 threads busy: pair q is image s + (q / items) * splits, item
// q % items. `item(n, t)` writes what it owns and returns its contribution to the bias
// gradient; the block's sum goes to partial[c * splits + s].
template <typename F>
__device__ __forceinline__ void nchw_pairs_partial(uint32_t batch, uint32_t items, float *__restrict__ partial,
                                                   F item) {
    const uint32_t c = blockIdx.x;
    const uint32_t splits = gridDim.y;
    float acc = 0.0f;
    const uint32_t images = blockIdx.y < batch ? (batch - blockIdx.y + splits - 1) / splits : 0;
    // 32-bit pair indices (the host checks batch * items < 2^31): 32-bit divides
    const uint32_t pairs = images * items;
    for (uint32_t q = threadIdx.x; q < pairs; q += blockDim.x) {
        acc += item(blockIdx.y + (q / items) * splits, q % items);
    }
    block_partial(acc, partial, (size_t)c * splits + blockIdx.y);
}

// Items are the hw positions of plane (n, c).
template <typename T>
__device__ __forceinline__ void bias_relu_bwd(const T *__restrict__ y, const T *__restrict__ dy, T *__restrict__ dz,
                                              float *__restrict__ partial, uint32_t batch, uint32_t channels,
                                              uint32_t hw) {
    const uint32_t c = blockIdx.x;
    nchw_pairs_partial(batch, hw, partial, [&](uint32_t n, uint32_t i) {
        const size_t at = ((size_t)n * channels + c) * hw + i;
        const float g = load_f<T>(y[at]) > 0.0f ? load_f<T>(dy[at]) : 0.0f;
        const T gs = store_f<T>(g);
        dz[at] = gs;
        return load_f<T>(gs);
    });
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

// One block per channel: db[c] = the sum of its `splits` partials, thread t adding partials t,
// t + 256, ... and the block's threads then added in the fixed order of block_partial, so db is
// deterministic. For the channels-last backward kernels' 2,048 partials a channel, where
// bias_grad_finish's single thread per channel walks all 2,048 loads one after another (an
// estimated 0.1-0.2 ms a layer, not measured).
template <typename T>
__device__ __forceinline__ void bias_grad_finish_wide(const float *__restrict__ partial, T *__restrict__ db,
                                                      uint32_t channels, uint32_t splits) {
    const uint32_t c = blockIdx.x;
    if (c >= channels) return;
    float acc = 0.0f;
    for (uint32_t k = threadIdx.x; k < splits; k += blockDim.x) acc += partial[(size_t)c * splits + k];
    __shared__ float warps[32];
    acc = warp_sum(acc);
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warps[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        float v = lane < (blockDim.x + 31) / 32 ? warps[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) db[c] = store_f<T>(v);
    }
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

// The NHWC backward kernels' common walk over a (rows x channels) matrix. Grid: x over `splits`
// contiguous row ranges; block: 256 threads. With channels <= 256, thread t handles channel
// t % channels of rows t / channels, t / channels + lanes, ... (lanes = 256 / channels row
// groups, consecutive threads read consecutive channels: coalesced), then the lanes of each
// channel are added in a fixed order in shared memory. With more channels, each thread loops
// over channels t, t + 256, ... `row(r, c)` writes what it owns of (row r, channel c) and
// returns its contribution to the bias gradient; block s writes partial[c * splits + s].
template <typename F>
__device__ __forceinline__ void nhwc_rows_partial(uint32_t rows, uint32_t channels, float *__restrict__ partial,
                                                  F row) {
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
            for (uint32_t r = r0 + g; r < r1; r += lanes) acc += row(r, c);
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
            for (uint32_t r = r0; r < r1; ++r) acc += row(r, c);
            partial[(size_t)c * splits + blockIdx.x] = acc;
        }
    }
}

// Rows are the N*H*W positions.
template <typename T>
__device__ __forceinline__ void bias_relu_bwd_nhwc(const T *__restrict__ y, const T *__restrict__ dy,
                                                   T *__restrict__ dz, float *__restrict__ partial, uint32_t rows,
                                                   uint32_t channels) {
    nhwc_rows_partial(rows, channels, partial, [&](uint32_t r, uint32_t c) {
        const size_t i = (size_t)r * channels + c;
        const float v = load_f<T>(y[i]) > 0.0f ? load_f<T>(dy[i]) : 0.0f;
        const T vs = store_f<T>(v);
        dz[i] = vs;
        return load_f<T>(vs);
    });
}

// ---------------------------------------------------------------------------------------------
// ReLU + 2x2 max-pool backward in one pass (the conv + bias + ReLU + pool op of the nets'
// pooled layers). y is the ReLU output (H x W per plane), dp the gradient of the pooled map
// (H/2 x W/2, floor). For each 2x2 window (i, j) the gradient goes to the window's first
// maximum (row-major order, strictly greater replaces, as cuDNN and the CPU op), and through the
// ReLU only where y > 0: dz = dp[i, j] at that position if y there > 0, else 0. Positions in no
// window (the last row / column of an odd side) get 0. Windows are walked over the ceil(H/2) x
// ceil(W/2) grid so every dz element is written exactly once. The per-channel sums of dz go to
// partial[c * splits + s] exactly as in bias_relu_bwd, so bias_grad_finish completes db.

struct Window {
    uint32_t h, w, oh, ow, ch, cw;
};

__device__ __forceinline__ Window window_geometry(uint32_t h, uint32_t w) {
    Window g;
    g.h = h;
    g.w = w;
    g.oh = h / 2;
    g.ow = w / 2;
    g.ch = (h + 1) / 2;
    g.cw = (w + 1) / 2;
    return g;
}

// The four positions of window (i, j) of the 2x2 grid as offsets (in elements or vectors) from
// `origin`, where `row` and `col` are the strides of one row and one column, and which of them
// lie inside the map (the last row / column of an odd side has no partner).
__device__ __forceinline__ void window_taps(size_t origin, size_t row, size_t col, const Window &g, uint32_t i,
                                            uint32_t j, size_t off[4], bool valid[4]) {
    const uint32_t h0 = 2 * i, w0 = 2 * j;
    off[0] = origin + h0 * row + w0 * col;
    off[1] = origin + h0 * row + (w0 + 1) * col;
    off[2] = origin + (h0 + 1) * row + w0 * col;
    off[3] = origin + (h0 + 1) * row + (w0 + 1) * col;
    valid[0] = true;
    valid[1] = w0 + 1 < g.w;
    valid[2] = h0 + 1 < g.h;
    valid[3] = h0 + 1 < g.h && w0 + 1 < g.w;
}

// The ReLU + pool backward of window (i, j) (positions from window_taps; `row` and `col` the
// element strides of one row and one column): writes dz for the valid ones and returns the sum
// of what it wrote (after rounding to T).
template <typename T>
__device__ __forceinline__ float relu_pool_window(const T *__restrict__ y, T *__restrict__ dz, size_t origin,
                                                  size_t row, size_t col, const Window &g, uint32_t i, uint32_t j,
                                                  float grad) {
    size_t off[4];
    bool valid[4];
    window_taps(origin, row, col, g, i, j, off, valid);
    const bool pooled = i < g.oh && j < g.ow;
    int best = -1;
    float best_v = 0.0f;
    if (pooled) {
        best = 0;
        best_v = load_f<T>(y[off[0]]);
        for (int k = 1; k < 4; ++k) {
            const float v = load_f<T>(y[off[k]]);
            if (v > best_v) {
                best = k;
                best_v = v;
            }
        }
    }
    float acc = 0.0f;
    for (int k = 0; k < 4; ++k) {
        if (!valid[k]) continue;
        const float v = (k == best && best_v > 0.0f) ? grad : 0.0f;
        const T vs = store_f<T>(v);
        dz[off[k]] = vs;
        acc += load_f<T>(vs);
    }
    return acc;
}

// NCHW: the walk of bias_relu_bwd with the windows of plane (n, c) as its items.
template <typename T>
__device__ __forceinline__ void relu_pool_bwd(const T *__restrict__ y, const T *__restrict__ dp, T *__restrict__ dz,
                                              float *__restrict__ partial, uint32_t batch, uint32_t channels,
                                              uint32_t h, uint32_t w) {
    const uint32_t c = blockIdx.x;
    const Window g = window_geometry(h, w);
    nchw_pairs_partial(batch, g.ch * g.cw, partial, [&](uint32_t n, uint32_t t) {
        const size_t plane = (size_t)n * channels + c;
        const size_t base = plane * h * w;
        const size_t pbase = plane * g.oh * g.ow;
        const uint32_t i = t / g.cw, j = t % g.cw;
        const float grad = (i < g.oh && j < g.ow) ? load_f<T>(dp[pbase + (size_t)i * g.ow + j]) : 0.0f;
        return relu_pool_window<T>(y, dz, base, w, 1, g, i, j, grad);
    });
}

// NHWC. The windows form a (batch * ch * cw) x channels matrix of "window rows", walked by
// nhwc_rows_partial (grid: x over `splits` contiguous ranges of window rows).
template <typename T>
__device__ __forceinline__ float relu_pool_nhwc_row(const T *__restrict__ y, const T *__restrict__ dp,
                                                    T *__restrict__ dz, const Window &g, uint32_t channels,
                                                    uint32_t r, uint32_t c) {
    const uint32_t per_image = g.ch * g.cw;
    const uint32_t n = r / per_image, rem = r % per_image;
    const uint32_t i = rem / g.cw, j = rem % g.cw;
    const size_t origin = (size_t)n * g.h * g.w * channels + c;
    const float grad =
        (i < g.oh && j < g.ow) ? load_f<T>(dp[(((size_t)n * g.oh + i) * g.ow + j) * channels + c]) : 0.0f;
    return relu_pool_window<T>(y, dz, origin, (size_t)g.w * channels, channels, g, i, j, grad);
}

template <typename T>
__device__ __forceinline__ void relu_pool_bwd_nhwc(const T *__restrict__ y, const T *__restrict__ dp,
                                                   T *__restrict__ dz, float *__restrict__ partial, uint32_t batch,
                                                   uint32_t channels, uint32_t h, uint32_t w) {
    const Window g = window_geometry(h, w);
    nhwc_rows_partial(batch * g.ch * g.cw, channels, partial,
                      [&](uint32_t r, uint32_t c) { return relu_pool_nhwc_row<T>(y, dp, dz, g, channels, r, c); });
}

// ---------------------------------------------------------------------------------------------
// Forward of the pooled layers in one pass: y = max(z + b, 0) for every position and, for each
// 2x2 window inside the map, p = the window's maximum of y (floor mode: the last row / column of
// an odd side is in no window but still gets its y). One thread per (window, channel) of the
// ceil(H/2) x ceil(W/2) window grid, grid-stride, 32-bit indices (the host checks the count).
// NCHW: consecutive threads take consecutive windows of one plane; NHWC: consecutive channels
// of one window (coalesced in both layouts).

template <typename T>
__device__ __forceinline__ void bias_relu_pool_window(const T *__restrict__ z, T *__restrict__ y,
                                                      T *__restrict__ p, size_t origin, size_t row, size_t col,
                                                      size_t p_at, const Window &g, uint32_t i, uint32_t j,
                                                      float bias) {
    size_t off[4];
    bool valid[4];
    window_taps(origin, row, col, g, i, j, off, valid);
    float best = 0.0f;
    for (int k = 0; k < 4; ++k) {
        if (!valid[k]) continue;
        const float v = load_f<T>(z[off[k]]) + bias;
        const T vs = store_f<T>(v > 0.0f ? v : 0.0f);
        y[off[k]] = vs;
        // the maximum of the stored (rounded) values, as pooling y would give
        best = fmaxf(best, load_f<T>(vs));
    }
    if (i < g.oh && j < g.ow) p[p_at] = store_f<T>(best);
}

template <typename T>
__device__ __forceinline__ void bias_relu_pool_fwd(const T *__restrict__ z, const T *__restrict__ b,
                                                   T *__restrict__ y, T *__restrict__ p, uint32_t batch,
                                                   uint32_t channels, uint32_t h, uint32_t w) {
    const Window g = window_geometry(h, w);
    const uint32_t windows = g.ch * g.cw;
    const uint32_t total = batch * channels * windows;
    for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        const uint32_t plane = t / windows, q = t % windows;
        const uint32_t i = q / g.cw, j = q % g.cw;
        const uint32_t c = plane % channels;
        const size_t p_at = ((size_t)plane * g.oh + (i < g.oh ? i : 0)) * g.ow + (j < g.ow ? j : 0);
        bias_relu_pool_window<T>(z, y, p, (size_t)plane * h * w, w, 1, p_at, g, i, j, load_f<T>(b[c]));
    }
}

template <typename T>
__device__ __forceinline__ void bias_relu_pool_fwd_nhwc(const T *__restrict__ z, const T *__restrict__ b,
                                                        T *__restrict__ y, T *__restrict__ p, uint32_t batch,
                                                        uint32_t channels, uint32_t h, uint32_t w) {
    const Window g = window_geometry(h, w);
    const uint32_t per_image = g.ch * g.cw;
    const uint32_t total = batch * per_image * channels;
    for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        const uint32_t c = t % channels, r = t / channels;
        const uint32_t n = r / per_image, q = r % per_image;
        const uint32_t i = q / g.cw, j = q % g.cw;
        const size_t origin = (size_t)n * h * w * channels + c;
        const size_t p_at = (((size_t)n * g.oh + (i < g.oh ? i : 0)) * g.ow + (j < g.ow ? j : 0)) * channels + c;
        bias_relu_pool_window<T>(z, y, p, origin, (size_t)w * channels, channels, p_at, g, i, j, load_f<T>(b[c]));
    }
}

#define INSTANTIATE_POOL(NAME, T)                                                                                 \
    extern "C" __global__ void relu_pool_bwd_##NAME(const T *y, const T *dp, T *dz, float *partial, uint32_t batch, \
                                                    uint32_t channels, uint32_t h, uint32_t w) {                  \
        relu_pool_bwd<T>(y, dp, dz, partial, batch, channels, h, w);                                              \
    }                                                                                                             \
    extern "C" __global__ void bias_relu_pool_fwd_##NAME(const T *z, const T *b, T *y, T *p, uint32_t batch,      \
                                                         uint32_t channels, uint32_t h, uint32_t w) {             \
        bias_relu_pool_fwd<T>(z, b, y, p, batch, channels, h, w);                                                 \
    }                                                                                                             \
    extern "C" __global__ void bias_relu_pool_fwd_nhwc_##NAME(const T *z, const T *b, T *y, T *p,                 \
                                                              uint32_t batch, uint32_t channels, uint32_t h,      \
                                                              uint32_t w) {                                       \
        bias_relu_pool_fwd_nhwc<T>(z, b, y, p, batch, channels, h, w);                                            \
    }                                                                                                             \
    extern "C" __global__ void relu_pool_bwd_nhwc_##NAME(const T *y, const T *dp, T *dz, float *partial,          \
                                                         uint32_t batch, uint32_t channels, uint32_t h,           \
                                                         uint32_t w) {                                            \
        relu_pool_bwd_nhwc<T>(y, dp, dz, partial, batch, channels, h, w);                                         \
    }

INSTANTIATE_POOL(f32, float)
INSTANTIATE_POOL(f16, __half)
INSTANTIATE_POOL(bf16, __nv_bfloat16)

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
    extern "C" __global__ void bias_relu_fwd_flat_##NAME(const T *x, const T *b, T *y, uint32_t total,            \
                                                         uint32_t channels, uint32_t hw) {                        \
        bias_relu_fwd_flat<T>(x, b, y, total, channels, hw);                                                      \
    }                                                                                                             \
    extern "C" __global__ void bias_grad_finish_##NAME(const float *partial, T *db, uint32_t channels,            \
                                                       uint32_t splits) {                                         \
        bias_grad_finish<T>(partial, db, channels, splits);                                                       \
    }                                                                                                             \
    extern "C" __global__ void bias_grad_finish_wide_##NAME(const float *partial, T *db, uint32_t channels,       \
                                                            uint32_t splits) {                                    \
        bias_grad_finish_wide<T>(partial, db, channels, splits);                                                  \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------------
// Channels-last kernels, vectorised: each thread takes 16 bytes of consecutive channels (8
// bf16/f16 or 4 f32 values) with one 128-bit load or store, and one index computation per 16
// bytes instead of per value. For channel counts that are a multiple of that width, at most
// 256 vectors wide, and 16-byte-aligned buffers: the host checks all three and takes the
// scalar kernels above otherwise. Each value is computed as by the scalar kernels (the same
// f32 math); the bias gradient's partial sums are added in another (fixed) order. The first
// device run (2026-11-30) timed the scalar channels-last epilogues at 7.7 ms of VGG16-blog's
// 19 ms bf16 step, against about 1.6 ms for their bytes at the H200's bandwidth.

template <typename T> struct alignas(16) Vec16 {
    static constexpr uint32_t N = 16 / sizeof(T);
    T v[N];
};

// y = max(x + b, 0) over `vecs` vectors; vector i holds channels (i % cvec) * N ...
template <typename T>
__device__ __forceinline__ void bias_relu_fwd_nhwc_v(const T *__restrict__ x, const T *__restrict__ b,
                                                     T *__restrict__ y, uint32_t vecs, uint32_t cvec) {
    using V = Vec16<T>;
    const V *xv = reinterpret_cast<const V *>(x);
    const V *bv = reinterpret_cast<const V *>(b);
    V *yv = reinterpret_cast<V *>(y);
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < vecs; i += gridDim.x * blockDim.x) {
        const V a = xv[i];
        const V bias = bv[i % cvec];
        V o;
        for (uint32_t e = 0; e < V::N; ++e) {
            const float v = load_f<T>(a.v[e]) + load_f<T>(bias.v[e]);
            o.v[e] = store_f<T>(v > 0.0f ? v : 0.0f);
        }
        yv[i] = o;
    }
}

// nhwc_rows_partial over a (rows x cvec) matrix of vectors (cvec <= 256, the host checks):
// thread t takes vector column t % cvec of rows r0 + t / cvec, + lanes, ... (lanes = 256 /
// cvec), then the lanes of each channel are added in a fixed order in shared memory and block
// s writes partial[c * splits + s]. `row(r, cg, acc)` writes what it owns of (row r, vector
// column cg) and adds its N contributions to the bias gradient to acc[0..N).
template <typename T, typename F>
__device__ __forceinline__ void nhwc_rows_partial_v(uint32_t rows, uint32_t cvec, float *__restrict__ partial,
                                                    F row) {
    constexpr uint32_t N = Vec16<T>::N;
    const uint32_t splits = gridDim.x;
    const uint32_t per = (rows + splits - 1) / splits;
    const uint32_t r0 = blockIdx.x * per;
    const uint32_t r1 = min(rows, r0 + per);
    __shared__ float lane_sums[256 * 8];
    const uint32_t lanes = blockDim.x / cvec;
    const uint32_t cg = threadIdx.x % cvec, g = threadIdx.x / cvec;
    float acc[N];
    for (uint32_t e = 0; e < N; ++e) acc[e] = 0.0f;
    if (g < lanes) {
        for (uint32_t r = r0 + g; r < r1; r += lanes) row(r, cg, acc);
    }
    for (uint32_t e = 0; e < N; ++e) lane_sums[threadIdx.x * N + e] = acc[e];
    __syncthreads();
    const uint32_t channels = cvec * N;
    for (uint32_t c = threadIdx.x; c < channels; c += blockDim.x) {
        const uint32_t vc = c / N, e = c % N;
        float s = 0.0f;
        for (uint32_t k = 0; k < lanes; ++k) s += lane_sums[(k * cvec + vc) * N + e];
        partial[(size_t)c * splits + blockIdx.x] = s;
    }
}

template <typename T>
__device__ __forceinline__ void bias_relu_bwd_nhwc_v(const T *__restrict__ y, const T *__restrict__ dy,
                                                     T *__restrict__ dz, float *__restrict__ partial, uint32_t rows,
                                                     uint32_t cvec) {
    using V = Vec16<T>;
    const V *yv = reinterpret_cast<const V *>(y);
    const V *dyv = reinterpret_cast<const V *>(dy);
    V *dzv = reinterpret_cast<V *>(dz);
    nhwc_rows_partial_v<T>(rows, cvec, partial, [&](uint32_t r, uint32_t cg, float *acc) {
        const size_t i = (size_t)r * cvec + cg;
        const V a = yv[i], g = dyv[i];
        V o;
        for (uint32_t e = 0; e < V::N; ++e) {
            o.v[e] = store_f<T>(load_f<T>(a.v[e]) > 0.0f ? load_f<T>(g.v[e]) : 0.0f);
            acc[e] += load_f<T>(o.v[e]);
        }
        dzv[i] = o;
    });
}

// relu_pool_bwd_nhwc by vectors: window row r = (n, i, j) of the ceil(H/2) x ceil(W/2) grid,
// vector column cg; the rule of relu_pool_window for each of the N channels.
template <typename T>
__device__ __forceinline__ void relu_pool_bwd_nhwc_v(const T *__restrict__ y, const T *__restrict__ dp,
                                                     T *__restrict__ dz, float *__restrict__ partial, uint32_t batch,
                                                     uint32_t cvec, uint32_t h, uint32_t w) {
    using V = Vec16<T>;
    const V *yv = reinterpret_cast<const V *>(y);
    const V *dpv = reinterpret_cast<const V *>(dp);
    V *dzv = reinterpret_cast<V *>(dz);
    const Window g = window_geometry(h, w);
    const uint32_t per_image = g.ch * g.cw;
    nhwc_rows_partial_v<T>(batch * per_image, cvec, partial, [&](uint32_t r, uint32_t cg, float *acc) {
        const uint32_t n = r / per_image, rem = r % per_image;
        const uint32_t i = rem / g.cw, j = rem % g.cw;
        const size_t row = (size_t)g.w * cvec, col = cvec;
        const size_t origin = (size_t)n * g.h * g.w * cvec + cg;
        size_t off[4];
        bool valid[4];
        window_taps(origin, row, col, g, i, j, off, valid);
        // a window inside the map has all four positions
        const bool pooled = i < g.oh && j < g.ow;
        V vals[4];
        for (int k = 0; k < 4; ++k) {
            if (pooled) vals[k] = yv[off[k]];
        }
        V grad;
        if (pooled) grad = dpv[(((size_t)n * g.oh + i) * g.ow + j) * cvec + cg];
        V out[4];
        for (uint32_t e = 0; e < V::N; ++e) {
            int best = -1;
            float best_v = 0.0f, gr = 0.0f;
            if (pooled) {
                best = 0;
                best_v = load_f<T>(vals[0].v[e]);
                for (int k = 1; k < 4; ++k) {
                    const float v = load_f<T>(vals[k].v[e]);
                    if (v > best_v) {
                        best = k;
                        best_v = v;
                    }
                }
                gr = load_f<T>(grad.v[e]);
            }
            for (int k = 0; k < 4; ++k) {
                const float v = (k == best && best_v > 0.0f) ? gr : 0.0f;
                out[k].v[e] = store_f<T>(v);
                if (valid[k]) acc[e] += load_f<T>(out[k].v[e]);
            }
        }
        for (int k = 0; k < 4; ++k) {
            if (valid[k]) dzv[off[k]] = out[k];
        }
    });
}

// bias_relu_pool_fwd_nhwc by vectors: one thread per (window, vector column), grid-stride.
template <typename T>
__device__ __forceinline__ void bias_relu_pool_fwd_nhwc_v(const T *__restrict__ z, const T *__restrict__ b,
                                                          T *__restrict__ y, T *__restrict__ p, uint32_t batch,
                                                          uint32_t cvec, uint32_t h, uint32_t w) {
    using V = Vec16<T>;
    const V *zv = reinterpret_cast<const V *>(z);
    const V *bv = reinterpret_cast<const V *>(b);
    V *yv = reinterpret_cast<V *>(y);
    V *pv = reinterpret_cast<V *>(p);
    const Window g = window_geometry(h, w);
    const uint32_t per_image = g.ch * g.cw;
    const uint32_t total = batch * per_image * cvec;
    for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        const uint32_t cg = t % cvec, r = t / cvec;
        const uint32_t n = r / per_image, q = r % per_image;
        const uint32_t i = q / g.cw, j = q % g.cw;
        const size_t row = (size_t)w * cvec, col = cvec;
        const size_t origin = (size_t)n * h * w * cvec + cg;
        size_t off[4];
        bool valid[4];
        window_taps(origin, row, col, g, i, j, off, valid);
        const V bias = bv[cg];
        float best[V::N];
        for (uint32_t e = 0; e < V::N; ++e) best[e] = 0.0f;
        for (int k = 0; k < 4; ++k) {
            if (!valid[k]) continue;
            const V a = zv[off[k]];
            V o;
            for (uint32_t e = 0; e < V::N; ++e) {
                const float v = load_f<T>(a.v[e]) + load_f<T>(bias.v[e]);
                o.v[e] = store_f<T>(v > 0.0f ? v : 0.0f);
                // the maximum of the stored (rounded) values, as pooling y would give
                best[e] = fmaxf(best[e], load_f<T>(o.v[e]));
            }
            yv[off[k]] = o;
        }
        if (i < g.oh && j < g.ow) {
            V o;
            for (uint32_t e = 0; e < V::N; ++e) o.v[e] = store_f<T>(best[e]);
            pv[(((size_t)n * g.oh + i) * g.ow + j) * cvec + cg] = o;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The pooled layers without their ReLU output (`cudnn::set_pool_mask`, `GZ_POOL_MASK=1` in gz;
// off until a device run has measured it). Of y, the backward pass of ReLU + 2x2 max-pool needs
// only which tap of each window holds the first maximum and whether that maximum passed the
// ReLU, so the forward pass writes that as one byte per (pooled window, channel) in place of
// y: the tap (0: (2i, 2j), 1: (2i, 2j+1), 2: (2i+1, 2j), 3: (2i+1, 2j+1)) where the maximum
// is > 0, else POOL_NONE. The rule is relu_pool_window's (first maximum, a strictly larger
// value replaces, of the values rounded to T), so dz and the bias gradient are those of the
// kernels above, to the bit. Per pooled layer, in bf16 activations' units: the forward pass
// reads 1 and writes 1/4 + 1/8 instead of 1 + 1/4, the backward pass reads 1/4 + 1/8 instead
// of 1 + 1/4 (both write dz, 1), and y is never stored (torch.compile's max-pool keeps int8
// offsets the same way). Windows outside the pooled map (the last row / column of an odd side)
// have no byte; their positions get 0.

#define POOL_NONE 4

// N mask bytes, one per channel of a 16-byte vector of T, stored at once.
template <uint32_t N> struct alignas(N) MaskVec {
    uint8_t v[N];
};

// One thread per (pooled window, vector column), grid-stride; thread t's window and column are
// those of p's vector t.
template <typename T>
__device__ __forceinline__ void bias_relu_pool_fwd_mask_nhwc_v(const T *__restrict__ z, const T *__restrict__ b,
                                                               T *__restrict__ p, uint8_t *__restrict__ mask,
                                                               uint32_t batch, uint32_t cvec, uint32_t h,
                                                               uint32_t w) {
    using V = Vec16<T>;
    using M = MaskVec<V::N>;
    const V *zv = reinterpret_cast<const V *>(z);
    const V *bv = reinterpret_cast<const V *>(b);
    V *pv = reinterpret_cast<V *>(p);
    M *mv = reinterpret_cast<M *>(mask);
    const uint32_t oh = h / 2, ow = w / 2;
    const uint32_t per_image = oh * ow;
    const uint32_t total = batch * per_image * cvec;
    for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        const uint32_t cg = t % cvec, r = t / cvec;
        const uint32_t n = r / per_image, q = r % per_image;
        const uint32_t i = q / ow, j = q % ow;
        const size_t row = (size_t)w * cvec;
        const size_t tl = (size_t)n * h * w * cvec + (2 * i) * row + (2 * j) * cvec + cg;
        const size_t off[4] = {tl, tl + cvec, tl + row, tl + row + cvec};
        const V bias = bv[cg];
        float best[V::N];
        uint8_t tap[V::N];
        for (int k = 0; k < 4; ++k) {
            const V a = zv[off[k]];
            for (uint32_t e = 0; e < V::N; ++e) {
                const float v = load_f<T>(a.v[e]) + load_f<T>(bias.v[e]);
                // the ReLU output as stored (rounded to T), as relu_pool_window compares it
                const float y = load_f<T>(store_f<T>(v > 0.0f ? v : 0.0f));
                if (k == 0 || y > best[e]) {
                    best[e] = y;
                    tap[e] = (uint8_t)k;
                }
            }
        }
        V o;
        M m;
        for (uint32_t e = 0; e < V::N; ++e) {
            o.v[e] = store_f<T>(best[e]);
            m.v[e] = best[e] > 0.0f ? tap[e] : (uint8_t)POOL_NONE;
        }
        pv[t] = o;
        mv[t] = m;
    }
}

// relu_pool_bwd_nhwc_v from the mask: window row r = (n, i, j) of the ceil(H/2) x ceil(W/2)
// grid, vector column cg; a pooled window's gradient goes to the tap its byte names, an
// unpooled window's positions get 0.
template <typename T>
__device__ __forceinline__ void relu_pool_bwd_mask_nhwc_v(const uint8_t *__restrict__ mask, const T *__restrict__ dp,
                                                          T *__restrict__ dz, float *__restrict__ partial,
                                                          uint32_t batch, uint32_t cvec, uint32_t h, uint32_t w) {
    using V = Vec16<T>;
    using M = MaskVec<V::N>;
    const M *mv = reinterpret_cast<const M *>(mask);
    const V *dpv = reinterpret_cast<const V *>(dp);
    V *dzv = reinterpret_cast<V *>(dz);
    const Window g = window_geometry(h, w);
    const uint32_t per_image = g.ch * g.cw;
    nhwc_rows_partial_v<T>(batch * per_image, cvec, partial, [&](uint32_t r, uint32_t cg, float *acc) {
        const uint32_t n = r / per_image, rem = r % per_image;
        const uint32_t i = rem / g.cw, j = rem % g.cw;
        const size_t row = (size_t)g.w * cvec, col = cvec;
        const size_t origin = (size_t)n * g.h * g.w * cvec + cg;
        size_t off[4];
        bool valid[4];
        window_taps(origin, row, col, g, i, j, off, valid);
        const bool pooled = i < g.oh && j < g.ow;
        M m;
        V grad;
        for (uint32_t e = 0; e < V::N; ++e) {
            m.v[e] = (uint8_t)POOL_NONE;
            grad.v[e] = store_f<T>(0.0f);
        }
        if (pooled) {
            const size_t at = (((size_t)n * g.oh + i) * g.ow + j) * cvec + cg;
            m = mv[at];
            grad = dpv[at];
        }
        V out[4];
        for (uint32_t e = 0; e < V::N; ++e) {
            const float gr = load_f<T>(grad.v[e]);
            for (int k = 0; k < 4; ++k) {
                const float v = (uint32_t)k == m.v[e] ? gr : 0.0f;
                out[k].v[e] = store_f<T>(v);
                if (valid[k]) acc[e] += load_f<T>(out[k].v[e]);
            }
        }
        for (int k = 0; k < 4; ++k) {
            if (valid[k]) dzv[off[k]] = out[k];
        }
    });
}

#define INSTANTIATE_NHWC_V(NAME, T)                                                                               \
    extern "C" __global__ void bias_relu_fwd_nhwc_v_##NAME(const T *x, const T *b, T *y, uint32_t vecs,          \
                                                           uint32_t cvec) {                                       \
        bias_relu_fwd_nhwc_v<T>(x, b, y, vecs, cvec);                                                             \
    }                                                                                                             \
    extern "C" __global__ void bias_relu_bwd_nhwc_v_##NAME(const T *y, const T *dy, T *dz, float *partial,        \
                                                           uint32_t rows, uint32_t cvec) {                        \
        bias_relu_bwd_nhwc_v<T>(y, dy, dz, partial, rows, cvec);                                                  \
    }                                                                                                             \
    extern "C" __global__ void relu_pool_bwd_nhwc_v_##NAME(const T *y, const T *dp, T *dz, float *partial,        \
                                                           uint32_t batch, uint32_t cvec, uint32_t h,             \
                                                           uint32_t w) {                                          \
        relu_pool_bwd_nhwc_v<T>(y, dp, dz, partial, batch, cvec, h, w);                                           \
    }                                                                                                             \
    extern "C" __global__ void bias_relu_pool_fwd_nhwc_v_##NAME(const T *z, const T *b, T *y, T *p,               \
                                                                uint32_t batch, uint32_t cvec, uint32_t h,        \
                                                                uint32_t w) {                                     \
        bias_relu_pool_fwd_nhwc_v<T>(z, b, y, p, batch, cvec, h, w);                                              \
    }                                                                                                             \
    extern "C" __global__ void bias_relu_pool_fwd_mask_nhwc_v_##NAME(const T *z, const T *b, T *p, uint8_t *mask, \
                                                                     uint32_t batch, uint32_t cvec, uint32_t h,   \
                                                                     uint32_t w) {                                \
        bias_relu_pool_fwd_mask_nhwc_v<T>(z, b, p, mask, batch, cvec, h, w);                                      \
    }                                                                                                             \
    extern "C" __global__ void relu_pool_bwd_mask_nhwc_v_##NAME(const uint8_t *mask, const T *dp, T *dz,          \
                                                                float *partial, uint32_t batch, uint32_t cvec,    \
                                                                uint32_t h, uint32_t w) {                         \
        relu_pool_bwd_mask_nhwc_v<T>(mask, dp, dz, partial, batch, cvec, h, w);                                   \
    }

INSTANTIATE_NHWC_V(f32, float)
INSTANTIATE_NHWC_V(f16, __half)
INSTANTIATE_NHWC_V(bf16, __nv_bfloat16)
