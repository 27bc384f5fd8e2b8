"""From a trained checkpoint to the exported label set, its metrics and its card."""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sela.config import Params
from sela.data.loader import shard_table
from sela.data.shards import read_manifest
from sela.labels.align import alignment
from sela.labels.metrics import cluster_sizes, label_quality
from sela.learn.inference import compute_logits, label_log_probabilities, rule_labels, solve_heads, stream_logits
from sela.learn.models import MultiHeadNet


@dataclass
class FinalLabels:
    """Balanced labels of every head. labels (num_heads, N) int64, confidence (num_heads, N) float32: the network's
    softmax probability of each image's exported label.

    objective: per head, the SeLa objective -1/N sum_i log p(label_i | x_i) on un-augmented images (lower is a
    better optimum of the same problem); selected_head: the head chosen by ``export.label_head``;
    cluster_potentials (num_heads, K) float64: each head's Sinkhorn cluster potential g, in network output order,
    with which ``predict_labels`` labels new images by the label set's own rule; target_sizes (num_heads, K)
    float64: the cluster sizes r (fractions of N) each head was balanced to, the ones its training ended with, in
    network output order.
    """

    labels: np.ndarray
    confidence: np.ndarray
    cluster_potentials: np.ndarray
    target_sizes: np.ndarray
    objective: list[float]
    selected_head: int
    diagnostics: list[dict[str, Any]]


def final_labels(model: MultiHeadNet, images: torch.Tensor, params: Params, device: torch.device,
                 target_sizes: list[np.ndarray]) -> FinalLabels:
    """Balanced labels of the trained network on un-augmented images (deterministic given the checkpoint).

    images uint8 (N, H, W, 3); target_sizes: the checkpoint's ``target_sizes`` (every head's, over-clustering heads
    included, or the label set's heads alone). With ``label_head: lowest_loss`` the heads, independent labellings trained on one
    backbone, are ranked by the objective they were trained to minimise; ground truth is never consulted.
    """
    logits = compute_logits(model, images, params.train, device, augmented=False)
    return final_labels_from_logits(logits, params, target_sizes)


def final_labels_from_logits(logits: list[torch.Tensor], params: Params, target_sizes: list[np.ndarray]) -> FinalLabels:
    """``final_labels`` from the un-augmented logits already computed, one (N, K) tensor per head (the export stage
    streams them: ``sela.learn.inference.stream_logits``). Each head is balanced to the sizes its training ended
    with (``target_sizes``, the checkpoint's): equal sizes here after training to others would undo them."""
    # The label set's heads come first; over-clustering heads only served training.
    logits, sizes = logits[: params.train.num_heads], list(target_sizes)[: params.train.num_heads]
    if len(sizes) != len(logits):
        raise ValueError(f"target sizes for {len(sizes)} heads, but the label set has {len(logits)}: pass the "
                         "checkpoint's target_sizes")
    results = solve_heads(logits, params.train, [None] * len(logits), target_sizes=sizes,
                          size_relaxation=params.train.sinkhorn.relaxation())
    labels = np.stack([result.labels for result in results])
    # Confidence is the network's own probability of the exported label, not the sharpened plan's row maximum
    # (exactly 1.0 for most images once trained): it ranks images, and low values mark the images that balancing
    # moved away from the network's favourite. Its mean log is minus the head's objective.
    log_confidence = label_log_probabilities(logits, labels)
    objective = (-log_confidence.mean(dim=1)).tolist()
    choice = params.export.label_head
    selected = int(np.argmin(objective)) if choice == "lowest_loss" else choice
    return FinalLabels(
        labels=labels,
        confidence=log_confidence.exp().numpy().astype(np.float32),
        cluster_potentials=np.stack([result.log_cluster_potential for result in results]),
        target_sizes=np.stack(sizes),
        objective=objective,
        selected_head=selected,
        diagnostics=[result.diagnostics() for result in results],
    )


def predict_labels(model: MultiHeadNet, images: torch.Tensor, cluster_potentials: np.ndarray, params: Params,
                   device: torch.device) -> np.ndarray:
    """Labels of new images uint8 (M, H, W, 3) -> (num_heads, M) int64, in network output order, by the label
    set's rule: argmax of lambda log p + g, with g (num_heads, K) from ``FinalLabels.cluster_potentials``.

    The images the label set was made from get their exported labels back. Plain argmax of p (the network alone)
    ignores g, the shift that balanced the clusters on the training images.
    """
    outputs = [head.out_features for head in model.heads]
    if cluster_potentials.ndim != 2 or not 0 < len(cluster_potentials) <= len(outputs) or any(
            size != cluster_potentials.shape[1] for size in outputs[: len(cluster_potentials)]):
        raise ValueError(f"cluster potentials of shape {cluster_potentials.shape} do not fit this network's heads "
                         f"(outputs {outputs}): the card and the checkpoint must come from the same label set")
    if images.shape[0] == 0:
        return np.zeros((len(cluster_potentials), 0), dtype=np.int64)
    logits = compute_logits(model, images, params.train, device, augmented=False)
    return rule_labels(logits[: len(cluster_potentials)], cluster_potentials, params.train.sinkhorn)


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
        "target_sizes": np.asarray(final.target_sizes).tolist(),
    }
    if ground_truth and all(truth is not None for truth in ground_truth):
        metrics.update(label_quality(final.labels[head], ground_truth))
    return metrics


