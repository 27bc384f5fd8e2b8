"""Ingest and read benchmark on a real image collection: this checkout against an older one (and against webdataset's
own tar writer and reader), each figure against its baseline measured in the same run, in one table.

    mkdir /tmp/before && git archive b334b05 | tar -x -C /tmp/before   # plus its C extension, built or copied in
    python benchmarks/shard.py --before /tmp/before --archive ../shared/datasets/cifar10/test.tar.gz

1. Extracts the archive to a temporary folder (not timed); CIFAR-10's test split is 10,000 JPEGs of 32x32 (~1 KB).
2. Rows, each measured by a Python process of its own with that code first on ``sys.path``, one after the other,
   ``--repeats`` times in turn:
   - ``before``: the ``--before`` checkout (left out without it);
   - ``after``: this checkout;
   - ``after, webdataset writer+reader``: this checkout with webdataset doing the tar work the hand-written
     ``sela.data.tarmembers`` does: the decode workers build their batch's tar members with ``webdataset.TarWriter``
     (one writer per batch: the same bytes, checked), and the stream and ``read_shards`` read the shards with
     ``webdataset.tarfile_to_samples``. The hand-written code stays only while it is at least 1.5x faster
     (docs/shards.md), which the last lines print.
3. Columns: ``ingest/tar``, images/s of ``sela.data.ingest`` (full decode-validation on ``--workers`` processes) over
   ``tar -cf`` of the same folder (the disk-speed baseline, goal >= 0.5); ``stream/ImageFolder``, images/s of
   the training loader (``sela.data.loader``) over torchvision's stock ``ImageFolder`` + ``DataLoader`` (PIL loader,
   ``PILToTensor``) on the folder, same batch size and workers (goal >= 1.5); the ingest's CPU per image (main
   process and decode workers); ``read_shards``' CPU per image (every sample decoded into one array in one
   process: how the pipeline's tasks read the shards); the JPEG check alone (CPU per image, best of 3 passes over
   the JPEGs in memory).
   Ratios are medians over the repeats (their range in brackets).

Both sides of each ratio run on a warm page cache, a second apart. On a shared machine the rates move with other
processes' load: compare ratios, not absolute rates, and rerun on idle cores for clean figures.
"""

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the code under test is imported from the row's checkout, after sys.path is set
    from sela.data.images import BatchResult, ImageLimits, WorkBatch

REPOSITORY = Path(__file__).resolve().parent.parent
WEBDATASET = "webdataset"


def folder_root(extracted: Path) -> Path:
    """The folder holding the class folders: 'test/' inside the CIFAR archive, else the extraction itself."""
    entries = list(extracted.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else extracted


def cpu_split() -> tuple[float, float]:
    """CPU time (user + system) of this process, and of its finished children, so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


# ---------------------------------------------------------------------------------------------------------------
# One row's measurement, in a process of its own (``--measure``): the code under test is imported from ``--root``.


def time_tar(folder: Path, target: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["tar", "-cf", str(target), "-C", str(folder), "."], check=True)
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


def time_ingest(folder: Path, output: Path, args: argparse.Namespace) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process and its decode workers, images ingested)."""
    from sela.config import ShardParams
    from sela.data.ingest import ingest

    params = ShardParams(source=str(folder), image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                         min_side=8, max_side=1024)
    start, cpu = time.perf_counter(), sum(cpu_split())
    report = ingest(params, str(output), workers=args.workers)
    seconds = time.perf_counter() - start
    # ingest returns while its executor's thread may still be joining the exiting workers; their CPU time counts
    # once they are joined (active_children joins the ones that have exited).
    while multiprocessing.active_children():
        time.sleep(0.001)
    if len(report.quarantine):
        print(f"note: {len(report.quarantine)} files quarantined, e.g. {report.quarantine.iloc[0].to_dict()}",
              file=sys.stderr)
    return seconds, sum(cpu_split()) - cpu, len(report.manifest)


def time_image_folder(folder: Path, args: argparse.Namespace) -> tuple[float, int]:
    import torch
    import torchvision

    # As torchvision users write it; CIFAR images are already 32x32, so no resize on either side.
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=torchvision.transforms.PILToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers)
    start = time.perf_counter()
    count = sum(len(images) for images, _ in loader)
    return time.perf_counter() - start, count


def time_stream(output: Path, args: argparse.Namespace) -> tuple[float, int]:
    """One training pass of the loader the training loop reads through (``sela.data.loader``: 16 shards at a time
    per worker, a shuffle buffer of 1,000, decoded batches)."""
    from sela.data.loader import pass_loader, plan_pass, shard_table

    plan = plan_pass(shard_table(output), rank=0, world_size=1, workers=args.workers, batch_size=args.batch_size,
                     shuffle_seed=0, seed=0, buffer=1000, interleave=16)
    start = time.perf_counter()
    count = sum(len(batch.indices) for batch in pass_loader(plan, args.image_size, args.workers))
    return time.perf_counter() - start, count


