"""The package's public names resolve (``sela/_lazy.py``: a misspelt name fails only when used)."""

import importlib

import pytest


@pytest.mark.parametrize("package", ["sela.data", "sela.sinkhorn", "sela.learn", "sela.labels", "sela.registry"])
def test_every_public_name_of_a_sub_package_resolves(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
