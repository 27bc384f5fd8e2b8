"""Training pieces: relabel schedule, balanced start, loss going down, checkpoint round trip, relabel balance."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sela.config import load_params
from sela.data.shards import read_shards, write_shards
from sela.data.sources import iter_digit_samples
from sela.learn import inference, train
from sela.learn.models import MultiHeadNet
from tests.conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[torch.Tensor, list]:
    """The embedded default, through real shards, 16 px. uint8 (1797, 16, 16, 3)."""
    directory = tmp_path_factory.mktemp("shards")
    write_shards(iter_digit_samples(16), directory, 1000)
    loaded = read_shards(directory, 16)
    return torch.from_numpy(loaded.images), loaded.ground_truth


def small_params(**changes):
    overrides = {"train.width": 8, "train.image_size": 16, "train.num_heads": 2, "train.epochs": 4,
                 "train.num_relabels": 2, **changes}
    return load_params(PROJECT_ROOT / "params.yaml", overrides).train


def test_native_bfloat16_agrees_with_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    expected = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert inference.native_bfloat16(torch.device("cpu")) is expected


@pytest.mark.parametrize(("epochs", "count", "power"), [(100, 40, 2.0), (10, 10, 2.0), (30, 100, 1.0), (400, 100, 2.0)])
def test_relabel_schedule(epochs, count, power):
    epochs_chosen = train.relabel_epochs(epochs, count, power)
    assert epochs_chosen[0] == 0 and len(epochs_chosen) == min(count, epochs)
    assert len(set(epochs_chosen)) == len(epochs_chosen) and max(epochs_chosen) < epochs
    first_half = sum(epoch < epochs / 2 for epoch in epochs_chosen)
    assert first_half >= len(epochs_chosen) / 2  # denser early (or every epoch)


def test_random_start_is_balanced():
    labels = train.random_balanced_labels(1003, [10, 10, 10, 128], seed=0)
    assert labels.shape == (4, 1003)
    for head, size in zip(labels, [10, 10, 10, 128], strict=True):
        sizes = np.bincount(head, minlength=size)
        assert len(sizes) == size and sizes.max() - sizes.min() <= 1
    assert not np.array_equal(labels[0], labels[1])


def test_heads_cross_entropy_is_the_mean_of_each_heads_loss():
    sizes = [10, 10, 128, 10]  # a run of equal heads, another size, then the first size again
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, sum(sizes), generator=generator)
    targets = torch.stack([torch.randint(0, size, (6,), generator=generator) for size in sizes])
    loss, correct = train.heads_cross_entropy(logits, targets, sizes)
    heads = logits.split(sizes, dim=1)
    expected = sum(torch.nn.functional.cross_entropy(h, t) for h, t in zip(heads, targets, strict=True)) / 4
    torch.testing.assert_close(loss, expected)
    assert int(correct) == sum(int((h.argmax(1) == t).sum()) for h, t in zip(heads, targets, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_loss_goes_down_on_fixed_labels_in_either_precision_with_float32_weights(digits, precision):
    images, truth = digits
    params = small_params(**{"train.precision": precision})
    checkpoint = train.new_checkpoint(params, len(images))
    checkpoint.labels[:] = np.array([int(t) for t in truth])[None, :]
    seen = set()
    first_conv = checkpoint.model.backbone.features[0][0]
    first_conv.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    losses = [train.train_epoch(checkpoint, images, params, torch.device("cpu"))["loss"] for _ in range(3)]
    logits = inference.compute_logits(checkpoint.model, images[:10], params, torch.device("cpu"), augmented=False)
    assert losses[-1] < losses[0] * 0.8
    assert seen == {getattr(torch, precision)}
    assert all(parameter.dtype == torch.float32 for parameter in checkpoint.model.parameters())
    assert logits[0].dtype == torch.float32 and torch.isfinite(logits[0]).all()


class InputSides(torch.nn.Module):
    """A backbone that records the side of every batch it sees; features: the channel means."""

    def __init__(self) -> None:
        super().__init__()
        self.sides: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.sides.append(images.shape[-1])
        return images.mean(dim=(2, 3))


def test_unaugmented_views_are_shown_at_eval_image_size_and_training_crops_at_image_size():
    settings = load_params(PROJECT_ROOT / "params.yaml", {"train.image_size": 12, "train.eval_image_size": 15}).train
    backbone = InputSides()
    model = MultiHeadNet(backbone, 3, [4])
    images = torch.zeros(5, 20, 20, 3, dtype=torch.uint8)

    for augmented in (False, True):
        inference.compute_logits(model, images, settings, torch.device("cpu"), augmented=augmented)

    assert backbone.sides == [15, 12]
