"""Training pieces: relabel schedule, balanced start, loss going down, checkpoint round trip, relabel balance."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sela.config import load_params
from sela.data.shards import read_shards, write_shards
from sela.data.sources import iter_digit_samples
from sela.labels import export
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


def test_relabel_is_balanced_and_records_diagnostics(digits):
    images, _ = digits
    params = small_params()
    checkpoint = train.new_checkpoint(params, len(images))
    summary = train.relabel(checkpoint, images, params, torch.device("cpu"))
    assert len(summary["heads"]) == 2
    for head in summary["heads"]:
        # The plan is balanced; argmax labels of a random network's near-uniform plan need not be, but none is empty.
        assert head["converged"] and head["column_marginal_error"] < 1e-3 and head["min_size"] > 0
    assert checkpoint.cluster_potentials[0] is not None and checkpoint.history[-1]["kind"] == "relabel"


@pytest.mark.slow
def test_overclustering_heads_are_trained_relabelled_and_not_exported(digits):
    images, _ = digits
    params = load_params(PROJECT_ROOT / "params.yaml", {
        "train.width": 8, "train.image_size": 16, "train.num_heads": 2, "train.overclustering.num_heads": 2,
        "train.overclustering.num_clusters": 40})
    checkpoint = train.new_checkpoint(params.train, len(images))
    summary = train.relabel(checkpoint, images, params.train, torch.device("cpu"))
    assert all(head["converged"] and head["column_marginal_error"] < 1e-3 for head in summary["heads"])
    assert checkpoint.labels.shape == (4, 1797) and checkpoint.labels[2:].max() == 39
    assert checkpoint.labels[:2].max() == 9
    train.train_epoch(checkpoint, images, params.train, torch.device("cpu"))
    final = export.final_labels(checkpoint.model, images, params, torch.device("cpu"))
    assert final.labels.shape == (2, 1797) and final.labels.max() == 9


def test_checkpoint_round_trip(tmp_path, digits):
    images = digits[0][:256]  # what is saved does not depend on the number of images: a few batches are enough
    params = small_params()
    checkpoint = train.new_checkpoint(params, len(images))
    train.relabel(checkpoint, images, params, torch.device("cpu"))
    train.train_epoch(checkpoint, images, params, torch.device("cpu"))
    train.save_checkpoint(checkpoint, tmp_path / "c.pt")
    loaded = train.load_checkpoint(tmp_path / "c.pt", params, torch.device("cpu"))
    assert loaded.epoch == 1 and np.array_equal(loaded.labels, checkpoint.labels)
    np.testing.assert_array_equal(loaded.cluster_potentials[1], checkpoint.cluster_potentials[1])
    for key, value in checkpoint.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)
    assert not (tmp_path / "c.pt.tmp").exists()


@pytest.mark.slow
def test_relabel_from_last_epoch_reuses_the_epoch_outputs(digits, monkeypatch):
    images, _ = digits
    params = small_params(**{"train.relabel_from": "last_epoch"})
    checkpoint = train.new_checkpoint(params, len(images))
    assert train.relabel(checkpoint, images, params, torch.device("cpu"))["source"] == "fresh_pass"  # no epoch yet
    train.train_epoch(checkpoint, images, params, torch.device("cpu"))
    stored = checkpoint.epoch_logits
    assert [tuple(head.shape) for head in stored] == [(1797, 10)] * 2 and stored[0].abs().sum(1).min() > 0

    def no_pass(*args, **kwargs):
        raise AssertionError("a relabel from the last epoch must not run a forward pass")

    monkeypatch.setattr(train, "compute_logits", no_pass)
    summary = train.relabel(checkpoint, images, params, torch.device("cpu"))
    assert summary["source"] == "last_epoch"
    expected = inference.solve_heads([stored[1]], params, [None])[0].labels
    # Warm-started and cold solves agree on the argmax labels of the same logits up to the stopping tolerance.
    assert np.mean(checkpoint.labels[1] == expected) > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and CuPy for the relabel)")
def test_gpu_epoch_relabel_and_export(digits, tmp_path):
    """The GPU path end to end: augmentation on the device, bfloat16 autocast, epoch logits kept on the device,
    relabel through CuPy (DLPack, no copy), export and a checkpoint that loads on the CPU."""
    images, _ = digits
    device = torch.device("cuda")
    params = load_params(PROJECT_ROOT / "params.yaml", {
        "train.width": 16, "train.image_size": 16, "train.num_heads": 2, "train.overclustering.num_heads": 1,
        "train.overclustering.num_clusters": 40, "train.relabel_from": "last_epoch", "train.precision": "bfloat16"})
    checkpoint = train.new_checkpoint(params.train, len(images))
    on_device = images.to(device)
    assert train.relabel(checkpoint, on_device, params.train, device)["source"] == "fresh_pass"
    losses = []
    for _ in range(3):
        losses.append(train.train_epoch(checkpoint, on_device, params.train, device)["loss"])
        summary = train.relabel(checkpoint, on_device, params.train, device)
    assert np.isfinite(losses).all() and summary["source"] == "last_epoch"
    assert all(stored.is_cuda for stored in checkpoint.epoch_logits)
    for head, size in zip(summary["heads"], params.train.head_sizes, strict=True):
        assert head["converged"] and head["column_marginal_error"] < 1e-3 and head["max_size"] <= 3 * 1797 / size
    final = export.final_labels(checkpoint.model, on_device, params, device)
    assert final.labels.shape == (2, 1797) and final.labels.max() == 9
    train.save_checkpoint(checkpoint, tmp_path / "gpu.pt")
    loaded = train.load_checkpoint(tmp_path / "gpu.pt", params.train, torch.device("cpu"))
    assert not loaded.epoch_logits[0].is_cuda and np.array_equal(loaded.labels, checkpoint.labels)


@pytest.mark.slow
def test_one_head_in_turn_after_a_first_relabel_of_every_head(digits):
    images, _ = digits
    params = small_params(**{"train.num_heads": 3, "train.relabel_heads": "one_in_turn",
                             "train.relabel_from": "last_epoch"})
    checkpoint = train.new_checkpoint(params, len(images))
    first = train.relabel(checkpoint, images, params, torch.device("cpu"))["heads"]
    assert [head["head"] for head in first] == [0, 1, 2]
    solved = []
    for _ in range(4):
        train.train_epoch(checkpoint, images, params, torch.device("cpu"))
        before = checkpoint.labels.copy()
        heads = train.relabel(checkpoint, images, params, torch.device("cpu"))["heads"]
        solved.append(heads[0]["head"])
        untouched = [head for head in range(3) if head != heads[0]["head"]]
        assert len(heads) == 1 and np.array_equal(checkpoint.labels[untouched], before[untouched])
    assert solved == [0, 1, 2, 0]


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
