"""Ingest: every file of a source -> a sample in a shard or a quarantine line; incremental and resumable.

One run:

1. list the source (``sela.data.list_source``), sorted by key;
2. if ``ingest.json`` in the output records other parameters (or source), start from scratch; otherwise keep the
   finished shards (a ``shard-N.tar`` exists only once complete) and drop half-written files;
3. decode-validate the files not yet in a shard on all cores (``sela.images``), in key order, and pack the accepted
   ones into new shards numbered after the last one; files already in a shard are only hashed. Workers spool the
   tar members of each batch to a file (``.spool/`` in a local output, a local temporary folder for a remote
   one) and return only metadata: this process copies byte ranges of the spool files into the shards
   (in the kernel for a local output) and never holds the image bytes;
4. write ``manifest.parquet`` (every sample, old shards first), ``quarantine.parquet`` (path, key, reason: every
   input file that is not a sample) and ``removed.parquet`` (samples whose file is gone from the source).

Policies: an exact duplicate (same sha256 as an earlier file in key order or as a stored sample) is quarantined
as ``duplicate of <path>``; a file whose bytes changed since it was stored is quarantined as ``changed`` (its old
sample stays: delete the shard folder to re-ingest from scratch); a removed file's sample stays in its shard and
in the manifest (label sets keep joining) and is listed in ``removed.parquet``. Output is the same for any number
of workers, and a killed run resumed gives the same bytes as an uninterrupted one.
"""

import json
import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice

import pandas as pd
import pyarrow as pa

from sela import remote
from sela.config import ShardParams
from sela.data import SourceFile, iter_payloads, list_source
from sela.images import BatchResult, ImageLimits, WorkBatch, inspect_batch
from sela.shards import (
    QUARANTINE_NAME,
    REMOVED_NAME,
    STATE_NAME,
    ShardStore,
    parquet_bytes,
    read_sidecars,
    remove_outputs,
    shard_name,
    write_manifest,
    write_shard_from_files,
)

QUARANTINE_SCHEMA = pa.schema(
    [pa.field("path", pa.string(), nullable=False), pa.field("key", pa.string(), nullable=False),
     pa.field("reason", pa.string(), nullable=False)]
)
REMOVED_SCHEMA = pa.schema(
    [pa.field("key", pa.string(), nullable=False), pa.field("source_path", pa.string(), nullable=False),
     pa.field("shard", pa.string(), nullable=False)]
)
# Files per process-pool task: large enough to amortise the task round trip, small enough to keep all workers busy.
_BATCH = 256
_STATE_VERSION = 2  # 2: one member per sample (metadata only in the manifest)
# Folder of a local output where workers spool the tar members of their batches (a local temporary folder for a
# remote output); removed when the run ends, and by the next run after a killed one.
SPOOL_NAME = ".spool"


@dataclass(frozen=True)
class IngestReport:
    """What a run did: ``manifest`` (all samples), ``quarantine`` (path, key, reason), ``removed`` (key,
    source_path, shard); ``inputs`` files listed; shards written now and kept from earlier runs."""

    manifest: pd.DataFrame
    quarantine: pd.DataFrame
    removed: pd.DataFrame
    inputs: int
    written_shards: list[str]
    kept_shards: list[str]
    restarted: bool


