"""Task: train a fresh network of another architecture on the exported labels; report agreement and kNN."""

import json
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sela.config import Params
from sela.labels import evaluate, label_set
from sela.learn import transfer
from sela.paths import LABELS, TRANSFER_METRICS, TRANSFER_MODEL
from tasks.environment import device_name
from tasks.evaluate import label_columns
from tasks.images import load_shards


@task(name="transfer-labels", cache_policy=NO_CACHE)
def transfer_labels(root: str, params: Params) -> dict[str, Any]:
    """Write models/transfer.pt and metrics/transfer.json; logs each epoch."""
    base, device, logger = Path(root), torch.device(device_name()), get_run_logger()
    shards = load_shards(base, params.train.decode_size)
    _, label, _ = label_columns(label_set.read_label_set(base / LABELS), shards.keys)
    images = torch.from_numpy(shards.images)
    settings = params.transfer
    heldout = evaluate.holdout_mask(len(label), settings.holdout_fraction, settings.seed)
    result = transfer.train_on_labels(images, label, heldout, params.train, settings, device,
                                      progress=lambda epoch: logger.info("transfer epoch %s", epoch))
    metrics: dict[str, Any] = {"architecture": settings.architecture, "heldout_agreement": result.heldout_agreement,
                               "final_loss": result.history[-1]["loss"]}
    if all(truth is not None for truth in shards.ground_truth):
        features = evaluate.compute_features(result.model, images, params.train.eval_image_size, device)
        features = evaluate.project(features, params.evaluate.knn_dimensions)
        metrics["knn_accuracy"] = evaluate.knn_accuracy(features, shards.ground_truth, params.evaluate.knn_neighbours,
                                                        params.evaluate.knn_temperature)
    (base / TRANSFER_MODEL).parent.mkdir(parents=True, exist_ok=True)
    temporary = base / (TRANSFER_MODEL + ".tmp")
    torch.save(result.model.state_dict(), temporary)
    temporary.replace(base / TRANSFER_MODEL)
    (base / TRANSFER_METRICS).parent.mkdir(parents=True, exist_ok=True)
    (base / TRANSFER_METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics
