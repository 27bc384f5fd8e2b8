"""Process-level settings: Prefect's offline defaults and the machine's device. Never part of params.yaml."""

import os
from pathlib import Path

# Device and loader processes: the same choice for the pipeline's tasks and for ``sela labels predict``.
from sela.learn.machine import device_name, loader_workers  # noqa: F401

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
