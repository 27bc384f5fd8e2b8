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

import gc
import json
import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice

import pandas as pd
import pyarrow as pa

from sela import remote
from sela.config import ShardParams
from sela.data import SourceFile, SourceListing, iter_payloads, list_source
from sela.images import (
    BatchResult,
    ImageLimits,
    WorkBatch,
    WorkList,
    inspect_batch,
    inspect_in_worker,
    start_worker,
)
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
# Files per process-pool task: large enough to amortise the task round trip, small enough to keep all workers busy
# to the end (the last batch runs alone: 1024 small files take a worker about 30 ms).
_BATCH = 1024
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
    with _cyclic_gc_paused():
        return _ingest(params, output, workers, progress)


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (reference counting still frees everything ingest drops).

    A run creates a few objects per file (the listing, the manifest columns), and each full collection walks every
    object of the process (a Prefect or pandas process: hundreds of thousands): 0.1 s, a tenth of the run on
    CIFAR-10. Forked workers inherit the pause and switch the collector back on (``sela.images.start_worker``)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _ingest(params: ShardParams, output: str, workers: int, progress: Callable[[int], None] | None) -> IngestReport:
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
        work = _work_list(listing.files, set(stored["key"]), limits, spool)
        results = _ordered_results(work, _work_batches(listing), workers)
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


def _work_list(files: list[SourceFile], stored_keys: set[str], limits: ImageLimits, spool: str) -> WorkList:
    """The workers' view of the listing: paths to read, member keys, files only hashed, key clashes."""
    keys = [file.key for file in files]
    paths = [file.locator if file.kind == "local" else None for file in files]
    hash_only = frozenset(index for index, key in enumerate(keys) if key in stored_keys) if stored_keys else None
    return WorkList(paths, keys, limits, spool, hash_only or frozenset(), _key_clashes(files, keys))


def _key_clashes(files: list[SourceFile], keys: list[str]) -> dict[int, str]:
    """Reasons for files whose key an earlier file already has (names equal after NFC): the first one is kept.
    The listing is sorted by key, so clashing files are neighbours."""
    if len(set(keys)) == len(keys):  # the usual case, in C
        return {}
    reasons: dict[int, str] = {}
    owner = files[0].source_path
    for index in range(1, len(files)):
        if keys[index] != keys[index - 1]:
            owner = files[index].source_path
        else:
            reasons[index] = f"same key as {owner} (names equal after normalisation)"
    return reasons


def _work_batches(listing: SourceListing) -> Iterator[WorkBatch]:
    """Work batches of ``_BATCH`` files in listing order; a batch carries the bytes this process reads (archive
    members, remote files, digits), and is only an index range when every file is local."""
    count = len(listing.files)
    if listing.archive is None and all(file.kind == "local" for file in listing.files):
        for start in range(0, count, _BATCH):
            yield WorkBatch(start, min(start + _BATCH, count))
        return
    payloads = iter_payloads(listing)
    for start in range(0, count, _BATCH):
        datas = [data for _, data in islice(payloads, _BATCH)]
        yield WorkBatch(start, start + len(datas), datas)


def _ordered_results(work: WorkList, batches: Iterator[WorkBatch], workers: int) -> Iterator[BatchResult]:
    """``inspect_batch`` over ``batches`` in input order, with at most ``2 * workers`` batches in flight."""
    if workers == 1:
        for batch in batches:
            yield inspect_batch(work, batch)
        return
    # fork: workers start in milliseconds with everything imported and inherit the work list (created after the
    # listing, so a task is an index range); spawn/forkserver would re-import the caller's __main__ (a Prefect
    # flow module: seconds per worker) and pickle the listing. Workers run only sela.images (no locks, no threads).
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=start_worker, initargs=(work,)) as pool:
        in_flight: deque[Future[BatchResult]] = deque()
        for batch in batches:
            in_flight.append(pool.submit(inspect_in_worker, batch))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