def read_shards_cost(output: Path, args: argparse.Namespace) -> float:
    """us of CPU per image for ``read_shards`` (every sample decoded into one array, in this process: how the
    pipeline's tasks read the shards); one process, so other processes' load hardly moves it."""
    from sela.data.shards import read_shards

    start = time.process_time()
    count = len(read_shards(output, args.image_size))
    return (time.process_time() - start) / count * 1e6


def jpeg_check_cost(folder: Path, count: int = 10_000, rounds: int = 3) -> float:
    """us of CPU per image for the ingest's JPEG check (``sela.data._jpeg.check`` in the C-extension code,
    ``sela.data.images.check_jpeg`` after it), best of ``rounds`` passes over the first ``count`` JPEGs."""
    from sela.data import images

    if hasattr(images, "check_jpeg"):
        check = images.check_jpeg
    else:
        from sela.data import _jpeg

        check = _jpeg.check
    datas = [path.read_bytes() for path in sorted(folder.rglob("*.jpg"))[:count]]
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for data in datas:
            check(data, 0, 1)
        best = min(best, time.process_time() - start)
    return best / max(1, len(datas)) * 1e6


def tar_writer_inspect_batch(batch: "WorkBatch", limits: "ImageLimits") -> "BatchResult":
    """``sela.data.images.inspect_batch`` with the batch's tar members built by ``webdataset.TarWriter`` instead of
    ``sela.data.tarmembers.append_member``: one writer per batch, in the decode worker, members spooled as before."""
    import webdataset

    from sela.data.images import BatchResult, _inspect_item, write_file

    result = BatchResult([], [], [], [], None, [])
    stream = io.BytesIO()
    writer = webdataset.TarWriter(stream, user="", group="", mode=0o444, mtime=0, encoder=False)
    for index, key in enumerate(batch.keys):
        sha256, reason, width, height, extension, image = _inspect_item(batch, index, limits)
        for column, value in zip(result[:4], (sha256, reason, width, height), strict=True):
            column.append(value)
        start = writer.tarstream.offset
        if image:
            writer.write({"__key__": key, extension: image})
        result.member_sizes.append(writer.tarstream.offset - start)
    length = writer.tarstream.offset  # the members; close() adds the end-of-archive blocks, left out
    writer.close()
    if not length:
        return result
    write_file(batch.spool, stream.getbuffer()[:length])
    return result._replace(spool=batch.spool)


def webdataset_records(shards: Iterable[dict[str, str]]) -> Iterator[dict[str, object]]:
    """``sela.data.shards.shard_records`` as webdataset's own reader: ``tarfile_to_samples``."""
    import webdataset

    from sela.data import remote

    remote.register_gopen()
    yield from webdataset.tarfile_to_samples()(shards)


def use_webdataset() -> None:
    """Make the ingest, the stream and ``read_shards`` do their tar work through webdataset (forked workers
    inherit it)."""
    import sela.data.ingest
    import sela.data.loader
    import sela.data.shards

    sela.data.ingest.inspect_batch = tar_writer_inspect_batch
    sela.data.loader.shard_records = sela.data.shards.shard_records = webdataset_records


def shard_digest(output: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(output.glob("shard-*.tar")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def measure(args: argparse.Namespace) -> None:
    """One row: for every scratch folder named on stdin, one repeat (tar then ingest, ImageFolder then stream,
    ``read_shards``, the JPEG check) and one JSON line on stdout. One process for all repeats: imports once."""
    sys.path.insert(0, str(args.root))
    import sela

    assert Path(sela.__file__).resolve().parent == args.root.resolve() / "sela", sela.__file__
    if args.variant == WEBDATASET:
        use_webdataset()
    folder = args.folder
    files = sum(1 for path in folder.rglob("*") if path.is_file())
    for line in sys.stdin:
        scratch = Path(line.strip())
        output = scratch / "shards"
        tar_seconds = time_tar(folder, scratch / "folder.tar")
        ingest_seconds, ingest_cpu, count = time_ingest(folder, output, args)
        folder_seconds, folder_count = time_image_folder(folder, args)
        stream_seconds, stream_count = time_stream(output, args)
        print(json.dumps({
            "tar": files / tar_seconds, "ingest": count / ingest_seconds, "ingest_cpu_us": ingest_cpu / count * 1e6,
            "image_folder": folder_count / folder_seconds, "stream": stream_count / stream_seconds,
            "read_shards_cpu_us": read_shards_cost(output, args),
            "jpeg_check_us": jpeg_check_cost(folder), "shards": shard_digest(output), "images": count,
        }), flush=True)  # the caller removes the scratch folder


# ---------------------------------------------------------------------------------------------------------------
# The table: every row's measurement run in turn, ``--repeats`` times.


class Row:
    """The process measuring one row (``--measure``), asked for one repeat at a time."""

    def __init__(self, name: str, root: Path, variant: str, folder: Path, log: Path, args: argparse.Namespace) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--measure", "--root", str(root), "--variant",
                   variant, "--folder", str(folder), "--workers", str(args.workers), "--batch-size",
                   str(args.batch_size), "--image-size", str(args.image_size), "--samples-per-shard",
                   str(args.samples_per_shard)]
        # The row's code first; PYTHONPATH left out so nothing else (an editable install aside) shadows it.
        environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        self.name, self.log = name, log
        self.errors = log.open("w")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors,
                                        text=True, env=environment)
        self.results: list[dict] = []

    def measure(self, scratch: Path) -> None:
        scratch.mkdir()
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(f"{scratch}\n")
            self.process.stdin.flush()
            while not (line := self.process.stdout.readline()).startswith("{"):
                if not line:
                    raise BrokenPipeError
        except BrokenPipeError:
            raise RuntimeError(f"{self.name}: the measuring process stopped:\n{self.log.read_text()}") from None
        self.results.append(json.loads(line))
        shutil.rmtree(scratch)

    def close(self) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        self.process.wait()
        self.errors.close()
        for line in self.log.read_text().splitlines():
            if line.startswith("note:"):
                print(f"{self.name}: {line}")


