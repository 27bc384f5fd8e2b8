"""The package's public names resolve, and the registry command imports without the training stack."""

import importlib
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT


@pytest.mark.parametrize("package", ["sela.data", "sela.sinkhorn", "sela.learn", "sela.labels", "sela.registry"])
def test_every_public_name_of_a_sub_package_resolves(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_the_registry_command_imports_neither_torch_nor_prefect():
    code = ("import sys, sela.registry.cli; "
            "print(sorted(m for m in ('torch', 'prefect', 'webdataset', 'dvc') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
