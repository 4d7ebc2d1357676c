// Stand-in for CUDA's cuda_fp16.h in the CPU emulator: __half as its 16 bits, conversions through
// the compiler's _Float16 (IEEE binary16, round-to-nearest-even, as __float2half_rn).
#pragma once
#include <stdint.h>
#include <string.h>

struct __half {
    uint16_t x;
};

static inline float __half2float(__half h) {
    _Float16 f;
    memcpy(&f, &h.x, 2);
    return (float)f;
}

static inline __half __float2half_rn(float v) {
    const _Float16 f = (_Float16)v;
    __half h;
    memcpy(&h.x, &f, 2);
    return h;
}
