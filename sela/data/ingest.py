"""Ingest: every file of a source -> a sample in a shard or a quarantine line; incremental and resumable.

One run:

1. list the source sorted by key (``sela.data.sources``): a local folder lazily, folder by folder (``folder_runs``), so
   the workers decode its first files while the rest is listed; any other source at once (``list_source``);
2. if ``ingest.json`` in the output records other parameters (or source), start from scratch; otherwise keep the
   finished shards (a ``shard-N.tar`` exists only once complete) and drop half-written files;
3. decode-validate the files not yet in a shard on all cores (``sela.data.images``), in key order, and pack the accepted
   ones into new shards numbered after the last one; files already in a shard are only hashed. A task is a batch
   of 1024 files as a few lists (paths, keys); workers spool the tar members of each batch to a file (``.spool/``
   in a local output, a local temporary folder for a remote one) and return only metadata columns: this process
   routes a batch of new, distinct images in whole columns, copies byte ranges of the spool files into the shards
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
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import chain, islice
from operator import itemgetter

import pandas as pd
import pyarrow as pa

from sela.data import remote
from sela.config import ShardParams
from sela.data.sources import SourceFile, SourceListing, folder_runs, iter_payloads, list_source
from sela.data.images import BatchResult, ImageLimits, WorkBatch, inspect_batch, start_worker
from sela.data.shards import (
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
# to the end (the last batch runs alone: 1024 small files take a worker about 30 ms). A shard's worth when that is
# near it (``_batch_size``).
_BATCH = 1024
_STATE_VERSION = 3  # 2: one member per sample (metadata only in the manifest); 3: webdataset.TarWriter's ustar headers
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
    CIFAR-10. Forked workers inherit the pause and switch the collector back on (``sela.data.images.start_worker``)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _ingest(params: ShardParams, output: str, workers: int, progress: Callable[[int], None] | None) -> IngestReport:
    listing, runs = _listed(params.source, params.image_size)
    store = ShardStore(output)
    restarted = _prepare(store, params)
    kept_shards = store.finished_shards()
    stored = read_sidecars(store, kept_shards).to_pandas()
    limits = ImageLimits(min_side=params.min_side, max_side=params.max_side)
    local = remote.is_local(store.filesystem)
    spool = store.path(SPOOL_NAME) if local else tempfile.mkdtemp(prefix="sela-spool-")
    os.makedirs(spool, exist_ok=True)
    packer = _Packer(store, params.samples_per_shard, first_number=len(kept_shards))
    router = _Router(stored, packer)
    with _worker_pool(workers) as pool:
        try:
            size = _batch_size(params.samples_per_shard, local=listing is None)
            batches = _work_batches(runs, listing, set(stored["key"]), spool, size)
            for files, result in _ordered_results(batches, limits, pool, workers):
                router.route(files, result)
                if progress is not None:
                    progress(len(files))
            packer.flush()
        finally:
            shutil.rmtree(spool, ignore_errors=True)
        if pool is not None:
            pool.shutdown(wait=False)  # the workers exit while the manifest is written; joined at the end
        manifest = write_manifest(store, kept_shards + packer.written, packer.sidecars)
        gone = [key not in router.listed for key in stored["key"]]  # a set lookup: pandas' isin is 10x slower
        removed = stored.loc[gone, ["key", "source_path", "shard"]].reset_index(drop=True)
        _write_reports(store, router.quarantine, removed)
    return IngestReport(
        manifest=manifest,
        quarantine=pd.DataFrame(router.quarantine, columns=QUARANTINE_SCHEMA.names),
        removed=removed,
        inputs=router.inputs,
        written_shards=packer.written,
        kept_shards=kept_shards,
        restarted=restarted,
    )


def _listed(source: str, image_size: int) -> tuple[SourceListing | None, Iterator[list[SourceFile]]]:
    """The source's files in key order, as runs: a local folder is listed lazily (``folder_runs``: its first files
    are decoded while the rest is listed), any other source at once (its listing, to read the bytes from, and
    one run). Raises as ``list_source`` does, before anything is written."""
    runs = folder_runs(source)
    if runs is None:
        listing = list_source(source, image_size)
        return listing, iter([listing.files])
    first = next(runs, None)
    if first is None:
        list_source(source, image_size)  # raises: the source holds no files
    return None, chain([first], runs)


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
    runs: Iterator[list[SourceFile]], listing: SourceListing | None, stored_keys: set[str], spool: str, size: int
) -> Iterator[tuple[list[SourceFile], WorkBatch]]:
    """(files, their work batch) for every ``size`` files in key order, each batch spooling its members to its
    own file in the folder ``spool``. The bytes of files that are not local are read here (``listing``: their
    source); a file already in a shard (its key in ``stored_keys``) is only hashed."""
    payloads = None if listing is None else iter_payloads(listing)
    clashes = _KeyClashes()
    for number, files in enumerate(_chunks(runs, size)):
        keys = [file.key for file in files]
        paths = [file.locator if file.kind == "local" else None for file in files]
        datas = None if payloads is None else [data for _, data in islice(payloads, len(files))]
        hash_only = frozenset(index for index, key in enumerate(keys) if key in stored_keys) if stored_keys else None
        batch = WorkBatch(paths, keys, f"{spool}/batch-{number:08d}.bin", datas, hash_only or frozenset(),
                          clashes.reasons(files, keys))
        yield files, batch


def _batch_size(samples_per_shard: int, local: bool) -> int:
    """Files per batch: a shard's worth if that is within 4x of ``_BATCH``: a batch of new, distinct images then
    fills a shard exactly and its spool file becomes the shard by a rename (no copy). Else ``_BATCH``. A quarter of
    that where this process reads the files (not ``local``): their bytes travel with the batch (``2 * workers``
    batches in flight)."""
    size = samples_per_shard if _BATCH // 4 <= samples_per_shard <= _BATCH * 4 else _BATCH
    return size if local else max(1, size // 4)


def _chunks(runs: Iterator[list[SourceFile]], size: int) -> Iterator[list[SourceFile]]:
    """The files of ``runs`` in lists of ``size`` (the last one shorter)."""
    pending: list[SourceFile] = []
    for run in runs:
        pending += run
        while len(pending) >= size:
            yield pending[:size]
            del pending[:size]
    if pending:
        yield pending


class _KeyClashes:
    """Reasons for files whose key an earlier file already has (names equal after NFC): the first one is kept.
    Files come in key order, so clashing files are neighbours, possibly at the end of one batch and the start of
    the next."""

    def __init__(self) -> None:
        self.last_key: str | None = None
        self.owner = ""  # source path of the first file with last_key

    def reasons(self, files: list[SourceFile], keys: list[str]) -> dict[int, str] | None:
        """Reasons by position in ``files`` (None: no clash, the usual case, decided in C)."""
        clash_free = len(set(keys)) == len(keys) and keys[0] != self.last_key
        if clash_free:
            self.last_key, self.owner = keys[-1], files[-1].source_path
            return None
        reasons: dict[int, str] = {}
        for index, file in enumerate(files):
            if file.key == self.last_key:
                reasons[index] = f"same key as {self.owner} (names equal after normalisation)"
            else:
                self.last_key, self.owner = file.key, file.source_path
        return reasons


@contextmanager
def _worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of ``workers`` decode processes, joined on exit (None for one worker: decode in this process)."""
    if workers == 1:
        yield None
        return
    # fork: workers start in milliseconds with everything imported; spawn/forkserver would re-import the caller's
    # __main__ (a Prefect flow module: seconds per worker). The pool starts at the first batch, while the rest of
    # the source is still being listed. Workers run only sela.data.images (no locks, no threads).
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=start_worker) as pool:
        yield pool


