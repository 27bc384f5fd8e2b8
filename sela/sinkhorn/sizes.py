"""Target cluster sizes r for the relabel (the column marginal of the transport plan), beyond equipartition.

Equipartition (r_k = 1/K, the paper's) assumes every cluster is equally large. ``estimated`` sizes follow the
collection instead: before each relabel after the first, each head's r is moved towards the share of the images the
network itself puts in each cluster (argmax of its logits over the relabel's rows),

    r <- floor_project((1 - update) r + update c / N),   c_k = #{i : argmax_j z_ij = k},

with a floor (every cluster keeps at least ``floor / K``) so that no cluster dies. ``given`` sizes are the
collection's class proportions, known to the user: clusters have no names, so each relabel after the warm-up places
them by rank, the largest proportion on the cluster the network gives the most images. A network trained on labels of
sizes r predicts sizes near r wherever it agrees with its labels; the estimate moves where the images pull the
network away from them (a class cut into two clusters by equipartition, two small classes forced into one). The
counts are integers summed over processes, so every rank computes the same r; it is stored in the checkpoint, so a
resumed run continues with it. Maths and measurements: docs/imbalance.md.
"""

import numpy as np


def uniform_sizes(num_clusters: int) -> np.ndarray:
    """Equipartition: (K,) float64 of 1/K."""
    return np.full(num_clusters, 1.0 / num_clusters)


def floor_project(sizes: np.ndarray, floor: float) -> np.ndarray:
    """``sizes`` normalised to sum to 1 with every entry at least ``floor / K``: entries below the floor are raised
    to it and the others scaled down together (keeping their ratios) to make room, repeated until no scaled entry
    falls below (at most K rounds). (K,) non-negative -> (K,) float64."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if not 0 <= floor < 1:
        raise ValueError(f"floor must lie in [0, 1) (a fraction of N / K), got {floor}")
    if sizes.ndim != 1 or not np.all(np.isfinite(sizes) & (sizes >= 0)) or sizes.sum() <= 0:
        raise ValueError(f"sizes must be a non-negative finite vector with a positive sum, got {sizes.tolist()}")
    minimum = floor / len(sizes)
    sizes = sizes / sizes.sum()
    clamped = np.zeros(len(sizes), dtype=bool)
    for _ in range(len(sizes)):
        free = 1.0 - minimum * clamped.sum()
        result = np.where(clamped, minimum, sizes * free / sizes[~clamped].sum())
        below = ~clamped & (result < minimum)
        if not below.any():
            return result
        clamped |= below
    raise AssertionError("unreachable: every round clamps at least one more entry and floor < 1 leaves room")


def estimate_sizes(previous: np.ndarray, counts: np.ndarray, floor: float, update: float) -> np.ndarray:
    """One re-estimation step of a head's target sizes from the network's argmax counts over all N images.

    previous (K,) float64 summing to 1; counts (K,) integers (the same on every process: summed over them) ->
    (K,) float64 summing to 1, every entry >= floor / K. ``update`` in (0, 1] weighs the new estimate against the
    previous sizes (1: the counts alone)."""
    previous, counts = np.asarray(previous, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if previous.shape != counts.shape:
        raise ValueError(f"previous sizes {previous.shape} and counts {counts.shape} must have the same shape")
    if not 0 < update <= 1:
        raise ValueError(f"update must lie in (0, 1], got {update}")
    if counts.sum() <= 0 or np.any(counts < 0):
        raise ValueError(f"counts must be non-negative with a positive total, got {counts.tolist()}")
    return floor_project((1 - update) * previous + update * counts / counts.sum(), floor)


def ranked_sizes(given: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Given proportions placed on the clusters by rank of the network's argmax counts: the largest proportion to
    the cluster with the most images, and so on (ties: the lower cluster index first).

    given (K,) positive, in any order; counts (K,) non-negative -> (K,) float64 summing to 1."""
    given, counts = np.asarray(given, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if given.shape != counts.shape or given.ndim != 1:
        raise ValueError(f"given sizes {given.shape} and counts {counts.shape} must be vectors of the same length")
    if not np.all(np.isfinite(given) & (given > 0)):
        raise ValueError(f"given sizes must be positive and finite, got {given.tolist()}")
    sizes = np.empty_like(given)
    sizes[np.argsort(-counts, kind="stable")] = np.sort(given / given.sum())[::-1]
    return sizes
