"""The consumer side of the registry: list, show, load, pull and diff published label sets.

A version is a git tag ``<prefix>-v<N>`` made by :func:`sela.registry.publish.publish_version`; its commit holds
``params.yaml``, ``metrics/labels.json`` (in git) and ``dvc.lock`` naming the label set, card and checkpoint (in the
DVC remote). ``repo`` is a local path or a git URL. Git-tracked facts are read with git (for a URL, from one bare
clone per call); DVC-tracked files through ``dvc get``, which fetches from the remote, so none of this needs the
producer's DVC cache.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import yaml

from sela.labels.align import LabelDiff, diff_labels
from sela.paths import CARD, LABELS, METRICS

DEFAULT_PREFIX = "labels"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|[^/:]+@[^/:]+:)")  # scheme://... or scp-like git@host:path


class RegistryError(LookupError):
    """The repository, version or file asked for does not exist; the message says what does."""


@dataclass(frozen=True)
class Version:
    """One published label set, as listed: facts from git only (fast, no data transfer)."""

    tag: str
    number: int
    date: str
    commit: str
    num_images: int | None
    num_clusters: int | None
    metrics: dict[str, Any]


def _git(directory: Path | None, *args: str) -> str:
    command = ["git", *(["-C", str(directory)] if directory else []), *args]
    # A missing credential for a private URL must fail, not wait for a prompt.
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    if result.returncode != 0:
        raise RegistryError(f"`git {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


@contextmanager
def git_view(repo: str) -> Iterator[Path]:
    """A local git directory holding ``repo``'s tags: the repo itself if local, else a temporary bare clone."""
    if _URL.match(repo):
        folder = Path(tempfile.mkdtemp(prefix="sela-registry-"))
        try:
            _git(None, "clone", "--quiet", "--bare", repo, str(folder / "repo.git"))
            yield folder / "repo.git"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    path = Path(repo).expanduser().resolve()
    if not path.exists():
        raise RegistryError(f"{repo}: no such repository (a local path or a git URL)")
    _git(path, "rev-parse", "--git-dir")
    yield path


def _tags(view: Path, prefix: str) -> list[tuple[int, str, str, str]]:
    """(N, tag, ISO date of the tag, commit) for every ``<prefix>-v<N>``, oldest first."""
    pattern = re.compile(rf"^{re.escape(prefix)}-v(\d+)$")
    listing = _git(view, "for-each-ref", "--format=%(refname:short)\t%(creatordate:iso-strict)\t%(objectname)\t"
                   "%(*objectname)", f"refs/tags/{prefix}-v*")
    rows = []
    for line in listing.splitlines():
        tag, date, target, peeled = line.split("\t")
        if match := pattern.match(tag):
            # An annotated tag points at a tag object; %(*objectname) is the commit behind it (empty otherwise).
            rows.append((int(match.group(1)), tag, date, peeled or target))
    return sorted(rows)


def resolve_version(view: Path, version: str | int, prefix: str = DEFAULT_PREFIX) -> str:
    """The tag meant by ``version``: 'latest', 7, '7', 'v7' or 'labels-v7'."""
    tags = _tags(view, prefix)
    if not tags:
        raise RegistryError(f"no published versions (tags {prefix}-v<N>) in {view}")
    text = str(version)
    if text == "latest":
        return tags[-1][1]
    number = text.removeprefix(f"{prefix}-").removeprefix("v")
    for found, tag, _, _ in tags:
        if number.isdigit() and int(number) == found:
            return tag
    raise RegistryError(f"no version {version!r}; published: {', '.join(tag for _, tag, _, _ in tags)}")


def _show(view: Path, tag: str, path: str) -> str | None:
    try:
        return _git(view, "show", f"{tag}:{path}")
    except RegistryError:
        return None  # an older version without this file


def list_versions(repo: str, prefix: str = DEFAULT_PREFIX) -> list[Version]:
    """Every published version of ``repo``, oldest first, with its date, dataset size, clusters and metrics."""
    with git_view(repo) as view:
        versions = []
        for number, tag, date, commit in _tags(view, prefix):
            metrics = json.loads(_show(view, tag, METRICS) or "{}")
            params = yaml.safe_load(_show(view, tag, "params.yaml") or "{}") or {}
            versions.append(Version(tag, number, date, commit, metrics.pop("num_images", None),
                                    params.get("train", {}).get("num_clusters"), metrics))
        return versions


