"""Models: every architecture gives one logits tensor per head, of that head's size."""

import pytest
import torch

from sela.learn.models import build_model


@pytest.mark.parametrize("architecture", ["small_cnn", "small_resnet", "resnet18"])
def test_heads_shapes(architecture):
    model = build_model(architecture, width=8, head_sizes=[7, 7, 7, 12]).eval()
    outputs = model(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 7)] * 3 + [(2, 12)]


def test_unknown_architecture():
    with pytest.raises(ValueError, match="alexnet"):
        build_model("alexnet", 8, [2])


def test_hidden_layers_sit_between_backbone_and_heads():
    model = build_model("small_cnn", width=8, head_sizes=[7, 12], hidden_sizes=[64, 48]).eval()
    images = torch.randn(3, 3, 16, 16)
    outputs = model(images)
    assert [tuple(o.shape) for o in outputs] == [(3, 7), (3, 12)]
    assert [head.in_features for head in model.heads] == [48, 48]
    # The heads read the hidden layers' output; the features (kNN, probe) stay the backbone's 32-d ones.
    features = model.backbone(images)
    assert features.shape == (3, 32)
    shared = model.hidden(features)
    assert shared.shape == (3, 48) and bool((shared >= 0).all())
    for output, head in zip(outputs, model.heads, strict=True):  # one fused product, each head's own weights
        torch.testing.assert_close(output, head(shared))


def test_no_hidden_layers_keeps_the_state_dict_of_earlier_checkpoints():
    plain = build_model("small_cnn", width=8, head_sizes=[7])
    assert not any(key.startswith("hidden.") for key in plain.state_dict())
    assert {key for key in build_model("small_cnn", 8, [7], [16]).state_dict() if key.startswith("hidden.")} == {
        "hidden.0.weight", "hidden.1.weight", "hidden.1.bias", "hidden.1.running_mean", "hidden.1.running_var",
        "hidden.1.num_batches_tracked"}
