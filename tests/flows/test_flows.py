"""The Prefect flows against a real (test) Prefect server: the whole pipeline on a folder of PNGs in class folders
(the README's path) and what it publishes, its task runs, a bad parameter."""

import asyncio
import json
import logging
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from sela.config import ParamsError, load_params
from sela.data.shards import manifest_hash
from sela.data.sources import escape_key
from sela.labels import evaluate
from sela.labels.export import predict_labels
from sela.labels.metrics import label_quality
from sela.learn import inference, train
from sela.learn.models import build_model
from sela.learn.transfer import transfer_params
from sela.paths import SHARD_DIR
from sela.registry import cli as registry_cli
from tasks.images import load_shards
from tests.conftest import make_project

# Every test here runs flows against the Prefect test server, whose start alone takes 10-17 s on two shared cores.
pytestmark = pytest.mark.slow


async def _task_run_names() -> list[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return [run.name for run in await client.read_task_runs()]


CLASSES = ("red", "green", "blue")  # class folders of the README's user path: a folder of PNGs, one folder a class
PER_CLASS = 20


def write_png_classes(folder: Path) -> list[str]:
    """``PER_CLASS`` distinct 20 px PNGs in each class folder: the class's channel bright, noise everywhere.
    Returns their paths relative to ``folder``."""
    rng = np.random.default_rng(0)
    relative = []
    for channel, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for index in range(PER_CLASS):
            pixels = rng.integers(0, 90, size=(20, 20, 3), dtype=np.uint8)
            pixels[..., channel] += 150
            Image.fromarray(pixels).save(folder / name / f"{index:02d}.png")
            relative.append(f"{name}/{index:02d}.png")
    return relative


def test_full_flow_on_a_folder_of_pngs_publishes_a_pullable_version(prefect_api_url, tmp_path):
    from flows.full import sela

    files = write_png_classes(tmp_path / "images")
    project = make_project(tmp_path / "project")
    # Transfer: enough steps on the 48 training images that its network does not answer one cluster for every
    # image (an agreement that would not depend on which images it is scored on).
    overrides = {"shard": {"source": str(tmp_path / "images")}, "train": {"num_clusters": 3},
                 "transfer": {"epochs": 10, "batch_size": 16}}
    state = sela(root=str(project), overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["version"]["tag"] == "labels-v1"
    assert result["data"]["num_images"] == len(files) == 60

    # What a data team does (README): pull the latest version; one row per PNG, keyed under its class folder.
    pulled = tmp_path / "out.parquet"
    assert registry_cli.main(["labels", "pull", str(project), "--version", "latest", "-o", str(pulled)]) == 0
    assert pulled.read_bytes() == (project / "labels/labels.parquet").read_bytes()
    frame = pd.read_parquet(pulled)
    assert sorted(frame["key"]) == sorted(escape_key(path) for path in files)
    assert Counter(key.split("/")[0] for key in frame["key"]) == dict.fromkeys(CLASSES, PER_CLASS)
    published_params = subprocess.run(["git", "show", "labels-v1:params.yaml"], cwd=project, capture_output=True,
                                      text=True, check=True).stdout
    assert yaml.safe_load(published_params)["shard"]["source"] == str(tmp_path / "images")  # the version records it

    table = pq.read_table(project / "labels/labels.parquet")
    assert set(table.column_names) >= {"key", "label_head_0", "confidence_head_1"}
    card = json.loads((project / "labels/card.json").read_text())
    assert card["training"]["epochs"] == 3 and card["training"]["relabels"] == 2
    assert card["training"]["final_loss"] == pytest.approx(result["training"]["loss"])  # the last epoch's, not another
    assert sorted(card["params"]) == ["export", "shard", "train", "version"]  # what made the labels, nothing else
    assert card["data_manifest_sha256"] == manifest_hash(project / SHARD_DIR)
    assert_card_relabels_the_published_images(project, card, table)
    assert_metrics_are_those_of_the_published_labels(project, card, table, result)
    assert_report_shows_every_cluster_at_its_size(project, table, result)
    assert_transfer_agreement_is_that_of_the_saved_network(project, table)
    names = asyncio.run(_task_run_names())
    assert any(name.startswith("train-") for name in names)  # one task: the torchrun processes of this node
    assert any(name.startswith("evaluate-labels") for name in names)
    assert any(name.startswith("transfer-labels") for name in names)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True)
    assert status.stdout.strip() == ""  # the version step left nothing uncommitted


def assert_card_relabels_the_published_images(project, card: dict, table) -> None:
    """The published checkpoint and the card's cluster potentials give the published labels back (the rule a data
    team applies to new images), head by head in network output order (a first version is not renamed)."""
    params = load_params(project / "params.yaml")
    checkpoint = train.load_checkpoint(project / "models/checkpoint.pt", params.train, torch.device("cpu"))
    images = torch.from_numpy(load_shards(project, params.train.decode_size).images)
    predicted = predict_labels(checkpoint.model, images, np.asarray(card["cluster_potentials"]), params,
                               torch.device("cpu"))
    assert card["cluster_id_alignment"] is None and predicted.shape == (params.train.num_heads, table.num_rows)
    # The sizes the export balanced each head to are the ones its training ended with (the checkpoint's).
    np.testing.assert_array_equal(card["target_sizes"], np.stack(checkpoint.target_sizes[: params.train.num_heads]))
    for head, head_labels in enumerate(predicted):
        np.testing.assert_array_equal(head_labels, table.column(f"label_head_{head}").to_numpy())


def published_columns(project: Path, table) -> tuple[Any, np.ndarray, np.ndarray, list]:
    """(shards, label (N,), confidence (N,), ground truth (N,)) with rows in shard order, joined on the key."""
    params = load_params(project / "params.yaml")
    shards = load_shards(project, params.train.decode_size)
    frame = table.to_pandas().set_index("key").loc[shards.keys]
    return shards, frame["label"].to_numpy(), frame["confidence"].to_numpy(), shards.ground_truth


def assert_metrics_are_those_of_the_published_labels(project: Path, card: dict, table, result: dict) -> None:
    """Card, metrics/labels.json and the flow's result score the published `label` column against the class folders."""
    shards, label, confidence, truth = published_columns(project, table)
    assert truth == [key.split("/")[0] for key in shards.keys]  # each image's class is its folder
    expected = label_quality(label, truth)
    assert set(expected) == {"nmi", "ari", "acc"}
    dvc_metrics = json.loads((project / "metrics/labels.json").read_text())
    for name, value in expected.items():
        assert card["metrics"][name] == pytest.approx(value)
        assert dvc_metrics[name] == pytest.approx(value) and result["metrics"][name] == pytest.approx(value)
        assert result["evaluation"][name] == pytest.approx(value)
    assert card["metrics"]["mean_confidence"] == pytest.approx(float(confidence.mean()), rel=1e-6)
    selected = card["metrics"]["selected_head"]
    np.testing.assert_array_equal(table.column("label").to_numpy(), table.column(f"label_head_{selected}").to_numpy())


def assert_report_shows_every_cluster_at_its_size(project: Path, table, result: dict) -> None:
    """The report's page has a section per cluster, each with its size in the label set, and the evaluation's
    kNN accuracy, which is the leave-one-out kNN of the checkpoint's features against the class folders."""
    params = load_params(project / "params.yaml")
    shards, label, _, truth = published_columns(project, table)
    clusters = params.train.num_clusters
    page = (project / "reports/labels/report.html").read_text()
    shown = {int(k): int(n) for k, n in re.findall(r'id="cluster-(\d+)" data-cluster="\d+"><h3>Cluster \d+: (\d+) '
                                                     r"images", page)}
    assert shown == dict(enumerate(np.bincount(label, minlength=clusters).tolist()))
    assert len(list((project / "reports/labels").glob("cluster_[0-9]*.png"))) == clusters
    assert Image.open(project / "reports/labels/clusters.png").size == (40 + 8 * 64, clusters * 64 + (clusters - 1) * 6)
    checkpoint = train.load_checkpoint(project / "models/checkpoint.pt", params.train, torch.device("cpu"))
    features = evaluate.compute_features(checkpoint.model, torch.from_numpy(shards.images),
                                         params.train.eval_image_size, torch.device("cpu"))
    settings = params.evaluate
    knn = evaluate.knn_accuracy(evaluate.project(features, settings.knn_dimensions), truth, settings.knn_neighbours,
                                settings.knn_temperature)
    assert result["evaluation"]["knn_accuracy"] == pytest.approx(knn)
    assert "linear_probe_accuracy" in result["evaluation"]
    assert f"<tr><th>knn_accuracy</th><td>{knn:.4f}</td></tr>" in page


def assert_transfer_agreement_is_that_of_the_saved_network(project: Path, table) -> None:
    """metrics/transfer.json's held-out agreement is what models/transfer.pt predicts on the held-out images."""
    params = load_params(project / "params.yaml")
    shards, label, _, _ = published_columns(project, table)
    transfer = json.loads((project / "metrics/transfer.json").read_text())
    assert transfer["architecture"] == params.transfer.architecture == "small_resnet"
    settings = transfer_params(params.train, params.transfer, int(label.max()) + 1)
    model = build_model(settings.architecture, settings.width, settings.head_sizes, settings.hidden_layers)
    model.load_state_dict(torch.load(project / "models/transfer.pt", map_location="cpu"))
    heldout = evaluate.holdout_mask(len(label), params.transfer.holdout_fraction, params.transfer.seed)
    logits = inference.compute_logits(model, torch.from_numpy(shards.images[heldout]), settings, torch.device("cpu"),
                                      augmented=False)
    agreement = float((logits[0].argmax(1).numpy() == label[heldout]).mean())
    assert transfer["heldout_agreement"] == pytest.approx(agreement)


def test_bad_parameter_fails_fast_naming_it(prefect_api_url, tmp_path):
    from flows.full import sela

    project = make_project(tmp_path / "project")
    before = (project / "params.yaml").read_text()
    with pytest.raises(Exception, match="num_clusters") as raised:
        sela(root=str(project), overrides={"train": {"num_clusters": -3}})
    assert "greater than or equal to 2" in str(raised.value)
    assert (project / "params.yaml").read_text() == before  # a refused override is not written anywhere
    assert not (project / "data/shards").exists()  # nothing started, nothing half-written


def test_bad_value_in_params_yaml_fails_naming_it(prefect_api_url, tmp_path):
    from flows.full import sela

    project = make_project(tmp_path / "project", {"train.sinkhorn.dtype": "float8"})
    with pytest.raises(ParamsError, match="train.sinkhorn.dtype"):
        sela(root=str(project))
    assert not (project / "data/shards").exists()


async def _artifacts():
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_artifacts()


def test_shard_flow_reports_quarantined_files_and_duplicates(prefect_api_url, tmp_path):
    import io

    from PIL import Image

    from flows.shard import shard_flow

    project = make_project(tmp_path / "project")
    images = tmp_path / "images"
    (images / "cats").mkdir(parents=True)
    for index in range(3):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (index * 80, 0, 0)).save(buffer, format="PNG")
        (images / "cats" / f"{index}.png").write_bytes(buffer.getvalue())
    (images / "cats" / "broken.jpg").write_bytes(b"not a jpeg")

    first = shard_flow(root=str(project), overrides={"shard": {"source": str(images)}})
    (images / "cats" / "3.png").write_bytes((images / "cats" / "0.png").read_bytes())  # a duplicate arrives
    second = shard_flow(root=str(project), overrides={"shard": {"source": str(images)}})

    assert (first["num_images"], first["num_quarantined"], first["num_shards"]) == (3, 1, 1)
    assert (second["num_images"], second["num_quarantined"], second["num_shards"]) == (3, 2, 1)
    quarantine = pq.read_table(project / "data/shards/quarantine.parquet").to_pydict()
    assert quarantine["path"] == [f"{images}/cats/3.png", f"{images}/cats/broken.jpg"]
    assert quarantine["reason"] == [f"duplicate of {images}/cats/0.png", "not an image (unrecognised content)"]
    tables = [artifact for artifact in asyncio.run(_artifacts()) if artifact.key == "quarantine"]
    assert any("3.png" in str(table.data) and "broken.jpg" in str(table.data) for table in tables)



