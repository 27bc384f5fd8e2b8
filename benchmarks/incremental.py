"""An incremental version (``train.start_from: parent``) against a version from scratch, with the pipeline's code.

    python benchmarks/incremental.py                                       # digits: v1 on 90% (1,617), v2 on 1,797
    python benchmarks/incremental.py --dataset cifar10 --old 5000 --new 500

1. Shards of the old images and of all images (old + new, in their original order): the embedded digits, or a
   random choice from CIFAR-10's train split (ingested with the pipeline's ingest; ``--cache`` keeps it). Which
   images are new is a random choice seeded by the repetition's seed (``--choice-seed`` fixes it): how often
   version 1 is a weak draw depends on which images it holds (docs/incremental.md), so a mean over seeds varies
   the choice as well as the training.
2. Version 1 from scratch on the old images, exported as the export stage exports (``sela.learn.loop`` and
   ``sela.labels.export``): its checkpoint, label set and card are what a published version holds.
3. Version 2 on all images twice, timed: from scratch, and from version 1 (``train.start_from: parent``). Each is
   exported with its cluster ids aligned to version 1, as the export stage aligns to the newest version.
4. Prints per version 2: seconds to train and to export, the share of the old images whose ``label`` is version
   1's, ACC and NMI against the ground truth (never used otherwise), then the ratios incremental / scratch.

params.yaml's values throughout (CIFAR-10: plus ``benchmarks/quality.py``'s CIFAR overrides); ``--overrides`` adds
more, e.g. '{"train.incremental.epochs": 5}'.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.quality import CIFAR_OVERRIDES  # noqa: E402
from sela.config import Params, load_params  # noqa: E402
from sela.data.ingest import ingest  # noqa: E402
from sela.data.shards import iter_shard_samples, write_shards  # noqa: E402
from sela.data.sources import iter_digit_samples  # noqa: E402
from sela.labels import card, export, label_set  # noqa: E402
from sela.learn import incremental  # noqa: E402
from sela.learn.loop import TrainingRun, run_training  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def digit_shards(folder: Path, params: Params, new_fraction: float, choice_seed: int) -> tuple[Path, Path]:
    """The embedded digits: a random ``new_fraction`` of them (``choice_seed``) left out of the old set."""
    samples = list(iter_digit_samples(params.shard.image_size))
    chosen = np.random.default_rng(choice_seed).permutation(len(samples))
    new = set(chosen[: round(new_fraction * len(samples))].tolist())
    return write_sets(folder, samples, new, params)


def cifar_shards(folder: Path, params: Params, archive: Path, cache: Path, old: int, new: int,
                 choice_seed: int) -> tuple[Path, Path]:
    """``old + new`` CIFAR-10 train images chosen at random (``choice_seed``), the last ``new`` of the choice new."""
    ingest(params.shard.model_copy(update={"source": str(archive), "min_side": 8}), str(cache), workers=2)
    samples = list(iter_shard_samples(cache))
    chosen = np.random.default_rng(choice_seed).permutation(len(samples))[: old + new]
    kept = sorted(chosen.tolist())
    return write_sets(folder, [samples[index] for index in kept], {kept.index(i) for i in chosen[old:].tolist()},
                      params)


def write_sets(folder: Path, samples: list, new: set[int], params: Params) -> tuple[Path, Path]:
    """Shards of the samples not in ``new`` (old) and of all samples, both in the samples' order."""
    size = params.shard.samples_per_shard
    write_shards((sample for index, sample in enumerate(samples) if index not in new), folder / "old", size)
    write_shards(samples, folder / "all", size)
    return folder / "old", folder / "all"


def make_version(shard_dir: Path, folder: Path, params: Params, device: torch.device, parent: dict | None,
                 log) -> dict:
    """Train and export one version into ``folder`` (checkpoint.pt, labels.parquet, card.json), aligned to
    ``parent`` (a version made here); returns its files, keys, exported labels, metrics and timings."""
    began = time.perf_counter()
    parent_files = None if parent is None else parent["files"]
    def progress(event: dict) -> None:
        if event["kind"] in ("start", "done", "chosen"):
            log(f"  {event}")

    run = TrainingRun(str(shard_dir), folder / "checkpoint.pt", folder / "state", device, 0, progress,
                      parent=parent_files)
    checkpoint = run_training(run, params.train)
    trained = time.perf_counter()
    table = None if parent is None else label_set.read_label_set(parent["files"].labels_path).to_pandas()
    exported = export.export_label_set(checkpoint.model, shard_dir, params, device, 0, table,
                                       None if parent is None else parent["files"].tag, checkpoint.target_sizes)
    final = exported.final
    label_set.write_label_set(label_set.label_table(exported.keys, final.labels, final.confidence,
                                                    final.selected_head), folder / "labels.parquet")
    label_set.write_card(card.label_card(params, final, exported.metrics, checkpoint.history, "benchmark", "benchmark",
                                         exported.lineage), folder / "card.json")
    finished = time.perf_counter()
    files = incremental.ParentVersion(folder.name, folder / "checkpoint.pt", folder / "card.json",
                                      folder / "labels.parquet")
    return {"files": files, "keys": exported.keys, "label": final.labels[final.selected_head],
            "metrics": exported.metrics, "train_seconds": trained - began, "export_seconds": finished - trained,
            "epochs": checkpoint.epoch}


