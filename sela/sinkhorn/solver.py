"""Sinkhorn-Knopp relabelling to given cluster sizes (SeLa, Asano et al. 2020), safe without float64.

The paper's optimal-transport problem: given network outputs P (N images x K clusters) and a sharpness
``lambda``, find Q = diag(u) P^lambda diag(v) whose rows sum to 1/N and columns to r_k (cluster k gets N r_k
images), then label each image with argmax_k Q[i, k]. The paper's equipartition is r_k = 1/K, the default; a
non-uniform target r (a K-vector on the simplex, ``target_sizes``) serves collections whose clusters are not
equally large (``sela.sinkhorn.sizes``).

Relaxed sizes (``size_relaxation`` rho in (0, 1)) replace the hard column constraint by a KL penalty (unbalanced
optimal transport, Chizat et al. 2018): rows still sum to 1/N, and the column update becomes
v = (N r / column sums)^(1 - rho), so that at the solution every cluster's size is c_k = N r_k exp(-rho / (1 - rho)
g_k) (g the returned log cluster potential): the plan gives a cluster more images than N r_k where the images pull
towards it (g_k < 0), anchored to r by a penalty that grows as rho falls. rho = 0 is the hard constraint.

P^lambda underflows in float32 (and even float64 for confident networks), so the solver works with the
log-kernel ``S = lambda * (z - max_k z)`` (z the logits: a row constant is absorbed by the row scaling) and
Schmitzer's stabilised scaling iterations. Log-potentials f (N), g (K) stay in float64; the stored kernel is
E = exp(S + f + g) with f chosen so that every row of E sums to 1 (entries in [0, 1], so float32, bfloat16 and
float16 storage all keep their range). An iteration is one *fused pass* over E: u = 1 / (E v) and the column sums
u^T E together (``sela.sinkhorn.kernels``), then v = N r / column sums: the paper's alternating update.
When u or v leaves [1/tau, tau] or stops being finite, they are folded into f, g and the iteration is taken
exactly in the log domain from the logits, which also rebuilds E.

Rows may be sharded over processes: every N-vector stays local and one all-reduce per iteration (the column
sums; with the out-of-range count and the stopping-rule partial sum where the iteration checks them) keeps all
ranks on the same iterates, so every rank takes the same stop and stabilisation decisions; labels are returned
for the local rows.

One code path serves numpy and CuPy through the array namespace of the input. Paper symbols are mapped once
here: r (cluster scaling) -> v, c (image scaling) -> u, lambda -> sharpness.
"""

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from sela.sinkhorn.kernels import STORAGE_BYTES, StoredKernel, make_kernel

StopRule = Literal["official", "marginal"]
Storage = Literal["float64", "float32", "bfloat16", "float16"]
RangeChecks = Literal["every_iteration", "at_checks"]
# Scalings u, v may drift to [1/tau, tau] before they are folded into the potentials. E's entries lie in [0, 1]
# and an entry flushed to 0 (below 1.2e-38) could matter only once scaled by tau^2: 1e15 keeps that below 1e-8 of a
# row for the float32-range types and spares the rebuilds (two exp passes each) that an imbalanced cold start needs
# with a smaller tau; float16's range (subnormals from 6e-8) needs a small tau.
STABILITY_BOUND = {"float64": 1e50, "float32": 1e15, "bfloat16": 1e15, "float16": 1e2}
_TINY = {np.dtype(np.float32): np.finfo(np.float32).tiny, np.dtype(np.float64): np.finfo(np.float64).tiny}


def array_namespace(array: Any) -> Any:
    """Return ``cupy`` for CuPy arrays and ``numpy`` for everything else (no CuPy import unless needed)."""
    if type(array).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


