"""Stage ``evaluate``: label set -> evaluation metrics and visual report. ``python -m flows.evaluate``."""

from typing import Any

from prefect import flow

from flows.common import resolve
from sela.config import ParamsOverrides
from tasks.evaluate import evaluate_labels


@flow(name="evaluate")
def evaluate_flow(root: str = ".", overrides: ParamsOverrides | None = None) -> dict[str, Any]:
    """ACC/NMI/ARI, kNN, linear probe, sizes, confidence, head agreement; montages and report.html."""
    root, params = resolve(root, overrides)
    return evaluate_labels(root, params)


if __name__ == "__main__":
    evaluate_flow()
