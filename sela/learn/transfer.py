"""Label transfer: train a fresh network (another architecture) on an exported label set by plain supervision.

If the labels carry the structure of the images rather than quirks of the network that made them, a different
network learns them: its agreement with the labels on images it never trained on measures that.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sela.config import TrainParams, TransferParams
from sela.learn.inference import compute_logits
from sela.learn.models import MultiHeadNet
from sela.learn.train import new_checkpoint, train_epoch


@dataclass
class TransferResult:
    """The trained network, its held-out agreement with the labels, and one summary per epoch."""

    model: MultiHeadNet
    heldout_agreement: float
    history: list[dict[str, Any]]


def transfer_params(train: TrainParams, transfer: TransferParams, num_clusters: int) -> TrainParams:
    """The supervised run's settings: the transfer network and optimiser, the pipeline's augmentations and size."""
    return train.model_copy(update={
        "architecture": transfer.architecture, "width": transfer.width, "num_heads": 1, "num_clusters": num_clusters,
        "hidden_layers": [], "overclustering": train.overclustering.model_copy(update={"num_heads": 0}),
        "epochs": transfer.epochs, "batch_size": transfer.batch_size, "learning_rate": transfer.learning_rate,
        "seed": transfer.seed,
    })


def train_on_labels(images: torch.Tensor, labels: np.ndarray, heldout: np.ndarray, train: TrainParams,
                    transfer: TransferParams, device: torch.device,
                    progress: Callable[[dict[str, Any]], None] | None = None) -> TransferResult:
    """Fit a fresh network to ``labels`` (N,) on the images not held out; score it on the held-out ones.

    images uint8 (N, H, W, 3); heldout (N,) bool. The labels are fixed (no relabelling): plain cross-entropy
    under the pipeline's augmentations, cosine learning rate.
    """
    num_clusters = int(labels.max()) + 1
    settings = transfer_params(train, transfer, num_clusters)
    checkpoint = new_checkpoint(settings, int((~heldout).sum()))
    checkpoint.labels = labels[None, ~heldout].astype(np.int64)
    training_images = images[torch.from_numpy(~heldout)]
    for _ in range(settings.epochs):
        summary = train_epoch(checkpoint, training_images, settings, device)
        if progress:
            progress(summary)
    logits = compute_logits(checkpoint.model, images[torch.from_numpy(heldout)], settings, device, augmented=False)
    predicted = logits[0].argmax(1).cpu().numpy()
    agreement = float((predicted == labels[heldout]).mean()) if heldout.any() else float("nan")
    return TransferResult(checkpoint.model, agreement, checkpoint.history)
