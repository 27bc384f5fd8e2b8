"""Incremental versions: a training run that starts from its parent version instead of from scratch.

The parent is the newest published version. Its checkpoint holds the network, its training labels (every head,
network output order, one column per image in the parent's manifest order) and the cluster potentials of its last
relabel; its label set lists the same images by key, in the same order; its card holds the cluster potentials g of
the export's solve. A run with ``train.start_from: parent`` starts from:

- the parent's network and warm starts (the optimiser afresh: the learning rate is the run's own);
- the parent's published label of every image it had, for the label set's heads (its ``label_head_<h>`` columns
  renamed back to network outputs with the card's ``cluster_id_alignment``), and its training label for
  over-clustering heads (never published), mapped by key into this manifest's order. The published labels, not
  the checkpoint's training ones: on CIFAR-10 those differ from the published set on a third of the images, and
  training on them moved the new version away from the labels it is meant to keep (docs/incremental.md);
- for every new image, the label set's rule, argmax_k lambda log p_k(x) + g_k on its un-augmented view: with the
  card's g for the label set's heads and, for over-clustering heads (trained, never exported, so not in the card),
  the g of the checkpoint's last relabel.

It then trains ``incremental.epochs`` epochs with ``incremental.relabels`` relabels (none before the first epoch:
the labels are set). The export aligns the new version's cluster ids to the parent's, as for any version.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from sela.config import TrainParams
from sela.learn.train import load_payload

# What the network's weights and the labels' shapes depend on: a parent trained otherwise cannot be started from.
SHAPE_PARAMS = ("architecture", "width", "hidden_layers", "num_heads", "num_clusters", "overclustering")


class ParentMismatchError(ValueError):
    """The parent version cannot be started from: other network or heads, or inconsistent files."""


@dataclass(frozen=True)
class ParentVersion:
    """A published version's files as a run from it reads them, fetched to local paths: its tag (``labels-v3``),
    checkpoint (``models/checkpoint.pt``), card (``labels/card.json``) and label set (``labels/labels.parquet``)."""

    tag: str
    checkpoint_path: Path
    card_path: Path
    labels_path: Path

    def to_json(self) -> dict[str, str]:
        return {"tag": self.tag, "checkpoint_path": str(self.checkpoint_path), "card_path": str(self.card_path),
                "labels_path": str(self.labels_path)}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> "ParentVersion":
        return cls(data["tag"], Path(data["checkpoint_path"]), Path(data["card_path"]), Path(data["labels_path"]))


def run_schedule(params: TrainParams) -> TrainParams:
    """The params the epochs of this run follow: ``params`` from scratch; from a parent, ``incremental``'s epochs,
    relabels and learning rate in place of the full run's (the cosine decay runs over the run's own epochs)."""
    if params.start_from == "scratch":
        return params
    settings = params.incremental
    return params.model_copy(update={"epochs": settings.epochs, "num_relabels": settings.relabels,
                                     "learning_rate": settings.learning_rate})


def first_relabel_epoch(params: TrainParams) -> int:
    """0 from scratch (the random labels are replaced at once); 1 from a parent (its labels are set)."""
    return 0 if params.start_from == "scratch" else 1


def check_parent_params(parent_train: dict[str, Any], params: TrainParams, tag: str) -> None:
    """Refuse a parent whose network or heads differ from this run's (``SHAPE_PARAMS``), naming each difference."""
    ours = params.model_dump(mode="json")
    differences = [f"{name} {parent_train.get(name)!r} (this run: {ours[name]!r})" for name in SHAPE_PARAMS
                   if parent_train.get(name) != ours[name]]
    if differences:
        raise ParentMismatchError(f"cannot start from parent version {tag}: it was trained with "
                                  f"{'; '.join(differences)}. Set these train params as the parent has them, or "
                                  "train.start_from: scratch")


def carry_labels(parent_keys: list[str], parent_labels: np.ndarray, keys: list[str]) -> np.ndarray:
    """The parent's labels (num_heads, M), column j for ``parent_keys[j]``, moved to ``keys`` (N,) order:
    (num_heads, N) int64, -1 in the columns of keys the parent did not have."""
    position = {key: column for column, key in enumerate(parent_keys)}
    if len(position) != len(parent_keys):
        raise ParentMismatchError("the parent's label set repeats keys: it cannot be matched to images")
    source = np.array([position.get(key, -1) for key in keys], dtype=np.int64)
    labels = np.full((parent_labels.shape[0], len(keys)), -1, dtype=np.int64)
    known = source >= 0
    labels[:, known] = parent_labels[:, source[known]]
    return labels


