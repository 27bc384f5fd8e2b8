"""tasks.train and tasks.images: the tasks get the shards decoded at ``train.decode_size``, once per process."""

from itertools import islice

from sela.data.shards import write_shards
from sela.data.sources import iter_digit_samples
from sela.paths import SHARD_DIR
from tasks.images import load_shards


def test_shards_are_decoded_once_until_the_manifest_changes(tmp_path):
    write_shards(islice(iter_digit_samples(8), 6), tmp_path / SHARD_DIR, samples_per_shard=4)
    first = load_shards(tmp_path, 16)
    assert load_shards(tmp_path, 16) is first and load_shards(tmp_path, 12) is not first
    write_shards(islice(iter_digit_samples(8), 5), tmp_path / SHARD_DIR, samples_per_shard=4)
    assert len(load_shards(tmp_path, 16)) == 5  # new shards: decoded again, not served from the cache
