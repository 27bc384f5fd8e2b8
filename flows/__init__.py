"""Prefect flows: the pipeline diagram. Each DVC stage runs one of these flows; ``sela/full`` runs them all."""

import tasks  # noqa: F401  (sets the offline Prefect defaults before Prefect is imported)