@dataclass
class SinkhornResult:
    """Solution of one relabel (of this process's rows when sharded).

    labels: (N,) int64, argmax per row of the transport plan.
    column_marginal_error: max_k |column_sum_k / r_k - 1| of the returned plan (computed exactly from the logits;
        K column_sum_k - 1 under equipartition; with relaxed sizes, how far the sizes moved from r by design).
    cluster_sizes: (K,) float64, the returned plan's column sums (fractions of the images, summing to 1).
    log_cluster_potential: (K,) float64, g + log v: pass back as ``warm_start`` to the next relabel.
    Arrays live on the input's device (numpy or CuPy).
    """

    labels: Any
    log_cluster_potential: Any
    iterations: int
    converged: bool
    error: float
    stabilisations: int
    rollbacks: int = 0
    column_marginal_error: float = field(default=float("nan"))
    cluster_sizes: Any = None

    def diagnostics(self) -> dict[str, float | int | bool]:
        """Small JSON-friendly summary for logs and artifacts."""
        return {
            "iterations": self.iterations,
            "converged": self.converged,
            "error": self.error,
            "stabilisations": self.stabilisations,
            "rollbacks": self.rollbacks,
            "column_marginal_error": self.column_marginal_error,
        }


# --- processes -----------------------------------------------------------------------------------------------


class Communicator(Protocol):
    """Reductions over the processes that each hold a shard of the rows."""

    def all_reduce_sum(self, vector: Any) -> Any:
        """Element-wise sum over processes of a float64 vector (returns a new vector)."""

    def all_reduce_max(self, vector: Any) -> Any:
        """Element-wise max over processes of a float64 vector (returns a new vector)."""


class SingleProcess:
    """The unsharded case: every reduction is the identity."""

    def all_reduce_sum(self, vector: Any) -> Any:
        return vector

    def all_reduce_max(self, vector: Any) -> Any:
        return vector


class TorchDistributed:
    """Reductions over an initialised ``torch.distributed`` group: gloo with numpy vectors, NCCL with CuPy ones.

    The caller owns the process group (``init_process_group``); CuPy vectors go through DLPack without a copy to
    the host.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def _reduce(self, vector: Any, operation: str) -> Any:
        import torch
        import torch.distributed as distributed

        xp = array_namespace(vector)
        copy = xp.array(vector, dtype=xp.float64)  # a fresh buffer: the reduction is in place
        tensor = torch.from_numpy(copy) if xp is np else torch.from_dlpack(copy)
        distributed.all_reduce(tensor, op=getattr(distributed.ReduceOp, operation), group=self.group)
        return copy

    def all_reduce_sum(self, vector: Any) -> Any:
        return self._reduce(vector, "SUM")

    def all_reduce_max(self, vector: Any) -> Any:
        return self._reduce(vector, "MAX")


# --- memory --------------------------------------------------------------------------------------------------


class SinkhornMemoryError(MemoryError):
    """The relabel's stored kernel and working buffers do not fit in the memory available on the device."""


def required_bytes(num_rows: int, num_clusters: int, storage: str, *, chunk_rows: int) -> int:
    """Bytes a solve allocates for N x K rows: the stored kernel E (N x K x bytes per entry), two
    float32 (float64 for float64 storage) row-chunk buffers and eight float64 N-vectors. The logits are the
    caller's and not counted."""
    block_bytes = 8 if storage == "float64" else 4
    kernel = num_rows * num_clusters * STORAGE_BYTES[storage]
    chunks = 2 * min(chunk_rows, num_rows) * num_clusters * block_bytes
    return kernel + chunks + 8 * 8 * num_rows


def available_bytes(xp: Any) -> int:
    """Free memory where ``xp`` allocates: the current GPU's free memory plus CuPy's cached blocks, or the host's
    ``MemAvailable``."""
    if xp is not np:
        free, _ = xp.cuda.Device().mem_info
        return int(free + xp.get_default_memory_pool().free_bytes())
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ensure_memory_fits(num_rows: int, num_clusters: int, storage: str, needed: int, available: int) -> None:
    """Raise ``SinkhornMemoryError`` naming N, K, storage, needed and available bytes if ``needed > available``."""
    if needed > available:
        raise SinkhornMemoryError(
            f"Sinkhorn relabel of N={num_rows} x K={num_clusters} in {storage} needs {needed / 2**30:.2f} GiB "
            f"({needed} bytes) but {available / 2**30:.2f} GiB ({available} bytes) are available: use a smaller "
            "storage type (bfloat16 halves float32), shard the rows over more devices, or free memory"
        )


