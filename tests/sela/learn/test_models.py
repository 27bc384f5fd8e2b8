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


def test_the_subsampled_pointwise_convolution_is_a_strided_one():
    from sela.learn.models import SubsampledPointwise

    torch.manual_seed(0)
    subsampled, strided = SubsampledPointwise(8, 16, 2), torch.nn.Conv2d(8, 16, 1, stride=2, bias=False)
    strided.load_state_dict(subsampled.state_dict())  # the same keys as a Conv2d's: saved networks load
    images = torch.randn(5, 8, 15, 15)
    mine, theirs = images.clone().requires_grad_(), images.clone().requires_grad_()
    torch.testing.assert_close(subsampled(mine), strided(theirs))
    subsampled(mine).square().sum().backward()
    strided(theirs).square().sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad)
    torch.testing.assert_close(subsampled.weight.grad, strided.weight.grad)


# In a child process: the oneDNN defect this guards against aborts the process (heap corruption) rather than raising.
TRAIN_NARROW_RESNET = """
import torch
from sela.learn.models import build_model, model_layout, to_device
model = to_device(build_model("small_resnet", width=8, head_sizes=[3]), torch.device("cpu")).train()
for batch in (43, 3, 65):
    model(model_layout(torch.randn(batch, 3, 16, 16)))[0].logsumexp(1).sum().backward()
print("trained")
"""


def test_a_narrow_small_resnet_trains_channels_last_on_odd_batches():
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", TRAIN_NARROW_RESNET], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[3])
    assert result.returncode == 0 and "trained" in result.stdout, result.stderr[-2000:]