def ingest(
    params: ShardParams, output: str, workers: int, progress: Callable[[int], None] | None = None
) -> IngestReport:
    """Ingest ``params.source`` into the shard folder ``output`` (a path or fsspec URL); see the module docstring.

    ``workers`` processes decode (1: in this process); ``progress`` is called with the number of files done.
    """
    if workers < 1:
        raise ValueError(f"workers must be positive, got {workers}")
    listing = list_source(params.source, params.image_size)
    store = ShardStore(output)
    restarted = _prepare(store, params)
    kept_shards = store.finished_shards()
    stored = read_sidecars(store, kept_shards).to_pandas()
    limits = ImageLimits(min_side=params.min_side, max_side=params.max_side)
    local = remote.is_local(store.filesystem)
    spool = store.path(SPOOL_NAME) if local else tempfile.mkdtemp(prefix="sela-spool-")
    os.makedirs(spool, exist_ok=True)
    try:
        batches = _work_batches(iter_payloads(listing), set(stored["key"]), spool)
        results = _ordered_results(batches, limits, workers)
        packer = _Packer(store, params.samples_per_shard, first_number=len(kept_shards))
        quarantine = _pack(listing.files, results, stored, packer, progress)
        packer.flush()
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    manifest = write_manifest(store, kept_shards + packer.written, packer.sidecars)
    listed = {file.key for file in listing.files}
    gone = [key not in listed for key in stored["key"]]  # a set lookup: pandas' isin on strings is 10x slower
    removed = stored.loc[gone, ["key", "source_path", "shard"]].reset_index(drop=True)
    _write_reports(store, quarantine, removed)
    return IngestReport(
        manifest=manifest,
        quarantine=pd.DataFrame(quarantine, columns=QUARANTINE_SCHEMA.names),
        removed=removed,
        inputs=len(listing.files),
        written_shards=packer.written,
        kept_shards=kept_shards,
        restarted=restarted,
    )


def _write_reports(store: ShardStore, quarantine: list[dict[str, str]], removed: pd.DataFrame) -> None:
    """``quarantine.parquet`` and ``removed.parquet`` (schema fixed, no pandas metadata: stable bytes)."""
    store.write_atomic(QUARANTINE_NAME, parquet_bytes(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA)))
    removed_table = pa.Table.from_pandas(removed, schema=REMOVED_SCHEMA, preserve_index=False)
    store.write_atomic(REMOVED_NAME, parquet_bytes(removed_table.replace_schema_metadata(None)))


def _prepare(store: ShardStore, params: ShardParams) -> bool:
    """Start over if the recorded parameters differ (True), else keep finished shards; drop half-written files."""
    state = json.dumps({"version": _STATE_VERSION, **params.model_dump()}, sort_keys=True).encode()
    restarted = store.exists(STATE_NAME) and store.read_bytes(STATE_NAME) != state
    if restarted or not store.exists(STATE_NAME):
        remove_outputs(store)
    finished = set(store.finished_shards())
    for name in store.names():
        # Temporary files, spooled members and sidecars whose tar was never renamed belong to an interrupted run.
        orphan_sidecar = name.startswith("shard-") and name.endswith(".parquet") and name[:-8] + ".tar" not in finished
        if name == SPOOL_NAME:
            store.filesystem.rm(store.path(name), recursive=True)
        elif name.endswith(".tmp") or orphan_sidecar:
            store.remove(name)
    store.write_atomic(STATE_NAME, state)
    return restarted


def _work_batches(
    payloads: Iterator[tuple[SourceFile, bytes | None]], stored_keys: set[str], spool: str
) -> Iterator[WorkBatch]:
    """Work batches of ``_BATCH`` files in listing order, each spooling its members to its own file in the folder
    ``spool``; key clashes (names equal after NFC) are decided here."""
    owner_of_key: dict[str, str] = {}
    for number, chunk in enumerate(iter(lambda: list(islice(payloads, _BATCH)), [])):
        batch = WorkBatch([], [], [], [], [], f"{spool}/batch-{number:08d}.bin")
        for file, data in chunk:
            owner = owner_of_key.get(file.key)
            if owner is None:
                owner_of_key[file.key] = file.source_path
            batch.paths.append(file.locator if file.kind == "local" and owner is None else None)
            batch.datas.append(data if owner is None else None)
            batch.hash_only.append(file.key in stored_keys)
            batch.reasons.append(None if owner is None else f"same key as {owner} (names equal after normalisation)")
            batch.keys.append(file.key)
        yield batch


def _ordered_results(batches: Iterator[WorkBatch], limits: ImageLimits, workers: int) -> Iterator[BatchResult]:
    """``inspect_batch`` over ``batches`` in input order, with at most ``2 * workers`` batches in flight."""
    if workers == 1:
        for batch in batches:
            yield inspect_batch(batch, limits)
        return
    # fork: workers start in milliseconds with everything imported; spawn/forkserver would re-import the caller's
    # __main__ (a Prefect flow module: seconds per worker). Workers run only sela.images (no locks, no threads).
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        in_flight: deque[Future[BatchResult]] = deque()
        for batch in batches:
            in_flight.append(pool.submit(inspect_batch, batch, limits))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


