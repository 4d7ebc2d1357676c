// Fused optimizer updates: one launch for up to 32 parameter tensors does everything the generic
// path in crates/gz-model/src/optim.rs does with 8-12 candle ops per tensor (each a launch and an
// allocation).
// Loaded by crates/gz-model/src/optim/fused.rs.
//
// Per element i, with g the gradient (f32, bf16 or f16, converted exactly to f32), p the f32
// parameter (the f32 model variable, or the f32 master of a bf16/f16 model) and `model` the
// bf16/f16 model variable (null for f32 models):
//
//   L2 (RMSprop, SGD; when use_l2):  g = g + p * l2
//   RMSprop (Keras):   a = rho a + (1-rho) g²;  p = p - (g / (sqrt(a) + eps)) * lr
//   SGD Nesterov:      v = mu v - g lr;         p = (p + mu v) - g lr
//   AdamW:             m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g²
//                      p = p (1 - lr wd) - ((m / bc1) / (sqrt(v / bc2) + eps)) * lr
//   model[i] = round-to-nearest-even(p)   (bf16/f16 models only)
//
// Every operation is one IEEE round-to-nearest f32 operation in the order of the generic path
// (the explicit __f*_rn intrinsics stop nvcc contracting a*b+c into an FMA), and the scalar
// factors are the f32 values candle's `affine` would use (the host computes them in f64 and
// casts, e.g. inv_bc1 = (float)(1 / (1 - b1^t))), so the fused update reproduces the generic one
// to the last bit on the same GPU, up to the sign of a zero (candle's scalar ops are affine,
// v * m + 0, which turns -0 into +0; the tests allow 1e-6 relative all the same).
//
// Launch: one launch updates up to GZ_OPTIM_MAX_TENSORS parameter tensors ("multi-tensor
// apply", as PyTorch's foreach optimizers): the table below, passed by value as the first kernel
// argument, lists each tensor's buffers and element count and gives each tensor a contiguous
// range of blocks (block_start[k] .. block_start[k + 1]); a block finds its tensor and loops
// grid-stride over it with its range's blocks, so any positive block count per tensor is
// correct. All buffers are distinct, contiguous allocations of n[k] elements (checked by the
// host). The table is 1,672 bytes, the scalars after it under 64: within CUDA's 4 KiB of
// kernel parameters.

#include "common.cuh"

#include <stddef.h>

#define GZ_OPTIM_MAX_TENSORS 32

// Device addresses as 64-bit integers so the host's copy of the table is plain data.
struct OptimTable {
    uint32_t count;                                  // tensors in this launch, 1..=MAX
    uint32_t block_start[GZ_OPTIM_MAX_TENSORS + 1];  // first block of each tensor; [count] = grid
    uint64_t n[GZ_OPTIM_MAX_TENSORS];                // elements
    uint64_t grad[GZ_OPTIM_MAX_TENSORS];             // const T*
    uint64_t slot0[GZ_OPTIM_MAX_TENSORS];            // f32*: RMSprop's mean square, SGD's velocity, AdamW's m
    uint64_t slot1[GZ_OPTIM_MAX_TENSORS];            // f32*: AdamW's v (0 otherwise)
    uint64_t param[GZ_OPTIM_MAX_TENSORS];            // f32*: the parameter or its master
    uint64_t model[GZ_OPTIM_MAX_TENSORS];            // T*: the bf16/f16 model copy, 0 for f32 models
};

// The host's copy (optim/launch.rs `Table`, the emulator's `OptimTable`) asserts the same.
static_assert(sizeof(OptimTable) == 1672, "OptimTable layout");
static_assert(offsetof(OptimTable, n) == 136 && offsetof(OptimTable, grad) == 392, "OptimTable layout");
static_assert(offsetof(OptimTable, slot0) == 648 && offsetof(OptimTable, slot1) == 904, "OptimTable layout");
static_assert(offsetof(OptimTable, param) == 1160 && offsetof(OptimTable, model) == 1416, "OptimTable layout");

// This block's tensor and its share of it: elements begin, begin + stride, ... below n.
struct Share {
    unsigned k;
    size_t begin;
    size_t stride;
    size_t n;
};

__device__ __forceinline__ Share share_of(const OptimTable &t) {
    unsigned k = 0;
    while (k + 1 < t.count && t.block_start[k + 1] <= blockIdx.x) ++k;
    Share s;
    s.k = k;
    s.begin = (size_t)(blockIdx.x - t.block_start[k]) * blockDim.x + threadIdx.x;
    s.stride = (size_t)(t.block_start[k + 1] - t.block_start[k]) * blockDim.x;
    s.n = t.n[k];
    return s;
}

template <typename T> __device__ __forceinline__ T *ptr(uint64_t a) { return reinterpret_cast<T *>(a); }

