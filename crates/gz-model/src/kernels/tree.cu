// The decision-tree output layer (crate::tree) for one row per thread: forward and backward.
// Loaded by crates/gz-model/src/tree.rs. The tree (questions in topological order: first answer,
// number of answers, parent answer or -1) comes in as a by-value struct filled from gz-schema,
// so this file holds no copy of the schema. The math is in the storage type (f32 or f64), as
// the candle-ops version of the layer computes it.
//
// Forward, per question q:  r_i = max(x_i, 0) + eps,  s = sum r_i,  y_i = r_i / s * y[parent(q)]
// Backward (questions in reverse order, so a parent's gradient is complete before its own
// question is reached): with g the gradient of y (dy plus what the children sent back),
//   g[parent] += sum g_i v_i,  dv_i = g_i * y[parent],  dx_i = [x_i >= 0] (dv_i - sum dv v) / s
// where v_i = r_i / s (recomputed from x). [x >= 0] is candle's ReLU subgradient, which the
// candle-ops version of the layer uses.

#include <stddef.h>
#include <stdint.h>

#define TREE_MAX_Q 16
#define TREE_MAX_A 64

struct Tree {
    uint32_t questions;
    uint32_t answers;
    uint32_t first[TREE_MAX_Q];
    uint32_t len[TREE_MAX_Q];
    int32_t parent[TREE_MAX_Q];
};
// passed by value: tree.rs asserts the same size and offsets for its `Tree`
static_assert(sizeof(Tree) == 200, "Tree layout");
static_assert(offsetof(Tree, first) == 8 && offsetof(Tree, len) == 72 && offsetof(Tree, parent) == 136, "Tree layout");

template <typename T>
__device__ __forceinline__ void tree_fwd(const T *__restrict__ x, T *__restrict__ y, uint32_t rows, const Tree &t,
                                         T eps) {
    const uint32_t row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const T *xr = x + (size_t)row * t.answers;
    T *yr = y + (size_t)row * t.answers;
    T v[TREE_MAX_A];
    for (uint32_t k = 0; k < t.questions; ++k) {
        const uint32_t f = t.first[k], n = t.len[k];
        T s = 0;
        for (uint32_t i = 0; i < n; ++i) s += (xr[f + i] > (T)0 ? xr[f + i] : (T)0) + eps;
        const T pv = t.parent[k] >= 0 ? v[t.parent[k]] : (T)1;
        for (uint32_t i = 0; i < n; ++i) {
            const T r = (xr[f + i] > (T)0 ? xr[f + i] : (T)0) + eps;
            v[f + i] = r / s * pv;
        }
    }
    for (uint32_t i = 0; i < t.answers; ++i) yr[i] = v[i];
}

template <typename T>
__device__ __forceinline__ void tree_bwd(const T *__restrict__ x, const T *__restrict__ y, const T *__restrict__ dy,
                                         T *__restrict__ dx, uint32_t rows, const Tree &t, T eps) {
    const uint32_t row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const size_t base = (size_t)row * t.answers;
    T g[TREE_MAX_A];
    for (uint32_t i = 0; i < t.answers; ++i) g[i] = dy[base + i];
    for (int k = (int)t.questions - 1; k >= 0; --k) {
        const uint32_t f = t.first[k], n = t.len[k];
        T s = 0;
        for (uint32_t i = 0; i < n; ++i) {
            const T xi = x[base + f + i];
            s += (xi > (T)0 ? xi : (T)0) + eps;
        }
        const int32_t p = t.parent[k];
        const T pv = p >= 0 ? y[base + p] : (T)1;
        T back = 0, dot = 0;
        for (uint32_t i = 0; i < n; ++i) {
            const T xi = x[base + f + i];
            const T vi = ((xi > (T)0 ? xi : (T)0) + eps) / s;
            back += g[f + i] * vi;
            dot += g[f + i] * pv * vi;
        }
        if (p >= 0) g[p] += back;
        for (uint32_t i = 0; i < n; ++i) {
            const T xi = x[base + f + i];
            dx[base + f + i] = xi >= (T)0 ? (g[f + i] * pv - dot) / s : (T)0;
        }
    }
}

#define INSTANTIATE(NAME, T)                                                                                       \
    extern "C" __global__ void tree_fwd_##NAME(const T *x, T *y, uint32_t rows, Tree t, T eps) {                  \
        tree_fwd<T>(x, y, rows, t, eps);                                                                           \
    }                                                                                                              \
    extern "C" __global__ void tree_bwd_##NAME(const T *x, const T *y, const T *dy, T *dx, uint32_t rows, Tree t,  \
                                               T eps) {                                                            \
        tree_bwd<T>(x, y, dy, dx, rows, t, eps);                                                                   \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f64, double)
