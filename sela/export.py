"""From a trained checkpoint to the exported label set, its metrics and its card."""

from typing import Any

import numpy as np
import torch

from sela.config import Params
from sela.metrics import cluster_sizes, label_quality
from sela.models import MultiHeadNet
from sela.train import compute_logits, solve_head


def final_labels(
    model: MultiHeadNet, images: torch.Tensor, params: Params, device: torch.device
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Balanced labels of the trained network on un-augmented images (deterministic given the checkpoint).

    images uint8 (N, H, W, 3) -> labels (num_heads, N) int64, confidence (num_heads, N) float32, diagnostics.
    """
    logits = compute_logits(model, images, params.train, device, augmented=False)
    results = [solve_head(head_logits, params.train, None) for head_logits in logits]
    labels = np.stack([result.labels for result in results])
    confidence = np.stack([result.confidence for result in results])
    return labels, confidence, [result.diagnostics() for result in results]


def label_metrics(
    labels: np.ndarray, confidence: np.ndarray, ground_truth: list[str | None], params: Params
) -> dict[str, Any]:
    """Metrics of a label set: quality of the evaluation head when every image has ground truth, sizes per head.

    labels, confidence: (num_heads, N).
    """
    head = params.export.evaluation_head
    metrics: dict[str, Any] = {
        "num_images": int(labels.shape[1]),
        "num_heads": int(labels.shape[0]),
        "num_clusters": params.train.num_clusters,
        "evaluation_head": head,
        "mean_confidence": float(confidence[head].mean()),
        "cluster_sizes": [cluster_sizes(head_labels, params.train.num_clusters) for head_labels in labels],
    }
    if ground_truth and all(truth is not None for truth in ground_truth):
        metrics.update(label_quality(labels[head], ground_truth))
    return metrics