class _Packer:
    """Collects accepted samples and writes a shard every ``samples_per_shard`` of them.

    A sample's tar member stays in its batch's spool file: the packer keeps byte ranges (consecutive members of a
    file merged into one range) and deletes a spool file once every member in it is in a written shard. Manifest
    rows are kept as columns (``COLUMNS``), extended a run of samples at a time.
    """

    COLUMNS = ("key", "source_path", "ground_truth", "sha256", "width", "height")

    def __init__(self, store: ShardStore, samples_per_shard: int, first_number: int) -> None:
        self.store = store
        self.samples_per_shard = samples_per_shard
        self.next_number = first_number
        self.ranges: list[list] = []  # [spool file, offset, length]
        self.columns: list[list] = [[] for _ in self.COLUMNS]
        self.count = 0  # samples in the shard being filled
        self.consumed: list[str] = []  # spool files read to the end, still holding members of the next shard
        self.written: list[str] = []
        self.sidecars: dict[str, pa.Table] = {}  # of the written shards, for the manifest

    def add(self, spool: str, offset: int, sizes: Sequence[int], columns: Sequence[Sequence[object]]) -> None:
        """Accepted samples whose tar members lie back to back from ``offset`` of ``spool`` (``sizes`` bytes
        each), with their manifest ``columns`` in ``COLUMNS`` order; a run may fill several shards."""
        done = 0
        while done < len(sizes):
            take = min(len(sizes) - done, self.samples_per_shard - self.count)
            length = sum(sizes[done : done + take])
            self._add_range(spool, offset, length)
            for column, values in zip(self.columns, columns, strict=True):
                column.extend(values[done : done + take])
            self.count += take
            offset += length
            done += take
            if self.count == self.samples_per_shard:
                self.flush()

    def _add_range(self, spool: str, offset: int, length: int) -> None:
        last = self.ranges[-1] if self.ranges else None
        if last is not None and last[0] == spool and last[1] + last[2] == offset:
            last[2] += length
        else:
            self.ranges.append([spool, offset, length])

    def spool_done(self, spool: str) -> None:
        """Every member of ``spool`` has been routed: delete it now, or after the shard that still needs it."""
        if self.ranges and self.ranges[-1][0] == spool:
            self.consumed.append(spool)
        else:
            os.remove(spool)

    def flush(self) -> None:
        if self.count:
            shard = shard_name(self.next_number)
            columns = dict(zip(self.COLUMNS, self.columns, strict=True))
            columns["shard"] = [shard] * self.count
            ranges = [(path, offset, size) for path, offset, size in self.ranges]
            self.sidecars[shard] = write_shard_from_files(self.store, shard, ranges, columns)
            self.written.append(shard)
            self.next_number += 1
            self.ranges, self.columns, self.count = [], [[] for _ in self.COLUMNS], 0
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
    router = _Router(files, stored, packer)
    start = 0
    for result in results:
        router.route(start, result)
        start += len(result.reasons)
        if progress is not None:
            progress(len(result.reasons))
    if start != len(files):
        raise RuntimeError(f"ingest workers returned {start} results for {len(files)} files listed")
    return router.quarantine


class _Router:
    """Decides, in key order, whether each inspected file becomes a sample or a quarantine line.

    The duplicate and changed-file policies need the files before it: ``owner_of_sha`` maps every sample's
    sha256 (stored ones included) to its source path. A batch of new, distinct, accepted images, the usual case,
    is routed in whole columns (C loops); any other batch file by file.
    """

    def __init__(self, files: list[SourceFile], stored: pd.DataFrame, packer: _Packer) -> None:
        self.files = files
        self.packer = packer
        self.stored_sha = dict(zip(stored["key"], stored["sha256"], strict=True))
        self.owner_of_sha = dict(zip(stored["sha256"], stored["source_path"], strict=False))
        # Manifest columns of the listing, sliced per batch.
        self.keys, self.source_paths, self.ground_truth = ([file[i] for file in files] for i in range(3))
        self.quarantine: list[dict[str, str]] = []

    def route(self, start: int, result: BatchResult) -> None:
        """Route the outcomes of files ``start`` onwards (one batch)."""
        if self._all_new_samples(result):
            stop = start + len(result.reasons)
            paths = self.source_paths[start:stop]
            self.owner_of_sha.update(zip(result.sha256, paths, strict=True))
            columns = (self.keys[start:stop], paths, self.ground_truth[start:stop], result.sha256, result.widths,
                       result.heights)
            assert result.spool is not None  # every file has a member
            self.packer.add(result.spool, 0, result.member_sizes, columns)
        else:
            self._route_each(start, result)
        if result.spool is not None:
            self.packer.spool_done(result.spool)

    def _all_new_samples(self, result: BatchResult) -> bool:
        """Every file accepted with a member (none only hashed), no sha256 twice nor seen before."""
        shas = result.sha256
        return (result.reasons.count(None) == len(shas) and 0 not in result.member_sizes
                and len(set(shas)) == len(shas) and self.owner_of_sha.keys().isdisjoint(shas))

    def _route_each(self, start: int, result: BatchResult) -> None:
        offset = 0
        columns = (result.sha256, result.reasons, result.widths, result.heights, result.member_sizes)
        for index, (sha256, reason, width, height, size) in enumerate(zip(*columns, strict=True), start):
            file = self.files[index]
            stored = self.stored_sha.get(file.key)
            if reason is None and stored is not None:
                if sha256 != stored:
                    reason = f"changed since ingested (stored sha256 {stored[:12]}...; old sample kept)"
            elif reason is None and sha256 in self.owner_of_sha:
                reason = f"duplicate of {self.owner_of_sha[sha256]}"
            elif reason is None:
                assert result.spool is not None  # an accepted new image has a member
                self.owner_of_sha[sha256] = file.source_path
                row = ((file.key,), (file.source_path,), (file.ground_truth,), (sha256,), (width,), (height,))
                self.packer.add(result.spool, offset, (size,), row)
            if reason is not None:
                self.quarantine.append({"path": file.source_path, "key": file.key, "reason": reason})
            offset += size
