"""Models: every architecture gives one logits tensor per head, of that head's size."""

import pytest
import torch

from sela.models import build_model


@pytest.mark.parametrize("architecture", ["small_cnn", "small_resnet", "resnet18"])
def test_heads_shapes(architecture):
    model = build_model(architecture, width=8, head_sizes=[7, 7, 7, 12]).eval()
    outputs = model(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 7)] * 3 + [(2, 12)]


def test_unknown_architecture():
    with pytest.raises(ValueError, match="alexnet"):
        build_model("alexnet", 8, [2])
