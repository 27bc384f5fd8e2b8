"""WebDataset shards: write samples reproducibly, read them back index-addressable.

Layout of a shard folder::

    shard-000000.tar, shard-000001.tar, ...   # one member per field: '<key>.<ext>' and '<key>.json'
    manifest.parquet                          # one row per sample, in the order written

Shard and manifest bytes depend only on the samples (and the library versions), so DVC sees an unchanged
output when the input is unchanged. Row ``i`` of every array returned by ``read_shards`` is manifest row ``i``.
"""

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset

from sela.data import Sample, decode_image

MANIFEST_NAME = "manifest.parquet"
SHARD_GLOB = "shard-*.tar"
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("ground_truth", pa.string(), nullable=True),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)
_METADATA_FIELD = "json"
# Path components of '/'-separated words; no dots (WebDataset splits the key there) and no empty parts.
_VALID_KEY = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
# WebDataset's reader silently skips members whose name matches this (its default ``skip_meta``).
_SKIPPED_BY_READER = re.compile(r"__[^/]*__($|/)")
_VALID_EXTENSION = re.compile(r"[a-z0-9]+")


@dataclass
class LoadedShards:
    """All samples of a shard folder in manifest order: ``images`` is uint8 (N, size, size, 3) RGB."""

    keys: list[str]
    images: np.ndarray
    ground_truth: list[str | None]

    def __len__(self) -> int:
        return len(self.keys)


def write_shards(samples: Iterable[Sample], output_dir: Path, samples_per_shard: int) -> pd.DataFrame:
    """Write ``samples`` to ``output_dir/shard-NNNNNN.tar`` plus ``manifest.parquet``; return the manifest.

    Earlier shards and manifest in ``output_dir`` are removed first (and again if writing fails), so the
    folder never mixes two runs. Raises ValueError for no samples, duplicate keys or keys WebDataset cannot read.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    iterator = iter(samples)
    first = next(iterator, None)
    if first is None:
        raise ValueError("no samples to write: the image source is empty")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_outputs(output_dir)
    # ShardWriter %-formats the whole pattern, so a '%' in the folder name must be escaped.
    pattern = str(output_dir).replace("%", "%%") + "/shard-%06d.tar"
    rows: list[dict[str, object]] = []
    source_of_key: dict[str, str] = {}
    try:
        # encoder=False: bytes go in as they are; mtime=0: no wall-clock time in the tar headers.
        with webdataset.ShardWriter(pattern, maxcount=samples_per_shard, mtime=0, verbose=0, encoder=False) as writer:
            for index, sample in enumerate(itertools.chain([first], iterator)):
                _check_sample(sample, source_of_key)
                source_of_key[sample.key] = sample.source_path
                metadata = {"ground_truth": sample.ground_truth, "source_path": sample.source_path}
                writer.write(
                    {
                        "__key__": sample.key,
                        sample.extension: sample.image,
                        _METADATA_FIELD: json.dumps(metadata, sort_keys=True).encode("utf-8"),
                    }
                )
                rows.append(
                    {
                        "index": index,
                        "key": sample.key,
                        "shard": Path(writer.fname).name,  # the writer opens the next shard before writing
                        "source_path": sample.source_path,
                        "ground_truth": sample.ground_truth,
                        "sha256": hashlib.sha256(sample.image).hexdigest(),
                    }
                )
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        # Built from Python lists, not pandas: no pandas metadata (versions, index) in the file.
        pq.write_table(table, output_dir / MANIFEST_NAME)
    except BaseException:
        _remove_outputs(output_dir)
        raise
    return _manifest_frame(table)


def read_manifest(output_dir: Path) -> pd.DataFrame:
    """Load ``manifest.parquet`` (string columns as pandas ``string`` dtype, missing ground truth as <NA>)."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}: run the shard stage first")
    return _manifest_frame(pq.read_table(path, schema=MANIFEST_SCHEMA))