def _ordered_results(
    batches: Iterator[tuple[list[SourceFile], WorkBatch]],
    limits: ImageLimits,
    pool: ProcessPoolExecutor | None,
    workers: int,
) -> Iterator[tuple[list[SourceFile], BatchResult]]:
    """(files, ``inspect_batch`` of their batch) in input order: on ``pool``, with at most ``2 * workers`` batches
    in flight, or in this process (None)."""
    if pool is None:
        for files, batch in batches:
            yield files, inspect_batch(batch, limits)
        return
    in_flight: deque[tuple[list[SourceFile], Future[BatchResult]]] = deque()
    for files, batch in batches:
        in_flight.append((files, pool.submit(inspect_batch, batch, limits)))
        if len(in_flight) >= 2 * workers:
            done, future = in_flight.popleft()
            yield done, future.result()
    while in_flight:
        done, future = in_flight.popleft()
        yield done, future.result()


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
            _remove_spool(spool)

    def flush(self) -> None:
        if self.count:
            shard = shard_name(self.next_number)
            columns = dict(zip(self.COLUMNS, self.columns, strict=True))
            columns["shard"] = [shard] * self.count
            ranges = [(path, offset, size) for path, offset, size in self.ranges]
            # Movable: the spool files are read only for this shard now; one that is all of it is renamed.
            self.sidecars[shard] = write_shard_from_files(self.store, shard, ranges, columns, movable=True)
            self.written.append(shard)
            self.next_number += 1
            self.ranges, self.columns, self.count = [], [[] for _ in self.COLUMNS], 0
        for spool in self.consumed:
            _remove_spool(spool)
        self.consumed = []


