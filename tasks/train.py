"""Task: the training run, as ``torchrun`` processes on this node; its progress reported as it goes.

Machine settings are torchrun's own environment variables (``PET_NPROC_PER_NODE``, ``PET_NNODES``,
``PET_NODE_RANK``, ``PET_RDZV_ENDPOINT``, ``PET_RDZV_ID``, ...; docs/scaling.md), plus ``SELA_DEVICE`` and
``SELA_LOADER_WORKERS``: never params.yaml. Without a rendezvous endpoint the run is ``--standalone`` on this node.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from sela.config import Params, TrainParams
from sela.learn import inference
from sela.learn.incremental import ParentVersion
from sela.learn.state import training_lock
from sela.paths import CARD, CHECKPOINT, LABELS, TRAIN_STATE
from sela.registry.read import list_versions, read_file
from tasks.environment import PROJECT_ROOT, device_name
from tasks.train_worker import PARAMS_FILE, PARENT_FILE, PROGRESS_FILE

LOG_FILE = "torchrun.log"


class TrainingFailedError(RuntimeError):
    """torchrun ended with an error; the message holds the failing rank's error as torchrun reported it."""


class NoParentVersionError(LookupError):
    """``train.start_from: parent`` in a repository with no published version to start from."""


def _unless_no_parent(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed fetch (git, the DVC remote) unless nothing is published: that is no passing I/O error."""
    try:
        state.result()
    except NoParentVersionError:
        return False
    except Exception:  # noqa: BLE001 - any other failure is the I/O this task retries
        return True
    return True


@task(name="fetch-parent-version", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=_unless_no_parent)
def fetch_parent_version(root: str, params: Params) -> dict[str, str] | None:
    """With ``train.start_from: parent``, the newest published version's checkpoint, card and label set copied
    to a temporary folder (``ParentVersion.to_json``; ``remove_parent_copy`` removes it); None from scratch."""
    if params.train.start_from == "scratch":
        return None
    prefix = params.version.tag_prefix
    versions = list_versions(root, prefix)
    if not versions:
        raise NoParentVersionError(f"train.start_from is parent but {root} has no published version (tags "
                                   f"{prefix}-v<N>) to start from: make the first one with train.start_from: scratch")
    tag = versions[-1].tag
    folder = Path(tempfile.mkdtemp(prefix="sela-parent-"))
    parent = ParentVersion(tag, folder / "checkpoint.pt", folder / "card.json", folder / "labels.parquet")
    for published, local in ((CHECKPOINT, parent.checkpoint_path), (CARD, parent.card_path),
                             (LABELS, parent.labels_path)):
        local.write_bytes(read_file(root, tag, published, prefix)[1])  # the published bytes as they are
    return parent.to_json()


def remove_parent_copy(parent: dict[str, str] | None) -> None:
    """Remove the folder ``fetch_parent_version`` copied the parent's files to (nothing from scratch)."""
    if parent is not None:
        shutil.rmtree(Path(parent["checkpoint_path"]).parent, ignore_errors=True)


def torchrun_command(root: str) -> list[str]:
    """``python -m torch.distributed.run [--standalone] --nproc-per-node N -m tasks.train_worker ROOT``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "0", "--monitor-interval", "0.5"]
    if not os.environ.get("PET_RDZV_ENDPOINT"):
        command.append("--standalone")
    command += ["--nproc-per-node", os.environ.get("PET_NPROC_PER_NODE", "1")]
    return [*command, "-m", "tasks.train_worker", root]


def launch_training(root: str, params: TrainParams, on_event: Callable[[dict[str, Any]], None],
                    poll_seconds: float = 0.5, parent: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run torchrun under the state folder's lock, passing rank 0's events to ``on_event`` as they come; returns
    them all. ``parent``: the version a run with ``start_from: parent`` starts from (``fetch_parent_version``).
    Raises ``TrainingLockedError`` if a run holds the folder, ``TrainingFailedError`` if a rank fails."""
    state_dir = Path(root) / TRAIN_STATE
    with training_lock(state_dir) as lock:
        (state_dir / PARAMS_FILE).write_text(params.model_dump_json())
        (state_dir / PARENT_FILE).write_text(json.dumps(parent))
        progress = state_dir / PROGRESS_FILE
        progress.write_text("")
        events: list[dict[str, Any]] = []
        with (state_dir / LOG_FILE).open("w") as log:
            # The ranks run this checkout's code (the one this task imported), wherever ``root`` is.
            path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
            # torchrun inherits the lock: if this process dies, the run still holds its folder until it ends.
            process = subprocess.Popen(torchrun_command(root), cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONPATH": path}, start_new_session=True,
                                       pass_fds=(lock,))
            try:
                _follow(process, progress, events, on_event, poll_seconds)
            finally:
                if process.poll() is None:  # this task was cancelled or interrupted: stop the ranks with it
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait()
        if process.returncode != 0:
            log_text = (state_dir / LOG_FILE).read_text()
            raise TrainingFailedError(f"training failed (torchrun exit code {process.returncode}): "
                                      f"{_root_cause(log_text)}\nThe checkpoint keeps the last completed epoch and a "
                                      f"rerun resumes there. End of {state_dir / LOG_FILE}:\n{log_text[-4000:]}")
        return events


def _follow(process: subprocess.Popen, progress: Path, events: list[dict[str, Any]],
            on_event: Callable[[dict[str, Any]], None], poll_seconds: float) -> None:
    """Pass rank 0's events to ``on_event`` as they are appended, until torchrun exits."""
    with progress.open() as reader:
        while True:
            finished = process.poll() is not None
            for line in reader.readlines():
                events.append(json.loads(line))
                on_event(events[-1])
            if finished:
                return
            time.sleep(poll_seconds)


def _root_cause(log_text: str) -> str:
    """The failing rank's exception as its traceback ends (``@record`` puts it in torchrun's report), else the
    rank and exit code torchrun names (a rank killed by a signal leaves no traceback)."""
    errors = re.findall(r"^\s*((?:\w+\.)*\w*(?:Error|Exception)\b: .+)$", log_text, flags=re.MULTILINE)
    failures = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", log_text)
    # The DataLoader re-raises a worker's error as "Caught X in DataLoader worker": the original follows it.
    errors = [error for error in errors if "ChildFailedError" not in error and " in DataLoader worker " not in error]
    described = errors[-1].strip() if errors else ""
    ranks = ", ".join(f"rank {rank} exited with {code}" for rank, code in dict(failures).items())
    return "; ".join(part for part in (described, ranks) if part) or "see the log below"


@task(name="train", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def train(root: str, params: TrainParams, parent: dict[str, str] | None = None) -> dict[str, Any]:
    """Train to ``params.epochs`` (from ``parent``, ``fetch_parent_version``: ``incremental.epochs``), resuming
    after the last completed epoch of an interrupted run with the same params, shards and parent (a retry of this
    task resumes too). Logs every epoch and relabel, updates a progress bar."""
    logger = get_run_logger()
    device = torch.device(device_name())
    if params.precision == "bfloat16" and not inference.native_bfloat16(device):
        logger.warning("train.precision is bfloat16 but %s has no bfloat16 instructions: it is emulated there and "
                       "can be slower than float32 (set train.precision: float32 in params.yaml)", device)
    bar = create_progress_artifact(0.0, key="training-progress", description="epochs done (%)")

    def on_event(event: dict[str, Any]) -> None:
        run = (f"initialisation {event['initialisation'] + 1}/{event['initialisations']}, "
               if "initialisations" in event else "")
        if event["kind"] == "epoch":
            logger.info("%sepoch %d/%d: loss %.4f, accuracy %.3f, %d images, %.1f s", run, event["epoch"],
                        event["epochs"], event["loss"], event["accuracy"], event["images"], event["seconds"])
            update_progress_artifact(bar, 100.0 * epochs_done(event))
        elif event["kind"] == "relabel":
            logger.info("%srelabel before epoch %d (%s): head 0 %s", run, event["epoch"], event["source"],
                        event["heads"][0])
        else:
            logger.info("%s%s", run, event)

    events = launch_training(root, params, on_event, parent=parent)
    chosen = next((event for event in events if event["kind"] == "chosen"), None)
    if chosen is not None:  # the run kept: its events alone describe the checkpoint
        events = [event for event in events if event.get("initialisation", chosen["chosen"]) == chosen["chosen"]]
    epochs = [event for event in events if event["kind"] == "epoch"]
    relabels = [event for event in events if event["kind"] == "relabel"]
    start = events[0]
    return {"epochs": epochs[-1]["epoch"] if epochs else start.get("resumed_at_epoch"),
            "loss": epochs[-1]["loss"] if epochs else None, "relabels_this_run": len(relabels),
            "resumed_at_epoch": start["resumed_at_epoch"], "start": start["reason"],
            "parent_version": start["parent_version"], "world_size": start["world_size"],
            "initialisations": None if chosen is None else {key: chosen[key] for key in ("seeds", "objectives",
                                                                                          "chosen")},
            "relabel_heads_0": [{"epoch": e["epoch"], **e["heads"][0]} for e in relabels]}


def epochs_done(event: dict[str, Any]) -> float:
    """The share of the training an epoch event completes, over every initialisation when there are several."""
    runs, done = event.get("initialisations", 1), event.get("initialisation", 0)
    return (done * event["epochs"] + event["epoch"]) / (runs * event["epochs"])
