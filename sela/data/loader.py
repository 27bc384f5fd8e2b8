"""Index-addressed streaming of the shards for training and relabel passes, split over ranks and loader workers.

Every image is addressed by its manifest ``index``: the manifest concatenates the shards' rows in shard order, so
shard s holds the indices ``[start_s, start_s + count_s)`` in the order its tar stores them, and a reader knows each
sample's index from its position alone (the key is checked against the shard's sidecar on the way).

An epoch is a *plan*: the shards in an order drawn from (seed, epoch), their samples laid end to end, and that
sequence cut into ``world_size x num_workers`` contiguous parts, one per (rank, loader worker). A part reads at most
two shards partly (its ends) and the rest whole, so I/O stays one pass over the data per epoch whatever the process
count; every image is in exactly one part, so every image is seen once an epoch. Each worker mixes its part through
a shuffle buffer and cuts it into the same number of batches as every other worker (its last batch takes its
remainder): every rank runs the same number of steps, as DistributedDataParallel needs.

Nothing here grows with the number of images N but the per-shard table (one row a shard) and the per-image
vectors the caller keeps (labels, potentials).
"""

import io
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset

from sela.data import remote
from sela.data.shards import MANIFEST_NAME, ShardStore, record_image_field, shard_records, sidecar_name
from sela.data.sources import decode_image


class ShardReadError(RuntimeError):
    """A shard could not be read or does not match the manifest; the message names the shard."""


@dataclass(frozen=True)
class ShardTable:
    """The shards in manifest order: ``urls[s]`` holds indices ``starts[s] .. starts[s] + counts[s] - 1``."""

    folder: str
    urls: list[str]
    names: list[str]
    starts: np.ndarray
    counts: np.ndarray

    @property
    def num_images(self) -> int:
        return int(self.counts.sum())

    def shard_of(self, index: int) -> str:
        """The URL of the shard holding image ``index``."""
        return self.urls[int(np.searchsorted(self.starts, index, side="right")) - 1]


def shard_table(folder: str | Path) -> ShardTable:
    """Read the manifest's ``shard`` column only (dictionary-encoded: one string a shard, not one an image)."""
    store = ShardStore(folder)
    column = pq.read_table(io.BytesIO(store.read_bytes(MANIFEST_NAME)), columns=["index", "shard"],
                           read_dictionary=["shard"])
    if not np.array_equal(column.column("index").to_numpy(), np.arange(column.num_rows)):
        raise ShardReadError(f"{store.url(MANIFEST_NAME)}: rows are not in index order 0..{column.num_rows - 1}")
    shards = column.column("shard").combine_chunks()
    codes = shards.indices.to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(codes)) + 1]).astype(np.int64)
    counts = np.diff(np.concatenate([starts, [len(codes)]])).astype(np.int64)
    dictionary = shards.dictionary.to_pylist()
    names = [dictionary[codes[start]] for start in starts]
    if len(set(names)) != len(names):
        raise ShardReadError(f"{store.url(MANIFEST_NAME)}: a shard's rows are not contiguous")
    return ShardTable(str(folder), [store.url(name) for name in names], names, starts, counts)


@dataclass(frozen=True)
class Segment:
    """``take`` samples of shard ``shard`` (position in the table) after skipping its first ``skip``."""

    shard: int
    skip: int
    take: int


