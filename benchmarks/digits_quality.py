"""Label quality on the embedded default: SeLa (params.yaml's recipe) vs raw-pixel k-means, in the same run.

    python benchmarks/digits_quality.py --seeds 0 1 2 3

Trains with the pipeline's own core (sela.learn.train / sela.labels.export, no Prefect) once per seed, on the same
shards the pipeline writes, and prints NMI / ACC / ARI of the evaluation head next to k-means on raw pixels
(k = num_clusters, n_init = 10), plus the ratio. The ground truth (digit classes) is used only here, for scoring.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sela.config import load_params  # noqa: E402
from sela.data.ingest import ingest  # noqa: E402
from sela.data.shards import read_shards  # noqa: E402
from sela.labels import export  # noqa: E402
from sela.labels.metrics import label_quality  # noqa: E402
from sela.learn.loop import TrainingRun, run_training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def self_label(params, shard_dir: str, images: torch.Tensor) -> np.ndarray:
    """The pipeline's loop (``sela.learn.loop``: streamed, relabels on schedule), then the exported labels."""
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as state:
        run = TrainingRun(shard_dir, Path(state) / "checkpoint.pt", Path(state), device, loader_workers=1)
        checkpoint = run_training(run, params.train)
    final = export.final_labels(checkpoint.model, images, params, device, checkpoint.target_sizes)
    return final.labels[final.selected_head]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--overrides", default="{}", help='JSON of params.yaml overrides, e.g. \'{"train.width": 48}\'')
    args = parser.parse_args()
    overrides = json.loads(args.overrides)
    base = load_params(ROOT / "params.yaml", overrides)
    with tempfile.TemporaryDirectory(prefix="digits-shards-") as directory:
        ingest(base.shard, directory, workers=1)
        loaded = read_shards(Path(directory), base.train.decode_size)  # as the pipeline decodes them
        rendered = read_shards(Path(directory), base.shard.image_size).images  # the raw pixels, as rendered
        images, truth = torch.from_numpy(loaded.images), loaded.ground_truth
        pixels = rendered.reshape(len(images), -1).astype(np.float32) / 255
        kmeans = KMeans(base.train.num_clusters, n_init=10, random_state=0).fit_predict(pixels)
        baseline = label_quality(kmeans, truth)
        print(f"{'run':<16}{'NMI':>8}{'ACC':>8}{'ARI':>8}{'seconds':>9}")
        print(f"{'k-means pixels':<16}{baseline['nmi']:>8.3f}{baseline['acc']:>8.3f}{baseline['ari']:>8.3f}{'':>9}")
        results = []
        for seed in args.seeds:
            params = load_params(ROOT / "params.yaml", {**overrides, "train.seed": seed})
            start = time.perf_counter()
            quality = label_quality(self_label(params, directory, images), truth)
            results.append(quality)
            seconds = time.perf_counter() - start
            name = f"sela seed {seed}"
            print(f"{name:<16}{quality['nmi']:>8.3f}{quality['acc']:>8.3f}{quality['ari']:>8.3f}{seconds:>9.1f}")
        for name in ("nmi", "acc"):
            values = [result[name] for result in results]
            print(f"{name.upper()}: mean {np.mean(values):.3f}, min {min(values):.3f}, "
                  f"ratio of mean to k-means {np.mean(values) / baseline[name]:.2f}x")


if __name__ == "__main__":
    main()
