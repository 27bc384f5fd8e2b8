"""Label quality on CIFAR-10 within a time budget, next to raw-pixel baselines computed in the same run.

    python benchmarks/quality.py --budget-minutes 30                               # 2 CPU cores
    python benchmarks/quality.py --device cuda --workers 16 --budget-minutes 6.75  # one GPU: GPU_OVERRIDES below

1. Ingests ``train.tar.gz`` and ``test.tar.gz`` of ``--dataset`` with the pipeline's own ingest (not timed against
   the budget; ``--cache`` keeps the shards between runs) and decodes them at ``train.decode_size``, as the pipeline
   does (32 px: the images' own size; the network sees its training crops at ``train.image_size``, the whole images
   it is scored on at ``train.eval_image_size``).
2. Baselines on the test split: k-means on raw pixels (k = 10, n_init = 3: ACC/NMI/ARI) and weighted kNN on raw
   pixels (128-d random projection, train split as reference).
3. Self-labels the train split with the pipeline's own loop (``sela.learn.loop``, streaming the shards;
   params.yaml plus the CIFAR-10 overrides below, and the GPU ones on a GPU; no Prefect) for as many epochs as fit
   in ``--budget-minutes``: the epoch count (the learning-rate and relabel schedules need it) is refitted after
   every epoch from the speed of the last ten, and training stops early if the budget would be exceeded anyway.
4. Scores, never having trained on the test split: the exported 10-way head (``export.label_head``) predicting the
   test images (ACC/NMI/ARI), by the network's argmax and by the label set's rule (the argmax shifted by the
   cluster potentials that balanced the train split; the test images are not balanced among themselves), both by
   ``sela labels predict``'s core (``sela.labels.predict.predict_shards``, streaming the test shards: the rule ACC
   is what a predict of these images gives), the label set of the train split (Sinkhorn-balanced, as exported),
   and the weighted kNN of the test images against the train images (k = 50, temperature 0.1, 128-d: the SeLa paper's
   protocol) on the learned features and on the same network at initialisation.

The class folders are ground truth for scoring only. Prints one line per epoch and a final table with ratios
against the baselines; ``--report DIR`` also writes the pipeline's visual report of the train split's label set
(``clusters.png``: every cluster's most confident images; a montage per cluster; ``report.html``).
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sela.config import Params, load_params  # noqa: E402
from sela.data.ingest import ingest  # noqa: E402
from sela.data.shards import LoadedShards, iter_shard_samples, read_manifest, read_shards, write_shards  # noqa: E402
from sela.labels import export, predict, report  # noqa: E402
from sela.labels.evaluate import compute_features, confidence_histogram, head_agreement, knn_predict, project  # noqa: E402
from sela.labels.metrics import cluster_sizes, encode, label_quality  # noqa: E402
from sela.learn import train  # noqa: E402
from sela.learn.loop import TrainingRun, run_training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# What differs from the embedded default (1,797 digits): the paper's flip (mirrored digits are other digits;
# mirrored photos are not) and, for 28x more images, batches of 128 at learning rate 0.05 (the paper's CIFAR
# batch). Everything else is params.yaml's, tuned on CIFAR-10 train (README: label quality on CIFAR-10); training
# at 16 px (params.yaml's image_size) beat 32 px within the budget: four times the epochs. One run, not params.yaml's
# choice among runs (train.initialisations, measured on digits): the CIFAR-10 budgets and figures are of one run.
CIFAR_OVERRIDES = {"train.augment.flip_probability": 0.5, "train.batch_size": 128, "train.learning_rate": 0.05,
                   "train.initialisations": 1}
# On a GPU (``--device cuda``), on top: the paper's CIFAR recipe as far as minutes allow. ResNet-18 (CIFAR stem)
# at 32 px in batches of 512, 10 over-clustering heads of 128 beside the 10-way ones, crops down to 20% of the
# image, a relabel before every epoch, and Sinkhorn stopped when every cluster is within 1% of its share (30-40
# iterations a head instead of hundreds; 99.7% of the same labels, README). Heads straight on the features: with
# params.yaml's shared hidden layer the GPU run scored the same (README: ACC 43.1 against 43.9, kNN 66.7 against 66.1).
# Scored at 32 px, the images' own size, as in those runs: params.yaml's larger scoring view (1.25x the training
# size) was measured on the CPU recipe only.
GPU_OVERRIDES = {"train.architecture": "resnet18", "train.image_size": 32, "train.eval_image_size": 32,
                 "train.batch_size": 512, "train.learning_rate": 0.1, "train.overclustering.num_heads": 10,
                 "train.num_relabels": 400,
                 "train.augment.crop_scale_min": 0.2, "train.sinkhorn.stop_rule": "marginal",
                 "train.sinkhorn.tolerance": 0.01, "train.hidden_layers": []}


def load_split(archive: Path, cache: Path, decode_size: int, workers: int) -> LoadedShards:
    """Ingest ``archive`` into ``cache`` (kept shards are reused) and decode every image at ``decode_size`` (for
    scoring: training streams the shards)."""
    params = load_params(ROOT / "params.yaml", {"shard.source": str(archive), "shard.min_side": 8}).shard
    ingest(params, str(cache), workers=workers)
    return read_shards(cache, decode_size)


def subset(shard_dir: Path, count: int, target: Path, decode_size: int) -> LoadedShards:
    """``count`` images of ``shard_dir`` chosen at random (seed 0), in their original order, as shards in
    ``target``; returns them decoded."""
    keep = set(np.random.default_rng(0).permutation(len(read_manifest(shard_dir)))[:count].tolist())
    samples = (sample for row, sample in enumerate(iter_shard_samples(shard_dir)) if row in keep)
    write_shards(samples, target, 1000)
    return read_shards(target, decode_size)


def knn_test_accuracy(train_features: torch.Tensor, train_truth: list, test_features: torch.Tensor,
                      test_truth: list, params: Params) -> float:
    """Weighted kNN accuracy of test rows against train rows (both projected the same way)."""
    settings = params.evaluate
    reference = project(train_features, settings.knn_dimensions)
    queries = project(test_features, settings.knn_dimensions)
    codes = encode(list(train_truth) + list(test_truth))
    predicted = knn_predict(reference, codes[: len(train_truth)], queries, settings.knn_neighbours,
                            settings.knn_temperature)
    return float((predicted == codes[len(train_truth):]).mean())


def pixel_features(images: np.ndarray) -> torch.Tensor:
    """Raw pixels (N, H, W, 3) uint8 -> centred float (N, 3 H W): the baselines' representation."""
    flat = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255)
    return flat - flat.mean(0)