def parent_start(parent: ParentVersion, params: TrainParams, keys: list[str]) -> dict[str, Any]:
    """The payload a run from ``parent`` starts with, for the images ``keys`` (N,) of this run's manifest: as a
    saved checkpoint's (``sela.learn.train.save_checkpoint``) at epoch 0 with no optimiser state, its labels -1
    for new images, plus ``rule_potentials``: one (K_h,) float64 array per head, g of the rule that labels them
    (``sela.learn.loop.label_new_images``). The history's first entry records the parent and the images kept."""
    payload = load_payload(parent.checkpoint_path)
    card = json.loads(parent.card_path.read_text())
    check_parent_params(card["params"]["train"], params, parent.tag)
    table = pq.read_table(parent.labels_path)
    parent_keys = table.column("key").to_pylist()
    parent_labels = payload["labels"].numpy().copy()
    if parent_labels.shape != (len(params.head_sizes), len(parent_keys)):
        raise ParentMismatchError(f"parent version {parent.tag}: its checkpoint holds labels {parent_labels.shape} "
                                  f"but its label set has {len(parent_keys)} images and this run "
                                  f"{len(params.head_sizes)} heads")
    parent_labels[: params.num_heads] = published_outputs(table, card, params.num_heads)
    labels = carry_labels(parent_keys, parent_labels, keys)
    new = int((labels[0] < 0).sum())
    start = {"kind": "start", "parent_version": parent.tag, "parent_epochs": int(payload["epoch"]),
             "kept": len(keys) - new, "new": new, "dropped": len(parent_keys) - (len(keys) - new)}
    return {"model": payload["model"], "optimizer": None, "labels": torch.from_numpy(labels), "epoch": 0,
            "cluster_potentials": payload["cluster_potentials"], "history": [start],
            "rule_potentials": rule_potentials(card, payload, params, parent.tag),
            # the sizes the parent's training ended with (estimated ones carry on); absent: equal, as it trained
            **({"target_sizes": payload["target_sizes"]} if "target_sizes" in payload else {})}


def published_outputs(table: Any, card: dict[str, Any], num_heads: int) -> np.ndarray:
    """The label set's ``label_head_<h>`` columns as network outputs: (num_heads, M) int64, undoing the renaming
    ``output_to_label`` the card records (none for a first version)."""
    alignment = card.get("cluster_id_alignment")
    outputs = []
    for head in range(num_heads):
        published = table.column(f"label_head_{head}").to_numpy().astype(np.int64)
        if alignment is None:
            outputs.append(published)
            continue
        renaming = np.asarray({entry["head"]: entry for entry in alignment}[head]["output_to_label"], dtype=np.int64)
        outputs.append(np.argsort(renaming)[published])  # argsort of a permutation is its inverse
    return np.stack(outputs)


def rule_potentials(card: dict[str, Any], payload: dict[str, Any], params: TrainParams, tag: str) -> list[np.ndarray]:
    """g per head for the new images: the card's (the export's solve) for the label set's heads, the checkpoint's
    last relabel for the over-clustering heads."""
    if "cluster_potentials" not in card:
        raise ParentMismatchError(f"parent version {tag} has no cluster_potentials in its card: it predates them "
                                  "and cannot label new images by its rule; train.start_from: scratch")
    exported = [np.asarray(row, dtype=np.float64) for row in card["cluster_potentials"]]
    trained = payload["cluster_potentials"]
    potentials = exported + [None if p is None else p.numpy().astype(np.float64) for p in trained[len(exported):]]
    for head, (potential, size) in enumerate(zip(potentials, params.head_sizes, strict=True)):
        if potential is None or potential.shape != (size,):
            raise ParentMismatchError(f"parent version {tag}: head {head} has no cluster potentials of {size} "
                                      "clusters to label new images with")
    return potentials


def parent_of(history: list[dict[str, Any]]) -> str | None:
    """The parent version a checkpoint's run started from (None from scratch)."""
    starts = [entry for entry in history if entry["kind"] == "start"]
    return starts[0]["parent_version"] if starts else None
