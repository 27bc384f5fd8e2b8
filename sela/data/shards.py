"""WebDataset shards: write them reproducibly and atomically, read them back index-addressable.

Layout of a shard folder (a local path or any fsspec URL: ``memory://``, ``s3://``, ``gs://``; http(s) read-only)::

    shard-000000.tar, shard-000001.tar, ...   # one member per sample: '<key>.<ext>' (jpg or png), like `tar -cf`
    shard-000000.parquet, ...                 # the manifest rows of each shard (sidecar, written before the tar)
    manifest.parquet                          # one row per sample, its metadata: the table label sets join on
    quarantine.parquet, removed.parquet       # ingest reports (see sela.data.ingest)

A shard is written to ``<name>.tmp`` and renamed once complete, after its sidecar: a ``shard-N.tar`` that exists
is finished, which is how an interrupted ingest resumes. Shard and manifest bytes depend only on the samples
(and the library versions), so DVC sees an unchanged output when the input is unchanged. Row ``i`` of every array
returned by ``read_shards`` is manifest row ``i``.
"""

import errno
import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset
from PIL import Image

from sela.data import remote
from sela.data.sources import Sample, decode_image
from sela.data.tarmembers import read_members, sample_member, tar_end

MANIFEST_NAME = "manifest.parquet"
STATE_NAME = "ingest.json"
QUARANTINE_NAME = "quarantine.parquet"
REMOVED_NAME = "removed.parquet"
# Everything a run writes next to the shards (removed with them when a folder is rebuilt).
OUTPUT_NAMES = (MANIFEST_NAME, STATE_NAME, QUARANTINE_NAME, REMOVED_NAME)
SHARD_GLOB = "shard-*.tar"
_SHARD_NAME = re.compile(r"shard-(\d{6})\.tar")
_ROW_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("source_path", pa.string(), nullable=False),
    pa.field("ground_truth", pa.string(), nullable=True),
    pa.field("sha256", pa.string(), nullable=False),  # of the source file's bytes
    pa.field("width", pa.int64(), nullable=False),  # original size, before any shrinking
    pa.field("height", pa.int64(), nullable=False),
]
SIDECAR_SCHEMA = pa.schema(_ROW_FIELDS)
MANIFEST_SCHEMA = pa.schema([pa.field("index", pa.int64(), nullable=False), *_ROW_FIELDS])
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


class ShardStore:
    """A shard folder behind fsspec: names inside it, atomic writes, the finished shards."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self.filesystem, self.root = fsspec.core.url_to_fs(self.location)
        self.root = self.root.rstrip("/")
        self.local = remote.is_local(self.filesystem)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def url(self, name: str) -> str:
        """What WebDataset opens: a local path, or the URL with its scheme (read through ``sela.data.remote``)."""
        path = self.path(name)
        return path if remote.is_local(self.filesystem) else self.filesystem.unstrip_protocol(path)

    def exists(self, name: str) -> bool:
        return self.filesystem.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        return self.filesystem.cat_file(self.path(name))

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write to ``<name>.tmp`` then rename, so a reader or a resumed run never sees half a file."""
        if self.local:  # plain os calls: fsspec's path handling costs more than the write (ingest: 2 files a shard)
            os.makedirs(self.root, exist_ok=True)
            with open(self.path(f"{name}.tmp"), "wb") as handle:
                handle.write(data)
        else:
            self.filesystem.makedirs(self.root, exist_ok=True)
            self.filesystem.pipe_file(self.path(f"{name}.tmp"), data)
        self.rename(f"{name}.tmp", name)

    def rename(self, source: str, target: str) -> None:
        """Rename ``source`` to ``target`` (replacing it), both names in the folder."""
        if self.local:
            os.replace(self.path(source), self.path(target))
        else:
            self.filesystem.mv(self.path(source), self.path(target))

    def names(self) -> list[str]:
        if not self.filesystem.isdir(self.root):
            return []
        return sorted(path.rstrip("/").rpartition("/")[2] for path in self.filesystem.ls(self.root, detail=False))

    def finished_shards(self) -> list[str]:
        """Shard names whose tar exists (renamed last, so its sidecar is complete), in number order."""
        return [name for name in self.names() if _SHARD_NAME.fullmatch(name)]

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.filesystem.rm_file(self.path(name))


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def sidecar_name(shard: str) -> str:
    return shard.removesuffix(".tar") + ".parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    """Parquet file bytes; built from Arrow, not pandas, so no pandas metadata (versions, index) is stored."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_shard(
    store: ShardStore, shard: str, members: Sequence[bytes | memoryview], columns: dict[str, list[object]]
) -> None:
    """Write one shard from its samples' tar ``members`` (``sela.data.tarmembers``), then its sidecar of manifest rows
    (``columns``: ``SIDECAR_SCHEMA`` name -> one value per sample), then commit it by renaming the tar into place."""
    payload = b"".join([*members, tar_end(sum(len(member) for member in members))])
    store.filesystem.makedirs(store.root, exist_ok=True)
    store.filesystem.pipe_file(store.path(f"{shard}.tmp"), payload)
    _commit_shard(store, shard, columns)


