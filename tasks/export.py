"""Task: trained checkpoint -> label set (parquet), card (JSON), metrics (JSON) and a Prefect artifact."""

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from registry.read import latest_label_set
from sela import export, labels, train
from sela.config import Params
from sela.shards import manifest_hash
from tasks.environment import device_name
from tasks.images import load_shards
from tasks.paths import CARD, CHECKPOINT, CLUSTER_SIZES, LABELS, METRICS, SHARD_DIR

# What made the label set: its data, its training, its export rule and its version naming (evaluate and transfer
# only read it). dvc.yaml's export stage lists the same sections, so DVC reruns export when one of them changes.
CARD_PARAMS = ("shard", "train", "export", "version")


def code_version(root: str) -> str:
    """Commit of the code that made the labels, '+dirty' when sela/, tasks/ or flows/ have local edits."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "sela", "tasks", "flows")
    return commit + ("+dirty" if dirty else "")


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """Quality numbers and a bar per cluster of the evaluation head, for the Prefect UI."""
    lines = ["# Label set", "", "| metric | value |", "| --- | --- |"]
    for name in ("num_images", "num_clusters", "selected_head", "nmi", "ari", "acc", "mean_confidence"):
        if name in metrics:
            value = metrics[name]
            lines.append(f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |")
    sizes = metrics["cluster_sizes"][metrics["selected_head"]]
    lines += ["", f"## Cluster sizes (head {metrics['selected_head']}, the `label` column)", ""]
    lines += ["| cluster | images | |", "| --- | --- | --- |"]
    widest = max(sizes) or 1
    lines += [f"| {k} | {size} | {'█' * max(1, round(30 * size / widest))} |" for k, size in enumerate(sizes)]
    return "\n".join(lines)


def cluster_sizes_csv(sizes: list[list[int]]) -> str:
    """One row per (head, cluster): the data of the DVC bar plot declared in dvc.yaml."""
    rows = ["head,cluster,images"] + [f"{h},{k},{n}" for h, head in enumerate(sizes) for k, n in enumerate(head)]
    return "\n".join(rows) + "\n"


@task(name="fetch-parent-label-set", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def fetch_parent_label_set(root: str, params: Params) -> dict[str, str] | None:
    """The newest published version's label set, whose cluster ids a new version keeps, copied to a temporary
    parquet file: {"tag", "path"}; None before the first version. Reads git and DVC's cache or remote: retried."""
    parent = latest_label_set(root, params.version.tag_prefix)
    if parent is None:
        return None
    tag, data = parent
    handle, path = tempfile.mkstemp(prefix="sela-parent-", suffix=".parquet")
    with open(handle, "wb") as file:
        file.write(data)  # the published bytes as they are
    return {"tag": tag, "path": path}


def _align_to_parent(final: export.FinalLabels, keys: list[str], parent: dict[str, str] | None,
                     num_clusters: int) -> tuple[export.FinalLabels, dict[str, Any]]:
    """Keep cluster ids stable: rename clusters to match the parent version (none before the first)."""
    if parent is None:
        return final, {"parent_version": None, "cluster_id_alignment": None}
    tag, table = parent["tag"], pq.read_table(parent["path"]).to_pandas()
    heads = sorted(int(name.removeprefix("label_head_")) for name in table.columns if name.startswith("label_head_"))
    parent_labels = [table[f"label_head_{head}"].to_numpy() for head in heads]
    aligned, report = export.align_to_parent(final, keys, table["key"].tolist(), parent_labels,
                                             table["label"].to_numpy(), num_clusters)
    return aligned, {"parent_version": tag, "cluster_id_alignment": report}


@task(name="export-labels", cache_policy=NO_CACHE)
def export_labels(root: str, params: Params, parent: dict[str, str] | None) -> dict[str, Any]:
    """Write labels/labels.parquet, labels/card.json and metrics/labels.json, cluster ids aligned to ``parent``
    (``fetch_parent_label_set``, whose temporary file is removed, whatever happens). Returns the metrics."""
    try:
        return _export_labels(root, params, parent)
    finally:
        if parent is not None:
            Path(parent["path"]).unlink(missing_ok=True)


def _export_labels(root: str, params: Params, parent: dict[str, str] | None) -> dict[str, Any]:
    base, device = Path(root), torch.device(device_name())
    shards = load_shards(base, params.train.decode_size)
    checkpoint = train.load_checkpoint(base / CHECKPOINT, params.train, device)
    images = torch.from_numpy(shards.images)
    final = export.final_labels(checkpoint.model, images, params, device)
    final, lineage = _align_to_parent(final, shards.keys, parent, params.train.num_clusters)
    table = labels.label_table(shards.keys, final.labels, final.confidence, final.selected_head)
    labels.write_label_set(table, base / LABELS)
    metrics = export.label_metrics(final, shards.ground_truth, params.train.num_clusters)
    epochs = [entry for entry in checkpoint.history if entry["kind"] == "epoch"]
    card = {
        # The sections the export stage declares in dvc.yaml: a change to any other leaves this card as it was.
        "params": params.model_dump(mode="json", include=set(CARD_PARAMS)),
        "data_manifest_sha256": manifest_hash(base / SHARD_DIR),
        "metrics": metrics,
        "code_version": code_version(root),
        **lineage,
        "training": {
            "epochs": checkpoint.epoch,
            "relabels": sum(entry["kind"] == "relabel" for entry in checkpoint.history),
            "final_loss": epochs[-1]["loss"] if epochs else None,
        },
        "sinkhorn": final.diagnostics,
        # With the checkpoint, labels new images as this set labels its own (sela.export.predict_labels).
        "cluster_potentials": final.cluster_potentials.tolist(),
    }
    labels.write_card(card, base / CARD)
    (base / METRICS).parent.mkdir(parents=True, exist_ok=True)
    names = ("num_images", "nmi", "ari", "acc", "mean_confidence", "selected_head")
    summary = {name: metrics[name] for name in names if name in metrics}
    (base / METRICS).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (base / CLUSTER_SIZES).write_text(cluster_sizes_csv(metrics["cluster_sizes"]))
    create_markdown_artifact(metrics_markdown(metrics), key="label-set", description="Quality and cluster sizes")
    return metrics
