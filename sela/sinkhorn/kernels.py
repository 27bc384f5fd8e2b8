"""Stored Sinkhorn kernels: the N x K matrix E and the one product an iteration needs, per backend.

The solver (``sela.sinkhorn.solver``) keeps E = exp(S + f + g) with every row summing to 1 (so entries lie in [0, 1]
whatever the storage type) and asks each iteration for one *fused pass*: given the cluster scaling v (K,), return
the image scaling u = 1 / (E v) (N,) and the column sums u^T E (K,). Everything else (potentials, stopping rule,
stabilisation, sharding) is backend-independent. Backends:

- ``BlockedCpuKernel``: numpy float32/float64, one read of E per iteration (row blocks kept in cache between the
  two products), one thread per core. CPU half precision is not offered: torch's bf16/fp16 matrix-vector
  products take and return half-precision vectors, and with bf16 vectors the iterations stall at a fixed point of
  the rounding ~0.7% away from the marginals (measured).
- ``DenseKernel``: CuPy float64/float32, two cuBLAS matrix-vector products (two reads of E).
- ``CudaFusedKernel`` (``sela.sinkhorn.cuda``): CuPy float16/bfloat16, E read once per iteration.
"""

import os
from typing import Any, Protocol

import numpy as np

SMALL_MATRIX_ENTRIES = 1 << 22  # below this a pass runs on the calling thread
STORAGE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


class StoredKernel(Protocol):
    """What the solver needs from the stored matrix E (rows of this process's shard)."""

    def write_rows(self, start: int, block: Any) -> None:
        """Store rows ``start : start + len(block)`` of E from a (B, K) float32/float64 block."""

    def fused_pass(self, cluster_scaling: Any) -> tuple[Any, Any]:
        """v (K,) float64 -> (u = 1 / (E v) (N,) float64, u^T E (K,) float64)."""


def make_kernel(xp: Any, shape: tuple[int, int], storage: str) -> StoredKernel:
    """The stored kernel for an array namespace and storage type; unsupported pairs raise (no silent fallback)."""
    if xp is np and storage in ("float64", "float32"):
        return BlockedCpuKernel(shape, np.dtype(storage))
    if storage in ("float64", "float32"):
        return DenseKernel(xp, shape, np.dtype(storage))  # cuBLAS gemv
    if xp is np:
        raise ValueError(
            f"storage {storage!r} is not supported on CPU: use float32 (torch's CPU half-precision products take "
            "and return half-precision vectors, which stalls the iterations ~0.7% away from the marginals)"
        )
    from sela.sinkhorn.cuda import CudaFusedKernel  # CuPy: float16 and bfloat16 storage

    return CudaFusedKernel(shape, storage)


class DenseKernel:
    """E as one numpy/CuPy array; a pass is two BLAS gemv (E v, then u^T E)."""

    def __init__(self, xp: Any, shape: tuple[int, int], dtype: np.dtype) -> None:
        self.xp = xp
        self.matrix = xp.empty(shape, dtype=dtype)

    def write_rows(self, start: int, block: Any) -> None:
        self.matrix[start : start + block.shape[0]] = block

    def fused_pass(self, cluster_scaling: Any) -> tuple[Any, Any]:
        work = self.matrix.dtype
        image_scaling = 1.0 / (self.matrix @ cluster_scaling.astype(work)).astype(self.xp.float64)
        column = (image_scaling.astype(work) @ self.matrix).astype(self.xp.float64)
        return image_scaling, column



class BlockedCpuKernel:
    """CPU: E as one numpy array, each row block read once per pass: u_B = 1 / (E_B v), then column += u_B^T E_B
    while E_B is still in the core's cache, on one thread per core over contiguous row ranges (BLAS kept to one
    thread inside each). One read of E per iteration instead of two BLAS gemv's two."""

    def __init__(self, shape: tuple[int, int], dtype: np.dtype, threads: int | None = None) -> None:
        self.matrix = np.empty(shape, dtype=dtype)
        self.threads = threads or len(os.sched_getaffinity(0))
        # 2 MiB blocks: read from memory by the first product, from cache (L2/L3) by the second; measured faster
        # than 512 KiB blocks here (fewer Python-level calls) at equal cache behaviour.
        self.block_rows = max(1, (2 * 1024 * 1024) // (shape[1] * self.matrix.itemsize))

    def write_rows(self, start: int, block: Any) -> None:
        self.matrix[start : start + block.shape[0]] = block

    def _pass_rows(self, first: int, last: int, cluster_scaling: Any, image_scaling: Any) -> Any:
        column = np.zeros(self.matrix.shape[1], dtype=np.float64)
        for start in range(first, last, self.block_rows):
            block = self.matrix[start : min(start + self.block_rows, last)]
            row_sums = image_scaling[start : start + block.shape[0]]
            np.dot(block, cluster_scaling, out=row_sums)
            np.reciprocal(row_sums, out=row_sums)
            column += row_sums @ block
        return column

    def fused_pass(self, cluster_scaling: Any) -> tuple[Any, Any]:
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        num_rows = self.matrix.shape[0]
        work_scaling = cluster_scaling.astype(self.matrix.dtype)
        image_scaling = np.empty(num_rows, dtype=self.matrix.dtype)
        if self.matrix.size < SMALL_MATRIX_ENTRIES or self.threads == 1:
            # Thread start-up and BLAS thread limits cost ~1 ms: not worth it for a matrix that stays in cache.
            column = self._pass_rows(0, num_rows, work_scaling, image_scaling)
            return image_scaling.astype(np.float64), column
        bounds = [num_rows * part // self.threads for part in range(self.threads + 1)]
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(self.threads) as pool:
            parts = pool.map(lambda part: self._pass_rows(bounds[part], bounds[part + 1], work_scaling,
                                                          image_scaling), range(self.threads))
            column = sum(parts)
        return image_scaling.astype(np.float64), column
