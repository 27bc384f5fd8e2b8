"""Target cluster sizes beyond equipartition: the floor, the damped re-estimation, a planted imbalance found,
and given proportions placed by rank."""

import numpy as np
import pytest

from sela.labels.metrics import label_quality
from sela.sinkhorn.sizes import estimate_sizes, floor_project, ranked_sizes, uniform_sizes
from sela.sinkhorn.solver import sinkhorn_knopp

# CIFAR-10's heavy imbalance of the SeLa paper: 0%, 10%, ..., 90% of the ten classes removed.
PLANTED = np.arange(10, 0, -1) / 55.0


def planted_logits(sizes: np.ndarray, num_images: int, signal: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a network that knows the classes, noisily: class c scores ``signal`` more on cluster c, classes
    drawn in the proportions ``sizes``. Returns (N, K) float32 logits and the (N,) classes."""
    generator = np.random.default_rng(seed)
    classes = np.repeat(np.arange(len(sizes)), np.round(sizes * num_images).astype(int))
    logits = generator.normal(size=(len(classes), len(sizes)))
    logits[np.arange(len(classes)), classes] += signal
    return logits.astype(np.float32), classes


def test_floor_raises_small_sizes_and_keeps_the_ratios_of_the_others():
    projected = floor_project(np.array([0.0, 0.001, 0.2, 0.3, 0.499]), floor=0.5)  # minimum 0.1 each
    assert projected.sum() == pytest.approx(1.0) and projected.min() == pytest.approx(0.1)
    np.testing.assert_allclose(projected[:2], 0.1)
    np.testing.assert_allclose(projected[2:] / projected[2], [1.0, 1.5, 2.495])  # the free entries keep ratios
    np.testing.assert_allclose(floor_project(PLANTED, floor=0.1), PLANTED)  # all above the floor: unchanged


def test_floor_takes_several_rounds_when_scaling_pushes_more_entries_below():
    projected = floor_project(np.array([0.0, 0.0, 0.105, 0.895]), floor=0.8)  # minimum 0.2
    np.testing.assert_allclose(projected, [0.2, 0.2, 0.2, 0.4])


def test_a_cluster_the_network_abandons_keeps_the_floor():
    sizes = uniform_sizes(10)
    counts = np.r_[0, np.full(9, 100)]
    for _ in range(30):
        sizes = estimate_sizes(sizes, counts, floor=0.1, update=0.5)
    assert sizes[0] == pytest.approx(0.01) and sizes.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(sizes[1:], 0.11)


def test_update_damps_the_step_towards_the_counts():
    counts = np.array([300, 100])
    np.testing.assert_allclose(estimate_sizes(uniform_sizes(2), counts, floor=0.1, update=0.5), [0.625, 0.375])
    np.testing.assert_allclose(estimate_sizes(uniform_sizes(2), counts, floor=0.1, update=1.0), [0.75, 0.25])


@pytest.mark.parametrize(("arguments", "message"), [
    ((uniform_sizes(3), np.ones(2), 0.1, 0.5), "same shape"),
    ((uniform_sizes(2), np.ones(2), 0.1, 0.0), "update"),
    ((uniform_sizes(2), np.zeros(2), 0.1, 0.5), "positive total"),
    ((uniform_sizes(2), np.ones(2), 1.0, 0.5), "floor"),
])
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        estimate_sizes(*arguments)


def test_estimated_sizes_recover_a_planted_imbalance_that_equipartition_splits():
    logits, classes = planted_logits(PLANTED, 5500, signal=4.0)
    sizes = uniform_sizes(10)
    for _ in range(12):  # relabels: the network's argmax counts, damped
        counts = np.bincount(logits.argmax(1), minlength=10)
        sizes = estimate_sizes(sizes, counts, floor=0.1, update=0.5)
    np.testing.assert_allclose(sizes, PLANTED, atol=0.012)
    estimated = sinkhorn_knopp(logits, 25.0, stop_rule="marginal", tolerance=0.01, target_sizes=sizes)
    equal = sinkhorn_knopp(logits, 25.0, stop_rule="marginal", tolerance=0.01)
    truth = classes.tolist()
    estimated_acc, equal_acc = label_quality(estimated.labels, truth)["acc"], label_quality(equal.labels, truth)["acc"]
    assert estimated_acc > 0.8 and estimated_acc > equal_acc + 0.1
    np.testing.assert_allclose(np.bincount(estimated.labels, minlength=10) / len(classes), PLANTED, atol=0.02)


def test_given_sizes_go_to_the_clusters_in_the_order_of_the_counts():
    sizes = ranked_sizes(np.array([1.0, 3.0, 6.0]), np.array([50, 10, 40]))
    np.testing.assert_allclose(sizes, [0.6, 0.1, 0.3])
    np.testing.assert_allclose(ranked_sizes(np.array([2.0, 1.0]), np.array([5, 5])), [2 / 3, 1 / 3])  # tie: index
    with pytest.raises(ValueError, match="positive"):
        ranked_sizes(np.array([1.0, 0.0]), np.array([1, 1]))
    with pytest.raises(ValueError, match="same length"):
        ranked_sizes(np.ones(3), np.ones(2))
