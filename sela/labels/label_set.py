"""Label sets: the product. A parquet table (key, label and confidence per head) and a small JSON card."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def label_table(keys: list[str], labels: np.ndarray, confidence: np.ndarray, selected_head: int) -> pa.Table:
    """keys (N,), labels (num_heads, N) int, confidence (num_heads, N) float -> table with one row per image.

    Columns: ``key``, ``label`` and ``confidence`` (the selected head's: what most users want), then
    ``label_head_<h>`` (int32) and ``confidence_head_<h>`` (float32) for every head. Confidence is whatever the
    caller passes; the pipeline's export passes the network's probability of each label (``sela.labels.export``).
    """
    if labels.shape != confidence.shape or labels.shape[1] != len(keys):
        raise ValueError(f"shape mismatch: {len(keys)} keys, labels {labels.shape}, confidence {confidence.shape}")
    if not 0 <= selected_head < labels.shape[0]:
        raise ValueError(f"selected_head {selected_head} out of range for {labels.shape[0]} heads")
    columns: dict[str, pa.Array] = {
        "key": pa.array(keys, pa.string()),
        "label": pa.array(labels[selected_head].astype(np.int32)),
        "confidence": pa.array(confidence[selected_head].astype(np.float32)),
    }
    for head in range(labels.shape[0]):
        columns[f"label_head_{head}"] = pa.array(labels[head].astype(np.int32))
        columns[f"confidence_head_{head}"] = pa.array(confidence[head].astype(np.float32))
    return pa.table(columns)


def write_label_set(table: pa.Table, path: Path) -> None:
    """Write deterministically (same table -> same bytes) so DVC sees no change when nothing changed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", write_statistics=False, store_schema=True)


def read_label_set(path: Path) -> pa.Table:
    """Read a label set written by ``write_label_set``."""
    return pq.read_table(path)


def labels_of_head(table: pa.Table, head: int) -> np.ndarray:
    """(N,) int64 labels of one head."""
    return table.column(f"label_head_{head}").to_numpy().astype(np.int64)


def write_card(card: dict[str, Any], path: Path) -> None:
    """Pretty, key-sorted JSON so that diffs between versions read well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
