"""The label card: what made a label set (params, data, code, parent version, training) and how to reuse its rule.

Written beside ``labels.parquet`` and published with it; ``sela labels show`` prints it.
"""

import subprocess
from typing import Any

import numpy as np

from sela.config import Params
from sela.labels.export import FinalLabels
from sela.learn.incremental import parent_of

# What made the label set: its data, its training, its export rule and its version naming (evaluate and transfer
# only read it). dvc.yaml's export stage lists the same sections, so DVC reruns export when one of them changes.
CARD_PARAMS = ("shard", "train", "export", "version")
# The scalar metrics DVC tracks (metrics/labels.json).
SUMMARY_METRICS = ("num_images", "nmi", "ari", "acc", "mean_confidence", "selected_head")


def code_version(root: str) -> str:
    """Commit of the code that made the labels, '+dirty' when sela/, tasks/ or flows/ have local edits."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "sela", "tasks", "flows")
    return commit + ("+dirty" if dirty else "")


def label_card(params: Params, final: FinalLabels, metrics: dict[str, Any], history: list[dict[str, Any]],
               manifest_sha256: str, code: str, lineage: dict[str, Any]) -> dict[str, Any]:
    """The card of a label set. ``history``: the checkpoint's epochs and relabels; ``lineage``: parent version and
    the cluster-id alignment to it (``sela.labels.export.align_to_parent_table``)."""
    epochs = [entry for entry in history if entry["kind"] == "epoch"]
    return {
        # The sections the export stage declares in dvc.yaml: a change to any other leaves this card as it was.
        "params": params.model_dump(mode="json", include=set(CARD_PARAMS)),
        "data_manifest_sha256": manifest_sha256,
        "metrics": metrics,
        "code_version": code,
        **lineage,
        "training": {
            "epochs": len(epochs),
            "relabels": sum(entry["kind"] == "relabel" for entry in history),
            "final_loss": epochs[-1]["loss"] if epochs else None,
            # The version whose network and labels the training started from (train.start_from: parent), else None.
            "started_from": parent_of(history),
            # initialisations above 1: each run's seed and objective, and which one this label set is.
            "initialisations": next(({key: value for key, value in entry.items() if key != "kind"}
                                     for entry in history if entry["kind"] == "initialisations"), None),
        },
        "sinkhorn": final.diagnostics,
        # With the checkpoint, labels new images as this set labels its own (sela.labels.export.predict_labels).
        "cluster_potentials": np.asarray(final.cluster_potentials).tolist(),
        # The cluster sizes (fractions of N, network output order) each head was balanced to; with relaxed sizes
        # the penalty's anchor (equal), the sizes reached being metrics.cluster_sizes.
        "target_sizes": np.asarray(final.target_sizes).tolist(),
    }


def summary_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalars of ``metrics`` that DVC tracks as the stage's metrics file."""
    return {name: metrics[name] for name in SUMMARY_METRICS if name in metrics}


def cluster_sizes_csv(sizes: list[list[int]]) -> str:
    """One row per (head, cluster): the data of the DVC bar plot declared in dvc.yaml."""
    rows = ["head,cluster,images"] + [f"{h},{k},{n}" for h, head in enumerate(sizes) for k, n in enumerate(head)]
    return "\n".join(rows) + "\n"
