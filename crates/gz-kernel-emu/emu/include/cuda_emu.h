// The CUDA built-ins the kernels in crates/gz-model/src/kernels use, for compiling them as plain
// C++ and running them on the CPU (gz-kernel-emu). Force-included (`-include cuda_emu.h`)
// before each kernel file; runtime.cpp runs the launches.
//
// threadIdx / blockIdx / blockDim / gridDim are per-OS-thread globals that the scheduler sets
// before it switches to a CUDA thread (a fiber); __shared__ variables become static
// thread_locals: all CUDA threads of a block run on one OS thread and blocks run one after
// another, so a block's threads share them as on the GPU, and concurrent launches on other OS
// threads (parallel tests) do not.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};

namespace gz_emu {
extern thread_local uint3 thread_idx;
extern thread_local uint3 block_idx;
extern thread_local dim3 block_dim;
extern thread_local dim3 grid_dim;
// __syncthreads: every thread of the block must arrive (the emulator reports a deadlock if not).
void sync_threads();
// __shfl_down_sync with a full mask: every thread of the warp must call it.
float shfl_down(float v, unsigned int delta, int width);
} // namespace gz_emu

#define threadIdx (gz_emu::thread_idx)
#define blockIdx (gz_emu::block_idx)
#define blockDim (gz_emu::block_dim)
#define gridDim (gz_emu::grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __syncthreads() gz_emu::sync_threads()

static inline float __shfl_down_sync(unsigned int mask, float v, unsigned int delta, int width = 32) {
    (void)mask;
    return gz_emu::shfl_down(v, delta, width);
}
// Only float shuffles are emulated: any other type is a compile error here, not a silent
// conversion to float.
template <typename T> T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = 32) = delete;

template <typename T> static inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> static inline T max(T a, T b) { return a < b ? b : a; }

// IEEE round-to-nearest f32 operations (the emulator is built with -ffp-contract=off, so no FMA
// contraction, as the intrinsics guarantee on the GPU).
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