def _remove_spool(spool: str) -> None:
    """Delete a spool file, unless it became a shard (renamed: a batch of a shard's worth of new images)."""
    with suppress(FileNotFoundError):
        os.remove(spool)


class _Router:
    """Decides, in key order, whether each inspected file becomes a sample or a quarantine line.

    The duplicate and changed-file policies need the files before it: ``owner_of_sha`` maps every sample's
    sha256 (stored ones included) to its source path. A batch of new, distinct, accepted images, the usual case,
    is routed in whole columns (C loops); any other batch file by file. ``quarantine`` collects the lines in key
    order, ``listed`` the keys of all files routed, ``inputs`` their number.
    """

    def __init__(self, stored: pd.DataFrame, packer: _Packer) -> None:
        self.packer = packer
        self.stored_sha = dict(zip(stored["key"], stored["sha256"], strict=True))
        self.owner_of_sha = dict(zip(stored["sha256"], stored["source_path"], strict=False))
        self.quarantine: list[dict[str, str]] = []
        self.listed: set[str] = set()
        self.inputs = 0

    def route(self, files: list[SourceFile], result: BatchResult) -> None:
        """Route the outcomes ``result`` of ``files`` (one batch)."""
        if len(result.reasons) != len(files):
            raise RuntimeError(f"an ingest worker returned {len(result.reasons)} results for {len(files)} files")
        keys, source_paths, ground_truth = (list(map(itemgetter(column), files)) for column in range(3))
        self.listed.update(keys)
        self.inputs += len(files)
        if self._all_new_samples(result):
            self.owner_of_sha.update(zip(result.sha256, source_paths, strict=True))
            columns = (keys, source_paths, ground_truth, result.sha256, result.widths, result.heights)
            assert result.spool is not None  # every file has a member
            self.packer.add(result.spool, 0, result.member_sizes, columns)
        else:
            self._route_each(files, result)
        if result.spool is not None:
            self.packer.spool_done(result.spool)

    def _all_new_samples(self, result: BatchResult) -> bool:
        """Every file accepted with a member (none only hashed), no sha256 twice nor seen before."""
        shas = result.sha256
        return (result.reasons.count(None) == len(shas) and 0 not in result.member_sizes
                and len(set(shas)) == len(shas) and self.owner_of_sha.keys().isdisjoint(shas))

    def _route_each(self, files: list[SourceFile], result: BatchResult) -> None:
        offset = 0
        columns = (result.sha256, result.reasons, result.widths, result.heights, result.member_sizes)
        for file, sha256, reason, width, height, size in zip(files, *columns, strict=True):
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
