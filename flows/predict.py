"""Deployment ``sela/predict``: label new images with a published version. ``python -m flows.predict REPO SOURCE OUT``.

The same steps as ``sela labels predict`` (``sela.registry.predict``), as Prefect tasks. Paths are read by the
process serving the deployment: give absolute ones.
"""

import sys
import tempfile
from typing import Any

from prefect import flow, get_run_logger

from sela.registry.read import DEFAULT_PREFIX
from tasks.predict import fetch_checkpoint, fetch_rule, ingest_source, label_images, work_path, write_predictions


# Named "sela" like the pipeline's flow: Prefect names a deployment <flow>/<name>, and this one is sela/predict.
@flow(name="sela", flow_run_name="predict-{version}")
def predict(repo: str, source: str, output: str, version: str | int = "latest", prefix: str = DEFAULT_PREFIX,
            device: str | None = None) -> dict[str, Any]:
    """Label the images of ``source`` (folder, archive, glob, list file or URL) with ``version`` of ``repo``; write
    ``output`` (.parquet or .csv) and the quarantined files beside it. ``device``: None for a GPU if there is one."""
    rule = fetch_rule(repo, version, prefix)
    with tempfile.TemporaryDirectory(prefix="sela-predict-") as work:
        shards = work_path(work, "shards")
        ingested = ingest_source(rule, source, shards)
        checkpoint = fetch_checkpoint(repo, rule.tag, work_path(work, "checkpoint.pt"), prefix)
        labels = label_images(rule, checkpoint, shards, device, ingested["images"], work_path(work, "labels.parquet"))
        written = write_predictions(labels, shards, output)
    result = {"version": rule.tag, "inputs": ingested["inputs"], **written}
    get_run_logger().info("%s: %d of %d images labelled -> %s; %d quarantined -> %s", rule.tag, written["labelled"],
                          ingested["inputs"], written["output"], written["quarantined"], written["quarantine"])
    return result


if __name__ == "__main__":
    predict(*sys.argv[1:4])
