"""One fused pass of the Sinkhorn iteration on a GPU: E stored in float16/bfloat16, read once per iteration.

Its tests in ``tests/sela/test_sinkhorn.py`` are CuPy-only; they passed on an H100, where the tiled pass measured
2.71 ms an iteration at N = 1,281,167, K = 3,000 in bfloat16 with no wait for the GPU between stopping checks
(3.33 ms with two waits an iteration; one read at 3.0 TB/s: 2.56 ms; the row kernel 9.21 ms).

Design (``../shared/notes/sinkhorn.md``): ``fused_tiles``, a persistent grid of two 256-thread blocks per SM,
grid-stride over tiles of R consecutive rows. Thread t owns the column chunks t, t + 256, ... of every row, a chunk
being 8 entries read with one 16-byte load when K % 8 == 0 (every row then starts 16-byte aligned) and 1 entry
otherwise. A thread loads its chunks of the whole tile into registers (all loads in flight at once), adds up its
share of each row's dot product with v (v in shared memory), and the block reduces those shares (warp shuffles, then
shared memory) to u_r = 1 / (E v)_r; each thread then adds u_r E_rk into its own column accumulators, in registers,
from the same registers: E is read from memory once, with no atomics. Each block writes its accumulators once and one
reduction over blocks gives u^T E. R is chosen so that R x (chunks a thread) stays near 16 loads of 16 bytes, which
keeps the kernel within 128 registers (no spills on sm_90). K beyond 8192 (K % 8 == 0) or 4096 (otherwise) does not
fit the tiles: up to K = 6144 it falls back to ``fused_rows`` (one warp a row, column partials in shared memory
updated with shared atomics, several times slower; v and the partials, 2 K floats, fill 48 KiB of shared memory at
6144), and a larger K is refused (float32 storage, through cuBLAS, has no such limit). bfloat16 is stored as uint16
bit patterns and decoded by a shift or a mask (CuPy's bfloat16 support is experimental); float16 is decoded with
``cvt.f32.f16``. Accumulation is float32, u is written in float64.
"""

from typing import Any

import cupy
import numpy as np

