"""Label registry: publish versions (``registry.publish``) and read them back (``registry.read``, ``sela labels``).

Outside ``sela/`` on purpose: it drives git and DVC, which the pure core never imports.
"""

from registry.read import (
    RegistryError,
    Version,
    diff_versions,
    list_versions,
    load_labels,
    pull_labels,
    show_card,
)

__all__ = ["RegistryError", "Version", "diff_versions", "list_versions", "load_labels", "pull_labels", "show_card"]