class _Packer:
    """Collects accepted samples and writes a shard every ``samples_per_shard`` of them.

    A sample's tar member stays in its batch's spool file: the packer keeps byte ranges (consecutive members of a
    file merged into one range) and deletes a spool file once every member in it is in a written shard.
    """

    def __init__(self, store: ShardStore, samples_per_shard: int, first_number: int) -> None:
        self.store = store
        self.samples_per_shard = samples_per_shard
        self.next_number = first_number
        self.ranges: list[list] = []  # [spool file, offset, length]
        self.rows: list[tuple[str, str, str | None, str, int, int]] = []
        self.consumed: list[str] = []  # spool files read to the end, still holding members of the next shard
        self.written: list[str] = []
        self.sidecars: dict[str, pa.Table] = {}  # of the written shards, for the manifest

    def add(self, file: SourceFile, sha256: str, width: int, height: int, spool: str, offset: int, size: int) -> None:
        """One accepted sample: its tar member (``size`` bytes at ``offset`` of ``spool``) and its manifest row."""
        last = self.ranges[-1] if self.ranges else None
        if last is not None and last[0] == spool and last[1] + last[2] == offset:
            last[2] += size
        else:
            self.ranges.append([spool, offset, size])
        self.rows.append((file.key, file.source_path, file.ground_truth, sha256, width, height))
        if len(self.rows) == self.samples_per_shard:
            self.flush()

    def spool_done(self, spool: str) -> None:
        """Every member of ``spool`` has been routed: delete it now, or after the shard that still needs it."""
        if self.ranges and self.ranges[-1][0] == spool:
            self.consumed.append(spool)
        else:
            os.remove(spool)

    def flush(self) -> None:
        if self.rows:
            shard = shard_name(self.next_number)
            # Rows transposed in C into the sidecar's columns: a dict per row costs more than the rest of the packing.
            keys, source_paths, ground_truth, sha256, widths, heights = map(list, zip(*self.rows, strict=True))
            columns = {"key": keys, "shard": [shard] * len(keys), "source_path": source_paths,
                       "ground_truth": ground_truth, "sha256": sha256, "width": widths, "height": heights}
            ranges = [(path, offset, size) for path, offset, size in self.ranges]
            self.sidecars[shard] = write_shard_from_files(self.store, shard, ranges, columns)
            self.written.append(shard)
            self.next_number += 1
            self.ranges, self.rows = [], []
        for spool in self.consumed:
            os.remove(spool)
        self.consumed = []


def _pack(
    files: list[SourceFile],
    results: Iterator[BatchResult],
    stored: pd.DataFrame,
    packer: _Packer,
    progress: Callable[[int], None] | None,
) -> list[dict[str, str]]:
    """Route each file's result to the packer or the quarantine list (returned, in key order)."""
    stored_sha = dict(zip(stored["key"], stored["sha256"], strict=True))
    owner_of_sha = dict(zip(stored["sha256"], stored["source_path"], strict=False))
    quarantine: list[dict[str, str]] = []
    remaining = iter(files)
    for result in results:
        offset = 0
        batch_files = list(islice(remaining, len(result.reasons)))
        columns = (result.sha256, result.reasons, result.widths, result.heights, result.member_sizes)
        outcomes = zip(batch_files, *columns, strict=True)
        for file, sha256, reason, width, height, size in outcomes:
            if reason is None and file.key in stored_sha:
                if sha256 != stored_sha[file.key]:
                    reason = f"changed since ingested (stored sha256 {stored_sha[file.key][:12]}...; old sample kept)"
            elif reason is None and sha256 in owner_of_sha:
                reason = f"duplicate of {owner_of_sha[sha256]}"
            elif reason is None:
                owner_of_sha[sha256] = file.source_path
                packer.add(file, sha256, width, height, result.spool, offset, size)
            if reason is not None:
                quarantine.append({"path": file.source_path, "key": file.key, "reason": reason})
            offset += size
        if result.spool is not None:
            packer.spool_done(result.spool)
        if progress is not None:
            progress(len(result.reasons))
    if next(remaining, None) is not None:
        raise RuntimeError("ingest workers returned fewer results than files listed")
    return quarantine
