"""Visual report of a label set: a montage per cluster, charts, a metric table, one self-contained HTML page.

Every picture is written as a PNG file and embedded in ``report.html`` as a data URI, so the page works offline,
from a DVC remote or as an e-mail attachment (no CDN, no sibling files needed). The page counts its own images once
loaded and says in its footer whether any failed to render.
"""

import base64
import html
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

TILE = 64  # px per thumbnail: small sources (16-32 px) are upscaled with nearest neighbour so pixels stay visible
GAP = 6  # px of white between the confident row and the unconfident row
MARGIN = 40  # px left of each overview row, for the cluster number


def _by_confidence(confidence: np.ndarray, members: np.ndarray) -> np.ndarray:
    """members (M,) ordered from most to least confident."""
    # Ties are broken in a fixed random order: saturated confidences (1.0 in float32) would otherwise show the first
    # images in key order (on CIFAR-10, with the plan's row maximum as confidence: airplanes in every row).
    tie_break = np.random.default_rng(0).permutation(len(members))
    return members[np.lexsort((tie_break, -confidence[members]))]


def _paste_row(canvas: Image.Image, images: np.ndarray, indices: np.ndarray, left: int, top: int) -> None:
    for column, index in enumerate(indices):
        tile = Image.fromarray(images[index]).resize((TILE, TILE), Image.Resampling.NEAREST)
        canvas.paste(tile, (left + column * TILE, top))


def cluster_montage(images: np.ndarray, confidence: np.ndarray, members: np.ndarray, count: int) -> Image.Image:
    """Two rows of ``count`` tiles: the cluster's most confident images, then its least confident ones.

    images uint8 (N, H, W, 3), confidence (N,), members (M,) row indices of the cluster's images.
    """
    order = _by_confidence(confidence, members)
    canvas = Image.new("RGB", (count * TILE, 2 * TILE + GAP), (255, 255, 255))
    _paste_row(canvas, images, order[:count], 0, 0)
    _paste_row(canvas, images, order[::-1][:count], 0, TILE + GAP)
    return canvas