def kept_fraction(version: dict, parent: dict) -> float:
    """Share of the parent's images whose ``label`` the version keeps (its ids are aligned to the parent's)."""
    mine = dict(zip(version["keys"], version["label"].tolist(), strict=True))
    return float(np.mean([mine[key] == label for key, label in zip(parent["keys"], parent["label"].tolist(),
                                                                     strict=True) if key in mine]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--new-fraction", type=float, default=0.1, help="digits: share of the images that are new")
    parser.add_argument("--old", type=int, default=5000, help="cifar10: images of version 1")
    parser.add_argument("--new", type=int, default=500, help="cifar10: images added for version 2")
    parser.add_argument("--archive", type=Path, default=ROOT.parent / "shared/datasets/cifar10/train.tar.gz")
    parser.add_argument("--cache", type=Path, default=None, help="cifar10: ingested shards kept between runs")
    parser.add_argument("--overrides", default="{}", help="JSON of params.yaml overrides")
    parser.add_argument("--variants", default='[{}]', help="JSON list of overrides, one incremental version 2 each "
                        "(a few seconds each), e.g. '[{}, {\"train.incremental.relabels\": 0}]'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of each repetition (all three "
                        "versions) and, unless --choice-seed is given, of the choice of new images; with several, "
                        "the means over seeds are printed last")
    parser.add_argument("--choice-seed", type=int, default=None, help="one fixed choice of new images for every "
                        "seed (the figures of 2026-12-04 used 0)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    def log(line: str) -> None:
        print(line, flush=True)

    dataset_overrides = {**(CIFAR_OVERRIDES if args.dataset == "cifar10" else {}), **json.loads(args.overrides)}
    results: dict[int, list[dict]] = {number: [] for number in range(len(json.loads(args.variants)))}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for seed in args.seeds:
            overrides = {**dataset_overrides, "train.seed": seed}
            params = load_params(ROOT / "params.yaml", overrides)
            variants = [load_params(ROOT / "params.yaml", {**overrides, "train.start_from": "parent", **variant})
                        for variant in json.loads(args.variants)]
            log(f"seed {seed}, train: " + json.dumps(params.train.model_dump()))
            choice_seed = seed if args.choice_seed is None else args.choice_seed
            log(f"new images chosen with seed {choice_seed}")
            if args.dataset == "digits":
                old_dir, all_dir = digit_shards(folder / f"shards-{seed}", params, args.new_fraction, choice_seed)
            else:
                old_dir, all_dir = cifar_shards(folder / f"shards-{seed}", params, args.archive,
                                                args.cache or folder / "cache", args.old, args.new, choice_seed)
            log("version 1 from scratch (old images)")
            first = make_version(old_dir, folder / f"labels-v1-{seed}", params, device, None, log)
            log("version 2 from scratch (all images)")
            scratch = make_version(all_dir, folder / f"scratch-v2-{seed}", params, device, first, log)
            for number, variant in enumerate(variants):
                log(f"version 2 from version 1 (all images): {json.dumps(variant.train.incremental.model_dump())}")
                version = make_version(all_dir, folder / f"incremental-v2-{seed}-{number}", variant, device, first,
                                       log)
                log(f"\nseed {seed}, incremental: {json.dumps(variant.train.incremental.model_dump())}")
                results[number].append(report(first, scratch, version, log))
    if len(args.seeds) > 1:
        for number, rows in results.items():
            log(f"\nvariant {number}, means over seeds {args.seeds}:")
            for name in ("time_ratio", "kept", "scratch_kept", "acc_points"):
                values = [row[name] for row in rows]
                log(f"  {name:<13}{np.mean(values):8.3f}  (per seed {', '.join(f'{v:.3f}' for v in values)})")


def report(first: dict, scratch: dict, incremental_version: dict, log) -> dict[str, float]:
    """Prints the figures of both versions 2 and the ratios incremental / scratch; returns the ratios."""
    log(f"\nversion 1: {len(first['keys'])} images, {first['epochs']} epochs, ACC {100 * first['metrics']['acc']:.1f}")
    log(f"{'version 2':<14}{'images':>7}{'epochs':>7}{'train s':>9}{'export s':>9}{'total s':>9}{'kept %':>8}"
        f"{'ACC':>7}{'NMI':>7}")
    rows = {}
    for name, version in (("scratch", scratch), ("incremental", incremental_version)):
        total = version["train_seconds"] + version["export_seconds"]
        rows[name] = {"total": total, "kept": kept_fraction(version, first), "acc": version["metrics"]["acc"]}
        log(f"{name:<14}{len(version['keys']):>7}{version['epochs']:>7}{version['train_seconds']:>9.1f}"
            f"{version['export_seconds']:>9.1f}{total:>9.1f}{100 * rows[name]['kept']:>8.1f}"
            f"{100 * version['metrics']['acc']:>7.1f}{100 * version['metrics']['nmi']:>7.1f}")
    time_ratio = rows["incremental"]["total"] / rows["scratch"]["total"]
    train_ratio = incremental_version["train_seconds"] / scratch["train_seconds"]
    acc_points = 100 * (rows["incremental"]["acc"] - rows["scratch"]["acc"])
    log(f"\ntime incremental / scratch: {time_ratio:.3f} (train alone {train_ratio:.3f}; goal <= 0.30)")
    kept = 100 * rows["incremental"]["kept"], 100 * rows["scratch"]["kept"]
    log(f"old images' labels kept: {kept[0]:.1f}% (scratch: {kept[1]:.1f}%; goal >= 95%)")
    log(f"ACC incremental - scratch: {acc_points:+.1f} points (goal within 1)")
    return {"time_ratio": time_ratio, "kept": kept[0], "scratch_kept": kept[1], "acc_points": acc_points}


if __name__ == "__main__":
    main()
