"""Label registry: publish versions (``publish``), read them back (``read``; the ``sela labels`` command) and label
new images with one (``predict``: needs torch when it runs, not when imported).

The one part of ``sela`` that drives git and DVC, through their command lines (it imports neither DVC nor Prefect).
"""

from sela.registry.predict import PredictError, predict_version
from sela.registry.read import (
    RegistryError,
    Version,
    diff_versions,
    list_versions,
    load_labels,
    pull_labels,
    show_card,
)

__all__ = ["PredictError", "RegistryError", "Version", "diff_versions", "list_versions", "load_labels",
           "predict_version", "pull_labels", "show_card"]