def baselines(train_split: LoadedShards, test_split: LoadedShards, params: Params) -> dict[str, dict[str, float]]:
    """Raw-pixel k-means (clustering metrics) and raw-pixel kNN on the test split."""
    pixels = test_split.images.reshape(len(test_split), -1).astype(np.float32) / 255
    clusters = KMeans(10, n_init=3, random_state=0).fit_predict(pixels)
    knn = knn_test_accuracy(pixel_features(train_split.images), train_split.ground_truth,
                            pixel_features(test_split.images), test_split.ground_truth, params)
    return {"k-means pixels": label_quality(clusters, test_split.ground_truth), "kNN pixels": {"knn": knn}}


def self_label(params: Params, shard_dir: Path, state_dir: Path, budget_seconds: float, device: torch.device,
               loader_workers: int, log: Callable[[str], None]) -> tuple[train.Checkpoint, float]:
    """The pipeline's loop (``sela.learn.loop``: streamed, relabels on schedule) fitted to the budget. Returns the
    checkpoint and the seconds spent."""
    start = time.perf_counter()

    def plan_epochs(done: int, durations: list[float]) -> int:
        # The epoch count follows the clock to the end: refitted after every epoch from the median of the last
        # ten (the first one, with the initial relabel pass, only until there are others), so that a host that
        # speeds up or slows down mid-run still ends on time with the learning rate near zero. Training stops
        # early when the next epoch would exceed the budget anyway.
        elapsed = time.perf_counter() - start
        typical = float(np.median(durations[1:][-10:] or durations))
        if elapsed + typical > budget_seconds:
            return done
        return done + max(1, int((budget_seconds - elapsed) / typical))

    def progress(event: dict) -> None:
        if event["kind"] == "relabel":
            iterations = np.mean([head["iterations"] for head in event["heads"]])
            converged = all(head["converged"] for head in event["heads"])
            log(f"relabel before epoch {event['epoch']}: {iterations:.0f} iterations a head, converged {converged}")
        elif event["kind"] == "epoch":
            log(f"epoch {event['epoch']:>3}/{event['epochs']} {event['seconds']:6.1f}s  loss {event['loss']:.3f}  "
                f"lr {event['lr']:.4f}")
        else:
            log(str(event))

    run = TrainingRun(str(shard_dir), state_dir / "checkpoint.pt", state_dir, device, loader_workers, progress,
                      plan_epochs)
    # A first guess for the schedules, refitted after the first epoch.
    checkpoint = run_training(run, params.train.model_copy(update={"epochs": max(params.train.epochs, 2)}))
    return checkpoint, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "datasets" / "cifar10")
    parser.add_argument("--cache", type=Path, default=None, help="shard folder kept between runs (default: temp)")
    parser.add_argument("--workers", type=int, default=2, help="ingest processes")
    parser.add_argument("--subset", type=int, default=0,
                        help="train on this many train images (a fixed random choice) for quick comparisons; 0: all")
    parser.add_argument("--overrides", default="{}", help='JSON of params.yaml overrides, e.g. \'{"train.width": 48}\'')
    parser.add_argument("--device", default="cpu", help="torch device for training and scoring, e.g. cuda")
    parser.add_argument("--loader-workers", type=int, default=-1,
                        help="decoding processes of the training stream (default: none on a CPU, 8 on a GPU)")
    parser.add_argument("--report", type=Path, default=None, help="write the label set's visual report here")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="save the trained checkpoint here (sela.learn.train.save_checkpoint) for later study")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed batch shapes: let cuDNN pick its fastest kernels

    def log(line: str) -> None:
        print(line, flush=True)

    device_overrides = GPU_OVERRIDES if device.type == "cuda" else {}
    params = load_params(ROOT / "params.yaml", {**CIFAR_OVERRIDES, **device_overrides, **json.loads(args.overrides)})
    loader_workers = args.loader_workers if args.loader_workers >= 0 else (0 if device.type == "cpu" else 8)
    with tempfile.TemporaryDirectory() as temporary:
        cache, scratch = args.cache or Path(temporary), Path(temporary)
        started = time.perf_counter()
        decode_size = params.train.decode_size
        train_dir = cache / "train"
        train_split = load_split(args.dataset / "train.tar.gz", train_dir, decode_size, args.workers)
        test_split = load_split(args.dataset / "test.tar.gz", cache / "test", decode_size, args.workers)
        if args.subset:
            train_dir = scratch / f"train-{args.subset}"
            train_split = subset(cache / "train", args.subset, train_dir, decode_size)
        log(f"data: {len(train_split)} train, {len(test_split)} test images ({time.perf_counter() - started:.0f}s)")
        started = time.perf_counter()
        results = baselines(train_split, test_split, params)
        log(f"baselines: {time.perf_counter() - started:.0f}s")
        log("train: " + json.dumps(params.train.model_dump()))

        initial = train.new_checkpoint(params.train, len(train_split)).model
        results["kNN initial network"] = {"knn": network_knn(initial, train_split, test_split, params, device)}
        checkpoint, seconds = self_label(params, train_dir, scratch / "state", args.budget_minutes * 60, device,
                                         loader_workers, log)
        if args.checkpoint:
            train.save_checkpoint(checkpoint, args.checkpoint)
        final = export.final_labels(checkpoint.model, torch.from_numpy(train_split.images), params, device,
                                    checkpoint.target_sizes)
        results.update(score(checkpoint.model, final, train_split, test_split, cache / "test", params, device,
                             loader_workers))  # streams the test shards: inside the folder's lifetime
    print_table(results, seconds, params, device, log)
    if args.report:
        page = write_label_report(args.report, final, train_split, results, params)
        log(f"report: {page}")