def test_train_flow_warns_when_bfloat16_would_be_emulated(prefect_api_url, tmp_path, monkeypatch, caplog):
    from flows.shard import shard_flow
    from flows.train import train_flow

    project = make_project(tmp_path / "project", {"train.epochs": 1, "train.num_relabels": 1})
    shard_flow(root=str(project))
    monkeypatch.setattr(inference, "native_bfloat16", lambda device: False)  # a CPU without AVX512-BF16 or AMX
    with caplog.at_level(logging.WARNING, logger="prefect.flow_runs"):
        state = train_flow(root=str(project), return_state=True)

    assert state.is_completed(), state.message
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("no bfloat16 instructions" in message and "float32" in message for message in warnings)


@pytest.mark.slow
def test_a_version_from_its_parent_starts_from_it_and_keeps_its_labels(prefect_api_url, tmp_path):
    from flows.full import sela
    from sela.registry.read import load_labels

    images = tmp_path / "images"
    files = write_png_classes(images)
    new = [path for path in files if path.endswith(("00.png", "01.png"))]  # two a class, added for version 2
    for path in new:
        (images / path).rename(tmp_path / path.replace("/", "-"))
    project = make_project(tmp_path / "project")
    overrides = {"shard": {"source": str(images)}, "train": {"num_clusters": 3}}
    assert sela(root=str(project), overrides=overrides, return_state=True).is_completed()
    for path in new:
        (tmp_path / path.replace("/", "-")).rename(images / path)
    overrides["train"].update(start_from="parent", incremental={"epochs": 2, "relabels": 1, "learning_rate": 0.01})
    state = sela(root=str(project), overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["version"]["tag"] == "labels-v2" and result["training"]["parent_version"] == "labels-v1"
    assert result["training"]["start"].startswith("starting from parent version labels-v1")
    card = json.loads((project / "labels/card.json").read_text())
    assert card["training"]["epochs"] == 2 and card["training"]["relabels"] == 1
    assert card["parent_version"] == card["training"]["started_from"] == "labels-v1"
    first, second = load_labels(str(project), "labels-v1"), load_labels(str(project), "labels-v2")
    assert len(first) == len(files) - len(new) and len(second) == len(files)
    joined = first.merge(second, on="key", suffixes=("_first", "_second"))
    assert (joined["label_first"] == joined["label_second"]).mean() >= 0.95
