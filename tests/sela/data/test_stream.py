"""Streaming reader: ranks x workers see disjoint shards and the same number of full, decoded batches."""

from pathlib import Path

import numpy as np
import pytest

from sela.data.shards import read_shards, write_shards
from sela.data.stream import ShardStream, StreamSettings
from tests.sela.data.test_shards import IMAGE_SIZE, make_samples


def settings(rank: int, world_size: int, num_workers: int, batch_size: int = 4) -> StreamSettings:
    return StreamSettings(image_size=IMAGE_SIZE, batch_size=batch_size, shuffle_buffer=8, seed=0, rank=rank,
                          world_size=world_size, num_workers=num_workers)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """38 samples in 8 shards (7 of 5, one of 3): ranks get unequal sample counts."""
    output = tmp_path_factory.mktemp("stream") / "shards"
    write_shards(make_samples(38), output, samples_per_shard=5)
    return output


def test_two_ranks_with_two_workers_read_disjoint_shards_and_equal_batch_counts(shard_dir: Path) -> None:
    batches = {rank: list(ShardStream(shard_dir, settings(rank, 2, 2))) for rank in (0, 1)}

    # 38 // (2 ranks * 4) = 4 batches each, although rank 0 holds 20 samples and rank 1 holds 18.
    assert [len(batches[rank]) for rank in (0, 1)] == [4, 4]
    shards = {rank: {url for batch in batches[rank] for url in batch.shards} for rank in (0, 1)}
    assert shards[0].isdisjoint(shards[1])
    assert all(batch.images.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) for rank in (0, 1) for batch in batches[rank])


def test_streamed_pixels_match_the_indexed_read(shard_dir: Path) -> None:
    indexed = read_shards(shard_dir, IMAGE_SIZE)
    row_of_key = {key: row for row, key in enumerate(indexed.keys)}

    stream = ShardStream(shard_dir, settings(0, 1, 0, batch_size=8))
    batches = list(stream)

    assert len(stream) == len(batches) == 38 // 8
    keys = [key for batch in batches for key in batch.keys]
    assert len(set(keys)) == len(keys)  # 32 of 38 samples, none twice: less than one pass
    for batch in batches:
        rows = [row_of_key[key] for key in batch.keys]
        assert np.array_equal(batch.images.numpy(), indexed.images[rows])
    assert keys != sorted(keys, key=row_of_key.__getitem__)  # the shuffle buffer mixes the order


def test_more_readers_than_shards_raise(shard_dir: Path) -> None:
    with pytest.raises(ValueError, match="8 shards cannot feed 4 ranks x 3 loader workers"):
        ShardStream(shard_dir, settings(0, 4, 3))


@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_each_epoch_reorders_the_samples_and_a_fresh_stream_repeats_the_epochs(
    shard_dir: Path, shuffle_buffer: int
) -> None:
    # Batches of 2 on one rank: 19 batches, exactly one pass over the 38 samples per epoch.
    epoch_settings = StreamSettings(image_size=IMAGE_SIZE, batch_size=2, shuffle_buffer=shuffle_buffer, seed=0,
                                    rank=0, world_size=1, num_workers=0)
    stream = ShardStream(shard_dir, epoch_settings)
    first, second = ([key for batch in stream for key in batch.keys] for _ in range(2))

    assert first != second
    if shuffle_buffer == 0:  # a buffer lets the next shard pass's samples in before this one's last ones
        assert sorted(first) == sorted(second) == sorted(read_shards(shard_dir, IMAGE_SIZE).keys)
    fresh = ShardStream(shard_dir, epoch_settings)
    assert [[key for batch in fresh for key in batch.keys] for _ in range(2)] == [first, second]
