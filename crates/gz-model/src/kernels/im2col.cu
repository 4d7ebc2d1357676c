// The image layers' convolution as one matrix product (cudnn/im2col.rs): the 2026-11-30 device
// run timed cuDNN's channels-last kernels for Dieleman's 3-channel 6x6 image layer at 2.4 ms
// forward and 1.8 ms backward-filter per bf16 step of 4,096 parts (about 19 TFLOP/s, no tensor
// cores), 40 % of the whole step. With the image unfolded into a matrix P (one row per output
// position, one column per filter tap) the layer is Z = P W^T and its filter gradient
// dW = dZ^T P: two cuBLAS products with a short inner dimension, bounded by P's bytes.
//
// im2col_nhwc: x (N, H, W, C) channels-last -> P (N*OH*OW rows, `cols` columns); row (n, oy, ox),
// column (r*S + s)*C + c for the R*S*C taps (the order of a channels-last (K, R, S, C) filter
// flattened per output channel), then zeros up to `cols` (a multiple of 8, for cuBLAS's
// tensor-core kernels); input positions outside the image (padding) read as zero. Stride 1.
// Each block tabulates the taps' offsets once in shared memory; each warp writes one row at a
// time, its lanes on consecutive columns (coalesced writes; a tap row of S*C values is
// contiguous in x, so the reads are too).
//
// copy_cols: dst (rows x dst_w) = src (rows x src_w) with columns cut or zero-filled: the
// filter's padding to `cols` columns and the gradient's cut back to R*S*C.
//
// sum_parts: the filter gradient's last step when its product ran in parts (one f32 partial
// sum of K x cols per part of the rows): dw (K x taps, the storage type) = the sum of the
// `slots` partial sums, cut back to `taps` columns. Block b takes outputs 32b .. 32b + 31 (a
// lane each: coalesced reads), its 8 warps the slots w, w + 8, ... in order; the warps' sums
// are then added in a fixed order through shared memory, so dw is deterministic and its sums
// are f32 all the way (the parts are never rounded to bf16).

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void im2col_nhwc(const T *__restrict__ x, T *__restrict__ p, uint32_t n, uint32_t h,
                                            uint32_t w, uint32_t c, uint32_t r, uint32_t s, uint32_t pad,
                                            uint32_t oh, uint32_t ow, uint32_t cols) {
    // cols <= 256 (the host checks); a padding column has tab_c = -1
    __shared__ int tab_dy[256], tab_dx[256], tab_c[256];
    const uint32_t taps = r * s * c;
    for (uint32_t col = threadIdx.x; col < cols; col += blockDim.x) {
        if (col < taps) {
            const uint32_t rs = col / c;
            tab_dy[col] = (int)(rs / s) - (int)pad;
            tab_dx[col] = (int)(rs % s) - (int)pad;
            tab_c[col] = (int)(col % c);
        } else {
            tab_dy[col] = 0;
            tab_dx[col] = 0;
            tab_c[col] = -1;
        }
    }
    __syncthreads();
    const uint32_t warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t rows = n * oh * ow;
    for (uint32_t row = blockIdx.x * warps + warp; row < rows; row += gridDim.x * warps) {
        const uint32_t ox = row % ow, t = row / ow;
        const uint32_t oy = t % oh, ni = t / oh;
        T *out = p + (size_t)row * cols;
        for (uint32_t col = lane; col < cols; col += 32) {
            T v = store_f<T>(0.0f);
            const int ci = tab_c[col];
            if (ci >= 0) {
                const int iy = (int)oy + tab_dy[col], ix = (int)ox + tab_dx[col];
                if (iy >= 0 && iy < (int)h && ix >= 0 && ix < (int)w) {
                    v = x[(((size_t)ni * h + (uint32_t)iy) * w + (uint32_t)ix) * c + (uint32_t)ci];
                }
            }
            out[col] = v;
        }
    }
}

template <typename T>
__device__ __forceinline__ void copy_cols(const T *__restrict__ src, T *__restrict__ dst, uint32_t rows,
                                          uint32_t src_w, uint32_t dst_w) {
    const uint32_t total = rows * dst_w;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const uint32_t row = i / dst_w, col = i % dst_w;
        dst[i] = col < src_w ? src[(size_t)row * src_w + col] : store_f<T>(0.0f);
    }
}

template <typename T>
__device__ __forceinline__ void sum_parts(const float *__restrict__ partials, T *__restrict__ dw, uint32_t slots,
                                          uint32_t k, uint32_t cols, uint32_t taps) {
    // blockDim.x == 256 (8 warps; the host's launch)
    __shared__ float warp_sums[256];
    const uint32_t warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t outs = k * taps;
    const size_t len = (size_t)k * cols;
    for (uint32_t base = blockIdx.x * 32; base < outs; base += gridDim.x * 32) {
        const uint32_t o = base + lane;
        float acc = 0.0f;
        if (o < outs) {
            const size_t src = (size_t)(o / taps) * cols + o % taps;
            for (uint32_t i = warp; i < slots; i += warps) acc += partials[(size_t)i * len + src];
        }
        warp_sums[threadIdx.x] = acc;
        __syncthreads();
        if (warp == 0 && o < outs) {
            float total = 0.0f;
            for (uint32_t w = 0; w < warps; ++w) total += warp_sums[w * 32 + lane];
            dw[o] = store_f<T>(total);
        }
        __syncthreads();
    }
}

#define INSTANTIATE_IM2COL(NAME, T)                                                                               \
    extern "C" __global__ void im2col_nhwc_##NAME(const T *x, T *p, uint32_t n, uint32_t h, uint32_t w,           \
                                                  uint32_t c, uint32_t r, uint32_t s, uint32_t pad, uint32_t oh,  \
                                                  uint32_t ow, uint32_t cols) {                                   \
        im2col_nhwc<T>(x, p, n, h, w, c, r, s, pad, oh, ow, cols);                                                \
    }                                                                                                             \
    extern "C" __global__ void copy_cols_##NAME(const T *src, T *dst, uint32_t rows, uint32_t src_w,              \
                                                uint32_t dst_w) {                                                 \
        copy_cols<T>(src, dst, rows, src_w, dst_w);                                                               \
    }                                                                                                             \
    extern "C" __global__ void sum_parts_##NAME(const float *partials, T *dw, uint32_t slots, uint32_t k,         \
                                                uint32_t cols, uint32_t taps) {                                   \
        sum_parts<T>(partials, dw, slots, k, cols, taps);                                                         \
    }

INSTANTIATE_IM2COL(f32, float)
INSTANTIATE_IM2COL(f16, __half)
INSTANTIATE_IM2COL(bf16, __nv_bfloat16)