def write_shard_from_files(
    store: ShardStore,
    shard: str,
    ranges: Sequence[tuple[str, int, int]],
    columns: dict[str, list[object]],
    movable: bool = False,
) -> pa.Table:
    """``write_shard`` with the members given as byte ``ranges`` (local file, offset, length) of files holding
    them: on a local store they are copied file to file in the kernel (``os.copy_file_range``), never through
    Python bytes; on a remote one they are read into one buffer and uploaded. Returns the sidecar table.

    ``movable``: the caller gives the files up; one that holds exactly the members (one range, all of the file)
    becomes the shard by a rename, without a copy.
    """
    length = sum(size for _, _, size in ranges)
    temporary = store.path(f"{shard}.tmp")
    if store.local:
        os.makedirs(store.root, exist_ok=True)
        moved = movable and _moved_whole(ranges, temporary)
        target = os.open(temporary, os.O_WRONLY if moved else os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if not moved:
                _copy_ranges(ranges, target)
            end = tar_end(length)
            if os.pwrite(target, end, length) != len(end):
                raise OSError(f"short write at the end of {temporary}")
        finally:
            os.close(target)
    else:
        end = tar_end(length)
        payload = bytearray(length + len(end))
        payload[length:] = end
        view, position = memoryview(payload), 0
        for path, offset, size in ranges:
            with open(path, "rb", buffering=0) as handle:
                handle.seek(offset)
                if handle.readinto(view[position : position + size]) != size:
                    raise ValueError(f"{path} holds fewer than {offset + size} bytes")
            position += size
        store.filesystem.makedirs(store.root, exist_ok=True)
        store.filesystem.pipe_file(temporary, bytes(payload))
    return _commit_shard(store, shard, columns)


def _moved_whole(ranges: Sequence[tuple[str, int, int]], target: str) -> bool:
    """Rename the file of ``ranges`` to ``target`` if they are one range covering all of it; False if not (or
    if it is on another file system)."""
    if len(ranges) != 1 or ranges[0][1] != 0:
        return False
    path, _, size = ranges[0]
    if os.stat(path).st_size != size:
        return False
    try:
        os.rename(path, target)
    except OSError:
        return False
    return True


def _copy_ranges(ranges: Sequence[tuple[str, int, int]], target: int) -> None:
    """Copy ``ranges`` (path, offset, length) one after the other to the start of the file ``target``."""
    position = 0
    for path, offset, size in ranges:
        source = os.open(path, os.O_RDONLY)
        try:
            _copy_range(source, offset, target, position, size)
        finally:
            os.close(source)
        position += size


_COPY_CHUNK = 1 << 23  # bytes per read + write where the kernel cannot copy


def _copy_range(source: int, offset: int, target: int, position: int, size: int) -> None:
    """Copy ``size`` bytes at ``offset`` of ``source`` to ``position`` of ``target`` (file descriptors)."""
    end = offset + size
    while offset < end:
        try:
            copied = os.copy_file_range(source, target, end - offset, offset, position)
        except OSError as error:  # no in-kernel copy between these files (EXDEV, ENOSYS, EINVAL...): read + write
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            chunk = os.pread(source, min(end - offset, _COPY_CHUNK), offset)
            copied = os.pwrite(target, chunk, position) if chunk else 0
        if copied == 0:
            raise ValueError(f"a spool file ends before byte {end}")
        offset += copied
        position += copied


def _commit_shard(store: ShardStore, shard: str, columns: dict[str, list[object]]) -> pa.Table:
    """Write the sidecar of the complete ``<shard>.tmp``, then rename the tar into place; return the sidecar."""
    table = pa.Table.from_pydict(columns, schema=SIDECAR_SCHEMA)
    store.write_atomic(sidecar_name(shard), parquet_bytes(table))
    store.rename(f"{shard}.tmp", shard)
    return table


def read_sidecars(store: ShardStore, shards: list[str], known: dict[str, pa.Table] | None = None) -> pa.Table:
    """The manifest rows (without 'index') of ``shards``, concatenated in the given order; sidecars in ``known``
    (shard name -> table, as just written) are not read back."""
    known = known or {}
    tables = [
        known[shard] if shard in known else
        pq.read_table(io.BytesIO(store.read_bytes(sidecar_name(shard))), schema=SIDECAR_SCHEMA) for shard in shards
    ]
    return pa.concat_tables(tables) if tables else SIDECAR_SCHEMA.empty_table()


def write_manifest(store: ShardStore, shards: list[str], known: dict[str, pa.Table] | None = None) -> pd.DataFrame:
    """Concatenate the sidecars of ``shards`` in order into ``manifest.parquet`` (index = row); return it.
    ``known``: sidecar tables already in memory (see ``read_sidecars``)."""
    rows = read_sidecars(store, shards, known)
    table = rows.add_column(0, MANIFEST_SCHEMA.field("index"), [pa.array(np.arange(rows.num_rows), pa.int64())])
    store.write_atomic(MANIFEST_NAME, parquet_bytes(table.cast(MANIFEST_SCHEMA)))
    return _manifest_frame(table)


def write_shards(samples: Iterable[Sample], output_dir: str | Path, samples_per_shard: int) -> pd.DataFrame:
    """Write already-valid ``samples`` as shards plus ``manifest.parquet`` (no ingest checks); return the manifest.

    For tests and benchmarks that hold samples in memory; the pipeline uses ``sela.data.ingest``. Earlier outputs are
    removed first (and again if writing fails), so the folder never mixes two runs. Raises ValueError for no
    samples, duplicate keys or keys WebDataset cannot read.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    samples = list(samples)
    if not samples:
        raise ValueError("no samples to write: the image source is empty")
    store = ShardStore(output_dir)
    remove_outputs(store)
    shards = []
    seen: dict[str, str] = {}
    try:
        for start in range(0, len(samples), samples_per_shard):
            chunk = samples[start : start + samples_per_shard]
            for sample in chunk:
                _check_sample(sample, seen)
                seen[sample.key] = sample.source_path
            shards.append(shard_name(len(shards)))
            members = [sample_member(sample.key, sample.extension, sample.image) for sample in chunk]
            rows = [_row_of(sample, shards[-1]) for sample in chunk]
            columns = {name: [row[name] for row in rows] for name in SIDECAR_SCHEMA.names}
            write_shard(store, shards[-1], members, columns)
        return write_manifest(store, shards)
    except BaseException:
        remove_outputs(store)
        raise


def _row_of(sample: Sample, shard: str) -> dict[str, object]:
    with Image.open(io.BytesIO(sample.image)) as image:
        width, height = image.size
    return {
        "key": sample.key,
        "shard": shard,
        "source_path": sample.source_path,
        "ground_truth": sample.ground_truth,
        "sha256": hashlib.sha256(sample.image).hexdigest(),
        "width": width,
        "height": height,
    }


def remove_outputs(store: ShardStore) -> None:
    """Delete shards, sidecars, temporary files, manifest and reports; other files are left alone."""
    for name in store.names():
        if name.startswith("shard-") or name.endswith(".tmp") or name in OUTPUT_NAMES:
            store.remove(name)




def read_manifest(output_dir: str | Path) -> pd.DataFrame:
    """Load ``manifest.parquet`` (string columns as pandas ``string`` dtype, missing ground truth as <NA>)."""
    store = ShardStore(output_dir)
    try:
        data = store.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {store.url(MANIFEST_NAME)}: run the shard stage first") from None
    return _manifest_frame(pq.read_table(io.BytesIO(data), schema=MANIFEST_SCHEMA))


def manifest_hash(output_dir: str | Path) -> str:
    """SHA-256 (hex) of the manifest file's bytes: it changes whenever any sample, key or shard split changes."""
    return hashlib.sha256(ShardStore(output_dir).read_bytes(MANIFEST_NAME)).hexdigest()


def shard_urls(output_dir: str | Path) -> list[str]:
    """The shard files the manifest names, sorted, as WebDataset URLs; raises FileNotFoundError if one is missing."""
    store = ShardStore(output_dir)
    names = sorted(set(read_manifest(output_dir)["shard"]))
    missing = [store.url(name) for name in names if not store.exists(name)]
    if missing:
        raise FileNotFoundError(f"shards listed in {store.url(MANIFEST_NAME)} are missing: {', '.join(missing)}")
    return [store.url(name) for name in names]


def record_image_field(record: dict[str, object]) -> str:
    """The name of the one image field of a record; raises ValueError for none or several."""
    fields = [name for name in record if not name.startswith("_")]
    if len(fields) != 1:
        raise ValueError(
            f"{record['__url__']}: sample {record['__key__']!r} has fields {sorted(record)}, expected one image"
        )
    return fields[0]


def shard_records(shards: Iterable[dict[str, str]]) -> Iterator[dict[str, object]]:
    """WebDataset pipeline stage: ``{"url": ...}`` items -> records ``{"__key__", "__url__", <ext>: bytes}``.

    Replaces ``webdataset.tarfile_to_samples`` (a ``tarfile`` walk: 5x the CPU per member, and 1.8x the CPU of a
    whole ``read_shards`` on CIFAR: ``benchmarks/shard.py``, docs/shards.md) for shards of regular files, with the
    same records (tested against webdataset's own reader); URLs open through WebDataset's ``gopen``, so the fsspec
    schemes of ``sela.data.remote`` work. Members of one sample are consecutive and share the key before the first
    dot of the file name.
    """
    remote.register_gopen()
    for shard in shards:
        url = shard["url"]
        with webdataset.gopen(url, "rb") as stream:
            yield from _grouped_records(read_members(stream), url)


def _grouped_records(members: Iterator[tuple[str, bytes]], url: str) -> Iterator[dict[str, object]]:
    record: dict[str, object] = {}
    for name, payload in members:
        folder, _, file_name = name.rpartition("/")
        stem, dot, extension = file_name.partition(".")
        if not dot:
            raise ValueError(f"{url}: member {name!r} has no extension")
        key = f"{folder}/{stem}" if folder else stem
        if record and record["__key__"] != key:
            yield record
            record = {}
        if extension in record:
            raise ValueError(f"{url}: sample {key!r} has two {extension!r} members")
        record.setdefault("__key__", key)
        record.setdefault("__url__", url)
        record[extension] = payload
    if record:
        yield record


def iter_shard_samples(output_dir: str | Path) -> Iterator[Sample]:
    """Yield the samples stored in the shards of ``output_dir``, in shard file order, metadata from the manifest.

    Raises ValueError for a shard sample the manifest does not list.
    """
    manifest = read_manifest(output_dir)
    metadata = {
        key: (None if pd.isna(truth) else str(truth), str(source))
        for key, truth, source in zip(manifest["key"], manifest["ground_truth"], manifest["source_path"], strict=True)
    }
    # No node/worker splitting: this reads every sample, even inside a DDP rank or a loader worker.
    for record in shard_records({"url": url} for url in shard_urls(output_dir)):
        key = str(record["__key__"])
        if key not in metadata:
            raise ValueError(f"{output_dir}: shard sample {key!r} is not in the manifest")
        extension = record_image_field(record)
        ground_truth, source_path = metadata[key]
        yield Sample(key, bytes(record[extension]), extension, ground_truth, source_path)


def read_shards(output_dir: str | Path, image_size: int) -> LoadedShards:
    """Decode every sample to uint8 (N, image_size, image_size, 3); row i holds the manifest row with index i.

    Raises ValueError when shards and manifest disagree (a key missing on either side, a duplicate key).
    """
    # Rows are addressed by their 'index', not by where they sit in the file.
    manifest = read_manifest(output_dir).sort_values("index", kind="stable", ignore_index=True)
    count = len(manifest)
    if not np.array_equal(manifest["index"].to_numpy(), np.arange(count)):
        raise ValueError(f"{output_dir}/{MANIFEST_NAME}: column 'index' is not a permutation of 0..{count - 1}")
    keys = manifest["key"].tolist()
    ground_truth = [None if pd.isna(value) else str(value) for value in manifest["ground_truth"]]
    row_of_key = {key: row for row, key in enumerate(keys)}
    images = np.zeros((count, image_size, image_size, 3), dtype=np.uint8)
    filled = np.zeros(count, dtype=bool)
    for sample in iter_shard_samples(output_dir):
        row = row_of_key[sample.key]  # iter_shard_samples checked that the manifest lists it
        if filled[row]:
            raise ValueError(f"{output_dir}: key {sample.key!r} appears twice in the shards")
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
    if not _VALID_EXTENSION.fullmatch(sample.extension):
        raise ValueError(f"{sample.source_path}: image extension {sample.extension!r} is not allowed")
    if sample.key in source_of_key:
        raise ValueError(f"duplicate key {sample.key!r}: {source_of_key[sample.key]} and {sample.source_path}")


def _manifest_frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper=lambda arrow_type: pd.StringDtype() if arrow_type == pa.string() else None)
