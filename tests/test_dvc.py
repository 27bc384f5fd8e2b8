"""dvc.yaml: every stage depends on the code it runs, the stages run, a second repro does nothing, and a published
version is pullable without a cache."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import dvc.api
import pytest
import yaml

from sela.labels.card import CARD_PARAMS
from sela.paths import STAGE_OUTPUTS
from sela.registry.publish import publish_version
from tests.conftest import make_project

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("sela", "tasks", "flows")


def module_files(module: str) -> list[Path]:
    """Files Python runs to import ``module`` of this project: its packages' ``__init__.py``
    files, then the module itself. Empty for other modules."""
    parts = module.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return []
    files = [ROOT.joinpath(*parts[:depth], "__init__.py") for depth in range(1, len(parts))]
    base = ROOT.joinpath(*parts)
    candidates = (base.with_suffix(".py"), base / "__init__.py")
    return [path for path in files if path.exists()] + [path for path in candidates if path.exists()][:1]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code; ``from a import b`` also names ``a.b``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def code_closure(module: str) -> set[str]:
    """Repository paths of every project file that running ``python -m module`` imports, transitively."""
    seen: set[Path] = set()
    pending = module_files(module)
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        if path.suffix == ".py":
            pending += [file for name in imported_modules(path) for file in module_files(name)]
    return {path.relative_to(ROOT).as_posix() for path in seen}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_depends_on_all_the_code_it_runs(stage):
    # A file missing from deps means `dvc repro` keeps a stale output after that file changes.
    command = STAGES[stage]["cmd"]
    assert command.startswith("python -m "), command
    deps = STAGES[stage]["deps"]
    missing = {file for file in code_closure(command.removeprefix("python -m "))
               if not any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)}
    assert not missing, f"stage {stage!r} runs these files but does not list them in deps: {sorted(missing)}"


def test_the_label_card_records_the_params_the_export_stage_declares():
    # A section on the card but not in the stage's params could show a value the labels were not made with.
    assert list(CARD_PARAMS) == STAGES["export"]["params"]


def run_dvc(project: Path, *args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                            env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
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