_SOURCE = r"""
template <int Storage> __device__ __forceinline__ float decode(unsigned short bits);
template <> __device__ __forceinline__ float decode<0>(unsigned short bits) {  // bfloat16
    return __uint_as_float(((unsigned int)bits) << 16);
}
template <> __device__ __forceinline__ float decode<1>(unsigned short bits) {  // float16
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
    return value;
}
// Two entries packed in 32 bits, the lower column in the low half (little-endian storage).
template <int Storage> __device__ __forceinline__ void decode_pair(unsigned int bits, float& low, float& high) {
    low = decode<Storage>((unsigned short)(bits & 0xFFFFu));
    high = decode<Storage>((unsigned short)(bits >> 16));
}
template <> __device__ __forceinline__ void decode_pair<0>(unsigned int bits, float& low, float& high) {
    low = __uint_as_float(bits << 16);  // bfloat16: no unpacking, one shift and one mask
    high = __uint_as_float(bits & 0xFFFF0000u);
}

// Vec entries of one row from one load: 8 (16 bytes, uint4) when K % 8 == 0, else 1 (2 bytes).
template <int Storage, int Vec> struct Chunk;
template <int Storage> struct Chunk<Storage, 8> {
    uint4 bits;
    __device__ __forceinline__ void load(const unsigned short* address) { bits = __ldg((const uint4*)address); }
    __device__ __forceinline__ void clear() { bits = make_uint4(0u, 0u, 0u, 0u); }
    __device__ __forceinline__ void decode_all(float* values) const {
        decode_pair<Storage>(bits.x, values[0], values[1]);
        decode_pair<Storage>(bits.y, values[2], values[3]);
        decode_pair<Storage>(bits.z, values[4], values[5]);
        decode_pair<Storage>(bits.w, values[6], values[7]);
    }
};
template <int Storage> struct Chunk<Storage, 1> {
    unsigned short bits;
    __device__ __forceinline__ void load(const unsigned short* address) { bits = __ldg(address); }
    __device__ __forceinline__ void clear() { bits = 0; }
    __device__ __forceinline__ void decode_all(float* values) const { values[0] = decode<Storage>(bits); }
};

// Tiled pass: Threads threads, Rows rows a tile, grid-stride over tiles. Thread t owns the column chunks
// t, t + Threads, ..., (Groups of them) of every row: it loads its Rows x Groups chunks of the tile into registers
// (all loads in flight before any use), forms its share of each row's dot product with v, and after the block has
// reduced those to u_r it adds u_r E_rk into its own column accumulators, in registers: E is read from memory
// exactly once and no atomics are needed. Each block writes its accumulators once to partials[block, :].
template <int Storage, int Vec, int Groups, int Rows, int Threads>
__global__ void __launch_bounds__(Threads, 2)
fused_tiles(const unsigned short* __restrict__ kernel, const float* __restrict__ cluster_scaling,
            double* __restrict__ image_scaling, float* __restrict__ partials, long long rows, int cols) {
    constexpr int Warps = Threads / 32;
    extern __shared__ float scaling[];  // v, float32, K entries (16-byte aligned: the start of dynamic shared)
    __shared__ float warp_sums[Rows][Warps];
    __shared__ float tile_scale[Rows];
    for (int k = threadIdx.x; k < cols; k += Threads) scaling[k] = cluster_scaling[k];
    __syncthreads();

    const int chunks = cols / Vec;  // exact: Vec == 8 only when K % 8 == 0
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    float column[Groups][Vec];
#pragma unroll
    for (int j = 0; j < Groups; ++j)
#pragma unroll
        for (int e = 0; e < Vec; ++e) column[j][e] = 0.0f;

    const long long tiles = (rows + Rows - 1) / Rows;
    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long first = tile * Rows;
        Chunk<Storage, Vec> data[Rows][Groups];
#pragma unroll
        for (int r = 0; r < Rows; ++r) {
            const unsigned short* entries = kernel + (first + r) * cols;
#pragma unroll
            for (int j = 0; j < Groups; ++j) {
                const int chunk = threadIdx.x + j * Threads;
                if (first + r < rows && chunk < chunks) data[r][j].load(entries + chunk * Vec);
                else data[r][j].clear();  // zeros: no share of any dot product or column sum
            }
        }
        float sums[Rows];
#pragma unroll
        for (int r = 0; r < Rows; ++r) sums[r] = 0.0f;
#pragma unroll
        for (int j = 0; j < Groups; ++j) {
            const int chunk = threadIdx.x + j * Threads;
            float v[Vec];
#pragma unroll
            for (int e = 0; e < Vec; ++e) v[e] = chunk < chunks ? scaling[chunk * Vec + e] : 0.0f;
#pragma unroll
            for (int r = 0; r < Rows; ++r) {
                float values[Vec];
                data[r][j].decode_all(values);
#pragma unroll
                for (int e = 0; e < Vec; ++e) sums[r] += values[e] * v[e];
            }
        }
#pragma unroll
        for (int r = 0; r < Rows; ++r) {
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) sums[r] += __shfl_xor_sync(0xffffffffu, sums[r], offset);
        }
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < Rows; ++r) warp_sums[r][warp] = sums[r];
        }
        __syncthreads();
        if (threadIdx.x < Rows) {
            const int r = threadIdx.x;
            float sum = 0.0f;
#pragma unroll
            for (int w = 0; w < Warps; ++w) sum += warp_sums[r][w];
            const bool inside = first + r < rows;
            if (inside) image_scaling[first + r] = 1.0 / (double)sum;
            tile_scale[r] = inside ? 1.0f / sum : 0.0f;  // rows past N add nothing (their entries are zeros too)
        }
        __syncthreads();  // also orders this tile's reads of warp_sums before the next tile's writes
#pragma unroll
        for (int r = 0; r < Rows; ++r) {
            const float scale = tile_scale[r];
#pragma unroll
            for (int j = 0; j < Groups; ++j) {
                float values[Vec];
                data[r][j].decode_all(values);
#pragma unroll
                for (int e = 0; e < Vec; ++e) column[j][e] += values[e] * scale;
            }
        }
        // The next tile's first __syncthreads orders these reads of tile_scale before its rewrite.
    }
#pragma unroll
    for (int j = 0; j < Groups; ++j) {
        const int chunk = threadIdx.x + j * Threads;
        if (chunk < chunks) {
#pragma unroll
            for (int e = 0; e < Vec; ++e) partials[(long long)blockIdx.x * cols + chunk * Vec + e] = column[j][e];
        }
    }
}

// Fallback for K beyond the tiled kernel's register budget: one warp a row, column partials in shared memory
// updated with shared atomics (several times slower than the tiled kernel).
template <int Storage>
__global__ void fused_rows(const unsigned short* __restrict__ kernel, const float* __restrict__ cluster_scaling,
                           double* __restrict__ image_scaling, float* __restrict__ partials,
                           long long rows, int cols) {
    extern __shared__ float shared[];
    float* scaling = shared;
    float* column = shared + cols;
    for (int k = threadIdx.x; k < cols; k += blockDim.x) {
        scaling[k] = cluster_scaling[k];
        column[k] = 0.0f;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows; row += warps) {
        const unsigned short* entries = kernel + row * cols;
        float sum = 0.0f;
        for (int k = lane; k < cols; k += 32) sum += decode<Storage>(entries[k]) * scaling[k];
        for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        const float scale = 1.0f / sum;
        if (lane == 0) image_scaling[row] = 1.0 / (double)sum;
        for (int k = lane; k < cols; k += 32) atomicAdd(&column[k], decode<Storage>(entries[k]) * scale);
    }
    __syncthreads();
    for (int k = threadIdx.x; k < cols; k += blockDim.x) partials[(long long)blockIdx.x * cols + k] = column[k];
}
"""

