"""Label registry: publish versions (``publish``) and read them back (``read``; the ``sela labels`` command).

The one part of ``sela`` that drives git and DVC, through their command lines (it imports neither DVC nor Prefect).
"""

from sela.registry.read import (
    RegistryError,
    Version,
    diff_versions,
    list_versions,
    load_labels,
    pull_labels,
    show_card,
)

__all__ = ["RegistryError", "Version", "diff_versions", "list_versions", "load_labels", "pull_labels", "show_card"]
