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


PROJECT_FILES = ["sela", "tasks", "flows", "params.yaml", "dvc.yaml", ".dvcignore", ".dvc/config",
                 ".dvc/.gitignore", ".gitignore", "data/.gitignore", "models/.gitignore", "labels/.gitignore"]

TINY_TRAINING = {"train.width": 8, "train.image_size": 16, "train.num_heads": 2, "train.epochs": 3,
                 "train.num_relabels": 2, "train.relabel_views": 1, "transfer.epochs": 2, "transfer.width": 8}


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` (relative path -> bytes) under ``root``, making folders as needed. Returns ``root``."""
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture(scope="session")
def prefect_api_url():
    """One real Prefect server (SQLite in a temp dir) for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


def make_project(destination: Path, train_overrides: dict | None = None) -> Path:
    """A git + DVC repo holding this checkout's pipeline code, with params.yaml shrunk to a few seconds of work."""
    import shutil
    import subprocess

    import yaml

    for name in PROJECT_FILES:
        source, target = PROJECT_ROOT / name, destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    params = yaml.safe_load((destination / "params.yaml").read_text())
    for dotted, value in {**TINY_TRAINING, **(train_overrides or {})}.items():
        *parents, leaf = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    (destination / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.name", "sela-test"],
                    ["git", "config", "user.email", "sela-test@localhost"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "pipeline"]):
        subprocess.run(command, cwd=destination, check=True, capture_output=True)
    return destination


def publish_versions(base: Path, runs: list[dict | None], consumer: str) -> tuple[Path, Path, list[tuple]]:
    """One version per entry of ``runs`` (params overrides) published by the real flow from ``base/producer``, whose
    DVC cache is then deleted: (producer, cache-less clone at ``base/<consumer>/clone``, [(tag, label-set bytes,
    card)] per version)."""
    import json
    import shutil
    import subprocess

    from flows.full import sela

    producer = make_project(base / "producer")
    versions = []
    for overrides in runs:
        state = sela(root=str(producer), overrides=overrides, return_state=True)
        assert state.is_completed(), state.message
        card = json.loads((producer / "labels/card.json").read_text())
        versions.append((state.result()["version"]["tag"], (producer / "labels/labels.parquet").read_bytes(), card))
    shutil.rmtree(producer / ".dvc" / "cache")
    clone = base / consumer / "clone"
    subprocess.run(["git", "clone", "-q", str(producer), str(clone)], check=True)
    return producer, clone, versions


@pytest.fixture(scope="session")
def published_digits(prefect_api_url, tmp_path_factory):
    """Two versions of the digits published by the real flow (the second aligned to the first: its ids renamed),
    the producer's DVC cache then deleted: (producer, cache-less clone in another folder, [(tag, label-set bytes,
    card)] per version). Whatever is read from the clone comes from the DVC remote, as for another team."""
    return publish_versions(tmp_path_factory.mktemp("published"), [None, {"train": {"seed": 1}}], "elsewhere")


def published_table(data: bytes):
    """A published label set's parquet bytes as a DataFrame indexed by key."""
    import io

    import pandas as pd

    return pd.read_parquet(io.BytesIO(data)).set_index("key")


def write_digit_folder(folder: Path, count: int, image_size: int) -> None:
    """The first ``count`` digits as PNG files (the bytes the digits source renders at ``image_size``), in two class
    folders: the pictures of a digits version, under other names."""
    from sela.data.sources import render_digit

    for index in range(count):
        path = folder / ("even" if index % 2 == 0 else "odd") / f"digit {index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(render_digit(index, image_size))
