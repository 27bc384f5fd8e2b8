"""Export: balanced labels of every head, the head chosen by the SeLa objective, metrics of that head."""

import numpy as np
import torch
from torch import nn

from sela.config import load_params
from sela.export import final_labels, label_metrics
from sela.models import MultiHeadNet
from tests.conftest import PROJECT_ROOT

SCALES = (1.0, 5.0, 0.2)  # head 1 is the most decisive about the same partition: the lowest objective


class FirstRow(nn.Module):
    """Features = the first 10 pixels of channel 0's first row: one-hot images give one-hot-like features."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, :10]


def setup(label_head):
    params = load_params(PROJECT_ROOT / "params.yaml", {"train.num_heads": 3, "export.label_head": label_head})
    model = MultiHeadNet(FirstRow(), 10, num_heads=3, num_clusters=10)
    with torch.no_grad():
        for head, scale in zip(model.heads, SCALES, strict=True):
            head.weight.copy_(torch.eye(10) * scale)
            head.bias.zero_()
    classes = np.arange(300) % 10
    images = torch.zeros(300, 16, 16, 3, dtype=torch.uint8)
    images[torch.arange(300), 0, torch.from_numpy(classes), :] = 255
    return params, model, images, [str(c) for c in classes]


def test_lowest_loss_selects_the_most_decisive_head():
    params, model, images, truth = setup("lowest_loss")
    final = final_labels(model, images, params, torch.device("cpu"))
    assert final.labels.shape == (3, 300) and final.confidence.shape == (3, 300)
    assert final.selected_head == 1 and final.objective[1] < min(final.objective[0], final.objective[2])
    assert label_metrics(final, truth, 10)["acc"] == 1.0


def test_fixed_head_is_respected_and_scored():
    params, model, images, truth = setup(2)
    final = final_labels(model, images, params, torch.device("cpu"))
    metrics = label_metrics(final, truth, params.train.num_clusters)
    assert final.selected_head == 2 and metrics["selected_head"] == 2
    assert metrics["acc"] == 1.0 and metrics["cluster_sizes"][2] == [30] * 10
    assert "nmi" not in label_metrics(final, [None] * 300, params.train.num_clusters)
