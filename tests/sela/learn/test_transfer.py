"""sela.learn.transfer: a fresh network of another architecture learns labels that follow the images."""

import numpy as np
import pytest
import torch

from sela.config import load_params
from sela.labels.evaluate import holdout_mask
from sela.learn.transfer import train_on_labels, transfer_params
from tests.conftest import PROJECT_ROOT


def quadrant_images(count: int = 320, seed: int = 0):
    """Label k = which quadrant is bright: learnable from pixels under crops, jitter and grayscale."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 4
    images = rng.integers(0, 60, size=(count, 16, 16, 3), dtype=np.uint8)
    for index, label in enumerate(labels):
        row, column = divmod(int(label), 2)
        images[index, row * 8:(row + 1) * 8, column * 8:(column + 1) * 8] = 230
    return torch.from_numpy(images), labels


@pytest.mark.slow
def test_labels_that_follow_the_images_transfer_and_shuffled_ones_do_not():
    params = load_params(PROJECT_ROOT / "params.yaml", {
        "transfer.architecture": "small_resnet", "transfer.width": 8, "transfer.epochs": 6, "transfer.batch_size": 32,
        "train.augment.crop_scale_min": 0.8})
    images, labels = quadrant_images()
    heldout = holdout_mask(len(labels), 0.25, seed=0)
    result = train_on_labels(images, labels, heldout, params.train, params.transfer, torch.device("cpu"))
    assert result.heldout_agreement >= 0.9
    assert len(result.history) == 6 and result.history[-1]["loss"] < result.history[0]["loss"]
    shuffled = np.random.default_rng(1).permutation(labels)
    control = train_on_labels(images, shuffled, heldout, params.train, params.transfer, torch.device("cpu"))
    assert control.heldout_agreement < 0.5  # nothing to learn: near chance (0.25)


def test_transfer_network_is_backbone_and_one_linear_head():
    """Plain supervised learning: the labelling network's shared hidden layers and extra heads are not carried over."""
    overrides = {"train.hidden_layers": [64], "train.overclustering.num_heads": 3}
    params = load_params(PROJECT_ROOT / "params.yaml", overrides)
    settings = transfer_params(params.train, params.transfer, num_clusters=6)
    assert settings.hidden_layers == [] and settings.head_sizes == [6]
    assert settings.architecture == params.transfer.architecture != params.train.architecture
