"""Pieces of self-labelling training: the checkpoint, the relabel schedule, the learning rate, the heads' loss, and an
in-memory epoch on fixed labels (transfer). The loop that streams, relabels and resumes is ``sela.learn.loop``.
"""

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional

from sela.config import TrainParams
from sela.learn.augment import augment
from sela.learn.inference import autocast
from sela.learn.models import MultiHeadNet, build_model, model_layout, to_device
from sela.sinkhorn.sizes import uniform_sizes


@dataclass
class Checkpoint:
    """Everything a training step needs: model, optimiser, current labels (num_heads, N), warm starts, history, and
    each head's target cluster sizes of the relabel (K_h,) summing to 1 (uniform unless ``sinkhorn.cluster_sizes:
    estimated`` moved them; the export's final solve uses the last ones)."""

    model: MultiHeadNet
    optimizer: torch.optim.SGD
    labels: np.ndarray
    epoch: int = 0
    cluster_potentials: list[np.ndarray | None] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    target_sizes: list[np.ndarray] = field(default_factory=list)


def relabel_epochs(epochs: int, num_relabels: int, power: float, first: int = 0) -> list[int]:
    """Epochs before which to relabel: (i / n)^power spacing over epochs ``first`` .. ``epochs - 1``, at most once
    an epoch, always ``first`` (when there is a relabel)."""
    count = min(num_relabels, epochs - first)
    positions = first + (np.arange(count) / max(count, 1)) ** power * (epochs - first)
    chosen = sorted({int(p) for p in positions})
    # Quadratic spacing collides early; spread the collisions onto the following free epochs.
    while len(chosen) < count:
        free = [epoch for epoch in range(first, epochs) if epoch not in chosen]
        chosen = sorted(chosen + free[: count - len(chosen)])
    return chosen


def random_balanced_labels(num_images: int, head_sizes: list[int], seed: int) -> np.ndarray:
    """The paper's start: for a head of K clusters image i gets cluster i mod K, permuted. (num_heads, N) int64."""
    generator = np.random.default_rng(seed)
    return np.stack([generator.permutation(np.arange(num_images) % size) for size in head_sizes]).astype(np.int64)


def new_checkpoint(params: TrainParams, num_images: int) -> Checkpoint:
    """Randomly initialised network, SGD optimiser and random balanced labels."""
    torch.manual_seed(params.seed)
    model = build_model(params.architecture, params.width, params.head_sizes, params.hidden_layers)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=params.learning_rate, momentum=params.momentum, weight_decay=params.weight_decay
    )
    labels = random_balanced_labels(num_images, params.head_sizes, params.seed)
    return Checkpoint(model, optimizer, labels, cluster_potentials=[None] * len(params.head_sizes),
                      target_sizes=[uniform_sizes(size) for size in params.head_sizes])


def save_checkpoint(checkpoint: Checkpoint, path: Path, fingerprint: str | None = None) -> None:
    """Write atomically (temp file + rename) so an interrupted write never leaves a torn checkpoint.

    ``fingerprint`` (``sela.learn.state.fingerprint``) names the run: a later run resumes from this checkpoint only
    under the same one. There is no random state to save: every draw is seeded by (seed, epoch, rank, worker), so
    the epoch is also the stream's position."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": checkpoint.model.state_dict(),
        "optimizer": checkpoint.optimizer.state_dict(),
        "labels": torch.from_numpy(checkpoint.labels),
        "epoch": checkpoint.epoch,
        "cluster_potentials": [None if p is None else torch.from_numpy(p) for p in checkpoint.cluster_potentials],
        "history": checkpoint.history,
        "target_sizes": [torch.from_numpy(sizes) for sizes in checkpoint.target_sizes],
        "fingerprint": fingerprint,
    }
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)


def load_payload(path: Path) -> dict[str, Any]:
    """The saved dictionary of a checkpoint file, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)


def load_checkpoint(path: Path, params: TrainParams, device: torch.device) -> Checkpoint:
    """Inverse of ``save_checkpoint``; the model and optimiser state are moved to ``device``."""
    payload = load_payload(path)
    labels = payload["labels"].numpy()
    checkpoint = new_checkpoint(params, labels.shape[1])
    checkpoint.model.load_state_dict(payload["model"])
    checkpoint.model.to(device)
    checkpoint.optimizer.load_state_dict(payload["optimizer"])
    checkpoint.labels = labels
    checkpoint.epoch = payload["epoch"]
    checkpoint.cluster_potentials = [None if p is None else p.numpy() for p in payload["cluster_potentials"]]
    checkpoint.history = payload["history"]
    checkpoint.target_sizes = saved_target_sizes(payload, params)
    return checkpoint