# --- row-chunked passes over the logits ----------------------------------------------------------------------


class ScoreBlocks:
    """Row chunks of S = lambda (z - max_k z), computed from the logits on demand (S is never stored whole).

    The chunks share one buffer (sized to stay in cache on CPU): a consumer must copy what it keeps.
    """

    def __init__(self, xp: Any, logits: Any, sharpness: float, dtype: np.dtype, chunk_rows: int) -> None:
        self.xp, self.logits, self.sharpness, self.dtype, self.chunk_rows = xp, logits, sharpness, dtype, chunk_rows

    def __iter__(self):
        """Yields (start row, (B, K) block of S in ``dtype``)."""
        xp = self.xp
        buffer = xp.empty((self.chunk_rows, self.logits.shape[1]), dtype=self.dtype)
        for start in range(0, self.logits.shape[0], self.chunk_rows):
            rows = self.logits[start : start + self.chunk_rows]
            block = buffer[: rows.shape[0]]
            block[...] = rows
            block -= xp.max(block, axis=1, keepdims=True)
            block *= self.sharpness
            yield start, block


def score_dtype(storage: Storage) -> np.dtype:
    """Type the scores S are computed in for a kernel stored as ``storage``: float64 for float64, else float32."""
    return np.dtype(np.float64 if storage == "float64" else np.float32)


