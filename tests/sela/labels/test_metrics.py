"""Metrics: Hungarian accuracy is invariant to renaming clusters; NMI/ARI/ACC are 1 on a perfect labelling."""

import numpy as np

from sela.labels.metrics import cluster_sizes, hungarian_accuracy, label_quality


def test_perfect_labelling_under_permutation():
    truth = np.repeat(np.arange(5), 20)
    renamed = np.array([3, 0, 4, 1, 2])[truth]
    quality = label_quality(renamed, [f"class-{t}" for t in truth])
    assert quality == {"nmi": 1.0, "ari": 1.0, "acc": 1.0}


def test_hungarian_accuracy_counts_best_matching():
    truth = np.array([0, 0, 0, 1, 1, 1])
    predicted = np.array([1, 1, 0, 0, 0, 0])
    assert hungarian_accuracy(predicted, truth) == 5 / 6


def test_cluster_sizes_include_empty_clusters():
    assert cluster_sizes(np.array([0, 0, 2]), 4) == [2, 0, 1, 0]
