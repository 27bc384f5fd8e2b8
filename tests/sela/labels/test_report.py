"""sela.labels.report: files per cluster and chart, and the HTML page rendered in a real headless Chromium."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from sela.labels.report import GAP, MARGIN, TILE, cluster_montage, cluster_size_chart, overview, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def synthetic(count: int = 120, clusters: int = 6):
    rng = np.random.default_rng(0)
    labels = np.arange(count) % clusters
    images = np.zeros((count, 16, 16, 3), dtype=np.uint8)
    images[..., 0] = (labels * 40)[:, None, None]  # each cluster its own red level
    confidence = rng.uniform(0.2, 1.0, count).astype(np.float32)
    return images, labels, confidence


def test_montage_puts_most_confident_first_and_least_confident_last():
    images, labels, confidence = synthetic()
    images[:, :, :, 1] = (confidence * 255).astype(np.uint8)[:, None, None]  # green = confidence
    members = np.flatnonzero(labels == 2)
    montage = np.asarray(cluster_montage(images, confidence, members, 4))
    assert montage.shape == (134, 256, 3)  # two rows of 64 px tiles, 6 px apart
    top_left, bottom_left = montage[32, 32, 1], montage[100, 32, 1]
    assert top_left == int(confidence[members].max() * 255) and bottom_left == int(confidence[members].min() * 255)


def test_montage_breaks_confidence_ties_at_random_not_by_row():
    images, labels, confidence = synthetic()
    images[:, :, :, 2] = np.arange(len(images), dtype=np.uint8)[:, None, None]  # blue = row index
    confidence[:] = 1.0  # saturated confidences: every row ties at the top
    members = np.flatnonzero(labels == 2)
    first = np.asarray(cluster_montage(images, confidence, members, 4))
    shown = sorted(first[32, 32::64, 2])
    assert shown != sorted(members[:4]) and set(shown) <= set(members)  # not the cluster's first rows
    assert np.array_equal(first, np.asarray(cluster_montage(images, confidence, members, 4)))  # but deterministic


def test_overview_shows_each_clusters_most_confident_images_in_its_own_row():
    images, labels, confidence = synthetic()
    images[:, :, :, 1] = (confidence * 255).astype(np.uint8)[:, None, None]  # green = confidence
    picture = np.asarray(overview(images, labels, confidence, 7, 4))
    assert picture.shape == (7 * TILE + 6 * GAP, MARGIN + 4 * TILE, 3)  # 7 rows, GAP apart, 4 tiles after the margin
    for cluster in range(6):
        members = np.flatnonzero(labels == cluster)
        first, last = np.sort(confidence[members])[::-1][[0, 3]]
        row = cluster * (TILE + GAP) + TILE // 2
        assert picture[row, MARGIN + 8, 0] == cluster * 40  # the row's images come from its cluster
        assert picture[row, MARGIN + 8, 1] == int(first * 255) and picture[row, MARGIN + 3 * TILE + 8, 1] == int(
            last * 255)  # most confident first, in order
    assert picture[6 * (TILE + GAP):, MARGIN:].min() == 255  # cluster 6 is empty: a blank row
    assert picture[:TILE, :MARGIN].min() < 128  # its number is written in the margin


def render(page) -> str:
    """The DOM of ``page`` after load, as headless Chromium sees it."""
    if CHROMIUM is None:
        if os.environ.get("SELA_REQUIRE_BROWSER"):
            pytest.fail("SELA_REQUIRE_BROWSER is set but no chromium is installed (make browser)")
        pytest.skip("no chromium here: `make browser` installs Debian's chromium")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
               "--dump-dom", page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_report_renders_every_cluster_with_no_broken_image(tmp_path):
    images, labels, confidence = synthetic()
    charts = {"cluster_sizes": cluster_size_chart(np.bincount(labels).tolist())}
    files = write_report(tmp_path, "test set", images, labels, confidence, 7, {"nmi": 0.5}, charts, 4)
    names = sorted(path.name for path in files)
    assert names == ["cluster_000.png", *[f"cluster_00{k}.png" for k in range(1, 7)], "cluster_sizes.png",
                     "clusters.png", "report.html"]
    assert Image.open(tmp_path / "cluster_006.png").size == (64, 64)  # cluster 6 is empty: a blank tile
    dom = render(tmp_path / "report.html")
    assert sorted(map(int, re.findall(r'<section class="cluster" id="cluster-(\d+)"', dom))) == list(range(7))
    assert 'data-images-broken="0"' in dom and 'data-images-loaded="9"' in dom  # overview, 7 montages, 1 chart
    assert "all 9 images loaded" in dom and "http" not in dom.split("<body")[0]  # nothing fetched from a CDN


@pytest.mark.slow
def test_a_broken_image_is_reported_by_the_page(tmp_path):
    images, labels, confidence = synthetic()
    write_report(tmp_path, "test set", images, labels, confidence, 6, {}, {}, 4)
    page = tmp_path / "report.html"
    page.write_text(page.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    dom = render(page)
    assert 'data-images-broken="1"' in dom and "1 of 7 images failed to load" in dom
