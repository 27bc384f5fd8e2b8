"""Sinkhorn-Knopp relabelling with equipartition (SeLa, Asano et al. 2020), safe in float32.

The paper's optimal-transport problem: given network outputs P (N images x K clusters) and a sharpness
``lambda``, find Q = diag(u) P^lambda diag(v) whose rows sum to 1/N and columns to 1/K (every cluster gets
N/K images), then label each image with argmax_k Q[i, k].

P^lambda underflows in float32 (and even float64 for confident networks), so this solver works with the
log-kernel ``S = lambda * (z - max_k z)`` (z the logits: the row constant is absorbed by the row scaling)
and Schmitzer's stabilised scaling iterations: the plan is ``exp(S + f + g)`` with log-potentials f (N),
g (K) kept in float64, the kernel ``exp(S + f + g)`` stored in the working dtype, and the cheap multiplicative
scalings u, v folded into f, g (with one exact log-domain iteration) whenever they leave [1/tau, tau] or stop
being finite. One code path serves numpy and CuPy through the array namespace of the input.

Paper symbols are mapped once here: r (cluster scaling) -> v, c (image scaling) -> u, lambda -> sharpness.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

StopRule = Literal["official", "marginal"]
_TINY = {np.dtype(np.float32): np.finfo(np.float32).tiny, np.dtype(np.float64): np.finfo(np.float64).tiny}


def array_namespace(array: Any) -> Any:
    """Return ``cupy`` for CuPy arrays and ``numpy`` for everything else (no CuPy import unless needed)."""
    if type(array).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


@dataclass
class SinkhornResult:
    """Solution of one relabel.

    labels: (N,) int64, argmax per row of the transport plan.
    confidence: (N,) float32, max of each plan row normalised to sum 1.
    log_cluster_potential: (K,) float64, g + log v: pass back as ``warm_start`` to the next relabel.
    Arrays live on the input's device (numpy or CuPy).
    """

    labels: Any
    confidence: Any
    log_cluster_potential: Any
    iterations: int
    converged: bool
    error: float
    stabilisations: int
    column_marginal_error: float = field(default=float("nan"))

    def diagnostics(self) -> dict[str, float | int | bool]:
        """Small JSON-friendly summary for logs and artifacts."""
        return {
            "iterations": self.iterations,
            "converged": self.converged,
            "error": self.error,
            "stabilisations": self.stabilisations,
            "column_marginal_error": self.column_marginal_error,
        }


def _logsumexp(xp: Any, values: Any, axis: int) -> Any:
    peak = xp.max(values, axis=axis, keepdims=True)
    peak = xp.where(xp.isfinite(peak), peak, 0.0)
    return xp.squeeze(peak, axis=axis) + xp.log(xp.sum(xp.exp(values - peak), axis=axis))


def _log_row_update(xp: Any, scores: Any, log_cluster: Any, chunk_rows: int) -> Any:
    """f_i = -log N - logsumexp_k(S_ik + g_k), in row chunks to bound memory. Returns (N,) float64."""
    num_rows = scores.shape[0]
    out = xp.empty(num_rows, dtype=xp.float64)
    g = log_cluster.astype(scores.dtype)
    for start in range(0, num_rows, chunk_rows):
        block = scores[start : start + chunk_rows] + g[None, :]
        out[start : start + chunk_rows] = _logsumexp(xp, block, axis=1)
    return -np.log(num_rows) - out


def _log_column_update(xp: Any, scores: Any, log_image: Any, chunk_rows: int) -> Any:
    """g_k = -log K - logsumexp_i(S_ik + f_i), accumulated over row chunks. Returns (K,) float64."""
    num_rows, num_clusters = scores.shape
    total = xp.full(num_clusters, -np.inf, dtype=xp.float64)
    f = log_image.astype(scores.dtype)
    for start in range(0, num_rows, chunk_rows):
        block = scores[start : start + chunk_rows] + f[start : start + chunk_rows, None]
        total = xp.logaddexp(total, _logsumexp(xp, block, axis=0).astype(xp.float64))
    return -np.log(num_clusters) - total


def _build_kernel(xp: Any, scores: Any, log_image: Any, log_cluster: Any) -> Any:
    """exp(S + f + g) in the scores' dtype."""
    kernel = scores + log_image.astype(scores.dtype)[:, None]
    kernel += log_cluster.astype(scores.dtype)[None, :]
    xp.exp(kernel, out=kernel)
    if xp is np:
        # Subnormals make CPU BLAS 17x slower; GPUs handle them at full speed (and CuPy's boolean-mask
        # assignment overflows past 2^31 elements), so the flush is CPU-only.
        kernel[kernel < _TINY[np.dtype(scores.dtype)]] = 0
    return kernel


def sharpened_scores(logits: Any, sharpness: float, dtype: Any = np.float32) -> Any:
    """S = lambda * (z - max_k z): log of P^lambda up to a per-row constant. (N, K) -> (N, K) in ``dtype``."""
    xp = array_namespace(logits)
    scores = xp.asarray(logits, dtype=dtype)
    scores = scores - xp.max(scores, axis=1, keepdims=True)
    scores *= sharpness
    return scores


