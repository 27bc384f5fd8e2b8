"""Tasks of ``sela/predict``: a published version's rule and network, the new images ingested, labelled, written.

Each is one call of ``sela.registry.predict`` (the steps ``sela labels predict`` runs), with a progress bar on
stderr and the quarantine as an artifact, as the shard stage reports it.
"""

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from sela.registry import predict
from tasks.environment import device_name

# The artifact lists at most this many quarantined files (the quarantine file beside the output has them all).
_ARTIFACT_ROWS = 500


@task(name="fetch-version-rule", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def fetch_rule(repo: str, version: str | int, prefix: str) -> predict.VersionRule:
    """The version's params.yaml (at its tag) and card. Reads git and DVC's remote: retried."""
    return predict.fetch_rule(repo, version, prefix)


@task(name="fetch-checkpoint", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def fetch_checkpoint(repo: str, tag: str, destination: str, prefix: str) -> str:
    """The version's checkpoint from DVC's remote into ``destination``: retried (network)."""
    return str(predict.fetch_checkpoint(repo, tag, destination, prefix))


@task(name="ingest-source", cache_policy=NO_CACHE)
def ingest_source(rule: predict.VersionRule, source: str, shard_dir: str) -> dict[str, int]:
    """The source's files into ``shard_dir`` with the version's ingest settings; bad files quarantined."""
    with tqdm(desc="ingest", unit="img", smoothing=0.1, mininterval=1.0) as bar:
        report = predict.ingest_source(rule, source, shard_dir, predict.ingest_workers(), bar.update)
    get_run_logger().info("%d files: %d images to label, %d quarantined", report.inputs, len(report.manifest),
                          len(report.quarantine))
    if len(report.quarantine):
        rows = report.quarantine.head(_ARTIFACT_ROWS).to_dict("records")
        create_table_artifact(rows, key="predict-quarantine", description=f"{len(report.quarantine)} quarantined "
                              f"files of {source} (first {min(len(rows), _ARTIFACT_ROWS)})")
    return {"inputs": report.inputs, "images": len(report.manifest), "quarantined": len(report.quarantine)}


@task(name="label-images", cache_policy=NO_CACHE)
def label_images(rule: predict.VersionRule, checkpoint: str, shard_dir: str, device: str | None, images: int,
                 destination: str) -> str:
    """Every image of ``shard_dir`` labelled by the version's rule, written to ``destination`` (parquet)."""
    with tqdm(desc="label", total=images, unit="img", mininterval=1.0) as bar:
        labels = predict.label_images(rule, checkpoint, shard_dir, device or device_name(), progress=bar.update)
    labels.to_parquet(destination, index=False)
    return destination


@task(name="write-predictions", cache_policy=NO_CACHE)
def write_predictions(labels: str, shard_dir: str, output: str) -> dict[str, Any]:
    """``output`` and the quarantine file beside it."""
    written, listed, labelled, quarantined = predict.write_outputs(pd.read_parquet(labels), shard_dir, output)
    return {"output": str(written), "quarantine": str(listed), "labelled": labelled, "quarantined": quarantined}


def work_path(work: str, name: str) -> str:
    return str(Path(work) / name)