def ratio_cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=REPOSITORY.parent / "shared/datasets/cifar10/test.tar.gz")
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with (importable: "
                        "for b334b05, its C extension built in place)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="measurements of every row, run in turn")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    rows = [("after", REPOSITORY, ""), ("after, webdataset writer+reader", REPOSITORY, WEBDATASET)]
    if args.before is not None:
        rows.insert(0, (f"before: {args.before}", args.before, ""))
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        with tarfile.open(args.archive) as archive:
            archive.extractall(scratch / "extracted", filter="data")
        folder = folder_root(scratch / "extracted")
        images = sum(1 for path in folder.rglob("*") if path.is_file())
        print(f"{args.archive.name}: {images} images; {len(rows)} rows x {args.repeats} repeats", flush=True)
        measured = [Row(name, root, variant, folder, scratch / f"row-{number}.log", args)
                    for number, (name, root, variant) in enumerate(rows)]
        try:
            for repeat in range(args.repeats):
                for number, row in enumerate(measured):
                    row.measure(scratch / f"{repeat}-{number}")
        finally:
            for row in measured:
                row.close()
        results = {row.name: row.results for row in measured}
    table = [["code", "ingest/s", "tar/s", "ingest/tar", "ingest CPU/img", "stream/s", "ImageFolder/s",
              "stream/ImageFolder", "read_shards CPU/img", "JPEG check CPU/img"]]
    ingest_ratios, stream_ratios, ingest_cpu, read_cpu = {}, {}, {}, {}
    for name, _, _ in rows:
        runs = results[name]
        ingest_ratios[name] = [run["ingest"] / run["tar"] for run in runs]
        stream_ratios[name] = [run["stream"] / run["image_folder"] for run in runs]
        ingest_cpu[name] = [run["ingest_cpu_us"] for run in runs]
        read_cpu[name] = [run["read_shards_cpu_us"] for run in runs]
        median = {field: statistics.median(run[field] for run in runs) for field in runs[0] if field != "shards"}
        table.append([name, f"{median['ingest']:.0f}", f"{median['tar']:.0f}", ratio_cell(ingest_ratios[name]),
                      f"{median['ingest_cpu_us']:.1f} us", f"{median['stream']:.0f}", f"{median['image_folder']:.0f}",
                      ratio_cell(stream_ratios[name]), f"{median['read_shards_cpu_us']:.1f} us",
                      f"{median['jpeg_check_us']:.1f} us"])
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]))]
    for number, row in enumerate(table):
        cells = zip(row[1:], widths[1:], strict=True)
        print(row[0].ljust(widths[0]) + "".join(cell.rjust(width + 2) for cell, width in cells))
        if number == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    hand, library = rows[-2][0], rows[-1][0]
    same = {run["shards"] for run in results[hand] + results[library]}
    writer = [ours / theirs for ours, theirs in zip(ingest_ratios[hand], ingest_ratios[library], strict=True)]
    reader = [ours / theirs for ours, theirs in zip(stream_ratios[hand], stream_ratios[library], strict=True)]
    writer_cpu = [theirs / ours for ours, theirs in zip(ingest_cpu[hand], ingest_cpu[library], strict=True)]
    reader_cpu = [theirs / ours for ours, theirs in zip(read_cpu[hand], read_cpu[library], strict=True)]
    print(f"hand-written tar members over webdataset.TarWriter: ingest/tar {ratio_cell(writer)}, ingest CPU per "
          f"image {ratio_cell(writer_cpu)}; shard bytes {'identical' if len(same) == 1 else 'DIFFERENT'}")
    print(f"hand-written shard reader over webdataset.tarfile_to_samples: stream/ImageFolder {ratio_cell(reader)}, "
          f"read_shards CPU per image {ratio_cell(reader_cpu)}")
    print(f"kept where >= 1.5x (docs/shards.md). {images} images, workers {args.workers}, batch {args.batch_size}, "
          f"{args.image_size} px, {len(os.sched_getaffinity(0))} cores visible, "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
