"""Sinkhorn relabel benchmark: the paper's float64 update (written out here) against sela.sinkhorn.solver, same matrix.

    python benchmarks/sinkhorn.py --backend numpy --n 200000 --k 1000          # CPU, float32 kernel
    python benchmarks/sinkhorn.py --backend cupy --n 1281167 --k 3000          # one GPU, bfloat16 fused kernel

The matrix follows ../shared/notes/sinkhorn.md: logits = N(0, 1) + signal on one 'true' cluster per image, true
clusters Zipf-imbalanced (weight k^-0.5). Prints for the reference and ours: seconds, iterations, ms/iteration,
label agreement with the reference, max relative column-marginal error, the speed-up in the same run, and the
one-read bound (bytes of the stored kernel / measured read bandwidth). Then a warm-started solve on a slightly
perturbed matrix (as between two relabels) and a peaked matrix (a confident network), on which the paper's update
in float32 fails (there both run a fixed number of iterations: the official rule needs thousands).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sela.sinkhorn.kernels import STORAGE_BYTES  # noqa: E402
from sela.sinkhorn.solver import sinkhorn_knopp  # noqa: E402

DEFAULT_STORAGE = {"numpy": "float32", "cupy": "bfloat16"}


def namespace(backend: str):
    if backend == "cupy":
        import cupy

        return cupy
    return np


def synchronize(xp) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


def free_cached(xp) -> None:
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()


def to_host(array):
    return array.get() if hasattr(array, "get") else np.asarray(array)


def make_logits(xp, num_images: int, num_clusters: int, signal: float, seed: int):
    """(N, K) float32 logits with one Zipf-drawn 'true' cluster per image."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, num_clusters + 1) ** -0.5
    truth = xp.asarray(rng.choice(num_clusters, num_images, p=weights / weights.sum()))
    generator = xp.random.default_rng(seed)
    logits = generator.standard_normal((num_images, num_clusters), dtype=xp.float32)
    logits[xp.arange(num_images), truth] += signal
    return logits


