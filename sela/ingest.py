"""Ingest: every file of a source -> a sample in a shard or a quarantine line; incremental and resumable.

One run:

1. list the source (``sela.data.list_source``), sorted by key;
2. if ``ingest.json`` in the output records other parameters (or source), start from scratch; otherwise keep the
   finished shards (a ``shard-N.tar`` exists only once complete) and drop half-written files;
3. decode-validate the files not yet in a shard on all cores (``sela.images``), in key order, and pack the accepted
   ones into new shards numbered after the last one; files already in a shard are only hashed;
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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice

import pandas as pd
import pyarrow as pa

from sela.config import ShardParams
from sela.data import SourceFile, iter_payloads, list_source
from sela.images import ImageLimits, Inspected, WorkItem, inspect_batch
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
    write_shard,
)

QUARANTINE_SCHEMA = pa.schema(
    [pa.field("path", pa.string(), nullable=False), pa.field("key", pa.string(), nullable=False),
     pa.field("reason", pa.string(), nullable=False)]
)
REMOVED_SCHEMA = pa.schema(
    [pa.field("key", pa.string(), nullable=False), pa.field("source_path", pa.string(), nullable=False),
     pa.field("shard", pa.string(), nullable=False)]
)
# Files per process-pool task: large enough to amortise pickling, small enough to keep all workers busy.
_BATCH = 64
_STATE_VERSION = 2  # 2: one member per sample (metadata only in the manifest)


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
    items = _work_items(iter_payloads(listing), set(stored["key"]))
    results = _ordered_results(items, limits, workers)
    packer = _Packer(store, params.samples_per_shard, first_number=len(kept_shards))
    quarantine = _pack(listing.files, results, stored, packer, progress)
    packer.flush()
    manifest = write_manifest(store, kept_shards + packer.written)
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
        # Temporary files and sidecars whose tar was never renamed belong to an interrupted run.
        orphan_sidecar = name.startswith("shard-") and name.endswith(".parquet") and name[:-8] + ".tar" not in finished
        if name.endswith(".tmp") or orphan_sidecar:
            store.remove(name)
    store.write_atomic(STATE_NAME, state)
    return restarted


def _work_items(payloads: Iterable[tuple[SourceFile, bytes | None]], stored_keys: set[str]) -> Iterator[WorkItem]:
    """One work item per file in listing order; key clashes (names equal after NFC) are decided here."""
    owner_of_key: dict[str, str] = {}
    for file, data in payloads:
        if file.key in owner_of_key:
            yield WorkItem(None, reason=f"same key as {owner_of_key[file.key]} (names equal after normalisation)")
            continue
        owner_of_key[file.key] = file.source_path
        path = file.locator if file.kind == "local" else None
        yield WorkItem(path, data, file.key in stored_keys, None, file.key)


def _ordered_results(items: Iterator[WorkItem], limits: ImageLimits, workers: int) -> Iterator[Inspected]:
    """``inspect_batch`` over ``items`` in input order, with at most ``2 * workers`` batches in flight."""
    batches = iter(lambda: list(islice(items, _BATCH)), [])
    if workers == 1:
        for batch in batches:
            yield from inspect_batch(batch, limits)
        return
    # fork: workers start in milliseconds with everything imported; spawn/forkserver would re-import the caller's
    # __main__ (a Prefect flow module: seconds per worker). Workers run only sela.images (no locks, no threads).
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        in_flight: deque[Future[list[Inspected]]] = deque()
        for batch in batches:
            in_flight.append(pool.submit(inspect_batch, batch, limits))
            if len(in_flight) >= 2 * workers:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()


class _Packer:
    """Collects accepted samples and writes a shard every ``samples_per_shard`` of them."""

    def __init__(self, store: ShardStore, samples_per_shard: int, first_number: int) -> None:
        self.store = store
        self.samples_per_shard = samples_per_shard
        self.next_number = first_number
        self.members: list[bytes] = []
        self.rows: list[dict[str, object]] = []
        self.written: list[str] = []

    def add(self, file: SourceFile, result: Inspected) -> None:
        shard = shard_name(self.next_number)
        self.members.append(result.member)
        self.rows.append(
            {"key": file.key, "shard": shard, "source_path": file.source_path, "ground_truth": file.ground_truth,
             "sha256": result.sha256, "width": result.width, "height": result.height}
        )
        if len(self.members) == self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.members:
            return
        shard = shard_name(self.next_number)
        write_shard(self.store, shard, self.members, self.rows)
        self.written.append(shard)
        self.next_number += 1
        self.members, self.rows = [], []


def _pack(
    files: list[SourceFile],
    results: Iterator[Inspected],
    stored: pd.DataFrame,
    packer: _Packer,
    progress: Callable[[int], None] | None,
) -> list[dict[str, str]]:
    """Route each result to the packer or the quarantine list (returned, in key order)."""
    stored_sha = dict(zip(stored["key"], stored["sha256"], strict=True))
    owner_of_sha = dict(zip(stored["sha256"], stored["source_path"], strict=False))
    quarantine: list[dict[str, str]] = []
    for file, result in zip(files, results, strict=True):
        reason = result.reason
        if reason is None and file.key in stored_sha:
            if result.sha256 != stored_sha[file.key]:
                reason = f"changed since ingested (stored sha256 {stored_sha[file.key][:12]}...; old sample kept)"
        elif reason is None and result.sha256 in owner_of_sha:
            reason = f"duplicate of {owner_of_sha[result.sha256]}"
        elif reason is None:
            owner_of_sha[result.sha256] = file.source_path
            packer.add(file, result)
        if reason is not None:
            quarantine.append({"path": file.source_path, "key": file.key, "reason": reason})
        if progress is not None:
            progress(1)
    return quarantine