def overview(images: np.ndarray, labels: np.ndarray, confidence: np.ndarray, num_clusters: int,
             count: int) -> Image.Image:
    """Every cluster at a glance: row k holds cluster k's ``count`` most confident images, its number on the left.

    images uint8 (N, H, W, 3), labels (N,) in 0..num_clusters-1, confidence (N,). An empty cluster's row is blank.
    """
    canvas = Image.new("RGB", (MARGIN + count * TILE, num_clusters * (TILE + GAP) - GAP), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    for cluster in range(num_clusters):
        top = cluster * (TILE + GAP)
        pen.text((4, top + TILE // 2 - 6), str(cluster), fill=(0, 0, 0))
        members = np.flatnonzero(labels == cluster)
        _paste_row(canvas, images, _by_confidence(confidence, members)[:count], MARGIN, top)
    return canvas


def figure_png(draw: Any, size: tuple[float, float], panels: int = 1) -> bytes:
    """PNG bytes of a matplotlib figure of ``size`` inches at 100 dpi: ``draw`` gets its axes, one (panels = 1) or
    a row of ``panels``. The same input gives the same bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display here or on CI; must precede pyplot
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, panels, figsize=size, dpi=100, squeeze=False)
    draw(axes[0, 0] if panels == 1 else axes[0])
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: same input, same bytes
    pyplot.close(figure)
    return buffer.getvalue()


def cluster_size_chart(sizes: list[int]) -> bytes:
    """PNG bar chart of images per cluster, with the equipartition size as a line."""
    def draw(axes: Any) -> None:
        axes.bar(range(len(sizes)), sizes, color="#4c72b0")
        axes.axhline(sum(sizes) / len(sizes), color="#c44e52", linestyle="--", label="equal split")
        axes.set(xlabel="cluster", ylabel="images", title="Cluster sizes")
        axes.legend()

    return figure_png(draw, (8, 3))


def confidence_chart(histogram: dict[str, list[float]]) -> bytes:
    """PNG histogram of label confidence (``sela.labels.evaluate.confidence_histogram``)."""
    def draw(axes: Any) -> None:
        edges = histogram["edges"]
        axes.bar(edges[:-1], histogram["counts"], width=np.diff(edges), align="edge", color="#55a868")
        axes.set(xlabel="confidence", ylabel="images", title="Label confidence", xlim=(0, 1))

    return figure_png(draw, (5, 3))


def agreement_chart(matrix: list[list[float]]) -> bytes:
    """PNG heat map of the aligned agreement between heads (H, H)."""
    def draw(axes: Any) -> None:
        image = axes.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for (row, column), value in np.ndenumerate(np.asarray(matrix)):
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "k")
        heads = range(len(matrix))
        axes.set(xlabel="head", ylabel="head", title="Agreement between heads", xticks=heads, yticks=heads)
        axes.figure.colorbar(image, ax=axes)

    return figure_png(draw, (4, 3.4))


def label_set_charts(sizes: list[int], histogram: dict[str, list[float]],
                     agreement: list[list[float]]) -> dict[str, bytes]:
    """The report's charts by file stem: cluster sizes, label confidence (``sela.labels.evaluate.confidence_histogram``)
    and the aligned agreement between heads (H, H)."""
    return {"cluster_sizes": cluster_size_chart(sizes), "confidence": confidence_chart(histogram),
            "head_agreement": agreement_chart(agreement)}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.3em .8em;text-align:right}th{background:#f3f3f3}
section.cluster{margin:1.5em 0}img{image-rendering:pixelated;max-width:100%}.charts img{margin-right:1em}"""

# Counts images that failed to decode once the page has loaded: a broken page says so to whoever opens it.
_SELF_CHECK = """<script>window.addEventListener('load',function(){var all=document.images,broken=0;
for(var i=0;i<all.length;i++){if(!all[i].complete||all[i].naturalWidth===0){broken++;}}
document.body.dataset.imagesLoaded=all.length-broken;document.body.dataset.imagesBroken=broken;
document.getElementById('self-check').textContent=broken?broken+' of '+all.length+' images failed to load':
'all '+all.length+' images loaded';});</script>"""


def render_html(title: str, metrics: dict[str, Any], glance: bytes, charts: dict[str, bytes],
                clusters: list[dict[str, Any]]) -> str:
    """The report page. glance: the ``overview`` PNG; clusters: dicts with ``cluster``, ``size``,
    ``mean_confidence`` and ``montage`` (PNG)."""
    rows = "".join(f"<tr><th>{html.escape(name)}</th><td>{value:.4f}</td></tr>" if isinstance(value, float) else
                   f"<tr><th>{html.escape(name)}</th><td>{html.escape(str(value))}</td></tr>"
                   for name, value in metrics.items())
    chart_tags = "".join(f'<img src="{_data_uri(png)}" alt="{html.escape(name)}">' for name, png in charts.items())
    sections = "".join(
        f'<section class="cluster" id="cluster-{c["cluster"]}" data-cluster="{c["cluster"]}">'
        f'<h3>Cluster {c["cluster"]}: {c["size"]} images, mean confidence {c["mean_confidence"]:.3f}</h3>'
        f'<img src="{_data_uri(c["montage"])}" alt="cluster {c["cluster"]}: most (top) and least (bottom) '
        f'confident images"></section>'
        for c in clusters)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><h2>Metrics</h2><table>{rows}</table>"
            f'<h2>Clusters at a glance</h2><p>One row per cluster: its most confident images.</p>'
            f'<img src="{_data_uri(glance)}" alt="the most confident images of every cluster, one row per cluster">'
            f'<h2>Charts</h2><div class="charts">{chart_tags}</div>'
            f"<h2>Clusters</h2><p>Each montage: the most confident images on top, the least confident below.</p>"
            f'{sections}<footer><p id="self-check">checking images...</p></footer>{_SELF_CHECK}</body></html>')


def write_report(directory: Path, title: str, images: np.ndarray, labels: np.ndarray, confidence: np.ndarray,
                 num_clusters: int, metrics: dict[str, Any], charts: dict[str, bytes], count: int) -> list[Path]:
    """Write ``clusters.png`` (``overview``), ``cluster_<k:03d>.png`` per cluster (``cluster_007.png``),
    ``<chart>.png`` per chart and ``report.html`` into ``directory``.

    images uint8 (N, H, W, 3), labels (N,) in 0..num_clusters-1, confidence (N,). Returns the files written.
    The directory is replaced: a montage of a cluster that no longer exists must not linger.
    """
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    written, clusters = [], []
    glance = _png(overview(images, labels, confidence, num_clusters, count))
    written.append(directory / "clusters.png")
    written[-1].write_bytes(glance)
    for name, png in charts.items():
        written.append(directory / f"{name}.png")
        written[-1].write_bytes(png)
    for cluster in range(num_clusters):
        members = np.flatnonzero(labels == cluster)
        montage = _png(cluster_montage(images, confidence, members, count)) if len(members) else _png(
            Image.new("RGB", (TILE, TILE), (255, 255, 255)))
        written.append(directory / f"cluster_{cluster:03d}.png")
        written[-1].write_bytes(montage)
        mean = float(confidence[members].mean()) if len(members) else 0.0
        clusters.append({"cluster": cluster, "size": len(members), "mean_confidence": mean, "montage": montage})
    written.append(directory / "report.html")
    written[-1].write_text(render_html(title, metrics, glance, charts, clusters))
    return written
