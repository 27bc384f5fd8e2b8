"""Cluster sizes beyond equipartition on imbalanced CIFAR-10 and digits: equal against relaxed sizes, same run.

    flock /tmp/sela-cpu.lock python benchmarks/imbalance.py --epochs 25            # 2 CPU cores: about 30 min idle
    python benchmarks/imbalance.py --epochs 2 --scale 0.05                          # a smoke run: about 2 min
    python benchmarks/imbalance.py --collection digits --sets full,heavy            # params.yaml's 90 epochs: 5 min

The SeLa paper's three train sets of its imbalance study, each scored on the test split with the same fractions of
every class removed (the images dropped are a fixed random choice, seed 0, per class and split):

- ``full``: CIFAR-10 as it is (5,000 images a class);
- ``light``: half of class ``truck`` removed;
- ``heavy``: 0%, 10%, ..., 90% of classes 0-9 (airplane ... truck, in folder order) removed: 5,000 down to 500.

``--collection digits`` applies the same fractions to the embedded digits (classes 0-9), split once into a train
part and a held-out quarter per class (a fixed random order): a collection whose clusters, at params.yaml's recipe,
are its classes, where CIFAR-10's on 2 CPU cores are not. Its runs take params.yaml as it is (90 epochs).

For every CIFAR-10 set the chosen files are listed in a list file, ingested by the pipeline's own ingest
(``sela.data.ingest``); digits are written as shards directly, as ``benchmarks/incremental.py`` does. Each set is
self-labelled by the pipeline's own loop (``sela.learn.loop.run_training``) once per method, for a fixed number of
epochs (``--epochs``: results do not depend on the host's load): ``train.sinkhorn.cluster_sizes: equal``
(equipartition) and ``relaxed`` (unbalanced transport) by default; ``--methods equal,relaxed,estimated,given`` adds
the sizes estimated from the network's counts and a run told the train subset's true class proportions (``given``),
the reference no size estimate can beat on sizes. Everything else is params.yaml (CIFAR-10: plus
``benchmarks/quality.py``'s CIFAR-10 overrides); scoring is ``benchmarks/quality.py``'s: the exported 10-way head on
the test subset (ACC/NMI by the label set's rule, the argmax's ACC beside it), weighted kNN of test against train
features, and raw-pixel k-means on the test subset, computed in the same run. The classes are ground truth for
scoring only. Prints one line per epoch and a table per set with the difference of each method to equal in points.
"""

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.quality import CIFAR_OVERRIDES, baselines, score  # noqa: E402
from sela.config import Params, load_params  # noqa: E402
from sela.data.ingest import ingest  # noqa: E402
from sela.data.shards import LoadedShards, read_shards, write_shards  # noqa: E402
from sela.data.sources import iter_digit_samples  # noqa: E402
from sela.labels import export  # noqa: E402
from sela.labels.metrics import cluster_sizes  # noqa: E402
from sela.labels.report import figure_png  # noqa: E402
from sela.learn.loop import TrainingRun, run_training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Fraction of each class removed, in CLASSES order (the paper's study).
REMOVED = {"full": [0.0] * 10, "light": [0.0] * 9 + [0.5], "heavy": [c / 10 for c in range(10)]}
METHODS = ("equal", "relaxed", "estimated", "given")
DIGITS_TEST_SHARE = 0.25  # digits have no test split: a quarter of every class is held out once (fixed order)


def extracted(dataset: Path, folder: Path, split: str) -> Path:
    """``folder/split`` holding the split's JPEGs in class folders, extracted once from ``dataset/split.tar.gz``
    (into a temporary folder renamed when complete, so an interrupted extraction is never taken for one)."""
    target = folder / split
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as partial:
            with tarfile.open(dataset / f"{split}.tar.gz") as archive:
                archive.extractall(partial, filter="data")
            (Path(partial) / split).rename(target)
    return target


def chosen_files(split_dir: Path, removed: list[float]) -> list[Path]:
    """Every class's files minus the fraction ``removed[c]`` (a fixed random choice, seed 0, of the sorted files)."""
    kept = []
    for name, fraction in zip(CLASSES, removed, strict=True):
        files = sorted((split_dir / name).glob("*.jpg"))
        if not files:
            raise FileNotFoundError(f"no JPEGs in {split_dir / name}: is {split_dir} CIFAR-10 in class folders?")
        order = np.random.default_rng(0).permutation(len(files))
        kept += sorted(files[i] for i in order[: round(len(files) * (1 - fraction))])
    return kept


def scaled(files: list[Path], scale: float) -> list[Path]:
    """Every class's files thinned to ``scale`` (quick runs); 1 keeps them all."""
    if scale == 1:
        return files
    by_class: dict[str, list[Path]] = {}
    for path in files:
        by_class.setdefault(path.parent.name, []).append(path)
    return [path for paths in by_class.values() for path in paths[: max(1, round(len(paths) * scale))]]


def ingest_files(files: list[Path], shard_dir: Path, params: Params, workers: int) -> LoadedShards:
    """A list file of ``files`` ingested by the pipeline into ``shard_dir``; returns the shards decoded at
    ``train.decode_size`` (for scoring: training streams the shards)."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    listing = shard_dir.parent / f"{shard_dir.name}.txt"
    listing.write_text("".join(f"{path}\n" for path in files))
    shard_params = load_params(ROOT / "params.yaml", {"shard.source": str(listing), "shard.min_side": 8}).shard
    ingest(shard_params, str(shard_dir), workers=workers)
    loaded = read_shards(shard_dir, params.train.decode_size)
    if len(loaded) != len(files):
        raise RuntimeError(f"{len(files)} files listed but {len(loaded)} ingested into {shard_dir}")
    return loaded


def digit_splits(removed: list[float], folder: Path, params: Params) -> dict[str, LoadedShards]:
    """The embedded digits as ``folder-train`` and ``folder-test`` shards: every class split once into a held-out
    quarter and the rest (a random order seeded by the digit), then ``removed[c]`` of each part of class c dropped
    (the first rows of that order are kept, so the sets are nested). Returns both splits decoded at
    ``train.decode_size``."""
    samples = list(iter_digit_samples(params.shard.image_size))
    truth = np.array([int(sample.ground_truth) for sample in samples])
    rows: dict[str, list[int]] = {"train": [], "test": []}
    for digit, fraction in enumerate(removed):
        order = np.random.default_rng(digit).permutation(np.flatnonzero(truth == digit))
        held_out = round(len(order) * DIGITS_TEST_SHARE)
        for split, part in (("test", order[:held_out]), ("train", order[held_out:])):
            rows[split] += part[: round(len(part) * (1 - fraction))].tolist()
    loaded = {}
    for split, chosen in rows.items():
        shard_dir = folder.parent / f"{folder.name}-{split}"
        write_shards((samples[row] for row in sorted(chosen)), shard_dir, params.shard.samples_per_shard)
        loaded[split] = read_shards(shard_dir, params.train.decode_size)
    return loaded


def self_label(params: Params, shard_dir: Path, state_dir: Path, device: torch.device, name: str):
    """The pipeline's loop for ``train.epochs`` epochs; logs one line an epoch. Returns (checkpoint, seconds)."""
    started = time.perf_counter()

    def progress(event: dict) -> None:
        if event["kind"] == "epoch":
            print(f"{name}: epoch {event['epoch']:>3}/{event['epochs']} {event['seconds']:5.1f}s "
                  f"loss {event['loss']:.3f}", flush=True)

    run = TrainingRun(str(shard_dir), state_dir / "checkpoint.pt", state_dir, device, 0, progress)
    checkpoint = run_training(run, params.train)
    return checkpoint, time.perf_counter() - started


def class_proportions(split: LoadedShards) -> np.ndarray:
    """The split's share of images per class, sorted, largest first. (10,) float64."""
    counts = np.unique(split.ground_truth, return_counts=True)[1]
    return np.sort(np.pad(counts, (0, 10 - len(counts))) / counts.sum())[::-1]


def evaluate_set(name: str, train_split: LoadedShards, test_split: LoadedShards, shard_dir: Path, scratch: Path,
                 base: Params, device: torch.device, methods: list[str]) -> dict[str, dict[str, Any]]:
    """k-means on the test subset's pixels, then each method trained and scored. Returns rows of the table."""
    truth = class_proportions(train_split)
    rows = {"k-means pixels": baselines(train_split, test_split, base)["k-means pixels"]}
    for method in methods:
        # ``given``: the train subset's own class proportions, the sizes no estimate can improve on.
        sinkhorn = {"cluster_sizes": method, "given_sizes": truth.tolist() if method == "given" else None}
        params = base.model_copy(update={"train": base.train.model_copy(update={
            "sinkhorn": base.train.sinkhorn.model_copy(update=sinkhorn)})})
        checkpoint, seconds = self_label(params, shard_dir, scratch / f"{name}-{method}", device, f"{name}/{method}")
        final = export.final_labels(checkpoint.model, torch.from_numpy(train_split.images), params, device,
                                    checkpoint.target_sizes)
        scored = score(checkpoint.model, final, train_split, test_split, scratch / f"{name}-test", params, device, 0)
        # The sizes the exported labels have (relaxed sizes are the plan's, not a target).
        sizes = np.sort(cluster_sizes(final.labels[final.selected_head], 10))[::-1] / len(train_split)
        rows[method] = {**scored["sela rule (test)"], "argmax_acc": scored["sela head (test)"]["acc"],
                        "knn": scored["sela head (test)"]["knn"], "train_acc": scored["sela labels (train)"]["acc"],
                        "size_error": float(np.abs(sizes - truth).sum() / 2), "minutes": seconds / 60,
                        "sizes": sizes.round(4).tolist()}
        print(f"{name}/{method}: " + json.dumps(rows[method]), flush=True)
    return rows


def print_table(name: str, rows: dict[str, dict[str, Any]], num_train: int, num_test: int) -> None:
    print(f"\n{name}: {num_train} train / {num_test} test images")
    print(f"{'':<16}{'ACC':>7}{'NMI':>7}{'argmax':>8}{'kNN':>7}{'train ACC':>10}{'size err':>10}{'min':>6}")
    for method, values in rows.items():
        cells = "".join(f"{100 * values[key]:>{width}.1f}" if key in values else f"{'-':>{width}}"
                        for key, width in (("acc", 7), ("nmi", 7), ("argmax_acc", 8), ("knn", 7), ("train_acc", 10),
                                           ("size_error", 10)))
        minutes = f"{values['minutes']:>6.1f}" if "minutes" in values else f"{'-':>6}"
        print(f"{method:<16}{cells}{minutes}")
    kmeans = rows["k-means pixels"]
    print("ACC against k-means: " + ", ".join(f"{method} {rows[method]['acc'] / kmeans['acc']:.2f}x"
                                               for method in METHODS if method in rows))
    if "equal" not in rows:
        return
    for method in METHODS[1:]:
        if method in rows:
            gain, equal = rows[method], rows["equal"]
            print(f"{method} - equal: ACC {100 * (gain['acc'] - equal['acc']):+.1f}, NMI "
                  f"{100 * (gain['nmi'] - equal['nmi']):+.1f}, kNN {100 * (gain['knn'] - equal['knn']):+.1f} points")


def size_figure(tables: dict[str, tuple[dict[str, dict[str, Any]], np.ndarray, int]], path: Path) -> None:
    """PNG of every set's cluster sizes, sorted, one bar group per method, the classes' proportions as a line.
    ``tables``: set name -> (rows of ``evaluate_set``, ``class_proportions`` of its train split, train images)."""
    def draw(panels: Any) -> None:
        for axes, (name, (rows, classes, num_train)) in zip(np.atleast_1d(panels), tables.items(), strict=True):
            methods = [method for method in METHODS if method in rows]
            width = 0.8 / len(methods)
            for offset, method in enumerate(methods):
                positions = np.arange(10) + (offset - (len(methods) - 1) / 2) * width
                axes.bar(positions, rows[method]["sizes"], width,
                         label=f"{method} (ACC {100 * rows[method]['acc']:.1f})")
            axes.step(np.arange(11) - 0.5, [*classes, classes[-1]], where="post", color="black", label="classes")
            axes.set(title=f"{name} ({num_train:,} images)", xlabel="cluster, largest first",
                     ylabel="share of images", xticks=range(10))
            axes.legend(fontsize=7)

    path.write_bytes(figure_png(draw, (5 * len(tables), 3.2), panels=len(tables)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", choices=["cifar10", "digits"], default="cifar10")
    parser.add_argument("--epochs", type=int, help="epochs of every run (fixed: not a time budget); default 25 for "
                        "CIFAR-10, params.yaml's for digits")
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "cifar10")
    parser.add_argument("--extracted", type=Path, default=Path("/tmp/cifar"),
                        help="folder with train/ and test/ JPEGs (extracted from --dataset once if absent)")
    parser.add_argument("--sets", default="full,light,heavy")
    parser.add_argument("--scale", type=float, default=1.0, help="keep this fraction of every class (quick runs)")
    parser.add_argument("--workers", type=int, default=2, help="ingest processes")
    parser.add_argument("--overrides", default="{}", help="JSON of params.yaml overrides on top of the CIFAR ones")
    parser.add_argument("--figure", type=Path, help="write a PNG of every set's cluster sizes against its classes")
    parser.add_argument("--methods", default="equal,relaxed",
                        help="cluster_sizes of the runs; add 'given' for a run told the train subset's true class "
                        "proportions (the reference no size estimate can beat on sizes)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}: choose from {', '.join(METHODS)}")
    device = torch.device("cpu")
    cifar = args.collection == "cifar10"
    if not cifar and args.scale != 1:
        parser.error("--scale thins CIFAR-10's sets; the digits sets are small enough to run whole")
    epochs = args.epochs or (25 if cifar else None)
    # One run a method: the benchmark compares cluster-size methods, each measured so (docs/imbalance.md), not the
    # choice among runs (train.initialisations).
    base = load_params(ROOT / "params.yaml", {**(CIFAR_OVERRIDES if cifar else {}), "train.initialisations": 1,
                                              **({"train.epochs": epochs} if epochs else {}),
                                              **json.loads(args.overrides)})
    print("train: " + json.dumps(base.train.model_dump()), flush=True)
    started = time.perf_counter()
    splits = {split: extracted(args.dataset, args.extracted, split) for split in ("train", "test")} if cifar else {}
    tables = {}
    with tempfile.TemporaryDirectory() as temporary:
        scratch = Path(temporary)
        for name in args.sets.split(","):
            began = time.perf_counter()
            if cifar:
                loaded = {split: ingest_files(scaled(chosen_files(folder, REMOVED[name]), args.scale),
                                              scratch / f"{name}-{split}", base, args.workers)
                          for split, folder in splits.items()}
            else:
                loaded = digit_splits(REMOVED[name], scratch / name, base)
            print(f"{name}: {len(loaded['train'])} train, {len(loaded['test'])} test images ready "
                  f"({time.perf_counter() - began:.0f}s)", flush=True)
            rows = evaluate_set(name, loaded["train"], loaded["test"], scratch / f"{name}-train", scratch, base,
                                device, methods)
            tables[name] = (rows, class_proportions(loaded["train"]), len(loaded["train"]), len(loaded["test"]))
    print(f"\n{args.collection}, {base.train.epochs} epochs a run, {torch.get_num_threads()} CPU threads, "
          f"{(time.perf_counter() - started) / 60:.1f} min in all. ACC/NMI: the 10-way head on the test subset by "
          "the label set's rule; argmax: its plain argmax; size err: half the L1 distance between the sizes of the "
          "exported train labels and the train subset's class proportions (both sorted)")
    for name, (rows, _, num_train, num_test) in tables.items():
        print_table(name, rows, num_train, num_test)
    if args.figure:
        size_figure({name: (rows, classes, num_train) for name, (rows, classes, num_train, _) in tables.items()},
                    args.figure)
        print(f"cluster sizes: {args.figure}")


if __name__ == "__main__":
    main()
