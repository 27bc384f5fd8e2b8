"""sela.data.loader: every image once a pass, equal steps on every rank, index-addressed, reproducible."""

from pathlib import Path

import numpy as np
import pytest

from sela.data.loader import epoch_parts, pass_loader, plan_pass, shard_table
from sela.data.shards import read_shards, write_shards
from sela.data.sources import iter_digit_samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(iter_digit_samples(8), folder, 230)  # 8 shards, the last one short (187)
    return folder


def test_the_shard_table_addresses_every_image_by_its_manifest_index(shards):
    table = shard_table(shards)
    assert table.num_images == 1797 and len(table.urls) == 8
    assert list(table.starts) == list(range(0, 1797, 230)) and table.counts[-1] == 1797 - 7 * 230
    assert table.shard_of(229).endswith("shard-000000.tar") and table.shard_of(230).endswith("shard-000001.tar")


@pytest.mark.parametrize("parts", [1, 3, 8, 13])
def test_parts_cover_every_image_once_and_differ_by_at_most_one(shards, parts):
    table = shard_table(shards)
    plan = epoch_parts(table, parts, shuffle_seed=4)
    lengths = [sum(segment.take for segment in part) for part in plan]
    assert max(lengths) - min(lengths) <= 1 and sum(lengths) == 1797
    covered = np.concatenate([np.arange(table.starts[s.shard] + s.skip, table.starts[s.shard] + s.skip + s.take)
                              for part in plan for s in part])
    np.testing.assert_array_equal(np.sort(covered), np.arange(1797))


@pytest.mark.parametrize(("world_size", "workers"), [(1, 0), (2, 2), (3, 1)])
def test_ranks_see_every_image_once_with_equal_batch_counts_and_the_right_pixels(shards, world_size, workers):
    table, reference = shard_table(shards), read_shards(shards, 8)
    seen, counts = [], []
    for rank in range(world_size):
        plan = plan_pass(table, rank=rank, world_size=world_size, workers=workers, batch_size=32, shuffle_seed=7,
                         seed=7, buffer=64)
        batches = list(pass_loader(plan, 8, workers))
        counts.append(len(batches))
        assert min(len(batch.indices) for batch in batches) >= 32  # the last batch takes the remainder
        for batch in batches:
            np.testing.assert_array_equal(batch.images.numpy(), reference.images[batch.indices.numpy()])
            seen.append(batch.indices.numpy())
    assert len(set(counts)) == 1  # DDP: the same number of steps on every rank
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(1797))


def order(shards, shuffle_seed):
    plan = plan_pass(shard_table(shards), rank=0, world_size=1, workers=0, batch_size=64,
                     shuffle_seed=shuffle_seed, seed=shuffle_seed, buffer=128)
    return np.concatenate([batch.indices.numpy() for batch in pass_loader(plan, 8, 0)])


def test_an_epoch_is_reproducible_and_epochs_differ(shards):
    np.testing.assert_array_equal(order(shards, 1), order(shards, 1))
    assert not np.array_equal(order(shards, 1), order(shards, 2))


def test_a_part_smaller_than_a_batch_is_one_batch_and_a_part_of_one_image_is_refused(shards):
    plan = plan_pass(shard_table(shards), rank=0, world_size=4, workers=4, batch_size=256, shuffle_seed=0, seed=0)
    assert all(plan.worker_batches(worker) in ([112], [113]) for worker in range(4))  # 1797 / 16 parts, whole
    with pytest.raises(ValueError, match="cannot give two"):
        plan_pass(shard_table(shards), rank=0, world_size=100, workers=10, batch_size=256, shuffle_seed=0, seed=0)
