// Layout changes between NCHW and channels-last (NHWC) as a batched 2-D transpose, loaded by
// crates/gz-model/src/cudnn/layout.rs:
//
//   dst[b][j][i] = src[b][i][j]    src (batch, rows, cols) -> dst (batch, cols, rows)
//
// NCHW -> NHWC is rows = C, cols = H*W; NHWC -> NCHW is rows = H*W, cols = C; (K, C, R, S)
// filters -> (K, R, S, C) is rows = C, cols = R*S. The values are moved as bits (u16 for bf16 and
// f16, u32 for f32), so the copy is exact for every value, NaNs included.
//
// Why not candle's strided copy: it computes each destination element's source index with a
// 64-bit division per dimension and reads the source with a stride of H*W elements between
// neighbouring threads (one 32-byte sector per 2-byte value). Here a block moves a 32x32 tile
// through shared memory: reads and writes are both row-contiguous (coalesced).
//
// Launch (layout.rs `grid`): block (32, 8), grid (ceil(cols / 32), ceil(rows / 32), z); z may be
// less than batch (blocks loop over b with stride gridDim.z).

#include <stdint.h>

#define TILE 32

template <typename T>
__device__ __forceinline__ void transpose(const T *__restrict__ src, T *__restrict__ dst, uint32_t batch,
                                          uint32_t rows, uint32_t cols) {
    // +1 column: the column reads below hit different banks (for 4-byte values)
    __shared__ T tile[TILE][TILE + 1];
    const uint32_t c0 = blockIdx.x * TILE;
    const uint32_t r0 = blockIdx.y * TILE;
    for (uint32_t b = blockIdx.z; b < batch; b += gridDim.z) {
        const size_t base = (size_t)b * rows * cols;
        // read a tile of rows r0.. (coalesced along cols)
        const uint32_t c = c0 + threadIdx.x;
        for (uint32_t k = threadIdx.y; k < TILE; k += blockDim.y) {
            const uint32_t r = r0 + k;
            if (r < rows && c < cols) tile[k][threadIdx.x] = src[base + (size_t)r * cols + c];
        }
        __syncthreads();
        // write it transposed (coalesced along rows)
        const uint32_t r = r0 + threadIdx.x;
        for (uint32_t k = threadIdx.y; k < TILE; k += blockDim.y) {
            const uint32_t cc = c0 + k;
            if (cc < cols && r < rows) dst[base + (size_t)cc * rows + r] = tile[threadIdx.x][k];
        }
        // the next image's reads must not overwrite the tile before every thread has written
        __syncthreads();
    }
}

extern "C" __global__ void gz_transpose_b32(const uint32_t *src, uint32_t *dst, uint32_t batch, uint32_t rows,
                                            uint32_t cols) {
    transpose<uint32_t>(src, dst, batch, rows, cols);
}

extern "C" __global__ void gz_transpose_b16(const uint16_t *src, uint16_t *dst, uint32_t batch, uint32_t rows,
                                            uint32_t cols) {
    transpose<uint16_t>(src, dst, batch, rows, cols);
}
