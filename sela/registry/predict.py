"""``sela labels predict``: label new images with a published version, from any folder, without the producer's cache.

The steps, each a function the Prefect flow ``flows/predict.py`` runs as a task too:

1. ``fetch_rule``: the version's params.yaml at its tag (git) and its card (DVC remote): ingest settings, eval view,
   cluster potentials, published ids, selected head;
2. ``fetch_checkpoint``: the version's network from the DVC remote, as ``pull`` fetches labels;
3. ``ingest_source``: the source's files -> shards, with the version's ingest settings; bad files quarantined;
4. ``label_images``: one streamed pass of the network over the shards, labels by the label set's rule;
5. ``write_outputs``: OUT (parquet, or CSV for a ``.csv`` name) and ``OUT.quarantine.<suffix>`` beside it.

A source file that gives no label (unreadable, too small, a duplicate of an earlier file) is listed in the
quarantine file with its reason, as the shard stage lists it; a source with no readable image is an error and
writes nothing.

torch is imported by the steps that run the network, not by this module: ``sela labels`` starts without it.
"""

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sela.paths import CARD, CHECKPOINT
from sela.registry.read import DEFAULT_PREFIX, read_file, version_params

Progress = Callable[[int], None] | None


class PredictError(RuntimeError):
    """The source gave no image to label, or the version cannot label images; the message says why."""


@dataclass(frozen=True)
class VersionRule:
    """What a version labels images with, besides its network: ``tag``, ``params`` (``sela.config.Params`` of its
    params.yaml) and ``card`` (its label card: cluster potentials, id alignment, selected head)."""

    tag: str
    params: Any
    card: dict[str, Any]


@dataclass(frozen=True)
class PredictSummary:
    """What a prediction wrote: the version, images labelled, files quarantined, the two output files."""

    tag: str
    inputs: int
    labelled: int
    quarantined: int
    output: Path
    quarantine: Path

    def line(self) -> str:
        return (f"{self.tag}: {self.labelled} of {self.inputs} images labelled -> {self.output}; "
                f"{self.quarantined} quarantined -> {self.quarantine}")


def fetch_rule(repo: str, version: str | int = "latest", prefix: str = DEFAULT_PREFIX) -> VersionRule:
    """The version's params.yaml (at its tag, not the checkout's) and its card (fetched as ``pull`` fetches)."""
    tag, params = version_params(repo, version, prefix)
    card = json.loads(read_file(repo, tag, CARD, prefix)[1])
    if "cluster_potentials" not in card:  # checked before any image is read
        raise PredictError(f"{tag} predates cluster potentials in the card: it cannot label new images by its rule")
    return VersionRule(tag, params, card)


def fetch_checkpoint(repo: str, tag: str, destination: str | Path, prefix: str = DEFAULT_PREFIX) -> Path:
    """The version's checkpoint, from the DVC remote (or the repository's cache), written to ``destination``."""
    _, data = read_file(repo, tag, CHECKPOINT, prefix)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(data)
    return destination


def ingest_source(rule: VersionRule, source: str, shard_dir: str | Path, workers: int,
                  progress: Progress = None) -> Any:
    """``source`` (a folder, archive, glob, list file or URL, as the shard stage takes) ingested into ``shard_dir``
    with the version's ingest settings. Returns the ``IngestReport``; raises ``PredictError`` if the source is
    missing, empty or holds no readable image (naming the first reasons)."""
    from sela.data.ingest import ingest
    from sela.labels.predict import source_params

    try:
        report = ingest(source_params(rule.params, source), str(shard_dir), workers, progress)
    except (FileNotFoundError, ValueError) as error:
        raise PredictError(f"cannot read source {source!r}: {error}") from error
    if len(report.manifest) == 0:
        reasons = "; ".join(f"{row.path}: {row.reason}" for row in report.quarantine.head(5).itertuples())
        raise PredictError(f"no image of source {source!r} could be read ({len(report.quarantine)} files "
                           f"quarantined: {reasons})")
    return report