def saved_target_sizes(payload: dict[str, Any], params: TrainParams) -> list[np.ndarray]:
    """The checkpoint's target sizes per head; a checkpoint written before they were saved was trained with
    equipartition (the only sizes there were), so it gets uniform ones."""
    if "target_sizes" not in payload:
        return [uniform_sizes(size) for size in params.head_sizes]
    return [sizes.numpy().copy() for sizes in payload["target_sizes"]]


def learning_rate(params: TrainParams, epoch: int) -> float:
    """Cosine decay from ``learning_rate`` to zero over the run."""
    return params.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / params.epochs))


def train_epoch(
    checkpoint: Checkpoint, images: torch.Tensor, params: TrainParams, device: torch.device
) -> dict[str, float]:
    """One pass of SGD over augmented ``images`` uint8 (N, H, W, 3) held in memory, on the CPU or on ``device``:
    the transfer stage's supervised epochs on fixed labels. Self-labelling streams instead (``sela.learn.loop``).

    Returns mean loss, accuracy, lr. The network runs in channels-last layout, its forward pass in
    ``params.precision``. On a GPU, augmentation runs there too, and nothing waits for the GPU before the epoch ends
    (running sums stay on the device).
    """
    generator = torch.Generator(device="cpu").manual_seed(params.seed * 100_003 + checkpoint.epoch)
    model = to_device(checkpoint.model, device).train()
    rate = learning_rate(params, checkpoint.epoch)
    for group in checkpoint.optimizer.param_groups:
        group["lr"] = rate
    targets = torch.from_numpy(checkpoint.labels).to(device)
    # The shuffle is drawn on the CPU (same order on any device), then moved once to where the images are.
    order = torch.randperm(images.shape[0], generator=generator).to(images.device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for start in range(0, len(order), params.batch_size):
        index = order[start : start + params.batch_size]
        if len(index) < 2:  # BatchNorm needs two samples; the remainder joins the next epoch's shuffle
            continue
        batch = model_layout(augment(images[index].to(device), params.augment, params.image_size, generator))
        device_index = index.to(device)  # a no-op when the images already live on the device
        batch_targets = targets[:, device_index]
        with autocast(device, params.precision):
            logits = model.joint_logits(batch).float()
        loss, correct = heads_cross_entropy(logits, batch_targets, params.head_sizes)
        checkpoint.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        checkpoint.optimizer.step()
        total_loss += loss.detach() * len(index)
        total_correct += correct / len(params.head_sizes)
        seen += len(index)
    checkpoint.epoch += 1
    summary = {"epoch": checkpoint.epoch, "loss": total_loss.item() / seen, "accuracy": total_correct.item() / seen,
               "lr": rate}
    checkpoint.history.append({"kind": "epoch", **summary})
    return summary


def heads_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, head_sizes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over heads of each head's cross-entropy, and the correct argmaxes summed over heads.

    ``logits`` (B, sum of head_sizes) as ``MultiHeadNet.joint_logits`` gives them; ``targets`` (num_heads, B).
    Consecutive heads of one size are scored in one call, as (B * count, size) rows: per-head calls cost a
    twentieth of a CPU step with ten heads.
    """
    loss, correct, column, head = logits.new_zeros(()), logits.new_zeros((), dtype=torch.long), 0, 0
    for size, group in itertools.groupby(head_sizes):
        count = len(list(group))
        block = logits[:, column : column + count * size].reshape(-1, count, size)
        block_targets = targets[head : head + count].T
        loss = loss + count * functional.cross_entropy(block.reshape(-1, size), block_targets.reshape(-1))
        correct = correct + (block.argmax(-1) == block_targets).sum()
        column, head = column + count * size, head + count
    return loss / len(head_sizes), correct


def heads_to_relabel(checkpoint: Checkpoint, params: TrainParams) -> list[int]:
    """Every head; with ``relabel_heads: one_in_turn``, every head at the first relabel (they start from random
    labels), then one head per relabel in turn: 0, 1, 2, ..."""
    count = len(params.head_sizes)
    done = sum(entry["kind"] == "relabel" for entry in checkpoint.history)
    if params.relabel_heads == "all" or done == 0:
        return list(range(count))
    return [(done - 1) % count]
