"""Remote shards: ingest from and write to fsspec's memory filesystem, read shards over a real local HTTP server."""

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest

from sela.config import ShardParams
from sela.data.ingest import ingest
from sela.data.shards import manifest_hash, read_manifest, read_shards
from tests.sela.data.test_sources import FILES


def shard_params(source: str) -> ShardParams:
    return ShardParams(source=source, image_size=16, samples_per_shard=2, min_side=4, max_side=64)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served by http.server on localhost: (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_memory_source_to_memory_shards_matches_a_local_ingest(tmp_path: Path) -> None:
    for relative, data in FILES.items():
        fsspec.filesystem("memory").pipe(f"/{tmp_path.name}/in/{relative}", data)
        local = tmp_path / "in" / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
    remote_output = f"memory://{tmp_path.name}/shards"

    report = ingest(shard_params(f"memory://{tmp_path.name}/in"), remote_output, workers=2)
    local_report = ingest(shard_params(str(tmp_path / "in")), str(tmp_path / "shards"), workers=1)

    assert report.manifest["key"].tolist() == local_report.manifest["key"].tolist()
    assert len(report.manifest) == 6 and report.quarantine["reason"].tolist() == ["not an image (unrecognised content)"]
    remote_images = read_shards(remote_output, 16).images
    assert np.array_equal(remote_images, read_shards(tmp_path / "shards", 16).images)
    # Atomic writes on the remote side too: committed names only, no '.tmp' left behind.
    names = sorted(path.rpartition("/")[2] for path in fsspec.filesystem("memory").ls(f"/{tmp_path.name}/shards",
                                                                                       detail=False))
    assert names == sorted(path.name for path in (tmp_path / "shards").iterdir())


def test_shards_read_over_http_match_the_local_read(tmp_path: Path, http_root: tuple[Path, str]) -> None:
    folder, base_url = http_root
    source = tmp_path / "in"
    for relative, data in FILES.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes(data)
    ingest(shard_params(str(source)), str(folder / "shards"), workers=1)

    over_http = read_shards(f"{base_url}/shards", 16)
    local = read_shards(folder / "shards", 16)

    assert over_http.keys == local.keys and np.array_equal(over_http.images, local.images)
    assert read_manifest(f"{base_url}/shards").equals(read_manifest(folder / "shards"))
    expected_hash = hashlib.sha256((folder / "shards/manifest.parquet").read_bytes()).hexdigest()
    assert manifest_hash(f"{base_url}/shards") == expected_hash