def reference_update(xp, logits, sharpness: float, tolerance: float, dtype=np.float64, max_iterations: int = 100_000):
    """The official SeLa update: P^lambda in ``dtype`` (float64 in the paper), two matrix-vector products an
    iteration, stop when sum_i |c_i / c_i' - 1| < tolerance, checked every 10 iterations.

    Returns (labels, iterations, max relative column-marginal error); raises FloatingPointError on NaN.
    """
    kernel = logits.astype(dtype)
    kernel -= kernel.max(axis=1, keepdims=True)
    xp.exp(kernel, out=kernel)
    kernel /= kernel.sum(axis=1, keepdims=True)
    kernel **= sharpness  # N x K here (the official code keeps K x N; same products)
    num_images, num_clusters = kernel.shape
    r = xp.ones(num_clusters, dtype) / num_clusters
    c = xp.ones(num_images, dtype) / num_images
    error, iteration = np.inf, 0
    with np.errstate(all="ignore"):
        while error > tolerance and iteration < max_iterations:
            r = (1 / num_clusters) / (c @ kernel)
            c_new = (1 / num_images) / (kernel @ r)
            if iteration % 10 == 0:
                error = float(xp.nansum(xp.abs(c / c_new - 1)))
                if not np.isfinite(error) or not bool(xp.all(xp.isfinite(c_new))):
                    raise FloatingPointError(f"reference in {np.dtype(dtype)} diverged at iteration {iteration}")
            c = c_new
            iteration += 1
        # c_i is a row constant: it does not move the argmax. In row chunks: a second N x K float64 temporary would
        # not fit next to the kernel on an 80 GB GPU at ImageNet scale.
        chunk = max(1, 2**28 // (8 * num_clusters))
        labels = xp.concatenate([xp.argmax(kernel[start : start + chunk] * r[None, :], axis=1)
                                 for start in range(0, num_images, chunk)])
        columns = r * (c @ kernel)
    return to_host(labels), iteration, float(xp.max(xp.abs(columns * num_clusters - 1)))


def timed(xp, function):
    synchronize(xp)
    start = time.perf_counter()
    value = function()
    synchronize(xp)
    return value, time.perf_counter() - start


def read_bandwidth(xp, shape: tuple[int, int], storage: str) -> float:
    """Bytes per second of one full read of an N x K matrix in the storage type, by the fastest whole-matrix read
    at hand (multi-threaded BLAS gemv on CPU; on a GPU torch's reduction: CuPy's generic reductions measured
    454 GB/s on an H100, a sixth of its memory's speed). Best of three."""
    if xp is np:
        matrix = np.ones(shape, dtype=storage)
        vector = np.ones(shape[1], dtype=storage)
        read = lambda: matrix @ vector  # noqa: E731
        nbytes = matrix.nbytes
    else:
        import torch

        matrix = torch.ones(shape, dtype=getattr(torch, storage), device="cuda")
        read = lambda: matrix.sum(dtype=torch.float32)  # noqa: E731
        nbytes = matrix.numel() * matrix.element_size()
    read()
    bandwidth = nbytes / min(timed(xp, read)[1] for _ in range(3))
    if xp is not np:
        del matrix, read
        torch.cuda.empty_cache()  # give the probe's memory back before CuPy allocates the solvers' matrices
    return bandwidth


def print_rows(rows: list[tuple[str, float, int, float, float]]) -> None:
    print(f"{'solver':<28}{'seconds':>10}{'iters':>8}{'ms/iter':>10}{'col err':>10}{'agreement':>11}")
    for name, total, iterations, column, agree in rows:
        per_iteration = 1000 * total / max(iterations, 1)
        print(f"{name:<28}{total:>10.3f}{iterations:>8d}{per_iteration:>10.2f}{column:>10.2e}{agree:>11.4f}")


def float32_update(xp, logits, args, label: str, iterations: int = 20) -> None:
    """The paper's update in float32 for a few iterations: NaN, or (peaked P, where P^lambda keeps only the top
    entry of a row) a plan that cannot be balanced."""
    try:
        labels, _, column = reference_update(xp, logits, args.sharpness, 0.0, dtype=np.float32,
                                             max_iterations=iterations)
        sizes = np.bincount(labels, minlength=logits.shape[1])
        print(f"[{label}] paper update in float32 after {iterations} iterations: column-marginal error {column:.2e}, "
              f"cluster sizes {sizes.min()}-{sizes.max()} (balanced: {logits.shape[0] / logits.shape[1]:.0f})")
    except FloatingPointError as error:
        print(f"[{label}] paper update in float32 fails: {error}")
    free_cached(xp)


def compare(xp, logits, args, storage: str, label: str, tolerance: float, max_iterations: int):
    """Reference vs ours on one matrix, each stopped by the official rule at ``tolerance`` or after
    ``max_iterations``; also shows the paper's update in float32. Returns our result."""
    try:
        (ref_labels, ref_iterations, ref_column), ref_seconds = timed(
            xp, lambda: reference_update(xp, logits, args.sharpness, tolerance, max_iterations=max_iterations))
    except FloatingPointError as error:
        ref_labels, ref_seconds = None, float("nan")
        print(f"[{label}] reference float64 failed: {error}")
    free_cached(xp)
    float32_update(xp, logits, args, label)
    free_cached(xp)
    result, seconds = timed(xp, lambda: sinkhorn_knopp(
        logits, args.sharpness, tolerance=max(tolerance, 1e-300), storage=storage, max_iterations=max_iterations))
    labels = to_host(result.labels)
    agreement = float(np.mean(labels == ref_labels)) if ref_labels is not None else float("nan")
    rows = [(f"sela {storage}", seconds, result.iterations, result.column_marginal_error, agreement)]
    if ref_labels is not None:
        rows.insert(0, ("reference float64", ref_seconds, ref_iterations, ref_column, 1.0))
    print(f"[{label}]")
    print_rows(rows)
    print(f"[{label}] speed-up (reference / sela): {ref_seconds / seconds:.2f}x; converged: {result.converged}; "
          f"stabilisations: {result.stabilisations}")
    return result


def warm_start_case(xp, logits, previous_potential, args, storage: str) -> None:
    """Perturb the logits in place (as between two relabels), then solve warm and cold; print both."""
    generator = xp.random.default_rng(args.seed + 1)
    logits += args.perturbation * generator.standard_normal(logits.shape, dtype=xp.float32)

    def solve(warm):
        return sinkhorn_knopp(logits, args.sharpness, tolerance=args.tolerance, storage=storage, warm_start=warm,
                              max_iterations=args.max_iterations)

    warm, warm_seconds = timed(xp, lambda: solve(previous_potential))
    again, cold_seconds = timed(xp, lambda: solve(None))
    agreement = float(np.mean(to_host(warm.labels) == to_host(again.labels)))
    print(f"[perturbed by N(0, {args.perturbation}^2)] warm start: {warm_seconds:.3f} s, {warm.iterations} "
          f"iterations ({1000 * warm_seconds / max(warm.iterations, 1):.2f} ms/iter), col err "
          f"{warm.column_marginal_error:.2e}; cold: {cold_seconds:.3f} s, {again.iterations} iterations; label "
          f"agreement warm vs cold {agreement:.4f}")


def marginal_iteration_ms(xp, logits, args, storage: str, short: int = 10, long: int = 60) -> float:
    """Milliseconds an extra iteration costs: (time of ``long`` - time of ``short`` iterations) / difference, with
    a tolerance that is never met, so the fixed passes (build, labels) cancel out."""
    def run(iterations: int) -> float:
        return timed(xp, lambda: sinkhorn_knopp(logits, args.sharpness, tolerance=1e-30, storage=storage,
                                                 max_iterations=iterations))[1]

    return 1000 * (run(long) - run(short)) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="numpy: CPU; cupy: GPU")
    parser.add_argument("--storage", choices=["float64", "float32", "bfloat16", "float16"], default=None,
                        help="storage type of ours (default: float32 for numpy, bfloat16 for cupy)")
    parser.add_argument("--n", "--images", dest="images", type=int, default=200_000)
    parser.add_argument("--k", "--clusters", dest="clusters", type=int, default=1000)
    parser.add_argument("--signal", type=float, default=3.0)
    parser.add_argument("--cases", default="default,peaked", help="comma-separated: default (with the warm start), "
                        "peaked")
    parser.add_argument("--peaked-signal", type=float, default=8.0, help="signal of the peaked matrix")
    parser.add_argument("--peaked-iterations", type=int, default=300,
                        help="both solvers run exactly this many iterations on the peaked matrix (the official rule "
                        "needs thousands there)")
    parser.add_argument("--perturbation", type=float, default=0.05, help="std of the noise added for the warm solve")
    parser.add_argument("--sharpness", type=float, default=25.0)
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--max-iterations", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    storage = args.storage or DEFAULT_STORAGE[args.backend]
    xp = namespace(args.backend)
    shape = (args.images, args.clusters)
    print(f"backend {args.backend}, storage {storage}, N={args.images}, K={args.clusters}, lambda={args.sharpness}, "
          f"signal={args.signal}, tolerance={args.tolerance} (official rule)")

    bandwidth = read_bandwidth(xp, shape, storage)
    stored_bytes = args.images * args.clusters * STORAGE_BYTES[storage]
    bound_ms = 1000 * stored_bytes / bandwidth
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; stored kernel {stored_bytes / 1e9:.2f} GB; "
          f"one-read bound {bound_ms:.2f} ms/iteration")

    if xp is not np:  # compile every CuPy kernel both solvers use (NVRTC, empty cache) outside the timings
        warm_logits = make_logits(xp, 4 * args.clusters, args.clusters, args.signal, args.seed)
        reference_update(xp, warm_logits, args.sharpness, 0.0, max_iterations=12)
        sinkhorn_knopp(warm_logits, args.sharpness, tolerance=1e-30, storage=storage, max_iterations=12)
        del warm_logits
        free_cached(xp)

    cases = args.cases.split(",")
    if "default" in cases:
        logits = make_logits(xp, args.images, args.clusters, args.signal, args.seed)
        cold = compare(xp, logits, args, storage, "default", args.tolerance, args.max_iterations)
        marginal_ms = marginal_iteration_ms(xp, logits, args, storage)
        print(f"ours per iteration without the fixed passes: {marginal_ms:.2f} ms = {marginal_ms / bound_ms:.2f}x the "
              "one-read bound")
        warm_start_case(xp, logits, cold.log_cluster_potential, args, storage)
        del logits, cold
        free_cached(xp)
    if "peaked" in cases:
        peaked = make_logits(xp, args.images, args.clusters, args.peaked_signal, args.seed + 2)
        compare(xp, peaked, args, storage, f"peaked, signal {args.peaked_signal}, {args.peaked_iterations} iterations",
                0.0, args.peaked_iterations)

if __name__ == "__main__":
    main()
