"""requirements.lock (what `make setup` installs with --no-deps) agrees with requirements.txt and the environment."""

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of the `name==version` lines of a requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_lock_holds_every_direct_pin_at_its_version():
    direct, locked = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements.lock")
    assert {name: locked.get(name) for name in direct} == direct


def test_lock_leaves_out_triton_and_keeps_torch_libraries():
    locked = _pins(ROOT / "requirements.lock")
    assert "triton" not in locked
    # torch's CUDA build links these at import, even on the CPU: leaving one out breaks `import torch`.
    assert {"nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-nccl-cu13", "nvidia-cusparselt-cu13"} <= set(locked)


def test_running_environment_matches_the_lock():
    mismatched = {}
    for name, version in _pins(ROOT / "requirements.lock").items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            mismatched[name] = (version, installed)
    assert mismatched == {}