def network_knn(model: torch.nn.Module, train_split: LoadedShards, test_split: LoadedShards, params: Params,
                device: torch.device) -> float:
    """Weighted kNN accuracy on the test split of ``model``'s backbone features."""
    size = params.train.eval_image_size
    train_features = compute_features(model, torch.from_numpy(train_split.images), size, device)
    test_features = compute_features(model, torch.from_numpy(test_split.images), size, device)
    return knn_test_accuracy(train_features, train_split.ground_truth, test_features, test_split.ground_truth, params)


def score(model: torch.nn.Module, final: export.FinalLabels, train_split: LoadedShards, test_split: LoadedShards,
          test_dir: Path, params: Params, device: torch.device, loader_workers: int) -> dict[str, dict[str, float]]:
    """The exported label set on train, its head's predictions on test, and kNN on the learned features."""
    head = final.selected_head
    rule = predict.LabelRule.unaligned(final.cluster_potentials, head)  # made here: no parent version to align to
    prediction = predict.predict_shards(model, test_dir, rule, params, device, loader_workers)
    return {
        "sela labels (train)": label_quality(final.labels[head], train_split.ground_truth),
        "sela head (test)": {**label_quality(prediction.network_labels[head], test_split.ground_truth),
                             "knn": network_knn(model, train_split, test_split, params, device)},
        "sela rule (test)": label_quality(prediction.labels[head], test_split.ground_truth),
    }