def align_to_parent(
    final: FinalLabels, keys: list[str], parent_keys: list[str], parent_labels: list[np.ndarray],
    parent_label: np.ndarray, num_clusters: int,
) -> tuple[FinalLabels, list[dict[str, Any]]]:
    """Rename each head's clusters to agree best with the parent version on the images both contain.

    keys (N,) of ``final``; parent_keys (M,), parent_labels one (M,) array per parent head, parent_label (M,) the
    parent's ``label`` column. The selected head is aligned to the parent's ``label`` column (the ids users join on
    stay put even when another head is selected this time), every other head h to the parent's head h; a head the
    parent lacks keeps its ids. Returns the aligned labels (same partition, same confidences) and per head
    ``output_to_label`` (network output j is exported as label ``output_to_label[j]``) with the agreement reached.
    """
    _, index, parent_index = np.intersect1d(np.asarray(keys), np.asarray(parent_keys), return_indices=True)
    labels, report = final.labels.copy(), []
    for head, head_labels in enumerate(final.labels):
        reference = parent_label if head == final.selected_head else (
            parent_labels[head] if head < len(parent_labels) else None)
        permutation, agreement = np.arange(num_clusters), None
        if reference is not None and len(index):
            reference = np.asarray(reference)[parent_index].astype(np.int64)
            permutation = alignment(head_labels[index], reference, num_clusters)
            labels[head] = permutation[head_labels]
            agreement = float((labels[head][index] == reference).mean())
        report.append({"head": head, "output_to_label": permutation.tolist(), "agreement_with_parent": agreement})
    return replace(final, labels=labels), report


def align_to_parent_table(final: FinalLabels, keys: list[str], parent: pd.DataFrame | None, parent_tag: str | None,
                          num_clusters: int) -> tuple[FinalLabels, dict[str, Any]]:
    """``align_to_parent`` against the parent version's label table (None before the first version). Returns the
    aligned labels and the lineage the card records: ``parent_version`` and ``cluster_id_alignment``."""
    if parent is None:
        return final, {"parent_version": None, "cluster_id_alignment": None}
    heads = sorted(int(name.removeprefix("label_head_")) for name in parent.columns if name.startswith("label_head_"))
    parent_labels = [parent[f"label_head_{head}"].to_numpy() for head in heads]
    aligned, report = align_to_parent(final, keys, parent["key"].tolist(), parent_labels, parent["label"].to_numpy(),
                                      num_clusters)
    return aligned, {"parent_version": parent_tag, "cluster_id_alignment": report}


def parent_label_head(parent: pd.DataFrame | None) -> int | None:
    """The head whose labels a parent table's ``label`` column holds (None without a parent or such a head)."""
    if parent is None:
        return None
    for name in sorted(column for column in parent.columns if column.startswith("label_head_")):
        if np.array_equal(parent[name].to_numpy(), parent["label"].to_numpy()):
            return int(name.removeprefix("label_head_"))
    return None


@dataclass
class ExportedLabelSet:
    """A label set ready to write: labels aligned to the parent, the images' keys (N,), metrics and lineage."""

    final: FinalLabels
    keys: list[str]
    metrics: dict[str, Any]
    lineage: dict[str, Any]


def export_label_set(model: MultiHeadNet, shard_dir: str | Path, params: Params, device: torch.device, workers: int,
                     parent: pd.DataFrame | None, parent_tag: str | None,
                     target_sizes: list[np.ndarray]) -> ExportedLabelSet:
    """The trained network's balanced labels of every image of ``shard_dir``, streamed as training reads them
    (the export holds the logits, never the images), each head balanced to ``target_sizes`` (the checkpoint's),
    cluster ids aligned to the ``parent`` version's table."""
    manifest = read_manifest(shard_dir)
    keys = manifest["key"].tolist()
    truth = [None if pd.isna(value) else str(value) for value in manifest["ground_truth"]]
    _, logits = stream_logits(model, shard_table(shard_dir), params.train, device, workers, augmented=False, seed=0)
    heads = [head.contiguous() for head in torch.from_numpy(logits).split(params.train.head_sizes, dim=1)]
    final = final_labels_from_logits(heads, params, target_sizes)
    kept = parent_label_head(parent) if params.train.start_from == "parent" else None
    if kept is not None and params.export.label_head == "lowest_loss" and kept < len(final.labels):
        # A version trained on from its parent keeps the parent's `label` head: the heads are different
        # partitions (CIFAR-10: 68% of the old images kept their label when the choice moved to another head).
        final = replace(final, selected_head=kept)
    final, lineage = align_to_parent_table(final, keys, parent, parent_tag, params.train.num_clusters)
    return ExportedLabelSet(final, keys, label_metrics(final, truth, params.train.num_clusters), lineage)