template <typename T>
__device__ __forceinline__ void rmsprop(const OptimTable &t, const int use_l2, const float l2, const float rho,
                                        const float one_minus_rho, const float eps, const float lr) {
    const Share s = share_of(t);
    const T *__restrict__ grad = ptr<const T>(t.grad[s.k]);
    float *__restrict__ ms = ptr<float>(t.slot0[s.k]);
    float *__restrict__ param = ptr<float>(t.param[s.k]);
    T *__restrict__ model = ptr<T>(t.model[s.k]);
    for (size_t i = s.begin; i < s.n; i += s.stride) {
        float g = load_f<T>(grad[i]);
        const float p = param[i];
        if (use_l2) g = __fadd_rn(g, __fmul_rn(p, l2));
        const float a = __fadd_rn(__fmul_rn(ms[i], rho), __fmul_rn(__fmul_rn(g, g), one_minus_rho));
        ms[i] = a;
        const float denom = __fadd_rn(__fsqrt_rn(a), eps);
        const float np = __fsub_rn(p, __fmul_rn(__fdiv_rn(g, denom), lr));
        param[i] = np;
        if (model != nullptr) model[i] = store_f<T>(np);
    }
}

template <typename T>
__device__ __forceinline__ void sgd_nesterov(const OptimTable &t, const int use_l2, const float l2,
                                             const float momentum, const float lr) {
    const Share s = share_of(t);
    const T *__restrict__ grad = ptr<const T>(t.grad[s.k]);
    float *__restrict__ vel = ptr<float>(t.slot0[s.k]);
    float *__restrict__ param = ptr<float>(t.param[s.k]);
    T *__restrict__ model = ptr<T>(t.model[s.k]);
    for (size_t i = s.begin; i < s.n; i += s.stride) {
        float g = load_f<T>(grad[i]);
        const float p = param[i];
        if (use_l2) g = __fadd_rn(g, __fmul_rn(p, l2));
        const float glr = __fmul_rn(g, lr);
        const float v = __fsub_rn(__fmul_rn(vel[i], momentum), glr);
        vel[i] = v;
        const float np = __fsub_rn(__fadd_rn(p, __fmul_rn(v, momentum)), glr);
        param[i] = np;
        if (model != nullptr) model[i] = store_f<T>(np);
    }
}

template <typename T>
__device__ __forceinline__ void adamw(const OptimTable &t, const float beta1, const float one_minus_beta1,
                                      const float beta2, const float one_minus_beta2, const float inv_bc1,
                                      const float inv_bc2, const float decay, const float eps, const float lr) {
    const Share s = share_of(t);
    const T *__restrict__ grad = ptr<const T>(t.grad[s.k]);
    float *__restrict__ m1 = ptr<float>(t.slot0[s.k]);
    float *__restrict__ m2 = ptr<float>(t.slot1[s.k]);
    float *__restrict__ param = ptr<float>(t.param[s.k]);
    T *__restrict__ model = ptr<T>(t.model[s.k]);
    for (size_t i = s.begin; i < s.n; i += s.stride) {
        const float g = load_f<T>(grad[i]);
        const float p = param[i];
        const float m = __fadd_rn(__fmul_rn(m1[i], beta1), __fmul_rn(g, one_minus_beta1));
        const float v = __fadd_rn(__fmul_rn(m2[i], beta2), __fmul_rn(__fmul_rn(g, g), one_minus_beta2));
        m1[i] = m;
        m2[i] = v;
        const float m_hat = __fmul_rn(m, inv_bc1);
        const float v_hat = __fmul_rn(v, inv_bc2);
        const float decayed = __fmul_rn(p, decay);
        const float step = __fmul_rn(__fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), eps)), lr);
        const float np = __fsub_rn(decayed, step);
        param[i] = np;
        if (model != nullptr) model[i] = store_f<T>(np);
    }
}

#define OPTIM_KERNELS(T, SFX)                                                                      \
    extern "C" __global__ void gz_rmsprop_##SFX(const OptimTable t, const int use_l2, const float l2,             \
                                                const float rho, const float one_minus_rho, const float eps,      \
                                                const float lr) {                                                 \
        rmsprop<T>(t, use_l2, l2, rho, one_minus_rho, eps, lr);                                    \
    }                                                                                              \
    extern "C" __global__ void gz_sgd_nesterov_##SFX(const OptimTable t, const int use_l2, const float l2,        \
                                                     const float momentum, const float lr) {                     \
        sgd_nesterov<T>(t, use_l2, l2, momentum, lr);                                              \
    }                                                                                              \
    extern "C" __global__ void gz_adamw_##SFX(const OptimTable t, const float beta1, const float one_minus_beta1, \
                                              const float beta2, const float one_minus_beta2, const float inv_bc1, \
                                              const float inv_bc2, const float decay, const float eps,          \
                                              const float lr) {                                                  \
        adamw<T>(t, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_bc2, decay, eps, lr); \
    }

OPTIM_KERNELS(float, f32)
OPTIM_KERNELS(__nv_bfloat16, bf16)
OPTIM_KERNELS(__half, f16)
