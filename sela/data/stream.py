"""Streaming reader for training: shards -> shuffled, decoded batches, split by DDP rank and loader worker.

Each rank reads a disjoint set of shards (``urls[rank::world_size]``), each of its loader workers a disjoint
subset of those, in a shard order reshuffled every pass, through a sample shuffle buffer; shard and sample order
come from (``seed``, epoch, rank, worker), so epochs differ and each is reproducible. Ranks hold different
numbers of samples when shards do not divide evenly, and DDP hangs or crashes when one rank runs out of batches
first, so every rank cycles through its shards and stops after the same count: ``batches_per_rank`` =
``N // (world_size * batch_size)``, about one pass over the data per epoch. Random access (a relabel pass that
writes every image's outputs at its own row) stays with ``sela.data.shards.read_shards``.
"""

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset

from sela.data import remote
from sela.data.sources import decode_image
from sela.data.shards import read_manifest, record_image_field, shard_records, shard_urls


@dataclass
class Batch:
    """``images`` uint8 (B, size, size, 3); ``keys`` and ``shards`` (the URL each sample came from) of length B."""

    images: torch.Tensor
    keys: list[str]
    shards: list[str]


@dataclass
class StreamSettings:
    """How one rank streams: ``shuffle_buffer`` samples mixed at a time (0: none), ``seed`` for shard/sample order."""

    image_size: int
    batch_size: int
    shuffle_buffer: int
    seed: int
    rank: int
    world_size: int
    num_workers: int


class ShardStream:
    """Iterable of ``Batch`` for one rank: exactly ``len(self)`` batches per epoch on every rank.

    Each ``iter()`` is one epoch and advances ``epoch``; set it before iterating to resume at a given epoch.
    """

    def __init__(self, output_dir: str | Path, settings: StreamSettings) -> None:
        if not 0 <= settings.rank < settings.world_size:
            raise ValueError(f"rank {settings.rank} is outside world size {settings.world_size}")
        remote.register_gopen()
        urls = shard_urls(output_dir)
        self.rank_urls = urls[settings.rank :: settings.world_size]
        readers = max(1, settings.num_workers)
        if len(self.rank_urls) < readers:
            raise ValueError(
                f"{len(urls)} shards cannot feed {settings.world_size} ranks x {readers} loader workers: "
                "lower samples_per_shard or the worker count"
            )
        total = len(read_manifest(output_dir))
        self.batches_per_rank = total // (settings.world_size * settings.batch_size)
        if self.batches_per_rank == 0:
            raise ValueError(
                f"{total} samples give no full batch of {settings.batch_size} on {settings.world_size} ranks"
            )
        self.settings = settings
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[Batch]:
        settings = self.settings
        seeds = (settings.seed, self.epoch, settings.rank)
        self.epoch += 1
        pipeline = webdataset.DataPipeline(
            webdataset.SimpleShardList(self.rank_urls),
            webdataset.split_by_worker,
            partial(_forever_shuffled, seeds=seeds),
            shard_records,
            partial(_buffer_shuffled, buffer_size=settings.shuffle_buffer, seeds=seeds)
            if settings.shuffle_buffer > 0
            else _identity,
            partial(_decoded_batches, image_size=settings.image_size, batch_size=settings.batch_size),
        )
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=settings.num_workers)
        return islice(iter(loader), self.batches_per_rank)


def _worker_seed(seeds: tuple[int, int, int]) -> int:
    """One seed for (seed, epoch, rank) and the loader worker running this, read here since workers start later."""
    worker = torch.utils.data.get_worker_info()
    worker_id = 0 if worker is None else worker.id
    return int(np.random.SeedSequence((*seeds, worker_id)).generate_state(1)[0])


def _forever_shuffled(shards: Iterable[dict[str, str]], seeds: tuple[int, int, int]) -> Iterator[dict[str, str]]:
    """This worker's shards again and again, in a new order each pass (same orders for the same seeds)."""
    items = list(shards)
    generator = random.Random(_worker_seed(seeds))
    while True:
        generator.shuffle(items)
        yield from items


def _buffer_shuffled(
    samples: Iterable[dict[str, object]], buffer_size: int, seeds: tuple[int, int, int]
) -> Iterator[dict[str, object]]:
    """``samples`` mixed through a buffer of ``buffer_size``, in an order fixed by ``seeds`` and the loader worker."""
    yield from webdataset.shuffle(buffer_size, initial=buffer_size, seed=_worker_seed(seeds))(iter(samples))


def _identity(samples: Iterable[dict[str, object]]) -> Iterator[dict[str, object]]:
    yield from samples


def _decoded_batches(records: Iterable[dict[str, object]], image_size: int, batch_size: int) -> Iterator[Batch]:
    """Full batches decoded straight into one preallocated array (no per-sample stage, no stacking copy)."""
    pending: list[dict[str, object]] = []
    for record in records:
        pending.append(record)
        if len(pending) == batch_size:
            images = np.empty((batch_size, image_size, image_size, 3), dtype=np.uint8)
            for row, item in enumerate(pending):
                images[row] = decode_image(item[record_image_field(item)], image_size)
            keys = [str(item["__key__"]) for item in pending]
            yield Batch(torch.from_numpy(images), keys, [str(item["__url__"]) for item in pending])
            pending = []
