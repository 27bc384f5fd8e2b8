"""The train task's launcher: torchrun processes that resume after a crash, fail fast, and refuse a second run."""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sela.config import load_params
from sela.data.shards import write_shards
from sela.data.sources import iter_digit_samples
from sela.labels.export import export_label_set
from sela.learn.state import TrainingLockedError
from sela.learn.train import load_checkpoint
from sela.paths import CHECKPOINT, SHARD_DIR, TRAIN_STATE
from tasks.train import TrainingFailedError, launch_training
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(iter_digit_samples(16), folder, 300)
    return folder


def project(tmp_path: Path, shards: Path, name: str) -> Path:
    root = tmp_path / name
    (root / SHARD_DIR).parent.mkdir(parents=True)
    (root / SHARD_DIR).symlink_to(shards)
    return root


def tiny(epochs: int = 3):
    return load_params(PROJECT_ROOT / "params.yaml", {
        "train.initialisations": 1, "train.width": 8, "train.num_heads": 2, "train.epochs": epochs,
        "train.num_relabels": epochs, "train.batch_size": 64}).train


def final_labels(root: Path) -> np.ndarray:
    return torch.load(root / CHECKPOINT, weights_only=False)["labels"].numpy()


@pytest.fixture
def two_processes(monkeypatch):
    monkeypatch.setenv("PET_NPROC_PER_NODE", "2")
    monkeypatch.setenv("SELA_LOADER_WORKERS", "1")


def test_a_rank_killed_mid_epoch_fails_the_run_and_a_rerun_resumes_to_the_same_labels(
        tmp_path, digits_shards, two_processes):
    params = tiny(epochs=3)
    whole = project(tmp_path, digits_shards, "whole")
    events = launch_training(str(whole), params, lambda event: None)
    assert [e["epoch"] for e in events if e["kind"] == "epoch"] == [1, 2, 3]
    assert all(e["images"] == 1797 for e in events if e["kind"] == "epoch")  # every image once an epoch, 2 ranks

    crashed = project(tmp_path, digits_shards, "crashed")
    killed_at: list[float] = []

    def kill_rank_one(event):
        if event["kind"] == "epoch" and event["epoch"] == 1:  # checkpoint of epoch 1 written; epoch 2 starts
            pid = int((crashed / TRAIN_STATE / "rank-1.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

    with pytest.raises(TrainingFailedError, match=r"rank\s*:\s*1"):
        launch_training(str(crashed), params, kill_rank_one)
    assert time.monotonic() - killed_at[0] < 60  # failed, not hung
    assert torch.load(crashed / CHECKPOINT, weights_only=False)["epoch"] == 1

    resumed = launch_training(str(crashed), params, lambda event: None)
    assert resumed[0]["resumed_at_epoch"] == 1
    assert [e["epoch"] for e in resumed if e["kind"] == "epoch"] == [2, 3]
    np.testing.assert_array_equal(final_labels(crashed), final_labels(whole))


def test_changed_params_start_afresh_and_say_why(tmp_path, digits_shards, monkeypatch):
    monkeypatch.setenv("SELA_LOADER_WORKERS", "0")
    root = project(tmp_path, digits_shards, "changed")
    launch_training(str(root), tiny(epochs=1), lambda event: None)
    events = launch_training(str(root), tiny(epochs=1).model_copy(update={"learning_rate": 0.05}), lambda e: None)
    assert events[0]["resumed_at_epoch"] is None
    assert "other train params or other shards" in events[0]["reason"]


def test_a_second_run_in_the_same_checkout_is_refused(tmp_path, digits_shards, monkeypatch):
    monkeypatch.setenv("SELA_LOADER_WORKERS", "0")
    root = project(tmp_path, digits_shards, "busy")
    started, outcome = threading.Event(), {}

    def first_run():
        outcome["events"] = launch_training(str(root), tiny(epochs=2), lambda event: started.set())

    thread = threading.Thread(target=first_run)
    thread.start()
    assert started.wait(120)
    with pytest.raises(TrainingLockedError, match="another training run is using .*pid"):
        launch_training(str(root), tiny(epochs=2), lambda event: None)
    thread.join()
    assert outcome["events"][-1]["kind"] == "done"  # the first run was not disturbed


def test_two_ranks_resume_each_initialisation_and_keep_the_objective_the_export_measures(
        tmp_path, digits_shards, two_processes):
    overrides = {"train.initialisations": 2, "train.width": 8, "train.num_heads": 2, "train.epochs": 2,
                 "train.num_relabels": 2}
    params = load_params(PROJECT_ROOT / "params.yaml", overrides)
    root = project(tmp_path, digits_shards, "initialisations")

    def kill_rank_one(event):
        if event["kind"] == "epoch" and event["initialisation"] == 1 and event["epoch"] == 1:
            os.kill(int((root / TRAIN_STATE / "rank-1.pid").read_text()), signal.SIGKILL)

    with pytest.raises(TrainingFailedError):
        launch_training(str(root), params.train, kill_rank_one)
    events = launch_training(str(root), params.train, lambda event: None)
    assert [event["resumed_at_epoch"] for event in events if event["kind"] == "start"] == [2, 1]
    chosen = next(event for event in events if event["kind"] == "chosen")
    # Row-sharded over two ranks, the objective is the one the export measures in one process.
    checkpoint = load_checkpoint(root / CHECKPOINT, params.train, torch.device("cpu"))
    exported = export_label_set(checkpoint.model, root / SHARD_DIR, params, torch.device("cpu"), 0, None, None,
                                checkpoint.target_sizes)
    assert min(exported.final.objective) == pytest.approx(min(chosen["objectives"]), rel=1e-3)
    assert checkpoint.history[-1]["chosen"] == chosen["chosen"] == int(np.argmin(chosen["objectives"]))
    assert not list((root / TRAIN_STATE).glob("initialisation-*"))