# Round float32 to bfloat16 bits: nearest, ties to even (entries of E are finite and in [0, 1]).
_TO_BFLOAT16 = cupy.ElementwiseKernel(
    "float32 value", "uint16 bits",
    "unsigned int raw = __float_as_uint(value); bits = (unsigned short)((raw + 0x7FFFu + ((raw >> 16) & 1u)) >> 16);",
    "sela_to_bfloat16",
)
_THREADS = 256  # 8 warps a block
_TILE_BLOCKS_PER_SM = 2  # the tiled kernel's __launch_bounds__(256, 2): up to 128 registers a thread
_ROWS_BLOCKS_PER_SM = 4
# Tiled kernel: at most this many chunks a thread (Groups); Rows x Groups chunks are held in registers per tile,
# so Rows = budget // Groups keeps the register count near constant (16 uint4 = 64 registers for Vec 8).
_MAX_GROUPS = {8: 4, 1: 16}  # K <= 8192 when K % 8 == 0, else K <= 4096
_CHUNK_BUDGET = {8: 16, 1: 64}
_MAX_ROWS = 16  # more rows a tile would hold too many row sums in registers (spills)
_SHARED_LIMIT = 48 * 1024  # default dynamic shared memory per block


def tile_config(num_clusters: int) -> tuple[int, int, int] | None:
    """(Vec, Groups, Rows) of the tiled kernel for K clusters, or None where K needs the row kernel."""
    vec = 8 if num_clusters % 8 == 0 else 1  # 16-byte loads need every row 16-byte aligned
    groups = max(1, -(-(num_clusters // vec) // _THREADS))
    if groups > _MAX_GROUPS[vec]:  # v (K floats) then fits in shared memory too
        return None
    return vec, groups, max(1, min(_MAX_ROWS, _CHUNK_BUDGET[vec] // groups))


class CudaFusedKernel:
    """E (N, K) in float16 or bfloat16 on the current GPU; ``fused_pass`` reads it once."""

    def __init__(self, shape: tuple[int, int], storage: str) -> None:
        if storage not in ("bfloat16", "float16"):
            raise ValueError(f"the fused CUDA kernel stores bfloat16 or float16, not {storage!r}")
        self.storage = storage
        self.matrix = cupy.empty(shape, dtype=cupy.uint16)  # CuPy allocations are 256-byte aligned
        code = 0 if storage == "bfloat16" else 1
        config = tile_config(shape[1])
        if config is not None:
            vec, groups, rows = config
            name = f"fused_tiles<{code}, {vec}, {groups}, {rows}, {_THREADS}>"
            self.shared_mem = shape[1] * 4  # v
            blocks_per_sm = _TILE_BLOCKS_PER_SM
        else:
            if 2 * shape[1] * 4 > _SHARED_LIMIT:
                raise ValueError(f"the fused CUDA kernel keeps 2 K floats in shared memory: K={shape[1]} > "
                                 f"{_SHARED_LIMIT // 8}; use float32 storage (cuBLAS) for more clusters")
            name = f"fused_rows<{code}>"
            self.shared_mem = 2 * shape[1] * 4  # v and the column partials
            blocks_per_sm = _ROWS_BLOCKS_PER_SM
        module = cupy.RawModule(code=_SOURCE, options=("--std=c++14",), name_expressions=(name,))
        self.function = module.get_function(name)
        self.blocks = blocks_per_sm * cupy.cuda.Device().attributes["MultiProcessorCount"]

    def write_rows(self, start: int, block: Any) -> None:
        rows = slice(start, start + block.shape[0])
        if self.storage == "bfloat16":
            _TO_BFLOAT16(block.astype(cupy.float32, copy=False), self.matrix[rows])
        else:
            self.matrix[rows] = block.astype(cupy.float16).view(cupy.uint16)

    def fused_pass(self, cluster_scaling: Any) -> tuple[Any, Any]:
        num_rows, num_clusters = self.matrix.shape
        image_scaling = cupy.empty(num_rows, dtype=cupy.float64)
        partials = cupy.empty((self.blocks, num_clusters), dtype=cupy.float32)
        self.function(
            (self.blocks,), (_THREADS,),
            (self.matrix, cluster_scaling.astype(cupy.float32), image_scaling, partials, np.int64(num_rows),
             np.int32(num_clusters)),
            shared_mem=self.shared_mem,
        )
        return image_scaling, partials.sum(axis=0, dtype=cupy.float64)

    def decoded(self) -> Any:
        """E as float32 (tests only: a full-size copy)."""
        if self.storage == "bfloat16":
            return (self.matrix.astype(cupy.uint32) << 16).view(cupy.float32)
        return self.matrix.view(cupy.float16).astype(cupy.float32)
