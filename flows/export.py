"""Stage ``export``: checkpoint -> label set, card and metrics. ``python -m flows.export``."""

from typing import Any

from prefect import flow

from flows.common import resolve
from sela.config import ParamsOverrides
from tasks.export import export_labels, fetch_parent_label_set


@flow(name="export")
def export_flow(root: str = ".", overrides: ParamsOverrides | None = None) -> dict[str, Any]:
    """Final balanced labels of every head, written for data teams."""
    root, params = resolve(root, overrides)
    parent = fetch_parent_label_set(root, params)  # the newest version, whose cluster ids this one keeps
    return export_labels(root, params, parent)


if __name__ == "__main__":
    export_flow()
