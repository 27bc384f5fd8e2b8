"""dvc.yaml: the stages run, a second repro does nothing, and a published version is pullable without a cache."""

import os
import subprocess
import sys
from pathlib import Path

import dvc.api

from registry.publish import publish_version
from tasks.paths import STAGE_OUTPUTS
from tests.conftest import make_project


def run_dvc(project: Path, *args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                            env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_repro_twice_then_pull_from_a_cacheless_clone(prefect_api_url, tmp_path):
    project = make_project(tmp_path / "project")
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the stages' `python` is this interpreter
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PATH": path}
    first = run_dvc(project, "repro", env=env)
    assert all(f"Running stage '{stage}'" in first for stage in ("shard", "train", "export", "evaluate", "transfer"))
    second = run_dvc(project, "repro", env=env)
    assert "Running stage" not in second and "up to date" in second
    version = publish_version(project, STAGE_OUTPUTS, "labels", "test version")
    assert version["tag"] == "labels-v1"

    clone = tmp_path / "consumer" / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / ".dvc" / "cache").exists()
    pulled = tmp_path / "consumer" / "labels.parquet"
    run_dvc(tmp_path / "consumer", "get", str(clone), "labels/labels.parquet", "--rev", "labels-v1", "-o", str(pulled))
    original = (project / "labels" / "labels.parquet").read_bytes()
    assert pulled.read_bytes() == original
    with dvc.api.open("labels/labels.parquet", repo=str(clone), rev="labels-v1", mode="rb") as handle:
        assert handle.read() == original
