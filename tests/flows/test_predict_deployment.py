"""Deployment ``sela/predict`` against a real (test) Prefect server: served by ``python -m flows.serve`` (as
``make serve`` starts it) beside ``sela/full``, run with ``run_deployment``, its output checked."""

import asyncio
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from sela.config import load_params
from tests.conftest import PROJECT_ROOT, published_table, write_digit_folder

pytestmark = pytest.mark.slow  # a served deployment, and the two versions the fixture publishes


async def _deployment_names() -> set[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        flows = {flow.id: flow.name for flow in await client.read_flows()}
        return {f"{flows[deployment.flow_id]}/{deployment.name}" for deployment in await client.read_deployments()}


@pytest.fixture
def served(prefect_api_url, tmp_path):
    """``python -m flows.serve`` of this checkout reporting to the test server, until both deployments exist."""
    log = tmp_path / "serve.log"
    environment = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_HOME": str(tmp_path / "prefect-home"),
                   "PREFECT_RUNNER_POLL_FREQUENCY": "1", "SELA_DEVICE": "cpu"}
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=PROJECT_ROOT, env=environment,
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not {"sela/full", "sela/predict"} <= asyncio.run(_deployment_names()):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "deployments not registered after 120 s:\n" + log.read_text()[-3000:]
            time.sleep(1)
        yield log
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_predict_deployment_labels_a_folder_with_a_published_version(published_digits, served, tmp_path):
    from prefect.deployments import run_deployment

    producer, clone, versions = published_digits
    images = tmp_path / "images"
    write_digit_folder(images, 30, load_params(producer / "params.yaml").shard.image_size)
    (images / "even" / "empty.png").write_bytes(b"")
    output = tmp_path / "out" / "labels.parquet"
    run = run_deployment("sela/predict", parameters={"repo": str(clone), "source": str(images),
                                                    "output": str(output), "version": 1}, timeout=300)
    assert run.state.is_completed(), (run.state, served.read_text()[-3000:])
    assert "sela/predict" in served.read_text()  # what scripts/prefect-serve.sh waits for

    predicted = pd.read_parquet(output)
    assert len(predicted) == 30 and predicted["source_path"].str.startswith(str(images)).all()
    manifest = pd.read_parquet(producer / "data/shards/manifest.parquet")
    joined = predicted.merge(manifest[["key", "sha256"]], on="sha256", suffixes=("", "_published"))
    published = published_table(versions[0][1])
    assert (joined["label"].to_numpy() == published.loc[joined["key_published"], "label"].to_numpy()).all()
    quarantine = pd.read_parquet(tmp_path / "out" / "labels.quarantine.parquet")
    assert quarantine["path"].tolist() == [str(images / "even" / "empty.png")]