def write_label_report(directory: Path, final: export.FinalLabels, train_split: LoadedShards,
                       results: dict[str, dict[str, float]], params: Params) -> Path:
    """The pipeline's report (``sela.labels.report``) of the train split's exported label set. Returns the HTML page."""
    head, num_clusters = final.selected_head, params.train.num_clusters
    label, confidence = final.labels[head], final.confidence[head]
    metrics = {"num_images": len(label), "head": head, "mean_confidence": float(confidence.mean()),
               **{f"train {name}": value for name, value in results["sela labels (train)"].items()},
               **{f"test {name}": value for name, value in results["sela head (test)"].items()},
               **{f"test rule {name}": value for name, value in results["sela rule (test)"].items()}}
    charts = report.label_set_charts(cluster_sizes(label, num_clusters), confidence_histogram(confidence),
                                     head_agreement(final.labels, num_clusters)["agreement"])
    files = report.write_report(directory, "sela on CIFAR-10 (train split)", train_split.images, label, confidence,
                                num_clusters, metrics, charts, params.evaluate.montage_images)
    return files[-1]


def print_table(results: dict[str, dict[str, float]], seconds: float, params: Params, device: torch.device,
                log: Callable[[str], None]) -> None:
    """The table, then the ratios the issue's goals are stated in."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    log(f"\ntraining: {seconds / 60:.1f} min on {where}, "
        f"{params.train.architecture} width {params.train.width}")
    log(f"{'':<22}{'ACC':>7}{'NMI':>7}{'ARI':>7}{'kNN':>7}")
    for name, values in results.items():
        cells = "".join(f"{100 * values[key]:>7.1f}" if key in values else f"{'-':>7}"
                        for key in ("acc", "nmi", "ari", "knn"))
        log(f"{name:<22}{cells}")
    test, rule, kmeans = results["sela head (test)"], results["sela rule (test)"], results["k-means pixels"]
    # The goals: 30 minutes on 2 CPU cores, or at most 8 minutes of training on one H100. The head's ACC
    # is read by the label set's rule (the labels it would have given these images), the plain argmax beside it.
    acc_goal, knn_goal = (62.0, 78.0) if device.type == "cuda" else (35.0, 50.0)
    log(f"\nACC {100 * rule['acc']:.1f} = {rule['acc'] / kmeans['acc']:.2f}x k-means (label set's rule; argmax "
        f"{100 * test['acc']:.1f}; goal >= {acc_goal}); kNN {100 * test['knn']:.1f} = "
        f"{test['knn'] / results['kNN pixels']['knn']:.2f}x pixel kNN (goal >= {knn_goal})")


if __name__ == "__main__":
    main()
