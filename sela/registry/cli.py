"""``sela labels list|pull|diff|show|predict``: the label registry from the command line (also
``python -m sela.registry``)."""

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sela.registry.read import DEFAULT_PREFIX, RegistryError, diff_versions, list_versions, pull_labels, show_card

_METRIC_COLUMNS = ("nmi", "acc", "ari", "mean_confidence")


class CommandError(RuntimeError):
    """A command cannot do what was asked (a missing dependency, a source without images); the message says why."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sela", description="Versioned label sets made by the sela pipeline.")
    groups = parser.add_subparsers(dest="group", required=True)
    labels = groups.add_parser("labels", help="list, pull, diff, show published label sets; predict new images")
    commands = labels.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("repo", help="the producing repository: a local path or a git URL")
        sub.add_argument("--prefix", default=DEFAULT_PREFIX, help="tag prefix of the versions (default: %(default)s)")
        return sub

    listing = command("list", "versions with date, dataset size, clusters and metrics")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    pull = command("pull", "write one version's label set to a parquet or CSV file")
    pull.add_argument("--version", default="latest", help="7, v7, labels-v7 or latest (default)")
    pull.add_argument("-o", "--output", type=Path, required=True, help="FILE.parquet (as published) or FILE.csv")
    diff = command("diff", "what changed between two versions, after aligning cluster ids")
    diff.add_argument("version_a")
    diff.add_argument("version_b")
    diff.add_argument("--head", type=int, default=None, help="compare label_head_<H> instead of the label column")
    diff.add_argument("--json", action="store_true", help="machine-readable output")
    show = command("show", "the card of one version: params, data hash, metrics, code version, parent")
    show.add_argument("version", nargs="?", default="latest")
    predict = command("predict", "label new images with a version's network and rule (needs torch)")
    predict.add_argument("--version", default="latest", help="7, v7, labels-v7 or latest (default)")
    predict.add_argument("source", help="a folder, .tar/.tar.gz, glob, .txt/.lst list file or URL of images")
    predict.add_argument("-o", "--output", type=Path, required=True,
                         help="FILE.parquet or FILE.csv; the files that got no label go to FILE.quarantine.<suffix>")
    predict.add_argument("--device", default=None,
                         help="torch device, e.g. cpu, cuda:1 (default: $SELA_DEVICE, else a GPU if there is one)")
    predict.add_argument("--work-dir", type=Path, default=None,
                         help="keep the source's shards here (a rerun resumes); default: a temporary folder")
    return parser


def _format_list(rows: list[dict[str, Any]]) -> str:
    header = ["version", "date", "images", "clusters", *_METRIC_COLUMNS]
    lines = [header]
    for row in rows:
        metrics = [f"{row['metrics'][name]:.4f}" if name in row["metrics"] else "-" for name in _METRIC_COLUMNS]
        lines.append([row["tag"], row["date"], str(row["num_images"] or "-"), str(row["num_clusters"] or "-"),
                      *metrics])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _format_diff(diff: dict[str, Any]) -> str:
    lines = [
        f"{diff['version_a']} -> {diff['version_b']} ({diff['column']} column)",
        f"images: {diff['shared']} shared, {diff['new']} new, {diff['removed']} removed",
        f"agreement after aligning ids: {100 * diff['agreement']:.2f}% ({diff['moved']} images moved); "
        f"as published: {100 * diff['agreement_as_published']:.2f}%",
        f"NMI {diff['nmi']:.4f}  ARI {diff['ari']:.4f}",
    ]
    a, b = diff["version_a"], diff["version_b"]
    for cluster, parts in diff["split"].items():
        lines.append(f"split:  {a} cluster {cluster} -> {b} clusters {', '.join(map(str, parts))}")
    for cluster, parts in diff["merged"].items():
        lines.append(f"merged: {b} cluster {cluster} <- {a} clusters {', '.join(map(str, parts))}")
    if not diff["split"] and not diff["merged"]:
        lines.append("no cluster split or merged")
    return "\n".join(lines)


def run(arguments: list[str]) -> str:
    """Execute one command and return what it prints."""
    options = _parser().parse_args(arguments)
    if options.command == "list":
        rows = [version.__dict__ for version in list_versions(options.repo, options.prefix)]
        if not rows and not options.json:
            return f"no versions with tag prefix {options.prefix!r} in {options.repo}"
        return json.dumps(rows, indent=2) if options.json else _format_list(rows)
    if options.command == "pull":
        tag = pull_labels(options.repo, options.version, options.output, options.prefix)
        return f"{tag} -> {options.output}"
    if options.command == "diff":
        diff = diff_versions(options.repo, options.version_a, options.version_b, options.head, options.prefix)
        return json.dumps(diff, indent=2) if options.json else _format_diff(diff)
    if options.command == "predict":
        return _predict(options)
    return json.dumps(show_card(options.repo, options.version, options.prefix), indent=2, sort_keys=True)


def _predict(options: argparse.Namespace) -> str:
    """``sela labels predict``: progress bars on stderr, the summary line returned."""
    try:
        import torch  # noqa: F401 - the network's runtime, absent from a registry-only install
        from tqdm import tqdm
    except ImportError as error:
        raise CommandError(f"`sela labels predict` runs the version's network and needs {error.name}: "
                           "pip install 'sela[pipeline]'") from error

    from sela.registry.predict import PredictError, predict_version

    bars: list[Any] = []

    def progress(stage: str, total: int | None) -> Callable[[int], None]:
        bars.append(tqdm(desc=stage, total=total, unit="img", file=sys.stderr, mininterval=1.0))
        return bars[-1].update

    try:
        summary = predict_version(options.repo, options.version, options.source, options.output, options.device,
                                  options.prefix, options.work_dir, progress)
    except PredictError as error:
        raise CommandError(str(error)) from error
    finally:
        for bar in bars:
            bar.close()
    return summary.line()


def main(arguments: list[str] | None = None) -> int:
    """Console entry point ``sela``: exit 0 on success, 1 with a one-line reason on stderr otherwise."""
    try:
        print(run(sys.argv[1:] if arguments is None else arguments))
    except (RegistryError, CommandError) as error:
        print(f"sela: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `sela labels show ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
