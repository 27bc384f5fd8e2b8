"""sela.labels.evaluate: kNN and linear probe on features with known structure, head agreement, the whole suite."""

import numpy as np
import pytest
import torch

from sela.config import load_params
from sela.labels.evaluate import (
    evaluate_label_set,
    head_agreement,
    holdout_mask,
    knn_accuracy,
    knn_predict,
    linear_probe_accuracy,
    project,
)
from tests.conftest import PROJECT_ROOT


def clustered_features(count: int = 300, classes: int = 3, noise: float = 0.3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    truth = np.arange(count) % classes
    centres = torch.randn(classes, 256, generator=generator) * 3
    features = centres[torch.from_numpy(truth)] + noise * torch.randn(count, 256, generator=generator)
    return features, [f"class{c}" for c in truth]


def test_knn_on_separated_classes_is_perfect_and_on_noise_is_chance():
    features, truth = clustered_features()
    assert knn_accuracy(project(features, 128), truth, 50, 0.1) == 1.0
    noise = torch.randn(600, 64, generator=torch.Generator().manual_seed(1))
    chance = knn_accuracy(project(noise, 128), [str(i % 3) for i in range(600)], 50, 0.1)
    assert 0.2 < chance < 0.47


def test_leave_one_out_never_votes_for_itself():
    points = project(torch.eye(4), 128)  # orthogonal rows: each one's only perfect match is itself
    predicted = knn_predict(points, np.array([0, 1, 2, 3]), points, neighbours=1, temperature=0.1, exclude_self=True)
    assert not np.any(predicted == np.arange(4))


def test_projection_shape_and_norm():
    projected = project(torch.randn(10, 512), 128)
    assert projected.shape == (10, 128) and torch.allclose(projected.norm(dim=1), torch.ones(10))
    assert project(torch.randn(10, 32), 128).shape == (10, 32)


def test_linear_probe_and_holdout():
    features, truth = clustered_features(noise=1.0)
    heldout = holdout_mask(300, 0.2, seed=0)
    assert heldout.sum() == 60 and np.array_equal(heldout, holdout_mask(300, 0.2, seed=0))
    assert linear_probe_accuracy(features, truth, heldout) == 1.0
    shuffled = list(np.random.default_rng(0).permutation(truth))
    assert linear_probe_accuracy(features, shuffled, heldout) < 0.6


def test_head_agreement_sees_through_renaming():
    labels = np.arange(100) % 5
    heads = np.stack([labels, (labels + 2) % 5, np.random.default_rng(0).integers(0, 5, 100)])
    result = head_agreement(heads, 5)
    assert result["agreement"][0][1] == 1.0 and result["nmi"][0][1] == pytest.approx(1.0)
    assert result["agreement"][0][2] < 0.5 and len(result["nmi"]) == 3


def test_suite_without_ground_truth_reports_only_label_facts():
    features, truth = clustered_features()
    params = load_params(PROJECT_ROOT / "params.yaml").evaluate
    labels = np.arange(300) % 3
    confidence = np.full(300, 0.9, dtype=np.float32)
    full = evaluate_label_set(features, labels[None], labels, confidence, truth, 3, params)
    assert full["acc"] == 1.0 and full["knn_accuracy"] == 1.0 and full["cluster_sizes"] == [100, 100, 100]
    assert sum(full["confidence_histogram"]["counts"]) == 300
    bare = evaluate_label_set(features, labels[None], labels, confidence, None, 3, params)
    assert "knn_accuracy" not in bare and "acc" not in bare and bare["mean_confidence"] == pytest.approx(0.9)
