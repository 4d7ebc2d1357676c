// Fused optimizer updates: one launch per parameter tensor does everything the generic path in
// crates/gz-model/src/optim.rs does with 8-12 candle ops (each a launch and an allocation).
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
// to the last bit on the same GPU (the tests allow 1e-6 relative all the same).
//
// Launch: 1-D grid-stride loop, any grid/block size. All pointers are distinct, contiguous
// allocations of n elements (checked by the host).

#include "common.cuh"

#define GRID_STRIDE(i, n)                                                                       \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                  \
         i += (size_t)blockDim.x * gridDim.x)

template <typename T>
__device__ __forceinline__ void rmsprop(const uint64_t n, const T *__restrict__ grad, float *__restrict__ ms,
                                        float *__restrict__ param, T *__restrict__ model, const int use_l2,
                                        const float l2, const float rho, const float one_minus_rho, const float eps,
                                        const float lr) {
    GRID_STRIDE(i, n) {
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
__device__ __forceinline__ void sgd_nesterov(const uint64_t n, const T *__restrict__ grad, float *__restrict__ vel,
                                             float *__restrict__ param, T *__restrict__ model, const int use_l2,
                                             const float l2, const float momentum, const float lr) {
    GRID_STRIDE(i, n) {
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
__device__ __forceinline__ void adamw(const uint64_t n, const T *__restrict__ grad, float *__restrict__ m1,
                                      float *__restrict__ m2, float *__restrict__ param, T *__restrict__ model,
                                      const float beta1, const float one_minus_beta1, const float beta2,
                                      const float one_minus_beta2, const float inv_bc1, const float inv_bc2,
                                      const float decay, const float eps, const float lr) {
    GRID_STRIDE(i, n) {
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
    extern "C" __global__ void gz_rmsprop_##SFX(const uint64_t n, const T *grad, float *ms, float *param, T *model, \
                                                const int use_l2, const float l2, const float rho,               \
                                                const float one_minus_rho, const float eps, const float lr) {   \
        rmsprop<T>(n, grad, ms, param, model, use_l2, l2, rho, one_minus_rho, eps, lr);                  \
    }                                                                                              \
    extern "C" __global__ void gz_sgd_nesterov_##SFX(const uint64_t n, const T *grad, float *vel, float *param,     \
                                                     T *model, const int use_l2, const float l2,                 \
                                                     const float momentum, const float lr) {                     \
        sgd_nesterov<T>(n, grad, vel, param, model, use_l2, l2, momentum, lr);                        \
    }                                                                                              \
    extern "C" __global__ void gz_adamw_##SFX(const uint64_t n, const T *grad, float *m1, float *m2, float *param,  \
                                              T *model, const float beta1, const float one_minus_beta1,         \
                                              const float beta2, const float one_minus_beta2, const float inv_bc1, \
                                              const float inv_bc2, const float decay, const float eps,          \
                                              const float lr) {                                                  \
        adamw<T>(n, grad, m1, m2, param, model, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_bc1, inv_bc2, \
                 decay, eps, lr);                                                                   \
    }

OPTIM_KERNELS(float, f32)
OPTIM_KERNELS(__nv_bfloat16, bf16)
OPTIM_KERNELS(__half, f16)
