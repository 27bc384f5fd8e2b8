"""One process of a training run, as ``torchrun`` starts it: ``python -m torch.distributed.run ... -m
tasks.train_worker ROOT``. The train task launches it (``tasks.train``); it can also be started by hand on each node.

Machine settings come from the environment, never from params.yaml: torchrun's RANK, LOCAL_RANK, WORLD_SIZE and
MASTER_ADDR/PORT; ``SELA_DEVICE`` (cpu, cuda; a GPU per local rank) and ``SELA_LOADER_WORKERS``. The ``train``
params are the ones the task resolved (``train-state/params.json``), so run overrides reach every rank.
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as distributed
from torch.distributed.elastic.multiprocessing.errors import record

from sela.config import TrainParams
from sela.learn.incremental import ParentVersion
from sela.learn.loop import TrainingRun, run_training
from sela.paths import CHECKPOINT, SHARD_DIR, TRAIN_STATE
from tasks.environment import device_name, loader_workers

PARAMS_FILE = "params.json"
PARENT_FILE = "parent.json"  # the parent version's fetched files (null from scratch)
PROGRESS_FILE = "progress.jsonl"


def _device() -> torch.device:
    device = torch.device(device_name())
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


@record  # a failing rank's traceback reaches torchrun's summary, and so the train task's error
def main(root: str) -> None:
    base = Path(root).resolve()
    state_dir = base / TRAIN_STATE
    params = TrainParams.model_validate(json.loads((state_dir / PARAMS_FILE).read_text()))
    parent = json.loads((state_dir / PARENT_FILE).read_text())
    device = _device()
    (state_dir / f"rank-{os.environ.get('RANK', '0')}.pid").write_text(f"{os.getpid()}\n")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A short timeout: a collective that waits on a dead rank fails the run instead of hanging it.
        distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=5))
    progress_path = state_dir / PROGRESS_FILE

    def progress(event: dict) -> None:
        with progress_path.open("a") as handle:
            handle.write(json.dumps(event) + "\n")

    try:
        run = TrainingRun(str(base / SHARD_DIR), base / CHECKPOINT, state_dir, device, loader_workers(device),
                          progress, parent=None if parent is None else ParentVersion.from_json(parent))
        run_training(run, params)
    finally:
        if distributed.is_initialized():
            distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
