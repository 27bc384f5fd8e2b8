"""tasks.train and tasks.images: the tasks get the shards decoded at ``train.decode_size``, once per process; the
parent version a run from a parent needs."""

from itertools import islice

import pytest
from prefect.states import Failed

from sela.config import load_params
from sela.data.shards import write_shards
from sela.data.sources import iter_digit_samples
from sela.paths import SHARD_DIR
from tasks.images import load_shards
from tasks.train import NoParentVersionError, _unless_no_parent, epochs_done, fetch_parent_version
from tests.conftest import make_project


def test_shards_are_decoded_once_until_the_manifest_changes(tmp_path):
    write_shards(islice(iter_digit_samples(8), 6), tmp_path / SHARD_DIR, samples_per_shard=4)
    first = load_shards(tmp_path, 16)
    assert load_shards(tmp_path, 16) is first and load_shards(tmp_path, 12) is not first
    write_shards(islice(iter_digit_samples(8), 5), tmp_path / SHARD_DIR, samples_per_shard=4)
    assert len(load_shards(tmp_path, 16)) == 5  # new shards: decoded again, not served from the cache


def test_a_run_from_a_parent_in_a_repository_with_no_version_fails_clearly_and_is_not_retried(tmp_path):
    project = make_project(tmp_path / "project")
    parent_params = load_params(project / "params.yaml", {"train.start_from": "parent"})
    with pytest.raises(NoParentVersionError, match=r"no published version \(tags labels-v<N>\)"):
        fetch_parent_version.fn(str(project), parent_params)
    assert fetch_parent_version.fn(str(project), load_params(project / "params.yaml")) is None  # from scratch
    # Nothing published is no passing I/O error: the task's retries are for git and the DVC remote.
    assert not _unless_no_parent(None, None, Failed(data=NoParentVersionError("none")))
    assert _unless_no_parent(None, None, Failed(data=OSError("remote unreachable")))


def test_the_progress_bar_counts_the_epochs_of_every_initialisation():
    assert epochs_done({"epoch": 3, "epochs": 10}) == 0.3
    assert epochs_done({"epoch": 5, "epochs": 10, "initialisation": 1, "initialisations": 2}) == 0.75
    assert epochs_done({"epoch": 10, "epochs": 10, "initialisation": 2, "initialisations": 3}) == 1.0
