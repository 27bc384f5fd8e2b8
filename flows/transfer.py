"""Stage ``transfer``: a fresh network of another architecture learns the labels. ``python -m flows.transfer``."""

from typing import Any

from prefect import flow

from flows.common import resolve
from sela.config import ParamsOverrides
from tasks.transfer import transfer_labels


@flow(name="transfer")
def transfer_flow(root: str = ".", overrides: ParamsOverrides | None = None) -> dict[str, Any]:
    """Plain supervised training on the exported labels; agreement on held-out images and kNN accuracy."""
    root, params = resolve(root, overrides)
    return transfer_labels(root, params)


if __name__ == "__main__":
    transfer_flow()
