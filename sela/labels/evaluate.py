"""Evaluation of a label set and of the network behind it.

With ground truth: ACC (Hungarian), NMI, ARI of the labels (``sela.labels.metrics``); weighted kNN on the learned features
as in the SeLa paper (k = 50, temperature 0.1, features projected to 128 dimensions); a linear probe. Always:
cluster sizes, confidence distribution, and agreement between heads (pairwise NMI and aligned agreement).
"""

from typing import Any

import numpy as np
import torch
import torch.nn.functional as functional
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import normalized_mutual_info_score

from sela.labels.align import alignment
from sela.learn.augment import center
from sela.config import EvaluateParams
from sela.labels.metrics import cluster_sizes, encode, label_quality
from sela.learn.models import MultiHeadNet, model_layout, to_device


@torch.no_grad()
def compute_features(model: MultiHeadNet, images: torch.Tensor, image_size: int, device: torch.device,
                     batch_size: int = 512) -> torch.Tensor:
    """Backbone features of un-augmented images uint8 (N, H, W, 3) -> float32 (N, feature_size) on the CPU."""
    model = to_device(model, device).eval()
    parts = [model.backbone(model_layout(center(images[start:start + batch_size], image_size).to(device))).float().cpu()
             for start in range(0, images.shape[0], batch_size)]
    return torch.cat(parts)


def project(features: torch.Tensor, dimensions: int, seed: int = 0) -> torch.Tensor:
    """(N, D) -> (N, min(D, dimensions)) by a fixed random Gaussian projection, then L2-normalised rows."""
    if features.shape[1] > dimensions:
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(features.shape[1], dimensions, generator=generator) / dimensions**0.5
        features = features @ matrix
    return functional.normalize(features, dim=1)


def knn_predict(reference: torch.Tensor, reference_classes: np.ndarray, queries: torch.Tensor, neighbours: int,
                temperature: float, exclude_self: bool = False, batch_size: int = 1024) -> np.ndarray:
    """Weighted kNN vote (weights exp(cosine / temperature)) of L2-normalised rows.

    reference (M, D) with classes (M,) int in 0..C-1, queries (Q, D) -> predicted classes (Q,). ``exclude_self``:
    queries are the reference rows themselves (leave-one-out), so each row's own match is dropped.
    """
    num_classes = int(reference_classes.max()) + 1
    classes = torch.from_numpy(reference_classes.astype(np.int64))
    predictions = []
    for start in range(0, queries.shape[0], batch_size):
        similarity = queries[start:start + batch_size] @ reference.T
        if exclude_self:
            rows = torch.arange(similarity.shape[0])
            similarity[rows, rows + start] = -float("inf")
        values, index = similarity.topk(min(neighbours, reference.shape[0] - exclude_self), dim=1)
        votes = torch.zeros(similarity.shape[0], num_classes)
        votes.scatter_add_(1, classes[index], (values / temperature).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions).numpy()


def knn_accuracy(features: torch.Tensor, truth: list, neighbours: int, temperature: float) -> float:
    """Leave-one-out weighted kNN accuracy of projected features (N, D) against ground truth (N,)."""
    codes = encode(truth)
    predicted = knn_predict(features, codes, features, neighbours, temperature, exclude_self=True)
    return float((predicted == codes).mean())


def holdout_mask(count: int, fraction: float, seed: int) -> np.ndarray:
    """(count,) bool, True for a fixed random ``fraction`` of the rows: the held-out part."""
    mask = np.zeros(count, dtype=bool)
    mask[np.random.default_rng(seed).permutation(count)[: int(round(fraction * count))]] = True
    return mask


def linear_probe_accuracy(features: torch.Tensor, truth: list, heldout: np.ndarray) -> float:
    """Accuracy on the held-out rows of a logistic regression fitted on the others (standardised features)."""
    codes = encode(truth)
    values = features.numpy().astype(np.float64)
    mean, scale = values[~heldout].mean(0), values[~heldout].std(0) + 1e-6
    values = (values - mean) / scale
    probe = LogisticRegression(max_iter=500, C=1.0)
    probe.fit(values[~heldout], codes[~heldout])
    return float((probe.predict(values[heldout]) == codes[heldout]).mean())


def head_agreement(labels: np.ndarray, num_clusters: int) -> dict[str, list[list[float]]]:
    """Pairwise between heads, labels (num_heads, N): NMI and the agreement after aligning ids (H, H) each."""
    heads = labels.shape[0]
    nmi = np.eye(heads)
    agreement = np.eye(heads)
    for first in range(heads):
        for second in range(first + 1, heads):
            nmi[first, second] = nmi[second, first] = normalized_mutual_info_score(labels[first], labels[second])
            aligned = alignment(labels[second], labels[first], num_clusters)[labels[second]]
            agreement[first, second] = agreement[second, first] = float((aligned == labels[first]).mean())
    return {"nmi": nmi.round(6).tolist(), "agreement": agreement.round(6).tolist()}


def confidence_histogram(confidence: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    """Counts of confidence (N,) in ``bins`` equal bins over [0, 1]."""
    counts, edges = np.histogram(confidence, bins=bins, range=(0.0, 1.0))
    return {"edges": edges.round(6).tolist(), "counts": counts.astype(int).tolist()}


def evaluate_label_set(features: torch.Tensor, head_labels: np.ndarray, label: np.ndarray, confidence: np.ndarray,
                       ground_truth: list | None, num_clusters: int, params: EvaluateParams) -> dict[str, Any]:
    """Every metric of the evaluation suite for one label set.

    features (N, D) backbone features; head_labels (H, N); label and confidence (N,) of the `label` column;
    ground_truth (N,) or None. Ground-truth metrics (ACC/NMI/ARI, kNN, linear probe) only when every image has one.
    """
    result: dict[str, Any] = {
        "num_images": int(label.shape[0]),
        "num_clusters": num_clusters,
        "cluster_sizes": cluster_sizes(label, num_clusters),
        "mean_confidence": float(confidence.mean()),
        "confidence_histogram": confidence_histogram(confidence),
        "head_agreement": head_agreement(head_labels, num_clusters),
    }
    if ground_truth and all(truth is not None for truth in ground_truth):
        projected = project(features, params.knn_dimensions)
        heldout = holdout_mask(len(ground_truth), params.holdout_fraction, seed=0)
        result.update(label_quality(label, ground_truth))
        result["knn_accuracy"] = knn_accuracy(projected, ground_truth, params.knn_neighbours, params.knn_temperature)
        result["linear_probe_accuracy"] = linear_probe_accuracy(features, ground_truth, heldout)
    return result
