"""Flow ``sela`` (deployment ``sela/full``): shard -> train -> export -> evaluate -> transfer -> version."""

from typing import Any

from prefect import flow, get_run_logger

from flows.common import resolve, write_overrides
from flows.evaluate import evaluate_flow
from flows.export import export_flow
from flows.shard import shard_flow
from flows.train import train_flow
from flows.transfer import transfer_flow
from sela.config import ParamsOverrides
from tasks.version import publish


@flow(name="sela")
def sela(root: str = ".", overrides: ParamsOverrides | None = None, publish_version: bool = True) -> dict[str, Any]:
    """Unlabelled images in, a versioned label set out. ``overrides``: e.g. {"train": {"epochs": 5}}.

    With ``publish_version`` the overrides are written into params.yaml first, so the version records them.
    """
    root, params = resolve(root, overrides)  # fail fast, before any work, on a bad parameter
    if publish_version:
        write_overrides(root, overrides)
    logger = get_run_logger()
    data = shard_flow(root, overrides)
    logger.info("shards: %s", data)
    training = train_flow(root, overrides)
    metrics = export_flow(root, overrides)
    evaluation = evaluate_flow(root, overrides)
    transfer = transfer_flow(root, overrides)
    logger.info("evaluation: %s; transfer: %s", evaluation, transfer)
    quality = ", ".join(f"{name} {metrics[name]:.3f}" for name in ("nmi", "acc", "ari") if name in metrics)
    result = {"data": data, "training": training, "metrics": {k: v for k, v in metrics.items() if k != "cluster_sizes"},
              "evaluation": evaluation, "transfer": transfer}
    if publish_version:
        summary = f"{data['num_images']} images, {params.train.num_clusters} clusters"
        summary += f", {quality}" if quality else ""
        result["version"] = publish(root, params.version.tag_prefix, summary)
        logger.info("published %s", result["version"])
    return result


if __name__ == "__main__":
    sela()
