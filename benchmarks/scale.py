"""Training at scale on this machine: memory against N, the stream against an in-memory loop, one against two processes.

    python benchmarks/scale.py --dataset DIR        # DIR holds CIFAR-10's train.tar.gz (32x32 JPEGs)

1. Peak memory: the pipeline's loop (``sela.learn.loop``, one process, one loader worker) trains one epoch, with
   the first relabel's streamed pass, on 50,000 and on 200,000 images (CIFAR-10's train split, and the same images
   four times under other keys) decoded at 64 px. Each run is a fresh process; its peak RSS and its loader worker's
   are printed with the ratio RSS(200k) / RSS(50k), next to what decoding every image into memory would take.
2. Speed: images per second of a streamed training epoch against the in-memory epoch (every image decoded once
   into one array, ``sela.learn.train.train_epoch``) on CIFAR-10 at 32 px with the CPU recipe, same network and
   batch: the two loops alternate (rounds of a few epochs each) and the medians are compared, so that a busy spell
   of a shared host does not land on one loop only.
3. Processes: the train task's launcher (``tasks.train.launch_training``: torchrun, gloo) with one and with two
   processes on the same 10,000 images for 3 epochs after one relabel: both must finish with every image seen once an
   epoch and a falling loss; prints the epoch times and their ratio.
Every figure is measured in the run that prints it.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sela.config import TrainParams, load_params  # noqa: E402
from sela.data.ingest import ingest  # noqa: E402
from sela.data.shards import iter_shard_samples, read_shards, write_shards  # noqa: E402
from sela.data.sources import Sample  # noqa: E402
from sela.learn import train  # noqa: E402
from sela.learn.loop import TrainingRun, run_training  # noqa: E402

# The CPU recipe of benchmarks/quality.py (params.yaml plus its CIFAR-10 overrides).
CIFAR = {"train.augment.flip_probability": 0.5, "train.batch_size": 128, "train.learning_rate": 0.05,
         "train.initialisations": 1}  # speeds and memory of one run


def cifar_shards(archive: Path, folder: Path) -> Path:
    """The train split ingested by the pipeline's own ingest (kept between runs)."""
    ingest(load_params(ROOT / "params.yaml", {"shard.source": str(archive), "shard.min_side": 8}).shard,
           str(folder), workers=2)
    return folder


def repeated_shards(source: Path, folder: Path, copies: int) -> Path:
    """``copies`` times the images of ``source``, each copy under its own keys."""
    if not (folder / "manifest.parquet").exists():
        samples = [sample for sample in iter_shard_samples(source)]
        write_shards((Sample(f"copy{copy}/{sample.key}", sample.image, sample.extension, None, sample.source_path)
                      for copy in range(copies) for sample in samples), folder, 1000)
    return folder


def subset_shards(source: Path, folder: Path, count: int) -> Path:
    if not (folder / "manifest.parquet").exists():
        samples = (sample for row, sample in enumerate(iter_shard_samples(source)) if row % (50_000 // count) == 0)
        write_shards(samples, folder, 1000)
    return folder


def child_memory(shards: str, state: str) -> None:
    """In a fresh process: one epoch (and the first relabel's pass) at decode_size 64; prints peak RSS in MB."""
    params = load_params(ROOT / "params.yaml", {**CIFAR, "train.decode_size": 64, "train.epochs": 1,
                                                 "train.num_relabels": 1}).train
    run = TrainingRun(shards, Path(state) / "checkpoint.pt", Path(state), torch.device("cpu"), 1)
    run_training(run, params)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"rss_mb": own, "worker_rss_mb": workers}))


