"""Stable cluster ids and label-set diffs: align one labelling to another by optimal matching.

Cluster ids of a self-labelling are arbitrary: a rerun may find the same clusters in another order. Aligning a new
label set to the previous version's ids (Hungarian matching on the contingency table of the images both contain)
keeps ids stable across versions, and a diff compares two versions after the same alignment.
"""

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from sela.labels.metrics import contingency


def alignment(labels: np.ndarray, reference: np.ndarray, num_clusters: int) -> np.ndarray:
    """Permutation (num_clusters,) such that ``aligned = permutation[labels]`` agrees best with ``reference``.

    labels (M,) in 0..num_clusters-1 and reference (M,) of the same images (any non-negative ids). The matching
    maximises the number of images keeping their reference id. Ids stay in 0..num_clusters-1 even when the reference
    has more clusters (ids it has beyond that range cannot be given out) or fewer (unmatched clusters take the free
    ids in order), so the result is always a valid labelling with the same cluster sizes.
    """
    if labels.shape != reference.shape:
        raise ValueError(f"labels {labels.shape} and reference {reference.shape} must describe the same images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_clusters):
        raise ValueError(f"labels must lie in 0..{num_clusters - 1}")
    in_range = reference < num_clusters  # images whose reference id can be given out at all
    table = contingency(labels[in_range], reference[in_range], (num_clusters, num_clusters))
    rows, columns = linear_sum_assignment(table, maximize=True)
    permutation = np.empty(num_clusters, dtype=np.int64)
    permutation[rows] = columns
    return permutation


@dataclass(frozen=True)
class LabelDiff:
    """How labelling B differs from labelling A on their shared images, after aligning B's ids to A's.

    agreement: fraction of shared images with the same aligned id; moved: their count with a different one.
    split: A clusters whose images went (each share >= threshold) to several B clusters; merged: B clusters fed the
    same way by several A clusters, as {cluster: [other side's clusters]}. new / removed: keys only in B / only in A.
    """

    shared: int
    new: int
    removed: int
    agreement: float
    agreement_as_published: float
    moved: int
    nmi: float
    ari: float
    split: dict[int, list[int]]
    merged: dict[int, list[int]]

    def as_dict(self) -> dict:
        """Plain JSON-ready mapping (cluster ids as strings)."""
        values = dict(self.__dict__)
        values["split"] = {str(k): v for k, v in self.split.items()}
        values["merged"] = {str(k): v for k, v in self.merged.items()}
        return values


def _spread(table: np.ndarray, threshold: float) -> dict[int, list[int]]:
    """Rows whose counts put >= threshold of the row total in two or more columns: {row: those columns}."""
    totals = np.maximum(table.sum(axis=1, keepdims=True), 1)
    heavy = table / totals >= threshold
    return {int(row): np.flatnonzero(heavy[row]).tolist() for row in np.flatnonzero(heavy.sum(axis=1) >= 2)}


def diff_labels(
    keys_a: np.ndarray, labels_a: np.ndarray, keys_b: np.ndarray, labels_b: np.ndarray, threshold: float = 0.25
) -> LabelDiff:
    """Compare labelling A (keys_a (N_a,), labels_a (N_a,)) with B (N_b,) on the keys both contain.

    B is aligned to A's ids first (a pure renaming of B's clusters changes nothing here); ``agreement_as_published``
    is the agreement without that renaming, i.e. what a consumer joining the two tables sees.
    """
    shared, index_a, index_b = np.intersect1d(keys_a, keys_b, assume_unique=True, return_indices=True)
    a, b = labels_a[index_a].astype(np.int64), labels_b[index_b].astype(np.int64)
    size = int(max(a.max(initial=-1), b.max(initial=-1)) + 1)
    aligned = alignment(b, a, size)[b] if size else b
    table = contingency(a, aligned, (size, size))
    same = int((a == aligned).sum())
    count = len(shared)
    return LabelDiff(
        shared=count,
        new=int(len(keys_b) - count),
        removed=int(len(keys_a) - count),
        agreement=same / count if count else 1.0,
        agreement_as_published=float((a == b).mean()) if count else 1.0,
        moved=count - same,
        nmi=float(normalized_mutual_info_score(a, b)) if count else 1.0,
        ari=float(adjusted_rand_score(a, b)) if count else 1.0,
        split=_spread(table, threshold),
        merged=_spread(table.T, threshold),
    )
