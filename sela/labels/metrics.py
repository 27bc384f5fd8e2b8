"""Label-quality metrics: NMI, ARI, Hungarian-matched accuracy, cluster size histogram."""

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def encode(values: Sequence) -> np.ndarray:
    """Map arbitrary hashable labels (e.g. class-folder names) to 0..C-1, by sorted value. (N,) -> (N,) int64."""
    _, codes = np.unique(np.asarray(values), return_inverse=True)
    return codes.astype(np.int64)


def contingency(predicted: np.ndarray, truth: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Counts (num_predicted_clusters, num_true_classes) of co-occurrence; ``shape`` defaults to max id + 1 each."""
    table = np.zeros(shape or (predicted.max() + 1, truth.max() + 1), dtype=np.int64)
    np.add.at(table, (predicted, truth), 1)
    return table


def hungarian_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes (unmatched clusters count as wrong)."""
    table = contingency(predicted, truth)
    rows, columns = linear_sum_assignment(-table)
    return float(table[rows, columns].sum() / len(truth))


def cluster_sizes(labels: np.ndarray, num_clusters: int) -> list[int]:
    """Images per cluster, (K,)."""
    return np.bincount(labels, minlength=num_clusters).astype(int).tolist()


def label_quality(predicted: np.ndarray, truth: Sequence) -> dict[str, float]:
    """NMI, ARI and ACC of ``predicted`` (N,) against ground truth (N,) of any label type."""
    truth_codes = encode(truth)
    return {
        "nmi": float(normalized_mutual_info_score(truth_codes, predicted)),
        "ari": float(adjusted_rand_score(truth_codes, predicted)),
        "acc": hungarian_accuracy(np.asarray(predicted, dtype=np.int64), truth_codes),
    }
