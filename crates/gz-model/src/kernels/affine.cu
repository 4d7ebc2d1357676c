// Bilinear affine resampling of image batches, and Dieleman's 16 parts per galaxy in one pass.
// Loaded by crates/gz-model/src/augment.rs (module `cuda`); the candle-ops implementation there
// (`affine_sample` on CPU) is the reference these kernels are tested against.
//
// Conventions (see augment.rs): a 2x3 matrix m maps normalised output coordinates (x, y in
// [-1, 1], pixel centres at (2j+1)/W - 1) to normalised input coordinates; the input pixel
// coordinate is p = (x_in + 1) W / 2 - 1/2; bilinear interpolation with zero outside the image.
// Arithmetic is f32 for every storage type.

#include "common.cuh"

// Samples plane `src` (h x w) at output pixel (oy, ox) of an (oh x ow) grid through matrix m.
template <typename T>
__device__ __forceinline__ float sample(const T *__restrict__ src, const float *__restrict__ m, uint32_t h, uint32_t w,
                                        uint32_t oy, uint32_t ox, uint32_t oh, uint32_t ow) {
    const float x = (float)(2 * ox + 1) / (float)ow - 1.0f;
    const float y = (float)(2 * oy + 1) / (float)oh - 1.0f;
    const float xi = m[0] * x + m[1] * y + m[2];
    const float yi = m[3] * x + m[4] * y + m[5];
    const float px = xi * ((float)w * 0.5f) + ((float)w - 1.0f) * 0.5f;
    const float py = yi * ((float)h * 0.5f) + ((float)h - 1.0f) * 0.5f;
    const float x0 = floorf(px), y0 = floorf(py);
    const float fx = px - x0, fy = py - y0;
    const int ix = (int)x0, iy = (int)y0;
    float acc = 0.0f;
    const float wx[2] = {1.0f - fx, fx};
    const float wy[2] = {1.0f - fy, fy};
#pragma unroll
    for (int dy = 0; dy < 2; ++dy) {
        const int yy = iy + dy;
        if (yy < 0 || yy >= (int)h) continue;
#pragma unroll
        for (int dx = 0; dx < 2; ++dx) {
            const int xx = ix + dx;
            if (xx < 0 || xx >= (int)w) continue;
            acc += load_f<T>(src[(size_t)yy * w + xx]) * (wx[dx] * wy[dy]);
        }
    }
    return acc;
}

// out (b, c, oh, ow) = images (b, c, h, w) sampled through mats[b] (6 floats each).
template <typename T>
__device__ __forceinline__ void affine_sample(const T *__restrict__ img, const float *__restrict__ mats,
                                              T *__restrict__ out, uint32_t b, uint32_t c, uint32_t h, uint32_t w,
                                              uint32_t oh, uint32_t ow) {
    const uint32_t total = b * c * oh * ow;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const uint32_t ox = i % ow;
        const uint32_t oy = (i / ow) % oh;
        const uint32_t plane = i / (ow * oh); // image * c + channel
        const uint32_t image = plane / c;
        out[i] = store_f<T>(sample<T>(img + (size_t)plane * h * w, mats + 6 * image, h, w, oy, ox, oh, ow));
    }
}

// Dieleman's parts, straight from the images: out (16 b, c, part, part), index
// ((k * 4 + v) * b + g) for part k of view v of galaxy g (what `parts(views(x))` gives: views
// view-major, parts part-major). Part k reads view pixel (vr, vc) of a (view x view) view:
//   k = 0: (r, c)    k = 1: (c, L - r)    k = 2: (L - r, L - c)    k = 3: (L - c, r),   L = view - 1
// and view v samples the image through mats[v] (the same four matrices for every galaxy).
template <typename T>
__device__ __forceinline__ void dieleman_parts(const T *__restrict__ img, const float *__restrict__ mats,
                                               T *__restrict__ out, uint32_t b, uint32_t c, uint32_t h,
                                               uint32_t w, uint32_t view, uint32_t part) {
    const uint32_t total = 16 * b * c * part * part;
    const uint32_t l = view - 1;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const uint32_t col = i % part;
        const uint32_t row = (i / part) % part;
        const uint32_t ch = (i / (part * part)) % c;
        const uint32_t n = i / (part * part * c); // (k * 4 + v) * b + g
        const uint32_t g = n % b;
        const uint32_t v = (n / b) % 4;
        const uint32_t k = n / (4 * b);
        uint32_t vr, vc;
        switch (k) {
        case 0: vr = row; vc = col; break;
        case 1: vr = col; vc = l - row; break;
        case 2: vr = l - row; vc = l - col; break;
        default: vr = l - col; vc = row; break;
        }
        const T *src = img + ((size_t)g * c + ch) * h * w;
        out[i] = store_f<T>(sample<T>(src, mats + 6 * v, h, w, vr, vc, view, view));
    }
}

#define INSTANTIATE(NAME, T)                                                                                     \
    extern "C" __global__ void affine_sample_##NAME(const T *img, const float *mats, T *out, uint32_t b,         \
                                                    uint32_t c, uint32_t h, uint32_t w, uint32_t oh,             \
                                                    uint32_t ow) {                                               \
        affine_sample<T>(img, mats, out, b, c, h, w, oh, ow);                                                    \
    }                                                                                                            \
    extern "C" __global__ void dieleman_parts_##NAME(const T *img, const float *mats, T *out, uint32_t b,        \
                                                     uint32_t c, uint32_t h, uint32_t w, uint32_t view,          \
                                                     uint32_t part) {                                            \
        dieleman_parts<T>(img, mats, out, b, c, h, w, view, part);                                               \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
