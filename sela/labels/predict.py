"""Label new images with a published label set's own rule: its network, its cluster potentials, its ids.

A label set labels its own images by ``argmax_k lambda log p_k(x) + g_k`` (the Sinkhorn plan's rows; ``g`` the
cluster potentials of the export's solve, recorded in the card as ``cluster_potentials``, per head in network output
order) and publishes network output j as label ``output_to_label[j]`` (the card's ``cluster_id_alignment``, which
renames a version's clusters to agree with its parent's; absent for a first version: the identity). New images get
the same rule and the same ids, without being re-balanced among themselves; a version's own images get their
published labels back.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as functional

from sela.config import Params, ShardParams
from sela.data.loader import shard_table
from sela.data.shards import read_manifest
from sela.labels.label_set import label_table
from sela.learn.inference import logit_batches, rule_labels
from sela.learn.models import MultiHeadNet

# The manifest's columns a prediction carries, to join it with anything else known about the files.
MANIFEST_COLUMNS = ("source_path", "sha256", "width", "height")


@dataclass(frozen=True)
class LabelRule:
    """How a label set labels an image. cluster_potentials (num_heads, K) float64, network output order;
    output_to_label (num_heads, K) int64: network output j of head h is published as ``output_to_label[h, j]``;
    selected_head: the head of the ``label`` column."""

    cluster_potentials: np.ndarray
    output_to_label: np.ndarray
    selected_head: int

    def __post_init__(self) -> None:
        potentials, renaming = np.asarray(self.cluster_potentials), np.asarray(self.output_to_label)
        if potentials.ndim != 2 or renaming.shape != potentials.shape:
            raise ValueError(f"cluster potentials {potentials.shape} and output_to_label {renaming.shape} must both "
                             "be (num_heads, num_clusters)")
        for head, row in enumerate(renaming):
            if sorted(row.tolist()) != list(range(len(row))):
                raise ValueError(f"output_to_label of head {head} is not a permutation: {row.tolist()}")
        if not 0 <= self.selected_head < len(potentials):
            raise ValueError(f"selected head {self.selected_head} out of range for {len(potentials)} heads")

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> "LabelRule":
        """The rule a label card records: ``cluster_potentials``, ``cluster_id_alignment`` (None: ids as the
        network numbers them) and ``metrics.selected_head``."""
        if "cluster_potentials" not in card:
            raise ValueError("the card has no cluster_potentials: its version predates them and cannot label new "
                             "images by its rule")
        potentials = np.asarray(card["cluster_potentials"], dtype=np.float64)
        selected_head = int(card["metrics"]["selected_head"])
        alignment = card.get("cluster_id_alignment")
        if alignment is None:
            return cls.unaligned(potentials, selected_head)
        renaming = np.array([entry["output_to_label"] for entry in sorted(alignment, key=lambda entry: entry["head"])])
        return cls(potentials, renaming.astype(np.int64), selected_head)

    @classmethod
    def unaligned(cls, cluster_potentials: np.ndarray, selected_head: int) -> "LabelRule":
        """A rule publishing ids as the network numbers them (a first version: no parent to align to)."""
        potentials = np.asarray(cluster_potentials, dtype=np.float64)
        return cls(potentials, np.tile(np.arange(potentials.shape[-1]), (len(potentials), 1)), selected_head)

    @property
    def num_heads(self) -> int:
        return len(self.cluster_potentials)


@dataclass
class Prediction:
    """Per head and image (num_heads, M), in manifest order, ids as published: ``labels`` by the label set's rule,
    ``confidence`` the network's probability of that label (float32, as the label set's own), and
    ``network_labels`` the network's plain argmax (ignores the potentials that balanced the label set)."""

    labels: np.ndarray
    confidence: np.ndarray
    network_labels: np.ndarray


def predict_shards(model: MultiHeadNet, shard_dir: str | Path, rule: LabelRule, params: Params,
                   device: torch.device, workers: int,
                   progress: Callable[[int], None] | None = None) -> Prediction:
    """Label every image of ``shard_dir`` (ingested with the version's ``shard`` params) by ``rule``: one streamed
    pass of the un-augmented view the export labels with (``eval_image_size``), a batch at a time: memory holds a
    batch of images and (num_heads, M) labels, never the images nor their logits. ``workers`` loader processes;
    ``progress`` is called with the number of images of each batch done."""
    sizes = [head.out_features for head in model.heads]
    num_heads, clusters = rule.cluster_potentials.shape
    if num_heads > len(sizes) or any(size != clusters for size in sizes[:num_heads]):
        raise ValueError(f"cluster potentials of shape {rule.cluster_potentials.shape} do not fit this network's "
                         f"heads (outputs {sizes}): the card and the checkpoint must come from the same label set")
    table = shard_table(shard_dir)
    count = table.num_images
    labels = np.zeros((num_heads, count), dtype=np.int64)
    network = np.zeros((num_heads, count), dtype=np.int64)
    confidence = np.zeros((num_heads, count), dtype=np.float32)
    for rows, logits in logit_batches(model, table, params.train, device, workers, augmented=False, seed=0):
        heads = [torch.from_numpy(head) for head in np.split(logits, np.cumsum(sizes)[:-1], axis=1)[:num_heads]]
        outputs = rule_labels(heads, rule.cluster_potentials, params.train.sinkhorn)
        for head, (head_logits, head_outputs) in enumerate(zip(heads, outputs, strict=True)):
            chosen = torch.from_numpy(head_outputs)[:, None]
            confidence[head, rows] = functional.log_softmax(head_logits, dim=1).gather(1, chosen)[:, 0].exp().numpy()
            labels[head, rows] = rule.output_to_label[head][head_outputs]
            network[head, rows] = rule.output_to_label[head][head_logits.argmax(1).numpy()]
        if progress is not None:
            progress(len(rows))
    return Prediction(labels, confidence, network)


def prediction_table(shard_dir: str | Path, prediction: Prediction, selected_head: int) -> pd.DataFrame:
    """One row per image of ``shard_dir``: key, label, confidence, label_head_<h>, confidence_head_<h> (the
    published label set's columns) and the manifest's source_path, sha256, width, height."""
    manifest = read_manifest(shard_dir)
    labels = label_table(manifest["key"].tolist(), prediction.labels, prediction.confidence, selected_head).to_pandas()
    for column in MANIFEST_COLUMNS:
        labels[column] = manifest[column].to_numpy()
    return labels


def source_params(params: Params, source: str) -> ShardParams:
    """The version's ingest settings (sides, shard size, the digits' rendering size) for another source."""
    return params.shard.model_copy(update={"source": source})


def quarantine_path(output: str | Path) -> Path:
    """Where the files of the source that got no label are listed: beside ``output``, same format."""
    output = Path(output)
    return output.with_name(f"{output.stem}.quarantine{output.suffix}")


def write_table(frame: pd.DataFrame, output: str | Path) -> Path:
    """Write ``frame`` as CSV for a ``.csv`` name, else parquet; atomically (never a half-written file under the
    real name). Returns the path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    if output.suffix.lower() == ".csv":
        frame.to_csv(partial, index=False)
    else:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), partial, compression="zstd")
    partial.replace(output)
    return output
