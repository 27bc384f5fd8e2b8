"""What a training run leaves beside its checkpoint so that it can resume: the last epoch's logits of each rank, the
run's identity (fingerprint) and a lock against a second run in the same place.

Files in the state folder (``models/train-state`` in the pipeline):
- ``epoch-logits-e<E>-r<R>of<W>.npy`` and ``epoch-indices-e<E>-r<R>of<W>.npy``: rank R's rows of the logits that
  epoch E computed (``relabel_from: last_epoch``), memory-mapped while the epoch fills them, renamed into place
  when it ends; the checkpoint of epoch E is written after them, and older ones are removed after it;
- ``lock``: held (``flock``) by the process that runs the training; the file names that process.
"""

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sela.config import TrainParams


class TrainingLockedError(RuntimeError):
    """Another training run holds the state folder."""


def fingerprint(params: TrainParams, manifest_sha256: str, parent_version: str | None = None) -> str:
    """Identity of a run: its ``train`` params, the shards' manifest and the version it started from (None from
    scratch). A checkpoint resumes only under the same."""
    identity = {"train": params.model_dump(mode="json"), "manifest": manifest_sha256}
    if parent_version is not None:  # absent from scratch: checkpoints of runs from scratch keep their identity
        identity["parent"] = parent_version
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@contextmanager
def training_lock(state_dir: Path) -> Iterator[int]:
    """Hold the state folder for the duration: a second run in the same place is refused, naming the first. Yields
    the lock's file descriptor: a child process that inherits it holds the lock too, for as long as it lives.

    ``flock`` is released by the kernel when the last process holding it dies (even by SIGKILL): a crashed run
    never blocks the next one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "lock"
    handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown process"
        handle.close()
        raise TrainingLockedError(f"another training run is using {state_dir} ({holder}); wait for it to end or stop "
                                  "it: two runs would overwrite one checkpoint") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield handle.fileno()
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _names(epoch: int, rank: int, world_size: int) -> tuple[str, str]:
    suffix = f"e{epoch}-r{rank}of{world_size}.npy"
    return f"epoch-logits-{suffix}", f"epoch-indices-{suffix}"


class EpochLogits:
    """One rank's rows of an epoch's logits: ``indices`` (n,) int64 and ``logits`` (n, sum of head sizes) float32,
    in the order the rank met them, memory-mapped in the state folder (never in the checkpoint)."""

    def __init__(self, indices: np.ndarray, logits: np.ndarray) -> None:
        self.indices, self.logits = indices, logits

    @classmethod
    def create(cls, state_dir: Path, epoch: int, rank: int, world_size: int, rows: int, columns: int) -> "EpochLogits":
        """Empty memory-mapped arrays for the epoch that ends with ``epoch`` done, under temporary names."""
        state_dir.mkdir(parents=True, exist_ok=True)
        logits_name, indices_name = _names(epoch, rank, world_size)
        logits = np.lib.format.open_memmap(state_dir / f"{logits_name}.tmp", "w+", np.float32, (rows, columns))
        indices = np.lib.format.open_memmap(state_dir / f"{indices_name}.tmp", "w+", np.int64, (rows,))
        return cls(indices, logits)

    def commit(self, state_dir: Path, epoch: int, rank: int, world_size: int) -> None:
        """Flush and rename into place: an epoch's files exist only when complete."""
        for array, name in zip((self.logits, self.indices), _names(epoch, rank, world_size), strict=True):
            array.flush()
            os.replace(state_dir / f"{name}.tmp", state_dir / name)

    @classmethod
    def load(cls, state_dir: Path, epoch: int, rank: int, world_size: int) -> "EpochLogits | None":
        """The committed rows of ``epoch`` for this rank and process count, or None if there are none."""
        logits_name, indices_name = _names(epoch, rank, world_size)
        if not (state_dir / logits_name).exists() or not (state_dir / indices_name).exists():
            return None
        return cls(np.load(state_dir / indices_name, mmap_mode="r"), np.load(state_dir / logits_name, mmap_mode="r"))


def remove_epoch_logits(state_dir: Path, rank: int, keep_epoch: int | None) -> None:
    """Remove this rank's epoch files (finished and temporary) but those of ``keep_epoch``."""
    keep = set() if keep_epoch is None else {f"-e{keep_epoch}-"}
    for path in state_dir.glob(f"epoch-*-r{rank}of*.npy*"):
        if not any(mark in path.name for mark in keep) or path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
