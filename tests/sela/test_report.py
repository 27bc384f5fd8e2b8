"""sela.report: files per cluster and chart, and the HTML page rendered in a real headless Chromium."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from sela.report import cluster_montage, cluster_size_chart, write_report

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


def test_report_renders_every_cluster_with_no_broken_image(tmp_path):
    images, labels, confidence = synthetic()
    charts = {"cluster_sizes": cluster_size_chart(np.bincount(labels).tolist())}
    files = write_report(tmp_path, "test set", images, labels, confidence, 7, {"nmi": 0.5}, charts, 4)
    names = sorted(path.name for path in files)
    assert names == ["cluster_000.png", *[f"cluster_00{k}.png" for k in range(1, 7)], "cluster_sizes.png",
                     "report.html"]
    assert Image.open(tmp_path / "cluster_006.png").size == (64, 64)  # cluster 6 is empty: a blank tile
    dom = render(tmp_path / "report.html")
    assert sorted(map(int, re.findall(r'<section class="cluster" id="cluster-(\d+)"', dom))) == list(range(7))
    assert 'data-images-broken="0"' in dom and 'data-images-loaded="8"' in dom  # 7 montages + 1 chart
    assert "all 8 images loaded" in dom and "http" not in dom.split("<body")[0]  # nothing fetched from a CDN


def test_a_broken_image_is_reported_by_the_page(tmp_path):
    images, labels, confidence = synthetic()
    write_report(tmp_path, "test set", images, labels, confidence, 6, {}, {}, 4)
    page = tmp_path / "report.html"
    page.write_text(page.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    dom = render(page)
    assert 'data-images-broken="1"' in dom and "1 of 6 images failed to load" in dom