def _resolve(repo: str, versions: list[str | int], prefix: str) -> list[str]:
    """The tags meant by ``versions``, from one look at the repository (one bare clone for a URL)."""
    with git_view(repo) as view:
        return [resolve_version(view, version, prefix) for version in versions]


def _read_at(repo: str, tag: str, path: str) -> bytes:
    """Bytes of ``path`` at ``tag``: ``dvc get`` (from the DVC remote for a DVC-tracked file, from git otherwise).

    The dvc command of this interpreter's environment, as a subprocess: the core never imports DVC.
    """
    with tempfile.TemporaryDirectory(prefix="sela-get-") as folder:
        target = Path(folder) / "file"
        result = subprocess.run([sys.executable, "-m", "dvc", "get", repo, path, "--rev", tag, "--out", str(target)],
                                capture_output=True, text=True, check=False,
                                env={**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"})
        if result.returncode != 0 or not target.is_file():
            detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise RegistryError(f"cannot read {path} of {tag} from {repo}: {' '.join(detail[-3:])}")
        return target.read_bytes()


def read_file(repo: str, version: str | int, path: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, bytes]:
    """(tag, bytes of ``path`` at that version), fetched from the DVC remote if it is a DVC-tracked file."""
    [tag] = _resolve(repo, [version], prefix)
    return tag, _read_at(repo, tag, path)


def latest_label_set(repo: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, bytes] | None:
    """(tag, label set's parquet bytes) of the newest version, or None before the first one: the parent a new
    version aligns to."""
    with git_view(repo) as view:
        tags = _tags(view, prefix)
    if not tags:
        return None
    tag = tags[-1][1]
    return tag, _read_at(repo, tag, LABELS)


def show_card(repo: str, version: str | int = "latest", prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """The card of a version: params, data manifest hash, metrics, code version, parent version."""
    tag, data = read_file(repo, version, CARD, prefix)
    return {"version": tag, **json.loads(data)}


def load_labels(repo: str, version: str | int = "latest", prefix: str = DEFAULT_PREFIX) -> pd.DataFrame:
    """The label set of ``version`` as a DataFrame: key, label, confidence, label_head_<h>, confidence_head_<h>."""
    _, data = read_file(repo, version, LABELS, prefix)
    return pq.read_table(io.BytesIO(data)).to_pandas()


def pull_labels(repo: str, version: str | int, output: Path, prefix: str = DEFAULT_PREFIX) -> str:
    """Write the label set to ``output``: the published parquet bytes as they are, or CSV for a ``.csv`` name."""
    tag, data = read_file(repo, version, LABELS, prefix)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")  # never leave a half-written file under the real name
    if output.suffix.lower() == ".csv":
        pq.read_table(io.BytesIO(data)).to_pandas().to_csv(partial, index=False)
    else:
        partial.write_bytes(data)
    partial.replace(output)
    return tag


def diff_versions(repo: str, version_a: str | int, version_b: str | int, head: int | None = None,
                  prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """What changed from A to B: agreement after alignment, NMI, ARI, moved, split/merged clusters, new/removed."""
    column = "label" if head is None else f"label_head_{head}"
    tables = []
    for tag in _resolve(repo, [version_a, version_b], prefix):
        table = pq.read_table(io.BytesIO(_read_at(repo, tag, LABELS)))
        if column not in table.column_names:
            raise RegistryError(f"{tag} has no column {column!r}; it has {table.column_names}")
        tables.append((tag, table))
    (tag_a, a), (tag_b, b) = tables
    difference: LabelDiff = diff_labels(a.column("key").to_numpy(zero_copy_only=False),
                                        a.column(column).to_numpy(), b.column("key").to_numpy(zero_copy_only=False),
                                        b.column(column).to_numpy())
    return {"version_a": tag_a, "version_b": tag_b, "column": column, **difference.as_dict()}


def version_params(repo: str, version: str | int = "latest", prefix: str = DEFAULT_PREFIX) -> tuple[str, Any]:
    """(tag, validated ``sela.config.Params``) of the params.yaml committed with ``version``: the values its images
    were ingested and seen with, whatever the current checkout says (a version that records none is an error)."""
    from sela.config import ParamsError, parse_params  # pydantic: only the commands that need the pipeline's values

    with git_view(repo) as view:
        tag = resolve_version(view, version, prefix)
        text = _show(view, tag, "params.yaml")
    if text is None:
        raise RegistryError(f"{tag} of {repo} has no params.yaml")
    try:
        return tag, parse_params(yaml.safe_load(text) or {})
    except ParamsError as error:
        raise RegistryError(f"params.yaml of {tag} does not validate with this sela: {error}") from error
