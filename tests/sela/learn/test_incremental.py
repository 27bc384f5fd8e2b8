"""sela.learn.incremental: a run from the parent version starts from its network and labels, and says so."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sela.config import load_params
from sela.data.shards import read_manifest, read_shards, write_shards
from sela.data.sources import iter_digit_samples
from sela.labels import card, export, label_set
from sela.learn import incremental, state, train
from sela.learn.loop import TrainingRun, run_training
from tests.conftest import PROJECT_ROOT

CPU = torch.device("cpu")
TINY = {"train.initialisations": 1, "train.width": 8, "train.num_heads": 2, "train.epochs": 2, "train.num_relabels": 2,
        "train.precision": "float32"}


def params_of(**changes):
    return load_params(PROJECT_ROOT / "params.yaml", {**TINY, **changes})


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict:
    """A published parent made from 90% of the digits (every tenth image left out), and shards of all of them."""
    folder = tmp_path_factory.mktemp("versions")
    samples = list(iter_digit_samples(16))
    write_shards((sample for index, sample in enumerate(samples) if index % 10 != 3), folder / "old", 500)
    write_shards(samples, folder / "all", 500)
    params = params_of()
    parent_dir = folder / "labels-v1"
    run = TrainingRun(str(folder / "old"), parent_dir / "checkpoint.pt", folder / "old-state", CPU, 0)
    checkpoint = run_training(run, params.train)
    exported = export.export_label_set(checkpoint.model, folder / "old", params, CPU, 0, None, None,
                                       checkpoint.target_sizes)
    final = exported.final
    label_set.write_label_set(label_set.label_table(exported.keys, final.labels, final.confidence,
                                                    final.selected_head), parent_dir / "labels.parquet")
    label_set.write_card(card.label_card(params, final, exported.metrics, checkpoint.history, "sha", "code",
                                         exported.lineage), parent_dir / "card.json")
    parent = incremental.ParentVersion("labels-v1", parent_dir / "checkpoint.pt", parent_dir / "card.json",
                                       parent_dir / "labels.parquet")
    return {"folder": folder, "parent": parent, "checkpoint": checkpoint, "final": final, "keys": exported.keys}


def from_parent(versions: dict, folder: Path, events: list, **changes) -> train.Checkpoint:
    params = params_of(**{"train.start_from": "parent", **changes})
    run = TrainingRun(str(versions["folder"] / "all"), folder / "checkpoint.pt", folder / "state", CPU, 0,
                      events.append, parent=versions["parent"])
    return run_training(run, params.train)


def test_a_run_from_the_parent_keeps_its_labels_predicts_the_new_ones_and_runs_its_own_epochs(versions, tmp_path):
    events: list = []
    result = from_parent(versions, tmp_path, events, **{"train.incremental.epochs": 2,
                                                        "train.incremental.relabels": 0})
    start = events[0]
    assert start["parent_version"] == "labels-v1" and start["reason"].startswith("starting from parent version "
                                                                                 "labels-v1")
    assert (start["kept"], start["new"], start["dropped"], start["parent_epochs"]) == (1617, 180, 0, 2)
    assert [event["epoch"] for event in events if event["kind"] == "epoch"] == [1, 2]
    assert not [event for event in events if event["kind"] == "relabel"]
    keys = read_manifest(versions["folder"] / "all")["key"].tolist()
    old = np.isin(keys, versions["keys"])
    # Without relabels the labels trained on are the parent's published ones for its images, by key...
    parent_labels = dict(zip(versions["keys"], versions["final"].labels.T.tolist(), strict=True))
    assert result.labels[:, old].T.tolist() == [parent_labels[key] for key in np.asarray(keys)[old]]
    # ... and the label set's rule (the parent's network and card potentials) for the new ones.
    images = torch.from_numpy(read_shards(versions["folder"] / "all", 32).images[~old])
    predicted = export.predict_labels(versions["checkpoint"].model, images, versions["final"].cluster_potentials,
                                      params_of(), CPU)
    np.testing.assert_array_equal(result.labels[:, ~old], predicted)
    assert result.history[0]["kind"] == "start" and incremental.parent_of(result.history) == "labels-v1"


def test_relabels_come_after_the_first_epoch_and_a_crashed_run_resumes_from_its_own_checkpoint(versions, tmp_path):
    class Crash(Exception):
        pass

    def crash_after_epoch_one(event):
        if event["kind"] == "epoch" and event["epoch"] == 1:
            raise Crash

    changes = {"train.incremental.epochs": 3, "train.incremental.relabels": 2}
    with pytest.raises(Crash):
        from_parent(versions, tmp_path, _Raiser(crash_after_epoch_one), **changes)
    events: list = []
    from_parent(versions, tmp_path, events, **changes)
    assert events[0]["resumed_at_epoch"] == 1 and events[0]["parent_version"] == "labels-v1"
    assert [event["epoch"] for event in events if event["kind"] == "relabel"] == [1, 2]


class _Raiser(list):
    """An events list whose ``append`` runs a check (the progress callback ``from_parent`` passes)."""

    def __init__(self, check) -> None:
        super().__init__()
        self.check = check

    def append(self, event) -> None:
        super().append(event)
        self.check(event)


def test_a_parent_with_another_network_is_refused_naming_the_differences(versions, tmp_path):
    with pytest.raises(incremental.ParentMismatchError, match=r"labels-v1.*width 8 \(this run: 16\)"):
        from_parent(versions, tmp_path, [], **{"train.width": 16})


def test_starting_from_a_parent_without_one_is_an_error(versions, tmp_path):
    run = TrainingRun(str(versions["folder"] / "all"), tmp_path / "checkpoint.pt", tmp_path / "state", CPU, 0)
    with pytest.raises(ValueError, match="start_from is parent but no parent version"):
        run_training(run, params_of(**{"train.start_from": "parent"}).train)


def test_labels_are_carried_by_key_and_new_keys_are_marked():
    labels = incremental.carry_labels(["a", "b", "c"], np.array([[0, 1, 2], [5, 6, 7]]), ["c", "new", "a"])
    np.testing.assert_array_equal(labels, [[2, -1, 0], [7, -1, 5]])
    with pytest.raises(incremental.ParentMismatchError, match="repeats keys"):
        incremental.carry_labels(["a", "a"], np.zeros((1, 2), dtype=np.int64), ["a"])


def test_published_labels_are_renamed_back_to_network_outputs():
    import pyarrow as pa

    table = pa.table({"label_head_0": pa.array([2, 0, 1], pa.int32()), "label_head_1": pa.array([0, 1, 1], pa.int32())})
    card = {"cluster_id_alignment": [{"head": 1, "output_to_label": [1, 0, 2]},
                                     {"head": 0, "output_to_label": [2, 0, 1]}]}
    # head 0: output 0 is published as 2, output 1 as 0, output 2 as 1.
    np.testing.assert_array_equal(incremental.published_outputs(table, card, 2), [[0, 1, 2], [1, 0, 0]])
    np.testing.assert_array_equal(incremental.published_outputs(table, {"cluster_id_alignment": None}, 1), [[2, 0, 1]])


def test_the_run_schedule_and_the_fingerprint_follow_the_parent():
    params = params_of(**{"train.start_from": "parent", "train.incremental.epochs": 6,
                          "train.incremental.relabels": 3}).train
    schedule = incremental.run_schedule(params)
    assert (schedule.epochs, schedule.num_relabels, schedule.learning_rate) == (6, 3, params.incremental.learning_rate)
    chosen = train.relabel_epochs(6, 3, 2.0, incremental.first_relabel_epoch(params))
    assert chosen[0] == 1 and len(set(chosen)) == 3 and max(chosen) < 6
    assert state.fingerprint(params, "m", "labels-v1") != state.fingerprint(params, "m", "labels-v2")
    scratch = params_of().train
    assert incremental.run_schedule(scratch) is scratch and incremental.first_relabel_epoch(scratch) == 0
