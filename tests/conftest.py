"""Shared fixtures: array backends for the Sinkhorn tests, Prefect offline settings, one Prefect test server."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def _cupy_or_none():
    try:
        import cupy

        cupy.zeros(1).sum()  # raises without a usable GPU (cudaErrorInsufficientDriver / no device)
        return cupy
    except Exception:  # noqa: BLE001 - any failure means "no CuPy backend on this machine"
        return None


CUPY = _cupy_or_none()


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """Array namespace under test: numpy always, CuPy where a GPU is present (skipped elsewhere)."""
    if request.param == "numpy":
        return np
    if CUPY is None:
        pytest.skip("CuPy needs a CUDA GPU; none here")
    return CUPY


def to_numpy(array):
    """Host copy of a numpy or CuPy array."""
    return array.get() if hasattr(array, "get") else np.asarray(array)