def peak_memory(shards: Path, scratch: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=scratch) as state:
        result = subprocess.run([sys.executable, __file__, "--child-memory", str(shards), state],
                                capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the training run on {shards} failed:\n{result.stderr[-3000:]}")
    output = result.stdout
    return json.loads(output.strip().splitlines()[-1])


def stream_speeds(shards: Path, params: TrainParams, scratch: Path, workers: int, epochs: int) -> list[float]:
    """Images per second of each streamed epoch after the first (the pipeline's loop, one process)."""
    speeds: list[float] = []
    with tempfile.TemporaryDirectory(dir=scratch) as state:
        run = TrainingRun(str(shards), Path(state) / "checkpoint.pt", Path(state), torch.device("cpu"), workers,
                          lambda event: speeds.append(event["images_per_second"]) if event["kind"] == "epoch" else 0)
        run_training(run, params.model_copy(update={"epochs": epochs + 1, "num_relabels": 1}))
    return speeds[1:]


def memory_speeds(images: torch.Tensor, params: TrainParams, epochs: int) -> list[float]:
    """Images per second of each in-memory epoch after the first (every image decoded once into ``images``)."""
    checkpoint = train.new_checkpoint(params, len(images))
    train.train_epoch(checkpoint, images, params, torch.device("cpu"))
    speeds = []
    for _ in range(epochs):
        began = time.perf_counter()
        train.train_epoch(checkpoint, images, params, torch.device("cpu"))
        speeds.append(len(images) / (time.perf_counter() - began))
    return speeds


def processes(shards: Path, scratch: Path, count: int) -> list[dict]:
    """The launcher's epochs with ``count`` gloo processes on this node."""
    from tasks.train import launch_training

    root = scratch / f"project-{count}"
    (root / "data").mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "shards").exists():
        (root / "data" / "shards").symlink_to(shards)
    # One relabel (before the first epoch), then three epochs on those labels: the loss must fall. (With a relabel
    # every epoch the loss of an epoch is measured against new labels and need not.)
    params = load_params(ROOT / "params.yaml", {**CIFAR, "train.epochs": 3, "train.num_relabels": 1}).train
    os.environ["PET_NPROC_PER_NODE"] = str(count)
    os.environ.setdefault("SELA_LOADER_WORKERS", "1")
    events = launch_training(str(root), params, lambda event: None)
    return [event for event in events if event["kind"] == "epoch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="folder with CIFAR-10's train.tar.gz (required)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "sela-scale",
                        help="shards and runs (kept between runs)")
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--parts", type=lambda text: {int(part) for part in text.split(",")}, default={1, 2, 3},
                        help="which measurements to run, e.g. 2,3 (default: all)")
    parser.add_argument("--rounds", type=int, default=2, help="speed: alternations of the two loops")
    parser.add_argument("--epochs", type=int, default=2, help="speed: timed epochs of each loop per round")
    parser.add_argument("--child-memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_memory(*args.child_memory)
        return
    if args.dataset is None:
        parser.error("--dataset DIR is required")
    args.scratch.mkdir(parents=True, exist_ok=True)
    base = cifar_shards(args.dataset / "train.tar.gz", args.scratch / "cifar-train")
    if 1 in args.parts:
        large = repeated_shards(base, args.scratch / "cifar-train-x4", 4)

        print("1. peak memory of training (one epoch and a relabel pass, decode_size 64, one process)")
        small_rss, large_rss = peak_memory(base, args.scratch), peak_memory(large, args.scratch)
        for name, count, rss in (("50,000", 50_000, small_rss), ("200,000", 200_000, large_rss)):
            in_memory = count * 64 * 64 * 3 / 2**20
            print(f"   {name:>8} images: {rss['rss_mb']:7.0f} MB (loader worker {rss['worker_rss_mb']:5.0f} MB); "
                  f"decoding every image into memory would take {in_memory:6.0f} MB more")
        print(f"   RSS(200k) / RSS(50k) = {large_rss['rss_mb'] / small_rss['rss_mb']:.2f} (goal <= 1.3)")

    if 2 in args.parts:
        params = load_params(ROOT / "params.yaml", CIFAR).train
        print(f"2. training speed on CIFAR-10 at 32 px (CPU recipe): {args.rounds} rounds of {args.epochs} streamed "
              f"then {args.epochs} in-memory epochs (each run's first epoch untimed), medians")
        images = torch.from_numpy(read_shards(base, params.decode_size).images)
        streamed, in_memory = [], []
        for _ in range(args.rounds):  # alternated, so that a busy spell of the host slows both loops alike
            streamed += stream_speeds(base, params, args.scratch, args.loader_workers, args.epochs)
            in_memory += memory_speeds(images, params, args.epochs)
        del images
        print(f"   streamed {[round(v) for v in streamed]} images/s, in memory {[round(v) for v in in_memory]}")
        ratio = float(np.median(streamed) / np.median(in_memory))
        print(f"   streamed {np.median(streamed):7.0f} images/s, in memory {np.median(in_memory):7.0f} images/s: "
              f"ratio {ratio:.2f} (goal >= 0.8)")

    if 3 in args.parts:
        print("3. one process against two (torchrun, gloo) on 10,000 images, 3 epochs")
        ten_thousand = subset_shards(base, args.scratch / "cifar-10k", 10_000)
        runs = {count: processes(ten_thousand, args.scratch, count) for count in (1, 2)}
        for count, epochs in runs.items():
            losses = [round(event["loss"], 3) for event in epochs]
            seen = all(event["images"] == 10_000 for event in epochs)
            print(f"   {count} process(es): epochs {[round(e['seconds'], 1) for e in epochs]} s, every image once an "
                  f"epoch: {seen}, loss {losses} falls: {losses[-1] < losses[0]}")
        one, two = (float(np.median([e["seconds"] for e in runs[count][1:]])) for count in (1, 2))
        print(f"   epoch time, two processes / one: {two / one:.2f}")


if __name__ == "__main__":
    main()
