"""Stage ``train``: self-labelling epochs with scheduled Sinkhorn relabels. ``python -m flows.train``."""

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from flows.common import resolve
from sela.config import ParamsOverrides
from sela.learn.train import relabel_epochs
from tasks.train import relabel, start_training, train_epoch


@flow(name="train")
def train_flow(root: str = ".", overrides: ParamsOverrides | None = None) -> dict[str, Any]:
    """Random network -> relabel (on schedule) / epoch, ... -> ``models/checkpoint.pt``."""
    root, params = resolve(root, overrides)
    settings, logger = params.train, get_run_logger()
    start = start_training(root, settings)
    logger.info("start: %s", start)
    if settings.precision == "bfloat16" and not start["native_bfloat16"]:
        logger.warning("train.precision is bfloat16 but %s has no bfloat16 instructions: it is emulated there and "
                       "can be slower than float32 (set train.precision: float32 in params.yaml)", start["device"])
    schedule = set(relabel_epochs(settings.epochs, settings.num_relabels, settings.relabel_power))
    progress = create_progress_artifact(0.0, key="training-progress", description="epochs done (%)")
    summary: dict[str, Any] = {}
    relabels: list[dict[str, Any]] = []
    for epoch in range(settings.epochs):
        if epoch in schedule:
            diagnostics = relabel.with_options(task_run_name=f"relabel-before-epoch-{epoch}")(root, settings)
            logger.info("relabel before epoch %d: %s", epoch, diagnostics["heads"][0])
            relabels.append({"epoch": epoch, **diagnostics["heads"][0]})
        summary = train_epoch.with_options(task_run_name=f"epoch-{epoch}")(root, settings)
        logger.info("epoch %d/%d: %s", epoch + 1, settings.epochs, summary)
        update_progress_artifact(progress, 100.0 * (epoch + 1) / settings.epochs)
    create_table_artifact(relabels, key="relabels", description="Sinkhorn relabels of head 0: iterations, "
                          "convergence, fraction of images whose label changed, smallest and largest cluster")
    return {**summary, "relabels": len(schedule)}


if __name__ == "__main__":
    train_flow()
