"""Sinkhorn-Knopp relabel: marginals, float32 safety, agreement with the paper's float64 update, warm start."""

import numpy as np
import pytest

from sela.sinkhorn import sinkhorn_knopp, transport_plan
from tests.conftest import to_numpy


def paper_update(logits: np.ndarray, sharpness: float, dtype=np.float64, tolerance: float = 0.1, limit: int = 100_000):
    """The official SeLa update, written out: P^lambda, r = (1/K)/(P c), c = (1/N)/(r^T P), argmax of the plan."""
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    kernel = (probabilities.T ** sharpness).astype(dtype)  # K x N
    num_clusters, num_images = kernel.shape
    r = np.ones((num_clusters, 1), dtype) / num_clusters
    c = np.ones((num_images, 1), dtype) / num_images
    error, iteration = np.inf, 0
    with np.errstate(all="ignore"):
        while error > tolerance and iteration < limit:
            r = (1 / num_clusters) / (kernel @ c)
            c_new = (1 / num_images) / (r.T @ kernel).T
            if iteration % 10 == 0:
                error = np.nansum(np.abs(c / c_new - 1))
            c = c_new
            iteration += 1
        plan = kernel * c.ravel()[None, :] * r
    return plan.T.argmax(1), plan.T, iteration


def noisy_logits(num_images: int, num_clusters: int, signal: float, seed: int = 0) -> np.ndarray:
    """Logits with one 'true' cluster per image (imbalanced, Zipf-like) plus Gaussian noise. (N, K) float32."""
    generator = np.random.default_rng(seed)
    weights = np.arange(1, num_clusters + 1) ** -0.5
    truth = generator.choice(num_clusters, num_images, p=weights / weights.sum())
    logits = generator.normal(size=(num_images, num_clusters))
    logits[np.arange(num_images), truth] += signal
    return logits.astype(np.float32)


@pytest.mark.parametrize("storage", ["float32", "float64"])
def test_plan_has_equipartition_marginals(xp, storage):
    logits = noisy_logits(3000, 20, signal=2.0)
    result = sinkhorn_knopp(xp.asarray(logits), 25.0, storage=storage, stop_rule="marginal", tolerance=1e-4)
    plan = to_numpy(transport_plan(xp.asarray(logits), 25.0, result))
    assert result.converged
    np.testing.assert_allclose(plan.sum(axis=1), 1 / 3000, rtol=1e-6)
    np.testing.assert_allclose(plan.sum(axis=0), 1 / 20, rtol=2e-4)
    sizes = np.bincount(to_numpy(result.labels), minlength=20)
    assert sizes.min() > 0.8 * 150 and sizes.max() < 1.2 * 150  # balanced although the truth is Zipf-imbalanced


def test_labels_equal_the_paper_update_in_float64(xp):
    logits = noisy_logits(2000, 10, signal=1.0, seed=1)
    reference, _, _ = paper_update(logits, 25.0)
    ours = sinkhorn_knopp(xp.asarray(logits), 25.0, storage="float32", tolerance=1e-3)
    agreement = np.mean(to_numpy(ours.labels) == reference)
    assert ours.converged and agreement >= 0.999


def test_peaked_logits_break_the_paper_update_in_float32_but_not_ours(xp):
    logits = noisy_logits(4000, 50, signal=12.0, seed=2) * 3  # a confident network: S spans hundreds
    labels32, plan32, _ = paper_update(logits, 25.0, dtype=np.float32, limit=200)
    assert not np.isfinite(plan32).all() or len(np.unique(labels32)) < 50  # the paper's float32 update fails
    result = sinkhorn_knopp(xp.asarray(logits), 25.0, storage="float32", stop_rule="marginal", tolerance=1e-2)
    labels = to_numpy(result.labels)
    assert result.converged and result.stabilisations > 0
    assert np.isfinite(to_numpy(result.confidence)).all()
    assert np.bincount(labels, minlength=50).min() > 0  # no empty cluster from underflow
    reference, plan64, _ = paper_update(logits.astype(np.float64), 25.0, tolerance=1e-2)
    if np.isfinite(plan64).all():
        assert np.mean(labels == reference) >= 0.99


def test_warm_start_needs_fewer_iterations(xp):
    logits = noisy_logits(5000, 30, signal=2.5, seed=3)
    cold = sinkhorn_knopp(xp.asarray(logits), 25.0, stop_rule="marginal", tolerance=1e-3)
    perturbed = logits + np.random.default_rng(4).normal(scale=0.02, size=logits.shape).astype(np.float32)
    warm = sinkhorn_knopp(xp.asarray(perturbed), 25.0, stop_rule="marginal", tolerance=1e-3,
                          warm_start=cold.log_cluster_potential)
    again = sinkhorn_knopp(xp.asarray(perturbed), 25.0, stop_rule="marginal", tolerance=1e-3)
    assert warm.converged and warm.iterations < again.iterations
    assert np.mean(to_numpy(warm.labels) == to_numpy(again.labels)) >= 0.999


def test_rejects_fewer_images_than_clusters():
    with pytest.raises(ValueError, match="N=5 < K=10"):
        sinkhorn_knopp(np.zeros((5, 10), np.float32), 25.0)


def test_unconverged_result_says_so():
    result = sinkhorn_knopp(noisy_logits(1000, 10, 3.0), 25.0, tolerance=1e-12, max_iterations=20)
    assert not result.converged and result.iterations == 20
