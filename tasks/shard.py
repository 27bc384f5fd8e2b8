"""Task: every file of the configured source -> deterministic WebDataset shards + manifest + quarantine report."""

import os
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from tqdm import tqdm

from sela.config import ShardParams
from sela.data.ingest import ingest
from sela.data.shards import manifest_hash
from sela.paths import SHARD_DIR

# The artifact lists at most this many quarantined files (the parquet report has them all).
_ARTIFACT_ROWS = 500


def ingest_workers() -> int:
    """Decode processes: every core this process may run on (a machine setting, not a parameter)."""
    return len(os.sched_getaffinity(0))


@task(name="shard", retries=2, retry_delay_seconds=2)
def shard_images(root: str, params: ShardParams) -> dict[str, object]:
    """Ingest into ``data/shards``; retried (and resumed where it stopped) because sources may sit on flaky storage."""
    logger = get_run_logger()
    output_dir = Path(root) / SHARD_DIR
    with tqdm(desc="ingest", unit="img", smoothing=0.1, mininterval=1.0) as bar:
        report = ingest(params, str(output_dir), ingest_workers(), progress=bar.update)
    manifest = report.manifest
    logger.info(
        "%d files: %d new samples in %d new shards, %d shards kept, %d quarantined, %d removed from the source%s",
        report.inputs, int(manifest["shard"].isin(report.written_shards).sum()),
        len(report.written_shards), len(report.kept_shards), len(report.quarantine), len(report.removed),
        " (parameters changed: rebuilt from scratch)" if report.restarted else "",
    )
    if len(report.removed):
        logger.warning("samples whose file left the source (kept in their shards, see removed.parquet): %s",
                       ", ".join(report.removed["source_path"].head(20)))
    if len(report.quarantine):
        rows = report.quarantine.head(_ARTIFACT_ROWS).to_dict("records")
        create_table_artifact(rows, key="quarantine", description=f"{len(report.quarantine)} quarantined files "
                              f"(first {min(len(rows), _ARTIFACT_ROWS)}); all in data/shards/quarantine.parquet")
    return {
        "num_images": len(manifest),
        "num_shards": int(manifest["shard"].nunique()),
        "num_quarantined": len(report.quarantine),
        "num_removed": len(report.removed),
        "manifest_sha256": manifest_hash(output_dir),
        "labelled_fraction": float(manifest["ground_truth"].notna().mean()),
    }
