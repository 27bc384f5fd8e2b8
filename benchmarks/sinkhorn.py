"""Sinkhorn relabel benchmark: the paper's float64 update (written out here) against sela.sinkhorn, same matrix.

    python benchmarks/sinkhorn.py --backend numpy --images 200000 --clusters 1000
    python benchmarks/sinkhorn.py --backend cupy --images 1281167 --clusters 3000   # on a GPU

The matrix follows ../shared/notes/sinkhorn.md: logits = N(0, 1) + signal on one 'true' cluster per image, true
clusters Zipf-imbalanced (weight k^-0.5). Prints seconds, iterations, ms/iteration, label agreement with the
reference, max relative column-marginal error, and the speed-up of ours over the reference in the same run.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sela.sinkhorn import sinkhorn_knopp  # noqa: E402


def namespace(backend: str):
    if backend == "cupy":
        import cupy

        return cupy
    return np


def synchronize(xp) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


def make_logits(xp, num_images: int, num_clusters: int, signal: float, seed: int):
    """(N, K) float32 logits with one Zipf-drawn 'true' cluster per image."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, num_clusters + 1) ** -0.5
    truth = xp.asarray(rng.choice(num_clusters, num_images, p=weights / weights.sum()))
    generator = xp.random.default_rng(seed)
    logits = generator.standard_normal((num_images, num_clusters), dtype=xp.float32)
    logits[xp.arange(num_images), truth] += signal
    return logits


def reference_update(xp, logits, sharpness: float, tolerance: float):
    """The official SeLa update: float64 P^lambda, two matrix-vector products an iteration, checked every 10."""
    kernel = logits.astype(xp.float64)
    kernel -= kernel.max(axis=1, keepdims=True)
    xp.exp(kernel, out=kernel)
    kernel /= kernel.sum(axis=1, keepdims=True)
    kernel **= sharpness  # N x K here (the official code keeps K x N; same products)
    num_images, num_clusters = kernel.shape
    r = xp.ones(num_clusters) / num_clusters
    c = xp.ones(num_images) / num_images
    error, iteration = np.inf, 0
    while error > tolerance:
        r = (1 / num_clusters) / (c @ kernel)
        c_new = (1 / num_images) / (kernel @ r)
        if iteration % 10 == 0:
            error = float(xp.nansum(xp.abs(c / c_new - 1)))
            if not np.isfinite(error):
                raise FloatingPointError("reference diverged")
        c = c_new
        iteration += 1
    labels = xp.argmax(kernel * r[None, :], axis=1)  # c_i is a row constant: it does not move the argmax
    columns = r * (c @ kernel)
    return labels, iteration, float(xp.max(xp.abs(columns * num_clusters - 1)))


def timed(xp, function):
    synchronize(xp)
    start = time.perf_counter()
    value = function()
    synchronize(xp)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--signal", type=float, default=3.0)
    parser.add_argument("--sharpness", type=float, default=25.0)
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    xp = namespace(args.backend)
    logits = make_logits(xp, args.images, args.clusters, args.signal, args.seed)
    print(f"backend {args.backend}, N={args.images}, K={args.clusters}, lambda={args.sharpness}, signal={args.signal}")

    (ref_labels, ref_iterations, ref_column), ref_seconds = timed(
        xp, lambda: reference_update(xp, logits, args.sharpness, args.tolerance))
    ref_labels = ref_labels.get() if xp is not np else ref_labels
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()
    result, seconds = timed(xp, lambda: sinkhorn_knopp(logits, args.sharpness, tolerance=args.tolerance))
    labels = result.labels.get() if xp is not np else result.labels
    agreement = float(np.mean(labels == ref_labels))
    rows = [("reference float64", ref_seconds, ref_iterations, ref_column, 1.0),
            ("sela float32", seconds, result.iterations, result.column_marginal_error, agreement)]
    print(f"{'solver':<20}{'seconds':>10}{'iters':>8}{'ms/iter':>10}{'col err':>10}{'agreement':>11}")
    for name, total, iterations, column, agree in rows:
        per_iteration = 1000 * total / iterations
        print(f"{name:<20}{total:>10.3f}{iterations:>8d}{per_iteration:>10.2f}{column:>10.2e}{agree:>11.4f}")
    print(f"speed-up (reference / sela): {ref_seconds / seconds:.2f}x; stabilisations: {result.stabilisations}")


if __name__ == "__main__":
    main()
