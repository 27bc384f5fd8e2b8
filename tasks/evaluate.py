"""Task: label set + checkpoint -> evaluation metrics (JSON), visual report (PNGs + HTML), Prefect artifacts."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from sela.config import Params
from sela.labels import evaluate, label_set, report
from sela.learn import train
from sela.paths import CHECKPOINT, EVALUATION, LABELS, REPORT_DIR
from tasks.environment import device_name
from tasks.images import load_shards

SCALARS = ("num_images", "num_clusters", "acc", "nmi", "ari", "knn_accuracy", "linear_probe_accuracy",
           "mean_confidence")


def label_columns(table: Any, keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(head labels (H, N), label (N,), confidence (N,)) of the label set, rows in the order of ``keys``."""
    frame = table.to_pandas().set_index("key").loc[keys]  # join on the key: never trust row order across files
    heads = sorted(int(c.removeprefix("label_head_")) for c in frame.columns if c.startswith("label_head_"))
    head_labels = np.stack([frame[f"label_head_{h}"].to_numpy(np.int64) for h in heads])
    return head_labels, frame["label"].to_numpy(np.int64), frame["confidence"].to_numpy(np.float32)


@task(name="evaluate-labels", cache_policy=NO_CACHE)
def evaluate_labels(root: str, params: Params) -> dict[str, Any]:
    """Write metrics/evaluation.json and reports/labels/ (montage per cluster, charts, report.html)."""
    base, device = Path(root), torch.device(device_name())
    shards = load_shards(base, params.train.decode_size)
    checkpoint = train.load_checkpoint(base / CHECKPOINT, params.train, device)
    head_labels, label, confidence = label_columns(label_set.read_label_set(base / LABELS), shards.keys)
    images = torch.from_numpy(shards.images)
    features = evaluate.compute_features(checkpoint.model, images, params.train.eval_image_size, device)
    metrics = evaluate.evaluate_label_set(features, head_labels, label, confidence, shards.ground_truth,
                                          params.train.num_clusters, params.evaluate)
    (base / EVALUATION).parent.mkdir(parents=True, exist_ok=True)
    (base / EVALUATION).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    charts = report.label_set_charts(metrics["cluster_sizes"], metrics["confidence_histogram"],
                                     metrics["head_agreement"]["agreement"])
    table = {name: metrics[name] for name in SCALARS if name in metrics}
    files = report.write_report(base / REPORT_DIR, "sela label set", shards.images, label, confidence,
                                params.train.num_clusters, table, charts, params.evaluate.montage_images)
    create_table_artifact([{"metric": k, "value": v} for k, v in table.items()], key="evaluation",
                          description="Evaluation suite of the label set")
    create_markdown_artifact(f"# Label set report\n\nOpen `{files[-1]}` (self-contained HTML: a montage per "
                             f"cluster, cluster sizes, confidence, agreement between heads).", key="label-report")
    return table
