"""sela.learn.loop: the streamed self-labelling loop in one process (the multi-process runs: tests/tasks)."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sela.config import load_params
from sela.data.loader import ShardReadError
from sela.data.shards import read_manifest, read_shards, write_shards
from sela.data.sources import iter_digit_samples
from sela.labels import export
from sela.learn import loop, train
from sela.learn.loop import TrainingRun, run_training
from tests.conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The embedded default as real shards (1797 digits, 16 px), four shards."""
    folder = tmp_path_factory.mktemp("shards")
    write_shards(iter_digit_samples(16), folder, 500)
    return folder


def small_params(**changes):
    overrides = {"train.initialisations": 1, "train.width": 8, "train.image_size": 16, "train.num_heads": 2,
                 "train.epochs": 2, "train.num_relabels": 2, "train.batch_size": 64, **changes}
    return load_params(PROJECT_ROOT / "params.yaml", overrides)


def run(shards: Path, folder: Path, events: list | None = None, **changes) -> tuple[train.Checkpoint, list]:
    events = [] if events is None else events
    setup = TrainingRun(str(shards), folder / "checkpoint.pt", folder / "state", torch.device("cpu"), 0,
                        events.append)
    return run_training(setup, small_params(**changes).train), events


@pytest.mark.slow
def test_relabels_are_balanced_reuse_the_last_epoch_and_every_image_is_seen_once(shards, tmp_path, monkeypatch):
    real_pass = loop.fresh_pass
    passes = []

    def counted_pass(*args, **kwargs):
        passes.append(1)
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(loop, "fresh_pass", counted_pass)
    checkpoint, events = run(shards, tmp_path, **{"train.relabel_from": "last_epoch"})
    relabels = [event for event in events if event["kind"] == "relabel"]
    assert [event["source"] for event in relabels] == ["fresh_pass", "last_epoch"] and len(passes) == 1
    for head in relabels[-1]["heads"]:
        assert head["converged"] and head["column_marginal_error"] < 1e-2 and head["min_size"] > 0
    assert all(event["images"] == 1797 for event in events if event["kind"] == "epoch")
    assert checkpoint.labels.shape == (2, 1797)
    assert np.bincount(checkpoint.labels[0], minlength=10).min() > 1797 / 10 / 3


def test_overclustering_heads_are_trained_relabelled_and_not_exported(shards, tmp_path):
    checkpoint, _ = run(shards, tmp_path, **{"train.overclustering.num_heads": 2,
                                             "train.overclustering.num_clusters": 40, "train.epochs": 1})
    assert checkpoint.labels.shape == (4, 1797) and checkpoint.labels[2:].max() == 39
    assert checkpoint.labels[:2].max() == 9
    params = small_params(**{"train.overclustering.num_heads": 2, "train.overclustering.num_clusters": 40})
    images = torch.from_numpy(np.zeros((20, 16, 16, 3), dtype=np.uint8))
    final = export.final_labels(checkpoint.model, images, params, torch.device("cpu"), checkpoint.target_sizes)
    assert final.labels.shape == (2, 20) and final.labels.max() <= 9


@pytest.mark.slow
def test_one_head_in_turn_after_a_first_relabel_of_every_head(shards, tmp_path):
    _, events = run(shards, tmp_path, **{"train.num_heads": 3, "train.relabel_heads": "one_in_turn",
                                         "train.epochs": 4, "train.num_relabels": 4})
    solved = [[head["head"] for head in event["heads"]] for event in events if event["kind"] == "relabel"]
    assert solved == [[0, 1, 2], [0], [1], [2]]