def manifest_hash(output_dir: Path) -> str:
    """SHA-256 (hex) of the manifest file's bytes: it changes whenever any sample, key or shard split changes."""
    return hashlib.sha256((Path(output_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def shard_paths(output_dir: Path) -> list[Path]:
    """The shard files the manifest names, sorted; raises FileNotFoundError if one is missing."""
    output_dir = Path(output_dir)
    paths = [output_dir / name for name in sorted(set(read_manifest(output_dir)["shard"]))]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"shards listed in {output_dir / MANIFEST_NAME} are missing: {', '.join(missing)}")
    return paths


def iter_shard_samples(output_dir: Path) -> Iterator[Sample]:
    """Yield the samples stored in the shards of ``output_dir``, in shard file order."""
    urls = [str(path) for path in shard_paths(output_dir)]
    # No node/worker splitting: this reads every sample, even inside a DDP rank or a loader worker.
    dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    for record in dataset:
        fields = [name for name in record if not name.startswith("_") and name != _METADATA_FIELD]
        if len(fields) != 1 or _METADATA_FIELD not in record:
            raise ValueError(
                f"{record['__url__']}: sample {record['__key__']!r} has fields {sorted(record)}, "
                f"expected one image and {_METADATA_FIELD!r}"
            )
        metadata = json.loads(record[_METADATA_FIELD])
        yield Sample(
            key=record["__key__"],
            image=record[fields[0]],
            extension=fields[0],
            ground_truth=metadata["ground_truth"],
            source_path=metadata["source_path"],
        )


def read_shards(output_dir: Path, image_size: int) -> LoadedShards:
    """Decode every sample to uint8 (N, image_size, image_size, 3); row i holds the manifest row with index i.

    Raises ValueError when shards and manifest disagree (a key missing on either side, a duplicate key,
    or ground truth that differs).
    """
    # Rows are addressed by their 'index', not by where they sit in the file.
    manifest = read_manifest(output_dir).sort_values("index", kind="stable", ignore_index=True)
    count = len(manifest)
    if not np.array_equal(manifest["index"].to_numpy(), np.arange(count)):
        raise ValueError(f"{Path(output_dir) / MANIFEST_NAME}: column 'index' is not a permutation of 0..{count - 1}")
    keys = manifest["key"].tolist()
    ground_truth = [None if pd.isna(value) else str(value) for value in manifest["ground_truth"]]
    row_of_key = {key: row for row, key in enumerate(keys)}
    images = np.zeros((count, image_size, image_size, 3), dtype=np.uint8)
    filled = np.zeros(count, dtype=bool)
    for sample in iter_shard_samples(output_dir):
        row = row_of_key.get(sample.key)
        if row is None:
            raise ValueError(f"{output_dir}: shard sample {sample.key!r} is not in the manifest")
        if filled[row]:
            raise ValueError(f"{output_dir}: key {sample.key!r} appears twice in the shards")
        if sample.ground_truth != ground_truth[row]:
            raise ValueError(
                f"{output_dir}: key {sample.key!r} has ground truth {sample.ground_truth!r} in its shard "
                f"but {ground_truth[row]!r} in the manifest"
            )
        images[row] = decode_image(sample.image, image_size)
        filled[row] = True
    if not filled.all():
        missing = [keys[row] for row in np.flatnonzero(~filled)]
        shown = ", ".join(repr(key) for key in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{output_dir}: {len(missing)} manifest keys are missing from the shards: {shown}")
    return LoadedShards(keys=keys, images=images, ground_truth=ground_truth)


def _check_sample(sample: Sample, source_of_key: dict[str, str]) -> None:
    """Reject what WebDataset would silently mangle on reading: bad keys, bad extensions, duplicates."""
    if not _VALID_KEY.fullmatch(sample.key) or _SKIPPED_BY_READER.match(f"{sample.key}.{sample.extension}"):
        raise ValueError(
            f"{sample.source_path}: key {sample.key!r} cannot be stored in a WebDataset shard "
            "(use '/'-separated parts of letters, digits, '_' and '-', not starting with '__...__')"
        )
    if not _VALID_EXTENSION.fullmatch(sample.extension) or sample.extension == _METADATA_FIELD:
        raise ValueError(f"{sample.source_path}: image extension {sample.extension!r} is not allowed")
    if sample.key in source_of_key:
        raise ValueError(f"duplicate key {sample.key!r}: {source_of_key[sample.key]} and {sample.source_path}")


def _manifest_frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper=lambda arrow_type: pd.StringDtype() if arrow_type == pa.string() else None)


def _remove_outputs(output_dir: Path) -> None:
    for path in sorted(output_dir.glob(SHARD_GLOB)):
        path.unlink()
    (output_dir / MANIFEST_NAME).unlink(missing_ok=True)
