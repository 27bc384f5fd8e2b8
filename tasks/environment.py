"""Process-level settings: Prefect's offline defaults and the machine's device. Never part of params.yaml."""

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def configure_prefect_environment() -> None:
    """Offline-safe Prefect defaults; variables the user already exported win.

    Analytics would try DNS lookups on a closed network; the 20 s ephemeral-server start-up default times out
    on 2 cores; keeping PREFECT_HOME in the project keeps the run history next to the data it describes.
    """
    defaults = {
        "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "DVC_NO_ANALYTICS": "1",
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def device_name() -> str:
    """``SELA_DEVICE`` if set (cpu, cuda, cuda:1), else the first GPU when there is one, else the CPU."""
    import torch

    requested = os.environ.get("SELA_DEVICE")
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def loader_workers(device: "torch.device") -> int:
    """``SELA_LOADER_WORKERS`` if set, else: on a CPU none (decoding in the training process: on 2 cores a worker
    beside the step's two threads ran CIFAR-10 epochs at 4,700 images/s against 5,300 inline); on a GPU the cores of
    this node shared by its processes, at most 8."""
    requested = os.environ.get("SELA_LOADER_WORKERS")
    if requested:
        return int(requested)
    if device.type == "cpu":
        return 0
    per_process = len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_process - 1))
