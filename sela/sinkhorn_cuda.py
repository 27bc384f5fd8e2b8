"""One fused pass of the Sinkhorn iteration on a GPU: E stored in float16/bfloat16, read once per iteration.

Written without a GPU at hand: the tests in ``tests/sela/test_sinkhorn.py`` that exercise it are CuPy-only and
run on a GPU machine; until they have passed there this path is unverified.

Design (``../shared/notes/sinkhorn.md``): one warp per row, grid-stride over rows with a persistent grid of a few
blocks per SM. A warp computes the row's dot product with v (v in shared memory), reduces it with shuffles, writes
u_i = 1 / (E v)_i, then adds u_i E_ik into its block's column partials in shared memory while the row is still in
L1/L2; each block writes its partials once and one reduction over blocks gives u^T E. bfloat16 is stored as
uint16 bit patterns and decoded by a shift (CuPy's bfloat16 support is experimental); float16 is decoded with
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

template <int Storage>
__device__ void fused_pass(const unsigned short* __restrict__ kernel, const float* __restrict__ cluster_scaling,
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

extern "C" __global__ void fused_pass_bfloat16(const unsigned short* kernel, const float* cluster_scaling,
                                               double* image_scaling, float* partials, long long rows, int cols) {
    fused_pass<0>(kernel, cluster_scaling, image_scaling, partials, rows, cols);
}

extern "C" __global__ void fused_pass_float16(const unsigned short* kernel, const float* cluster_scaling,
                                              double* image_scaling, float* partials, long long rows, int cols) {
    fused_pass<1>(kernel, cluster_scaling, image_scaling, partials, rows, cols);
}
"""

# Round float32 to bfloat16 bits: nearest, ties to even (entries of E are finite and in [0, 1]).
_TO_BFLOAT16 = cupy.ElementwiseKernel(
    "float32 value", "uint16 bits",
    "unsigned int raw = __float_as_uint(value); bits = (unsigned short)((raw + 0x7FFFu + ((raw >> 16) & 1u)) >> 16);",
    "sela_to_bfloat16",
)
_THREADS = 256  # 8 warps a block
_BLOCKS_PER_SM = 4
_SHARED_LIMIT = 48 * 1024  # default dynamic shared memory per block: v and the column partials, float32 each


class CudaFusedKernel:
    """E (N, K) in float16 or bfloat16 on the current GPU; ``fused_pass`` reads it once."""

    def __init__(self, shape: tuple[int, int], storage: str) -> None:
        if storage not in ("bfloat16", "float16"):
            raise ValueError(f"the fused CUDA kernel stores bfloat16 or float16, not {storage!r}")
        if 2 * shape[1] * 4 > _SHARED_LIMIT:
            raise ValueError(f"the fused CUDA kernel keeps 2 K floats in shared memory: K={shape[1]} > "
                             f"{_SHARED_LIMIT // 8}; use float32 storage (cuBLAS) for more clusters")
        self.storage = storage
        self.matrix = cupy.empty(shape, dtype=cupy.uint16)
        module = cupy.RawModule(code=_SOURCE, options=("--std=c++14",))
        self.function = module.get_function(f"fused_pass_{storage}")
        self.blocks = _BLOCKS_PER_SM * cupy.cuda.Device().attributes["MultiProcessorCount"]

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
            shared_mem=2 * num_clusters * 4,
        )
        return image_scaling, partials.sum(axis=0, dtype=cupy.float64)

    def decoded(self) -> Any:
        """E as float32 (tests only: a full-size copy)."""
        if self.storage == "bfloat16":
            return (self.matrix.astype(cupy.uint32) << 16).view(cupy.float32)
        return self.matrix.view(cupy.float16).astype(cupy.float32)
