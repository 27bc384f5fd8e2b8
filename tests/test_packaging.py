"""Packaging: a wheel of the project holds the ``sela`` package and the ``sela`` command, nothing else.

flows/ and tasks/ run from a checkout: installed as top-level ``flows`` and ``tasks`` they would collide with other
projects' modules in site-packages.
"""

import configparser
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import setuptools

from tests.conftest import PROJECT_ROOT

# What a clone holds that the build could pick up: the packaging files and every folder of Python code.
BUILD_INPUTS = ["pyproject.toml", "sela", "tasks", "flows", "tests", "scripts", "benchmarks"]


def can_build_wheels() -> bool:
    """setuptools makes wheels itself from 70.1 on; before that it needs the ``wheel`` package."""
    version = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def copy_project(destination: Path) -> Path:
    """The build inputs of this checkout, without build leftovers (a build writes into its source tree)."""
    destination.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in BUILD_INPUTS:
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, destination / name)
    return destination


def build(args: list[str], cwd: Path) -> None:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def wheel_contents(project: Path, work: Path) -> tuple[list[str], str]:
    """(paths in the wheel, its entry_points.txt), offline: no build isolation, this environment's setuptools.

    Where setuptools cannot make a wheel (before 70.1 without the ``wheel`` package, as in requirements.lock),
    the same two steps bdist_wheel packs: ``build_py`` (the files that land in site-packages) and ``egg_info``
    (the metadata its dist-info is made from).
    """
    if can_build_wheels():
        build(["-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
               "--wheel-dir", str(work / "wheels"), str(project)], work)
        [wheel] = (work / "wheels").glob("sela-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            [entry_points] = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
            return names, archive.read(entry_points).decode()
    # No setup.py in the project: setuptools' own entry point, configured by pyproject.toml alone.
    build(["-c", "from setuptools import setup; setup()", "--quiet", "egg_info", "--egg-base", str(work),
           "build_py", "--build-lib", str(work / "lib")], project)
    names = [path.relative_to(work / "lib").as_posix() for path in (work / "lib").rglob("*") if path.is_file()]
    names += [f"sela.egg-info/{path.name}" for path in (work / "sela.egg-info").iterdir()]
    return names, (work / "sela.egg-info/entry_points.txt").read_text()


def test_wheel_holds_only_the_sela_package_and_the_sela_command(tmp_path):
    project = copy_project(tmp_path / "project")
    (tmp_path / "work").mkdir()
    names, entry_points = wheel_contents(project, tmp_path / "work")

    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith((".dist-info", ".egg-info"))} == {"sela"}, top_level
    assert {"sela/__init__.py", "sela/registry/cli.py", "sela/learn/train.py", "sela/sinkhorn/solver.py"} <= set(names)
    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    assert dict(scripts["console_scripts"]) == {"sela": "sela.registry.cli:main"}


def test_the_sela_command_runs_without_the_pipeline_dependencies(tmp_path):
    # `pip install sela` brings no torch, Prefect, webdataset or Pillow: the registry must not import them.
    code = ("import sys; from sela.registry.cli import main; "
            f"code = main(['labels', 'list', {str(tmp_path / 'nowhere')!r}]); "
            "print(code, sorted({'torch', 'torchvision', 'prefect', 'webdataset', 'PIL'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "1 []", result.stdout  # a clean error, not an ImportError
    assert "nowhere" in result.stderr


def test_predict_without_torch_exits_with_a_clear_message(tmp_path):
    # A finder ahead of the others that knows no torch: `import torch` fails as where it is not installed.
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ModuleNotFoundError(name, name=name)\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "from sela.registry.cli import main\n"
            f"print(main(['labels', 'predict', {str(tmp_path)!r}, {str(tmp_path)!r}, '-o', "
            f"{str(tmp_path / 'out.parquet')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    assert result.stdout.splitlines()[-1:] == ["1"], result.stdout + result.stderr[-3000:]
    assert result.stderr.strip() == ("sela: `sela labels predict` runs the version's network and needs torch: "
                                     "pip install 'sela[pipeline]'")
    assert not (tmp_path / "out.parquet").exists()