def epoch_parts(table: ShardTable, parts: int, shuffle_seed: int | None) -> list[list[Segment]]:
    """The shards in an order drawn from ``shuffle_seed`` (manifest order for None), cut into ``parts``
    contiguous runs of samples of nearly equal length (they differ by at most one)."""
    order = list(range(len(table.urls)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    total = table.num_images
    bounds = [part * total // parts for part in range(parts + 1)]
    result: list[list[Segment]] = [[] for _ in range(parts)]
    position, part = 0, 0
    for shard in order:
        count, offset = int(table.counts[shard]), 0
        while offset < count:
            while bounds[part + 1] <= position:
                part += 1
            take = min(count - offset, bounds[part + 1] - position)
            result[part].append(Segment(shard, offset, take))
            offset, position = offset + take, position + take
    return result


def batch_sizes(count: int, batch_size: int, num_batches: int) -> list[int]:
    """``count`` samples as ``num_batches`` batches of ``batch_size``, the last taking the remainder."""
    if num_batches < 1 or count < batch_size * (num_batches - 1) + 1:
        raise ValueError(f"{count} samples cannot make {num_batches} batches of {batch_size}")
    return [batch_size] * (num_batches - 1) + [count - batch_size * (num_batches - 1)]


@dataclass(frozen=True)
class StreamPlan:
    """What one rank reads in one pass: its loader workers' parts and how each is cut into batches.

    ``batches_per_worker`` is the same on every rank (training: ``smallest part // batch_size``, at least one, so
    that every rank runs the same number of steps and no batch is smaller than ``batch_size`` unless a part is);
    0 means ceil(part / batch),
    for passes without collectives between batches (relabel, export).
    """

    table: ShardTable
    parts: list[list[Segment]]
    batch_size: int
    batches_per_worker: int
    buffer: int
    seed: int
    interleave: int = 1

    def worker_batches(self, worker: int) -> list[int]:
        count = sum(segment.take for segment in self.parts[worker])
        if self.batches_per_worker:
            return batch_sizes(count, self.batch_size, self.batches_per_worker)
        return [min(self.batch_size, count - start) for start in range(0, count, self.batch_size)]

    @property
    def num_images(self) -> int:
        return sum(segment.take for part in self.parts for segment in part)

    @property
    def num_batches(self) -> int:
        return sum(len(self.worker_batches(worker)) for worker in range(len(self.parts)))


def plan_pass(table: ShardTable, *, rank: int, world_size: int, workers: int, batch_size: int,
              shuffle_seed: int | None, seed: int, buffer: int = 0, interleave: int = 1,
              equal_steps: bool = True) -> StreamPlan:
    """Rank ``rank``'s share of one pass over every image: ``workers`` parts (at least one) of the epoch's plan.

    ``shuffle_seed`` None reads in manifest order (relabel and export passes); ``equal_steps`` gives every rank the
    same number of batches of at least ``batch_size`` (training under DDP). ``seed`` seeds the shuffle buffer and
    the workers' augmentations, with the rank and the worker; ``interleave`` shards are read at a time."""
    readers = max(1, workers)
    everyone = epoch_parts(table, world_size * readers, shuffle_seed)
    smallest = table.num_images // (world_size * readers)
    per_worker = 0
    if equal_steps:
        # A collection smaller than a batch a worker trains on one batch of what there is (BatchNorm needs two).
        per_worker = max(1, smallest // batch_size)
        if smallest < 2:
            raise ValueError(f"{table.num_images} images cannot give two to each of {world_size} ranks x {readers} "
                             "loader workers: use fewer processes or workers")
    mine = everyone[rank * readers : (rank + 1) * readers]
    return StreamPlan(table, mine, batch_size, per_worker, buffer, seed * 1_000 + rank, interleave)


@dataclass
class Batch:
    """``indices`` int64 (B,) manifest indices; ``images`` uint8 (B, size, size, 3), or what ``transform`` made."""

    indices: torch.Tensor
    images: torch.Tensor


def _segment_samples(table: ShardTable, segment: Segment) -> Iterator[tuple[int, bytes]]:
    """(index, image bytes) of a segment, keys checked against the shard's sidecar; errors name the shard."""
    url, start = table.urls[segment.shard], int(table.starts[segment.shard])
    try:
        sidecar = ShardStore(table.folder).read_bytes(sidecar_name(table.names[segment.shard]))
        keys = pq.read_table(io.BytesIO(sidecar), columns=["key"]).column("key").to_pylist()
        if len(keys) != table.counts[segment.shard]:
            raise ValueError(f"its sidecar lists {len(keys)} samples, the manifest {table.counts[segment.shard]}")
        records = shard_records([{"url": url}])
        position = -1
        for position, record in enumerate(records):
            if position >= segment.skip + segment.take:
                break
            if record["__key__"] != keys[position]:
                raise ValueError(f"sample {position} is {record['__key__']!r}, the manifest says {keys[position]!r}")
            if position >= segment.skip:
                yield start + position, bytes(record[record_image_field(record)])
        if position + 1 < segment.skip + segment.take:
            raise ValueError(f"it ends after {position + 1} samples, the manifest lists {len(keys)}")
    except ShardReadError:
        raise
    except Exception as error:  # noqa: BLE001 - tar, gzip, I/O and decode errors alike: name the shard
        raise ShardReadError(f"shard {url} is unreadable or does not match the manifest: {error}") from error


def _interleaved(table: ShardTable, segments: Iterable[Segment], width: int,
                 rng: random.Random) -> Iterator[tuple[int, bytes]]:
    """The segments' samples, ``width`` shards read at a time, each next sample from one of them at random.

    Ingest writes shards in key order, so a collection in class folders has shards of one class each: a shuffle
    buffer alone would fill batches from one or two classes. Reading many shards at once mixes them at the cost of
    ``width`` open files, whatever the size of the images (a buffer as wide would hold ``width`` shards)."""
    pending, active = iter(segments), []
    while True:
        while len(active) < width and (segment := next(pending, None)) is not None:
            active.append(_segment_samples(table, segment))
        if not active:
            return
        choice = int(rng.random() * len(active))  # randrange's Python-level checks cost 2 us a sample
        try:
            yield next(active[choice])
        except StopIteration:
            active.pop(choice)


class PassDataset(torch.utils.data.IterableDataset):
    """One rank's pass as a WebDataset pipeline: segments -> (index, bytes) -> shuffle buffer -> decoded batches
    -> ``transform`` (augmentation on the CPU, in the loader worker), one part per loader worker."""

    def __init__(self, plan: StreamPlan, decode_size: int,
                 transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.plan, self.decode_size, self.transform = plan, decode_size, transform

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        remote.register_gopen()  # in the worker process too: shards may sit behind fsspec URLs
        seed = int(np.random.SeedSequence((self.plan.seed, worker)).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        pipeline = webdataset.DataPipeline(
            lambda: iter(self.plan.parts[worker]),
            partial(_interleaved, self.plan.table, width=self.plan.interleave, rng=random.Random(seed)),
            *([webdataset.shuffle(self.plan.buffer, initial=self.plan.buffer, seed=seed)] if self.plan.buffer else []),
        )
        return self._batches(iter(pipeline), self.plan.worker_batches(worker), generator)

    def _batches(self, samples: Iterator[tuple[int, bytes]], sizes: list[int],
                 generator: torch.Generator) -> Iterator[Batch]:
        for size in sizes:
            indices = np.empty(size, dtype=np.int64)
            images = np.empty((size, self.decode_size, self.decode_size, 3), dtype=np.uint8)
            for row in range(size):
                indices[row], data = next(samples)
                try:
                    images[row] = decode_image(data, self.decode_size)
                except Exception as error:  # noqa: BLE001 - whatever the decoder raises: name the shard and sample
                    raise ShardReadError(f"shard {self.plan.table.shard_of(int(indices[row]))}: sample "
                                         f"{indices[row]} does not decode: {error}") from error
            batch = torch.from_numpy(images)
            yield Batch(torch.from_numpy(indices),
                        batch if self.transform is None else self.transform(batch, generator))


def pass_loader(plan: StreamPlan, decode_size: int, workers: int,
                transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> Iterable[Batch]:
    """A DataLoader over ``plan`` with ``workers`` processes (0: in this process); batches come out round-robin
    over the workers, so the order is the same on every run."""
    return torch.utils.data.DataLoader(PassDataset(plan, decode_size, transform), batch_size=None,
                                       num_workers=workers, persistent_workers=False,
                                       prefetch_factor=4 if workers else None)
