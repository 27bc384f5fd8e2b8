"""The Prefect flows against a real (test) Prefect server: the whole pipeline, its task runs, a bad parameter."""

import asyncio
import json
import logging
import math
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sela.config import ParamsError, load_params
from sela.labels.export import predict_labels
from sela.learn import inference, train
from tasks.images import load_shards
from tests.conftest import make_project


async def _task_run_names() -> list[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return [run.name for run in await client.read_task_runs()]


def test_full_flow_publishes_a_pullable_version(prefect_api_url, tmp_path):
    from flows.full import sela

    project = make_project(tmp_path / "project")
    state = sela(root=str(project), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["version"]["tag"] == "labels-v1"
    assert result["data"]["num_images"] == 1797
    table = pq.read_table(project / "labels/labels.parquet")
    assert table.num_rows == 1797 and set(table.column_names) >= {"key", "label_head_0", "confidence_head_1"}
    card = json.loads((project / "labels/card.json").read_text())
    assert card["training"]["epochs"] == 3 and card["training"]["relabels"] == 2
    assert math.isfinite(card["training"]["final_loss"]) and card["training"]["final_loss"] > 0
    assert sorted(card["params"]) == ["export", "shard", "train", "version"]  # what made the labels, nothing else
    assert 0 <= card["metrics"]["nmi"] <= 1 and card["data_manifest_sha256"]
    assert_card_relabels_the_published_images(project, card, table)
    assert 0 <= result["evaluation"]["knn_accuracy"] <= 1 and "linear_probe_accuracy" in result["evaluation"]
    assert (project / "reports/labels/report.html").stat().st_size > 0
    assert len(list((project / "reports/labels").glob("cluster_[0-9]*.png"))) == 10
    assert Image.open(project / "reports/labels/clusters.png").size == (40 + 8 * 64, 10 * 64 + 9 * 6)  # 10 rows of 8
    transfer = json.loads((project / "metrics/transfer.json").read_text())
    assert transfer["architecture"] == "small_resnet" and 0 <= transfer["heldout_agreement"] <= 1
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
    for head, head_labels in enumerate(predicted):
        np.testing.assert_array_equal(head_labels, table.column(f"label_head_{head}").to_numpy())


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
