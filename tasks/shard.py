"""Task: images from the configured source -> deterministic WebDataset shards + manifest."""

from pathlib import Path

from prefect import task

from sela.config import ShardParams
from sela.data import iter_source
from sela.shards import manifest_hash, write_shards
from tasks.paths import SHARD_DIR


@task(name="shard", retries=2, retry_delay_seconds=2)
def shard_images(root: str, params: ShardParams) -> dict[str, object]:
    """Write ``data/shards``; retried because sources may sit on flaky network storage."""
    output_dir = Path(root) / SHARD_DIR
    manifest = write_shards(iter_source(params.source, params.image_size), output_dir, params.samples_per_shard)
    return {
        "num_images": len(manifest),
        "num_shards": int(manifest["shard"].nunique()),
        "manifest_sha256": manifest_hash(output_dir),
        "labelled_fraction": float(manifest["ground_truth"].notna().mean()),
    }
