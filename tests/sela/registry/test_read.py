"""The label registry from a consumer's side: three published versions pulled from a cache-less clone elsewhere.

The producer runs the real pipeline (Prefect flow ``sela``, tiny training) three times, changing a parameter twice;
its DVC cache is then deleted, so everything the consumer gets comes from the DVC remote, as for another team.
"""

import re
import subprocess
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from sela.labels.card import SUMMARY_METRICS
from sela.registry.cli import main, run
from sela.registry.read import RegistryError, diff_versions, list_versions, load_labels, pull_labels, show_card
from tests.conftest import publish_versions

# Every test here reads the versions the fixture publishes: three runs of the whole pipeline.
pytestmark = pytest.mark.slow

RUNS = [None, {"train": {"seed": 1}}, {"train": {"num_clusters": 12}}]


@pytest.fixture(scope="module")
def published(prefect_api_url, tmp_path_factory):
    """(consumer clone path, [(tag, label-set bytes, card)] per version)."""
    _, clone, versions = publish_versions(tmp_path_factory.mktemp("registry"), RUNS, "consumer")
    return clone, versions


def test_every_version_pulls_byte_identical_from_a_cacheless_clone(published, tmp_path):
    clone, versions = published
    assert [tag for tag, _, _ in versions] == ["labels-v1", "labels-v2", "labels-v3"]
    assert len({data for _, data, _ in versions}) == 3  # each parameter change gave other labels
    for number, (tag, data, _) in enumerate(versions, start=1):
        assert pull_labels(str(clone), number, tmp_path / f"v{number}.parquet") == tag
        assert (tmp_path / f"v{number}.parquet").read_bytes() == data
        frame = load_labels(str(clone), tag)
        assert len(frame) == 1797 and frame["key"].is_unique
        pull_labels(str(clone), f"v{number}", tmp_path / f"v{number}.csv")
        csv = pd.read_csv(tmp_path / f"v{number}.csv")
        pd.testing.assert_frame_equal(csv, frame, check_dtype=False, rtol=1e-6)


def test_list_shows_each_version_with_its_parameters_and_metrics(published):
    clone, published_versions = published
    versions = list_versions(str(clone))
    assert [(v.tag, v.num_images, v.num_clusters) for v in versions] == [
        ("labels-v1", 1797, 10), ("labels-v2", 1797, 10), ("labels-v3", 1797, 12)]
    for version, (_, _, card) in zip(versions, published_versions, strict=True):  # each version its own numbers
        assert version.metrics == {name: card["metrics"][name] for name in SUMMARY_METRICS if name != "num_images"}
        assert version.commit == subprocess.run(["git", "rev-parse", f"{version.tag}^{{commit}}"], cwd=clone,
                                                capture_output=True, text=True, check=True).stdout.strip()
    dates = [datetime.fromisoformat(v.date) for v in versions]  # when each was tagged, in publishing order
    assert dates == sorted(dates) and datetime.now(UTC) - timedelta(hours=1) < dates[0] <= datetime.now(UTC)
    table = run(["labels", "list", str(clone)])
    assert table.splitlines()[0].split()[:4] == ["version", "date", "images", "clusters"]
    assert "labels-v3" in table.splitlines()[3]


def test_cards_chain_versions_and_keep_cluster_ids_stable(published):
    clone, versions = published
    cards = [show_card(str(clone), tag) for tag, _, _ in versions]
    assert [card["parent_version"] for card in cards] == [None, "labels-v1", "labels-v2"]
    assert not list(Path(tempfile.gettempdir()).glob("sela-parent-*.parquet"))  # each parent's copy was removed
    assert cards[2]["params"]["train"]["num_clusters"] == 12
    hashes = {card["data_manifest_sha256"] for card in cards}
    assert len(hashes) == 1 and re.fullmatch(r"[0-9a-f]{64}", hashes.pop())  # the same images made every version
    for card in cards[1:]:
        for head in card["cluster_id_alignment"]:
            assert sorted(head["output_to_label"]) == list(range(card["params"]["train"]["num_clusters"]))
    diff = diff_versions(str(clone), 1, 2)
    # v2 was aligned to v1 when it was made: joining the published tables agrees as much as any renaming would.
    assert diff["agreement_as_published"] == pytest.approx(diff["agreement"])
    assert diff["shared"] == 1797 and diff["new"] == diff["removed"] == 0


def test_diff_of_a_version_with_itself_is_complete_agreement(published):
    clone, _ = published
    diff = diff_versions(str(clone), "labels-v2", "v2", head=1)
    assert diff["agreement"] == 1.0 and diff["moved"] == 0 and diff["split"] == {} and diff["merged"] == {}
    text = run(["labels", "diff", str(clone), "2", "2"])
    assert "100.00% (0 images moved)" in text and "no cluster split or merged" in text


def test_a_git_url_works_like_a_path(published, tmp_path):
    clone, versions = published
    url = f"file://{clone}"
    assert [v.tag for v in list_versions(url)] == ["labels-v1", "labels-v2", "labels-v3"]
    assert main(["labels", "pull", url, "--version", "latest", "-o", str(tmp_path / "latest.parquet")]) == 0
    assert (tmp_path / "latest.parquet").read_bytes() == versions[-1][1]


def test_unknown_version_is_a_clear_error(published, tmp_path, capsys):
    clone, _ = published
    with pytest.raises(RegistryError, match="published: labels-v1, labels-v2, labels-v3"):
        load_labels(str(clone), 9)
    assert main(["labels", "pull", str(clone), "--version", "9", "-o", str(tmp_path / "x.parquet")]) == 1
    assert "no version '9'" in capsys.readouterr().err and not (tmp_path / "x.parquet").exists()
    assert main(["labels", "list", str(tmp_path / "nowhere")]) == 1
