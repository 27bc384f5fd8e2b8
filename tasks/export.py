"""Task: trained checkpoint -> label set (parquet), card (JSON), metrics (JSON) and a Prefect artifact."""

import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from sela.config import Params
from sela.data.shards import manifest_hash
from sela.labels import card, export, label_set
from sela.learn import train
from sela.paths import CARD, CHECKPOINT, CLUSTER_SIZES, LABELS, METRICS, SHARD_DIR
from sela.registry.read import latest_label_set
from tasks.environment import device_name, loader_workers


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
    checkpoint = train.load_checkpoint(base / CHECKPOINT, params.train, device)
    parent_table = None if parent is None else pq.read_table(parent["path"]).to_pandas()
    exported = export.export_label_set(checkpoint.model, base / SHARD_DIR, params, device, loader_workers(device),
                                       parent_table, None if parent is None else parent["tag"],
                                       checkpoint.target_sizes)
    final, keys, metrics, lineage = exported.final, exported.keys, exported.metrics, exported.lineage
    label_set.write_label_set(label_set.label_table(keys, final.labels, final.confidence, final.selected_head),
                              base / LABELS)
    label_set.write_card(card.label_card(params, final, metrics, checkpoint.history, manifest_hash(base / SHARD_DIR),
                                         card.code_version(root), lineage), base / CARD)
    (base / METRICS).parent.mkdir(parents=True, exist_ok=True)
    (base / METRICS).write_text(json.dumps(card.summary_metrics(metrics), indent=2, sort_keys=True) + "\n")
    (base / CLUSTER_SIZES).write_text(card.cluster_sizes_csv(metrics["cluster_sizes"]))
    create_markdown_artifact(metrics_markdown(metrics), key="label-set", description="Quality and cluster sizes")
    return metrics
