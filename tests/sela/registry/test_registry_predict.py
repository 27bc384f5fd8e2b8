"""``sela labels predict`` from a consumer's side: published versions label images from a cache-less clone elsewhere.

A version's own images get their published labels back (the first version's ids as the network numbers them, the
second's renamed to agree with the first); images from a folder get the labels of the same pictures; bad files are
quarantined and reported; a source without images is an error that writes nothing.
"""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sela.config import load_params
from sela.registry.predict import predict_version
from tests.conftest import PROJECT_ROOT, published_table, write_digit_folder

pytestmark = pytest.mark.slow  # the fixture publishes two versions with the whole pipeline


def agreement(predicted: pd.DataFrame, published: pd.DataFrame, column: str) -> float:
    return float((predicted[column].to_numpy() == published.loc[predicted["key"], column].to_numpy()).mean())


def test_a_versions_own_images_get_their_published_labels_back(published_digits, tmp_path):
    producer, clone, versions = published_digits
    manifest = pd.read_parquet(producer / "data/shards/manifest.parquet")
    for number, (tag, data, _) in enumerate(versions, start=1):
        summary = predict_version(str(clone), number, "digits", tmp_path / f"v{number}.parquet", "cpu")
        assert (summary.tag, summary.inputs, summary.labelled, summary.quarantined) == (tag, 1797, 1797, 0)
        predicted, published = pd.read_parquet(summary.output), published_table(data)
        assert list(predicted.columns) == [*published.reset_index().columns, "source_path", "sha256", "width",
                                           "height"]
        assert sorted(predicted["key"]) == sorted(published.index)
        for column in [name for name in published.columns if name.startswith("label")]:
            assert agreement(predicted, published, column) >= 0.999, (tag, column)
        same = predicted["label"].to_numpy() == published.loc[predicted["key"], "label"].to_numpy()
        np.testing.assert_allclose(predicted["confidence"][same],
                                   published.loc[predicted["key"][same], "confidence"], rtol=1e-4)
        joined = predicted.merge(manifest, on="key", suffixes=("", "_producer"))
        for column in ("source_path", "sha256", "width", "height"):
            assert (joined[column] == joined[f"{column}_producer"]).all(), column
        assert pd.read_parquet(summary.quarantine).empty
    # The second version's ids were renamed to agree with the first: predict published them renamed too.
    renamings = [entry["output_to_label"] for entry in versions[1][2]["cluster_id_alignment"]]
    assert any(renaming != sorted(renaming) for renaming in renamings)


def sela_command(*arguments: str, cwd) -> subprocess.CompletedProcess:
    """``python -m sela.registry`` of this checkout, run in ``cwd``."""
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "SELA_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "sela.registry", *arguments], cwd=cwd, capture_output=True,
                          text=True, check=False, env=environment)


def test_cli_labels_a_folder_from_a_cacheless_clone_and_quarantines_a_broken_file(published_digits, tmp_path):
    producer, clone, versions = published_digits
    images = tmp_path / "new images"
    write_digit_folder(images, 40, load_params(producer / "params.yaml").shard.image_size)  # as the version
    (images / "odd" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elsewhere = tmp_path / "workspace"
    elsewhere.mkdir()
    result = sela_command("labels", "predict", str(clone), "--version", "2", str(images), "-o", "out/labels.csv",
                          cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == ("labels-v2: 40 of 41 images labelled -> out/labels.csv; 1 quarantined -> "
                                     "out/labels.quarantine.csv")
    assert "label: 100%" in result.stderr  # tqdm's bar, on stderr
    predicted = pd.read_csv(elsewhere / "out/labels.csv")
    quarantine = pd.read_csv(elsewhere / "out/labels.quarantine.csv")
    assert quarantine["path"].tolist() == [str(images / "odd" / "broken.png")]
    assert quarantine["reason"].str.contains("not an image|truncated|cannot", regex=True).all()
    # The same pictures as the version's digits: their published labels, found through the manifest's sha256.
    manifest = pd.read_parquet(producer / "data/shards/manifest.parquet")
    published = published_table(versions[1][1])
    joined = predicted.merge(manifest[["key", "sha256"]], on="sha256", suffixes=("", "_published"))
    assert len(joined) == 40 and sorted(joined["source_path"]) == sorted(
        str(path) for path in images.rglob("digit *.png"))
    for column in ("label", "label_head_0", "label_head_1"):
        assert (joined[column].to_numpy() == published.loc[joined["key_published"], column].to_numpy()).all()


def test_a_source_without_images_is_a_clear_error_and_writes_nothing(published_digits, tmp_path):
    _, clone, _ = published_digits
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"not a jpeg")
    cases = {"empty": "holds no files", "missing": "does not exist", "broken": "no image of source"}
    for name, message in cases.items():
        result = sela_command("labels", "predict", str(clone), str(tmp_path / name), "-o", f"{name}.parquet",
                              cwd=tmp_path)
        assert result.returncode == 1, (name, result.stderr[-2000:])
        assert result.stderr.strip().splitlines()[-1].startswith("sela: ") and message in result.stderr, name
        assert not list(tmp_path.glob(f"{name}*.parquet")), name
    assert "a.jpg: not an image" in result.stderr  # the reason of the broken one