def label_images(rule: VersionRule, checkpoint: str | Path, shard_dir: str | Path, device_name: str,
                 workers: int | None = None, progress: Progress = None) -> pd.DataFrame:
    """Every image of ``shard_dir`` labelled by the version's network and rule on ``device_name``: key, label,
    confidence, label_head_<h>, confidence_head_<h>, source_path, sha256, width, height. ``workers``: loader
    processes (None: the machine's default, ``sela.learn.machine.loader_workers``)."""
    import torch

    from sela.labels.predict import LabelRule, predict_shards, prediction_table
    from sela.learn.machine import loader_workers
    from sela.learn.train import load_checkpoint

    try:
        label_rule = LabelRule.from_card(rule.card)
    except (KeyError, ValueError) as error:
        raise PredictError(f"{rule.tag} cannot label new images: {error}") from error
    device = torch.device(device_name)
    model = load_checkpoint(Path(checkpoint), rule.params.train, device).model
    workers = loader_workers(device) if workers is None else workers
    prediction = predict_shards(model, shard_dir, label_rule, rule.params, device, workers, progress)
    return prediction_table(shard_dir, prediction, label_rule.selected_head)


def write_outputs(labels: pd.DataFrame, shard_dir: str | Path, output: str | Path) -> tuple[Path, Path, int, int]:
    """``output`` (parquet, or CSV for a ``.csv`` name) and, beside it in the same format, the ingest's quarantine
    list (path, key, reason of every file that got no label; empty when none). A reused work folder keeps samples
    of files that have left the source since (``removed.parquet``): they are not written. Returns both paths and
    the numbers of rows written to each."""
    from sela.data.shards import QUARANTINE_NAME, REMOVED_NAME
    from sela.labels.predict import quarantine_path, write_table

    removed = pd.read_parquet(Path(shard_dir) / REMOVED_NAME, columns=["key"])["key"]
    labels = labels[~labels["key"].isin(removed)].reset_index(drop=True)
    quarantine = pd.read_parquet(Path(shard_dir) / QUARANTINE_NAME)
    listed = write_table(quarantine, quarantine_path(output))
    return write_table(labels, output), listed, len(labels), len(quarantine)


def ingest_workers() -> int:
    """Decode processes for the ingest: every core this process may run on."""
    return len(os.sched_getaffinity(0))


def predict_version(repo: str, version: str | int, source: str, output: str | Path, device_name: str | None = None,
                    prefix: str = DEFAULT_PREFIX, work_dir: str | Path | None = None,
                    progress: Callable[[str, int | None], Callable[[int], None]] | None = None) -> PredictSummary:
    """Label the images of ``source`` with ``version`` of ``repo`` and write ``output`` (see the module docstring).

    ``device_name``: None for the first GPU if there is one (``SELA_DEVICE`` overrides), else e.g. cpu, cuda:1.
    ``work_dir``: where the source's shards go (kept: a rerun resumes); None for a temporary folder.
    ``progress(stage, total)``: a counter to call with images done, for each of "ingest" and "label".
    """
    from sela.learn.machine import device_name as default_device

    rule = fetch_rule(repo, version, prefix)
    with tempfile.TemporaryDirectory(prefix="sela-predict-") as temporary:
        shard_dir = Path(work_dir) / "shards" if work_dir is not None else Path(temporary) / "shards"
        # The source first: a bad one fails before the checkpoint is downloaded (the card came through DVC already).
        report = ingest_source(rule, source, shard_dir, ingest_workers(),
                               None if progress is None else progress("ingest", None))
        checkpoint = fetch_checkpoint(repo, rule.tag, Path(temporary) / "checkpoint.pt", prefix)
        labels = label_images(rule, checkpoint, shard_dir, device_name or default_device(),
                              progress=None if progress is None else progress("label", len(report.manifest)))
        written, listed, labelled, quarantined = write_outputs(labels, shard_dir, output)
    return PredictSummary(rule.tag, report.inputs, labelled, quarantined, written, listed)