def sinkhorn_knopp(
    logits: Any,
    sharpness: float,
    *,
    tolerance: float = 0.1,
    stop_rule: StopRule = "official",
    check_every: int = 10,
    max_iterations: int = 10_000,
    stability_bound: float = 1e6,
    dtype: Any = np.float32,
    warm_start: Any | None = None,
    chunk_rows: int = 65_536,
) -> SinkhornResult:
    """Equipartitioned optimal transport of P^lambda, P = softmax(logits). (N, K) logits -> labels (N,).

    Stopping rules (checked every ``check_every`` iterations, as in the paper's code):
    - ``official``: sum over images of |u_old / u_new - 1| < tolerance (the paper's rule on its image scaling).
    - ``marginal``: max_k |K * column_sum_k - 1| < tolerance (independent of N).
    Non-finite values never count as convergence: the solver stabilises instead, and raises if it cannot.
    ``warm_start`` is a previous result's ``log_cluster_potential`` (K,), which cuts iterations between relabels.
    """
    xp = array_namespace(logits)
    scores = sharpened_scores(logits, sharpness, dtype)
    num_rows, num_clusters = scores.shape
    if num_rows < num_clusters:
        raise ValueError(f"equipartition needs N >= K (images >= clusters), got N={num_rows} < K={num_clusters}")
    work = scores.dtype
    g = xp.zeros(num_clusters, xp.float64) if warm_start is None else xp.asarray(warm_start, dtype=xp.float64)
    f = _log_row_update(xp, scores, g, chunk_rows)
    kernel = _build_kernel(xp, scores, f, g)
    u = xp.ones(num_rows, xp.float64)
    v = xp.ones(num_clusters, xp.float64)
    inv_rows, inv_clusters = 1.0 / num_rows, 1.0 / num_clusters
    error, stabilisations, converged, iteration = float("inf"), 0, False, 0
    while iteration < max_iterations:
        iteration += 1
        checking = iteration % check_every == 0
        if checking and stop_rule == "official":
            log_u_before = f + xp.log(u)
        v_new = inv_clusters / (u.astype(work) @ kernel).astype(xp.float64)
        u_new = inv_rows / (kernel @ v_new.astype(work)).astype(xp.float64)
        finite = bool(xp.all(xp.isfinite(u_new)) & xp.all(xp.isfinite(v_new)))
        bounded = finite and bool(
            (xp.max(u_new) < stability_bound) & (xp.min(u_new) > 1 / stability_bound)
            & (xp.max(v_new) < stability_bound) & (xp.min(v_new) > 1 / stability_bound)
        )
        if bounded:
            u, v = u_new, v_new
        else:
            # Fold the last finite scalings into the potentials and take this iteration in the log domain.
            f, g = f + xp.log(u), g + xp.log(v)
            g = _log_column_update(xp, scores, f, chunk_rows)
            f = _log_row_update(xp, scores, g, chunk_rows)
            kernel = _build_kernel(xp, scores, f, g)
            u, v = xp.ones_like(u), xp.ones_like(v)
            stabilisations += 1
        if not checking:
            continue
        if stop_rule == "official":
            error = float(xp.sum(xp.abs(xp.exp(log_u_before - (f + xp.log(u))) - 1.0)))
        else:
            column = v * (u.astype(work) @ kernel).astype(xp.float64)
            error = float(xp.max(xp.abs(column * num_clusters - 1.0)))
        if not np.isfinite(error):
            raise FloatingPointError(f"Sinkhorn diverged at iteration {iteration}: stopping error is {error}")
        if error < tolerance:
            converged = True
            break
    return _finish(xp, scores, f, g, u, v, kernel, iteration, converged, error, stabilisations, chunk_rows)


def _finish(xp, scores, f, g, u, v, kernel, iterations, converged, error, stabilisations, chunk_rows) -> SinkhornResult:
    work = scores.dtype
    column = v * (u.astype(work) @ kernel).astype(xp.float64)
    log_cluster = g + xp.log(v)
    # Labels and confidence from the row-normalised plan: softmax_k(S_ik + g_k + log v_k).
    labels = xp.empty(scores.shape[0], dtype=xp.int64)
    confidence = xp.empty(scores.shape[0], dtype=xp.float32)
    shift = log_cluster.astype(work)
    for start in range(0, scores.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        block = scores[rows] + shift[None, :]
        labels[rows] = xp.argmax(block, axis=1)
        confidence[rows] = xp.exp(xp.max(block, axis=1) - _logsumexp(xp, block, axis=1))
    return SinkhornResult(
        labels=labels,
        confidence=confidence,
        log_cluster_potential=log_cluster,
        iterations=iterations,
        converged=converged,
        error=error,
        stabilisations=stabilisations,
        column_marginal_error=float(xp.max(xp.abs(column * scores.shape[1] - 1.0))),
    )


def transport_plan(logits: Any, sharpness: float, result: SinkhornResult, dtype: Any = np.float64) -> Any:
    """The full plan Q (N, K) implied by a result, rows re-normalised to 1/N. For tests and small N only."""
    xp = array_namespace(logits)
    scores = sharpened_scores(logits, sharpness, dtype) + xp.asarray(result.log_cluster_potential, dtype=dtype)[None, :]
    scores -= _logsumexp(xp, scores, axis=1)[:, None]
    return xp.exp(scores) / scores.shape[0]
