// Shared by the kernels in this folder: loads and stores of the three float storage types,
// with all arithmetic in f32 (round-to-nearest-even on the way back).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> __device__ __forceinline__ float load_f(T v);
template <> __device__ __forceinline__ float load_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float load_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float load_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T store_f(float v);
template <> __device__ __forceinline__ float store_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