@pytest.mark.slow
@pytest.mark.parametrize("cluster_sizes", ["equal", "estimated"])
def test_an_interrupted_run_resumes_after_its_last_epoch_and_ends_with_the_same_labels(shards, tmp_path,
                                                                                       cluster_sizes):
    settings = {"train.epochs": 3, "train.num_relabels": 3, "train.sinkhorn.cluster_sizes": cluster_sizes}
    whole, _ = run(shards, tmp_path / "whole", **settings)

    class Crash(Exception):
        pass

    def crash_in_epoch_two(event):
        if event["kind"] == "relabel" and event["epoch"] == 1:  # after the checkpoint of epoch 1
            raise Crash

    crashed = tmp_path / "crashed"
    setup = TrainingRun(str(shards), crashed / "checkpoint.pt", crashed / "state", torch.device("cpu"), 0,
                        crash_in_epoch_two)
    with pytest.raises(Crash):
        run_training(setup, small_params(**settings).train)
    resumed, events = run(shards, tmp_path / "crashed", **settings)
    assert events[0]["resumed_at_epoch"] == 1 and events[0]["reason"] == "resuming after epoch 1"
    np.testing.assert_array_equal(resumed.labels, whole.labels)
    np.testing.assert_array_equal(np.stack(resumed.target_sizes), np.stack(whole.target_sizes))
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    # A finished run is not resumed: a rerun trains again from scratch.
    _, again = run(shards, tmp_path / "crashed", **settings)
    assert again[0]["resumed_at_epoch"] is None and "finished run" in again[0]["reason"]


def test_the_checkpoint_loads_for_export_with_labels_and_potentials(shards, tmp_path):
    checkpoint, _ = run(shards, tmp_path)
    params = small_params().train
    loaded = train.load_checkpoint(tmp_path / "checkpoint.pt", params, torch.device("cpu"))
    assert loaded.epoch == 2 and np.array_equal(loaded.labels, checkpoint.labels)
    np.testing.assert_array_equal(loaded.cluster_potentials[1], checkpoint.cluster_potentials[1])
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    assert not list((tmp_path / "state").glob("epoch-*"))  # a finished run leaves no epoch logits behind


def test_estimated_sizes_follow_the_network_after_the_first_relabel_keep_the_floor_and_are_saved(shards, tmp_path):
    checkpoint, events = run(shards, tmp_path, **{"train.sinkhorn.cluster_sizes": "estimated",
                                                  "train.sinkhorn.size_floor": 0.5, "train.sinkhorn.size_warmup": 0.0,
                                                  "train.epochs": 2})
    relabels = [event for event in events if event["kind"] == "relabel"]
    assert [event["epoch"] for event in relabels] == [0, 1]
    for head in relabels[0]["heads"]:  # the untrained network's counts are not used
        assert head["target_sizes"] == [0.1] * 10
    for head, event in zip(range(2), relabels[1]["heads"], strict=True):
        sizes = checkpoint.target_sizes[head]
        assert event["target_sizes"] == sizes.tolist() and event["converged"]
        assert sizes.sum() == pytest.approx(1.0) and sizes.min() >= 0.05 - 1e-12 and np.ptp(sizes) > 1e-3
        assert event["min_size"] <= 1797 * sizes.min() * 1.1 and event["max_size"] >= 1797 * sizes.max() * 0.9
    loaded = train.load_checkpoint(tmp_path / "checkpoint.pt", small_params().train, torch.device("cpu"))
    np.testing.assert_array_equal(np.stack(loaded.target_sizes), np.stack(checkpoint.target_sizes))


def test_relaxed_sizes_leave_equal_after_the_warmup_and_the_export_solves_the_same_problem(shards, tmp_path):
    checkpoint, events = run(shards, tmp_path, **{"train.sinkhorn.cluster_sizes": "relaxed",
                                                  "train.sinkhorn.size_penalty": 0.36,
                                                  "train.sinkhorn.size_warmup": 0.0, "train.epochs": 2})
    relabels = [event for event in events if event["kind"] == "relabel"]
    for head in relabels[0]["heads"]:  # the untrained network: equal sizes, a hard constraint
        np.testing.assert_allclose(head["plan_sizes"], 0.1, rtol=0.011)
    for head, event in zip(range(2), relabels[1]["heads"], strict=True):
        assert event["converged"] and event["target_sizes"] == [0.1] * 10  # the anchor stays equal
        assert sum(event["plan_sizes"]) == pytest.approx(1.0, abs=1e-4) and np.ptp(event["plan_sizes"]) > 0.02
        np.testing.assert_array_equal(checkpoint.target_sizes[head], np.full(10, 0.1))
    params = small_params(**{"train.sinkhorn.cluster_sizes": "relaxed"})
    images = torch.from_numpy(read_shards(shards, params.train.decode_size).images)
    relaxed = export.final_labels(checkpoint.model, images, params, torch.device("cpu"), checkpoint.target_sizes)
    hard = export.final_labels(checkpoint.model, images, small_params(), torch.device("cpu"), checkpoint.target_sizes)
    relaxed_sizes, hard_sizes = (np.bincount(final.labels[0], minlength=10) for final in (relaxed, hard))
    assert np.ptp(hard_sizes) <= 0.03 * 1797 < np.ptp(relaxed_sizes)


