"""From a trained checkpoint to the exported label set, its metrics and its card."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional

from sela.config import Params
from sela.metrics import cluster_sizes, label_quality
from sela.models import MultiHeadNet
from sela.train import compute_logits, solve_head


@dataclass
class FinalLabels:
    """Balanced labels of every head. labels (num_heads, N) int64, confidence (num_heads, N) float32.

    objective: per head, the SeLa objective -1/N sum_i log p(label_i | x_i) on un-augmented images (lower is a
    better optimum of the same problem); selected_head: the head chosen by ``export.label_head``.
    """

    labels: np.ndarray
    confidence: np.ndarray
    objective: list[float]
    selected_head: int
    diagnostics: list[dict[str, Any]]


def final_labels(model: MultiHeadNet, images: torch.Tensor, params: Params, device: torch.device) -> FinalLabels:
    """Balanced labels of the trained network on un-augmented images (deterministic given the checkpoint).

    images uint8 (N, H, W, 3). With ``label_head: lowest_loss`` the heads, independent labellings trained on one
    backbone, are ranked by the objective they were trained to minimise; ground truth is never consulted.
    """
    logits = compute_logits(model, images, params.train, device, augmented=False)
    results = [solve_head(head_logits, params.train, None) for head_logits in logits]
    objective = [
        float(functional.cross_entropy(head_logits.cpu(), torch.from_numpy(result.labels)))
        for head_logits, result in zip(logits, results, strict=True)
    ]
    choice = params.export.label_head
    selected = int(np.argmin(objective)) if choice == "lowest_loss" else choice
    return FinalLabels(
        labels=np.stack([result.labels for result in results]),
        confidence=np.stack([result.confidence for result in results]),
        objective=objective,
        selected_head=selected,
        diagnostics=[result.diagnostics() for result in results],
    )


def label_metrics(final: FinalLabels, ground_truth: list[str | None], num_clusters: int) -> dict[str, Any]:
    """Metrics of a label set: quality of the selected head when every image has ground truth, sizes per head."""
    head = final.selected_head
    metrics: dict[str, Any] = {
        "num_images": int(final.labels.shape[1]),
        "num_heads": int(final.labels.shape[0]),
        "num_clusters": num_clusters,
        "selected_head": head,
        "head_objective": final.objective,
        "mean_confidence": float(final.confidence[head].mean()),
        "cluster_sizes": [cluster_sizes(head_labels, num_clusters) for head_labels in final.labels],
    }
    if ground_truth and all(truth is not None for truth in ground_truth):
        metrics.update(label_quality(final.labels[head], ground_truth))
    return metrics
