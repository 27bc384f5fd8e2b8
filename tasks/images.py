"""The shards decoded at ``train.decode_size``, once per process, for every task that reads images."""

from functools import lru_cache
from pathlib import Path

from sela.data.shards import LoadedShards, manifest_hash, read_shards
from sela.paths import SHARD_DIR


@lru_cache(maxsize=2)
def _cached_shards(shard_dir: str, manifest_sha256: str, decode_size: int) -> LoadedShards:
    # Keyed by the manifest hash: new shards are never served from a stale cache.
    return read_shards(Path(shard_dir), decode_size)


def load_shards(root: str | Path, decode_size: int) -> LoadedShards:
    """Keys, ground truth and uint8 (N, decode_size, decode_size, 3) images of the shards, row i = manifest index i.

    Decoded once per process: a Prefect run of the whole pipeline trains, exports, evaluates and transfers from the
    same array. Training crops and relabel views are cut from these, not from images already shrunk to their size.
    Read-only by convention: every consumer converts to float (a copy) before changing anything.
    """
    shard_dir = Path(root) / SHARD_DIR
    return _cached_shards(str(shard_dir), manifest_hash(shard_dir), decode_size)