def test_sizes_are_estimated_after_the_warmup_and_never_before_the_first_epoch():
    def schedule(warmup):
        params = small_params(**{"train.sinkhorn.cluster_sizes": "estimated", "train.sinkhorn.size_warmup": warmup,
                                 "train.epochs": 10}).train
        return [epoch for epoch in range(10) if loop.estimating_sizes(params, epoch)]

    assert schedule(0.0) == list(range(1, 10)) and schedule(0.3) == list(range(3, 10))
    assert not loop.estimating_sizes(small_params(**{"train.epochs": 10}).train, 5)  # equal sizes: never
    relaxed = small_params(**{"train.sinkhorn.cluster_sizes": "relaxed", "train.sinkhorn.size_warmup": 0.3,
                              "train.epochs": 10}).train
    assert not any(loop.estimating_sizes(relaxed, epoch) for epoch in range(10))  # no targets to estimate
    assert [epoch for epoch in range(10) if loop.past_size_warmup(relaxed, epoch)] == list(range(3, 10))
    given = small_params(**{"train.sinkhorn.cluster_sizes": "given", "train.sinkhorn.given_sizes": [1] * 10,
                            "train.sinkhorn.size_warmup": 0.3, "train.epochs": 10}).train
    assert [epoch for epoch in range(10) if loop.estimating_sizes(given, epoch)] == list(range(3, 10))


def test_given_sizes_are_placed_by_the_network_after_the_warmup_on_the_label_heads_only(shards, tmp_path):
    given = [10.0 - c for c in range(10)]
    checkpoint, events = run(shards, tmp_path, **{"train.sinkhorn.cluster_sizes": "given",
                                                  "train.sinkhorn.given_sizes": given,
                                                  "train.sinkhorn.size_warmup": 0.0, "train.epochs": 2,
                                                  "train.overclustering.num_heads": 1,
                                                  "train.overclustering.num_clusters": 20})
    relabels = [event for event in events if event["kind"] == "relabel"]
    assert all(head["target_sizes"] == [0.1] * 10 for head in relabels[0]["heads"][:2])  # untrained: equal
    proportions = np.sort(np.array(given) / sum(given))
    for head in range(2):
        sizes = checkpoint.target_sizes[head]
        np.testing.assert_allclose(np.sort(sizes), proportions)
        assert relabels[1]["heads"][head]["target_sizes"] == sizes.tolist()
        balanced = np.bincount(checkpoint.labels[head], minlength=10) / 1797
        np.testing.assert_allclose(balanced, sizes, atol=0.02)  # the relabel's labels take the given sizes
    np.testing.assert_array_equal(checkpoint.target_sizes[2], np.full(20, 1 / 20))  # over-clustering: equal


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_corrupt_shard_met_during_training_is_named(shards, tmp_path, damage):
    broken = tmp_path / "shards"
    broken.mkdir()
    for path in shards.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    name = sorted(read_manifest(broken)["shard"].unique())[2]
    data = bytearray((broken / name).read_bytes())
    if damage == "zeroed":
        data[700:5000] = b"\x00" * 4300  # image bytes zeroed in place
    else:
        data = data[: len(data) // 2]  # a copy that stopped half way
    (broken / name).write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match=name):
        run(broken, tmp_path / "run")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and CuPy for the relabel)")
