"""tasks.train and tasks.images: the tasks get the shards decoded at ``train.decode_size``, once per process."""

from itertools import islice

from sela.config import load_params
from sela.data.ingest import ingest
from sela.data.shards import write_shards
from sela.data.sources import iter_digit_samples
from sela.learn import train
from sela.paths import SHARD_DIR
from tasks import train as train_tasks
from tasks.images import load_shards
from tests.conftest import PROJECT_ROOT, TINY_TRAINING


def test_crops_and_relabel_views_are_cut_from_images_decoded_at_decode_size(tmp_path, monkeypatch):
    params = load_params(PROJECT_ROOT / "params.yaml", {**TINY_TRAINING, "train.decode_size": 24})
    ingest(params.shard, str(tmp_path / SHARD_DIR), workers=1)
    seen = []

    def record(checkpoint, images, settings, device):
        seen.append(tuple(images.shape))
        return {}

    monkeypatch.setattr(train, "relabel", record)
    monkeypatch.setattr(train, "train_epoch", record)
    assert train_tasks.start_training.fn(str(tmp_path), params.train)["num_images"] == 1797
    train_tasks.relabel.fn(str(tmp_path), params.train)
    train_tasks.train_epoch.fn(str(tmp_path), params.train)

    assert seen == [(1797, 24, 24, 3)] * 2  # not params.train.image_size (16): crops come from the larger image


def test_shards_are_decoded_once_until_the_manifest_changes(tmp_path):
    write_shards(islice(iter_digit_samples(8), 6), tmp_path / SHARD_DIR, samples_per_shard=4)
    first = load_shards(tmp_path, 16)
    assert load_shards(tmp_path, 16) is first and load_shards(tmp_path, 12) is not first
    write_shards(islice(iter_digit_samples(8), 5), tmp_path / SHARD_DIR, samples_per_shard=4)
    assert len(load_shards(tmp_path, 16)) == 5  # new shards: decoded again, not served from the cache