def default_chunk_rows(xp: Any, num_clusters: int, itemsize: int) -> int:
    """Rows per chunk of the passes over the logits: 4 MiB blocks on CPU (cache-resident, so the ~10 element-wise
    steps of a pass cost one read from memory), 256 MiB on a GPU (few launches)."""
    chunk_bytes = 4 * 2**20 if xp is np else 256 * 2**20
    return max(1, chunk_bytes // (num_clusters * itemsize))


def _row_normalised_build(
    scores: ScoreBlocks, kernel: StoredKernel, log_cluster: Any, flush_subnormals: bool
) -> tuple[Any, Any]:
    """Exact log-domain row update for g and the rebuild of E = exp(S + f + g) (rows summing to 1).

    Returns f (N,) float64 and this shard's column sums of E (K,) float64.
    """
    xp = scores.xp
    num_rows, num_clusters = scores.logits.shape
    log_image = xp.empty(num_rows, dtype=xp.float64)
    column = xp.zeros(num_clusters, dtype=xp.float64)
    shift = log_cluster.astype(scores.dtype)
    for start, block in scores:
        block += shift[None, :]
        peak = xp.max(block, axis=1, keepdims=True)
        block -= peak
        xp.exp(block, out=block)
        total = xp.sum(block, axis=1, keepdims=True)
        block *= 1.0 / total
        if flush_subnormals:
            block[block < _TINY[block.dtype]] = 0  # subnormals make CPU products up to 17x slower
        kernel.write_rows(start, block)
        column += xp.sum(block, axis=0, dtype=xp.float64)
        log_image[start : start + block.shape[0]] = -(peak[:, 0] + xp.log(total[:, 0])).astype(xp.float64)
    return log_image, column


def _log_column_update(scores: ScoreBlocks, log_image: Any, log_target: Any, communicator: Communicator,
                       exponent: float) -> Any:
    """g_k = e (log(N r_k) - logsumexp_i(S_ik + f_i)) over all shards (two reductions); ``log_target`` (K,) is
    log(N r), ``exponent`` e is 1 - rho (1: hard sizes). Returns (K,) float64."""
    xp = scores.xp
    num_clusters = scores.logits.shape[1]
    peaks, sums = [], []
    shift = log_image.astype(scores.dtype)
    for start, block in scores:
        block += shift[start : start + block.shape[0], None]
        peak = xp.max(block, axis=0)
        peaks.append(peak.astype(xp.float64))
        block -= xp.where(xp.isfinite(peak), peak, 0)[None, :]
        sums.append(xp.sum(xp.exp(block, out=block), axis=0, dtype=xp.float64))
    local_peak = xp.full(num_clusters, -np.inf)
    for chunk_peak in peaks:
        local_peak = xp.maximum(local_peak, chunk_peak)
    peak = communicator.all_reduce_max(local_peak)
    safe_peak = xp.where(xp.isfinite(peak), peak, 0.0)
    total = xp.zeros(num_clusters, dtype=xp.float64)
    for part, chunk_peak in zip(sums, peaks, strict=True):
        chunk_peak = xp.where(xp.isfinite(chunk_peak), chunk_peak, 0.0)
        total += part * xp.exp(chunk_peak - safe_peak)  # rescale each chunk's sum to the global peak
    total = communicator.all_reduce_sum(total)
    return exponent * (log_target - (safe_peak + xp.log(total)))


def _labels_and_marginals(scores: ScoreBlocks, log_cluster: Any) -> tuple[Any, Any]:
    """The returned plan, row by row from the logits (full precision whatever the storage): softmax_k(S_ik + g_k).

    Returns labels (N,) int64 (argmax per row) and this shard's column sums of the row-normalised plan (K,)
    float64, for an exact column-marginal error.
    """
    xp = scores.xp
    labels = xp.empty(scores.logits.shape[0], dtype=xp.int64)
    column = xp.zeros(scores.logits.shape[1], dtype=xp.float64)
    shift = log_cluster.astype(scores.dtype)
    for start, block in scores:
        rows = slice(start, start + block.shape[0])
        block += shift[None, :]
        labels[rows] = xp.argmax(block, axis=1)
        block -= xp.max(block, axis=1, keepdims=True)
        xp.exp(block, out=block)
        total = xp.sum(block, axis=1, keepdims=True)
        block *= 1.0 / total
        column += xp.sum(block, axis=0, dtype=xp.float64)
    return labels, column


# --- the solver ----------------------------------------------------------------------------------------------


def _out_of_range(xp: Any, scaling: Any, bound: float) -> Any:
    """Count (0-d array) of entries that are not finite or lie outside [1/bound, bound]."""
    return xp.sum(~(xp.isfinite(scaling) & (scaling < bound) & (scaling > 1.0 / bound)))


def _column_scaling(xp: Any, target: Any, column: Any, log_cluster: Any, exponent: float) -> Any:
    """The column update v (K,) from this iterate's column sums u^T E (K,): N r / column under hard sizes; with
    relaxed ones the KL-penalised update (N r e^g / column)^e / e^g, e = 1 - rho (the full scaling e^g v is what
    the penalty acts on; g is folded into E). An empty column gives inf: out of range, so the step stabilises."""
    with np.errstate(divide="ignore", over="ignore"):
        if exponent == 1.0:
            return target / column
        return (target / column) ** exponent * xp.exp((exponent - 1.0) * log_cluster)


def _log_domain_step(
    scores: ScoreBlocks, kernel: StoredKernel, log_image: Any, log_target: Any, communicator: Communicator,
    flush_subnormals: bool, exponent: float,
) -> tuple[Any, Any, Any]:
    """One exact iteration in the log domain (stabilisation): the last in-range scalings are already folded into
    ``log_image``; column update, then the row-normalised rebuild of E. Returns f (N,), g (K,), global column sums."""
    log_cluster = _log_column_update(scores, log_image, log_target, communicator, exponent)
    log_image, column = _row_normalised_build(scores, kernel, log_cluster, flush_subnormals)
    return log_image, log_cluster, communicator.all_reduce_sum(column)


def sinkhorn_knopp(
    logits: Any,
    sharpness: float,
    *,
    tolerance: float = 0.1,
    stop_rule: StopRule = "official",
    check_every: int = 10,
    max_iterations: int = 10_000,
    stability_bound: float | None = None,
    storage: Storage = "float32",
    warm_start: Any | None = None,
    chunk_rows: int | None = None,
    communicator: Communicator | None = None,
    memory_available: int | None = None,
    range_checks: RangeChecks | None = None,
    target_sizes: Any | None = None,
    size_relaxation: float = 0.0,
) -> SinkhornResult:
    """Optimal transport of P^lambda, P = softmax(logits), to cluster sizes r. (N, K) logits -> labels (N,).

    ``target_sizes``: r (K,), positive and summing to 1 (cluster k gets N r_k images: the column sums of Q); None
    is equipartition, r_k = 1/K. It must be the same on every process of a sharded solve. ``size_relaxation``
    rho in [0, 1): 0 holds the columns to N r exactly; above 0 the sizes may move from r where the images pull
    (module docstring), and every relabel starts again from r, so they cannot drift over many relabels.

    Stopping rules (checked after iterations 1, 1 + ``check_every``, 1 + 2 ``check_every``, ... as in the paper's
    code):
    - ``official``: sum over images of |u_old / u_new - 1| < tolerance (the paper's rule on its image scaling). A
      sum over the N images (about N x the mean column error): a fixed tolerance tightens as N grows, and at
      lambda 25 on a confident network it is not met within thousands of iterations (docs/sinkhorn.md, stopping rule).
    - ``marginal``: max_k |column_sum_k / r_k - 1| < tolerance (independent of N): every cluster's size within
      ``tolerance`` of its target N r_k, relatively (N / K under equipartition). params.yaml's default (0.01).
      With relaxed sizes the same number generalised, max_k |v_k / v'_k - 1| (v' the next column update): how
      far the columns are from the sizes the penalty settles them at.
    Non-finite values never count as convergence: the solver stabilises instead, and raises if it cannot.
    ``storage``: type of the stored kernel E (float64/float32 on CPU; float64/float32/float16/bfloat16 on CuPy,
    float16 and bfloat16 through the fused CUDA kernel). ``warm_start``: a previous result's
    ``log_cluster_potential`` (K,), which cuts iterations between relabels. ``communicator``: reductions over
    processes holding the other rows (``TorchDistributed``); ``logits`` are then this process's rows.
    ``memory_available``: bytes free for the solve (measured on the device when None); too little raises
    ``SinkhornMemoryError`` before anything large is allocated. ``range_checks``: when the scalings are checked
    against [1 / ``stability_bound``, ``stability_bound``] (default: ``every_iteration`` with numpy, ``at_checks``
    with CuPy). ``at_checks`` runs the iterations between stopping-rule checks without waiting for the device (on
    a GPU, small matrices are bound by those waits and by kernel launches, not by reading E); when a check finds
    the scalings out of range, the solver goes back to the last checked iterate and redoes the stretch checking
    every iteration (``rollbacks`` counts the redone stretches). Both settings then give the same iterates, unless
    the scalings leave the range and come back within one stretch: ``at_checks`` keeps such a stretch (E is
    unchanged, every iterate finite).
    """
    xp = array_namespace(logits)
    communicator = communicator or SingleProcess()
    local_rows, num_clusters = logits.shape
    num_rows = int(communicator.all_reduce_sum(xp.asarray([float(local_rows)]))[0])
    _check_inputs(xp, logits, num_rows, check_every, warm_start)
    if not 0 <= size_relaxation < 1:
        raise ValueError(f"size_relaxation must lie in [0, 1) (0: hard sizes), got {size_relaxation}")
    exponent = 1.0 - size_relaxation
    sizes = _target_sizes(target_sizes, num_clusters)
    block_dtype = score_dtype(storage)
    chunk_rows = min(chunk_rows or default_chunk_rows(xp, num_clusters, block_dtype.itemsize), max(local_rows, 1))
    stability_bound = stability_bound or STABILITY_BOUND[storage]
    needed = required_bytes(local_rows, num_clusters, storage, chunk_rows=chunk_rows)
    ensure_memory_fits(local_rows, num_clusters, storage, needed,
                       available_bytes(xp) if memory_available is None else memory_available)
    kernel = make_kernel(xp, (local_rows, num_clusters), storage)
    scores = ScoreBlocks(xp, logits, sharpness, block_dtype, chunk_rows)
    flush = xp is np
    target = xp.asarray(num_rows * sizes)  # (K,) column sums of the row-normalised plan: N r
    log_target = xp.log(target)

    g = xp.zeros(num_clusters, xp.float64) if warm_start is None else xp.asarray(warm_start, dtype=xp.float64)
    f, column = _row_normalised_build(scores, kernel, g, flush)
    column = communicator.all_reduce_sum(column)
    u, v = xp.ones(local_rows, xp.float64), xp.ones(num_clusters, xp.float64)
    error, stabilisations, rollbacks, converged, iteration = float("inf"), 0, 0, False, 0
    checks_every_iteration = (range_checks or ("every_iteration" if xp is np else "at_checks")) == "every_iteration"
    careful = checks_every_iteration
    verified = (iteration, u, v, column)  # the last iterate whose scalings were seen in range
    while iteration < max_iterations:
        iteration += 1
        # Iterations 1, 11, 21, ...: the paper's schedule; and the last, so that no iterate is returned unchecked.
        checking = iteration % check_every == 1 % check_every or iteration == max_iterations
        official_check = checking and stop_rule == "official"
        v_next = _column_scaling(xp, target, column, g, exponent)
        # A careful iteration tests v before the pass (v is identical on every rank): a pass over an out-of-range
        # v would only be thrown away.
        accepted = not careful or bool(_out_of_range(xp, v_next, stability_bound) == 0)
        if accepted:
            u_next, local_column = kernel.fused_pass(v_next)
            if careful or checking:
                partial = xp.sum(xp.abs(u / u_next - 1.0)) if official_check else xp.zeros(())
                # Counting v's entries on every rank only scales a count that is tested against 0.
                count = _out_of_range(xp, u_next, stability_bound) + _out_of_range(xp, v_next, stability_bound)
                reduced = communicator.all_reduce_sum(
                    xp.concatenate([local_column, xp.stack([count.astype(xp.float64), partial])]))
                accepted = bool(reduced[num_clusters] == 0)  # the one wait for the device in a stretch
            else:
                reduced = communicator.all_reduce_sum(local_column)  # verified at the next check
        if accepted:
            u, v, column = u_next, v_next, reduced[:num_clusters]
            if careful or checking:
                verified, official_error = (iteration, u, v, column), reduced[num_clusters + 1]
            if checking:
                careful = checks_every_iteration  # a check passed: a careful replay (below) is over
        elif not careful:
            # The scalings left the range somewhere since the last verified iterate (E is unchanged since then):
            # go back to it and redo the stretch checking every iteration, which stabilises where it must.
            (iteration, u, v, column), careful = verified, True
            rollbacks += 1
            continue
        else:
            log_image_before = f + xp.log(u)
            f, g, column = _log_domain_step(scores, kernel, log_image_before, log_target, communicator, flush,
                                            exponent)
            u, v = xp.ones_like(u), xp.ones_like(v)
            stabilisations += 1
            verified, careful = (iteration, u, v, column), checks_every_iteration
            if official_check:
                official_error = communicator.all_reduce_sum(xp.sum(xp.abs(xp.exp(log_image_before - f) - 1.0))[None])
        if not checking:
            continue
        if stop_rule == "official":
            error = float(xp.squeeze(official_error))
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                error = float(xp.max(xp.abs(v / _column_scaling(xp, target, column, g, exponent) - 1.0)))
        if not np.isfinite(error):
            raise FloatingPointError(f"Sinkhorn diverged at iteration {iteration}: stopping error is {error}")
        if error < tolerance:
            converged = True
            break
    log_cluster = g + xp.log(v)
    labels, plan_column = _labels_and_marginals(scores, log_cluster)
    plan_column = communicator.all_reduce_sum(plan_column)
    return SinkhornResult(
        labels=labels,
        log_cluster_potential=log_cluster,
        iterations=iteration,
        converged=converged,
        error=error,
        stabilisations=stabilisations,
        rollbacks=rollbacks,
        column_marginal_error=float(xp.max(xp.abs(plan_column / target - 1.0))),
        cluster_sizes=plan_column / num_rows,
    )


def _target_sizes(target_sizes: Any | None, num_clusters: int) -> np.ndarray:
    """r (K,) float64 on the host: uniform for None; else checked (positive, finite, summing to 1 within 1e-6) and
    normalised exactly. A size of 0 would make the cluster's scaling infinite: use a floor (``sela.sinkhorn.sizes``)."""
    if target_sizes is None:
        return np.full(num_clusters, 1.0 / num_clusters)
    sizes = np.asarray(target_sizes.get() if hasattr(target_sizes, "get") else target_sizes, dtype=np.float64)
    if sizes.shape != (num_clusters,):
        raise ValueError(f"target_sizes must have shape ({num_clusters},), got {sizes.shape}")
    if not np.all(np.isfinite(sizes) & (sizes > 0)):
        raise ValueError(f"target_sizes must be finite and positive (a cluster of size 0 cannot be reached), got "
                         f"{sizes.tolist()}")
    if abs(sizes.sum() - 1.0) > 1e-6:
        raise ValueError(f"target_sizes must sum to 1 (fractions of the images), got a sum of {sizes.sum()!r}")
    return sizes / sizes.sum()


def _check_inputs(xp: Any, logits: Any, num_rows: int, check_every: int, warm_start: Any | None) -> None:
    """Refuse what would fail later under a misleading name (a division by zero, "Sinkhorn diverged")."""
    num_clusters = logits.shape[1]
    if not 1 <= num_clusters <= num_rows:
        raise ValueError(f"equipartition needs 1 <= K <= N (clusters, images), got K={num_clusters}, N={num_rows}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if warm_start is not None and np.shape(warm_start) != (num_clusters,):
        raise ValueError(f"warm_start must be a log cluster potential of shape ({num_clusters},), got "
                         f"{np.shape(warm_start)}")
    # NaN or +inf: a network that diverged (-inf is a probability of 0, which the plan handles).
    bad = int(xp.sum(~(logits < xp.inf)))
    if bad:
        raise ValueError(f"logits hold {bad} NaN or +inf values: the network's outputs are not usable")


def assign_labels(logits: Any, sharpness: float, log_cluster_potential: Any, storage: Storage = "float32") -> Any:
    """Labels of new rows under a solved plan's cluster potential: argmax_k lambda (z_ik - max z_i) + g_k.

    logits (M, K), log_cluster_potential (K,) of a ``SinkhornResult`` -> labels (M,) int64. The rule the solver
    labels its own rows by, computed the same way (the same rows give the same labels, bit for bit): new images are
    labelled as the balanced label set would have labelled them, without re-balancing them among themselves.
    """
    xp = array_namespace(logits)
    block_dtype = score_dtype(storage)
    chunk_rows = min(default_chunk_rows(xp, logits.shape[1], block_dtype.itemsize), max(logits.shape[0], 1))
    scores = ScoreBlocks(xp, logits, sharpness, block_dtype, chunk_rows)
    return _labels_and_marginals(scores, xp.asarray(log_cluster_potential, dtype=xp.float64))[0]


def sharpened_scores(logits: Any, sharpness: float, dtype: Any = np.float32) -> Any:
    """S = lambda * (z - max_k z): log of P^lambda up to a per-row constant. (N, K) -> (N, K) in ``dtype``."""
    xp = array_namespace(logits)
    scores = xp.asarray(logits, dtype=dtype)
    scores = scores - xp.max(scores, axis=1, keepdims=True)
    scores *= sharpness
    return scores


def _logsumexp(xp: Any, values: Any, axis: int) -> Any:
    peak = xp.max(values, axis=axis, keepdims=True)
    peak = xp.where(xp.isfinite(peak), peak, 0.0)
    return xp.squeeze(peak, axis=axis) + xp.log(xp.sum(xp.exp(values - peak), axis=axis))


def transport_plan(logits: Any, sharpness: float, result: SinkhornResult, dtype: Any = np.float64) -> Any:
    """The full plan Q (N, K) implied by a result, rows re-normalised to 1/N. For tests and small N only."""
    xp = array_namespace(logits)
    scores = sharpened_scores(logits, sharpness, dtype) + xp.asarray(result.log_cluster_potential, dtype=dtype)[None, :]
    scores -= _logsumexp(xp, scores, axis=1)[:, None]
    return xp.exp(scores) / scores.shape[0]
