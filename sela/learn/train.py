"""Self-labelling training: cross-entropy over all heads on labels that Sinkhorn-Knopp re-derives on a schedule.

The loop itself lives in the orchestrator (one task per epoch and per relabel); this module gives it the pieces:
a checkpoint that carries everything between steps, one epoch of SGD, one relabel, and the schedule.
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
from sela.learn.inference import autocast, compute_logits, solve_heads
from sela.learn.models import MultiHeadNet, build_model, model_layout, to_device


@dataclass
class Checkpoint:
    """Everything a training step needs: model, optimiser, current labels (num_heads, N), warm starts, history."""

    model: MultiHeadNet
    optimizer: torch.optim.SGD
    labels: np.ndarray
    epoch: int = 0
    cluster_potentials: list[np.ndarray | None] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    # Per head (N, K) float32: the logits the last epoch computed for each image (``relabel_from: last_epoch``).
    epoch_logits: list[torch.Tensor] | None = None


def relabel_epochs(epochs: int, num_relabels: int, power: float) -> list[int]:
    """Epochs before which to relabel: (i / n)^power spacing over the run, at most once an epoch, always 0."""
    count = min(num_relabels, epochs)
    positions = (np.arange(count) / max(count, 1)) ** power * epochs
    chosen = sorted({int(p) for p in positions})
    # Quadratic spacing collides early; spread the collisions onto the following free epochs.
    while len(chosen) < count:
        free = [epoch for epoch in range(epochs) if epoch not in chosen]
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
    return Checkpoint(model, optimizer, labels, cluster_potentials=[None] * len(params.head_sizes))


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    """Write atomically (temp file + rename) so an interrupted write never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": checkpoint.model.state_dict(),
        "optimizer": checkpoint.optimizer.state_dict(),
        "labels": torch.from_numpy(checkpoint.labels),
        "epoch": checkpoint.epoch,
        "cluster_potentials": [None if p is None else torch.from_numpy(p) for p in checkpoint.cluster_potentials],
        "history": checkpoint.history,
        "epoch_logits": None if checkpoint.epoch_logits is None else [t.cpu() for t in checkpoint.epoch_logits],
    }
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)


def load_checkpoint(path: Path, params: TrainParams, device: torch.device) -> Checkpoint:
    """Inverse of ``save_checkpoint``; the model and optimiser state are moved to ``device``."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    labels = payload["labels"].numpy()
    checkpoint = new_checkpoint(params, labels.shape[1])
    checkpoint.model.load_state_dict(payload["model"])
    checkpoint.model.to(device)
    checkpoint.optimizer.load_state_dict(payload["optimizer"])
    checkpoint.labels = labels
    checkpoint.epoch = payload["epoch"]
    checkpoint.cluster_potentials = [None if p is None else p.numpy() for p in payload["cluster_potentials"]]
    checkpoint.history = payload["history"]
    checkpoint.epoch_logits = payload.get("epoch_logits")
    return checkpoint


def learning_rate(params: TrainParams, epoch: int) -> float:
    """Cosine decay from ``learning_rate`` to zero over the run."""
    return params.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / params.epochs))


def train_epoch(
    checkpoint: Checkpoint, images: torch.Tensor, params: TrainParams, device: torch.device
) -> dict[str, float]:
    """One pass of SGD over augmented ``images`` uint8 (N, H, W, 3), on the CPU or already on ``device``.

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
    epoch_logits = None
    if params.relabel_from == "last_epoch":
        epoch_logits = torch.zeros(images.shape[0], sum(params.head_sizes), device=device)
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
        if epoch_logits is not None:
            epoch_logits[device_index] = logits.detach()
        loss, correct = heads_cross_entropy(logits, batch_targets, params.head_sizes)
        checkpoint.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        checkpoint.optimizer.step()
        total_loss += loss.detach() * len(index)
        total_correct += correct / len(params.head_sizes)
        seen += len(index)
    checkpoint.epoch += 1
    # Images skipped above (a remainder of one) keep zero logits: a uniform row, which Sinkhorn handles.
    # One contiguous (N, K) array a head: what the Sinkhorn kernels read, on a GPU through DLPack.
    checkpoint.epoch_logits = None if epoch_logits is None else [
        head.contiguous() for head in epoch_logits.split(params.head_sizes, dim=1)]
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


def relabel(
    checkpoint: Checkpoint, images: torch.Tensor, params: TrainParams, device: torch.device
) -> dict[str, Any]:
    """Re-derive the labels of every head, or of the next one in turn (``heads_to_relabel``), by warm-started
    Sinkhorn, from the current network or from the last epoch's outputs with ``relabel_from: last_epoch`` (the
    first relabel, before any epoch, makes a pass). Returns diagnostics, one entry per head solved."""
    if params.relabel_from == "last_epoch" and checkpoint.epoch_logits is not None:
        logits, source = checkpoint.epoch_logits, "last_epoch"
    else:
        logits, source = relabel_logits(checkpoint, images, params, device), "fresh_pass"
    per_head = []
    heads = heads_to_relabel(checkpoint, params)
    results = solve_heads([logits[head].to(device) for head in heads], params,
                          [checkpoint.cluster_potentials[head] for head in heads])
    for head, result in zip(heads, results, strict=True):
        changed = float(np.mean(result.labels != checkpoint.labels[head]))
        checkpoint.labels[head] = result.labels
        checkpoint.cluster_potentials[head] = result.log_cluster_potential
        sizes = np.bincount(result.labels, minlength=params.head_sizes[head])
        per_head.append({"head": head, **result.diagnostics(), "changed": changed, "min_size": int(sizes.min()),
                         "max_size": int(sizes.max())})
    summary = {"epoch": checkpoint.epoch, "source": source, "heads": per_head}
    checkpoint.history.append({"kind": "relabel", **summary})
    return summary


def heads_to_relabel(checkpoint: Checkpoint, params: TrainParams) -> list[int]:
    """Every head; with ``relabel_heads: one_in_turn``, every head at the first relabel (they start from random
    labels), then one head per relabel in turn: 0, 1, 2, ..."""
    count = len(params.head_sizes)
    done = sum(entry["kind"] == "relabel" for entry in checkpoint.history)
    if params.relabel_heads == "all" or done == 0:
        return list(range(count))
    return [(done - 1) % count]


def relabel_logits(
    checkpoint: Checkpoint, images: torch.Tensor, params: TrainParams, device: torch.device
) -> list[torch.Tensor]:
    """A pass of the current network over every image, averaged over ``relabel_views`` augmented views."""
    views = params.relabel_views if params.relabel_augmented else 1
    logits: list[torch.Tensor] = []
    for view in range(views):
        # Averaging logits over views = averaging log-probabilities (a per-row constant is irrelevant to Sinkhorn).
        seed = params.seed + checkpoint.epoch + 1_000_003 * view
        view_logits = compute_logits(checkpoint.model, images, params, device, params.relabel_augmented, seed=seed)
        logits = view_logits if not logits else [total + new for total, new in zip(logits, view_logits, strict=True)]
    return [total / views for total in logits]
