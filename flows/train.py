"""Stage ``train``: self-labelling epochs with scheduled Sinkhorn relabels. ``python -m flows.train``."""

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.common import resolve
from sela.config import ParamsOverrides
from tasks.train import fetch_parent_version, remove_parent_copy, train


@flow(name="train")
def train_flow(root: str = ".", overrides: ParamsOverrides | None = None) -> dict[str, Any]:
    """Random network (``train.start_from: parent``: the newest version's) -> relabel (on schedule) / epoch, ...
    -> ``models/checkpoint.pt``; resumes a crashed run."""
    root, params = resolve(root, overrides)
    parent = fetch_parent_version(root, params)  # None from scratch
    try:
        summary = train(root, params.train, parent)
    finally:
        remove_parent_copy(parent)
    relabels = summary.pop("relabel_heads_0")
    if relabels:
        create_table_artifact(relabels, key="relabels", description="Sinkhorn relabels of head 0: iterations, "
                              "convergence, fraction of images whose label changed, smallest and largest cluster")
    return {**summary, "relabels": len(relabels)}


if __name__ == "__main__":
    train_flow()