def test_gpu_epochs_relabel_through_cupy_and_the_checkpoint_loads_on_the_cpu(shards, tmp_path):
    events: list = []
    setup = TrainingRun(str(shards), tmp_path / "checkpoint.pt", tmp_path / "state", torch.device("cuda"), 2,
                        events.append)
    full = small_params(**{"train.overclustering.num_heads": 1, "train.overclustering.num_clusters": 40,
                           "train.relabel_from": "last_epoch", "train.epochs": 3, "train.num_relabels": 3})
    params = full.train
    checkpoint = run_training(setup, params)
    relabels = [event for event in events if event["kind"] == "relabel"]
    assert relabels[-1]["source"] == "last_epoch"
    for head in relabels[-1]["heads"]:
        assert head["converged"] and head["column_marginal_error"] < 1e-2
    loaded = train.load_checkpoint(tmp_path / "checkpoint.pt", params, torch.device("cpu"))
    assert np.array_equal(loaded.labels, checkpoint.labels)
    # Two initialisations on the GPU: each run's objective from the CuPy solves is the export's on the CPU (within
    # what bfloat16 forward passes on two kinds of device leave).
    chosen = run_training(replace(setup, checkpoint_path=tmp_path / "two.pt"),
                          params.model_copy(update={"initialisations": 2}))
    exported = export.export_label_set(chosen.model.cpu(), shards, full, torch.device("cpu"), 0, None, None,
                                       chosen.target_sizes)
    assert min(exported.final.objective) == pytest.approx(min(chosen.history[-1]["objectives"]), rel=2e-2)


@pytest.mark.slow
def test_several_initialisations_keep_the_lowest_objective_resume_each_and_leave_one_checkpoint(shards, tmp_path):
    settings = {"train.initialisations": 2}
    checkpoint, events = run(shards, tmp_path / "whole", **settings)
    scored = [event for event in events if event["kind"] == "initialisation"]
    chosen = next(event for event in events if event["kind"] == "chosen")
    assert [event["seed"] for event in scored] == chosen["seeds"] == [0, loop.SEED_STRIDE]
    objectives = [event["objective"] for event in scored]
    assert objectives[0] != objectives[1] and chosen["chosen"] == int(np.argmin(objectives))
    assert {event["initialisation"] for event in events if event["kind"] == "epoch"} == {0, 1}
    # The kept run is the run of its seed alone, and its objective is the one the export measures.
    alone, _ = run(shards, tmp_path / "alone", **{"train.seed": chosen["seeds"][chosen["chosen"]]})
    np.testing.assert_array_equal(checkpoint.labels, alone.labels)
    params = small_params(**settings)
    exported = export.export_label_set(checkpoint.model, shards, params, torch.device("cpu"), 0, None, None,
                                       checkpoint.target_sizes)
    assert min(exported.final.objective) == pytest.approx(min(objectives), rel=1e-5)
    saved = train.load_checkpoint(tmp_path / "whole" / "checkpoint.pt", params.train, torch.device("cpu"))
    np.testing.assert_array_equal(saved.labels, checkpoint.labels)
    assert saved.history[-1] == {"kind": "initialisations", **{key: chosen[key] for key in ("seeds", "objectives",
                                                                                            "chosen")}}
    assert not list((tmp_path / "whole" / "state").glob("initialisation-*"))

    # A crash in the second run: the rerun keeps the finished first run and resumes the second after its epoch.
    def crash(event):
        if event["kind"] == "epoch" and event["initialisation"] == 1 and event["epoch"] == 1:
            raise KeyboardInterrupt

    setup = TrainingRun(str(shards), tmp_path / "crashed" / "checkpoint.pt", tmp_path / "crashed" / "state",
                        torch.device("cpu"), 0, crash)
    with pytest.raises(KeyboardInterrupt):
        run_training(setup, params.train)
    resumed, again = run(shards, tmp_path / "crashed", **settings)
    starts = [event for event in again if event["kind"] == "start"]
    assert [start["resumed_at_epoch"] for start in starts] == [2, 1]
    assert [event["initialisation"] for event in again if event["kind"] == "epoch"] == [1]
    np.testing.assert_array_equal(resumed.labels, checkpoint.labels)
