"""Public names of a sub-package, imported on first use.

A sub-package's ``__init__`` names its public functions without importing the modules that define them: the
registry (``sela labels``) must import without torch, and ``import sela.data`` should not pay for PIL or
webdataset until they are used.
"""

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, modules: dict[str, list[str]]) -> tuple[list[str], Callable[[str], Any]]:
    """``__all__`` and a module ``__getattr__`` for ``package``; ``modules`` maps a module name to its public names."""
    owner = {name: module for module, names in modules.items() for name in names}

    def getattr_(name: str) -> Any:
        if name not in owner:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{owner[name]}"), name)

    return sorted(owner), getattr_
